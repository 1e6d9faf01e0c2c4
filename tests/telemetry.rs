//! OpenTelemetry export and JSON logs, end to end: the daemon runs a
//! 3-stage pipeline against the broker and exports OTLP/HTTP to a receiver
//! inside the test, which decodes the protobuf requests.

use flowgate_testkit as common;

use actix_web::{web, App, HttpResponse, HttpServer};
use common::*;
use lapin::BasicProperties;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BODY: &[u8] = b"{\"n\":1}";
/// A producer's trace context, continued by the pipeline.
const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";
/// A message id that would forge a log line if written raw.
const EVIL_ID: &str = "evil\nFORGED line";
/// The trace context of an HTTP client publishing through the ingress.
const HTTP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const HTTP_SPAN: &str = "b7ad6b7169203331";
/// Messages that reach the sink.
const THROUGH: usize = 8;

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// A small OTLP/HTTP traces endpoint: decodes and keeps every request.
fn receiver() -> (String, Received, actix_web::dev::ServerHandle) {
    let got: Received = Arc::default();
    let state = got.clone();
    let server = HttpServer::new(move || {
        let state = state.clone();
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                let state = state.clone();
                async move {
                    let req = ExportTraceServiceRequest::decode(body.as_ref())
                        .expect("an OTLP protobuf traces request");
                    state.lock().unwrap().push(req);
                    HttpResponse::Ok()
                        .content_type("application/x-protobuf")
                        .finish()
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind the receiver");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (format!("http://{addr}/v1/traces"), got, handle)
}

fn write_config(
    prefix: &str,
    endpoint: &str,
    enabled: bool,
    ingress: std::net::SocketAddr,
) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let ex = format!("{prefix}.ex");
    let mut text = format!(
        "[amqp]\nconnection_name = \"{prefix}\"\n[http]\nbind = \"127.0.0.1:0\"\n\
         [ingress]\nbind = \"{ingress}\"\nauth = \"none\"\nroutes = [{{ exchange = \"{ex}\" }}]\n\
         [telemetry]\nenabled = {enabled}\nendpoint = \"{endpoint}\"\nservice_name = \"otel-test\"\n\
         [log]\nformat = \"json\"\n\
         [[exchanges]]\nname = \"{ex}\"\n"
    );
    let keys = ["in", "hop1", "hop2", "hop3"];
    let queues = ["s1", "s2", "s3", "sink"];
    for (q, k) in queues.iter().zip(keys) {
        text += &format!("[[queues]]\nname = \"{prefix}.{q}\"\nbindings = [{{ exchange = \"{ex}\", routing_key = \"{k}\" }}]\n");
    }
    for i in 1..=3 {
        text += &format!(
            "[[stages]]\nname = \"s{i}\"\nqueue = \"{prefix}.s{i}\"\nhandler = \"forward\"\npayload = \"json\"\n\
             output = {{ exchange = \"{ex}\", routing_key = \"hop{i}\" }}\n"
        );
    }
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn props(id: &str, traceparent: Option<&str>) -> BasicProperties {
    let p = BasicProperties::default().with_message_id(id.into());
    match traceparent {
        None => p,
        Some(tp) => p.with_headers(headers(&[
            ("traceparent", s(tp)),
            ("tracestate", s("vendor=1")),
        ])),
    }
}

/// What one pipeline run left: the sink's messages, the exported requests,
/// the daemon's stderr.
struct Run {
    sink: Vec<(String, lapin::types::FieldTable)>,
    requests: Vec<ExportTraceServiceRequest>,
    log: String,
}

/// Runs the daemon over a 3-stage pipeline: five plain messages, one with a
/// producer's trace context, one with a hostile `traceparent`, one posted to
/// the ingress with an HTTP client's `traceparent`, one with [`EVIL_ID`] and
/// a body stage s1 dead-letters; then SIGTERM.
async fn run_pipeline(name: &str, enabled: bool) -> Run {
    let (endpoint, got, server) = receiver();
    let prefix = unique(name);
    // A free port for the ingress (the daemon binds it again at once).
    let ingress = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg_file = write_config(&prefix, &endpoint, enabled, ingress);
    let cfg = flowgate::Config::load(cfg_file.path()).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut daemon = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["run", "--config"])
            .arg(cfg_file.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log.path()).unwrap())
            .spawn()
            .expect("daemon starts"),
    );
    let client = Client::connect(AMQP_URL).await;
    let sink = format!("{prefix}.sink");
    assert!(
        wait_for_queue(&client, &sink, Duration::from_secs(30)).await,
        "daemon declared its topology"
    );
    let ex = format!("{prefix}.ex");
    for i in 0..5 {
        client
            .publish_props(&ex, "in", BODY, props(&format!("m-{i}"), None))
            .await;
    }
    let tp = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    client
        .publish_props(&ex, "in", BODY, props("m-parent", Some(&tp)))
        .await;
    let hostile = format!("00-{}-{PARENT_SPAN}-01", "z".repeat(300));
    client
        .publish_props(&ex, "in", BODY, props("m-hostile", Some(&hostile)))
        .await;
    client
        .publish_props(&ex, "in", b"not json", props(EVIL_ID, None))
        .await;
    let res = awc::Client::default()
        .post(format!("http://{ingress}/publish/{ex}/in"))
        .insert_header(("traceparent", format!("00-{HTTP_TRACE}-{HTTP_SPAN}-01")))
        .insert_header(("Idempotency-Key", "m-http"))
        .send_body(BODY)
        .await
        .expect("ingress answers");
    assert_eq!(res.status().as_u16(), 202);
    let dlq = format!("{prefix}.s1.dlq");
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.depth(&sink).await == THROUGH as u32 && client.depth(&dlq).await == 1
        })
        .await,
        "{THROUGH} messages through the pipeline, 1 dead-lettered"
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let sent = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(sent.elapsed() < Duration::from_secs(60), "daemon exits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = String::from_utf8_lossy(&std::fs::read(log.path()).unwrap()).into_owned();
    assert_eq!(status.code(), Some(0), "exit 0; log:\n{log}");
    let sink = client
        .collect(&sink, THROUGH, Duration::from_secs(10))
        .await;
    server.stop(true).await;
    // The daemon flushed its spans before it exited: all are in.
    let requests = std::mem::take(&mut *got.lock().unwrap());
    Run {
        sink,
        requests,
        log,
    }
}

/// One exported span, flattened.
#[derive(Clone, Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    kind: i32,
    attrs: HashMap<String, String>,
}

fn value(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn spans(requests: &[ExportTraceServiceRequest]) -> Vec<Span> {
    let mut out = Vec::new();
    for r in requests {
        for rs in &r.resource_spans {
            let resource: HashMap<_, _> = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .map(|kv| (kv.key.clone(), value(kv)))
                .collect();
            assert_eq!(
                resource.get("service.name").map(String::as_str),
                Some("otel-test")
            );
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    out.push(Span {
                        trace_id: hex::encode(&sp.trace_id),
                        span_id: hex::encode(&sp.span_id),
                        parent: hex::encode(&sp.parent_span_id),
                        kind: sp.kind,
                        attrs: sp
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), value(kv)))
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

fn attr<'a>(s: &'a Span, k: &str) -> &'a str {
    s.attrs
        .get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("span without {k}: {s:?}"))
}

#[actix_rt::test]
async fn three_hops_give_one_trace_per_message_with_linked_spans_and_json_logs() {
    let run = run_pipeline("otel", true).await;
    let all = spans(&run.requests);
    let messaging: Vec<&Span> = all
        .iter()
        .filter(|s| s.attrs.get("messaging.system").map(String::as_str) == Some("rabbitmq"))
        .collect();
    let mut by_id: HashMap<&str, Vec<&Span>> = HashMap::new();
    for s in &messaging {
        by_id
            .entry(attr(s, "messaging.message.id"))
            .or_default()
            .push(s);
    }
    let ids: Vec<String> = (0..5)
        .map(|i| format!("m-{i}"))
        .chain(["m-parent".into(), "m-hostile".into(), "m-http".into()])
        .collect();
    let mut traces = HashSet::new();
    for id in &ids {
        let spans = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("spans of {id}"));
        let trace: HashSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(trace.len(), 1, "{id}: one trace: {spans:?}");
        traces.insert(spans[0].trace_id.clone());
        let process = |stage: &str| {
            let found: Vec<&&Span> = spans
                .iter()
                .filter(|s| {
                    s.attrs.get("messaging.operation.type").map(String::as_str) == Some("process")
                        && s.attrs.get("stage").map(String::as_str) == Some(stage)
                })
                .collect();
            assert_eq!(found.len(), 1, "{id}: one process span of {stage}");
            *found[0]
        };
        let (p1, p2, p3) = (process("s1"), process("s2"), process("s3"));
        for (i, p) in [p1, p2, p3].into_iter().enumerate() {
            assert_eq!(p.kind, SpanKind::Consumer as i32);
            assert!(attr(p, "messaging.destination.name").ends_with(&format!(".s{}", i + 1)));
            assert_eq!(
                attr(p, "messaging.message.body.size"),
                BODY.len().to_string()
            );
            let key = if i == 0 {
                "in".to_owned()
            } else {
                format!("hop{i}")
            };
            assert_eq!(attr(p, "messaging.rabbitmq.destination.routing_key"), key);
            // The output this stage published: a child of its process span,
            // and the parent of the next stage's.
            let publish: Vec<&&Span> = spans.iter().filter(|s| s.parent == p.span_id).collect();
            assert_eq!(publish.len(), 1, "{id}: one publish under s{}", i + 1);
            let publish = publish[0];
            assert_eq!(publish.kind, SpanKind::Producer as i32);
            assert_eq!(attr(publish, "messaging.operation.type"), "publish");
            assert!(attr(publish, "messaging.destination.name").ends_with(".ex"));
            assert_eq!(
                attr(publish, "messaging.rabbitmq.destination.routing_key"),
                format!("hop{}", i + 1)
            );
            match i {
                0 => assert_eq!(p2.parent, publish.span_id, "{id}: s2 under s1's publish"),
                1 => assert_eq!(p3.parent, publish.span_id, "{id}: s3 under s2's publish"),
                _ => {
                    // What reached the sink carries the last publish span.
                    let (_, h) = run
                        .sink
                        .iter()
                        .find(|(m, _)| m == id)
                        .unwrap_or_else(|| panic!("{id} in the sink"));
                    let tp = header(h, "traceparent").expect("a traceparent");
                    assert_eq!(tp, format!("00-{}-{}-01", p1.trace_id, publish.span_id));
                }
            }
        }
        match id.as_str() {
            "m-parent" => {
                assert_eq!(p1.trace_id, PARENT_TRACE, "the producer's trace continues");
                assert_eq!(p1.parent, PARENT_SPAN);
                let (_, h) = run.sink.iter().find(|(m, _)| m == id).unwrap();
                assert_eq!(header(h, "tracestate").as_deref(), Some("vendor=1"));
            }
            "m-http" => {
                assert_eq!(p1.trace_id, HTTP_TRACE, "the HTTP client's trace continues");
                let ingress = spans
                    .iter()
                    .find(|s| s.span_id == p1.parent)
                    .expect("s1 under the ingress's publish span");
                assert_eq!(ingress.kind, SpanKind::Producer as i32);
                assert_eq!(attr(ingress, "messaging.operation.type"), "publish");
                assert_eq!(
                    attr(ingress, "messaging.rabbitmq.destination.routing_key"),
                    "in"
                );
                assert_eq!(ingress.parent, HTTP_SPAN);
            }
            // Ignored: a new root.
            _ => assert_eq!(p1.parent, "", "{id}: a root span"),
        }
    }
    assert_eq!(traces.len(), ids.len(), "one trace per message");

    // The log: every line is a JSON object, and the dead letter's event
    // carries its span's trace and span ids, stage and (escaped) message id.
    let lines: Vec<serde_json::Value> = run
        .log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(lines
        .iter()
        .all(|v| v.is_object() && v["level"].is_string()));
    let evil = by_id
        .get("evil\\nFORGED line")
        .expect("the hostile id's span, escaped");
    let dead: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["message"] == "dead-lettered")
        .collect();
    assert_eq!(dead.len(), 1, "log:\n{}", run.log);
    let dead = dead[0];
    assert_eq!(dead["stage"], "s1");
    assert_eq!(dead["reason"], "malformed");
    assert_eq!(dead["message_id"], "evil\\nFORGED line");
    assert_eq!(dead["trace_id"], evil[0].trace_id.as_str());
    assert_eq!(
        dead["span_id"],
        evil.iter()
            .find(|s| attr(s, "messaging.operation.type") == "process")
            .unwrap()
            .span_id
            .as_str()
    );
}

#[actix_rt::test]
async fn export_off_sends_no_span_and_passes_the_trace_through() {
    let run = run_pipeline("otel-off", false).await;
    assert!(
        run.requests.is_empty(),
        "nothing exported: {} requests",
        run.requests.len()
    );
    // No span, so no trace ids in the log; it is still JSON.
    for l in run.log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON lines");
        assert!(v.get("trace_id").is_none(), "{l}");
    }
    let (_, h) = run.sink.iter().find(|(m, _)| m == "m-parent").unwrap();
    assert_eq!(
        header(h, "traceparent"),
        Some(format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")),
        "passed through unchanged"
    );
    let (_, h) = run.sink.iter().find(|(m, _)| m == "m-http").unwrap();
    assert_eq!(
        header(h, "traceparent"),
        Some(format!("00-{HTTP_TRACE}-{HTTP_SPAN}-01")),
        "the HTTP client's, passed through"
    );
    let (_, h) = run.sink.iter().find(|(m, _)| m == "m-hostile").unwrap();
    assert_eq!(header(h, "traceparent"), None, "a hostile one is dropped");
    let (_, h) = run.sink.iter().find(|(m, _)| m == "m-0").unwrap();
    assert_eq!(header(h, "traceparent"), None);
}

//! Partitions across instances (`queues[].partitions`, `[partitioning]`;
//! item 4 of #26): a producer that is not flowgate (pika) publishes keyed
//! events to the partitions' exchange; two engines, instance 0 and 1 of 2,
//! share the partitions; every key lands on one partition and is handled in
//! order; restarting one engine leaves the other's partitions alone. And a
//! broker without the plugin refuses the start with a message naming it.
//!
//! pika is installed by tests/foreign/setup.sh (see tests/foreign_clients.rs):
//! under `CI=true` a missing client fails the test, elsewhere it skips loudly.

use flowgate_testkit as common;

#[path = "foreign/clients.rs"]
mod clients;

use clients::{clients_or_skip, FOREIGN};
use common::daemon::{in_order_with_repeats, recorded};
use common::*;
use flowgate::{handler_fn, Config, Delivery, Engine, EngineHandle, HandlerError, Outcome};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The header the events carry their key in (the partition key and the
/// stage's order key).
const KEY: &str = "entity";
const PARTITIONS: u16 = 4;
const KEYS: u32 = 40;
/// Events per key in each of the two rounds pika publishes.
const ROUND: u32 = 25;
/// Events per key pika publishes upstream, which a flowgate stage forwards
/// to the partitions' exchange.
const FORWARDED: u32 = 5;
/// Every key's last event: one through the HTTP ingress after the rest.
const LAST: u32 = 2 * ROUND + FORWARDED;

/// One handling: which engine, from which queue, of which key and event.
#[derive(Clone, Debug)]
struct Handled {
    instance: u32,
    queue: String,
    key: String,
    seq: u32,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Handled>>>);

impl Log {
    fn all(&self) -> Vec<Handled> {
        self.0.lock().unwrap().clone()
    }

    /// Per key, the events handled, in handling order.
    fn by_key(&self) -> BTreeMap<String, Vec<u32>> {
        let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for h in self.all() {
            out.entry(h.key).or_default().push(h.seq);
        }
        out
    }

    /// The keys among `keys` whose event `last` was not handled yet.
    fn missing(&self, keys: &[String], last: u32) -> Vec<String> {
        let by_key = self.by_key();
        keys.iter()
            .filter(|k| !by_key.get(*k).is_some_and(|v| v.contains(&last)))
            .cloned()
            .collect()
    }

    /// True once every key's event `last` was handled.
    fn reached(&self, keys: &[String], last: u32) -> bool {
        self.missing(keys, last).is_empty()
    }
}

fn config(prefix: &str, instance: u32) -> Config {
    with_partitioning(
        prefix,
        instance,
        &format!("[partitioning]\ninstance_index = {instance}\ninstance_count = 2"),
    )
}

/// The test's config with `partitioning` as its `[partitioning]` section.
fn with_partitioning(prefix: &str, instance: u32, partitioning: &str) -> Config {
    let toml = format!(
        r##"
[amqp]
url = "{AMQP_URL}"
connection_name = "{prefix}-{instance}"
[http]
bind = ""
[ingress]
bind = "127.0.0.1:0"
auth = "none"
routes = [{{ exchange = "{prefix}.orders" }}]
[shutdown]
grace = "10s"
{partitioning}
[[exchanges]]
name = "{prefix}.ex"
[[queues]]
name = "{prefix}.orders"
kind = "classic"
partitions = {PARTITIONS}
partition_key = "header:{KEY}"
[[queues]]
name = "{prefix}.in"
kind = "classic"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "#" }}]
single_active_consumer = true
[[stages]]
name = "s0"
queue = "{prefix}.in"
handler = "forward"
order_by = "header:{KEY}"
output = {{ exchange = "{prefix}.orders", routing_key = "fwd" }}
[[stages]]
name = "s1"
queue = "{prefix}.orders"
handler = "ordered"
order_by = "header:{KEY}"
concurrency = 8
prefetch = 40
"##
    );
    Config::from_toml(&toml).unwrap()
}

async fn start(cfg: &Config, instance: u32, log: &Log) -> EngineHandle {
    let log = log.clone();
    let h = Engine::builder()
        .config(cfg.clone())
        .handler(
            "ordered",
            handler_fn(move |d: Delivery| {
                let log = log.clone();
                async move {
                    let body = String::from_utf8_lossy(&d.body).into_owned();
                    let (key, seq) = body.split_once(':').unwrap_or(("", "0"));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    log.0.lock().unwrap().push(Handled {
                        instance,
                        queue: d.queue.clone(),
                        key: key.to_owned(),
                        seq: seq.parse().unwrap_or(u32::MAX),
                    });
                    Ok::<_, HandlerError>(Outcome::ack())
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(30)).await);
    h
}

/// The partitions an engine's stages consume (from its management view).
fn consumed(h: &EngineHandle) -> Vec<String> {
    let mut q: Vec<String> = h
        .control()
        .readiness()
        .stages
        .into_iter()
        .filter(|s| s.name.starts_with("s1."))
        .map(|s| s.queue)
        .collect();
    q.sort();
    q
}

/// Consumer tags per queue among `queues`, as the broker lists them.
async fn broker_consumers(queues: &[String]) -> BTreeMap<String, Vec<String>> {
    broker_consumers_where(queues, "consumer_tag").await
}

/// Per queue among `queues`, the broker's `column` of each consumer.
async fn broker_consumers_where(queues: &[String], column: &str) -> BTreeMap<String, Vec<String>> {
    let column = column.to_owned();
    let rows =
        tokio::task::spawn_blocking(move || common::node::list_consumers(&["queue_name", &column]))
            .await
            .expect("list_consumers task")
            .expect("rabbitmqctl list_consumers");
    let mut map: BTreeMap<String, Vec<String>> =
        queues.iter().map(|q| (q.clone(), Vec::new())).collect();
    for row in rows {
        if let [q, value, ..] = row.as_slice() {
            if let Some(values) = map.get_mut(q) {
                values.push(value.clone());
            }
        }
    }
    map
}

/// pika publishes events `first..last` of every key to `exchange`.
async fn pika_publish(dir: &Path, exchange: &str, first: u32, last: u32) {
    let out = tokio::process::Command::new(dir.join("venv/bin/python"))
        .arg(format!("{FOREIGN}/publish_keyed_pika.py"))
        .args([AMQP_URL, exchange, KEY])
        .args([KEYS, first, last].map(|n| n.to_string()))
        .kill_on_drop(true)
        .output()
        .await
        .expect("pika runs");
    assert!(
        out.status.success(),
        "pika failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(sent, KEYS * (last - first));
}

/// Acceptance 4 of #26. N = 4 partitions, two engines with
/// `instance_index` 0 and 1 of 2, pika publishing with keys: the broker
/// shows one consumer per partition, two partitions per engine; every
/// key's events arrive at exactly one partition and are handled in publish
/// order; with engine 1 shut down, engine 0 goes on with its partitions
/// while engine 1's wait in the broker; engine 1 started again takes its
/// own partitions back and engine 0's consumers are the same ones as
/// before. Then a flowgate stage's outputs and the HTTP ingress
/// (`Partition-Key`) publish more of each key: they land on the key's
/// partition too, after the key's earlier events.
#[actix_rt::test]
async fn two_instances_share_the_partitions_and_each_key_stays_on_one() {
    let Some(dir) = clients_or_skip("two_instances_share_the_partitions") else {
        return;
    };
    let prefix = unique("part");
    let cfgs = [config(&prefix, 0), config(&prefix, 1)];
    let _cleanup = Cleanup::new(AMQP_URL, &cfgs[0]);
    let exchange = format!("{prefix}.orders");
    let partitions: Vec<String> = (0..PARTITIONS).map(|p| format!("{exchange}.{p}")).collect();
    let log = Log::default();
    let a = start(&cfgs[0], 0, &log).await;
    let mut b = start(&cfgs[1], 1, &log).await;

    // Spread 2/2: each engine consumes its own two partitions, and the
    // broker has one consumer on each partition.
    let (even, odd) = (
        vec![partitions[0].clone(), partitions[2].clone()],
        vec![partitions[1].clone(), partitions[3].clone()],
    );
    assert_eq!(consumed(&a), even);
    assert_eq!(consumed(&b), odd);
    let before = broker_consumers(&partitions).await;
    assert!(
        before.values().all(|tags| tags.len() == 1),
        "one consumer per partition: {before:?}"
    );

    // Round 1: pika publishes, both engines handle.
    pika_publish(&dir, &exchange, 0, ROUND).await;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys, ROUND - 1)
        })
        .await,
        "round 1 not handled: {:?}",
        log.missing(&keys, ROUND - 1)
    );
    // Every key on exactly one partition, each engine only on its own.
    let mut partition_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    for h in log.all() {
        let own = if h.instance == 0 { &even } else { &odd };
        assert!(own.contains(&h.queue), "{h:?} is not this instance's");
        partition_of.entry(h.key).or_default().insert(h.queue);
    }
    for (k, qs) in &partition_of {
        assert_eq!(qs.len(), 1, "{k} arrived at {qs:?}");
    }
    let used: BTreeSet<&String> = partition_of.values().flatten().collect();
    assert_eq!(used.len(), usize::from(PARTITIONS), "keys hash over all");
    let keys_of = |own: &[String]| -> Vec<String> {
        let mut v: Vec<String> = partition_of
            .iter()
            .filter(|(_, qs)| qs.iter().all(|q| own.contains(q)))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    };
    let (keys_a, keys_b) = (keys_of(&even), keys_of(&odd));

    // Engine 1 goes away: engine 0 goes on with its partitions alone.
    let report = b.shutdown().await;
    assert!(report.clean, "{report:?}");
    let handled_by_b = log.all().iter().filter(|h| h.instance == 1).count();
    pika_publish(&dir, &exchange, ROUND, 2 * ROUND).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys_a, 2 * ROUND - 1)
        })
        .await,
        "engine 0 stopped with engine 1"
    );
    let waiting = broker_consumers(&partitions).await;
    for q in &odd {
        assert!(waiting[q].is_empty(), "{q} consumed while engine 1 is down");
    }
    for q in &even {
        assert_eq!(waiting[q], before[q], "{q}: engine 0's consumer changed");
    }
    assert_eq!(
        log.all().iter().filter(|h| h.instance == 1).count(),
        handled_by_b,
        "nobody handled engine 1's partitions while it was down"
    );

    // Engine 1 back: it takes its own partitions, engine 0's stay as they were.
    b = start(&cfgs[1], 1, &log).await;
    assert_eq!(consumed(&b), odd);
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys_b, 2 * ROUND - 1)
        })
        .await,
        "engine 1's partitions not handled after its restart"
    );
    let after = broker_consumers(&partitions).await;
    for q in &even {
        assert_eq!(after[q], before[q], "{q}: engine 0's consumer changed");
    }
    for q in &odd {
        assert_eq!(after[q].len(), 1, "{q}: {after:?}");
        assert_ne!(after[q], before[q], "{q}: engine 1's new consumer");
    }

    // flowgate's own output: pika publishes upstream, stage s0 forwards to
    // the partitions' exchange; each key lands where pika's landed.
    pika_publish(
        &dir,
        &format!("{prefix}.ex"),
        2 * ROUND,
        2 * ROUND + FORWARDED,
    )
    .await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys, 2 * ROUND + FORWARDED - 1)
        })
        .await,
        "the forwarded round not handled: {:?}",
        log.missing(&keys, 2 * ROUND + FORWARDED - 1)
    );
    // The HTTP ingress: the key in `Partition-Key`, one event per key.
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/publish/{exchange}/http",
        a.ingress_addr().expect("ingress")
    );
    for k in &keys {
        let r = http
            .post(&url)
            .header("Partition-Key", k)
            .header("Idempotency-Key", format!("{k}-{LAST}"))
            .body(format!("{k}:{LAST}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            202,
            "{k}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    let r = http.post(&url).body("no key").send().await.unwrap();
    assert_eq!(r.status(), 400, "a partitioned route needs its key");
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys, LAST)
        })
        .await,
        "the ingress round not handled: {:?}",
        log.missing(&keys, LAST)
    );
    let mut partition_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    for h in log.all() {
        let own = if h.instance == 0 { &even } else { &odd };
        assert!(own.contains(&h.queue), "{h:?} is not this instance's");
        partition_of.entry(h.key).or_default().insert(h.queue);
    }
    for (k, qs) in &partition_of {
        assert_eq!(qs.len(), 1, "{k} arrived at {qs:?}");
    }

    // Per key: the published order, every event (a redelivered suffix may
    // repeat).
    let by_key = log.by_key();
    for k in &keys {
        let h = by_key.get(k).cloned().unwrap_or_default();
        assert_eq!(h.first(), Some(&0), "{k}: {h:?}");
        for w in h.windows(2) {
            assert!(
                w[1] == w[0] + 1 || w[1] <= w[0],
                "{k}: {} handled right after {}: {h:?}",
                w[1],
                w[0]
            );
        }
        assert_eq!(h.iter().max(), Some(&LAST), "{k}: {h:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Without `[partitioning]` every instance subscribes to every partition:
/// the broker shows two consumers on each, one of them active, and every
/// key is handled in order; when one instance goes, the other's standby
/// consumers take over its partitions.
#[actix_rt::test]
async fn without_partitioning_every_instance_subscribes_and_one_is_active_per_partition() {
    let prefix = unique("part-all");
    let cfgs = [
        with_partitioning(&prefix, 0, ""),
        with_partitioning(&prefix, 1, ""),
    ];
    let _cleanup = Cleanup::new(AMQP_URL, &cfgs[0]);
    let exchange = format!("{prefix}.orders");
    let partitions: Vec<String> = (0..PARTITIONS).map(|p| format!("{exchange}.{p}")).collect();
    let log = Log::default();
    let a = start(&cfgs[0], 0, &log).await;
    let b = start(&cfgs[1], 1, &log).await;
    assert_eq!(consumed(&a), partitions);
    assert_eq!(consumed(&b), partitions);
    let active = broker_consumers_where(&partitions, "active").await;
    for (q, flags) in &active {
        assert_eq!(flags.len(), 2, "{q}: both instances subscribe: {active:?}");
        assert_eq!(
            flags.iter().filter(|f| *f == "true").count(),
            1,
            "{q}: one active: {active:?}"
        );
    }
    let client = Client::connect(AMQP_URL).await;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    let publish = |first: u32, last: u32| {
        let (client, exchange, keys) = (&client, &exchange, &keys);
        async move {
            for seq in first..last {
                for k in keys {
                    let props = flowgate::lapin::BasicProperties::default()
                        .with_message_id(format!("{k}-{seq}").into())
                        .with_headers(headers(&[(KEY, s(k))]));
                    client
                        .publish_props(exchange, "", format!("{k}:{seq}").as_bytes(), props)
                        .await;
                }
            }
        }
    };
    publish(0, ROUND).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys, ROUND - 1)
        })
        .await,
        "not handled: {:?}",
        log.missing(&keys, ROUND - 1)
    );
    // Instance 0 goes: instance 1's consumers take every partition.
    assert!(a.shutdown().await.clean);
    publish(ROUND, 2 * ROUND).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            log.reached(&keys, 2 * ROUND - 1)
        })
        .await,
        "instance 1 did not take over: {:?}",
        log.missing(&keys, 2 * ROUND - 1)
    );
    let mut partition_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    for h in log.all() {
        partition_of.entry(h.key).or_default().insert(h.queue);
    }
    for (k, qs) in &partition_of {
        assert_eq!(qs.len(), 1, "{k} arrived at {qs:?}");
    }
    for (k, h) in log.by_key() {
        for w in h.windows(2) {
            assert!(w[1] == w[0] + 1 || w[1] <= w[0], "{k}: {h:?}");
        }
        assert_eq!(h.iter().max(), Some(&(2 * ROUND - 1)), "{k}: {h:?}");
    }
    b.shutdown().await;
}

/// A stage on a partitioned queue without `order_by` retries through the
/// ladder's tier queues, one per partition: a failed attempt comes back to
/// the partition it left.
#[actix_rt::test]
async fn a_retry_comes_back_to_its_own_partition() {
    let prefix = unique("part-retry");
    let toml = format!(
        r#"
[amqp]
url = "{AMQP_URL}"
connection_name = "{prefix}"
[http]
bind = ""
[[queues]]
name = "{prefix}.orders"
kind = "classic"
partitions = {PARTITIONS}
partition_key = "message_id"
[[stages]]
name = "s1"
queue = "{prefix}.orders"
handler = "flaky"
retry = {{ max_attempts = 3, backoff = ["50ms"] }}
"#
    );
    let cfg = Config::from_toml(&toml).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    // (message id, attempt, partition) of every handling.
    let seen: Arc<Mutex<Vec<(String, i64, String)>>> = Arc::default();
    let record = seen.clone();
    let h = Engine::builder()
        .config(cfg)
        .handler(
            "flaky",
            handler_fn(move |d: Delivery| {
                let record = record.clone();
                async move {
                    let attempt = d.header_i64(flowgate::envelope::ATTEMPT).unwrap_or(1);
                    let id = d.message_id().unwrap_or_default().to_owned();
                    record.lock().unwrap().push((id, attempt, d.queue.clone()));
                    if attempt < 2 {
                        return Err(HandlerError::from("once more"));
                    }
                    Ok(Outcome::ack())
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(30)).await);
    let client = Client::connect(AMQP_URL).await;
    let exchange = format!("{prefix}.orders");
    for i in 0..20 {
        client.publish(&exchange, "", &format!("m{i}"), b"x").await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(_, a, _)| *a == 2)
                .count()
                == 20
        })
        .await,
        "{:?}",
        seen.lock().unwrap()
    );
    let mut by_id: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (id, _, queue) in seen.lock().unwrap().iter() {
        by_id.entry(id.clone()).or_default().insert(queue.clone());
    }
    for (id, queues) in &by_id {
        assert_eq!(queues.len(), 1, "{id}: attempts on {queues:?}");
    }
    let used: BTreeSet<&String> = by_id.values().flatten().collect();
    assert!(used.len() > 1, "message ids hash over several partitions");
    h.shutdown().await;
}

/// Without the `rabbitmq_consistent_hash_exchange` plugin (a private node
/// with no plugins), the start fails with a message naming it.
#[actix_rt::test]
async fn a_broker_without_the_plugin_refuses_the_start_naming_it() {
    let node = common::node::BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("part-noplugin");
    let mut cfg = config(&prefix, 0);
    cfg.amqp.url = node.amqp_url();
    let _cleanup = Cleanup::new(&node.amqp_url(), &cfg);
    let err = Engine::builder()
        .config(cfg)
        .handler(
            "ordered",
            handler_fn(|_d: Delivery| async { Ok(Outcome::ack()) }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .err()
        .expect("the start fails");
    let msg = err.to_string();
    assert!(
        matches!(err, flowgate::Error::MissingPlugin { .. }),
        "{msg}"
    );
    assert!(msg.contains("rabbitmq_consistent_hash_exchange"), "{msg}");
}

/// The partitions a daemon's stages consume (its `/readyz`), sorted.
async fn daemon_consumes(d: &common::daemon::Daemon) -> Vec<String> {
    let Some(answer) = d.http_get("/readyz").await else {
        return Vec::new();
    };
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let mut q: Vec<String> = v["stages"]
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .filter_map(|s| s["queue"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    q.sort();
    q
}

/// Acceptance 4 of #26 as an operator runs it: two `flowgate run` daemons,
/// `instance_index` 0 and 1 of 2, pika publishing with keys to the
/// partitions' exchange. Each daemon consumes its own two partitions, the
/// broker has one consumer on each; every key is handled by one daemon
/// only, in publish order. `kill -9` of daemon 1: daemon 0 goes on with
/// its keys, its consumers the same ones, while daemon 1's partitions wait
/// in the broker; daemon 1 started again takes them back and its keys go
/// on in order (at most a repeated suffix: what it had not acked).
#[actix_rt::test]
async fn two_daemons_share_the_partitions_and_a_kill_leaves_the_others_alone() {
    let Some(venv) = clients_or_skip("two_daemons_share_the_partitions") else {
        return;
    };
    let prefix = unique("partd");
    let dir = tempfile::tempdir().unwrap();
    let toml = |i: u32| {
        format!(
            r#"
[amqp]
url = "{AMQP_URL}"
connection_name = "{prefix}-{i}"
[shutdown]
grace = "5s"
[partitioning]
instance_index = {i}
instance_count = 2
[[queues]]
name = "{prefix}.orders"
kind = "classic"
partitions = {PARTITIONS}
partition_key = "header:{KEY}"
[[stages]]
name = "s1"
queue = "{prefix}.orders"
handler = "record"
record_file = "{}"
delay = "2ms"
order_by = "header:{KEY}"
concurrency = 8
prefetch = 40
"#,
            dir.path().join(format!("{i}.rec")).display()
        )
    };
    let _cleanup = Cleanup::new(AMQP_URL, &Config::from_toml(&toml(0)).unwrap());
    let exe: &Path = env!("CARGO_BIN_EXE_flowgate").as_ref();
    let mut daemons = [
        common::daemon::Daemon::start(exe, dir.path(), "d0", &toml(0)),
        common::daemon::Daemon::start(exe, dir.path(), "d1", &toml(1)),
    ];
    for d in &daemons {
        assert!(
            eventually(Duration::from_secs(30), || d.ready()).await,
            "{}",
            d.log()
        );
    }
    let exchange = format!("{prefix}.orders");
    let partitions: Vec<String> = (0..PARTITIONS).map(|p| format!("{exchange}.{p}")).collect();
    let own = [
        vec![partitions[0].clone(), partitions[2].clone()],
        vec![partitions[1].clone(), partitions[3].clone()],
    ];
    for (d, own) in daemons.iter().zip(&own) {
        assert_eq!(&daemon_consumes(d).await, own, "{}", d.log());
    }
    let before = broker_consumers(&partitions).await;
    assert!(
        before.values().all(|tags| tags.len() == 1),
        "one consumer per partition: {before:?}"
    );
    let records = [dir.path().join("0.rec"), dir.path().join("1.rec")];
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    // Every key's last handled event across both daemons.
    let reached = |keys: &[String], last: u32| {
        let (a, b) = (recorded(&records[0]), recorded(&records[1]));
        keys.iter().all(|k| {
            [&a, &b]
                .iter()
                .any(|m| m.get(k).is_some_and(|v| v.contains(&last)))
        })
    };

    // Round 1: both daemons handle; each key on one daemon only.
    pika_publish(&venv, &exchange, 0, ROUND).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            reached(&keys, ROUND - 1)
        })
        .await,
        "round 1 not handled"
    );
    let (a, b) = (recorded(&records[0]), recorded(&records[1]));
    for k in &keys {
        assert!(
            a.contains_key(k) != b.contains_key(k),
            "{k} handled by both daemons or neither"
        );
    }
    assert!(!a.is_empty() && !b.is_empty(), "both daemons have keys");
    let keys_of = |m: &HashMap<String, Vec<u32>>| -> Vec<String> {
        let mut v: Vec<String> = m.keys().cloned().collect();
        v.sort();
        v
    };
    let (keys_0, keys_1) = (keys_of(&a), keys_of(&b));

    // kill -9 of daemon 1: daemon 0 goes on, its consumers untouched.
    daemons[1].kill9();
    pika_publish(&venv, &exchange, ROUND, 2 * ROUND).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            reached(&keys_0, 2 * ROUND - 1)
        })
        .await,
        "daemon 0 stopped with daemon 1: {}",
        daemons[0].log()
    );
    let waiting = broker_consumers(&partitions).await;
    for q in &own[1] {
        assert!(waiting[q].is_empty(), "{q} consumed while daemon 1 is down");
    }
    for q in &own[0] {
        assert_eq!(waiting[q], before[q], "{q}: daemon 0's consumer changed");
    }

    // Daemon 1 back: its partitions, its keys, in order.
    daemons[1].restart();
    assert!(
        eventually(Duration::from_secs(30), || daemons[1].ready()).await,
        "{}",
        daemons[1].log()
    );
    assert_eq!(daemon_consumes(&daemons[1]).await, own[1]);
    assert!(
        eventually(Duration::from_secs(60), || async {
            reached(&keys_1, 2 * ROUND - 1)
        })
        .await,
        "daemon 1's keys not handled after its restart: {}",
        daemons[1].log()
    );
    let after = broker_consumers(&partitions).await;
    for q in &own[0] {
        assert_eq!(after[q], before[q], "{q}: daemon 0's consumer changed");
    }
    for q in &own[1] {
        assert_eq!(after[q].len(), 1, "{q}: {after:?}");
    }
    for (record, keys) in records.iter().zip([&keys_0, &keys_1]) {
        let seen = recorded(record);
        assert_eq!(&keys_of(&seen), keys, "no key moved between daemons");
        for (k, h) in &seen {
            in_order_with_repeats(k, h, 2 * ROUND);
        }
    }
}

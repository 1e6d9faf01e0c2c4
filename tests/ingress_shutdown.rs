//! Shutdown order (issue 10, acceptance 7): on SIGTERM the ingress stops
//! accepting first (answering what it holds), then the stages drain, then
//! the publisher window, then the connections. SIGTERM while 20 clients
//! keep POSTing: the daemon reports a clean shutdown, exits 0, and every
//! message it answered 202 is in the broker.

mod ingress_support;

use flowgate_testkit::*;
use ingress_support::*;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENTS: usize = 20;

#[actix_rt::test]
async fn sigterm_under_ingress_load_is_clean_and_keeps_every_accepted_message() {
    let prefix = unique("ing-term");
    let cfg = chain_config(&prefix, &["forward"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let dir = tempfile::tempdir().unwrap();
    let port = flowgate_testkit::node::free_port().expect("port");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            r##"
[amqp]
connection_name = "{prefix}"
[http]
bind = ""
[shutdown]
grace = "10s"
[ingress]
bind = "{addr}"
auth = "none"
routes = [{{ exchange = "{prefix}.ex", routing_key = "in" }}]
[[exchanges]]
name = "{prefix}.ex"
[[queues]]
name = "{prefix}.s1"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "in" }}]
delivery_limit = 20
[[queues]]
name = "{prefix}.sink"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "hop1" }}]
delivery_limit = 20
[[stages]]
name = "s1"
queue = "{prefix}.s1"
handler = "forward"
prefetch = 10
# Slow enough that draining takes a while: long enough for the old order
# (ingress still accepting while the stages drain) to show.
delay = "200ms"
output = {{ exchange = "{prefix}.ex", routing_key = "hop1" }}
"##
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info,lapin=warn")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("daemon starts");
    let pid = child.id();
    let mut daemon = ChildGuard(child);
    let ex = format!("{prefix}.ex");
    assert!(
        eventually(Duration::from_secs(30), || async {
            post(addr, &ex, "in", &[("x-message-id", "warmup")])
                .await
                .status
                == 202
        })
        .await,
        "daemon answers"
    );

    // 20 clients POST until the ingress stops answering.
    let accepted = Arc::new(Mutex::new(HashSet::from(["warmup".to_owned()])));
    // When each request that was answered 202 was sent (Unix seconds).
    let sent_at = Arc::new(Mutex::new(Vec::<f64>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (ex, accepted, sent_at) = (ex.clone(), accepted.clone(), sent_at.clone());
            actix_rt::spawn(async move {
                for i in 0.. {
                    let id = format!("c{c}-{i}");
                    let sent = unix_now();
                    let a = post(addr, &ex, "in", &[("x-message-id", &id)]).await;
                    match a.status {
                        202 => {
                            accepted.lock().unwrap().insert(id);
                            sent_at.lock().unwrap().push(sent);
                        }
                        0 => return, // the listener is gone
                        _ => {}
                    }
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || async {
            accepted.lock().unwrap().len() > 500
        })
        .await,
        "the ingress is under load"
    );
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    for c in clients {
        c.await.unwrap();
    }
    let status = tokio::task::spawn_blocking(move || daemon.0.wait())
        .await
        .unwrap()
        .expect("daemon exits");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit status {status:?}\n{text}");
    let done = text
        .lines()
        .find(|l| l.contains("shutdown complete"))
        .unwrap_or_else(|| panic!("no shutdown report:\n{text}"));
    assert!(done.contains("clean=true"), "{done}\n{text}");
    // The ingress stopped accepting before the stages began to drain: no
    // request sent after that was taken.
    let drain = text
        .lines()
        .find(|l| l.contains("draining stages"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(parse_utc)
        .unwrap_or_else(|| panic!("no drain line:\n{text}"));
    let late = sent_at
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t > drain)
        .count();
    assert_eq!(late, 0, "requests sent after the drain began were accepted");

    // Every 202'd id is in the broker: through the stage, or still in its
    // input (the stage stopped intake at the drain).
    let accepted = accepted.lock().unwrap().clone();
    let client = Client::connect(AMQP_URL).await;
    let mut found: HashSet<String> = HashSet::new();
    for q in ["sink", "s1"] {
        let depth = client.depth(&format!("{prefix}.{q}")).await as usize;
        found.extend(
            client
                .collect_distinct(&format!("{prefix}.{q}"), depth, Duration::from_secs(30))
                .await
                .into_keys(),
        );
    }
    let missing: Vec<_> = accepted.difference(&found).collect();
    println!(
        "{} accepted, {} in the broker, {} missing",
        accepted.len(),
        found.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "202'd but not in the broker: {missing:?}"
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `2026-12-01T22:49:06.296599Z` (the daemon's log timestamps) as Unix seconds.
fn parse_utc(t: &str) -> Option<f64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<f64>().ok()?,
        hms.next()?.parse::<f64>().ok()?,
    );
    let sec = hms.next()?.parse::<f64>().ok()?;
    // Days from 1970-01-01 to y-m-d (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

#[test]
fn log_timestamps_parse() {
    let t = parse_utc("1970-01-02T00:00:01.5Z").unwrap();
    assert!((t - 86_401.5).abs() < 1e-6);
    let now = unix_now();
    assert!(parse_utc("2026-12-01T22:49:06.296599Z").unwrap() > 1.7e9 && now > 1.7e9);
}

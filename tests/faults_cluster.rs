//! Node failover (issue 10, acceptance 4): a three-node cluster on this
//! machine (one Erlang cookie, quorum queues with a replica on every node),
//! flowgate given all three URLs. Stopping the node the engine is connected
//! to at 30% of a 20,000-message run loses nothing: the engine's recovery
//! deadline gives up on that node and connects to the next URL within a
//! bound derived from the config ([`failover_bound`]), and the run finishes
//! on the other two.

use flowgate_testkit as common;

use common::node::BrokerNode;
use common::*;
use flowgate::{Engine, Metrics};
use std::time::{Duration, Instant};

const N: usize = 20_000;
const PREFETCH: u32 = 20;
/// `supervisor.backoff_max`: how long the engine waits for a lost
/// connection to come back before it moves to the next URL.
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// `amqp.connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the engine may take, from noticing the loss of its node to
/// being ready on the next one: its recovery deadline (`backoff_max`), the
/// restart's backoff (at most `backoff_max`), both connections to the next
/// URL (each at most `connect_timeout`), and — generously, for a loaded
/// two-core machine — 10 s for the stages to open their channels and
/// register their consumers on queues whose Raft leader may just be moving.
fn failover_bound() -> Duration {
    BACKOFF_MAX + BACKOFF_MAX + 2 * CONNECT_TIMEOUT + Duration::from_secs(10)
}

// `rabbitmqctl list_queues` figures of a quorum queue whose leader has just
// moved read zero for a while (they are published on a timer): the end of
// the run is read from the queues themselves (`queue.declare-ok`) and the
// engine's in-flight gauges ([`pipeline_idle`]).
#[actix_rt::test]
async fn stopping_the_connected_node_of_a_cluster_loses_nothing() {
    let t0 = Instant::now();
    let nodes = BrokerNode::cluster_async(3).await.expect("3-node cluster");
    let prefix = unique("fcluster");
    let mut cfg = chain_config(&prefix, &["forward", "forward"], PREFETCH);
    cfg.amqp.urls = nodes.iter().map(BrokerNode::amqp_url).collect();
    cfg.amqp.connect_timeout = CONNECT_TIMEOUT;
    cfg.supervisor.backoff_max = BACKOFF_MAX;
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(30)).await);
    // Every queue has a replica on every node.
    let queues: Vec<String> = cfg.queues.iter().map(|q| q.name.clone()).collect();
    let members = nodes[1]
        .blocking(|n| n.ctl_ok(&["-q", "list_queues", "--no-table-headers", "name", "members"]))
        .await
        .expect("list_queues members");
    for q in &queues {
        let line = members
            .lines()
            .find(|l| l.split('\t').next() == Some(q.as_str()))
            .unwrap_or_else(|| panic!("{q} not listed: {members}"));
        for n in &nodes {
            assert!(
                line.contains(n.node_name()),
                "{q} has no replica on {}: {line}",
                n.node_name()
            );
        }
    }
    // The node the engine is connected to: the cluster lists every
    // connection on every node; a connection's pid names its node.
    let name = prefix.clone();
    let ours: Vec<String> = nodes[0]
        .blocking(move |n| n.list_connections())
        .await
        .expect("list_connections")
        .into_iter()
        .filter(|c| {
            c.connection_name
                .as_deref()
                .is_some_and(|c| c.contains(&name))
        })
        .map(|c| c.pid)
        .collect();
    assert_eq!(ours.len(), 2, "the engine's two connections: {ours:?}");
    let on = |pid: &String| {
        nodes
            .iter()
            .position(|n| pid.contains(&format!("<{}.", n.node_name())))
    };
    let connected = on(&ours[0]);
    assert_eq!(
        connected,
        on(&ours[1]),
        "both connections on one node: {ours:?}"
    );
    let victim = connected.expect("the engine is connected to one of the nodes");
    let other = (victim + 1) % nodes.len();
    let observer = nodes[other].clone();
    let client = Client::connect(&observer.amqp_url()).await;
    let ids: Vec<String> = (0..N).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[2u8; 256])
        .await;
    let sink = format!("{prefix}.sink");
    // Over AMQP (a passive declare), not rabbitmqctl: on a loaded machine
    // one rabbitmqctl call can take longer than the rest of the run.
    assert!(
        eventually(Duration::from_secs(180), || async {
            client.depth(&sink).await as usize > N * 3 / 10
        })
        .await,
        "the pipeline moves"
    );
    let at_stop = client.depth(&sink).await;
    assert!(
        (at_stop as usize) < N,
        "the node stops mid-run ({at_stop} of {N} arrived)"
    );
    let restarts_before = handle
        .metrics()
        .counter(Metrics::RESTARTS, &["connection", ""]);
    // Stop the node while watching for the engine to notice (not ready: its
    // connections are down), so that the wait for readiness below cannot
    // return on the readiness from before the stop.
    let stopping = nodes[victim].blocking(|n| n.stop_node());
    let noticed = async {
        let seen = eventually(Duration::from_secs(30), || async { !handle.ready().await }).await;
        (seen, Instant::now())
    };
    let (stopped, (noticed, lost_at)) = tokio::join!(stopping, noticed);
    stopped.expect("stop the connected node");
    assert!(
        noticed,
        "the engine never noticed the loss of its node\n{}",
        handle.metrics().render()
    );
    // The engine is ready again, on another node, within the bound (waited
    // for twice as long, to tell late from never).
    assert!(
        handle.wait_ready(2 * failover_bound()).await,
        "the engine did not reconnect to another node within {:?}\n{}",
        2 * failover_bound(),
        handle.metrics().render()
    );
    let failover = lost_at.elapsed();
    assert!(
        failover <= failover_bound(),
        "ready again {failover:?} after the loss, past the bound {:?} (backoff_max {BACKOFF_MAX:?} \
         twice + 2 x connect_timeout {CONNECT_TIMEOUT:?} + 10 s)",
        failover_bound()
    );
    // Through the engine's own failover: the connection actor restarted
    // (lapin alone retries the one dead URL), and both connections are now
    // on a node that is still running.
    assert!(
        handle
            .metrics()
            .counter(Metrics::RESTARTS, &["connection", ""])
            > restarts_before,
        "the connection actor did not restart\n{}",
        handle.metrics().render()
    );
    let name = prefix.clone();
    let now_on: Vec<Option<usize>> = observer
        .blocking(move |n| n.list_connections())
        .await
        .expect("list_connections")
        .into_iter()
        .filter(|c| {
            c.connection_name
                .as_deref()
                .is_some_and(|c| c.contains(&name))
        })
        .map(|c| on(&c.pid))
        .collect();
    assert!(
        now_on.len() == 2 && now_on.iter().all(|n| n.is_some() && *n != Some(victim)),
        "the engine's two connections, on a running node (not {victim}): {now_on:?}"
    );
    // The run finishes on the other two nodes.
    let m = handle.metrics();
    let duplicates = finish_run(&client, m, &cfg, &sink, &ids, Duration::from_secs(240)).await;
    let windows = cfg.stages.len() * PREFETCH as usize;
    eprintln!(
        "cluster failover: stopped node {victim} at {at_stop} of {N}, ready again \
         {failover:?} after the loss (bound {:?}), {duplicates} duplicates (bound {}), \
         connection restarts {}, wall {:?}",
        failover_bound(),
        2 * windows,
        m.counter(Metrics::RESTARTS, &["connection", ""]),
        t0.elapsed()
    );
    assert!(
        duplicates <= 2 * windows,
        "{duplicates} duplicates exceed twice the in-flight windows ({windows})"
    );
    for actor in [["stage", "s1"], ["stage", "s2"], ["publisher", ""]] {
        assert_eq!(
            m.counter(Metrics::RESTARTS, &actor),
            0,
            "restarts of {actor:?}\n{}",
            m.render()
        );
    }
    handle.shutdown().await;
}

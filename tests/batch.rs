//! Batch handlers (issue 14, item 2): a stage with `batch = { size, timeout }`
//! hands its deliveries to `Handler::handle_batch` in groups, while credits,
//! acks and outcomes stay per delivery.

use flowgate_testkit as common;

use common::*;
use flowgate::config::BatchConfig;
use flowgate::{Delivery, Engine, EngineHandle, Handler, HandlerError, Outcome};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One `handle_batch` call: when it came, and its message ids.
type Batches = Arc<Mutex<Vec<(Instant, Vec<String>)>>>;

/// Forwards every delivery of a batch to `hop1` (dead-lettering the id
/// `fail`, if set, as `bad-item`) and records each batch's message ids.
struct Recording {
    exchange: String,
    fail: Option<String>,
    batches: Batches,
}

#[async_trait::async_trait]
impl Handler for Recording {
    async fn handle(&self, _d: &Delivery) -> Result<Outcome, HandlerError> {
        Ok(Outcome::dead_letter("handled outside a batch"))
    }

    async fn handle_batch(&self, batch: Vec<Delivery>) -> Vec<Result<Outcome, HandlerError>> {
        let ids = batch
            .iter()
            .map(|d| d.message_id().unwrap_or_default().to_owned())
            .collect();
        self.batches.lock().unwrap().push((Instant::now(), ids));
        batch
            .iter()
            .map(|d| match (&self.fail, d.message_id()) {
                (Some(bad), Some(id)) if bad == id => Ok(Outcome::dead_letter("bad-item")),
                _ => Ok(Outcome::ack_with(vec![d.forward(&self.exchange, "hop1")])),
            })
            .collect()
    }
}

/// Starts `s1` (handler `batched`) with this batch setting and prefetch.
async fn start(
    prefix: &str,
    prefetch: u32,
    batch: BatchConfig,
    fail: Option<&str>,
) -> (EngineHandle, Batches, Cleanup) {
    let mut cfg = chain_config(prefix, &["batched"], prefetch);
    cfg.stages[0].batch = Some(batch);
    let cleanup = Cleanup::new(AMQP_URL, &cfg);
    let batches = Arc::new(Mutex::new(Vec::new()));
    let handle = Engine::builder()
        .config(cfg)
        .handler(
            "batched",
            Recording {
                exchange: format!("{prefix}.ex"),
                fail: fail.map(str::to_owned),
                batches: batches.clone(),
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    (handle, batches, cleanup)
}

fn sizes(batches: &Batches) -> Vec<usize> {
    batches
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b.len())
        .collect()
}

#[actix_rt::test]
async fn batches_hold_between_one_and_size_deliveries_and_each_is_delivered_once() {
    let prefix = unique("batch-size");
    // More credits than the batch size: only the batch bound keeps it at 100.
    let batch = BatchConfig {
        size: 100,
        timeout: Duration::from_millis(500),
    };
    let (handle, batches, _cleanup) = start(&prefix, 250, batch, None).await;
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..250).map(|i| format!("b-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"{}")
        .await;
    let got = client
        .collect(
            &format!("{prefix}.sink"),
            ids.len(),
            Duration::from_secs(60),
        )
        .await;
    let counts = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(counts.len(), ids.len(), "missing at the sink");
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
    let sizes = sizes(&batches);
    assert!(
        sizes.iter().all(|&n| (1..=100).contains(&n)),
        "batch sizes {sizes:?}"
    );
    assert_eq!(sizes.iter().sum::<usize>(), ids.len(), "sizes {sizes:?}");
    assert!(
        sizes.iter().any(|&n| n > 1),
        "never more than one delivery per call: {sizes:?}"
    );
    assert_drained(&client, &format!("{prefix}.s1")).await;
    handle.shutdown().await;
}

#[actix_rt::test]
async fn one_failing_message_in_a_batch_is_dead_lettered_and_the_rest_acked() {
    let prefix = unique("batch-fail");
    let batch = BatchConfig {
        size: 10,
        timeout: Duration::from_secs(2),
    };
    let (handle, batches, _cleanup) = start(&prefix, 10, batch, Some("f-3")).await;
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..10).map(|i| format!("f-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"{}")
        .await;
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 1, Duration::from_secs(30))
        .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "f-3");
    assert_eq!(
        header(&dead[0].1, flowgate::envelope::REASON).as_deref(),
        Some("bad-item")
    );
    let got = client
        .collect(&format!("{prefix}.sink"), 9, Duration::from_secs(30))
        .await;
    let mut arrived: Vec<String> = got.into_iter().map(|(id, _)| id).collect();
    arrived.sort();
    let mut want: Vec<String> = ids.iter().filter(|id| *id != "f-3").cloned().collect();
    want.sort();
    assert_eq!(arrived, want);
    let with_bad: Vec<Vec<String>> = batches
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b)
        .filter(|b| b.iter().any(|id| id == "f-3"))
        .cloned()
        .collect();
    assert!(
        with_bad.len() == 1 && with_bad[0].len() > 1,
        "f-3 was not handled in a batch with others: {with_bad:?}"
    );
    assert_drained(&client, &format!("{prefix}.s1")).await;
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);
    handle.shutdown().await;
}

/// Seven deliveries for a batch of 100: they wait the timeout for more,
/// all together, and are then handled as one partial batch — not one by
/// one as they come, and not never.
#[actix_rt::test]
async fn the_timeout_flushes_a_partial_batch() {
    let prefix = unique("batch-flush");
    // Long enough that the seven, published at once, all arrive within it.
    const TIMEOUT: Duration = Duration::from_secs(1);
    let batch = BatchConfig {
        size: 100,
        timeout: TIMEOUT,
    };
    let (handle, batches, _cleanup) = start(&prefix, 100, batch, None).await;
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..7).map(|i| format!("t-{i}")).collect();
    let publishing = Instant::now();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"{}")
        .await;
    let published = Instant::now();
    let got = client
        .collect(
            &format!("{prefix}.sink"),
            ids.len(),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(got.len(), ids.len(), "a partial batch was never handled");
    let recorded = batches.lock().unwrap().clone();
    let mut handled: Vec<String> = recorded.iter().flat_map(|(_, b)| b.clone()).collect();
    handled.sort();
    assert_eq!(
        (recorded.len(), handled),
        (1, ids.clone()),
        "the seven in one batch: {recorded:?}"
    );
    // The batch's deadline, from the config: `timeout` after its first
    // delivery, which came after the publishing began (a generous 5 s on
    // top for the upper bound, for a loaded machine).
    let at = recorded[0].0;
    assert!(
        at >= publishing + TIMEOUT,
        "handled {:?} after the publishing began: it did not wait the {TIMEOUT:?} timeout",
        at - publishing
    );
    assert!(
        at <= published + TIMEOUT + Duration::from_secs(5),
        "handled {:?} after the publishing ended: the {TIMEOUT:?} timeout did not flush it",
        at - published
    );
    handle.shutdown().await;
}

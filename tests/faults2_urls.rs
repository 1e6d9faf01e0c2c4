//! Several broker URLs: the engine connects to the first that answers.

use flowgate_testkit as common;

use common::*;
use flowgate::Engine;
use std::time::Duration;

#[actix_rt::test]
async fn a_dead_first_url_is_skipped_for_the_next_one_that_answers() {
    let prefix = unique("f2urls");
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    // Port 1 refuses connections: nothing listens there.
    cfg.amqp.urls = vec!["amqp://guest:guest@127.0.0.1:1/%2f".into(), AMQP_URL.into()];
    cfg.amqp.connect_timeout = Duration::from_secs(2);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .expect("started on the second URL");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "engine ready");
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..200).map(|i| format!("u-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[1u8; 32])
        .await;
    let got = client
        .collect(
            &format!("{prefix}.sink"),
            ids.len(),
            Duration::from_secs(60),
        )
        .await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), ids.len(), "every id arrived");
    assert!(c.values().all(|n| *n == 1), "once");
    h.shutdown().await;
}

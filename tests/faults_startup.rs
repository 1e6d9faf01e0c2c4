//! A start that fails after connecting closes what it opened.

use flowgate_testkit as common;

use common::node::BrokerNode;
use common::*;
use flowgate::{Engine, Error};
use std::time::Duration;

#[actix_rt::test]
async fn a_failed_start_leaves_no_connection_behind() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("fstart");
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    cfg.amqp.url = node.amqp_url();
    let _cleanup = Cleanup::new(&node.amqp_url(), &cfg);
    // The HTTP server cannot bind: the start fails after the engine connected.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.http.bind = taken.local_addr().unwrap().to_string();
    let res = Engine::builder().config(cfg).build().unwrap().start().await;
    assert!(matches!(res, Err(Error::Http(_))), "{:?}", res.err());
    let engine_connections = || {
        let node = node.clone();
        let name = prefix.clone();
        async move {
            node.blocking(move |n| {
                n.list_connections()
                    .expect("list_connections")
                    .into_iter()
                    .filter(|c| {
                        c.connection_name
                            .as_deref()
                            .is_some_and(|cn| cn.contains(&name))
                    })
                    .count()
            })
            .await
        }
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            engine_connections().await == 0
        })
        .await,
        "{} connections of the failed engine are still open",
        engine_connections().await
    );
}

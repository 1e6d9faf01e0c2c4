//! What a host application builds on: a server of its own beside the
//! engine (`EngineHandle::serve`), stopped by the engine's shutdown, and the
//! `Ingress` it publishes through.

use flowgate_testkit as common;

use common::*;
use flowgate::ingress::{Accepted, IngressError};
use flowgate::{Engine, Output};
use std::time::Duration;

#[actix_rt::test]
async fn a_served_host_route_publishes_through_the_ingress_and_stops_with_the_engine() {
    let prefix = unique("host");
    let cfg = chain_config(&prefix, &["forward"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(
        handle.wait_ready(Duration::from_secs(20)).await,
        "engine ready"
    );

    // The host's own route: publishes its body through the ingress.
    let ingress = handle.ingress().clone();
    let ex = format!("{prefix}.ex");
    let addr = handle
        .serve("127.0.0.1:0", move |cfg| {
            let (ingress, ex) = (ingress.clone(), ex.clone());
            cfg.route(
                "/in/{id}",
                actix_web::web::post().to(
                    move |id: actix_web::web::Path<String>, body: actix_web::web::Bytes| {
                        let (ingress, ex) = (ingress.clone(), ex.clone());
                        async move {
                            let out = Output::new(ex, "in", body).with_message_id(id.into_inner());
                            let accepted = ingress.send(out).await?;
                            assert_eq!(accepted, Accepted::Confirmed);
                            Ok::<_, IngressError>(actix_web::HttpResponse::Accepted().finish())
                        }
                    },
                ),
            );
        })
        .expect("the host server binds");

    let http = awc::Client::default();
    let resp = http
        .post(format!("http://{addr}/in/h-1"))
        .send_body("hello")
        .await
        .expect("the host route answers");
    assert_eq!(resp.status().as_u16(), 202);
    let client = Client::connect(AMQP_URL).await;
    let got = client
        .collect(&format!("{prefix}.sink"), 1, Duration::from_secs(10))
        .await;
    assert_eq!(got.first().map(|(id, _)| id.as_str()), Some("h-1"));

    assert!(handle.shutdown().await.clean);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the host server stopped with the engine"
    );
}

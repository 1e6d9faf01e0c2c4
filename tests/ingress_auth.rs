//! Who may publish (issue 9, acceptance 5): the ingress has its own
//! listener (the metrics port does not publish), requires a bearer token
//! (several accepted, for rotation) unless configured open, publishes only
//! to the routes listed in config, and an unauthenticated request is never
//! signed.

mod ingress_support;

use flowgate::config::{Binding, IngressAuth, IngressConfig, IngressRoute, QueueConfig, QueueKind};
use flowgate::{Engine, EngineHandle};
use flowgate_testkit::*;
use ingress_support::*;
use std::time::Duration;

const SIGNATURE: &str = "x-flowgate-signature";
const TOKEN_NEW: &str = "tok-new-0123456789abcdef";
const TOKEN_OLD: &str = "tok-old-0123456789abcdef";

/// A sink bound to `in` and a queue bound to `other`; the ingress may
/// publish to `in` only; a signing key is set.
fn config(prefix: &str, dir: &std::path::Path, auth: IngressAuth) -> flowgate::Config {
    let mut cfg = chain_config(prefix, &[], 10);
    let ex = format!("{prefix}.ex");
    cfg.queues.push(QueueConfig {
        name: format!("{prefix}.other"),
        kind: QueueKind::Quorum,
        bindings: vec![Binding {
            exchange: ex.clone(),
            routing_key: "other".into(),
        }],
        dead_letter: false,
        dead_letter_kind: None,
        delivery_limit: None,
        watermark: None,
        single_active_consumer: false,
        partitions: None,
        partition_key: None,
    });
    let key = dir.join("hmac.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    cfg.security.hmac_key_file = Some(key);
    cfg.ingress = IngressConfig {
        bind: "127.0.0.1:0".into(),
        auth,
        routes: vec![IngressRoute {
            exchange: ex,
            routing_key: "in".into(),
        }],
        ..IngressConfig::default()
    };
    if auth == IngressAuth::Token {
        let tokens = dir.join("tokens");
        std::fs::write(
            &tokens,
            format!("{TOKEN_NEW}\n# until the clients moved:\n{TOKEN_OLD}\n"),
        )
        .unwrap();
        cfg.ingress.token_file = Some(tokens);
    }
    cfg.http.bind = "127.0.0.1:0".into();
    cfg
}

async fn start(cfg: &flowgate::Config) -> EngineHandle {
    Engine::builder()
        .config(cfg.clone())
        .build()
        .expect("valid config")
        .start()
        .await
        .expect("engine starts")
}

#[actix_rt::test]
async fn a_token_is_required_routes_are_listed_and_authenticated_publishes_are_signed() {
    let prefix = unique("ing-auth");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&prefix, dir.path(), IngressAuth::Token);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = start(&cfg).await;
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");
    let bearer = |t: &str| format!("Bearer {t}");

    let a = post(addr, &ex, "in", &[("x-message-id", "anon")]).await;
    assert_eq!(a.status, 401, "no token: {a:?}");
    assert_eq!(a.header("www-authenticate").as_deref(), Some("Bearer"));
    let a = post(
        addr,
        &ex,
        "in",
        &[("authorization", &bearer("tok-wrong-0123456789abc"))],
    )
    .await;
    assert_eq!(a.status, 401, "wrong token: {a:?}");
    let a = post(addr, &ex, "in", &[("authorization", TOKEN_NEW)]).await;
    assert_eq!(a.status, 401, "not a bearer credential: {a:?}");

    for (id, token) in [("new", TOKEN_NEW), ("old", TOKEN_OLD)] {
        let a = post(
            addr,
            &ex,
            "in",
            &[("authorization", &bearer(token)), ("x-message-id", id)],
        )
        .await;
        assert_eq!(a.status, 202, "{id} token: {a:?}");
    }
    // Bound, but not a listed route: forbidden even with a token.
    let a = post(
        addr,
        &ex,
        "other",
        &[("authorization", &bearer(TOKEN_NEW)), ("x-message-id", "x")],
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    // The metrics listener does not publish.
    let m = h.http_addr().expect("metrics listener");
    let a = post(m, &ex, "in", &[("authorization", &bearer(TOKEN_NEW))]).await;
    assert_eq!(a.status, 404, "no publishing on the scrape port: {a:?}");

    let client = Client::connect(AMQP_URL).await;
    let got = client
        .collect(&format!("{prefix}.sink"), 3, Duration::from_secs(2))
        .await;
    let ids: Vec<_> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["new", "old"], "only the authenticated publishes");
    for (id, headers) in &got {
        assert!(header(headers, SIGNATURE).is_some(), "{id} is signed");
    }
    assert_eq!(client.depth(&format!("{prefix}.other")).await, 0);
    h.shutdown().await;
}

#[actix_rt::test]
async fn an_open_ingress_never_signs() {
    let prefix = unique("ing-open");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&prefix, dir.path(), IngressAuth::None);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = start(&cfg).await;
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");

    let a = post(addr, &ex, "in", &[("x-message-id", "anon")]).await;
    assert_eq!(a.status, 202, "open: {a:?}");
    let a = post(addr, &ex, "other", &[]).await;
    assert_eq!(a.status, 403, "routes still apply: {a:?}");
    // The engine's own publishes are still signed (the key is in use).
    h.publish(flowgate::Output::new(ex.clone(), "in", &b"own"[..]).with_message_id("own"))
        .await
        .expect("engine publish");

    let client = Client::connect(AMQP_URL).await;
    let got = client
        .collect(&format!("{prefix}.sink"), 2, Duration::from_secs(10))
        .await;
    let signed: Vec<_> = got
        .iter()
        .map(|(id, h)| (id.as_str(), header(h, SIGNATURE).is_some()))
        .collect();
    assert_eq!(signed, [("anon", false), ("own", true)]);
    h.shutdown().await;
}

#[test]
fn token_auth_without_tokens_and_routes_to_undeclared_exchanges_are_refused() {
    let base = "[[exchanges]]\nname = \"shop\"\n[[queues]]\nname = \"q\"\n\
                bindings = [{ exchange = \"shop\" }]\n";
    let e = flowgate::Config::from_toml(&format!(
        "{base}[ingress]\nbind = \"127.0.0.1:9465\"\nroutes = [{{ exchange = \"shop\" }}]\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "ingress.auth", "{e}");
    let e = flowgate::Config::from_toml(&format!(
        "{base}[ingress]\nbind = \"127.0.0.1:9465\"\nauth = \"none\"\n\
         routes = [{{ exchange = \"nope\" }}]\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "ingress.routes[0].exchange", "{e}");
    let e = flowgate::Config::from_toml(&format!(
        "{base}[ingress]\nbind = \"127.0.0.1:9465\"\nauth = \"none\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "ingress.routes", "{e}");
}

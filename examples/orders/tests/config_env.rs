//! `[orders]` keys are overridden from the environment like the engine's
//! (`FLOWGATE__ORDERS__*`), read from the same sources. One test in its own
//! binary: it sets process environment variables.

use flowgate_orders::FlowConfig;

#[test]
fn orders_keys_come_from_the_environment_too() {
    std::env::set_var("FLOWGATE__ORDERS__PAYMENT_RATE", "7");
    std::env::set_var("FLOWGATE__ORDERS__GATEWAY_BIND", "");
    std::env::set_var("FLOWGATE__HTTP__BIND", "127.0.0.1:0");
    let cfg = FlowConfig::default_flow().expect("the built-in flow loads");
    assert_eq!(cfg.orders.payment_rate, 7);
    assert_eq!(cfg.orders.gateway_bind, "");
    assert_eq!(cfg.engine.http.bind, "127.0.0.1:0");

    std::env::set_var("FLOWGATE__ORDERS__PAYMENT_FAILURE_RATE", "2.5");
    let e = FlowConfig::default_flow().expect_err("validated after the overrides");
    assert_eq!(e.key, "orders.payment_failure_rate", "{e}");
}

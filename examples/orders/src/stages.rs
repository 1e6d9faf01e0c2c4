//! The four services as stage handlers: `orders.reserve`, `orders.pay`,
//! `orders.ship` and `orders.track` (the status stage).
//!
//! Each is idempotent per order id through the [`Ledger`](super::ledger::Ledger):
//! a redelivered event re-emits the same next event without repeating the
//! effect. Transient trouble (records unavailable, the provider failing
//! every attempt) answers [`Outcome::Retry`]; a permanent one (out of stock,
//! a body that is not an order) [`Outcome::DeadLetter`].

use super::ledger::{ChargeClaim, LedgerError, Reservation};
use super::model::{Order, ORDER_PAID, ORDER_RESERVED, ORDER_SHIPPED};
use super::status::OrderStatus;
use super::OrdersService;
use flowgate::config::Target;
use flowgate::{Delivery, Handler, HandlerError, Outcome, Output};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// The header carrying a dead letter's reason.
pub const REASON_HEADER: &str = flowgate::envelope::REASON;

/// Dead-letter reason of an order whose stock ran out.
pub const OUT_OF_STOCK: &str = "out-of-stock";
/// Dead-letter reason of a body that is not an order.
pub const MALFORMED: &str = "malformed-order";

pub(crate) fn parse(svc: &OrdersService, d: &Delivery) -> Result<Order, Outcome> {
    Order::from_json(&d.body).map_err(|e| {
        svc.stats.count_error("malformed");
        warn!(stage = %d.stage, error = %e, "event body is not an order; dead-lettering");
        Outcome::dead_letter(MALFORMED)
    })
}

/// The next event: the order as JSON, same message id, the input's trace
/// context (the engine makes the published copy a child of this stage's span
/// when tracing is on).
/// It is a new message: none of the input's dead-letter history (a copy
/// back from the retry ladder carries the broker's `x-death`, which would
/// make the status stage take the shipped order for a dead letter).
pub(crate) fn event(target: &Target, d: &Delivery, order: &Order) -> Output {
    let props =
        flowgate::envelope::without(d.properties.clone(), &flowgate::envelope::REPLAY_STRIPPED)
            .with_content_type("application/json".into());
    Output::new(&target.exchange, &target.routing_key, order.to_json())
        .with_properties(props)
        .with_message_id(order.order_id.clone())
}

fn retry(
    svc: &OrdersService,
    stage: &str,
    what: &'static str,
    e: impl std::fmt::Display,
) -> Outcome {
    svc.stats.count_error(what);
    warn!(stage, error = %e, "{what}; asking for a retry");
    Outcome::retry(what)
}

/// `orders.reserve`: takes the order's units from stock, publishes
/// `order.reserved`; out of stock dead-letters with reason `out-of-stock`.
pub struct Reserve {
    svc: Arc<OrdersService>,
    target: Target,
}

impl Reserve {
    /// Publishing to `target` (default `<exchange>`/`order.reserved`).
    pub fn new(svc: Arc<OrdersService>, target: Option<Target>) -> Self {
        let target = target.unwrap_or_else(|| svc.target(ORDER_RESERVED));
        Self { svc, target }
    }
}

#[async_trait::async_trait]
impl Handler for Reserve {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let order = match parse(&self.svc, d) {
            Ok(o) => o,
            Err(out) => return Ok(out),
        };
        match self.svc.ledger.reserve(&order.order_id, &order.items).await {
            Ok(Reservation::Reserved) | Ok(Reservation::AlreadyReserved) => {
                self.svc.status.advance(
                    &order.order_id,
                    OrderStatus::Reserved,
                    order.created_at_ms,
                );
                Ok(Outcome::ack_with(vec![event(&self.target, d, &order)]))
            }
            Ok(Reservation::OutOfStock(sku)) => {
                // The status stage marks it failed from the dead letter's copy.
                self.svc.stats.count_error(OUT_OF_STOCK);
                debug!(order_id = %order.order_id, %sku, "out of stock; dead-lettering");
                Ok(Outcome::dead_letter(OUT_OF_STOCK))
            }
            Err(e) => Ok(retry(&self.svc, &d.stage, "records-unavailable", e)),
        }
    }
}

/// How long a charge claim holds: past it another copy of the order takes
/// the claim over (its holder died mid-call; the provider's idempotency key
/// makes that copy's call return the first charge, so a holder that was
/// merely slow costs a provider call, never a second charge). Each of the
/// `payment_attempts` calls gets its latency plus a quarter second for the
/// rate limit and the records; at least a second. Shorter than the first
/// steps of the pay stage's retry ladder, through which a waiting copy
/// comes back.
pub fn charge_claim_lease(cfg: &crate::OrdersConfig) -> Duration {
    let per_call = cfg.payment_latency + Duration::from_millis(250);
    (per_call * cfg.payment_attempts.max(1)).max(Duration::from_secs(1))
}

/// Retry reason of a copy of an order whose charge another copy is making.
pub const PAYMENT_IN_PROGRESS: &str = "payment-in-progress";
/// Retry reason when the provider failed every attempt.
pub const PAYMENT_UNAVAILABLE: &str = "payment-unavailable";

/// What one pass of the payment step ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Payment {
    /// The order's charge (made now, or found recorded).
    Charged(String),
    /// Another copy holds the claim: come back later.
    InProgress,
    /// The provider failed every attempt; the claim is released.
    Unavailable,
}

/// The payment step of one order: claims the charge (atomically, in the
/// ledger), calls the provider with the order id as idempotency key, records
/// the charge. Two copies of one order never both call the provider while a
/// claim is live; a copy that comes after finds the recorded charge.
pub async fn pay_once(svc: &OrdersService, order_id: &str) -> Result<Payment, LedgerError> {
    let token = uuid::Uuid::new_v4().to_string();
    match svc
        .ledger
        .claim_charge(order_id, &token, charge_claim_lease(&svc.config))
        .await?
    {
        ChargeClaim::Charged(c) => return Ok(Payment::Charged(c)),
        ChargeClaim::Busy => return Ok(Payment::InProgress),
        ChargeClaim::Claimed => {}
    }
    let mut charged = None;
    for _ in 0..svc.config.payment_attempts {
        let (report, res) = svc.payment.charge(order_id, order_id).await;
        if report.throttled {
            svc.stats.count_throttled();
            if let Err(e) = svc.ledger.note_throttled().await {
                debug!(error = %e, "could not count a throttle hit");
            }
        }
        match res {
            Ok(c) => {
                charged = Some(c);
                break;
            }
            Err(e) => {
                svc.stats.count_error(PAYMENT_UNAVAILABLE);
                debug!(%order_id, error = %e, "payment call failed");
            }
        }
    }
    match charged {
        Some(c) => Ok(Payment::Charged(
            svc.ledger.commit_charge(order_id, &c).await?,
        )),
        None => {
            if let Err(e) = svc.ledger.release_charge(order_id, &token).await {
                // The lease frees it in time.
                debug!(error = %e, "could not release a charge claim");
            }
            Ok(Payment::Unavailable)
        }
    }
}

/// `orders.pay`: charges through the simulated provider (rate limit,
/// latency, transient failures) once per order ([`pay_once`]), publishes
/// `order.paid`.
pub struct Pay {
    svc: Arc<OrdersService>,
    target: Target,
}

impl Pay {
    /// Publishing to `target` (default `<exchange>`/`order.paid`).
    pub fn new(svc: Arc<OrdersService>, target: Option<Target>) -> Self {
        let target = target.unwrap_or_else(|| svc.target(ORDER_PAID));
        Self { svc, target }
    }
}

#[async_trait::async_trait]
impl Handler for Pay {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let mut order = match parse(&self.svc, d) {
            Ok(o) => o,
            Err(out) => return Ok(out),
        };
        let charge = match pay_once(&self.svc, &order.order_id).await {
            Ok(Payment::Charged(c)) => c,
            Ok(Payment::InProgress) => {
                // Not dropped: this copy may be the redelivery of a holder
                // that died; it comes back through the retry ladder.
                self.svc.stats.count_error(PAYMENT_IN_PROGRESS);
                debug!(order_id = %order.order_id, "another copy is charging; retrying later");
                return Ok(Outcome::retry(PAYMENT_IN_PROGRESS));
            }
            Ok(Payment::Unavailable) => {
                warn!(order_id = %order.order_id, "payment provider failed every attempt; asking for a retry");
                return Ok(Outcome::retry(PAYMENT_UNAVAILABLE));
            }
            Err(e) => return Ok(retry(&self.svc, &d.stage, "records-unavailable", e)),
        };
        order.charge_id = Some(charge);
        self.svc
            .status
            .advance(&order.order_id, OrderStatus::Paid, order.created_at_ms);
        Ok(Outcome::ack_with(vec![event(&self.target, d, &order)]))
    }
}

/// `orders.ship`: records the shipment (once per order), publishes
/// `order.shipped`.
pub struct Ship {
    svc: Arc<OrdersService>,
    target: Target,
}

impl Ship {
    /// Publishing to `target` (default `<exchange>`/`order.shipped`).
    pub fn new(svc: Arc<OrdersService>, target: Option<Target>) -> Self {
        let target = target.unwrap_or_else(|| svc.target(ORDER_SHIPPED));
        Self { svc, target }
    }
}

#[async_trait::async_trait]
impl Handler for Ship {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let mut order = match parse(&self.svc, d) {
            Ok(o) => o,
            Err(out) => return Ok(out),
        };
        let shipment = uuid::Uuid::new_v4().to_string();
        match self
            .svc
            .ledger
            .commit_shipment(&order.order_id, &shipment)
            .await
        {
            Ok(s) => {
                order.shipment_id = Some(s);
                Ok(Outcome::ack_with(vec![event(&self.target, d, &order)]))
            }
            Err(e) => Ok(retry(&self.svc, &d.stage, "records-unavailable", e)),
        }
    }
}

/// Why a delivery is a dead letter: the engine's `x-flowgate-reason`, or
/// for a message the broker dead-lettered itself (a quorum queue's delivery
/// limit, say) the reason in its first `x-death` entry.
fn failure_reason(d: &Delivery) -> Option<String> {
    if let Some(r) = d.header_str(REASON_HEADER) {
        return Some(r);
    }
    let headers = d.properties.headers().as_ref()?;
    headers.inner().get(flowgate::envelope::X_DEATH)?;
    let reason = flowgate::envelope::newest_death(headers).and_then(|death| death.reason);
    Some(reason.unwrap_or_else(|| "dead-lettered".into()))
}

/// `orders.track`: the status stage. Consumes `order.shipped` events (the
/// order is shipped) and copies of dead letters (carrying
/// `x-flowgate-reason` or the broker's `x-death`: the order failed with
/// that reason), and keeps the
/// status view and the order-to-shipped latencies.
pub struct Track {
    svc: Arc<OrdersService>,
}

impl Track {
    /// Updating `svc`'s status view.
    pub fn new(svc: Arc<OrdersService>) -> Self {
        Self { svc }
    }
}

#[async_trait::async_trait]
impl Handler for Track {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let order = Order::from_json(&d.body).ok();
        let Some(id) = order
            .as_ref()
            .map(|o| o.order_id.clone())
            .or_else(|| d.message_id().map(str::to_owned))
        else {
            self.svc.stats.count_error("untracked");
            warn!(stage = %d.stage, "event without an order id; dropping it from the status view");
            return Ok(Outcome::ack());
        };
        let created = order.as_ref().map(|o| o.created_at_ms).unwrap_or(0);
        if let Some(reason) = failure_reason(d) {
            if self.svc.status.advance(
                &id,
                OrderStatus::Failed {
                    reason: reason.clone(),
                },
                created,
            ) {
                self.svc.stats.count_failed(&reason);
            }
        } else if self.svc.status.advance(&id, OrderStatus::Shipped, created) {
            self.svc.stats.count_shipped(created);
        }
        Ok(Outcome::ack())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payment::ProviderReport;

    fn config() -> crate::OrdersConfig {
        crate::OrdersConfig {
            // Long enough that both calls overlap.
            payment_latency: Duration::from_millis(200),
            payment_failure_rate: 0.0,
            payment_rate: 0,
            ..Default::default()
        }
    }

    /// Two copies of one order paid at once: one claims and calls the
    /// provider, the other finds the claim held; a later copy finds the
    /// charge. The provider is called once.
    async fn concurrent_pays_call_the_provider_once(svc: Arc<OrdersService>) -> ProviderReport {
        let (a, b) = tokio::join!(pay_once(&svc, "o-1"), pay_once(&svc, "o-1"));
        let (a, b) = (a.unwrap(), b.unwrap());
        let charge = match (&a, &b) {
            (Payment::Charged(c), Payment::InProgress)
            | (Payment::InProgress, Payment::Charged(c)) => c.clone(),
            other => panic!("one copy charges, the other waits: {other:?}"),
        };
        assert_eq!(
            pay_once(&svc, "o-1").await.unwrap(),
            Payment::Charged(charge),
            "a later copy finds the charge"
        );
        let books = svc.payment.report().await.unwrap();
        assert_eq!(
            books.calls_of("o-1"),
            1,
            "the provider was called once: {books:?}"
        );
        assert_eq!(books.charges_of("o-1"), 1);
        books
    }

    #[tokio::test]
    async fn memory_ledger_two_concurrent_pays_call_the_provider_once() {
        let svc = OrdersService::new(&config()).unwrap();
        concurrent_pays_call_the_provider_once(svc).await;
    }

    #[tokio::test]
    async fn redis_ledger_two_concurrent_pays_call_the_provider_once() {
        let mut cfg = config();
        cfg.redis_url = Some("redis://127.0.0.1:6379".into());
        cfg.key_prefix = format!("t-pay-{}:", uuid::Uuid::new_v4().simple());
        let svc = OrdersService::new(&cfg).unwrap();
        if let Err(e) = svc.ledger.report().await {
            // Under CI Redis is part of the suite: missing is a failure.
            assert!(
                std::env::var_os("CI").is_none(),
                "Redis at 127.0.0.1:6379 is required under CI: {e}"
            );
            eprintln!("skipped: no Redis at 127.0.0.1:6379 ({e})");
            return;
        }
        concurrent_pays_call_the_provider_once(svc.clone()).await;
        svc.ledger.clear().await.unwrap();
        svc.payment.clear().await.unwrap();
        assert_eq!(
            svc.payment.report().await.unwrap(),
            ProviderReport::default()
        );
    }
}

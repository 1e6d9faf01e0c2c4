//! The four services as stage handlers: `orders.reserve`, `orders.pay`,
//! `orders.ship` and `orders.track` (the status stage).
//!
//! Each is idempotent per order id through the [`Ledger`](super::ledger::Ledger):
//! a redelivered event re-emits the same next event without repeating the
//! effect. Transient trouble (records unavailable, the provider failing
//! every attempt) answers [`Outcome::Retry`]; a permanent one (out of stock,
//! a body that is not an order) [`Outcome::DeadLetter`].

use super::ledger::Reservation;
use super::model::{Order, ORDER_PAID, ORDER_RESERVED, ORDER_SHIPPED};
use super::status::OrderStatus;
use super::OrdersService;
use flowgate::config::Target;
use flowgate::trace;
use flowgate::{Delivery, Handler, HandlerError, Outcome, Output};
use std::sync::Arc;
use tracing::{debug, warn};

/// The header carrying a dead letter's reason.
pub const REASON_HEADER: &str = flowgate::envelope::REASON;

/// Dead-letter reason of an order whose stock ran out.
pub const OUT_OF_STOCK: &str = "out-of-stock";
/// Dead-letter reason of a body that is not an order.
pub const MALFORMED: &str = "malformed-order";

fn parse(svc: &OrdersService, d: &Delivery) -> Result<Order, Outcome> {
    Order::from_json(&d.body).map_err(|e| {
        svc.stats.count_error("malformed");
        warn!(stage = %d.stage, error = %e, "event body is not an order; dead-lettering");
        Outcome::dead_letter(MALFORMED)
    })
}

/// The next event: the order as JSON, same message id, a child traceparent.
fn event(target: &Target, d: &Delivery, order: &Order) -> Output {
    let mut props = d
        .properties
        .clone()
        .with_content_type("application/json".into());
    let tp = trace::traceparent_of(&props)
        .map(|p| trace::child_of(&p))
        .unwrap_or_else(trace::new_traceparent);
    trace::set_traceparent(&mut props, tp);
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

/// `orders.pay`: charges through the simulated provider (rate limit,
/// latency, transient failures) unless this order was charged before,
/// publishes `order.paid`.
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
        let existing = match self.svc.ledger.charge_of(&order.order_id).await {
            Ok(c) => c,
            Err(e) => return Ok(retry(&self.svc, &d.stage, "records-unavailable", e)),
        };
        let charge = match existing {
            Some(c) => c,
            None => {
                let mut charged = None;
                for _ in 0..self.svc.config.payment_attempts {
                    let (report, res) = self.svc.payment.call().await;
                    if report.throttled {
                        self.svc.stats.count_throttled();
                        if let Err(e) = self.svc.ledger.note_throttled().await {
                            debug!(error = %e, "could not count a throttle hit");
                        }
                    }
                    match res {
                        Ok(()) => {
                            charged = Some(uuid::Uuid::new_v4().to_string());
                            break;
                        }
                        Err(e) => {
                            self.svc.stats.count_error("payment-unavailable");
                            debug!(order_id = %order.order_id, error = %e, "payment call failed");
                        }
                    }
                }
                let Some(new_charge) = charged else {
                    warn!(order_id = %order.order_id, "payment provider failed every attempt; asking for a retry");
                    return Ok(Outcome::retry("payment-unavailable"));
                };
                match self
                    .svc
                    .ledger
                    .commit_charge(&order.order_id, &new_charge)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => return Ok(retry(&self.svc, &d.stage, "records-unavailable", e)),
                }
            }
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

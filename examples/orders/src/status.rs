//! The order status view behind `GET /orders/{id}`: in-process, bounded,
//! updated by the gateway, the stages and the `orders.track` stage.
//!
//! Statuses only move forward (`created → reserved → paid → shipped`;
//! `failed` is final), so late or redelivered events never move an order
//! back. The view holds at most `capacity` orders; beyond that the oldest
//! is forgotten (its `GET` answers 404). The bound is `[orders]
//! record_capacity`.

use dashmap::DashMap;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Where an order is.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum OrderStatus {
    /// Accepted by the gateway: `order.created` is confirmed by the broker.
    Created,
    /// Stock reserved.
    Reserved,
    /// Charged.
    Paid,
    /// `order.shipped` published.
    Shipped,
    /// Dead-lettered.
    Failed {
        /// The dead letter's `x-flowgate-reason` (`out-of-stock`, ...).
        reason: String,
    },
}

impl OrderStatus {
    fn rank(&self) -> u8 {
        match self {
            OrderStatus::Created => 0,
            OrderStatus::Reserved => 1,
            OrderStatus::Paid => 2,
            OrderStatus::Shipped => 3,
            OrderStatus::Failed { .. } => 4,
        }
    }

    /// Shipped or failed.
    pub fn is_final(&self) -> bool {
        matches!(self, OrderStatus::Shipped | OrderStatus::Failed { .. })
    }
}

/// One order's entry.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StatusEntry {
    /// The order.
    pub order_id: String,
    /// Current status (flattened: `"status": "failed", "reason": "..."`).
    #[serde(flatten)]
    pub status: OrderStatus,
    /// When the gateway accepted it (ms since the epoch).
    pub created_at_ms: u64,
    /// When its status last changed.
    pub updated_at_ms: u64,
}

/// The bounded status view. Cheap to share behind an `Arc`.
pub struct StatusView {
    entries: DashMap<String, StatusEntry>,
    /// Insertion order, for forgetting the oldest beyond `capacity`.
    order: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl StatusView {
    /// A view holding at most `capacity` orders.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Moves an order to `status` if that is a step forward (or the order
    /// is unknown). Returns true when it changed.
    pub fn advance(&self, order_id: &str, status: OrderStatus, created_at_ms: u64) -> bool {
        let now = super::model::now_ms();
        let mut inserted = false;
        let changed = {
            let mut e = self.entries.entry(order_id.to_owned()).or_insert_with(|| {
                inserted = true;
                StatusEntry {
                    order_id: order_id.to_owned(),
                    status: status.clone(),
                    created_at_ms,
                    updated_at_ms: now,
                }
            });
            if inserted {
                true
            } else if status.rank() > e.status.rank() {
                e.status = status;
                e.updated_at_ms = now;
                true
            } else {
                false
            }
        };
        if inserted {
            self.remember(order_id);
        }
        changed
    }

    fn remember(&self, order_id: &str) {
        // A poisoned lock only means another thread panicked mid-push; the
        // queue is still a valid queue.
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push_back(order_id.to_owned());
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    /// The entry of one order.
    pub fn get(&self, order_id: &str) -> Option<StatusEntry> {
        self.entries.get(order_id).map(|e| e.clone())
    }

    /// Orders held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_only_move_forward() {
        let v = StatusView::new(10);
        assert!(v.advance("a", OrderStatus::Reserved, 1));
        assert!(!v.advance("a", OrderStatus::Created, 1), "no step back");
        assert!(v.advance("a", OrderStatus::Shipped, 1));
        assert!(!v.advance("a", OrderStatus::Paid, 1));
        assert_eq!(v.get("a").unwrap().status, OrderStatus::Shipped);
        assert!(v.advance(
            "b",
            OrderStatus::Failed {
                reason: "out-of-stock".into()
            },
            1
        ));
        assert!(!v.advance("b", OrderStatus::Shipped, 1), "failed is final");
    }

    #[test]
    fn the_view_is_bounded() {
        let v = StatusView::new(3);
        for i in 0..10 {
            v.advance(&format!("o{i}"), OrderStatus::Created, 0);
        }
        assert_eq!(v.len(), 3);
        assert!(v.get("o0").is_none());
        assert!(v.get("o9").is_some());
    }

    #[test]
    fn serialises_flat() {
        let v = StatusView::new(3);
        v.advance(
            "x",
            OrderStatus::Failed {
                reason: "out-of-stock".into(),
            },
            5,
        );
        let j = serde_json::to_value(v.get("x").unwrap()).unwrap();
        assert_eq!(j["status"], "failed");
        assert_eq!(j["reason"], "out-of-stock");
        assert_eq!(j["order_id"], "x");
    }
}

//! The order domain: what `POST /orders` accepts, how it is validated, and
//! the JSON body every order event (`order.created`, `order.reserved`,
//! `order.paid`, `order.shipped`) carries.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// Routing key of the event the gateway publishes.
pub const ORDER_CREATED: &str = "order.created";
/// Routing key the order service publishes after reserving stock.
pub const ORDER_RESERVED: &str = "order.reserved";
/// Routing key the payment service publishes after charging.
pub const ORDER_PAID: &str = "order.paid";
/// Routing key the shipping service publishes after recording the shipment.
pub const ORDER_SHIPPED: &str = "order.shipped";

/// Most items one order may carry (a bound on the work one message causes).
pub const MAX_ITEMS: usize = 100;
/// Most units of one item.
pub const MAX_QTY: u64 = 10_000;

/// One line of an order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// Units, at least 1.
    pub qty: u64,
}

/// An order as it travels through the pipeline: the event body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Order {
    /// Assigned by the gateway; also the AMQP `message_id` of every event.
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// What, at least one line.
    pub items: Vec<Item>,
    /// Amount to charge, greater than zero.
    pub total: f64,
    /// When the gateway accepted it (ms since the Unix epoch): the start of
    /// the order-to-shipped latency.
    pub created_at_ms: u64,
    /// Set by the payment service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    /// Set by the shipping service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment_id: Option<String>,
}

impl Order {
    /// Parses an event body.
    pub fn from_json(body: &[u8]) -> Result<Order, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The event body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings, numbers and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A validated `POST /orders` request.
#[derive(Clone, Debug, PartialEq)]
pub struct NewOrder {
    /// Non-empty.
    pub customer_id: String,
    /// One or more lines with `qty >= 1`.
    pub items: Vec<Item>,
    /// Greater than zero.
    pub total: f64,
}

impl NewOrder {
    /// Turns it into an order with a fresh id.
    pub fn into_order(self) -> Order {
        Order {
            order_id: uuid::Uuid::new_v4().to_string(),
            customer_id: self.customer_id,
            items: self.items,
            total: self.total,
            created_at_ms: now_ms(),
            charge_id: None,
            shipment_id: None,
        }
    }
}

/// One field that failed validation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path (`customer_id`, `items[1].qty`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Validates a parsed JSON request body, collecting every field error.
pub fn validate(v: &Value) -> Result<NewOrder, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = v.as_object() else {
        return Err(vec![err("$", "must be a JSON object")]);
    };
    let customer_id = match obj.get("customer_id") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 256 => Some(s.clone()),
        Some(Value::String(s)) if s.len() > 256 => {
            errors.push(err("customer_id", "must be at most 256 bytes"));
            None
        }
        Some(Value::String(_)) => {
            errors.push(err("customer_id", "must not be empty"));
            None
        }
        Some(_) => {
            errors.push(err("customer_id", "must be a string"));
            None
        }
        None => {
            errors.push(err("customer_id", "is required"));
            None
        }
    };
    let mut items = Vec::new();
    match obj.get("items") {
        Some(Value::Array(a)) if a.is_empty() => {
            errors.push(err("items", "must contain at least one item"))
        }
        Some(Value::Array(a)) if a.len() > MAX_ITEMS => errors.push(err(
            "items",
            format!("must contain at most {MAX_ITEMS} items"),
        )),
        Some(Value::Array(a)) => {
            for (i, it) in a.iter().enumerate() {
                let Some(o) = it.as_object() else {
                    errors.push(err(format!("items[{i}]"), "must be an object"));
                    continue;
                };
                let sku = match o.get("sku") {
                    Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 128 => {
                        Some(s.clone())
                    }
                    Some(Value::String(_)) => {
                        errors.push(err(format!("items[{i}].sku"), "must be 1..=128 bytes"));
                        None
                    }
                    Some(_) => {
                        errors.push(err(format!("items[{i}].sku"), "must be a string"));
                        None
                    }
                    None => {
                        errors.push(err(format!("items[{i}].sku"), "is required"));
                        None
                    }
                };
                let qty = match o.get("qty") {
                    Some(Value::Number(n)) => match n.as_u64() {
                        Some(q) if (1..=MAX_QTY).contains(&q) => Some(q),
                        Some(0) => {
                            errors.push(err(format!("items[{i}].qty"), "must be at least 1"));
                            None
                        }
                        Some(_) => {
                            errors.push(err(
                                format!("items[{i}].qty"),
                                format!("must be at most {MAX_QTY}"),
                            ));
                            None
                        }
                        None if n.as_i64().is_some() => {
                            errors.push(err(format!("items[{i}].qty"), "must be at least 1"));
                            None
                        }
                        None => {
                            errors.push(err(format!("items[{i}].qty"), "must be an integer"));
                            None
                        }
                    },
                    Some(_) => {
                        errors.push(err(format!("items[{i}].qty"), "must be an integer"));
                        None
                    }
                    None => {
                        errors.push(err(format!("items[{i}].qty"), "is required"));
                        None
                    }
                };
                if let (Some(sku), Some(qty)) = (sku, qty) {
                    items.push(Item { sku, qty });
                }
            }
        }
        Some(_) => errors.push(err("items", "must be an array")),
        None => errors.push(err("items", "is required")),
    }
    let total = match obj.get("total") {
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t > 0.0 && t.is_finite() => Some(t),
            _ => {
                errors.push(err("total", "must be greater than 0"));
                None
            }
        },
        Some(_) => {
            errors.push(err("total", "must be a number"));
            None
        }
        None => {
            errors.push(err("total", "is required"));
            None
        }
    };
    match (customer_id, total) {
        (Some(customer_id), Some(total)) if errors.is_empty() => Ok(NewOrder {
            customer_id,
            items,
            total,
        }),
        _ => Err(errors),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Vec<String> {
        validate(&v)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_valid_order_passes() {
        let o = validate(&json!({"customer_id":"c1","items":[{"sku":"a","qty":2}],"total":9.5}))
            .unwrap();
        assert_eq!(
            o.items,
            vec![Item {
                sku: "a".into(),
                qty: 2
            }]
        );
        assert_eq!(o.total, 9.5);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            fields(json!({"customer_id":"","items":[{"sku":"a","qty":1}],"total":1})),
            ["customer_id"]
        );
        assert_eq!(
            fields(json!({"customer_id":"c","items":[],"total":1})),
            ["items"]
        );
        assert_eq!(
            fields(json!({"customer_id":"c","items":[{"sku":"a","qty":0}],"total":1})),
            ["items[0].qty"]
        );
        assert_eq!(
            fields(json!({"customer_id":"c","items":[{"sku":"a","qty":-3}],"total":1})),
            ["items[0].qty"]
        );
        assert_eq!(
            fields(json!({"customer_id":"c","items":[{"sku":"a","qty":1}],"total":0})),
            ["total"]
        );
        assert_eq!(
            fields(json!({"items":[{"qty":1}, 3],"total":"x"})),
            ["customer_id", "items[0].sku", "items[1]", "total"]
        );
        assert_eq!(fields(json!([1, 2])), ["$"]);
    }

    #[test]
    fn events_round_trip() {
        let o = NewOrder {
            customer_id: "c".into(),
            items: vec![Item {
                sku: "s".into(),
                qty: 1,
            }],
            total: 3.0,
        }
        .into_order();
        assert_eq!(Order::from_json(&o.to_json()).unwrap(), o);
        assert!(!String::from_utf8(o.to_json())
            .unwrap()
            .contains("charge_id"));
    }
}

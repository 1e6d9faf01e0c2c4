//! The services' effect records: stock, reservations, charges and shipments
//! by order id, so a redelivered event never reserves or charges twice.
//!
//! Each effect and its record are applied in one atomic step (a mutex in
//! memory, a Lua script in Redis): a redelivery finds the record and only
//! re-emits the event. The same records count how often each effect was
//! applied, which is what the chaos run reports as duplicate effects.
//!
//! * [`MemoryLedger`] — one process; bounded to `capacity` orders per kind
//!   (oldest forgotten first) and `capacity` distinct SKUs (an order for a
//!   new SKU beyond that is out of stock).
//! * [`RedisLedger`] — shared by separate worker processes (and surviving a
//!   SIGKILL); every key expires `ttl` after its last write.

use super::model::Item;
use crate::config::OrdersConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// A record store failed (transient: the handler answers `Outcome::Retry`).
#[derive(Debug, thiserror::Error)]
#[error("effect records unavailable: {0}")]
pub struct LedgerError(pub String);

/// What a reservation attempt did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Stock was taken now.
    Reserved,
    /// This order's stock was taken before (a redelivery).
    AlreadyReserved,
    /// Not enough units of this SKU; nothing was taken.
    OutOfStock(String),
}

/// How often each effect was applied (for the chaos report and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectReport {
    /// Orders whose stock was reserved.
    pub reserved: u64,
    /// Orders whose stock was reserved more than once.
    pub double_reservations: u64,
    /// Orders charged.
    pub charged: u64,
    /// Orders charged more than once.
    pub double_charges: u64,
    /// Shipments recorded.
    pub shipped: u64,
    /// Charges that had to wait for the provider's rate limit.
    pub throttle_hits: u64,
    /// Units left per SKU that was touched.
    pub stock: BTreeMap<String, u64>,
}

/// The record store behind the services.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Takes the order's units from stock unless this order already did.
    async fn reserve(&self, order_id: &str, items: &[Item]) -> Result<Reservation, LedgerError>;
    /// The charge already recorded for this order, if any.
    async fn charge_of(&self, order_id: &str) -> Result<Option<String>, LedgerError>;
    /// Records the charge unless one exists; returns the charge in effect.
    async fn commit_charge(&self, order_id: &str, charge_id: &str) -> Result<String, LedgerError>;
    /// Records the shipment unless one exists; returns the shipment in effect.
    async fn commit_shipment(
        &self,
        order_id: &str,
        shipment_id: &str,
    ) -> Result<String, LedgerError>;
    /// Counts one charge that waited for the provider's rate limit.
    async fn note_throttled(&self) -> Result<(), LedgerError>;
    /// How often each effect was applied.
    async fn report(&self) -> Result<EffectReport, LedgerError>;
    /// Deletes every record (demo and test cleanup).
    async fn clear(&self) -> Result<(), LedgerError>;
}

/// Stock per SKU from the config.
#[derive(Clone, Debug)]
pub struct StockPolicy {
    default: u64,
    per_sku: BTreeMap<String, u64>,
}

impl StockPolicy {
    /// From `[orders] stock_default` and `stock`.
    pub fn from_config(cfg: &OrdersConfig) -> Self {
        Self {
            default: cfg.stock_default,
            per_sku: cfg.stock.clone(),
        }
    }

    /// Units a SKU starts with.
    pub fn initial(&self, sku: &str) -> u64 {
        self.per_sku.get(sku).copied().unwrap_or(self.default)
    }
}

/// Merges lines of the same SKU (sorted by SKU, so both stores check and
/// take stock in the same order).
fn merged(items: &[Item]) -> Vec<(String, u64)> {
    let mut m: BTreeMap<&str, u64> = BTreeMap::new();
    for it in items {
        *m.entry(it.sku.as_str()).or_insert(0) += it.qty;
    }
    m.into_iter().map(|(s, q)| (s.to_owned(), q)).collect()
}

// ---------------------------------------------------------------- memory

#[derive(Default)]
struct MemState {
    stock: HashMap<String, u64>,
    /// order id → times its stock was taken
    reserved: HashMap<String, u32>,
    /// order id → (charge id, times charged)
    charged: HashMap<String, (String, u32)>,
    shipped: HashMap<String, String>,
    /// insertion order per kind, for the capacity bound
    order: [VecDeque<String>; 3],
    throttle_hits: u64,
}

/// In-process records, bounded to `capacity` orders per kind.
pub struct MemoryLedger {
    state: Mutex<MemState>,
    stock: StockPolicy,
    capacity: usize,
}

impl MemoryLedger {
    /// A ledger with this stock policy and bound.
    pub fn new(stock: StockPolicy, capacity: usize) -> Self {
        Self {
            state: Mutex::new(MemState::default()),
            stock,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // Nothing panics while holding the lock; if something did, the maps
        // are still consistent maps.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bound(st: &mut MemState, kind: usize, id: &str, capacity: usize) {
    st.order[kind].push_back(id.to_owned());
    while st.order[kind].len() > capacity {
        if let Some(old) = st.order[kind].pop_front() {
            match kind {
                0 => {
                    st.reserved.remove(&old);
                }
                1 => {
                    st.charged.remove(&old);
                }
                _ => {
                    st.shipped.remove(&old);
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Ledger for MemoryLedger {
    async fn reserve(&self, order_id: &str, items: &[Item]) -> Result<Reservation, LedgerError> {
        let lines = merged(items);
        let mut st = self.lock();
        if st.reserved.contains_key(order_id) {
            return Ok(Reservation::AlreadyReserved);
        }
        let new_skus = lines
            .iter()
            .filter(|(sku, _)| !st.stock.contains_key(sku))
            .count();
        for (sku, qty) in &lines {
            let have = st
                .stock
                .get(sku)
                .copied()
                .unwrap_or_else(|| self.stock.initial(sku));
            if have < *qty {
                return Ok(Reservation::OutOfStock(sku.clone()));
            }
            // SKUs come from clients: the catalogue held in memory is bounded
            // too, and a SKU beyond it cannot be stocked.
            if !st.stock.contains_key(sku) && st.stock.len() + new_skus > self.capacity {
                tracing::warn!(%sku, capacity = self.capacity, "stock table full; refusing a new SKU");
                return Ok(Reservation::OutOfStock(sku.clone()));
            }
        }
        for (sku, qty) in &lines {
            let initial = self.stock.initial(sku);
            let e = st.stock.entry(sku.clone()).or_insert(initial);
            *e -= qty;
        }
        *st.reserved.entry(order_id.to_owned()).or_insert(0) += 1;
        bound(&mut st, 0, order_id, self.capacity);
        Ok(Reservation::Reserved)
    }

    async fn charge_of(&self, order_id: &str) -> Result<Option<String>, LedgerError> {
        Ok(self.lock().charged.get(order_id).map(|(c, _)| c.clone()))
    }

    async fn commit_charge(&self, order_id: &str, charge_id: &str) -> Result<String, LedgerError> {
        let mut st = self.lock();
        if let Some((c, _)) = st.charged.get(order_id) {
            return Ok(c.clone());
        }
        st.charged
            .insert(order_id.to_owned(), (charge_id.to_owned(), 1));
        bound(&mut st, 1, order_id, self.capacity);
        Ok(charge_id.to_owned())
    }

    async fn commit_shipment(
        &self,
        order_id: &str,
        shipment_id: &str,
    ) -> Result<String, LedgerError> {
        let mut st = self.lock();
        if let Some(s) = st.shipped.get(order_id) {
            return Ok(s.clone());
        }
        st.shipped
            .insert(order_id.to_owned(), shipment_id.to_owned());
        bound(&mut st, 2, order_id, self.capacity);
        Ok(shipment_id.to_owned())
    }

    async fn note_throttled(&self) -> Result<(), LedgerError> {
        self.lock().throttle_hits += 1;
        Ok(())
    }

    async fn report(&self) -> Result<EffectReport, LedgerError> {
        let st = self.lock();
        Ok(EffectReport {
            reserved: st.reserved.len() as u64,
            double_reservations: st.reserved.values().filter(|n| **n > 1).count() as u64,
            charged: st.charged.len() as u64,
            double_charges: st.charged.values().filter(|(_, n)| *n > 1).count() as u64,
            shipped: st.shipped.len() as u64,
            throttle_hits: st.throttle_hits,
            stock: st.stock.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })
    }

    async fn clear(&self) -> Result<(), LedgerError> {
        *self.lock() = MemState::default();
        Ok(())
    }
}

// ----------------------------------------------------------------- redis

const RESERVE_LUA: &str = r#"
-- KEYS: reservations, stock, reserve-applied. ARGV: order id, ttl, then (sku, qty, initial)*
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return {1, ''} end
local n = (#ARGV - 2) / 3
for i = 0, n - 1 do
  local sku = ARGV[3 + i * 3]
  local qty = tonumber(ARGV[4 + i * 3])
  local cur = redis.call('HGET', KEYS[2], sku)
  if cur then cur = tonumber(cur) else cur = tonumber(ARGV[5 + i * 3]) end
  if cur < qty then return {2, sku} end
end
for i = 0, n - 1 do
  local sku = ARGV[3 + i * 3]
  redis.call('HSETNX', KEYS[2], sku, ARGV[5 + i * 3])
  redis.call('HINCRBY', KEYS[2], sku, -tonumber(ARGV[4 + i * 3]))
end
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return {0, ''}
"#;

const COMMIT_LUA: &str = r#"
-- KEYS: records, applied counts. ARGV: order id, new id, ttl
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return ARGV[2]
"#;

/// Records in Redis, shared by every worker process of one pipeline.
pub struct RedisLedger {
    con: ConnectionManager,
    prefix: String,
    stock: StockPolicy,
    ttl_secs: u64,
    reserve: redis::Script,
    commit: redis::Script,
}

const KEYS: [&str; 8] = [
    "res",
    "stock",
    "res-applied",
    "chg",
    "chg-applied",
    "ship",
    "ship-applied",
    "throttle",
];

fn rerr(e: redis::RedisError) -> LedgerError {
    LedgerError(e.to_string())
}

impl RedisLedger {
    /// A ledger on `url` under `prefix`; connects lazily (the first command
    /// connects, so construction needs no runtime and cannot hang).
    pub fn new(
        url: &str,
        prefix: &str,
        stock: StockPolicy,
        ttl: Duration,
    ) -> Result<Self, LedgerError> {
        let client =
            redis::Client::open(url).map_err(|e| LedgerError(format!("redis url: {e}")))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let con = ConnectionManager::new_lazy_with_config(client, cfg).map_err(rerr)?;
        Ok(Self {
            con,
            prefix: prefix.to_owned(),
            stock,
            ttl_secs: ttl.as_secs().max(1),
            reserve: redis::Script::new(RESERVE_LUA),
            commit: redis::Script::new(COMMIT_LUA),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    async fn commit(
        &self,
        records: &str,
        applied: &str,
        order_id: &str,
        id: &str,
    ) -> Result<String, LedgerError> {
        let mut con = self.con.clone();
        let mut inv = self.commit.prepare_invoke();
        inv.key(self.key(records))
            .key(self.key(applied))
            .arg(order_id)
            .arg(id)
            .arg(self.ttl_secs);
        inv.invoke_async(&mut con).await.map_err(rerr)
    }

    async fn applied(&self, key: &str) -> Result<(u64, u64), LedgerError> {
        let mut con = self.con.clone();
        let vals: Vec<u64> = redis::cmd("HVALS")
            .arg(self.key(key))
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        Ok((
            vals.len() as u64,
            vals.iter().filter(|n| **n > 1).count() as u64,
        ))
    }
}

#[async_trait::async_trait]
impl Ledger for RedisLedger {
    async fn reserve(&self, order_id: &str, items: &[Item]) -> Result<Reservation, LedgerError> {
        let mut con = self.con.clone();
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.key("res"))
            .key(self.key("stock"))
            .key(self.key("res-applied"))
            .arg(order_id)
            .arg(self.ttl_secs);
        for (sku, qty) in merged(items) {
            let initial = self.stock.initial(&sku);
            inv.arg(sku).arg(qty).arg(initial);
        }
        let (code, sku): (i64, String) = inv.invoke_async(&mut con).await.map_err(rerr)?;
        Ok(match code {
            0 => Reservation::Reserved,
            1 => Reservation::AlreadyReserved,
            _ => Reservation::OutOfStock(sku),
        })
    }

    async fn charge_of(&self, order_id: &str) -> Result<Option<String>, LedgerError> {
        let mut con = self.con.clone();
        redis::cmd("HGET")
            .arg(self.key("chg"))
            .arg(order_id)
            .query_async(&mut con)
            .await
            .map_err(rerr)
    }

    async fn commit_charge(&self, order_id: &str, charge_id: &str) -> Result<String, LedgerError> {
        self.commit("chg", "chg-applied", order_id, charge_id).await
    }

    async fn commit_shipment(
        &self,
        order_id: &str,
        shipment_id: &str,
    ) -> Result<String, LedgerError> {
        self.commit("ship", "ship-applied", order_id, shipment_id)
            .await
    }

    async fn note_throttled(&self) -> Result<(), LedgerError> {
        let mut con = self.con.clone();
        let key = self.key("throttle");
        let _: i64 = redis::cmd("INCR")
            .arg(&key)
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        let _: i64 = redis::cmd("EXPIRE")
            .arg(&key)
            .arg(self.ttl_secs)
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        Ok(())
    }

    async fn report(&self) -> Result<EffectReport, LedgerError> {
        let (reserved, double_reservations) = self.applied("res-applied").await?;
        let (charged, double_charges) = self.applied("chg-applied").await?;
        let (shipped, _) = self.applied("ship-applied").await?;
        let mut con = self.con.clone();
        let throttle_hits: Option<u64> = redis::cmd("GET")
            .arg(self.key("throttle"))
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        let stock: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.key("stock"))
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        Ok(EffectReport {
            reserved,
            double_reservations,
            charged,
            double_charges,
            shipped,
            throttle_hits: throttle_hits.unwrap_or(0),
            stock: stock
                .into_iter()
                .map(|(k, v)| (k, v.max(0) as u64))
                .collect(),
        })
    }

    async fn clear(&self) -> Result<(), LedgerError> {
        let mut del = redis::cmd("DEL");
        for k in KEYS {
            del.arg(self.key(k));
        }
        // The manager reconnects after a broken connection, but only on the
        // next command: try twice.
        let mut last = None;
        for _ in 0..2 {
            let mut con = self.con.clone();
            match del.query_async::<i64>(&mut con).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(rerr(e)),
            }
        }
        Err(last.unwrap_or_else(|| LedgerError("DEL failed".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: &[(&str, u64)]) -> Vec<Item> {
        v.iter()
            .map(|(s, q)| Item {
                sku: (*s).into(),
                qty: *q,
            })
            .collect()
    }

    fn policy() -> StockPolicy {
        let mut cfg = OrdersConfig {
            stock_default: 10,
            ..Default::default()
        };
        cfg.stock.insert("rare".into(), 2);
        StockPolicy::from_config(&cfg)
    }

    async fn conformance(l: &dyn Ledger) {
        assert_eq!(
            l.reserve("o1", &items(&[("a", 3), ("a", 2)]))
                .await
                .unwrap(),
            Reservation::Reserved
        );
        assert_eq!(
            l.reserve("o1", &items(&[("a", 3), ("a", 2)]))
                .await
                .unwrap(),
            Reservation::AlreadyReserved
        );
        assert_eq!(
            l.reserve("o2", &items(&[("a", 1), ("rare", 3)]))
                .await
                .unwrap(),
            Reservation::OutOfStock("rare".into())
        );
        assert_eq!(
            l.reserve("o3", &items(&[("rare", 2)])).await.unwrap(),
            Reservation::Reserved
        );
        assert_eq!(l.charge_of("o1").await.unwrap(), None);
        assert_eq!(l.commit_charge("o1", "c1").await.unwrap(), "c1");
        assert_eq!(l.commit_charge("o1", "c2").await.unwrap(), "c1");
        assert_eq!(l.charge_of("o1").await.unwrap().as_deref(), Some("c1"));
        assert_eq!(l.commit_shipment("o1", "s1").await.unwrap(), "s1");
        assert_eq!(l.commit_shipment("o1", "s2").await.unwrap(), "s1");
        l.note_throttled().await.unwrap();
        let r = l.report().await.unwrap();
        assert_eq!(r.reserved, 2);
        assert_eq!(r.double_reservations, 0);
        assert_eq!(r.charged, 1);
        assert_eq!(r.double_charges, 0);
        assert_eq!(r.shipped, 1);
        assert_eq!(r.throttle_hits, 1);
        assert_eq!(r.stock.get("a"), Some(&5), "o2 took nothing");
        assert_eq!(r.stock.get("rare"), Some(&0));
    }

    #[tokio::test]
    async fn memory_ledger_applies_each_effect_once() {
        conformance(&MemoryLedger::new(policy(), 100)).await;
    }

    #[tokio::test]
    async fn redis_ledger_applies_each_effect_once() {
        let prefix = format!("t-ledger-{}:", uuid::Uuid::new_v4().simple());
        let l = RedisLedger::new(
            "redis://127.0.0.1:6379",
            &prefix,
            policy(),
            Duration::from_secs(60),
        )
        .unwrap();
        conformance(&l).await;
        l.clear().await.unwrap();
        assert_eq!(l.report().await.unwrap(), EffectReport::default());
    }

    #[tokio::test]
    async fn memory_ledger_is_bounded() {
        let l = MemoryLedger::new(policy(), 3);
        for i in 0..10 {
            l.reserve(&format!("o{i}"), &items(&[("a", 1)]))
                .await
                .unwrap();
        }
        assert_eq!(l.report().await.unwrap().reserved, 3);
        for sku in ["b", "c"] {
            assert_eq!(
                l.reserve(&format!("n-{sku}"), &items(&[(sku, 1)]))
                    .await
                    .unwrap(),
                Reservation::Reserved
            );
        }
        assert_eq!(
            l.reserve("n-d", &items(&[("d", 1)])).await.unwrap(),
            Reservation::OutOfStock("d".into()),
            "a fourth SKU does not fit a 3-SKU table"
        );
        assert_eq!(l.report().await.unwrap().stock.len(), 3);
    }
}

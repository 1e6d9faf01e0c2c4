//! The services' effect records: stock, reservations, charges and shipments
//! by order id, so a redelivered event never reserves or charges twice.
//!
//! Each effect and its record are applied in one atomic step (a mutex in
//! memory, a Lua script in Redis): a redelivery finds the record and only
//! re-emits the event. A charge is made outside (by the payment provider),
//! so it is claimed first: one copy of an order holds the claim (a lease)
//! while it calls the provider, the others find it held and come back
//! later to find the charge. Whether any order was charged twice is the
//! provider's books to tell ([`crate::payment::ProviderReport`]), not these.
//!
//! * [`MemoryLedger`] — one process; bounded to `capacity` orders per kind
//!   (oldest forgotten first) and `capacity` distinct SKUs (an order for a
//!   new SKU beyond that is out of stock).
//! * [`RedisLedger`] — shared by separate worker processes (and surviving a
//!   SIGKILL); every key expires `ttl` after its last write.

use super::model::Item;
use crate::config::OrdersConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// What a charge claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeClaim {
    /// The order's charge is recorded: this one.
    Charged(String),
    /// The claim is the caller's until its lease runs out: call the
    /// provider, then [`Ledger::commit_charge`] or [`Ledger::release_charge`].
    Claimed,
    /// Another caller holds a live claim on this order.
    Busy,
}

/// The records' counts (for the chaos report and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectReport {
    /// Orders whose stock was reserved.
    pub reserved: u64,
    /// Orders with a charge recorded.
    pub charged: u64,
    /// Shipments recorded.
    pub shipped: u64,
    /// Charges that had to wait for the provider's rate limit.
    pub throttle_hits: u64,
    /// Charge claims taken over from a holder whose lease ran out (it died
    /// or stalled mid-call): the only way a copy of an order calls the
    /// provider after another copy's call was answered.
    pub claim_takeovers: u64,
    /// Units left per SKU that was touched.
    pub stock: BTreeMap<String, u64>,
}

/// The record store behind the services.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Takes the order's units from stock unless this order already did.
    async fn reserve(&self, order_id: &str, items: &[Item]) -> Result<Reservation, LedgerError>;
    /// Units of `sku` in stock now.
    async fn stock_of(&self, sku: &str) -> Result<u64, LedgerError>;
    /// The charge already recorded for this order, if any.
    async fn charge_of(&self, order_id: &str) -> Result<Option<String>, LedgerError>;
    /// In one atomic step: the recorded charge if there is one, else the
    /// claim for `token` if nobody else holds a live one (a claim whose
    /// lease ran out — its holder died — is taken over).
    async fn claim_charge(
        &self,
        order_id: &str,
        token: &str,
        lease: Duration,
    ) -> Result<ChargeClaim, LedgerError>;
    /// Gives up `token`'s claim (the provider failed); no-op if not held.
    async fn release_charge(&self, order_id: &str, token: &str) -> Result<(), LedgerError>;
    /// Records the charge unless one exists (and drops the order's claim);
    /// returns the charge in effect.
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
    reserved: HashSet<String>,
    /// order id → charge id
    charged: HashMap<String, String>,
    /// order id → (claim holder, lease end); removed on commit or release
    claims: HashMap<String, (String, Instant)>,
    shipped: HashMap<String, String>,
    /// insertion order per kind, for the capacity bound
    order: [VecDeque<String>; 3],
    throttle_hits: u64,
    claim_takeovers: u64,
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
        if st.reserved.contains(order_id) {
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
        st.reserved.insert(order_id.to_owned());
        bound(&mut st, 0, order_id, self.capacity);
        Ok(Reservation::Reserved)
    }

    async fn stock_of(&self, sku: &str) -> Result<u64, LedgerError> {
        Ok(self
            .lock()
            .stock
            .get(sku)
            .copied()
            .unwrap_or_else(|| self.stock.initial(sku)))
    }

    async fn charge_of(&self, order_id: &str) -> Result<Option<String>, LedgerError> {
        Ok(self.lock().charged.get(order_id).cloned())
    }

    async fn claim_charge(
        &self,
        order_id: &str,
        token: &str,
        lease: Duration,
    ) -> Result<ChargeClaim, LedgerError> {
        let mut st = self.lock();
        if let Some(c) = st.charged.get(order_id) {
            return Ok(ChargeClaim::Charged(c.clone()));
        }
        let now = Instant::now();
        if let Some((holder, until)) = st.claims.get(order_id) {
            if holder != token {
                if *until > now {
                    return Ok(ChargeClaim::Busy);
                }
                st.claim_takeovers += 1;
            }
        }
        if st.claims.len() >= self.capacity {
            // Claims of handlers that never came back (cancelled mid-call).
            st.claims.retain(|_, (_, until)| *until > now);
        }
        st.claims
            .insert(order_id.to_owned(), (token.to_owned(), now + lease));
        Ok(ChargeClaim::Claimed)
    }

    async fn release_charge(&self, order_id: &str, token: &str) -> Result<(), LedgerError> {
        let mut st = self.lock();
        if st.claims.get(order_id).is_some_and(|(h, _)| h == token) {
            st.claims.remove(order_id);
        }
        Ok(())
    }

    async fn commit_charge(&self, order_id: &str, charge_id: &str) -> Result<String, LedgerError> {
        let mut st = self.lock();
        st.claims.remove(order_id);
        if let Some(c) = st.charged.get(order_id) {
            return Ok(c.clone());
        }
        st.charged.insert(order_id.to_owned(), charge_id.to_owned());
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
            charged: st.charged.len() as u64,
            shipped: st.shipped.len() as u64,
            throttle_hits: st.throttle_hits,
            claim_takeovers: st.claim_takeovers,
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
-- KEYS: reservations, stock. ARGV: order id, ttl, then (sku, qty, initial)*
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
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return {0, ''}
"#;

const COMMIT_LUA: &str = r#"
-- KEYS: records[, claims]. ARGV: order id, new id, ttl
if #KEYS > 1 then redis.call('HDEL', KEYS[2], ARGV[1]) end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return ARGV[2]
"#;

// A claim is "<lease end, ms of the server's clock>:<holder>" in the claims
// hash; the server's clock, so workers' clocks never disagree.
const CLAIM_LUA: &str = r#"
-- KEYS: charges, claims, takeovers. ARGV: order id, holder, lease ms, ttl
local c = redis.call('HGET', KEYS[1], ARGV[1])
if c then return {1, c} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  local till = tonumber(string.sub(cur, 1, sep - 1))
  if string.sub(cur, sep + 1) ~= ARGV[2] then
    if till > now then return {2, ''} end
    redis.call('INCR', KEYS[3])
    redis.call('EXPIRE', KEYS[3], ARGV[4])
  end
end
redis.call('HSET', KEYS[2], ARGV[1], (now + tonumber(ARGV[3])) .. ':' .. ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {0, ''}
"#;

const RELEASE_LUA: &str = r#"
-- KEYS: claims. ARGV: order id, holder
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  if string.sub(cur, sep + 1) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
end
return 0
"#;

/// Records in Redis, shared by every worker process of one pipeline.
pub struct RedisLedger {
    con: ConnectionManager,
    prefix: String,
    stock: StockPolicy,
    ttl_secs: u64,
    reserve: redis::Script,
    commit: redis::Script,
    claim: redis::Script,
    release: redis::Script,
}

const KEYS: [&str; 7] = [
    "res",
    "stock",
    "chg",
    "chg-claim",
    "ship",
    "throttle",
    "chg-takeover",
];

fn rerr(e: redis::RedisError) -> LedgerError {
    LedgerError(e.to_string())
}

/// A Redis connection on `url` that connects lazily (the first command
/// connects, so construction needs no runtime and cannot hang) and gives
/// up on a command after a few seconds.
pub(crate) fn redis_manager(url: &str) -> Result<ConnectionManager, LedgerError> {
    let client = redis::Client::open(url).map_err(|e| LedgerError(format!("redis url: {e}")))?;
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, cfg).map_err(rerr)
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
        Ok(Self {
            con: redis_manager(url)?,
            prefix: prefix.to_owned(),
            stock,
            ttl_secs: ttl.as_secs().max(1),
            reserve: redis::Script::new(RESERVE_LUA),
            commit: redis::Script::new(COMMIT_LUA),
            claim: redis::Script::new(CLAIM_LUA),
            release: redis::Script::new(RELEASE_LUA),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    async fn commit(
        &self,
        records: &str,
        claims: Option<&str>,
        order_id: &str,
        id: &str,
    ) -> Result<String, LedgerError> {
        let mut con = self.con.clone();
        let mut inv = self.commit.prepare_invoke();
        inv.key(self.key(records));
        if let Some(c) = claims {
            inv.key(self.key(c));
        }
        inv.arg(order_id).arg(id).arg(self.ttl_secs);
        inv.invoke_async(&mut con).await.map_err(rerr)
    }

    async fn records(&self, key: &str) -> Result<u64, LedgerError> {
        let mut con = self.con.clone();
        redis::cmd("HLEN")
            .arg(self.key(key))
            .query_async(&mut con)
            .await
            .map_err(rerr)
    }
}

#[async_trait::async_trait]
impl Ledger for RedisLedger {
    async fn reserve(&self, order_id: &str, items: &[Item]) -> Result<Reservation, LedgerError> {
        let mut con = self.con.clone();
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.key("res"))
            .key(self.key("stock"))
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

    async fn stock_of(&self, sku: &str) -> Result<u64, LedgerError> {
        let mut con = self.con.clone();
        let n: Option<i64> = redis::cmd("HGET")
            .arg(self.key("stock"))
            .arg(sku)
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        Ok(n.map(|n| n.max(0) as u64)
            .unwrap_or_else(|| self.stock.initial(sku)))
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

    async fn claim_charge(
        &self,
        order_id: &str,
        token: &str,
        lease: Duration,
    ) -> Result<ChargeClaim, LedgerError> {
        let mut con = self.con.clone();
        let mut inv = self.claim.prepare_invoke();
        inv.key(self.key("chg"))
            .key(self.key("chg-claim"))
            .key(self.key("chg-takeover"))
            .arg(order_id)
            .arg(token)
            .arg(lease.as_millis().max(1) as u64)
            .arg(self.ttl_secs);
        let (code, charge): (i64, String) = inv.invoke_async(&mut con).await.map_err(rerr)?;
        Ok(match code {
            0 => ChargeClaim::Claimed,
            1 => ChargeClaim::Charged(charge),
            _ => ChargeClaim::Busy,
        })
    }

    async fn release_charge(&self, order_id: &str, token: &str) -> Result<(), LedgerError> {
        let mut con = self.con.clone();
        let mut inv = self.release.prepare_invoke();
        inv.key(self.key("chg-claim")).arg(order_id).arg(token);
        inv.invoke_async::<i64>(&mut con).await.map_err(rerr)?;
        Ok(())
    }

    async fn commit_charge(&self, order_id: &str, charge_id: &str) -> Result<String, LedgerError> {
        self.commit("chg", Some("chg-claim"), order_id, charge_id)
            .await
    }

    async fn commit_shipment(
        &self,
        order_id: &str,
        shipment_id: &str,
    ) -> Result<String, LedgerError> {
        self.commit("ship", None, order_id, shipment_id).await
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
        let reserved = self.records("res").await?;
        let charged = self.records("chg").await?;
        let shipped = self.records("ship").await?;
        let mut con = self.con.clone();
        let throttle_hits: Option<u64> = redis::cmd("GET")
            .arg(self.key("throttle"))
            .query_async(&mut con)
            .await
            .map_err(rerr)?;
        let claim_takeovers: Option<u64> = redis::cmd("GET")
            .arg(self.key("chg-takeover"))
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
            charged,
            shipped,
            throttle_hits: throttle_hits.unwrap_or(0),
            claim_takeovers: claim_takeovers.unwrap_or(0),
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
        let lease = Duration::from_secs(30);
        assert_eq!(
            l.claim_charge("o1", "t1", lease).await.unwrap(),
            ChargeClaim::Claimed
        );
        assert_eq!(
            l.claim_charge("o1", "t2", lease).await.unwrap(),
            ChargeClaim::Busy,
            "a live claim is not shared"
        );
        l.release_charge("o1", "t2").await.unwrap();
        assert_eq!(
            l.claim_charge("o1", "t2", lease).await.unwrap(),
            ChargeClaim::Busy,
            "only its holder releases a claim"
        );
        l.release_charge("o1", "t1").await.unwrap();
        assert_eq!(
            l.claim_charge("o1", "t2", Duration::from_millis(1))
                .await
                .unwrap(),
            ChargeClaim::Claimed,
            "a released claim is free"
        );
        // t2's lease runs out (its holder died): t3 takes it over.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            l.claim_charge("o1", "t3", lease).await.unwrap(),
            ChargeClaim::Claimed
        );
        assert_eq!(l.commit_charge("o1", "c1").await.unwrap(), "c1");
        assert_eq!(
            l.claim_charge("o1", "t4", lease).await.unwrap(),
            ChargeClaim::Charged("c1".into())
        );
        assert_eq!(l.commit_charge("o1", "c2").await.unwrap(), "c1");
        assert_eq!(l.charge_of("o1").await.unwrap().as_deref(), Some("c1"));
        assert_eq!(l.commit_shipment("o1", "s1").await.unwrap(), "s1");
        assert_eq!(l.commit_shipment("o1", "s2").await.unwrap(), "s1");
        l.note_throttled().await.unwrap();
        let r = l.report().await.unwrap();
        assert_eq!(r.reserved, 2);
        assert_eq!(r.charged, 1);
        assert_eq!(r.shipped, 1);
        assert_eq!(r.throttle_hits, 1);
        assert_eq!(r.claim_takeovers, 1, "t3 took t2's lapsed claim over");
        assert_eq!(r.stock.get("a"), Some(&5), "o2 took nothing");
        assert_eq!(r.stock.get("rare"), Some(&0));
        assert_eq!(l.stock_of("a").await.unwrap(), 5);
        assert_eq!(l.stock_of("rare").await.unwrap(), 0);
        assert_eq!(l.stock_of("untouched").await.unwrap(), 10);
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

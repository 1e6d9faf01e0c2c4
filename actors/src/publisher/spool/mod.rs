//! Durable, crash-safe, bounded FIFO spool of outgoing AMQP publishes.
//!
//! When the broker is unreachable (or the circuit breaker is open) the
//! publisher parks outgoing messages here instead of dropping them, and
//! drains the spool once the broker is back. The spool is a single
//! [redb](https://docs.rs/redb) file:
//!
//! * table `records`: `u64` sequence number → the record in flowgate's own
//!   versioned format (see [`format`]: a magic prefix, a format version,
//!   then the version's struct). Keys are strictly increasing, so key order
//!   is FIFO order.
//! * table `quarantine`: `u64` sequence number → a stored value that did not
//!   decode (corruption, or a format this build does not read), moved there
//!   verbatim by [`Spool::peek_batch`] so the records behind it still
//!   replay. Each move is logged once and counted in the counter given to
//!   [`Spool::count_quarantined_in`] (`flowgate_spool_quarantined_total`).
//!   Quarantined values are kept for an operator; they do not count against
//!   `max_bytes`.
//! * table `meta`: `"next_seq"` → the next sequence number to hand out, so
//!   sequence numbers never go backwards across restarts, even when the spool
//!   was fully drained before the restart.
//!
//! Every mutating call commits with redb's default
//! [`Durability::Immediate`](redb::Durability::Immediate): when
//! [`Spool::append`] or [`Spool::remove`] returns `Ok`, the change survives a
//! `kill -9` or a power loss. On [`Spool::open`] the record count and byte
//! total are recomputed from what is actually stored.
//!
//! # Blocking
//!
//! redb is synchronous and every commit performs an `fsync`. The plain
//! methods ([`Spool::open`], [`Spool::append`], [`Spool::peek_batch`],
//! [`Spool::remove`]) therefore **block the calling thread**; from async code
//! call them inside [`tokio::task::spawn_blocking`], or use the
//! `*_async` wrappers ([`Spool::open_async`], [`Spool::append_async`],
//! [`Spool::peek_batch_async`], [`Spool::remove_async`]) which do exactly
//! that. [`Spool::len`],
//! [`Spool::bytes`] and [`Spool::is_empty`] only read atomics and are safe to
//! call anywhere.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::metrics::events::{Event, SpoolQuarantined};
use crate::metrics::Metrics;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

pub(crate) mod format;

/// Table holding the spooled records, keyed by sequence number.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Table holding stored values that did not decode, keyed by their
/// sequence number in [`RECORDS`].
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
/// Table holding spool bookkeeping (currently only [`NEXT_SEQ_KEY`]).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Key in [`META`] under which the next sequence number is persisted.
const NEXT_SEQ_KEY: &str = "next_seq";
/// First sequence number handed out by a brand-new spool.
const FIRST_SEQ: u64 = 1;

/// One outgoing publish, exactly as it will be handed to
/// `lapin::Channel::basic_publish` when the spool is drained.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpoolRecord {
    /// Exchange to publish to; kept so the drain does not need to know the
    /// pipeline's routing configuration.
    pub exchange: String,
    /// Routing key to publish with; part of the original publish request.
    pub routing_key: String,
    /// Message payload, stored verbatim.
    pub body: Vec<u8>,
    /// AMQP properties (headers, message id, delivery mode, ...) so the
    /// re-published message is indistinguishable from the original.
    pub properties: lapin::BasicProperties,
}

impl SpoolRecord {
    /// Encodes the record in the current [`format`] version; this is the
    /// exact byte string stored in redb and counted against `max_bytes`.
    pub fn encode(&self) -> Result<Vec<u8>, SpoolError> {
        format::encode(self)
    }

    /// Decodes a stored record of any [`format`] version this build reads.
    /// Trailing bytes are rejected so a truncated or concatenated value is
    /// not silently accepted.
    pub fn decode(bytes: &[u8]) -> Result<SpoolRecord, SpoolError> {
        format::decode(bytes)
    }
}

pub use crate::error::SpoolError;

/// Shared state behind the [`Spool`] handle.
struct Inner {
    /// The open redb database (holds the file lock).
    db: Database,
    /// File the database lives in; kept for diagnostics.
    path: PathBuf,
    /// Upper bound on the sum of encoded record sizes.
    max_bytes: u64,
    /// Number of records stored; mirrors the `records` table.
    len: AtomicU64,
    /// Sum of encoded record sizes stored; mirrors the `records` table.
    bytes: AtomicU64,
    /// Serialises mutations and holds the next sequence number. Held across
    /// the whole write transaction so the bound check, the commit and the
    /// atomics update are one atomic step with respect to other writers.
    writer: Mutex<u64>,
    /// Counts records moved to [`QUARANTINE`]; see
    /// [`Spool::count_quarantined_in`].
    quarantined: OnceLock<Metrics>,
}

/// A durable, bounded FIFO spool of outgoing publishes backed by one redb
/// file. Cheap to clone (an `Arc` inside); all clones share the same
/// database. See the module docs for the blocking caveat.
#[derive(Clone)]
pub struct Spool {
    /// Shared state; the database is closed when the last clone drops.
    inner: Arc<Inner>,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.inner.path)
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
    }
}

impl Spool {
    /// Opens (or creates) the spool file at `path`, bounded to `max_bytes`
    /// of encoded records.
    ///
    /// Count and byte total are recomputed by scanning the stored records,
    /// so records left over from a crash are visible immediately. If the
    /// previous process died mid-commit, redb repairs the file here, which
    /// can take a while on a large spool. Blocking; see the module docs.
    ///
    /// Only one `Spool` may have a given file open at a time (redb holds a
    /// lock); clone the handle instead of opening twice.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let db = Database::create(path).map_err(SpoolError::storage)?;
        let (len, bytes, next_seq) = {
            let txn = db.begin_write().map_err(SpoolError::storage)?;
            let scanned = {
                let records = txn.open_table(RECORDS).map_err(SpoolError::storage)?;
                let meta = txn.open_table(META).map_err(SpoolError::storage)?;
                txn.open_table(QUARANTINE).map_err(SpoolError::storage)?;
                let mut len = 0u64;
                let mut bytes = 0u64;
                let mut last = None;
                for entry in records.iter().map_err(SpoolError::storage)? {
                    let (k, v) = entry.map_err(SpoolError::storage)?;
                    len += 1;
                    bytes += v.value().len() as u64;
                    last = Some(k.value());
                }
                let persisted = meta
                    .get(NEXT_SEQ_KEY)
                    .map_err(SpoolError::storage)?
                    .map(|g| g.value())
                    .unwrap_or(FIRST_SEQ);
                let after_last = last.map_or(FIRST_SEQ, |k| k.saturating_add(1));
                (len, bytes, persisted.max(after_last).max(FIRST_SEQ))
            };
            // Committing creates the tables on a fresh file so later read
            // transactions never see "table does not exist".
            txn.commit().map_err(SpoolError::storage)?;
            scanned
        };
        tracing::debug!(path = %path.display(), len, bytes, next_seq, "spool opened");
        Ok(Spool {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                max_bytes,
                len: AtomicU64::new(len),
                bytes: AtomicU64::new(bytes),
                writer: Mutex::new(next_seq),
                quarantined: OnceLock::new(),
            }),
        })
    }

    /// [`Spool::open`] on a `spawn_blocking` thread (the scan of a large
    /// spool, or redb's repair after a crash, must not stall an actor).
    pub async fn open_async(path: PathBuf, max_bytes: u64) -> Result<Spool, SpoolError> {
        run_blocking(move || Spool::open(&path, max_bytes)).await
    }

    /// Every later move of an undecodable record to the quarantine table
    /// is reported to `metrics` (one `SpoolQuarantined` event per record). Only
    /// the first call has effect.
    pub fn count_quarantined_in(&self, metrics: Metrics) {
        let _ = self.inner.quarantined.set(metrics);
    }

    /// Number of values in the quarantine table. Blocking; see the module
    /// docs.
    pub fn quarantined(&self) -> Result<u64, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(SpoolError::storage)?;
        let q = txn.open_table(QUARANTINE).map_err(SpoolError::storage)?;
        q.len().map_err(SpoolError::storage)
    }

    /// Moves the undecodable values `bad` (sequence number, why) from
    /// [`RECORDS`] to [`QUARANTINE`] in one transaction; logs and counts
    /// each one once.
    fn quarantine(&self, bad: &[(u64, SpoolError)]) -> Result<(), SpoolError> {
        let _writer = self.lock_writer();
        let txn = self.inner.db.begin_write().map_err(SpoolError::storage)?;
        let mut moved = Vec::with_capacity(bad.len());
        {
            let mut records = txn.open_table(RECORDS).map_err(SpoolError::storage)?;
            let mut q = txn.open_table(QUARANTINE).map_err(SpoolError::storage)?;
            for (seq, why) in bad {
                let Some(old) = records.remove(*seq).map_err(SpoolError::storage)? else {
                    continue;
                };
                let value = old.value().to_vec();
                drop(old);
                q.insert(*seq, value.as_slice())
                    .map_err(SpoolError::storage)?;
                moved.push((*seq, value.len() as u64, why));
            }
        }
        txn.commit().map_err(SpoolError::storage)?;
        for (seq, size, why) in moved {
            self.inner.bytes.fetch_sub(size, Ordering::AcqRel);
            self.inner.len.fetch_sub(1, Ordering::AcqRel);
            let event = SpoolQuarantined {
                seq,
                bytes: size,
                error: &why,
                path: &self.inner.path,
            };
            match self.inner.quarantined.get() {
                Some(m) => event.emit(m),
                // A spool nobody counts for (a standalone one): the line is
                // still logged, on a throwaway registry.
                None => event.emit(&Metrics::new()),
            }
        }
        Ok(())
    }

    /// Locks the writer mutex. A panic in another writer cannot leave the
    /// guarded sequence number inconsistent (it is only advanced after a
    /// successful commit), so a poisoned lock is simply recovered.
    fn lock_writer(&self) -> MutexGuard<'_, u64> {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Durably appends `rec` and returns its sequence number.
    ///
    /// Returns [`SpoolError::Full`] without writing anything if the stored
    /// bytes plus this record's encoded size would exceed `max_bytes` (this
    /// includes a single record larger than `max_bytes`, which can never
    /// fit). When this returns `Ok` the record has been committed with
    /// `fsync`. Blocking; see the module docs.
    pub fn append(&self, rec: &SpoolRecord) -> Result<u64, SpoolError> {
        let encoded = rec.encode()?;
        let size = encoded.len() as u64;
        let mut next_seq = self.lock_writer();
        let current = self.inner.bytes.load(Ordering::Acquire);
        if current.saturating_add(size) > self.inner.max_bytes {
            return Err(SpoolError::Full {
                bytes: current,
                max_bytes: self.inner.max_bytes,
            });
        }
        let seq = *next_seq;
        let txn = self.inner.db.begin_write().map_err(SpoolError::storage)?;
        {
            let mut records = txn.open_table(RECORDS).map_err(SpoolError::storage)?;
            records
                .insert(seq, encoded.as_slice())
                .map_err(SpoolError::storage)?;
            let mut meta = txn.open_table(META).map_err(SpoolError::storage)?;
            meta.insert(NEXT_SEQ_KEY, seq.saturating_add(1))
                .map_err(SpoolError::storage)?;
        }
        txn.commit().map_err(SpoolError::storage)?;
        *next_seq = seq.saturating_add(1);
        self.inner.bytes.fetch_add(size, Ordering::AcqRel);
        self.inner.len.fetch_add(1, Ordering::AcqRel);
        Ok(seq)
    }

    /// Returns up to `max` of the oldest records, oldest first, without
    /// removing them. Call [`Spool::remove`] for each one once the broker
    /// has confirmed it. Blocking; see the module docs.
    ///
    /// A stored value that does not decode is moved to the quarantine
    /// table (see the module docs) and skipped, so one bad record never
    /// stops the ones behind it; the batch is empty only when the spool is.
    pub fn peek_batch(&self, max: usize) -> Result<Vec<(u64, SpoolRecord)>, SpoolError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        loop {
            let mut out = Vec::with_capacity(max.min(1024));
            let mut bad = Vec::new();
            {
                let txn = self.inner.db.begin_read().map_err(SpoolError::storage)?;
                let records = txn.open_table(RECORDS).map_err(SpoolError::storage)?;
                for entry in records.iter().map_err(SpoolError::storage)?.take(max) {
                    let (k, v) = entry.map_err(SpoolError::storage)?;
                    let seq = k.value();
                    match SpoolRecord::decode(v.value()) {
                        Ok(rec) => out.push((seq, rec)),
                        Err(e) => bad.push((seq, e)),
                    }
                }
            }
            if bad.is_empty() {
                return Ok(out);
            }
            self.quarantine(&bad)?;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Durably deletes record `seq` (after the broker confirmed it).
    /// Idempotent: removing an unknown or already-removed sequence number is
    /// `Ok(())` and commits nothing. Blocking; see the module docs.
    pub fn remove(&self, seq: u64) -> Result<(), SpoolError> {
        let _writer = self.lock_writer();
        let txn = self.inner.db.begin_write().map_err(SpoolError::storage)?;
        let removed = {
            let mut records = txn.open_table(RECORDS).map_err(SpoolError::storage)?;
            let old = records.remove(seq).map_err(SpoolError::storage)?;
            old.map(|g| g.value().len() as u64)
        };
        match removed {
            Some(size) => {
                txn.commit().map_err(SpoolError::storage)?;
                self.inner.bytes.fetch_sub(size, Ordering::AcqRel);
                self.inner.len.fetch_sub(1, Ordering::AcqRel);
            }
            None => txn.abort().map_err(SpoolError::storage)?,
        }
        Ok(())
    }

    /// Durably deletes every record in `seqs` in one transaction (one
    /// `fsync` for the whole batch of confirmed replays). Unknown sequence
    /// numbers are skipped, as in [`Spool::remove`]. Blocking; see the module
    /// docs.
    pub fn remove_many(&self, seqs: &[u64]) -> Result<(), SpoolError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let _writer = self.lock_writer();
        let txn = self.inner.db.begin_write().map_err(SpoolError::storage)?;
        let (count, size) = {
            let mut records = txn.open_table(RECORDS).map_err(SpoolError::storage)?;
            let mut count = 0u64;
            let mut size = 0u64;
            for seq in seqs {
                if let Some(old) = records.remove(*seq).map_err(SpoolError::storage)? {
                    count += 1;
                    size += old.value().len() as u64;
                }
            }
            (count, size)
        };
        if count == 0 {
            txn.abort().map_err(SpoolError::storage)?;
            return Ok(());
        }
        txn.commit().map_err(SpoolError::storage)?;
        self.inner.bytes.fetch_sub(size, Ordering::AcqRel);
        self.inner.len.fetch_sub(count, Ordering::AcqRel);
        Ok(())
    }

    /// Number of records currently stored. Cheap (atomic load).
    pub fn len(&self) -> u64 {
        self.inner.len.load(Ordering::Acquire)
    }

    /// Sum of the encoded sizes of the stored records, i.e. what counts
    /// against `max_bytes` (not the redb file size, which also includes
    /// B-tree pages and free space). Cheap (atomic load).
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// `true` when no records are stored. Cheap (atomic load).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound passed to [`Spool::open`].
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// The file the spool lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// [`Spool::append`] on a `spawn_blocking` thread. Takes the record by
    /// value because it must move into the blocking task.
    pub async fn append_async(&self, rec: SpoolRecord) -> Result<u64, SpoolError> {
        let spool = self.clone();
        run_blocking(move || spool.append(&rec)).await
    }

    /// [`Spool::peek_batch`] on a `spawn_blocking` thread.
    pub async fn peek_batch_async(
        &self,
        max: usize,
    ) -> Result<Vec<(u64, SpoolRecord)>, SpoolError> {
        let spool = self.clone();
        run_blocking(move || spool.peek_batch(max)).await
    }

    /// [`Spool::remove_many`] on a `spawn_blocking` thread.
    pub async fn remove_many_async(&self, seqs: Vec<u64>) -> Result<(), SpoolError> {
        let spool = self.clone();
        run_blocking(move || spool.remove_many(&seqs)).await
    }

    /// [`Spool::remove`] on a `spawn_blocking` thread.
    pub async fn remove_async(&self, seq: u64) -> Result<(), SpoolError> {
        let spool = self.clone();
        run_blocking(move || spool.remove(seq)).await
    }
}

/// Runs `f` on tokio's blocking pool. A panic or cancellation of the
/// blocking task is reported as [`SpoolError::Storage`].
async fn run_blocking<T, F>(f: F) -> Result<T, SpoolError>
where
    F: FnOnce() -> Result<T, SpoolError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SpoolError::Storage(Arc::new(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    };
    use proptest::prelude::*;

    fn rec(i: usize) -> SpoolRecord {
        SpoolRecord {
            exchange: "ex".into(),
            routing_key: format!("rk.{i}"),
            body: vec![i as u8; 16],
            properties: lapin::BasicProperties::default(),
        }
    }

    fn rich_properties() -> lapin::BasicProperties {
        let mut nested = FieldTable::default();
        nested.insert("inner-int".into(), AMQPValue::LongLongInt(-42));
        nested.insert("inner-str".into(), AMQPValue::LongString("deep".into()));
        let mut deeper = FieldTable::default();
        deeper.insert("flag".into(), AMQPValue::Boolean(false));
        nested.insert("deeper".into(), AMQPValue::FieldTable(deeper));

        let mut headers = FieldTable::default();
        headers.insert(
            "x-str".into(),
            AMQPValue::LongString(LongString::from("hello ünïcode")),
        );
        headers.insert(
            "x-short".into(),
            AMQPValue::ShortString(ShortString::from("short")),
        );
        headers.insert("x-int".into(), AMQPValue::LongInt(7));
        headers.insert("x-uint".into(), AMQPValue::LongUInt(u32::MAX));
        headers.insert("x-i64".into(), AMQPValue::LongLongInt(i64::MIN));
        headers.insert("x-true".into(), AMQPValue::Boolean(true));
        headers.insert("x-false".into(), AMQPValue::Boolean(false));
        headers.insert("x-double".into(), AMQPValue::Double(1.5));
        headers.insert("x-void".into(), AMQPValue::Void);
        headers.insert(
            "x-array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::Boolean(true),
                AMQPValue::LongString("two".into()),
            ])),
        );
        headers.insert("x-nested".into(), AMQPValue::FieldTable(nested));
        headers.insert("x-i8".into(), AMQPValue::ShortShortInt(-8));
        headers.insert("x-u8".into(), AMQPValue::ShortShortUInt(200));
        headers.insert("x-i16".into(), AMQPValue::ShortInt(-300));
        headers.insert("x-u16".into(), AMQPValue::ShortUInt(60_000));
        headers.insert("x-float".into(), AMQPValue::Float(-2.25));
        headers.insert(
            "x-decimal".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12_345,
            }),
        );
        headers.insert("x-ts".into(), AMQPValue::Timestamp(1_700_000_001));
        headers.insert(
            "x-bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 0xff, 0x80])),
        );
        headers.insert(
            "x-not-utf8".into(),
            AMQPValue::LongString(LongString::from(vec![0xc3u8, 0x28])),
        );

        lapin::BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_priority(5)
            .with_message_id("msg-1".into())
            .with_correlation_id("corr-1".into())
            .with_timestamp(1_700_000_000)
            .with_expiration("60000".into())
            .with_content_encoding("gzip".into())
            .with_reply_to("replies".into())
            .with_type("order.created".into())
            .with_user_id("guest".into())
            .with_app_id("flowgate".into())
            .with_cluster_id("c1".into())
    }

    /// The record as spools before format versions stored it: bincode of
    /// lapin's struct layout.
    #[derive(serde::Serialize)]
    struct Unversioned<'a> {
        exchange: &'a str,
        routing_key: &'a str,
        body: &'a [u8],
        properties: &'a lapin::BasicProperties,
    }

    #[test]
    fn records_carry_the_magic_and_format_version() {
        let bytes = rec(1).encode().unwrap();
        assert_eq!(&bytes[..3], &format::MAGIC);
        assert_eq!(bytes[3], format::VERSION);
        let mut newer = bytes.clone();
        newer[3] = format::VERSION + 1;
        let err = SpoolRecord::decode(&newer).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn unversioned_records_still_decode() {
        let r = SpoolRecord {
            exchange: "orders".into(),
            routing_key: "k".into(),
            body: vec![9; 5],
            properties: rich_properties(),
        };
        let old = Unversioned {
            exchange: &r.exchange,
            routing_key: &r.routing_key,
            body: &r.body,
            properties: &r.properties,
        };
        let bytes = bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap();
        assert_eq!(SpoolRecord::decode(&bytes).unwrap(), r);
    }

    /// Overwrites the stored value of `seq` (a corrupted record).
    fn corrupt(path: &Path, seq: u64, value: &[u8]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(RECORDS).unwrap().insert(seq, value).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn an_undecodable_record_is_quarantined_and_the_others_still_come() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let seqs: Vec<u64> = {
            let s = open(&dir, 1 << 20);
            (0..5).map(|i| s.append(&rec(i)).unwrap()).collect()
        };
        let good = rec(2).encode().unwrap();
        corrupt(&path, seqs[2], &good[..good.len() / 2]);
        // A spool whose oldest record is bad still yields the next ones.
        corrupt(&path, seqs[0], b"garbage");
        let s = open(&dir, 1 << 20);
        let metrics = Metrics::new();
        s.count_quarantined_in(metrics.clone());
        let counter = || metrics.counter(Metrics::SPOOL_QUARANTINED, &[]);
        assert_eq!(s.len(), 5);
        let got = s.peek_batch(10).unwrap();
        assert_eq!(
            got.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![seqs[1], seqs[3], seqs[4]]
        );
        assert_eq!(counter(), 2);
        assert_eq!(s.quarantined().unwrap(), 2);
        assert_eq!(s.len(), 3);
        assert_eq!(s.bytes(), 3 * good.len() as u64);
        // Moved once: later peeks neither see nor count them again.
        assert_eq!(s.peek_batch(10).unwrap(), got);
        assert_eq!(counter(), 2);
        drop(s);
        let s = open(&dir, 1 << 20);
        assert_eq!((s.len(), s.quarantined().unwrap()), (3, 2));
    }

    #[test]
    fn a_spool_of_only_bad_records_peeks_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let seq = open(&dir, 1 << 20).append(&rec(0)).unwrap();
        corrupt(&path, seq, &[0xff; 3]);
        let s = open(&dir, 1 << 20);
        assert!(s.peek_batch(10).unwrap().is_empty());
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.quarantined().unwrap(), 1);
    }

    fn open(dir: &tempfile::TempDir, max: u64) -> Spool {
        match Spool::open(&dir.path().join("spool.redb"), max) {
            Ok(s) => s,
            Err(e) => panic!("open failed: {e}"),
        }
    }

    #[test]
    fn remove_many_deletes_a_batch_and_skips_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1 << 20);
        let seqs: Vec<u64> = (0..5).map(|i| s.append(&rec(i)).unwrap()).collect();
        let before = s.bytes();
        s.remove_many(&[seqs[0], seqs[1], 999]).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.bytes() < before);
        let left: Vec<u64> = s
            .peek_batch(10)
            .unwrap()
            .into_iter()
            .map(|(q, _)| q)
            .collect();
        assert_eq!(left, seqs[2..].to_vec());
        s.remove_many(&[]).unwrap();
        s.remove_many(&seqs[2..]).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn record_codec_round_trips_rich_properties() {
        let r = SpoolRecord {
            exchange: "orders".into(),
            routing_key: "orders.created".into(),
            body: b"{\"id\":1}".to_vec(),
            properties: rich_properties(),
        };
        let bytes = r.encode().unwrap();
        assert_eq!(SpoolRecord::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn decode_rejects_trailing_bytes_and_garbage() {
        let mut bytes = rec(1).encode().unwrap();
        bytes.push(0);
        assert!(matches!(
            SpoolRecord::decode(&bytes),
            Err(SpoolError::Codec { .. })
        ));
        assert!(matches!(
            SpoolRecord::decode(&[0xff, 0xff, 0xff]),
            Err(SpoolError::Codec { source: Some(ref e), .. }) if e.is::<bincode::error::DecodeError>()
        ));
    }

    #[test]
    fn properties_round_trip_through_the_spool_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = SpoolRecord {
            exchange: "x".into(),
            routing_key: "k".into(),
            body: vec![1, 2, 3],
            properties: rich_properties(),
        };
        {
            let s = open(&dir, 1 << 20);
            s.append(&r).unwrap();
        }
        let s = open(&dir, 1 << 20);
        let got = s.peek_batch(10).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, r);
    }

    #[test]
    fn fifo_order_and_peek_does_not_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1 << 20);
        let seqs: Vec<u64> = (0..10).map(|i| s.append(&rec(i)).unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let batch = s.peek_batch(4).unwrap();
        assert_eq!(batch.len(), 4);
        for (i, (seq, r)) in batch.iter().enumerate() {
            assert_eq!(*seq, seqs[i]);
            assert_eq!(*r, rec(i));
        }
        assert_eq!(s.len(), 10);
        assert_eq!(s.peek_batch(4).unwrap(), batch);
        s.remove(seqs[0]).unwrap();
        s.remove(seqs[1]).unwrap();
        let batch = s.peek_batch(100).unwrap();
        assert_eq!(batch.len(), 8);
        assert_eq!(batch[0].0, seqs[2]);
        assert!(s.peek_batch(0).unwrap().is_empty());
    }

    #[test]
    fn bound_is_enforced_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let size = rec(0).encode().unwrap().len() as u64;
        let s = open(&dir, size * 3);
        for i in 0..3 {
            s.append(&rec(i)).unwrap();
        }
        assert_eq!(s.bytes(), size * 3);
        let err = s.append(&rec(3)).unwrap_err();
        assert!(err.is_full());
        assert!(
            matches!(err, SpoolError::Full { bytes, max_bytes } if bytes == size * 3 && max_bytes == size * 3),
            "{err:?}"
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s.peek_batch(10).unwrap().len(), 3);
        // Draining frees room again.
        let first = s.peek_batch(1).unwrap()[0].0;
        s.remove(first).unwrap();
        s.append(&rec(3)).unwrap();
        // A record bigger than the whole bound never fits.
        let huge = SpoolRecord {
            body: vec![0; (size * 4) as usize],
            ..rec(0)
        };
        let empty_dir = tempfile::tempdir().unwrap();
        let empty = open(&empty_dir, size * 3);
        assert!(empty.append(&huge).unwrap_err().is_full());
        assert!(empty.is_empty());
    }

    #[test]
    fn count_bytes_and_sequence_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (len, bytes, last) = {
            let s = open(&dir, 1 << 20);
            let mut last = 0;
            for i in 0..5 {
                last = s.append(&rec(i)).unwrap();
            }
            s.remove(s.peek_batch(1).unwrap()[0].0).unwrap();
            (s.len(), s.bytes(), last)
        };
        assert_eq!(len, 4);
        let s = open(&dir, 1 << 20);
        assert_eq!(s.len(), len);
        assert_eq!(s.bytes(), bytes);
        let next = s.append(&rec(9)).unwrap();
        assert!(next > last, "sequence must continue after reopen");
        let batch = s.peek_batch(10).unwrap();
        assert_eq!(batch.last().map(|(q, _)| *q), Some(next));
    }

    #[test]
    fn sequence_does_not_restart_after_full_drain_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let last = {
            let s = open(&dir, 1 << 20);
            let a = s.append(&rec(0)).unwrap();
            let b = s.append(&rec(1)).unwrap();
            s.remove(a).unwrap();
            s.remove(b).unwrap();
            assert!(s.is_empty());
            b
        };
        let s = open(&dir, 1 << 20);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert!(s.append(&rec(2)).unwrap() > last);
    }

    #[test]
    fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1 << 20);
        let a = s.append(&rec(0)).unwrap();
        let b = s.append(&rec(1)).unwrap();
        let bytes_before = s.bytes();
        s.remove(a).unwrap();
        let after_one = s.bytes();
        assert!(after_one < bytes_before);
        s.remove(a).unwrap();
        s.remove(12345).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), after_one);
        assert_eq!(s.peek_batch(10).unwrap()[0].0, b);
    }

    #[test]
    fn second_open_of_same_file_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let _s = open(&dir, 1 << 20);
        let err = Spool::open(&dir.path().join("spool.redb"), 1 << 20).unwrap_err();
        assert!(matches!(err, SpoolError::Storage(_)), "{err:?}");
        let source = std::error::Error::source(&err).expect("keeps redb's error");
        assert!(source.is::<redb::DatabaseError>(), "{source:?}");
        // ...and so does the runtime's error wrapping it.
        let runtime = crate::Error::from(err);
        let chain = std::error::Error::source(&runtime).and_then(|e| e.source());
        assert!(chain.is_some_and(|e| e.is::<redb::DatabaseError>()));
    }

    #[test]
    fn clones_share_state_and_are_send_sync() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Spool>();
        assert_send_sync::<SpoolError>();
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1 << 20);
        let c = s.clone();
        c.append(&rec(0)).unwrap();
        assert_eq!(s.len(), 1);
        assert!(format!("{s:?}").contains("len: 1"));
    }

    #[test]
    fn concurrent_appends_respect_bound() {
        let dir = tempfile::tempdir().unwrap();
        let size = rec(0).encode().unwrap().len() as u64;
        let s = open(&dir, size * 10);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..5).filter(|i| s.append(&rec(*i)).is_ok()).count())
            })
            .collect();
        let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(ok, 10);
        assert_eq!(s.len(), 10);
        assert_eq!(s.bytes(), size * 10);
    }

    #[tokio::test]
    async fn async_wrappers_work() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir, 1 << 20);
        let a = s.append_async(rec(0)).await.unwrap();
        let b = s.append_async(rec(1)).await.unwrap();
        let batch = s.peek_batch_async(10).await.unwrap();
        assert_eq!(
            batch.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![a, b]
        );
        s.remove_async(a).await.unwrap();
        s.remove_async(a).await.unwrap();
        assert_eq!(s.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        /// Remove the n-th (mod len) currently stored seq, or a bogus one.
        Remove(usize),
        RemoveUnknown,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..200).prop_map(Op::Append),
            3 => any::<usize>().prop_map(Op::Remove),
            1 => Just(Op::RemoveUnknown),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn len_and_bytes_match_what_reopen_recomputes(
            ops in proptest::collection::vec(op(), 0..40),
            max in 200u64..3000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("spool.redb");
            let mut s = Spool::open(&path, max).unwrap();
            let mut model: Vec<(u64, SpoolRecord)> = Vec::new();
            let mut last_seq = 0u64;
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let r = SpoolRecord { body: vec![7; n], ..rec(n) };
                        let size = r.encode().unwrap().len() as u64;
                        match s.append(&r) {
                            Ok(seq) => {
                                prop_assert!(seq > last_seq);
                                last_seq = seq;
                                model.push((seq, r));
                            }
                            Err(e) => {
                                prop_assert!(e.is_full());
                                prop_assert!(s.bytes() + size > max);
                            }
                        }
                    }
                    Op::Remove(i) => {
                        if !model.is_empty() {
                            let (seq, _) = model.remove(i % model.len());
                            s.remove(seq).unwrap();
                        }
                    }
                    Op::RemoveUnknown => s.remove(last_seq + 1000).unwrap(),
                    Op::Reopen => {
                        drop(s);
                        s = Spool::open(&path, max).unwrap();
                    }
                }
                prop_assert!(s.bytes() <= max);
                prop_assert_eq!(s.len(), model.len() as u64);
            }
            let (len, bytes) = (s.len(), s.bytes());
            let stored = s.peek_batch(usize::MAX).unwrap();
            drop(s);
            let reopened = Spool::open(&path, max).unwrap();
            prop_assert_eq!(reopened.len(), len);
            prop_assert_eq!(reopened.bytes(), bytes);
            prop_assert_eq!(&stored, &model);
            prop_assert_eq!(reopened.peek_batch(usize::MAX).unwrap(), model);
        }
    }
}

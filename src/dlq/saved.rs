//! The console's DLQ indexes on disk (`management.dlq_index_dir`), so that
//! the first page after a restart is answered from the index the engine
//! read before it, checked against the queue like any other (see
//! [`index`](super::index)), instead of waiting for a read of the queue.
//!
//! One file per DLQ (`dlq-index-<16 hex digits of the SHA-256 of its
//! name>.bin`, bincode), written whole to a temporary file and renamed when
//! a read of the queue completes or an action changed the index, removed
//! when the index is found wrong. A file is only ever a hint: one that
//! cannot be read, is larger than the index's bounds allow, names another
//! queue or another format is ignored, and a loaded index serves pages only
//! after the check vouched for it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The format's version: a file of another is ignored.
const VERSION: u32 = 1;
/// Bytes a file may take beyond its index's byte bound (its frame).
const SLACK: u64 = 1 << 20;

/// An index as saved.
#[derive(Serialize, Deserialize)]
pub(super) struct Saved<I> {
    version: u32,
    queue: String,
    /// The queue's depth when it was read.
    pub(super) expected: u32,
    /// When the read began (ms since the epoch).
    read_at_ms: u64,
    /// Why it does not hold the whole queue.
    pub(super) partial: Option<String>,
    pub(super) items: I,
}

impl<I> Saved<I> {
    /// How long ago it was read (`None`: a time in the future).
    pub(super) fn age(&self) -> Option<Duration> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        now.checked_sub(Duration::from_millis(self.read_at_ms))
    }
}

fn path(dir: &Path, queue: &str) -> PathBuf {
    use sha2::Digest;
    let h = sha2::Sha256::digest(queue.as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("dlq-index-{hex}.bin"))
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Writes `items` (read `age` ago) as `queue`'s index; errors are logged:
/// without a file the next start reads the queue.
pub(super) fn save<I: Serialize>(
    dir: &Path,
    queue: &str,
    expected: u32,
    age: Duration,
    partial: Option<String>,
    items: I,
) {
    let read_at = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let saved = Saved {
        version: VERSION,
        queue: queue.to_owned(),
        expected,
        read_at_ms: read_at,
        partial,
        items,
    };
    let r = (|| -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let to = path(dir, queue);
        let tmp = to.with_extension("tmp");
        // Streamed: no copy of the whole index in memory.
        let mut w =
            std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| e.to_string())?);
        bincode::serde::encode_into_std_write(&saved, &mut w, config())
            .map_err(|e| e.to_string())?;
        w.into_inner()
            .map_err(|e| e.to_string())?
            .sync_all()
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &to).map_err(|e| e.to_string())
    })();
    if let Err(e) = r {
        tracing::warn!(
            queue = %super::view::visible(queue, 255),
            dir = %dir.display(),
            "the DLQ's index was not saved: {e}"
        );
    }
}

/// `queue`'s saved index, if there is a usable one no larger than
/// `max_bytes` (plus its frame).
pub(super) fn load<I: DeserializeOwned>(
    dir: &Path,
    queue: &str,
    max_bytes: usize,
) -> Option<Saved<I>> {
    let p = path(dir, queue);
    let len = std::fs::metadata(&p).ok()?.len();
    if len
        > u64::try_from(max_bytes)
            .unwrap_or(u64::MAX)
            .saturating_add(SLACK)
    {
        tracing::warn!(file = %p.display(), len, "a saved DLQ index larger than its bound: ignored");
        return None;
    }
    // Streamed (no copy of the file in memory), and never past its bound.
    let mut r = std::io::BufReader::new(std::fs::File::open(&p).ok()?).take(len);
    let saved: Saved<I> = bincode::serde::decode_from_std_read(&mut r, config())
        .map_err(|e| tracing::warn!(file = %p.display(), "a saved DLQ index unreadable: {e}"))
        .ok()?;
    (saved.version == VERSION && saved.queue == queue).then_some(saved)
}

/// Removes `queue`'s saved index (it was found wrong).
pub(super) fn remove(dir: &Path, queue: &str) {
    let _ = std::fs::remove_file(path(dir, queue));
}

//! The `record` handler: makes each handling observable from outside the
//! process, for demos and tests of exactly-once effects.

use crate::config::{StageConfig, Target};
use flowgate_actors::{Delivery, Handler, HandlerError, Outcome};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Appends `<message id>\n` to a file per handling (one `write` on a file
/// opened with `O_APPEND`, so lines from several processes never interleave
/// and a line written before a `kill -9` stays), then waits `delay` (the
/// handler's "work", a window to crash in), then acks, forwarding to
/// `output` if the stage has one.
pub(crate) struct Record {
    file: PathBuf,
    delay: Option<Duration>,
    output: Option<Target>,
}

impl Record {
    /// From a stage's config (`record_file`, `delay`, `output`); `None`
    /// without a `record_file`.
    pub(crate) fn from_stage(s: &StageConfig) -> Option<Self> {
        Some(Self {
            file: s.record_file.clone()?,
            delay: s.delay,
            output: s.output.clone(),
        })
    }
}

#[async_trait::async_trait]
impl Handler for Record {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let line = format!("{}\n", d.message_id().unwrap_or("-"));
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)?;
            f.write_all(line.as_bytes())
        })
        .await??;
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        Ok(match &self.output {
            Some(t) => Outcome::ack_with(vec![d.forward(&t.exchange, &t.routing_key)]),
            None => Outcome::ack(),
        })
    }
}

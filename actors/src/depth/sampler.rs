//! Sampling: a passive `queue.declare` per watched queue on the monitor's
//! own channel (on the consume connection, which a broker alarm never
//! blocks; no management plugin needed).

use super::{DepthMonitorActor, DepthSampled};
use crate::connection::{ConnectionActor, OpenChannel, Purpose};
use crate::error::Result;
use actix::prelude::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use tracing::debug;

impl DepthMonitorActor {
    /// Starts one sample unless one is running; its result comes back as
    /// [`DepthSampled`].
    pub(super) fn sample(&mut self, ctx: &mut Context<Self>) {
        if self.sampling {
            return;
        }
        self.sampling = true;
        let conn = self.conn.clone();
        let mut ch = self.channel.take().filter(|c| c.status().connected());
        let names: Vec<String> = self.cfg.queues.iter().map(|q| q.name.clone()).collect();
        let levels = self.levels.clone();
        ctx.spawn(
            async move {
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let c = match &ch {
                        Some(c) => c.clone(),
                        None => match open(&conn).await {
                            Ok(c) => {
                                ch = Some(c.clone());
                                c
                            }
                            Err(e) => {
                                debug!(error = %e, "depth monitor has no channel");
                                out.push((name, None));
                                continue;
                            }
                        },
                    };
                    levels.mark_read(&name);
                    match passive_declare(&c, &name).await {
                        Ok(v) => out.push((name, Some(v))),
                        Err(e) => {
                            // A failed passive declare closes the channel.
                            debug!(queue = %name, error = %e, "depth sample failed");
                            ch = None;
                            out.push((name, None));
                        }
                    }
                }
                (ch, out)
            }
            .into_actor(self)
            .map(|(ch, out), act, ctx| {
                act.channel = ch;
                act.sampling = false;
                ctx.notify(DepthSampled(out));
            }),
        );
    }
}

async fn open(conn: &Addr<ConnectionActor>) -> Result<Channel> {
    conn.send(OpenChannel(Purpose::Consume)).await?
}

/// A queue as the broker answers a passive `queue.declare` (its ready
/// messages and consumers, read from the queue itself: live, unlike
/// `rabbitmqctl`'s quorum-queue figures), or the broker's error if it does
/// not exist — which closes `ch` ([`Error::Amqp`]). A name the broker
/// cannot take (over 255 bytes) is [`Error::Invalid`]. Nothing about the
/// queue changes.
pub async fn inspect_queue(ch: &Channel, queue: &str) -> Result<lapin::Queue> {
    let name = crate::envelope::short_string("queue", queue)?;
    Ok(ch
        .queue_declare(
            name,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

async fn passive_declare(ch: &Channel, queue: &str) -> Result<(u64, u64)> {
    let q = inspect_queue(ch, queue).await?;
    Ok((u64::from(q.message_count()), u64::from(q.consumer_count())))
}

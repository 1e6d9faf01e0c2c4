//! Sending and confirming: the one `basic.publish` (signed right before
//! it), the confirm wait (bounded, and patient while the broker blocks us),
//! and `basic.return`s — ours fail the publish, a foreign one is rescued to
//! the unroutable queue.

use super::{Core, SpoolRecord};
use crate::connection::{OpenChannel, Purpose};
use crate::envelope;
use crate::envelope::{
    truncate, ERROR as ERROR_HEADER, MAX_ERROR_BYTES as MAX_ERROR_HEADER_BYTES,
    REASON as REASON_HEADER,
};
use crate::error::{Error, Result};
use crate::message::{set_header, Output};
use crate::metrics::events::{self, Event};
use crate::retry::{ORIGINAL_EXCHANGE_HEADER, ORIGINAL_ROUTING_KEY_HEADER};
use crate::signing;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Confirmation};
use std::sync::atomic::Ordering;

/// What we sent, to recognise our own message in a `basic.return`.
pub(super) struct Sent<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    body: &'a [u8],
    message_id: Option<&'a str>,
}

impl<'a> Sent<'a> {
    pub(super) fn record(rec: &'a SpoolRecord) -> Self {
        Sent {
            exchange: &rec.exchange,
            routing_key: &rec.routing_key,
            body: &rec.body,
            message_id: rec
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        }
    }

    /// The return is this message (two messages alike in all of these are
    /// interchangeable).
    pub(super) fn is(&self, ret: &BasicReturnMessage) -> bool {
        let d = &ret.delivery;
        d.exchange.as_str() == self.exchange
            && d.routing_key.as_str() == self.routing_key
            && d.data == self.body
            && d.properties.message_id().as_ref().map(ShortString::as_str) == self.message_id
    }
}

impl Core {
    /// Declares the unroutable queue once, on a channel of its own (a
    /// failed declare closes its channel, not the confirm channel).
    pub(super) async fn declare_unroutable_queue(&self) -> Result<()> {
        if self.unroutable_declared.load(Ordering::Acquire) {
            return Ok(());
        }
        let name = envelope::short_string("unroutable queue", &self.cfg.unroutable_queue)?;
        let ch = self.conn.send(OpenChannel(Purpose::Publish)).await??;
        let declared = ch
            .queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "declared".into()).await;
        declared?;
        self.unroutable_declared.store(true, Ordering::Release);
        Ok(())
    }

    /// Moves a spooled record that came back unroutable to the unroutable
    /// queue, with reason headers; `Ok` once confirmed there. Also rescues
    /// any foreign return handed to this confirm.
    pub(super) async fn dead_letter_unroutable(
        &self,
        ch: &Channel,
        rec: &SpoolRecord,
        returned: &Error,
    ) -> Result<()> {
        let foreign = self.publish_dead_letter(ch, rec, returned).await?;
        if let Some(ret) = foreign {
            self.rescue_returns(ch, ret).await;
        }
        Ok(())
    }

    /// Publishes `rec` to the unroutable queue with reason headers;
    /// `Ok(foreign)` once confirmed, with a return lapin attached to this
    /// confirm that belongs to another publish.
    pub(super) async fn publish_dead_letter(
        &self,
        ch: &Channel,
        rec: &SpoolRecord,
        returned: &Error,
    ) -> Result<Option<BasicReturnMessage>> {
        self.declare_unroutable_queue().await?;
        let mut props = rec.properties.clone().with_delivery_mode(2);
        let text = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
        set_header(
            &mut props,
            REASON_HEADER,
            text(envelope::Reason::Unroutable.as_str()),
        );
        set_header(
            &mut props,
            ERROR_HEADER,
            text(&truncate(returned.to_string(), MAX_ERROR_HEADER_BYTES)),
        );
        set_header(&mut props, ORIGINAL_EXCHANGE_HEADER, text(&rec.exchange));
        set_header(
            &mut props,
            ORIGINAL_ROUTING_KEY_HEADER,
            text(&rec.routing_key),
        );
        envelope::stamp_dead_lettered(&mut props);
        let queue = self.cfg.unroutable_queue.as_str();
        let sent = Sent {
            exchange: "",
            routing_key: queue,
            body: &rec.body,
            message_id: rec
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        };
        let confirmation = self
            .patiently(async {
                let confirm = self.send(ch, "", queue, &rec.body, props).await?;
                Ok(confirm.await)
            })
            .await?;
        match confirmation {
            Ok(Confirmation::Ack(Some(ret))) if !sent.is(&ret) => Ok(Some(ret)),
            other => {
                let res = confirmed(other);
                if matches!(res, Err(Error::Unroutable { .. })) {
                    // Deleted since we declared it: declare again next time.
                    self.unroutable_declared.store(false, Ordering::Release);
                }
                res.map(|()| None)
            }
        }
    }

    /// Waits for `fut` (a frame write or a confirm) for `confirm_timeout`,
    /// and for as long as the broker blocks the connection on top: the
    /// broker has read the publish's method frame and routes the message
    /// once it unblocks, so giving up (and spooling a copy) while blocked
    /// would deliver it twice.
    pub(super) async fn patiently<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = self.cfg.confirm_timeout;
        let mut fut = std::pin::pin!(fut);
        loop {
            match tokio::time::timeout(timeout, &mut fut).await {
                Ok(r) => return r,
                Err(_) if self.is_blocked() => continue,
                Err(_) => return Err(Error::ConfirmTimeout(timeout)),
            }
        }
    }

    /// Sends one message and waits for its confirm (see [`Core::patiently`]).
    pub(super) async fn publish_once(&self, ch: &Channel, msg: &Output) -> Result<()> {
        let props = msg.properties.clone();
        let sent = Sent {
            exchange: &msg.exchange,
            routing_key: &msg.routing_key,
            body: &msg.body,
            message_id: msg
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        };
        let confirmation = self
            .patiently(async {
                let started = std::time::Instant::now();
                let confirm = self
                    .send(ch, &msg.exchange, &msg.routing_key, &msg.body, props)
                    .await?;
                let answer = confirm.await;
                events::ConfirmAwaited {
                    elapsed: started.elapsed(),
                }
                .emit(&self.metrics);
                Ok(answer)
            })
            .await?;
        self.settle(ch, confirmation, &sent).await
    }

    /// Settles the confirm of one message we sent.
    ///
    /// A `basic.return` carries no delivery tag, and lapin hands each one to
    /// whichever confirm it completes next — with confirms out of order
    /// (quorum queues) or `multiple`, that is often another publish's. So a
    /// return on our confirm is ours only if it is the message we sent; a
    /// foreign one (its owner was told "confirmed") is moved to the
    /// unroutable queue here, so it still ends in a countable place.
    pub(super) async fn settle(
        &self,
        ch: &Channel,
        confirmation: lapin::Result<Confirmation>,
        sent: &Sent<'_>,
    ) -> Result<()> {
        let (ret, acked) = match confirmation {
            Ok(Confirmation::Ack(Some(ret))) => (ret, true),
            Ok(Confirmation::Nack(Some(ret))) => (ret, false),
            other => return confirmed(other),
        };
        if sent.is(&ret) {
            return confirmed(Ok(Confirmation::Ack(Some(ret))));
        }
        self.rescue_returns(ch, ret).await;
        if acked {
            Ok(())
        } else {
            Err(Error::Nacked)
        }
    }

    /// Moves returned messages whose publishers were told "confirmed" to
    /// the unroutable queue (each move may surface another such return).
    pub(super) async fn rescue_returns(&self, ch: &Channel, first: BasicReturnMessage) {
        let mut next = Some(first);
        while let Some(ret) = next.take() {
            let returned = Error::Unroutable {
                code: ret.reply_code,
                text: ret.reply_text.to_string(),
            };
            let d = ret.delivery;
            let rec = SpoolRecord {
                exchange: d.exchange.to_string(),
                routing_key: d.routing_key.to_string(),
                body: d.data,
                properties: d.properties,
            };
            match self.publish_dead_letter(ch, &rec, &returned).await {
                Ok(foreign) => {
                    self.count_unroutable_dead_letter(
                        &rec,
                        "returned message moved to the unroutable queue",
                    );
                    next = foreign;
                }
                Err(e) => events::UnroutableDropped {
                    message: self.unroutable(&rec),
                    error: &e,
                }
                .emit(&self.metrics),
            }
        }
    }

    pub(super) fn count_unroutable_dead_letter(&self, rec: &SpoolRecord, what: &'static str) {
        events::UnroutableDeadLettered {
            stage: events::PUBLISHER_STAGE,
            message: self.unroutable(rec),
            what,
        }
        .emit(&self.metrics);
    }

    pub(super) fn unroutable<'a>(&'a self, rec: &'a SpoolRecord) -> events::Unroutable<'a> {
        events::Unroutable {
            exchange: &rec.exchange,
            routing_key: &rec.routing_key,
            message_id: rec.properties.message_id().as_ref().map(|id| id.as_str()),
            queue: &self.cfg.unroutable_queue,
        }
    }

    /// The one `basic.publish` of the actor: signs the message (unless it
    /// is marked [`signing::UNSIGNED_HEADER`]) right before sending, so
    /// live publishes and spool replays are signed alike.
    pub(super) async fn send(
        &self,
        ch: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm> {
        // The message's own delivery mode unless persistence is forced (the
        // one place it is decided, for live publishes and spool replays).
        let props = if self.cfg.force_persistent {
            props.with_delivery_mode(2)
        } else {
            props
        };
        let props = signing::prepare(self.cfg.signing.as_ref(), routing_key, body, props);
        send(ch, exchange, routing_key, body, props).await
    }
}

async fn send(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<PublisherConfirm> {
    let exchange = envelope::short_string("exchange", exchange)?;
    let routing_key = envelope::short_string("routing key", routing_key)?;
    Ok(ch
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await?)
}

pub(super) fn confirmed(c: lapin::Result<Confirmation>) -> Result<()> {
    match c {
        Err(e) => Err(Error::Amqp(e)),
        Ok(Confirmation::Ack(None)) => Ok(()),
        // A channel not in confirm mode: the broker said nothing.
        Ok(Confirmation::NotRequested) => Err(Error::NotConfirmed),
        Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
            Err(Error::Unroutable {
                code: ret.reply_code,
                text: ret.reply_text.to_string(),
            })
        }
        Ok(Confirmation::Nack(None)) => Err(Error::Nacked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broker_ack_without_a_return_confirms() {
        assert!(confirmed(Ok(Confirmation::Ack(None))).is_ok());
        assert!(matches!(
            confirmed(Ok(Confirmation::NotRequested)),
            Err(Error::NotConfirmed)
        ));
        assert!(matches!(
            confirmed(Ok(Confirmation::Nack(None))),
            Err(Error::Nacked)
        ));
    }
}

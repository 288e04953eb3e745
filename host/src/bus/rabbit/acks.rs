//! Acks of one consumer channel, several at a time.
//!
//! A delivery settled as done is not acked on its own: once every delivery
//! before it on the channel is settled too, one `basic.ack` with `multiple`
//! covers the whole run. Settlements come back nearly in order (a few workers,
//! confirms that the broker itself acknowledges several at a time), so one ack
//! frame commonly covers several deliveries, which spares the broker work per
//! event.
//!
//! The rules that keep this safe:
//!
//! - A multiple ack never covers a delivery still unsettled: it stops below
//!   the lowest one. A delivery being requeued (`nack`) counts as unsettled
//!   until its nack is sent, so the nack always reaches the broker first.
//! - Acks go out in the order they were decided, from one task per channel: a
//!   later multiple ack never overtakes an earlier one (the broker would refuse
//!   the earlier one's tag as unknown and close the channel).
//! - Acks held behind a slow delivery (a long event, a requeue pause) are sent
//!   one by one once [`HELD`] of them wait or one has waited [`HOLD`], so a
//!   slow delivery never holds up the prefetch window.
//! - A delivery's settlement completes only when the ack covering it is sent:
//!   a drain that waits for settlements waits for the acks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tokio::sync::{mpsc, oneshot};

/// Acks held behind an unsettled delivery before they are sent one by one.
const HELD: usize = 16;

/// The longest an ack is held behind an unsettled delivery.
const HOLD: Duration = Duration::from_millis(20);

/// What an ack's sender hears: `Ok(true)` sent, `Ok(false)` the channel is
/// gone (the broker delivers the message again), `Err` the send failed.
type Sent = oneshot::Sender<Result<bool, String>>;

/// Acks decided together, sent in the order decided.
enum Batch {
    /// One `multiple` ack of the highest tag covers them all.
    Multiple { last: Acker, waiting: Vec<Sent> },
    /// Each on its own.
    Each(Vec<(Acker, Sent)>),
}

#[derive(Default)]
struct Window {
    /// Delivered, and neither acked nor (finished being) requeued.
    unsettled: BTreeSet<u64>,
    /// Settled as done, waiting for the deliveries before them.
    held: BTreeMap<u64, (Acker, Sent)>,
}

/// The acks of one consumer channel.
pub(super) struct Acks {
    window: Mutex<Window>,
    batches: mpsc::UnboundedSender<Batch>,
}

impl Acks {
    /// A window for a new consumer channel, with its sending task on `handle`.
    pub(super) fn new(handle: &tokio::runtime::Handle) -> Arc<Self> {
        let (batches, mut queue) = mpsc::unbounded_channel::<Batch>();
        handle.spawn(async move {
            while let Some(batch) = queue.recv().await {
                send(batch).await;
            }
        });
        Arc::new(Self {
            window: Mutex::new(Window::default()),
            batches,
        })
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A delivery came on the channel.
    pub(super) fn delivered(&self, tag: u64) {
        self.window().unsettled.insert(tag);
    }

    /// Acks `tag`, with the deliveries around it where it can; resolves once
    /// an ack covering it is sent.
    pub(super) async fn ack(&self, tag: u64, acker: Acker) -> Result<bool, String> {
        let (sent, mut heard) = oneshot::channel();
        {
            let mut window = self.window();
            window.unsettled.remove(&tag);
            window.held.insert(tag, (acker, sent));
            self.release(&mut window);
        }
        let heard = match tokio::time::timeout(HOLD, &mut heard).await {
            Ok(heard) => heard,
            Err(_) => {
                // Held behind a slow delivery: what waits goes one by one.
                self.send_held();
                heard.await
            }
        };
        heard.unwrap_or_else(|_| Err("the ack was never sent".into()))
    }

    fn send_held(&self) {
        let mut window = self.window();
        if !window.held.is_empty() {
            let each = std::mem::take(&mut window.held).into_values().collect();
            let _ = self.batches.send(Batch::Each(each));
        }
    }

    /// `tag` was settled another way (its nack is sent): acks held behind it
    /// may go.
    pub(super) fn settled(&self, tag: u64) {
        let mut window = self.window();
        window.unsettled.remove(&tag);
        self.release(&mut window);
    }

    /// Queues what can be acked now (under the window's lock, so batches are
    /// queued in the order they were decided).
    fn release(&self, window: &mut Window) {
        let ready: Vec<(Acker, Sent)> = match window.unsettled.first().copied() {
            Some(lowest) => {
                let behind = window.held.split_off(&lowest);
                std::mem::replace(&mut window.held, behind)
                    .into_values()
                    .collect()
            }
            None => std::mem::take(&mut window.held).into_values().collect(),
        };
        if let Some(batch) = multiple(ready) {
            let _ = self.batches.send(batch);
        }
        if window.held.len() >= HELD {
            let each = std::mem::take(&mut window.held).into_values().collect();
            let _ = self.batches.send(Batch::Each(each));
        }
        // (`send_held` does the same for acks held too long.)
    }
}

/// One multiple ack for `ready` (in tag order), if there is any.
fn multiple(mut ready: Vec<(Acker, Sent)>) -> Option<Batch> {
    let (last, last_sent) = ready.pop()?;
    let mut waiting: Vec<Sent> = ready.into_iter().map(|(_, sent)| sent).collect();
    waiting.push(last_sent);
    Some(Batch::Multiple { last, waiting })
}

async fn send(batch: Batch) {
    match batch {
        Batch::Multiple { last, waiting } => {
            let result = last
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(|e| format!("ack failed: {e}"));
            for sent in waiting {
                let _ = sent.send(result.clone());
            }
        }
        Batch::Each(each) => {
            for (acker, sent) in each {
                let result = acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| format!("ack failed: {e}"));
                let _ = sent.send(result);
            }
        }
    }
}

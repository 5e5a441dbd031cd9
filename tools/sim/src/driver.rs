//! The session driver: what `gateway/src/ws/` does for a WebSocket, done for an
//! in-memory connection. It subscribes held, runs a [`SessionCore`], makes the core's
//! engine calls, moves frames between the subscription, the core and the connection, arms
//! the core's timer on the simulated clock, and ends the connection with the core's close
//! reason.
//!
//! Like the WebSocket driver, it takes nothing from the subscription while the connection
//! is full (the socket is blocked), so the engine's bounded subscriber queue is what
//! absorbs a slow client, and a client that falls a whole queue behind is cut off.

use crate::executor::{Executor, Sleep};
use crate::pipe::Pipe;
use bytes::Bytes;
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::{Engine, Subscription, SubscriptionControl};
use chorus_gateway::error::ApiError;
use chorus_gateway::session::{
    run_call, take_events, Answer, CloseReason, Limits, SessionConfig, SessionCore,
    BATCH_FRAMES_MAX,
};
use futures::future::LocalBoxFuture;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// What a client sends on its connection.
#[derive(Debug)]
pub enum ToServer {
    /// A text frame.
    Text(String),
    /// The client closes.
    Close,
}

/// What the server sends on a connection.
#[derive(Debug)]
pub enum ToClient {
    /// A frame.
    Frame(Bytes),
    /// The session ended for this reason; nothing follows.
    Closed(CloseReason),
}

/// Turns over the sources of one poll at most this many times before giving the other
/// tasks a turn, as the WebSocket driver yields when glommio asks it to.
const TURNS_PER_POLL_MAX: usize = 8;

/// The sim's budgets: none. Rate limits are the gateway's business and are tested there.
struct Unlimited;

impl Limits for Unlimited {
    fn take_rate(&self, _user: UserId) -> Result<(), ApiError> {
        Ok(())
    }

    fn typing_allowed(&self, _user: UserId, _channel: ChannelId) -> bool {
        true
    }
}

/// Serves one connection of `user` until its session ends.
pub async fn serve(
    engine: Engine,
    executor: Executor,
    user: UserId,
    conn_id: u64,
    config: SessionConfig,
    inbound: Pipe<ToServer>,
    outbound: Pipe<ToClient>,
) {
    let reason = match engine.subscribe_held(user).await {
        Ok(sub) => {
            let mut driver = Driver::new(engine, executor, user, conn_id, config, sub);
            let reason = std::future::poll_fn(|cx| driver.poll(cx, &inbound, &outbound)).await;
            // Unsubscribe first: the engine stops queueing for a closing client.
            driver.sub = None;
            driver.call = None;
            reason
        }
        Err(_) => CloseReason::Unavailable,
    };
    outbound.push(ToClient::Closed(reason));
    outbound.close_write();
    inbound.close_read();
}

struct Driver {
    engine: Engine,
    executor: Executor,
    core: SessionCore,
    sub: Option<Subscription>,
    control: SubscriptionControl,
    call: Option<LocalBoxFuture<'static, Answer>>,
    timer: Sleep,
    armed_for: Instant,
    batch: Vec<Bytes>,
}

impl Driver {
    fn new(
        engine: Engine,
        executor: Executor,
        user: UserId,
        conn_id: u64,
        config: SessionConfig,
        sub: Subscription,
    ) -> Driver {
        let now = executor.now();
        let core = SessionCore::new(user, conn_id, config, now);
        let armed_for = core.poll_timeout();
        Driver {
            timer: executor.sleep(armed_for.saturating_duration_since(now)),
            armed_for,
            control: sub.control(),
            sub: Some(sub),
            engine,
            executor,
            core,
            call: None,
            batch: Vec::new(),
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        inbound: &Pipe<ToServer>,
        outbound: &Pipe<ToClient>,
    ) -> Poll<CloseReason> {
        for _ in 0..TURNS_PER_POLL_MAX {
            let mut busy = self.poll_call(cx);
            busy |= self.poll_outbound(cx, outbound);
            match self.poll_inbound(cx, inbound) {
                Some(read) => busy |= read,
                // The client is gone without a close: nothing can be sent any more.
                None => return Poll::Ready(CloseReason::PeerClosed),
            }
            busy |= self.poll_timer(cx);
            if let Some(reason) = self.core.poll_close() {
                return Poll::Ready(reason);
            }
            if !busy {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Polls the engine call in flight, and starts the next one the core asks for.
    fn poll_call(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        loop {
            if let Some(call) = self.call.as_mut() {
                let Poll::Ready(answer) = call.as_mut().poll(cx) else {
                    return progressed;
                };
                self.call = None;
                self.core
                    .handle_answer(self.executor.now(), answer, &Unlimited);
                progressed = true;
            }
            let Some(call) = self.core.poll_call() else {
                return progressed;
            };
            let engine = self.engine.clone();
            let user = self.core.user();
            // A single simulated node: nothing to relay to.
            let control = self.control.clone();
            self.call = Some(Box::pin(run_call(engine, control, None, user, call)));
        }
    }

    /// Moves the subscription's frames into the core and the core's frames into the
    /// connection while it has room.
    fn poll_outbound(&mut self, cx: &mut Context<'_>, outbound: &Pipe<ToClient>) -> bool {
        if outbound.poll_room(cx).is_pending() {
            return false;
        }
        self.fill_events(cx);
        let mut frames = 0;
        while frames < BATCH_FRAMES_MAX && outbound.has_room() {
            let Some(frame) = self.core.poll_transmit() else {
                break;
            };
            outbound.push(ToClient::Frame(frame));
            frames += 1;
        }
        if !outbound.has_room() {
            // Registers for room, so that a full connection wakes the driver when read.
            let _ = outbound.poll_room(cx);
        }
        frames > 0
    }

    fn fill_events(&mut self, cx: &mut Context<'_>) {
        if let Some(sub) = self.sub.as_mut() {
            let now = self.executor.now();
            take_events(|| now, &mut self.core, sub, &mut self.batch, cx);
        }
    }

    /// Reads client frames while the core wants them: whether one was read, or `None`
    /// when the client is gone.
    fn poll_inbound(&mut self, cx: &mut Context<'_>, inbound: &Pipe<ToServer>) -> Option<bool> {
        let mut read = false;
        while self.core.wants_client_frames() {
            match inbound.poll_next(cx) {
                Poll::Ready(Some(ToServer::Text(text))) => {
                    read = true;
                    self.core
                        .handle_text(self.executor.now(), &text, &Unlimited);
                }
                Poll::Ready(Some(ToServer::Close)) => {
                    self.core.handle_peer_closed();
                    return Some(true);
                }
                Poll::Ready(None) => return None,
                Poll::Pending => break,
            }
        }
        Some(read)
    }

    /// Fires the core's timeout when its deadline passed, and keeps the timer armed for the
    /// next deadline.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let mut fired = false;
        loop {
            let due = self.core.poll_timeout();
            if due < self.armed_for {
                self.arm(due);
            }
            if Pin::new(&mut self.timer).poll(cx).is_pending() {
                return fired;
            }
            fired = true;
            self.core.handle_timeout(self.executor.now());
            if self.core.poll_close().is_some() {
                return fired;
            }
            let next = self.core.poll_timeout();
            self.arm(next);
        }
    }

    fn arm(&mut self, at: Instant) {
        self.armed_for = at;
        let now = self.executor.now();
        self.timer = self.executor.sleep(at.saturating_duration_since(now));
    }
}

//! Cross-thread bounded queues with async wakeups: the only way shards and connections
//! hand work to each other.
//!
//! This module owns two queues. An [`Inbox`] is a shard's bounded multi-producer inbox: any
//! thread (another shard, a gateway thread, a plain std thread) sends to it, and the shard
//! drains it in batches, one batch per tick. A subscriber queue ([`subscriber_queue`]) carries
//! encoded frames from a shard's fan-out to one subscriber; it never blocks the shard, and a
//! subscriber that falls behind is cut off rather than buffered without limit (the subscriber
//! resumes from the log). The inbox is built on [`crossbeam_queue::ArrayQueue`], so its
//! capacity is fixed when it is created; the subscriber queue on a bounded, growable ring
//! that holds no memory while idle. Both wake their consumer through an [`AtomicWaker`], so
//! the consumer may sleep in any executor (glommio or not) and be woken from any thread.
//!
//! Architecture invariant: the inbox's hot path (a send that finds space, a receive that
//! finds an item) takes no lock. The only inbox lock is the list of senders blocked on a
//! full inbox, touched only when it is full. A subscriber queue's ring takes an
//! uncontended mutex per push or per batch of pops (its producer and consumer share a shard
//! thread in the server), and none to find it empty.

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use futures::task::AtomicWaker;
use std::future::poll_fn;
use std::sync::atomic::{self, AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The largest capacity an inbox may be created with, in items. An inbox slot is allocated
/// up front, so this keeps a configuration mistake from reserving gigabytes per shard.
pub const INBOX_CAPACITY_MAX: usize = 1 << 20;

/// The largest capacity a subscriber queue may be created with, in frames. A subscriber
/// that is this far behind is better served by resuming from the log.
pub const SUBSCRIBER_CAPACITY_MAX_FRAMES: usize = 1 << 16;

// ---------------------------------------------------------------------------------------
// Inbox: bounded MPSC
// ---------------------------------------------------------------------------------------

/// A bounded multi-producer, single-consumer queue: a shard's inbox.
///
/// `Inbox` only names the constructor; the queue itself is the pair of handles that
/// [`Inbox::new`] returns.
#[derive(Debug)]
pub struct Inbox<T> {
    _never: std::marker::PhantomData<T>,
}

impl<T: Send> Inbox<T> {
    /// Creates an inbox that holds at most `capacity` items and returns its two ends.
    ///
    /// # Panics
    ///
    /// If `capacity` is zero or larger than [`INBOX_CAPACITY_MAX`].
    // The brief and the callers name the constructor `Inbox::new`; it returns the two ends
    // rather than an `Inbox`, as `std::sync::mpsc::channel` does.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(capacity: usize) -> (InboxSender<T>, InboxReceiver<T>) {
        assert!(
            capacity > 0 && capacity <= INBOX_CAPACITY_MAX,
            "inbox capacity {capacity} is outside 1..={INBOX_CAPACITY_MAX}"
        );
        let shared = Arc::new(InboxShared {
            queue: ArrayQueue::new(capacity),
            receiver_waker: AtomicWaker::new(),
            senders: AtomicUsize::new(1),
            receiver_alive: AtomicBool::new(true),
            blocked_count: AtomicUsize::new(0),
            blocked: Mutex::new(Vec::new()),
        });
        (
            InboxSender {
                shared: shared.clone(),
            },
            InboxReceiver { shared },
        )
    }
}

/// The state both ends of an inbox share.
struct InboxShared<T> {
    queue: ArrayQueue<T>,
    /// The waker of the one receiver, registered before it sleeps.
    receiver_waker: AtomicWaker,
    /// Live [`InboxSender`] handles; the receiver sees the end of the stream at zero.
    senders: AtomicUsize,
    /// Cleared when the receiver is dropped, so that senders fail fast with `Closed`.
    receiver_alive: AtomicBool,
    /// How many wakers `blocked` holds. The receiver reads it after every pop so that it
    /// touches the lock only when a sender is really waiting.
    blocked_count: AtomicUsize,
    /// Wakers of senders waiting for space in a full inbox. This is the slow path: a full
    /// inbox means the shard is overloaded, and a lock here costs nothing next to that. It
    /// holds at most one waker per waiting task (see [`InboxShared::park_sender`]).
    blocked: Mutex<Vec<Waker>>,
}

impl<T> InboxShared<T> {
    /// Records `waker` as a sender waiting for space. The caller must retry its push
    /// afterwards: space freed before this call raised `blocked_count` is not announced.
    fn park_sender(&self, waker: &Waker) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        // A future polled again while still blocked must not add a second entry, or a
        // sender spinning in a `select!` could grow the list without bound.
        if !blocked.iter().any(|w| w.will_wake(waker)) {
            blocked.push(waker.clone());
            self.blocked_count.store(blocked.len(), Ordering::SeqCst);
        }
        drop(blocked);
        // Pairs with the fence in `space_freed`: either the receiver sees our count, or our
        // retry sees the slot it freed. Without it both could miss each other (store-load).
        atomic::fence(Ordering::SeqCst);
    }

    /// Wakes every blocked sender after the receiver freed at least one slot. Waking them
    /// all, not one, is deliberate: a woken sender whose future was dropped would otherwise
    /// swallow the only wakeup.
    fn space_freed(&self) {
        atomic::fence(Ordering::SeqCst);
        if self.blocked_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.wake_blocked_senders();
    }

    fn wake_blocked_senders(&self) {
        let wakers = {
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            self.blocked_count.store(0, Ordering::SeqCst);
            std::mem::take(&mut *blocked)
        };
        // Wake outside the lock: a waker may run arbitrary code.
        for waker in wakers {
            waker.wake();
        }
    }
}

/// Why [`InboxSender::try_send`] did not queue an item; the item comes back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError<T> {
    /// The inbox is at capacity.
    #[error("the inbox is full")]
    Full(T),
    /// The receiver is gone; nothing sent now will ever be received.
    #[error("the inbox is closed")]
    Closed(T),
}

impl<T> SendError<T> {
    /// The item that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(item) | SendError::Closed(item) => item,
        }
    }
}

/// [`InboxSender::send`] failed because the receiver is gone; the item comes back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the inbox is closed")]
pub struct Closed<T>(pub T);

/// Why [`InboxReceiver::try_recv`] returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing is queued right now, and some sender is still alive.
    #[error("the inbox is empty")]
    Empty,
    /// Nothing is queued and every sender is gone: nothing will ever arrive.
    #[error("the inbox is empty and every sender is gone")]
    Disconnected,
}

/// The sending end of an [`Inbox`]. Cheap to clone; every clone may live on a different
/// thread.
pub struct InboxSender<T> {
    shared: Arc<InboxShared<T>>,
}

impl<T: Send> InboxSender<T> {
    /// Queues `item` if there is room, without waiting.
    pub fn try_send(&self, item: T) -> Result<(), SendError<T>> {
        if !self.shared.receiver_alive.load(Ordering::Acquire) {
            return Err(SendError::Closed(item));
        }
        match self.shared.queue.push(item) {
            Ok(()) => {
                self.shared.receiver_waker.wake();
                Ok(())
            }
            Err(item) => Err(SendError::Full(item)),
        }
    }

    /// Queues `item`, waiting for room while the inbox is full. Fails only when the
    /// receiver is gone.
    ///
    /// Cancel-safe: dropping the future before it completes drops the item unsent.
    pub async fn send(&self, item: T) -> Result<(), Closed<T>> {
        let mut pending = Some(item);
        poll_fn(|cx| self.poll_send(cx, &mut pending)).await
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        pending: &mut Option<T>,
    ) -> Poll<Result<(), Closed<T>>> {
        let item = pending.take().expect("send polled after it completed");
        let item = match self.try_send(item) {
            Ok(()) => return Poll::Ready(Ok(())),
            Err(SendError::Closed(item)) => return Poll::Ready(Err(Closed(item))),
            Err(SendError::Full(item)) => item,
        };
        self.shared.park_sender(cx.waker());
        // Retry after parking: the receiver may have freed a slot between our first attempt
        // and the moment it could see us waiting. The receiver's drop also wakes parked
        // senders after clearing `receiver_alive`, so `Closed` cannot be missed either.
        match self.try_send(item) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(SendError::Closed(item)) => Poll::Ready(Err(Closed(item))),
            Err(SendError::Full(item)) => {
                *pending = Some(item);
                Poll::Pending
            }
        }
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        !self.shared.receiver_alive.load(Ordering::Acquire)
    }

    /// How many items are queued now (a snapshot; other threads may change it at once).
    pub fn len(&self) -> usize {
        self.shared.queue.len()
    }

    /// Whether nothing is queued now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.shared.queue.is_empty()
    }

    /// The fixed capacity of the inbox, in items.
    pub fn capacity(&self) -> usize {
        self.shared.queue.capacity()
    }
}

impl<T> Clone for InboxSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        InboxSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for InboxSender<T> {
    fn drop(&mut self) {
        // AcqRel: every push by this sender happens before the receiver observes zero, so a
        // receiver that sees zero and then finds the queue empty has seen everything.
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.receiver_waker.wake();
        }
    }
}

impl<T> std::fmt::Debug for InboxSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxSender")
            .field("len", &self.shared.queue.len())
            .field("capacity", &self.shared.queue.capacity())
            .finish()
    }
}

/// The receiving end of an [`Inbox`]: exactly one, owned by the shard.
pub struct InboxReceiver<T> {
    shared: Arc<InboxShared<T>>,
}

impl<T: Send> InboxReceiver<T> {
    /// Takes the oldest item, or says why there is none, without waiting.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        if let Some(item) = self.pop() {
            return Ok(item);
        }
        if self.shared.senders.load(Ordering::Acquire) > 0 {
            return Err(TryRecvError::Empty);
        }
        // The last sender may have pushed just before it dropped; look once more.
        self.pop().ok_or(TryRecvError::Disconnected)
    }

    /// Waits for the oldest item. Returns `None` once every sender is gone and the inbox is
    /// empty.
    ///
    /// Cancel-safe: an item is taken only when the future completes.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The poll form of [`InboxReceiver::recv`], for hand-written futures and select loops.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.try_recv() {
            Ok(item) => return Poll::Ready(Some(item)),
            Err(TryRecvError::Disconnected) => return Poll::Ready(None),
            Err(TryRecvError::Empty) => {}
        }
        self.shared.receiver_waker.register(cx.waker());
        // Check again after registering: an item pushed between the first check and the
        // registration woke nobody, and sleeping now would lose it.
        match self.try_recv() {
            Ok(item) => Poll::Ready(Some(item)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }

    /// Moves up to `max` queued items, oldest first, to the end of `out` without waiting,
    /// and returns how many it moved. This is how a shard takes a whole tick's work at once.
    pub fn drain_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let mut moved = 0;
        while moved < max {
            match self.shared.queue.pop() {
                Some(item) => out.push(item),
                None => break,
            }
            moved += 1;
        }
        // One announcement for the whole batch keeps the blocked-sender check off the
        // per-item path.
        if moved > 0 {
            self.shared.space_freed();
        }
        moved
    }

    /// Waits until at least one item is queued, then moves up to `max` items to `out` as
    /// [`InboxReceiver::drain_into`] does. Returns 0 only once every sender is gone and the
    /// inbox is empty (or when `max` is 0).
    pub async fn recv_batch(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        match self.recv().await {
            None => 0,
            Some(first) => {
                out.push(first);
                1 + self.drain_into(out, max - 1)
            }
        }
    }

    /// How many items are queued now.
    pub fn len(&self) -> usize {
        self.shared.queue.len()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.shared.queue.is_empty()
    }

    /// The fixed capacity of the inbox, in items.
    pub fn capacity(&self) -> usize {
        self.shared.queue.capacity()
    }

    fn pop(&mut self) -> Option<T> {
        let item = self.shared.queue.pop()?;
        self.shared.space_freed();
        Some(item)
    }
}

impl<T> Drop for InboxReceiver<T> {
    fn drop(&mut self) {
        self.shared.receiver_alive.store(false, Ordering::SeqCst);
        // Drop what is queued now rather than when the last sender goes: items may hold
        // reply channels whose waiters should learn at once that no answer is coming. An
        // item pushed by a sender racing with this drop is dropped with the last handle.
        while self.shared.queue.pop().is_some() {}
        // Blocked senders must wake to see `Closed`. Taking the lock orders this after any
        // sender that parked before we cleared `receiver_alive`; one that parks later sees
        // the flag on its retry.
        self.shared.wake_blocked_senders();
    }
}

impl<T> std::fmt::Debug for InboxReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxReceiver")
            .field("len", &self.shared.queue.len())
            .field("capacity", &self.shared.queue.capacity())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Subscriber queue: bounded SPSC of frames with cutoff
// ---------------------------------------------------------------------------------------

/// Why a subscriber stopped receiving frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Cutoff {
    /// The subscriber fell a whole queue behind. It should reconnect and resume from its
    /// last sequence number, which the log still has.
    #[error("the subscriber fell too far behind and was cut off")]
    Overflow,
    /// The sending side closed the queue (unsubscribe, shutdown), or was dropped.
    #[error("the subscription was closed")]
    Closed,
    /// The subscription's device was removed (`API.md` §14): its credentials no longer
    /// work, and it must not reconnect with them.
    #[error("the subscription's device was removed")]
    Revoked,
}

/// What happened to a frame given to [`FrameSender::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a push that was not queued means the subscriber should be unregistered"]
pub enum PushOutcome {
    /// The frame is queued for the subscriber.
    Queued,
    /// The queue was full: this frame was dropped and the subscriber is now cut off with
    /// [`Cutoff::Overflow`]. The receiver still gets the frames queued before it.
    Overflowed,
    /// The frame was dropped because the subscriber was already cut off or closed, or its
    /// receiver is gone.
    Disconnected,
}

/// `FrameShared::state` while frames flow.
const STATE_OPEN: u8 = 0;
/// `FrameShared::state` after an overflow.
const STATE_OVERFLOW: u8 = 1;
/// `FrameShared::state` after `close` or the sender's drop.
const STATE_CLOSED: u8 = 2;
/// Closed because the subscription's device was removed.
const STATE_REVOKED: u8 = 3;

/// A bounded FIFO of frames that holds memory only for the frames in it.
///
/// A subscriber queue must cost nothing while its connection is idle: a node holds tens of
/// thousands of idle connections, and a preallocated ring of a few thousand slots each would
/// take gigabytes. So the frames sit in a `VecDeque` that grows with the backlog and gives
/// its memory back once drained. The mutex is held for one push or for one batch of pops;
/// its two users are the shard that pushes and the connection that pops, which in the server
/// run on the same shard thread, so it is not contended across cores.
///
/// `queued` mirrors the number of frames, written only under the lock: a reader that finds
/// the queue empty (most polls of an idle subscriber) or asks its length takes no lock and
/// writes no shared cache line. It cannot miss a frame: a push stores the new count before
/// it wakes the receiver, and the receiver checks again after registering its waker.
struct FrameRing {
    frames: Mutex<std::collections::VecDeque<Bytes>>,
    queued: AtomicUsize,
    capacity: usize,
}

/// A drained queue keeps at most this many slots of capacity.
const FRAME_RING_IDLE_SLOTS_MAX: usize = 8;

impl FrameRing {
    fn new(capacity: usize) -> FrameRing {
        FrameRing {
            frames: Mutex::new(std::collections::VecDeque::new()),
            queued: AtomicUsize::new(0),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Bytes>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, frame: Bytes) -> Result<(), Bytes> {
        let mut q = self.lock();
        if q.len() >= self.capacity {
            return Err(frame);
        }
        q.push_back(frame);
        self.queued.store(q.len(), Ordering::Release);
        Ok(())
    }

    fn pop(&self) -> Option<Bytes> {
        if self.is_empty() {
            return None;
        }
        let mut q = self.lock();
        let frame = q.pop_front();
        self.popped(&mut q);
        frame
    }

    /// Moves up to `max` frames to `out` under one lock; returns how many.
    fn pop_batch(&self, out: &mut Vec<Bytes>, max: usize) -> usize {
        if max == 0 || self.is_empty() {
            return 0;
        }
        let mut q = self.lock();
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        self.popped(&mut q);
        n
    }

    /// Publishes the new count after pops, and gives a drained queue's memory back.
    fn popped(&self, q: &mut std::collections::VecDeque<Bytes>) {
        self.queued.store(q.len(), Ordering::Release);
        if q.is_empty() && q.capacity() > FRAME_RING_IDLE_SLOTS_MAX {
            q.shrink_to(FRAME_RING_IDLE_SLOTS_MAX);
        }
    }

    fn len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The state both ends of a subscriber queue share.
struct FrameShared {
    frames: FrameRing,
    /// `STATE_OPEN` until the sender cuts the subscriber off; set once, then frozen.
    state: AtomicU8,
    /// Cleared when the receiver is dropped, so that the shard can unregister it.
    receiver_alive: AtomicBool,
    /// The waker of the receiver, registered before it sleeps.
    receiver_waker: AtomicWaker,
}

impl FrameShared {
    fn cutoff(&self) -> Option<Cutoff> {
        match self.state.load(Ordering::Acquire) {
            STATE_OPEN => None,
            STATE_OVERFLOW => Some(Cutoff::Overflow),
            STATE_REVOKED => Some(Cutoff::Revoked),
            _ => Some(Cutoff::Closed),
        }
    }

    /// Cuts the subscriber off for `reason` unless it already is, and wakes the receiver.
    /// Returns whether this call made the cut.
    fn cut(&self, reason: Cutoff) -> bool {
        let state = match reason {
            Cutoff::Overflow => STATE_OVERFLOW,
            Cutoff::Closed => STATE_CLOSED,
            Cutoff::Revoked => STATE_REVOKED,
        };
        // Release: every frame pushed before the cut is visible to a receiver that sees it.
        let made = self
            .state
            .compare_exchange(STATE_OPEN, state, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.receiver_waker.wake();
        made
    }
}

/// Creates a subscriber queue that holds at most `capacity_frames` frames, and returns its
/// two ends. The shard keeps the [`FrameSender`]; the connection, possibly on another
/// thread, keeps the [`FrameReceiver`].
///
/// # Panics
///
/// If `capacity_frames` is zero or larger than [`SUBSCRIBER_CAPACITY_MAX_FRAMES`].
pub fn subscriber_queue(capacity_frames: usize) -> (FrameSender, FrameReceiver) {
    assert!(
        capacity_frames > 0 && capacity_frames <= SUBSCRIBER_CAPACITY_MAX_FRAMES,
        "subscriber queue capacity {capacity_frames} is outside 1..={SUBSCRIBER_CAPACITY_MAX_FRAMES}"
    );
    let shared = Arc::new(FrameShared {
        frames: FrameRing::new(capacity_frames),
        state: AtomicU8::new(STATE_OPEN),
        receiver_alive: AtomicBool::new(true),
        receiver_waker: AtomicWaker::new(),
    });
    (
        FrameSender {
            shared: shared.clone(),
        },
        FrameReceiver { shared },
    )
}

/// The shard's end of a subscriber queue. Pushing never waits: a subscriber that cannot
/// keep up is cut off, so one slow client never slows a shard. Dropping it closes the queue
/// with [`Cutoff::Closed`].
pub struct FrameSender {
    shared: Arc<FrameShared>,
}

impl FrameSender {
    /// Queues `frame` for the subscriber, or cuts the subscriber off if its queue is full.
    pub fn push(&self, frame: Bytes) -> PushOutcome {
        if self.is_closed() {
            return PushOutcome::Disconnected;
        }
        if self.shared.frames.push(frame).is_err() {
            // Only the cut that this push made reports `Overflowed`, so the shard logs and
            // counts each cutoff once. The cut wakes the receiver.
            return if self.shared.cut(Cutoff::Overflow) {
                PushOutcome::Overflowed
            } else {
                PushOutcome::Disconnected
            };
        }
        self.shared.receiver_waker.wake();
        PushOutcome::Queued
    }

    /// Cuts the subscriber off for `reason`. Frames already queued are still delivered,
    /// then the receiver gets `Err(reason)`. Does nothing if it is already cut off.
    pub fn close(&self, reason: Cutoff) {
        self.shared.cut(reason);
    }

    /// Whether no frame pushed now can ever be delivered: the receiver was dropped, or the
    /// subscriber was cut off. The shard unregisters a subscriber once this is true.
    pub fn is_closed(&self) -> bool {
        !self.shared.receiver_alive.load(Ordering::Acquire) || self.shared.cutoff().is_some()
    }

    /// How many frames are queued now (a snapshot).
    pub fn len(&self) -> usize {
        self.shared.frames.len()
    }

    /// The most frames the queue holds.
    pub fn capacity(&self) -> usize {
        self.shared.frames.capacity
    }

    /// Whether no frame is queued now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.shared.frames.is_empty()
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        self.shared.cut(Cutoff::Closed);
    }
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender")
            .field("len", &self.shared.frames.len())
            .field("cutoff", &self.shared.cutoff())
            .finish()
    }
}

/// The subscriber's end of a subscriber queue.
pub struct FrameReceiver {
    shared: Arc<FrameShared>,
}

impl FrameReceiver {
    /// Waits for the next frame. After a cutoff, the frames queued before it are still
    /// returned, then `Err` with the reason, and `Err` again on every later call.
    ///
    /// Cancel-safe: a frame is taken only when the future completes.
    pub async fn recv(&mut self) -> Result<Bytes, Cutoff> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The poll form of [`FrameReceiver::recv`].
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, Cutoff>> {
        if let Some(result) = self.try_recv() {
            return Poll::Ready(result);
        }
        self.shared.receiver_waker.register(cx.waker());
        // Check again after registering, or a frame pushed in between would be lost.
        match self.try_recv() {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }

    /// Moves up to `max` queued frames, oldest first, to the end of `out` without waiting,
    /// so that a connection can write many frames with one syscall. Returns how many it
    /// moved; `Ok(0)` means nothing is queued yet. Returns `Err` only when nothing is queued
    /// and the subscriber has been cut off.
    pub fn try_recv_batch(&mut self, out: &mut Vec<Bytes>, max: usize) -> Result<usize, Cutoff> {
        let moved = self.shared.frames.pop_batch(out, max);
        if moved > 0 || max == 0 {
            return Ok(moved);
        }
        match self.try_recv() {
            None => Ok(0),
            Some(Ok(frame)) => {
                out.push(frame);
                Ok(1)
            }
            Some(Err(cutoff)) => Err(cutoff),
        }
    }

    /// Waits until at least one frame is queued, then moves up to `max` frames to `out` as
    /// [`FrameReceiver::try_recv_batch`] does. Returns `Err` once the queue is drained and
    /// the subscriber is cut off.
    pub async fn recv_batch(&mut self, out: &mut Vec<Bytes>, max: usize) -> Result<usize, Cutoff> {
        if max == 0 {
            return Ok(0);
        }
        let first = self.recv().await?;
        out.push(first);
        Ok(1 + self.try_recv_batch(out, max - 1)?)
    }

    /// The next frame, the cutoff, or `None` if the queue is open and empty.
    fn try_recv(&mut self) -> Option<Result<Bytes, Cutoff>> {
        if let Some(frame) = self.shared.frames.pop() {
            return Some(Ok(frame));
        }
        let cutoff = self.shared.cutoff()?;
        // The cut is published after every frame pushed before it, and we read it with
        // Acquire, so one more pop finds any frame that raced with our first one.
        Some(self.shared.frames.pop().ok_or(cutoff))
    }
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        self.shared.receiver_alive.store(false, Ordering::Release);
        // Release the queued frames now; the shard may hold its sender for a while longer.
        while self.shared.frames.pop().is_some() {}
    }
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver")
            .field("len", &self.shared.frames.len())
            .field("cutoff", &self.shared.cutoff())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::collections::HashSet;
    use std::future::Future;
    use std::thread;

    #[test]
    fn inbox_is_fifo() {
        // Items come out of an inbox in the order one sender put them in.
        let (tx, mut rx) = Inbox::new(8);
        for i in 0..8 {
            tx.try_send(i).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(rx.drain_into(&mut out, 100), 8);
        assert_eq!(out, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn inbox_is_bounded_and_reports_full() {
        // An inbox holds exactly its capacity and hands back the item it could not take.
        let (tx, mut rx) = Inbox::new(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(SendError::Full(3)));
        assert_eq!(tx.len(), 2);
        assert_eq!(rx.try_recv(), Ok(1));
        tx.try_send(3).unwrap();
        let mut out = Vec::new();
        assert_eq!(rx.drain_into(&mut out, 1), 1);
        assert_eq!(rx.drain_into(&mut out, 10), 1);
        assert_eq!(out, vec![2, 3]);
    }

    #[test]
    fn inbox_close_semantics() {
        // The receiver sees the end only after the last sender is gone and the queue is
        // drained; senders see `Closed` once the receiver is gone.
        let (tx, mut rx) = Inbox::new(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tx2.try_send(2).unwrap();
        drop(tx2);
        assert_eq!(block_on(rx.recv()), Some(2));
        assert_eq!(block_on(rx.recv()), None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));

        let (tx, rx) = Inbox::new(4);
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(7), Err(SendError::Closed(7)));
        assert_eq!(block_on(tx.send(8)), Err(Closed(8)));
    }

    #[test]
    fn inbox_send_waits_for_space_across_threads() {
        // A sender blocked on a full inbox is woken by a receiver on another thread.
        let (tx, mut rx) = Inbox::new(1);
        let producer = thread::spawn(move || {
            block_on(async {
                for i in 0..1000 {
                    tx.send(i).await.unwrap();
                }
            })
        });
        let received: Vec<i32> = block_on(async {
            let mut got = Vec::new();
            while let Some(i) = rx.recv().await {
                got.push(i);
            }
            got
        });
        producer.join().unwrap();
        assert_eq!(received, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn inbox_blocked_sender_sees_receiver_drop() {
        // A sender waiting for space learns that the receiver is gone instead of hanging.
        let (tx, rx) = Inbox::new(1);
        tx.try_send(0).unwrap();
        let (parked_tx, parked_rx) = std::sync::mpsc::channel();
        let sender = thread::spawn(move || {
            block_on(async {
                let mut fut = std::pin::pin!(tx.send(1));
                // Poll once by hand so the main thread knows the sender has parked.
                poll_fn(|cx| {
                    let poll = fut.as_mut().poll(cx);
                    if poll.is_pending() {
                        parked_tx.send(()).unwrap();
                    }
                    poll
                })
                .await
            })
        });
        parked_rx.recv().unwrap();
        drop(rx);
        assert_eq!(sender.join().unwrap(), Err(Closed(1)));
    }

    #[test]
    fn inbox_wakes_a_glommio_receiver_from_a_std_thread() {
        // A receiver sleeping in a glommio executor is woken by sends from a plain thread.
        let (tx, mut rx) = Inbox::new(16);
        let consumer = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut got = Vec::new();
                while let Some(i) = rx.recv().await {
                    got.push(i);
                }
                got
            })
            .unwrap();
        let producer = thread::spawn(move || {
            block_on(async {
                for i in 0..5000u32 {
                    tx.send(i).await.unwrap();
                }
            })
        });
        producer.join().unwrap();
        assert_eq!(consumer.join().unwrap(), (0..5000).collect::<Vec<_>>());
    }

    #[test]
    fn inbox_wakes_glommio_senders_and_receiver_across_executors() {
        // Between two glommio executors, a full inbox parks the sender and a drain on the
        // other executor wakes it, and each push wakes the parked receiver.
        const ITEMS: u32 = 2000;
        let (tx, mut rx) = Inbox::new(1);
        let consumer = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut got = Vec::new();
                while rx.recv_batch(&mut got, 8).await > 0 {}
                got
            })
            .unwrap();
        let producer = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                for i in 0..ITEMS {
                    tx.send(i).await.unwrap();
                }
            })
            .unwrap();
        producer.join().unwrap();
        assert_eq!(consumer.join().unwrap(), (0..ITEMS).collect::<Vec<_>>());
    }

    #[test]
    fn strict_ping_pong_between_executors_loses_no_wake() {
        // Each message waits for the answer to the one before, so every one of them puts
        // the other executor to sleep and must wake it: the sleeper's fence and the
        // notifier's (vendor/README.md, glommio's park) either see the message or see the
        // sleeper. A lost wake-up hangs a round trip; the watchdog fails the test then.
        const ROUNDS: u32 = 20_000;
        let (ping_tx, mut ping_rx) = Inbox::new(1);
        let (pong_tx, mut pong_rx) = Inbox::new(1);
        let echo = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                while let Some(i) = ping_rx.recv().await {
                    pong_tx.send(i).await.unwrap();
                }
            })
            .unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let caller = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                for i in 0..ROUNDS {
                    ping_tx.send(i).await.unwrap();
                    assert_eq!(pong_rx.recv().await, Some(i));
                }
                done_tx.send(()).unwrap();
            })
            .unwrap();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a round trip never came back: a wake-up was lost");
        caller.join().unwrap();
        echo.join().unwrap();
    }

    #[test]
    fn handles_cross_threads() {
        // The handles that other threads hold are Send (and Sync where shared).
        fn assert_send_sync<T: Send + Sync>() {}
        fn assert_send<T: Send>() {}
        assert_send_sync::<InboxSender<Vec<u8>>>();
        assert_send::<InboxReceiver<Vec<u8>>>();
        assert_send_sync::<FrameSender>();
        assert_send::<FrameReceiver>();
    }

    #[test]
    fn inbox_stress_every_item_arrives_once() {
        // Under four concurrent producers, every item arrives exactly once and each
        // producer's items stay in order.
        const PRODUCERS: u64 = 4;
        const ITEMS_PER_PRODUCER: u64 = 10_000;
        const BATCH_MAX: usize = 64;
        let (tx, mut rx) = Inbox::new(128);
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let tx = tx.clone();
                thread::spawn(move || {
                    block_on(async {
                        for i in 0..ITEMS_PER_PRODUCER {
                            tx.send(p * ITEMS_PER_PRODUCER + i).await.unwrap();
                        }
                    })
                })
            })
            .collect();
        drop(tx);
        let mut seen = HashSet::new();
        let mut last = [None::<u64>; PRODUCERS as usize];
        let mut batch = Vec::with_capacity(BATCH_MAX);
        block_on(async {
            while rx.recv_batch(&mut batch, BATCH_MAX).await > 0 {
                for item in batch.drain(..) {
                    assert!(seen.insert(item), "item {item} arrived twice");
                    let producer = (item / ITEMS_PER_PRODUCER) as usize;
                    assert!(last[producer] < Some(item), "producer {producer} reordered");
                    last[producer] = Some(item);
                }
            }
        });
        for producer in producers {
            producer.join().unwrap();
        }
        assert_eq!(seen.len() as u64, PRODUCERS * ITEMS_PER_PRODUCER);
    }

    fn frame(i: u32) -> Bytes {
        Bytes::from(i.to_le_bytes().to_vec())
    }

    #[test]
    fn frames_are_fifo_and_batched() {
        // Frames come out in push order, in batches no larger than asked for.
        let (tx, mut rx) = subscriber_queue(8);
        for i in 0..5 {
            assert_eq!(tx.push(frame(i)), PushOutcome::Queued);
        }
        let mut out = Vec::new();
        assert_eq!(rx.try_recv_batch(&mut out, 3), Ok(3));
        assert_eq!(block_on(rx.recv()), Ok(frame(3)));
        assert_eq!(rx.try_recv_batch(&mut out, 3), Ok(1));
        assert_eq!(rx.try_recv_batch(&mut out, 3), Ok(0));
        assert_eq!(out, vec![frame(0), frame(1), frame(2), frame(4)]);
    }

    #[test]
    fn overflow_cuts_off_after_queued_frames() {
        // A full subscriber queue cuts the subscriber off: it still gets what was queued,
        // then `Overflow`, and nothing pushed after the cut.
        let (tx, mut rx) = subscriber_queue(2);
        assert_eq!(tx.push(frame(0)), PushOutcome::Queued);
        assert_eq!(tx.push(frame(1)), PushOutcome::Queued);
        assert_eq!(tx.push(frame(2)), PushOutcome::Overflowed);
        assert!(tx.is_closed());
        assert_eq!(rx.try_recv_batch(&mut Vec::new(), 1), Ok(1));
        assert_eq!(tx.push(frame(3)), PushOutcome::Disconnected);
        assert_eq!(block_on(rx.recv()), Ok(frame(1)));
        assert_eq!(block_on(rx.recv()), Err(Cutoff::Overflow));
        assert_eq!(rx.try_recv_batch(&mut Vec::new(), 4), Err(Cutoff::Overflow));
        assert_eq!(block_on(rx.recv()), Err(Cutoff::Overflow));
    }

    #[test]
    fn frame_queue_close_semantics() {
        // Closing delivers queued frames then the reason; dropping the sender reads as
        // `Closed`; dropping the receiver tells the sender to unregister.
        let (tx, mut rx) = subscriber_queue(4);
        assert_eq!(tx.push(frame(0)), PushOutcome::Queued);
        tx.close(Cutoff::Closed);
        tx.close(Cutoff::Overflow);
        assert_eq!(tx.push(frame(1)), PushOutcome::Disconnected);
        assert_eq!(block_on(rx.recv()), Ok(frame(0)));
        assert_eq!(block_on(rx.recv()), Err(Cutoff::Closed));

        let (tx, mut rx) = subscriber_queue(4);
        assert_eq!(tx.push(frame(0)), PushOutcome::Queued);
        drop(tx);
        assert_eq!(block_on(rx.recv()), Ok(frame(0)));
        assert_eq!(block_on(rx.recv()), Err(Cutoff::Closed));

        let (tx, rx) = subscriber_queue(4);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.push(frame(0)), PushOutcome::Disconnected);
    }

    #[test]
    fn frames_wake_a_receiver_on_another_thread() {
        // A receiver sleeping on another thread is woken by each push and by the close.
        const FRAMES: u32 = 10_000;
        let (tx, mut rx) = subscriber_queue(SUBSCRIBER_CAPACITY_MAX_FRAMES);
        let consumer = thread::spawn(move || {
            block_on(async {
                let mut got = Vec::new();
                let cutoff = loop {
                    match rx.recv_batch(&mut got, 32).await {
                        Ok(_) => continue,
                        Err(cutoff) => break cutoff,
                    }
                };
                (got, cutoff)
            })
        });
        for i in 0..FRAMES {
            assert_eq!(tx.push(frame(i)), PushOutcome::Queued);
        }
        tx.close(Cutoff::Closed);
        let (got, cutoff) = consumer.join().unwrap();
        assert_eq!(cutoff, Cutoff::Closed);
        assert_eq!(got, (0..FRAMES).map(frame).collect::<Vec<_>>());
    }

    #[test]
    fn frames_wake_a_glommio_receiver_from_a_std_thread() {
        // A subscriber reading in a glommio executor is woken by pushes and by the close
        // from a shard on a plain thread.
        const FRAMES: u32 = 64;
        let (tx, mut rx) = subscriber_queue(FRAMES as usize);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let consumer = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                started_tx.send(()).unwrap();
                let mut got = Vec::new();
                let cutoff = loop {
                    match rx.recv().await {
                        Ok(frame) => got.push(frame),
                        Err(cutoff) => break cutoff,
                    }
                };
                (got, cutoff)
            })
            .unwrap();
        let producer = thread::spawn(move || {
            // Push only once the consumer runs, so that it waits on an empty queue.
            started_rx.recv().unwrap();
            for i in 0..FRAMES {
                assert_eq!(tx.push(frame(i)), PushOutcome::Queued);
            }
            tx.close(Cutoff::Closed);
        });
        producer.join().unwrap();
        let (got, cutoff) = consumer.join().unwrap();
        assert_eq!(got, (0..FRAMES).map(frame).collect::<Vec<_>>());
        assert_eq!(cutoff, Cutoff::Closed);
    }
}

//! An in-memory connection: a bounded queue in each direction between a simulated client
//! and its session driver, standing in for a socket and its buffers.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// One direction of a connection. Clones share it.
pub struct Pipe<T> {
    state: Rc<RefCell<State<T>>>,
}

impl<T> Clone for Pipe<T> {
    fn clone(&self) -> Self {
        Pipe {
            state: self.state.clone(),
        }
    }
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    /// The writing side closed: once empty, the reader sees the end.
    write_closed: bool,
    /// The reading side went away: writes are dropped.
    read_closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl<T> Pipe<T> {
    /// A pipe that holds `capacity` items before its writer must wait.
    pub fn new(capacity: usize) -> Pipe<T> {
        Pipe {
            state: Rc::new(RefCell::new(State {
                items: VecDeque::new(),
                capacity,
                write_closed: false,
                read_closed: false,
                reader: None,
                writer: None,
            })),
        }
    }

    /// Whether a write would be taken now; registers the writer's waker when not.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.borrow_mut();
        if s.read_closed || s.items.len() < s.capacity {
            Poll::Ready(())
        } else {
            s.writer = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Whether a write would be taken now.
    pub fn has_room(&self) -> bool {
        let s = self.state.borrow();
        s.read_closed || s.items.len() < s.capacity
    }

    /// Writes an item, even past the capacity (the caller checked for room, or it is the
    /// one last item: a close). Dropped if the reader is gone.
    pub fn push(&self, item: T) {
        let mut s = self.state.borrow_mut();
        if s.read_closed || s.write_closed {
            return;
        }
        s.items.push_back(item);
        if let Some(w) = s.reader.take() {
            w.wake();
        }
    }

    /// The writer is done.
    pub fn close_write(&self) {
        let mut s = self.state.borrow_mut();
        s.write_closed = true;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
    }

    /// The reader is gone.
    pub fn close_read(&self) {
        let mut s = self.state.borrow_mut();
        s.read_closed = true;
        s.items.clear();
        if let Some(w) = s.writer.take() {
            w.wake();
        }
    }

    /// The next item: `Ready(None)` once the writer closed and everything was read.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.state.borrow_mut();
        if let Some(item) = s.items.pop_front() {
            if let Some(w) = s.writer.take() {
                w.wake();
            }
            return Poll::Ready(Some(item));
        }
        if s.write_closed {
            return Poll::Ready(None);
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once an item can be read or the writer closed; reads nothing.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.borrow_mut();
        if !s.items.is_empty() || s.write_closed {
            return Poll::Ready(());
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Waits until an item can be read or the writer closed.
    pub async fn readable(&self) {
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    /// Whether the writer closed and every item was read.
    pub fn is_finished(&self) -> bool {
        let s = self.state.borrow();
        s.items.is_empty() && s.write_closed
    }

    /// The next item if one is there: `Some(None)` once the writer closed.
    pub fn try_next(&self) -> Option<Option<T>> {
        let mut s = self.state.borrow_mut();
        if let Some(item) = s.items.pop_front() {
            if let Some(w) = s.writer.take() {
                w.wake();
            }
            return Some(Some(item));
        }
        s.write_closed.then_some(None)
    }
}

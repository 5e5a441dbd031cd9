//! The request body handlers read, and what becomes of the part they leave unread.
//!
//! A handler may answer before reading the body: a 401 before a large upload, a 404 on a
//! POST. If the connection then closed, the client would find out only on its next
//! request over it (a broken pipe, or an unexpected EOF), and a client that sends the head
//! before the body would see its body refused mid-write. So every handler reads a
//! [`ReqBody`], which hands what it has not read back to the connection when dropped; the
//! connection then reads and drops the rest (at most [`LEFTOVER_BYTES_MAX`] bytes, within
//! the header deadline) before the answer goes out, and keeps the connection. A body
//! larger than that, or one that does not arrive in time, gets the answer with
//! `Connection: close`, so the client knows not to reuse the connection.

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// The most bytes of a body left unread by its handler that the connection reads and
/// drops to keep the connection open.
pub const LEFTOVER_BYTES_MAX: u64 = 256 * 1024;

/// A request body as the handlers see it.
pub struct ReqBody {
    inner: Option<Incoming>,
    leftover: Arc<Mutex<Option<Incoming>>>,
}

/// Where a dropped [`ReqBody`] leaves what it did not read. (A mutex, not a `RefCell`:
/// the multipart reader of uploads wants a `Send` stream.)
#[derive(Default)]
pub struct Leftover(Arc<Mutex<Option<Incoming>>>);

impl Leftover {
    /// Wraps `body` for a handler; what it leaves unread comes back here.
    pub fn wrap(&self, body: Incoming) -> ReqBody {
        ReqBody {
            inner: Some(body),
            leftover: self.0.clone(),
        }
    }

    /// Reads what the handler left of the body, if little enough and in time: true when
    /// the connection can carry another request.
    pub async fn finish(&self, deadline: Instant) -> bool {
        let Some(mut body) = self.0.lock().expect("never poisoned").take() else {
            return true;
        };
        if body.size_hint().lower() > LEFTOVER_BYTES_MAX {
            return false;
        }
        let read = crate::conn::until(deadline, read_at_most(&mut body, LEFTOVER_BYTES_MAX));
        read.await.unwrap_or(false)
    }
}

/// Reads and drops up to `max` bytes of `body`: true when it ended within them, false when
/// it is longer or failed.
pub async fn read_at_most<B>(body: &mut B, max: u64) -> bool
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut left = max;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        if n > left {
            return false;
        }
        left -= n;
    }
    true
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for ReqBody {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take() {
            if !body.is_end_stream() {
                *self.leftover.lock().expect("never poisoned") = Some(body);
            }
        }
    }
}

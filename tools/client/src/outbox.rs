//! Requests waiting for their answer: which to write next, which to write again after a
//! reconnection, and which to give up on. Pure: the caller passes the time and does the
//! writing, so the rules are tested without sockets.
//!
//! Every request gets a `ref` that is never reused by the stream, so an answer can never be
//! taken for another request's. At most [`REQUESTS_ON_WIRE_MAX`] requests are written and
//! unanswered at once; the server runs a connection's requests one at a time anyway, and
//! the bound keeps what a reconnection writes again small. A request that is safe to repeat
//! (a send, through its `client_msg_id`) survives a lost connection and is written again on
//! the next one, in the original order; one that is not (an edit, a deletion, a reaction)
//! fails with [`crate::Error::Interrupted`] if it was written and not answered.

use crate::frames::Request;
use std::collections::BTreeMap;
use std::time::Instant;

/// Requests written to the connection and not yet answered, at most.
pub const REQUESTS_ON_WIRE_MAX: usize = 64;

struct Entry<R> {
    request: Request,
    on_wire: bool,
    /// Whether it was ever written, on this connection or an earlier one.
    written: bool,
    reply: R,
}

/// The requests of one stream that have no answer yet; `R` is how the answer reaches the
/// caller.
pub(crate) struct Outbox<R> {
    entries: BTreeMap<u64, Entry<R>>,
    next_ref: u64,
    on_wire: usize,
    /// After a `rate_limited` answer, nothing is written before this.
    paused_until: Option<Instant>,
}

impl<R> Outbox<R> {
    pub fn new() -> Outbox<R> {
        Outbox {
            entries: BTreeMap::new(),
            next_ref: 1,
            on_wire: 0,
            paused_until: None,
        }
    }

    /// Adds a request; returns its `ref`.
    pub fn push(&mut self, request: Request, reply: R) -> u64 {
        let reference = self.next_ref;
        self.next_ref += 1;
        let entry = Entry {
            request,
            on_wire: false,
            written: false,
            reply,
        };
        self.entries.insert(reference, entry);
        reference
    }

    /// The next request to write, oldest first, as its frame, and whether it was written
    /// before; `None` when every request is written, the bound is reached, or writing is
    /// paused.
    pub fn next_to_write(&mut self, now: Instant) -> Option<(String, bool)> {
        if self.paused_until.is_some_and(|t| now < t) {
            return None;
        }
        self.paused_until = None;
        if self.on_wire >= REQUESTS_ON_WIRE_MAX {
            return None;
        }
        let (reference, entry) = self.entries.iter_mut().find(|(_, e)| !e.on_wire)?;
        entry.on_wire = true;
        self.on_wire += 1;
        let rewrite = std::mem::replace(&mut entry.written, true);
        Some((entry.request.frame(*reference), rewrite))
    }

    /// Takes the request that an answer with this `ref` is for.
    pub fn answered(&mut self, reference: u64) -> Option<(Request, R)> {
        let entry = self.entries.remove(&reference)?;
        if entry.on_wire {
            self.on_wire -= 1;
        }
        Some((entry.request, entry.reply))
    }

    /// The server refused the request for now (rate limited): write it again, and nothing
    /// else, after `until`. Returns whether the request was waiting.
    pub fn retry_after(&mut self, reference: u64, until: Instant) -> bool {
        let Some(entry) = self.entries.get_mut(&reference) else {
            return false;
        };
        if entry.on_wire {
            entry.on_wire = false;
            self.on_wire -= 1;
        }
        self.paused_until = Some(self.paused_until.map_or(until, |t| t.max(until)));
        true
    }

    /// When writing may go on after a rate limit.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// The connection was lost: requests that are safe to repeat will be written again on
    /// the next one; the others that were written are taken out and returned, to fail.
    pub fn disconnected(&mut self) -> Vec<R> {
        let lost: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.on_wire && !e.request.repeatable())
            .map(|(r, _)| *r)
            .collect();
        for entry in self.entries.values_mut() {
            entry.on_wire = false;
        }
        self.on_wire = 0;
        lost.into_iter()
            .filter_map(|r| self.entries.remove(&r))
            .map(|e| e.reply)
            .collect()
    }

    /// Takes every request out, to fail them all.
    pub fn drain(&mut self) -> Vec<R> {
        self.on_wire = 0;
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|e| e.reply)
            .collect()
    }

    /// Whether every request has its answer.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests without an answer.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::Content;
    use std::time::Duration;

    fn send(id: &str) -> Request {
        Request::Send {
            channel_id: "C1".into(),
            content: Content::Text(id.into()),
            client_msg_id: id.into(),
            thread_id: None,
        }
    }

    fn edit() -> Request {
        Request::Edit {
            channel_id: "C1".into(),
            message_id: "M1-1".into(),
            content: Content::Text("x".into()),
        }
    }

    fn ref_in((frame, _): &(String, bool)) -> u64 {
        let v: serde_json::Value = serde_json::from_str(frame).unwrap();
        v["ref"].as_u64().unwrap()
    }

    // After a lost connection, sends are written again in their first order with their
    // first refs, an unanswered edit fails, and an edit never written is kept.
    #[test]
    fn reconnection_repeats_only_what_is_safe() {
        let now = Instant::now();
        let mut o = Outbox::new();
        let a = o.push(send("a"), "a");
        let e = o.push(edit(), "e");
        let b = o.push(send("b"), "b");
        assert_eq!(ref_in(&o.next_to_write(now).unwrap()), a);
        assert_eq!(ref_in(&o.next_to_write(now).unwrap()), e);
        let late = o.push(edit(), "late");
        assert_eq!(o.disconnected(), vec!["e"]);
        let again: Vec<(u64, bool)> = std::iter::from_fn(|| o.next_to_write(now))
            .map(|f| (ref_in(&f), f.1))
            .collect();
        assert_eq!(again, vec![(a, true), (b, false), (late, false)]);
        assert_eq!(o.answered(b).map(|(_, r)| r), Some("b"));
        assert_eq!(o.answered(b).map(|(_, r)| r), None, "an answer counts once");
        assert_eq!(o.len(), 2);
        assert_eq!(o.drain(), vec!["a", "late"]);
    }

    // No more than the bound is written unanswered; an answer makes room.
    #[test]
    fn requests_on_the_wire_are_bounded() {
        let now = Instant::now();
        let mut o = Outbox::new();
        let refs: Vec<u64> = (0..REQUESTS_ON_WIRE_MAX + 5)
            .map(|i| o.push(send(&i.to_string()), ()))
            .collect();
        let written = std::iter::from_fn(|| o.next_to_write(now)).count();
        assert_eq!(written, REQUESTS_ON_WIRE_MAX);
        o.answered(refs[0]);
        assert_eq!(
            ref_in(&o.next_to_write(now).unwrap()),
            refs[REQUESTS_ON_WIRE_MAX]
        );
        assert!(o.next_to_write(now).is_none());
    }

    // A rate-limited request is written again first, and nothing is written before the
    // pause ends.
    #[test]
    fn rate_limit_pauses_writing() {
        let now = Instant::now();
        let mut o = Outbox::new();
        let a = o.push(send("a"), ());
        let b = o.push(send("b"), ());
        o.next_to_write(now);
        o.next_to_write(now);
        let until = now + Duration::from_millis(50);
        assert!(o.retry_after(a, until));
        assert!(o.next_to_write(now).is_none());
        assert_eq!(o.paused_until(), Some(until));
        assert_eq!(ref_in(&o.next_to_write(until).unwrap()), a);
        assert!(o.next_to_write(until).is_none(), "b is still on the wire");
        o.answered(b);
        assert!(!o.retry_after(b, until));
    }
}

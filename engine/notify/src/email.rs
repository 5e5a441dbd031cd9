//! The email sender: on a thread of its own with a tokio current-thread runtime (never a
//! shard's), it sends one digest per closed window of the outbox's email items, through
//! SMTP (`lettre`, TLS by rustls) to the account's email (`API.md` §13).
//!
//! - **Windows.** Email items are grouped by their key, `(user, window)`. A window is sent
//!   [`SEND_GRACE`] after it closes, so that a message the decider put in it just before
//!   it closed is in the outbox by then. A message that still arrives after its window was
//!   sent goes out in a digest of its own: an extra email rather than a lost one.
//! - **Checked again before each attempt.** Each message is read as the recipient sees it
//!   now: read (their marker at or past it), deleted, or no longer theirs to read → left
//!   out; edited → the current text. Email switched off since (`email_digest_s` 0), or a
//!   channel muted or set to level `none` since → left out too (any other change of
//!   preferences applies from the next message on). If nothing is left, nothing is sent.
//! - **Retry.** A connection error or a transient SMTP answer (4xx) is retried after
//!   [`crate::sender::backoff`], for as long as it takes; a permanent answer (5xx) gives
//!   the digest up, with a warning.
//! - **Cursor.** When a window is answered (sent, left empty, or given up), its items are
//!   answered, and the offset before which every email item is answered is stored with
//!   the items answered after it ([`Outbox::store_emailed`]). A crash after a digest went
//!   out and before that store sends it again: the only way a digest repeats.

use crate::outbox::{EmailItem, Outbox, Pending, Progress};
use crate::sender::backoff;
use chorus_engine::domain::notify::{rules, Level};
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use chorus_engine::view::MessageView;
use chorus_engine::{Engine, EngineError};
use futures::channel::oneshot;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most digests being gathered or sent at once.
pub const IN_FLIGHT: usize = 4;
/// How long after its window closes a digest is sent.
pub const SEND_GRACE: Duration = Duration::from_millis(500);
/// How long one SMTP exchange may take before it counts as a connection error.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most messages listed in one digest; the rest are counted in a closing line.
pub const DIGEST_MESSAGES_MAX: usize = 100;
/// Longest message text quoted in a digest, in characters; longer texts are cut with "…".
pub const TEXT_CHARS_MAX: usize = 500;
/// Read state is asked in pages of this many channels.
const UNREADS_PAGE: usize = 500;

/// Where digests go from, and where their links point.
#[derive(Clone, Debug)]
pub struct EmailConfig {
    /// The SMTP server, for example `smtp://127.0.0.1:2525` or `smtps://user:pw@host`.
    pub smtp_url: String,
    /// The sender's address, for example `Chorus <chorus@example.com>`.
    pub from: String,
    /// The base URL of links to messages.
    pub public_url: String,
}

/// A digest window: `(user, opened)`.
type Key = (u64, u64);

/// One message as listed in a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The author's display name.
    pub author: String,
    /// The message's text as it is now.
    pub text: String,
    /// Where the message opens.
    pub link: String,
}

/// One channel's messages in a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The channel's name, or "Direct messages" for a DM.
    pub title: String,
    /// Its unread messages of the window, oldest first.
    pub lines: Vec<Line>,
}

/// What one digest lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// The channels, in the order their first listed message was posted.
    pub sections: Vec<Section>,
    /// Unread messages of the window beyond [`DIGEST_MESSAGES_MAX`], not listed.
    pub more: usize,
}

/// A digest's subject, text part and HTML part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Composed {
    /// The subject line.
    pub subject: String,
    /// The `text/plain` part.
    pub text: String,
    /// The `text/html` part.
    pub html: String,
}

/// Starts the email sender on a thread of its own; it stops when `stop` fires or its
/// sender is dropped (windows not answered yet are sent after the next start).
pub fn spawn(
    engine: Engine,
    config: EmailConfig,
    outbox: Arc<Outbox>,
    emailed: u64,
    sent_total: Arc<AtomicU64>,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
    };
    let from: Mailbox = config.from.parse().map_err(|e| {
        invalid(
            "email_from (an address, like `Chorus <chorus@example.com>`)",
            &e,
        )
    })?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&config.smtp_url)
        .map_err(|e| invalid("smtp_url", &e))?
        .timeout(Some(SMTP_TIMEOUT))
        .build();
    let public_url = config.public_url.trim_end_matches('/').to_owned();
    crate::on_own_thread("notify-email", move || {
        let sender = Sender {
            engine,
            transport,
            from,
            public_url,
            sent_total,
        };
        sender.run(outbox, emailed, stop)
    })
}

#[derive(Clone)]
struct Sender {
    engine: Engine,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    public_url: String,
    sent_total: Arc<AtomicU64>,
}

/// A window's items, waiting for it to close.
struct Waiting {
    closes: u64,
    items: Vec<Pending<EmailItem>>,
    sending: bool,
}

/// Answers the first `sent` items of a window (those its digest was gathered from) and
/// answers their offsets. Items that arrived while it was being sent stay, due at once:
/// they go out in a digest of their own.
fn answer(windows: &mut BTreeMap<Key, Waiting>, key: Key, sent: usize) -> Vec<Pending<EmailItem>> {
    let Some(mut w) = windows.remove(&key) else {
        return Vec::new();
    };
    let late = w.items.split_off(sent.min(w.items.len()));
    if !late.is_empty() {
        windows.insert(
            key,
            Waiting {
                closes: w.closes,
                items: late,
                sending: false,
            },
        );
    }
    w.items
}

/// Takes out of the windows not being sent the items the sending node answered (a
/// window left empty goes too); only the windows in `only`, if given.
fn answered_elsewhere(
    gate: &crate::cluster::Gate,
    windows: &mut BTreeMap<Key, Waiting>,
    only: Option<&BTreeSet<Key>>,
) -> Vec<Pending<EmailItem>> {
    let mut elsewhere = Vec::new();
    gate.with_heard(|heard| {
        windows.retain(|key, w| {
            if w.sending || only.is_some_and(|o| !o.contains(key)) {
                return true;
            }
            let (covered, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut w.items)
                .into_iter()
                .partition(|p| heard.covers_email(&p.item));
            elsewhere.extend(covered);
            w.items = kept;
            !w.items.is_empty()
        });
    });
    elsewhere
}

/// Counts `items` answered, and stores the cursor after them.
fn settle(outbox: &Outbox, items: Vec<Pending<EmailItem>>, progress: &mut Progress) {
    outbox.answered(items.len() as u64);
    if let Some(gate) = outbox.gate() {
        gate.answered_emails(items.iter().map(|p| &p.item));
    }
    let (cursor, answered) = progress.answered(items.iter().map(|p| p.at));
    if let Err(e) = outbox.store_emailed(cursor, answered) {
        tracing::error!(error = %e, "notify email: cursor not stored");
    }
}

/// The wall clock in Unix ms, the clock the decider opens windows by.
fn now_ms() -> u64 {
    jiff::Timestamp::now().as_millisecond().max(0) as u64
}

impl Sender {
    async fn run(self, outbox: Arc<Outbox>, emailed: u64, mut stop: oneshot::Receiver<()>) {
        let mut windows: BTreeMap<Key, Waiting> = BTreeMap::new();
        let mut progress = Progress::new(emailed);
        let mut tasks = tokio::task::JoinSet::new();
        let gate = outbox.gate().cloned();
        let mut changes = gate.as_ref().map(|g| g.subscribe());
        // Whether what the sending node answered changed since the items were looked at
        // (at the start, what was heard before this sender ran).
        let mut changed = true;
        loop {
            let mut fresh = BTreeSet::new();
            for p in outbox.take_emails() {
                progress.took(p.at, p.end);
                let key = (p.item.user, p.item.window);
                fresh.insert(key);
                let w = windows.entry(key).or_insert(Waiting {
                    closes: p.item.closes,
                    items: Vec::new(),
                    sending: false,
                });
                w.items.push(p);
            }
            // On a cluster, what the sending node answered is answered here unsent: in the
            // windows just added to, or in all when what it answered has changed.
            if let Some(gate) = &gate {
                let only = (!std::mem::take(&mut changed)).then_some(&fresh);
                let elsewhere = answered_elsewhere(gate, &mut windows, only);
                if !elsewhere.is_empty() {
                    let n = elsewhere.len() as u64;
                    outbox
                        .stats
                        .answered_elsewhere
                        .fetch_add(n, Ordering::Relaxed);
                    settle(&outbox, elsewhere, &mut progress);
                }
            }
            let sending = gate.as_ref().is_none_or(|g| g.sending());
            let grace = SEND_GRACE.as_millis() as u64;
            let now = now_ms();
            for (key, w) in windows.iter_mut() {
                if !sending || tasks.len() >= IN_FLIGHT {
                    break;
                }
                if !w.sending && w.closes + grace <= now {
                    w.sending = true;
                    let items: Vec<EmailItem> = w.items.iter().map(|p| p.item.clone()).collect();
                    let sender = self.clone();
                    let key = *key;
                    tasks.spawn_local(async move {
                        sender.send(key.0, &items).await;
                        (key, items.len())
                    });
                }
            }
            let next_due = windows
                .values()
                .filter(|w| sending && !w.sending)
                .map(|w| w.closes + grace)
                .min();
            let wait = Duration::from_millis(next_due.map_or(0, |d| d.saturating_sub(now)));
            let change = crate::cluster::next_change(&mut changes);
            tokio::select! {
                _ = outbox.emails_appended.notified() => {}
                _ = change => changed = true,
                _ = tokio::time::sleep(wait), if next_due.is_some() && tasks.len() < IN_FLIGHT => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let mut finished: Vec<(Key, usize)> = done.into_iter().collect();
                    while let Some(Ok(key)) = tasks.try_join_next() {
                        finished.push(key);
                    }
                    let mut items = Vec::new();
                    for (key, sent) in finished {
                        items.extend(answer(&mut windows, key, sent));
                    }
                    settle(&outbox, items, &mut progress);
                }
                _ = &mut stop => return,
            }
        }
    }

    /// Sends one window's digest until the SMTP server takes it, gives it up, or nothing
    /// in it is left unread.
    async fn send(&self, user: u64, items: &[EmailItem]) {
        let mut failures = 0;
        loop {
            match self.attempt(UserId(user), items).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, failures, "notify email: digest failed"),
            }
            tokio::time::sleep(backoff(failures)).await;
            failures += 1;
        }
    }

    /// One attempt: gathers the digest as it is now and hands it to the SMTP server. `Ok`
    /// when answered for good (sent, nothing to send, or refused for good).
    async fn attempt(&self, user: UserId, items: &[EmailItem]) -> Result<(), String> {
        let (to, digest) = match self.gather(user, items).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                tracing::debug!(user = user.0, "notify email: nothing unread; no digest");
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        let to: Mailbox = match to.parse() {
            Ok(to) => to,
            Err(e) => {
                tracing::warn!(error = %e, user = user.0, "notify email: no usable address");
                return Ok(());
            }
        };
        let composed = compose(&digest);
        let email = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(composed.subject)
            .multipart(MultiPart::alternative_plain_html(
                composed.text,
                composed.html,
            ))
            .map_err(|e| e.to_string())?;
        match self.transport.send(email).await {
            Ok(_) => {
                self.sent_total.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(error = %e, user = user.0, "notify email: refused; given up");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The recipient's address and the digest of the items still unread, or `None` when
    /// nothing is left (or the user is gone).
    async fn gather(
        &self,
        user: UserId,
        items: &[EmailItem],
    ) -> Result<Option<(String, Digest)>, EngineError> {
        let (me, _) = match self.engine.me(user).await {
            Ok(me) => me,
            Err(EngineError::Domain(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let prefs = match self.engine.notify_prefs(user).await {
            Ok(p) => p,
            Err(EngineError::Domain(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if prefs.email_digest_s == 0 {
            return Ok(None);
        }
        let workspaces: BTreeSet<u64> = items.iter().map(|i| i.workspace).collect();
        let mut read = HashMap::new();
        for w in workspaces {
            self.read_markers(user, WorkspaceId(w), &mut read).await?;
        }
        // Each channel's messages in seq order; the decider appends the channels' items
        // in the order it happens to read their partitions.
        let mut items: Vec<&EmailItem> = items.iter().collect();
        items.sort_by_key(|i| (i.channel, i.seq));
        items.dedup_by_key(|i| (i.channel, i.seq));
        // (channel, when its first listed message was posted, its section)
        let mut sections: Vec<(u64, u64, Section)> = Vec::new();
        let mut wanted: HashMap<ChannelId, bool> = HashMap::new();
        let mut listed = 0;
        let mut more = 0;
        for item in items {
            let channel = ChannelId(item.channel);
            // No marker: no longer a member, so no longer theirs to read.
            if read.get(&channel).is_none_or(|r| *r >= item.seq) {
                continue;
            }
            let still = match wanted.get(&channel) {
                Some(still) => *still,
                None => {
                    let still = self.still_wanted(user, channel, prefs.email).await?;
                    *wanted.entry(channel).or_insert(still)
                }
            };
            if !still {
                continue;
            }
            let Some(message) = self.current(user, channel, item.seq).await? else {
                continue;
            };
            if listed == DIGEST_MESSAGES_MAX {
                more += 1;
                continue;
            }
            listed += 1;
            let line = Line {
                author: item.author_name.clone(),
                text: message.text,
                link: self.link(channel, item.seq),
            };
            match sections.iter_mut().find(|(c, _, _)| *c == item.channel) {
                Some((_, _, s)) => s.lines.push(line),
                None => sections.push((item.channel, message.created_at, section(item, line))),
            }
        }
        if listed == 0 {
            return Ok(None);
        }
        sections.sort_by_key(|(c, posted, _)| (*posted, *c));
        let sections = sections.into_iter().map(|(_, _, s)| s).collect();
        Ok(Some((me.email, Digest { sections, more })))
    }

    /// Whether the user still wants email from this channel: not muted, and an email
    /// level (the channel's, else `email`) other than `none`. A channel switched off while
    /// the window was open drops out of its digest.
    async fn still_wanted(
        &self,
        user: UserId,
        channel: ChannelId,
        email: Level,
    ) -> Result<bool, EngineError> {
        match self.engine.channel_notify_prefs(user, channel).await {
            Ok(v) => Ok(!v.prefs.muted && rules::level(v.prefs, email) != Level::None),
            Err(EngineError::Domain(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The user's read marker of each of their channels in a workspace.
    async fn read_markers(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        read: &mut HashMap<ChannelId, u64>,
    ) -> Result<(), EngineError> {
        let mut after = None;
        loop {
            let (reads, next) = match self
                .engine
                .unreads(user, workspace, after, UNREADS_PAGE)
                .await
            {
                Ok(r) => r,
                Err(EngineError::Domain(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            read.extend(reads.iter().map(|r| (r.channel_id, r.read_seq)));
            match next {
                Some(n) => after = Some(n),
                None => return Ok(()),
            }
        }
    }

    /// The message as the user reads it now; `None` when deleted or unreadable.
    async fn current(
        &self,
        user: UserId,
        channel: ChannelId,
        seq: u64,
    ) -> Result<Option<MessageView>, EngineError> {
        match self.engine.message(user, MessageId { channel, seq }).await {
            Ok(m) if m.deleted => Ok(None),
            Ok(m) => Ok(Some(m)),
            Err(EngineError::Domain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A message's link: `{public_url}/channels/{channel ID}/messages/{message ID}`.
    fn link(&self, channel: ChannelId, seq: u64) -> String {
        let id = MessageId { channel, seq };
        format!("{}/channels/{channel}/messages/{id}", self.public_url)
    }
}

/// A new section for the channel of `item`, holding `line`.
fn section(item: &EmailItem, line: Line) -> Section {
    let title = match item.room_name.as_str() {
        "" => "Direct messages".to_owned(),
        name => format!("#{name}"),
    };
    Section {
        title,
        lines: vec![line],
    }
}

/// Cuts a text to [`TEXT_CHARS_MAX`] characters.
fn cut(text: &str) -> String {
    match text.char_indices().nth(TEXT_CHARS_MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The subject, text and HTML of a digest: pure, so the format is tested without SMTP.
pub fn compose(d: &Digest) -> Composed {
    let count = d.sections.iter().map(|s| s.lines.len()).sum::<usize>() + d.more;
    let subject = match count {
        1 => "1 unread message in Chorus".to_owned(),
        n => format!("{n} unread messages in Chorus"),
    };
    let mut text = format!("You have {subject}.\n");
    let mut html = format!("<html><body><p>You have {}.</p>\n", escape(&subject));
    for s in &d.sections {
        let _ = write!(text, "\n{}\n", s.title);
        let _ = writeln!(html, "<h2>{}</h2>\n<ul>", escape(&s.title));
        for l in &s.lines {
            let body = cut(&l.text);
            let _ = write!(text, "- {}: {}\n  {}\n", l.author, body, l.link);
            let _ = writeln!(
                html,
                "<li><b>{}</b>: {} <a href=\"{}\">Open</a></li>",
                escape(&l.author),
                escape(&body),
                escape(&l.link)
            );
        }
        html.push_str("</ul>\n");
    }
    if d.more > 0 {
        let _ = write!(text, "\nand {} more.\n", d.more);
        let _ = writeln!(html, "<p>and {} more.</p>", d.more);
    }
    html.push_str("</body></html>\n");
    Composed {
        subject,
        text,
        html,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(author: &str, text: &str, link: &str) -> Line {
        Line {
            author: author.into(),
            text: text.into(),
            link: link.into(),
        }
    }

    // A digest lists every section in order with each message's author, text and link, in
    // both parts; the HTML part escapes what the users wrote.
    #[test]
    fn compose_lists_sections_in_both_parts() {
        let d = Digest {
            sections: vec![
                Section {
                    title: "#general".into(),
                    lines: vec![
                        line("ann", "hi <b>there</b> & all", "https://c.example/1"),
                        line("bob", "second", "https://c.example/2"),
                    ],
                },
                Section {
                    title: "Direct messages".into(),
                    lines: vec![line("ann", "lunch?", "https://c.example/3")],
                },
            ],
            more: 0,
        };
        let c = compose(&d);
        assert_eq!(c.subject, "3 unread messages in Chorus");
        let general = c.text.find("#general").unwrap();
        let direct = c.text.find("Direct messages").unwrap();
        assert!(general < direct);
        assert!(c
            .text
            .contains("- ann: hi <b>there</b> & all\n  https://c.example/1\n"));
        assert!(c.html.contains("<h2>#general</h2>"));
        assert!(c.html.contains(
            "<b>ann</b>: hi &lt;b&gt;there&lt;/b&gt; &amp; all <a href=\"https://c.example/1\">"
        ));
        assert!(c.html.contains("<a href=\"https://c.example/3\">"));
        assert!(!c.text.contains("more"));
    }

    // A long text is cut at a character boundary, and messages past the listing limit
    // are counted in the subject and a closing line.
    #[test]
    fn compose_bounds_what_it_lists() {
        let long = "é".repeat(TEXT_CHARS_MAX + 10);
        let d = Digest {
            sections: vec![Section {
                title: "#x".into(),
                lines: vec![line("ann", &long, "l")],
            }],
            more: 4,
        };
        let c = compose(&d);
        assert_eq!(c.subject, "5 unread messages in Chorus");
        let cut_text = format!("{}…", "é".repeat(TEXT_CHARS_MAX));
        assert!(c.text.contains(&cut_text));
        assert!(!c.text.contains(&long));
        assert!(c.text.contains("and 4 more."));
        assert!(c.html.contains("<p>and 4 more.</p>"));
    }

    fn waiting(ats: &[u64]) -> Waiting {
        let item = EmailItem {
            user: 1,
            window: 10,
            closes: 20,
            channel: 2,
            seq: 3,
            partition: 0,
            offset: 3,
            workspace: 4,
            author_name: "ann".into(),
            room_name: "general".into(),
        };
        Waiting {
            closes: 20,
            items: ats
                .iter()
                .map(|at| Pending {
                    at: *at,
                    end: at + 1,
                    item: item.clone(),
                })
                .collect(),
            sending: true,
        }
    }

    fn ats(items: Vec<Pending<EmailItem>>) -> Vec<u64> {
        items.iter().map(|p| p.at).collect()
    }

    // A sent window answers the items its digest was gathered from; an item that arrived
    // while it was being sent is kept, due at once, so it is not lost.
    #[test]
    fn answering_a_window_keeps_late_items() {
        let mut windows = BTreeMap::from([((1, 10), waiting(&[5, 9]))]);
        assert_eq!(ats(answer(&mut windows, (1, 10), 2)), vec![5, 9]);
        assert!(windows.is_empty());
        let mut windows = BTreeMap::from([((1, 10), waiting(&[5, 9, 12]))]);
        assert_eq!(ats(answer(&mut windows, (1, 10), 2)), vec![5, 9]);
        let late = &windows[&(1, 10)];
        assert!(!late.sending);
        assert_eq!(
            late.items.iter().map(|p| p.at).collect::<Vec<_>>(),
            vec![12]
        );
    }
}

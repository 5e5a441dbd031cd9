//! Model-based test of the engine's public API.
//!
//! A seeded random sequence of operations by six users across three workspaces with
//! overlapping membership (public and private channels, DMs and group DMs, posts with and
//! without `client_msg_id`, threads, edits, deletions, reactions, membership changes, and
//! every read) runs against a real engine and, step by step, against a plain in-memory model
//! of the rules of `API.md` written here with nothing taken from the engine's code. Every
//! call must get the same decision (the same class of error, or success), every event the
//! same per-channel `seq`, every read the same page, and every subscriber exactly the
//! frames of the channels it is a member of, in order. Halfway through, the engine is shut
//! down and reopened on the same directory, and everything must come back as it was.
//!
//! `CHORUS_MODEL_SEEDS=N` runs seeds 1..=N (default 20); `CHORUS_MODEL_SEED=S` replays seed
//! S alone. A failure prints its seed, the command that replays it, and the last operations.

use chorus_engine::domain::{ChannelKind, DomainError};
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use chorus_engine::view::{ChannelView, MessageView};
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use futures::executor::block_on;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::mpsc;
use std::time::Duration;

/// Users in every run.
const USERS: usize = 6;
/// Workspaces created at the start of every run.
const WORKSPACES: usize = 3;
/// Workspaces the random operations may bring the run to (sentinels come on top).
const WORKSPACES_MAX: usize = 4;
/// Random operations per seed.
const OPS_PER_SEED: usize = 1500;
/// Seeds run by default.
const SEEDS_DEFAULT: u64 = 20;
/// Operations between two full directory checks.
const CHECK_EVERY_OPS: usize = 100;
/// Operations kept for the failure report.
const TRAIL_OPS_MAX: usize = 40;
/// How long a frame may take to arrive before the test fails (a guard, not a timing guess).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest text the API accepts, in bytes (1 MiB).
const TEXT_BYTES_MAX: usize = 1024 * 1024;
/// The longest `client_msg_id`, in bytes.
const CLIENT_MSG_ID_BYTES_MAX: usize = 128;
/// The longest emoji name, in bytes.
const EMOJI_BYTES_MAX: usize = 64;
/// The most users in a group DM, the caller included.
const GROUP_DM_USERS_MAX: usize = 9;
/// The largest page.
const PAGE_LIMIT_MAX: usize = 200;

// ---------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------

/// SplitMix64: tiny, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next_u64() % 100 < p
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// The class of a refusal, as `API.md` maps it to a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    NotFound,
    Forbidden,
    Invalid,
    Conflict,
    TooLarge,
}

use Class::{Conflict, Forbidden, Invalid, NotFound, TooLarge};

fn class_of(e: EngineError) -> Class {
    match e {
        EngineError::Domain(DomainError::NotFound(_)) => NotFound,
        EngineError::Domain(DomainError::Forbidden(_)) => Forbidden,
        EngineError::Domain(DomainError::Invalid(_)) => Invalid,
        EngineError::Domain(DomainError::Conflict(_)) => Conflict,
        EngineError::Domain(DomainError::TooLarge(_)) => TooLarge,
        other => panic!("the engine failed instead of deciding: {other}"),
    }
}

fn classify<T>(r: Result<T, EngineError>) -> Result<T, Class> {
    r.map_err(class_of)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Public,
    Private,
    Dm,
    GroupDm,
}

impl Kind {
    fn api(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::Private => "private",
            Kind::Dm => "dm",
            Kind::GroupDm => "group_dm",
        }
    }

    fn direct(self) -> bool {
        matches!(self, Kind::Dm | Kind::GroupDm)
    }
}

struct MWorkspace {
    id: WorkspaceId,
    owner: usize,
    members: BTreeSet<usize>,
    /// Channel names in use, lowercase.
    names: HashSet<String>,
}

struct MMsg {
    user: usize,
    texts: Vec<String>,
    thread: Option<u64>,
    reply_count: u32,
    reactions: Vec<(String, Vec<usize>)>,
    deleted: bool,
    key: Option<String>,
}

impl MMsg {
    /// What `versions` answers: every text, or nothing once deleted.
    fn versions(&self) -> Vec<String> {
        if self.deleted {
            Vec::new()
        } else {
            self.texts.clone()
        }
    }

    fn text(&self) -> String {
        if self.deleted {
            String::new()
        } else {
            self.texts.last().expect("a message has a text").clone()
        }
    }
}

struct MChannel {
    id: ChannelId,
    ws: usize,
    name: String,
    kind: Kind,
    creator: usize,
    members: BTreeSet<usize>,
    last_seq: u64,
    msgs: BTreeMap<u64, MMsg>,
    top: Vec<u64>,
    replies: HashMap<u64, Vec<u64>>,
    keys: HashMap<(usize, String), u64>,
}

/// A frame a subscriber must receive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    channel: String,
    seq: u64,
    kind: String,
    /// The text of the message the event is about, as it stands after the event.
    text: Option<String>,
}

#[derive(Default)]
struct Model {
    users: Vec<(UserId, String)>,
    workspaces: Vec<MWorkspace>,
    channels: Vec<MChannel>,
    by_id: HashMap<ChannelId, usize>,
    dms: HashMap<(usize, Vec<UserId>), usize>,
    /// Per user, every frame its subscription must receive, in order.
    frames: Vec<Vec<Expected>>,
}

type Page = (Vec<u64>, Option<u64>);

fn check_text(text: &str) -> Result<(), Class> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(TooLarge);
    }
    if text.trim().is_empty() {
        return Err(Invalid);
    }
    Ok(())
}

/// An emoji is a shortcode of `a-z`, `0-9`, `_`, `+` and `-`, or one Unicode emoji. The
/// model generates only ASCII (shortcodes, and text that is not one), so it checks the
/// shortcode form; Unicode emoji are covered by the semantics tests.
fn check_emoji(emoji: &str) -> Result<(), Class> {
    let shortcode = !emoji.is_empty()
        && emoji.len() <= EMOJI_BYTES_MAX
        && emoji
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_+-".contains(&b));
    if shortcode {
        Ok(())
    } else {
        Err(Invalid)
    }
}

fn check_limit(limit: usize) -> Result<(), Class> {
    if limit == 0 || limit > PAGE_LIMIT_MAX {
        Err(Invalid)
    } else {
        Ok(())
    }
}

impl Model {
    fn user(&self, id: UserId) -> Option<usize> {
        self.users.iter().position(|(u, _)| *u == id)
    }

    fn workspace(&self, id: WorkspaceId) -> Option<usize> {
        self.workspaces.iter().position(|w| w.id == id)
    }

    fn is_admin(&self, u: usize, ws: usize) -> bool {
        self.workspaces[ws].owner == u
    }

    /// Records an event in channel `c`: the next seq, and a frame for every member as the
    /// membership stands now (so a joiner sees its own join, a leaver its own leave).
    fn emit(&mut self, c: usize, kind: &str, target: Option<u64>) -> u64 {
        let Model {
            channels, frames, ..
        } = self;
        let ch = &mut channels[c];
        ch.last_seq += 1;
        let text = target.map(|t| ch.msgs[&t].text());
        for &u in &ch.members {
            frames[u].push(Expected {
                channel: ch.id.to_string(),
                seq: ch.last_seq,
                kind: kind.to_owned(),
                text: text.clone(),
            });
        }
        ch.last_seq
    }

    /// The channel, if it exists and `u` is a member of its workspace.
    fn in_workspace(&self, u: usize, cid: ChannelId) -> Result<usize, Class> {
        let c = *self.by_id.get(&cid).ok_or(NotFound)?;
        if self.workspaces[self.channels[c].ws].members.contains(&u) {
            Ok(c)
        } else {
            Err(NotFound)
        }
    }

    /// The channel, if `u` may act in it (a member); otherwise not found, never forbidden.
    fn reach(&self, u: usize, cid: ChannelId) -> Result<usize, Class> {
        let c = self.in_workspace(u, cid)?;
        if self.channels[c].members.contains(&u) {
            Ok(c)
        } else {
            Err(NotFound)
        }
    }

    fn message(&self, c: usize, id: MessageId) -> Result<&MMsg, Class> {
        if id.channel != self.channels[c].id {
            return Err(NotFound);
        }
        self.channels[c].msgs.get(&id.seq).ok_or(NotFound)
    }

    fn live(&self, c: usize, id: MessageId) -> Result<&MMsg, Class> {
        let m = self.message(c, id)?;
        if m.deleted {
            Err(Conflict)
        } else {
            Ok(m)
        }
    }

    fn msg_mut(&mut self, c: usize, seq: u64) -> &mut MMsg {
        self.channels[c].msgs.get_mut(&seq).expect("model message")
    }

    // --- metadata -------------------------------------------------------------------

    fn create_workspace(&self, name: &str) -> Result<String, Class> {
        if name.trim().is_empty() {
            return Err(Invalid);
        }
        Ok(name.trim().to_owned())
    }

    fn apply_workspace(&mut self, owner: usize, id: WorkspaceId) {
        self.workspaces.push(MWorkspace {
            id,
            owner,
            members: BTreeSet::from([owner]),
            names: HashSet::new(),
        });
    }

    /// Adding a member by email: the user index it adds.
    fn add_member(&self, u: usize, ws: WorkspaceId, email: &str) -> Result<(usize, usize), Class> {
        let w = self.workspace(ws).ok_or(NotFound)?;
        if !self.workspaces[w].members.contains(&u) {
            return Err(NotFound);
        }
        if !self.is_admin(u, w) {
            return Err(Forbidden);
        }
        let email = email.trim().to_lowercase();
        if !email.contains('@') {
            return Err(Invalid);
        }
        let target = self
            .users
            .iter()
            .position(|(_, e)| e.to_lowercase() == email)
            .ok_or(NotFound)?;
        if self.workspaces[w].members.contains(&target) {
            return Err(Conflict);
        }
        Ok((w, target))
    }

    fn create_channel(
        &self,
        u: usize,
        ws: WorkspaceId,
        name: &str,
        kind: ChannelKind,
    ) -> Result<(usize, String, Kind), Class> {
        let w = self.workspace(ws).ok_or(NotFound)?;
        if !self.workspaces[w].members.contains(&u) {
            return Err(NotFound);
        }
        let kind = match kind {
            ChannelKind::Public => Kind::Public,
            ChannelKind::Private => Kind::Private,
            _ => return Err(Invalid),
        };
        let name = name.trim();
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(Invalid);
        }
        if self.workspaces[w].names.contains(&name.to_lowercase()) {
            return Err(Conflict);
        }
        Ok((w, name.to_owned(), kind))
    }

    fn new_channel(&mut self, id: ChannelId, ws: usize, name: &str, kind: Kind, creator: usize) {
        assert!(!self.by_id.contains_key(&id), "channel id {id} given twice");
        self.by_id.insert(id, self.channels.len());
        self.channels.push(MChannel {
            id,
            ws,
            name: name.to_owned(),
            kind,
            creator,
            members: BTreeSet::new(),
            last_seq: 0,
            msgs: BTreeMap::new(),
            top: Vec::new(),
            replies: HashMap::new(),
            keys: HashMap::new(),
        });
    }

    fn apply_channel(&mut self, id: ChannelId, ws: usize, name: &str, kind: Kind, creator: usize) {
        self.workspaces[ws].names.insert(name.to_lowercase());
        self.new_channel(id, ws, name, kind, creator);
        let c = self.channels.len() - 1;
        self.channels[c].members.insert(creator);
        self.emit(c, "member:joined", None);
    }

    /// Opening a DM: `Some(channel)` if it exists already, `None` if it will be created.
    #[allow(clippy::type_complexity)]
    fn open_dm(
        &self,
        u: usize,
        ws: WorkspaceId,
        others: &[UserId],
    ) -> Result<(usize, Vec<UserId>, Option<usize>), Class> {
        let w = self.workspace(ws).ok_or(NotFound)?;
        if !self.workspaces[w].members.contains(&u) {
            return Err(NotFound);
        }
        let mut set: Vec<UserId> = others.to_vec();
        set.push(self.users[u].0);
        set.sort_unstable();
        set.dedup();
        if set.len() > GROUP_DM_USERS_MAX {
            return Err(Invalid);
        }
        let all_members = set.iter().all(|id| {
            self.user(*id)
                .is_some_and(|i| self.workspaces[w].members.contains(&i))
        });
        if !all_members {
            return Err(NotFound);
        }
        let existing = self.dms.get(&(w, set.clone())).copied();
        Ok((w, set, existing))
    }

    fn apply_dm(&mut self, id: ChannelId, ws: usize, set: Vec<UserId>, creator: usize) {
        let kind = if set.len() <= 2 {
            Kind::Dm
        } else {
            Kind::GroupDm
        };
        self.new_channel(id, ws, "", kind, creator);
        let c = self.channels.len() - 1;
        self.dms.insert((ws, set.clone()), c);
        for id in set {
            let u = self.user(id).expect("DM member");
            self.channels[c].members.insert(u);
            self.emit(c, "member:joined", None);
        }
    }

    // --- channel commands (applied to the model when allowed) ------------------------

    fn join(&mut self, u: usize, cid: ChannelId) -> Result<(), Class> {
        let c = self.in_workspace(u, cid)?;
        if self.channels[c].members.contains(&u) {
            return Ok(());
        }
        if self.channels[c].kind != Kind::Public {
            return Err(NotFound);
        }
        self.channels[c].members.insert(u);
        self.emit(c, "member:joined", None);
        Ok(())
    }

    /// Adding a member: the caller must be in the channel, a DM's members are fixed, an
    /// existing member is a no-op, and the target must belong to the workspace.
    fn add_channel_member(
        &mut self,
        u: usize,
        cid: ChannelId,
        target: UserId,
    ) -> Result<(), Class> {
        let c = self.reach(u, cid)?;
        if self.channels[c].kind.direct() {
            return Err(Forbidden);
        }
        let t = self.user(target);
        if t.is_some_and(|t| self.channels[c].members.contains(&t)) {
            return Ok(());
        }
        let t = t
            .filter(|t| self.workspaces[self.channels[c].ws].members.contains(t))
            .ok_or(NotFound)?;
        self.channels[c].members.insert(t);
        self.emit(c, "member:joined", None);
        Ok(())
    }

    fn remove_channel_member(
        &mut self,
        u: usize,
        cid: ChannelId,
        target: UserId,
    ) -> Result<(), Class> {
        let c = self.reach(u, cid)?;
        let ch = &self.channels[c];
        if ch.kind.direct() {
            return Err(Forbidden);
        }
        let allowed = target == self.users[u].0 || ch.creator == u || self.is_admin(u, ch.ws);
        if !allowed {
            return Err(Forbidden);
        }
        let t = self
            .user(target)
            .filter(|t| ch.members.contains(t))
            .ok_or(NotFound)?;
        self.emit(c, "member:left", None);
        self.channels[c].members.remove(&t);
        Ok(())
    }

    /// A post: the message's seq and whether it is new.
    fn post(
        &mut self,
        u: usize,
        cid: ChannelId,
        text: &str,
        key: Option<&str>,
        thread: Option<MessageId>,
    ) -> Result<(usize, u64, bool), Class> {
        let c = self.reach(u, cid)?;
        check_text(text)?;
        if let Some(k) = key {
            if k.is_empty() || k.len() > CLIENT_MSG_ID_BYTES_MAX {
                return Err(Invalid);
            }
            if let Some(seq) = self.channels[c].keys.get(&(u, k.to_owned())) {
                return Ok((c, *seq, false));
            }
        }
        let root = match thread {
            None => None,
            Some(r) => {
                if self.live(c, r)?.thread.is_some() {
                    return Err(Invalid);
                }
                Some(r.seq)
            }
        };
        let ch = &mut self.channels[c];
        let seq = ch.last_seq + 1;
        ch.msgs.insert(
            seq,
            MMsg {
                user: u,
                texts: vec![text.to_owned()],
                thread: root,
                reply_count: 0,
                reactions: Vec::new(),
                deleted: false,
                key: key.map(str::to_owned),
            },
        );
        match root {
            Some(r) => {
                ch.replies.entry(r).or_default().push(seq);
                ch.msgs.get_mut(&r).expect("root").reply_count += 1;
            }
            None => ch.top.push(seq),
        }
        if let Some(k) = key {
            ch.keys.insert((u, k.to_owned()), seq);
        }
        assert_eq!(self.emit(c, "message:new", Some(seq)), seq);
        Ok((c, seq, true))
    }

    fn edit(&mut self, u: usize, id: MessageId, text: &str) -> Result<usize, Class> {
        let c = self.reach(u, id.channel)?;
        check_text(text)?;
        if self.live(c, id)?.user != u {
            return Err(Forbidden);
        }
        self.msg_mut(c, id.seq).texts.push(text.to_owned());
        self.emit(c, "message:edited", Some(id.seq));
        Ok(c)
    }

    fn delete(&mut self, u: usize, id: MessageId) -> Result<(), Class> {
        let c = self.reach(u, id.channel)?;
        let m = self.message(c, id)?;
        let ch = &self.channels[c];
        let allowed = m.user == u || ch.creator == u || self.is_admin(u, ch.ws);
        if !allowed {
            return Err(Forbidden);
        }
        if m.deleted {
            return Ok(());
        }
        let m = self.msg_mut(c, id.seq);
        m.deleted = true;
        m.reactions.clear();
        self.emit(c, "message:deleted", Some(id.seq));
        Ok(())
    }

    fn react(&mut self, u: usize, id: MessageId, emoji: &str, add: bool) -> Result<(), Class> {
        let c = self.reach(u, id.channel)?;
        check_emoji(emoji)?;
        let present = self
            .live(c, id)?
            .reactions
            .iter()
            .any(|(e, users)| e == emoji && users.contains(&u));
        if add == present {
            return Ok(());
        }
        let m = self.msg_mut(c, id.seq);
        if add {
            match m.reactions.iter_mut().find(|(e, _)| e == emoji) {
                Some((_, users)) => users.push(u),
                None => m.reactions.push((emoji.to_owned(), vec![u])),
            }
            self.emit(c, "reaction:added", Some(id.seq));
        } else {
            for (e, users) in m.reactions.iter_mut() {
                if e == emoji {
                    users.retain(|x| *x != u);
                }
            }
            m.reactions.retain(|(_, users)| !users.is_empty());
            self.emit(c, "reaction:removed", Some(id.seq));
        }
        Ok(())
    }

    // --- reads -----------------------------------------------------------------------

    fn history(
        &self,
        u: usize,
        cid: ChannelId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(usize, Page), Class> {
        check_limit(limit)?;
        let c = self.reach(u, cid)?;
        let top = &self.channels[c].top;
        let end = before.map_or(top.len(), |b| top.partition_point(|s| *s < b));
        let start = end.saturating_sub(limit);
        let items = top[start..end].iter().rev().copied().collect();
        Ok((c, (items, (start > 0).then(|| top[start]))))
    }

    fn replies(
        &self,
        u: usize,
        root: MessageId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(usize, Page), Class> {
        check_limit(limit)?;
        let c = self.reach(u, root.channel)?;
        if self.message(c, root)?.thread.is_some() {
            return Err(NotFound);
        }
        let all = self.channels[c]
            .replies
            .get(&root.seq)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let start = after.map_or(0, |a| all.partition_point(|s| *s <= a));
        let end = (start + limit).min(all.len());
        let next = (end < all.len()).then(|| all[end - 1]);
        Ok((c, (all[start..end].to_vec(), next)))
    }

    /// A channel's directory entry: for members, and for any workspace member if public.
    fn lookup(&self, u: usize, cid: ChannelId) -> Result<usize, Class> {
        let c = self.in_workspace(u, cid)?;
        let ch = &self.channels[c];
        if ch.kind == Kind::Public || ch.members.contains(&u) {
            Ok(c)
        } else {
            Err(NotFound)
        }
    }

    fn read_message(&self, u: usize, id: MessageId) -> Result<usize, Class> {
        let c = self.reach(u, id.channel)?;
        self.message(c, id)?;
        Ok(c)
    }

    // --- comparing answers -------------------------------------------------------------

    fn check_message(&self, got: &MessageView, c: usize, seq: u64, ctx: &str) {
        let ch = &self.channels[c];
        let m = &ch.msgs[&seq];
        let mid = |seq| MessageId {
            channel: ch.id,
            seq,
        };
        let reactions: Vec<(String, Vec<UserId>)> = m
            .reactions
            .iter()
            .map(|(e, us)| (e.clone(), us.iter().map(|u| self.users[*u].0).collect()))
            .collect();
        assert_eq!(got.id, mid(seq), "{ctx}: id");
        assert_eq!(got.channel_id, ch.id, "{ctx}: channel_id");
        assert_eq!(got.seq, seq, "{ctx}: seq");
        assert_eq!(got.user_id, self.users[m.user].0, "{ctx}: user_id");
        assert_eq!(got.text, m.text(), "{ctx}: text of {}", got.id);
        assert_eq!(got.thread_id, m.thread.map(mid), "{ctx}: thread_id");
        assert_eq!(got.reply_count, m.reply_count, "{ctx}: reply_count");
        assert_eq!(got.reactions, reactions, "{ctx}: reactions of {}", got.id);
        assert_eq!(got.deleted, m.deleted, "{ctx}: deleted");
        assert_eq!(
            got.edited_at.is_some(),
            m.texts.len() > 1,
            "{ctx}: edited_at"
        );
        assert_eq!(got.client_msg_id, m.key, "{ctx}: client_msg_id");
    }

    fn check_page(&self, got: &chorus_engine::MessagePage, c: usize, want: &Page, ctx: &str) {
        let seqs: Vec<u64> = got.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, want.0, "{ctx}: page seqs");
        assert_eq!(got.next_cursor, want.1, "{ctx}: next_cursor");
        for m in &got.messages {
            self.check_message(m, c, m.seq, ctx);
        }
    }

    fn channel_row(&self, c: usize) -> (ChannelId, String, &'static str, u64) {
        let ch = &self.channels[c];
        (ch.id, ch.name.clone(), ch.kind.api(), ch.last_seq)
    }
}

fn rows(views: &[ChannelView]) -> Vec<(ChannelId, String, &'static str, u64)> {
    views
        .iter()
        .map(|v| (v.id, v.name.clone(), v.kind, v.last_seq))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Subscriptions
// ---------------------------------------------------------------------------------------

/// Moves a subscription to a thread that forwards its frames, so the test can wait for a
/// frame with a timeout. The thread ends when the engine shuts down.
fn forward(mut sub: Subscription) -> mpsc::Receiver<Result<Vec<u8>, String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || loop {
        match block_on(sub.recv()) {
            Ok(frame) => {
                if tx.send(Ok(frame.to_vec())).is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                break;
            }
        }
    });
    rx
}

/// The next frame that is not a `read` frame (a poster's own marker moving: the model is
/// of channel events).
fn next_frame(rx: &mpsc::Receiver<Result<Vec<u8>, String>>, ctx: &str) -> serde_json::Value {
    loop {
        let v: serde_json::Value = match rx.recv_timeout(FRAME_TIMEOUT) {
            Ok(Ok(bytes)) => serde_json::from_slice(&bytes).expect("a frame is JSON"),
            Ok(Err(e)) => panic!("{ctx}: the subscription ended: {e}"),
            Err(_) => panic!("{ctx}: no frame within {FRAME_TIMEOUT:?}"),
        };
        if v["type"] != "read" {
            return v;
        }
    }
}

fn expected_of(frame: &serde_json::Value) -> Expected {
    assert_eq!(frame["type"], "event", "not an event frame: {frame}");
    let message = &frame["event"]["message"];
    Expected {
        channel: frame["channel_id"].as_str().expect("channel_id").to_owned(),
        seq: frame["seq"].as_u64().expect("seq"),
        kind: frame["event"]["type"].as_str().expect("type").to_owned(),
        text: message["text"].as_str().map(str::to_owned),
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

fn open_engine(dir: &std::path::Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    Engine::open(config).expect("open engine")
}

struct Sim {
    seed: u64,
    rng: Rng,
    engine: Engine,
    model: Model,
    frames: Vec<mpsc::Receiver<Result<Vec<u8>, String>>>,
    trail: Vec<String>,
    op: usize,
    /// Outcomes so far: allowed, then refused by class, for the run's summary.
    outcomes: BTreeMap<String, usize>,
    too_large: String,
    // Last, so the directory outlives the engine's use of it.
    dir: tempfile::TempDir,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\nmodel test failed at seed {seed}, operation {op}\nreplay with: \
                 CHORUS_MODEL_SEED={seed} cargo test -p chorus-engine --test model -- \
                 --nocapture\ndata directory: {dir}\nlast operations:",
                seed = self.seed,
                op = self.op,
                dir = self.dir.path().display(),
            );
            for line in &self.trail {
                eprintln!("  {line}");
            }
        }
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(dir.path());
        Sim {
            seed,
            rng: Rng(seed),
            engine,
            model: Model::default(),
            frames: Vec::new(),
            trail: Vec::new(),
            op: 0,
            outcomes: BTreeMap::new(),
            too_large: "x".repeat(TEXT_BYTES_MAX + 1),
            dir,
        }
    }

    /// Whether the model and the engine both allow (true) or both refuse alike (false);
    /// panics on any difference.
    fn same<T, U: std::fmt::Debug>(
        &mut self,
        want: &Result<T, Class>,
        got: &Result<U, Class>,
        ctx: &str,
    ) -> bool {
        let name = ctx.split_whitespace().nth(2).unwrap_or("?");
        let outcome = match got {
            Ok(_) => format!("{name} ok"),
            Err(c) => format!("{name} {c:?}"),
        };
        *self.outcomes.entry(outcome).or_default() += 1;
        match (want, got) {
            (Ok(_), Ok(_)) => true,
            (Err(w), Err(g)) if w == g => false,
            (Ok(_), Err(g)) => panic!("{ctx}: the model allows it, the engine refused: {g:?}"),
            (Err(w), Ok(g)) => {
                panic!("{ctx}: the model refuses ({w:?}), the engine allowed: {g:?}")
            }
            (Err(w), Err(g)) => {
                panic!("{ctx}: the model refuses with {w:?}, the engine with {g:?}")
            }
        }
    }

    fn note(&mut self, line: String) -> String {
        if self.trail.len() == TRAIL_OPS_MAX {
            self.trail.remove(0);
        }
        self.trail.push(line.clone());
        line
    }

    fn uid(&self, u: usize) -> UserId {
        self.model.users[u].0
    }

    /// Six users, each subscribed before anything else happens, and three workspaces whose
    /// owners add each other user with even odds.
    fn setup(&mut self) {
        for u in 0..USERS {
            let email = format!("user{u}@example.com");
            let view = block_on(self.engine.create_user(&email, &format!("User {u}"), "h"))
                .expect("create user");
            self.model.users.push((view.id, email));
            self.model.frames.push(Vec::new());
        }
        for u in 0..USERS {
            let sub = block_on(self.engine.subscribe(self.uid(u))).expect("subscribe");
            self.frames.push(forward(sub));
        }
        for w in 0..WORKSPACES {
            self.create_workspace(w, format!("ws{w}"));
        }
        for w in 0..WORKSPACES {
            let owner = self.model.workspaces[w].owner;
            let ws = self.model.workspaces[w].id;
            for u in 0..USERS {
                if u != owner && self.rng.percent(50) {
                    let email = self.model.users[u].1.clone();
                    self.add_member(owner, ws, email);
                }
            }
        }
    }

    fn step(&mut self) {
        self.op += 1;
        let u = self.rng.below(USERS);
        match self.rng.below(100) {
            0..=21 => self.op_post(u, false),
            22..=31 => self.op_post(u, true),
            32..=39 => self.op_edit(u),
            40..=44 => self.op_delete(u),
            45..=55 => self.op_react(u),
            56..=60 => self.op_join(u),
            61..=64 => self.op_add_channel_member(u),
            65..=68 => self.op_remove_channel_member(u),
            69..=73 => self.op_history(u),
            74..=77 => self.op_replies(u),
            78..=80 => self.op_message(u),
            81..=82 => self.op_versions(u),
            83 => self.op_channel(u),
            84..=88 => self.op_create_channel(u),
            89..=93 => self.op_open_dm(u),
            94..=97 => self.op_add_member(u),
            _ => {
                if self.model.workspaces.len() < WORKSPACES_MAX {
                    let name = if self.rng.percent(20) {
                        "   ".to_owned()
                    } else {
                        format!("extra{}", self.op)
                    };
                    self.create_workspace(u, name);
                }
            }
        }
    }

    // --- choosing targets ------------------------------------------------------------

    fn made_up_channel(&mut self) -> ChannelId {
        if self.rng.percent(20) {
            // A partition number past the engine's.
            ChannelId((7 << 16) | 0x1234)
        } else {
            let n = (1u64 << 30) + self.rng.below(1000) as u64;
            ChannelId((n << 16) | self.rng.below(8) as u64)
        }
    }

    /// Mostly a channel the user is in, sometimes any channel, rarely one that does not
    /// exist.
    fn pick_channel(&mut self, u: usize) -> ChannelId {
        let mine: Vec<ChannelId> = self
            .model
            .channels
            .iter()
            .filter(|c| c.members.contains(&u))
            .map(|c| c.id)
            .collect();
        let r = self.rng.below(100);
        if r < 80 && !mine.is_empty() {
            return mine[self.rng.below(mine.len())];
        }
        if r < 95 && !self.model.channels.is_empty() {
            let c = self.rng.below(self.model.channels.len());
            return self.model.channels[c].id;
        }
        self.made_up_channel()
    }

    fn pick_message(&mut self, u: usize) -> MessageId {
        let channel = self.pick_channel(u);
        let (count, last_seq) = match self.model.by_id.get(&channel) {
            Some(&c) => (
                self.model.channels[c].msgs.len(),
                self.model.channels[c].last_seq,
            ),
            None => (0, 0),
        };
        if count > 0 && self.rng.percent(88) {
            let c = self.model.by_id[&channel];
            let i = self.rng.below(count);
            let seq = *self.model.channels[c].msgs.keys().nth(i).expect("message");
            return MessageId { channel, seq };
        }
        let seq = 1 + self.rng.below(last_seq as usize + 3) as u64;
        MessageId { channel, seq }
    }

    /// Mostly a thread root (a top-level message) of a channel the user is in, else any
    /// message.
    fn pick_root(&mut self, u: usize) -> MessageId {
        let channel = self.pick_channel(u);
        if let Some(&c) = self.model.by_id.get(&channel) {
            let top = &self.model.channels[c].top;
            if !top.is_empty() && self.rng.percent(75) {
                let seq = top[self.rng.below(top.len())];
                return MessageId { channel, seq };
            }
        }
        self.pick_message(u)
    }

    /// Mostly one of the user's own messages (so that edits get through), else any.
    fn pick_own_message(&mut self, u: usize) -> MessageId {
        let own: Vec<MessageId> = self
            .model
            .channels
            .iter()
            .filter(|c| c.members.contains(&u))
            .flat_map(|c| {
                c.msgs
                    .iter()
                    .filter(|(_, m)| m.user == u && !m.deleted)
                    .map(|(seq, _)| MessageId {
                        channel: c.id,
                        seq: *seq,
                    })
            })
            .collect();
        if !own.is_empty() && self.rng.percent(70) {
            return own[self.rng.below(own.len())];
        }
        self.pick_message(u)
    }

    fn pick_user_id(&mut self) -> UserId {
        if self.rng.percent(5) {
            UserId(1 << 40)
        } else {
            let u = self.rng.below(USERS);
            self.uid(u)
        }
    }

    fn pick_workspace(&mut self) -> WorkspaceId {
        if self.rng.percent(5) {
            WorkspaceId(1 << 40)
        } else {
            let w = self.rng.below(self.model.workspaces.len());
            self.model.workspaces[w].id
        }
    }

    fn text(&mut self) -> String {
        match self.rng.below(200) {
            0..=5 => " \t ".to_owned(),
            6 => self.too_large.clone(),
            _ => format!("text {} of seed {} ✓", self.op, self.seed),
        }
    }

    fn emoji(&mut self) -> String {
        const EMOJI: [&str; 5] = ["+1", "tada", "eyes", "heart", "rocket"];
        const NOT_EMOJI: [&str; 3] = ["bad emoji", "<script>", "Tada"];
        if self.rng.percent(4) {
            NOT_EMOJI[self.rng.below(NOT_EMOJI.len())].to_owned()
        } else {
            EMOJI[self.rng.below(EMOJI.len())].to_owned()
        }
    }

    fn limit(&mut self) -> usize {
        match self.rng.below(100) {
            0..=3 => 0,
            4..=7 => PAGE_LIMIT_MAX + 1,
            8 => PAGE_LIMIT_MAX,
            _ => 1 + self.rng.below(8),
        }
    }

    fn cursor(&mut self, channel: ChannelId) -> Option<u64> {
        if self.rng.percent(40) {
            return None;
        }
        let last = self
            .model
            .by_id
            .get(&channel)
            .map_or(5, |c| self.model.channels[*c].last_seq);
        Some(self.rng.below(last as usize + 2) as u64)
    }

    // --- metadata operations -----------------------------------------------------------

    fn create_workspace(&mut self, u: usize, name: String) {
        let ctx = self.note(format!("#{} u{u} create_workspace {name:?}", self.op));
        let want = self.model.create_workspace(&name);
        let got = classify(block_on(self.engine.create_workspace(self.uid(u), &name)));
        if self.same(&want, &got, &ctx) {
            let view = got.expect("ok");
            assert_eq!(view.name, want.expect("ok"), "{ctx}");
            assert!(self.model.workspace(view.id).is_none(), "{ctx}: id reused");
            self.model.apply_workspace(u, view.id);
        }
    }

    fn add_member(&mut self, u: usize, ws: WorkspaceId, email: String) {
        let ctx = self.note(format!("#{} u{u} add_member {ws} {email:?}", self.op));
        let want = self.model.add_member(u, ws, &email);
        let got = classify(block_on(self.engine.add_member(self.uid(u), ws, &email)));
        if self.same(&want, &got, &ctx) {
            let (w, target) = want.expect("ok");
            let view = got.expect("ok");
            assert_eq!(view.id, self.uid(target), "{ctx}");
            assert_eq!(view.role, "member", "{ctx}");
            self.model.workspaces[w].members.insert(target);
        }
    }

    fn op_add_member(&mut self, u: usize) {
        let ws = self.pick_workspace();
        let email = match self.rng.below(100) {
            0..=9 => "nobody@example.com".to_owned(),
            10..=17 => "not-an-email".to_owned(),
            18..=32 => self.model.users[self.rng.below(USERS)].1.to_uppercase(),
            _ => self.model.users[self.rng.below(USERS)].1.clone(),
        };
        self.add_member(u, ws, email);
    }

    fn op_create_channel(&mut self, u: usize) {
        const NAMES: [&str; 7] = ["general", "random", "dev", "Dev", "ops", "design", "eng"];
        let ws = self.pick_workspace();
        let name = match self.rng.below(100) {
            0..=5 => "has space".to_owned(),
            6..=8 => "  ".to_owned(),
            9..=40 => format!("c{}", self.op),
            _ => NAMES[self.rng.below(NAMES.len())].to_owned(),
        };
        let kind = match self.rng.below(100) {
            0..=4 => ChannelKind::Dm,
            5..=54 => ChannelKind::Public,
            _ => ChannelKind::Private,
        };
        self.create_channel(u, ws, name, kind);
    }

    fn create_channel(&mut self, u: usize, ws: WorkspaceId, name: String, kind: ChannelKind) {
        let ctx = self.note(format!(
            "#{} u{u} create_channel {ws} {name:?} {kind:?}",
            self.op
        ));
        let want = self.model.create_channel(u, ws, &name, kind);
        let got = classify(block_on(self.engine.create_channel(
            self.uid(u),
            ws,
            &name,
            kind,
        )));
        if self.same(&want, &got, &ctx) {
            let (w, name, kind) = want.expect("ok");
            let view = got.expect("ok");
            assert_eq!(view.workspace_id, ws, "{ctx}");
            assert_eq!(view.name, name, "{ctx}");
            assert_eq!(view.kind, kind.api(), "{ctx}");
            assert_eq!(view.last_seq, 1, "{ctx}: the creator's join is seq 1");
            self.model.apply_channel(view.id, w, &name, kind, u);
        }
    }

    fn op_open_dm(&mut self, u: usize) {
        let ws = self.pick_workspace();
        let others: Vec<UserId> = (0..self.rng.below(4))
            .map(|_| self.pick_user_id())
            .collect();
        let ctx = self.note(format!("#{} u{u} open_dm {ws} {others:?}", self.op));
        let want = self.model.open_dm(u, ws, &others);
        let got = classify(block_on(self.engine.open_dm(self.uid(u), ws, others)));
        if self.same(&want, &got, &ctx) {
            let (w, set, existing) = want.expect("ok");
            let (view, created) = got.expect("ok");
            assert_eq!(view.workspace_id, ws, "{ctx}");
            match existing {
                Some(c) => {
                    assert!(!created, "{ctx}: the DM of this set exists");
                    assert_eq!(view.id, self.model.channels[c].id, "{ctx}");
                    assert_eq!(view.kind, self.model.channels[c].kind.api(), "{ctx}");
                    assert_eq!(
                        view.last_seq, self.model.channels[c].last_seq,
                        "{ctx}: the existing DM's last seq"
                    );
                }
                None => {
                    assert!(created, "{ctx}: a new DM");
                    let kind = if set.len() <= 2 { "dm" } else { "group_dm" };
                    assert_eq!(view.kind, kind, "{ctx}");
                    assert_eq!(view.name, "", "{ctx}");
                    assert_eq!(
                        view.last_seq,
                        set.len() as u64,
                        "{ctx}: one join per member"
                    );
                    self.model.apply_dm(view.id, w, set, u);
                }
            }
        }
    }

    // --- channel operations ------------------------------------------------------------

    fn op_post(&mut self, u: usize, reply: bool) {
        let (channel, thread) = if reply {
            let root = self.pick_root(u);
            let channel = if self.rng.percent(90) {
                root.channel
            } else {
                self.pick_channel(u)
            };
            (channel, Some(root))
        } else {
            (self.pick_channel(u), None)
        };
        let text = self.text();
        let key = match self.rng.below(100) {
            0..=1 => Some(String::new()),
            2 => Some("k".repeat(CLIENT_MSG_ID_BYTES_MAX + 1)),
            3..=37 => Some(format!("key{}", self.rng.below(6))),
            _ => None,
        };
        let ctx = self.note(format!(
            "#{} u{u} post {channel} text={:?} key={key:?} thread={}",
            self.op,
            &text[..text.len().min(30)],
            thread.map_or("none".to_owned(), |t| t.to_string()),
        ));
        let want = self.model.post(u, channel, &text, key.as_deref(), thread);
        let got = classify(block_on(self.engine.post(
            self.uid(u),
            channel,
            &text,
            key.as_deref(),
            thread,
        )));
        if self.same(&want, &got, &ctx) {
            let (c, seq, created) = want.expect("ok");
            let (view, got_created) = got.expect("ok");
            assert_eq!(got_created, created, "{ctx}: created");
            self.model.check_message(&view, c, seq, &ctx);
        }
    }

    fn op_edit(&mut self, u: usize) {
        let id = self.pick_own_message(u);
        let text = self.text();
        let ctx = self.note(format!(
            "#{} u{u} edit {id} text={:?}",
            self.op,
            &text[..text.len().min(30)]
        ));
        let want = self.model.edit(u, id, &text);
        let got = classify(block_on(self.engine.edit(self.uid(u), id, &text)));
        if self.same(&want, &got, &ctx) {
            self.model
                .check_message(&got.expect("ok"), want.expect("ok"), id.seq, &ctx);
        }
    }

    fn op_delete(&mut self, u: usize) {
        let id = if self.rng.percent(50) {
            self.pick_own_message(u)
        } else {
            self.pick_message(u)
        };
        let ctx = self.note(format!("#{} u{u} delete {id}", self.op));
        let want = self.model.delete(u, id);
        let got = classify(block_on(self.engine.delete(self.uid(u), id)));
        self.same(&want, &got, &ctx);
    }

    fn op_react(&mut self, u: usize) {
        let id = self.pick_message(u);
        let emoji = self.emoji();
        let add = self.rng.percent(65);
        let ctx = self.note(format!("#{} u{u} react {id} {emoji:?} add={add}", self.op));
        let want = self.model.react(u, id, &emoji, add);
        let got = classify(block_on(self.engine.react(self.uid(u), id, &emoji, add)));
        self.same(&want, &got, &ctx);
    }

    fn op_join(&mut self, u: usize) {
        let channel = self.pick_channel(u);
        let ctx = self.note(format!("#{} u{u} join {channel}", self.op));
        let want = self.model.join(u, channel);
        let got = classify(block_on(self.engine.join(self.uid(u), channel)));
        self.same(&want, &got, &ctx);
    }

    fn op_add_channel_member(&mut self, u: usize) {
        let channel = self.pick_channel(u);
        let target = self.pick_user_id();
        let ctx = self.note(format!(
            "#{} u{u} add_channel_member {channel} {target}",
            self.op
        ));
        let want = self.model.add_channel_member(u, channel, target);
        let got = classify(block_on(self.engine.add_channel_member(
            self.uid(u),
            channel,
            target,
        )));
        self.same(&want, &got, &ctx);
    }

    fn op_remove_channel_member(&mut self, u: usize) {
        let channel = self.pick_channel(u);
        let target = if self.rng.percent(50) {
            self.uid(u)
        } else {
            self.pick_user_id()
        };
        let ctx = self.note(format!(
            "#{} u{u} remove_channel_member {channel} {target}",
            self.op
        ));
        let want = self.model.remove_channel_member(u, channel, target);
        let got = classify(block_on(self.engine.remove_channel_member(
            self.uid(u),
            channel,
            target,
        )));
        self.same(&want, &got, &ctx);
    }

    fn op_history(&mut self, u: usize) {
        let channel = self.pick_channel(u);
        let before = self.cursor(channel);
        let limit = self.limit();
        let ctx = self.note(format!(
            "#{} u{u} history {channel} before={before:?} limit={limit}",
            self.op
        ));
        let want = self.model.history(u, channel, before, limit);
        let got = classify(block_on(self.engine.history(
            self.uid(u),
            channel,
            before,
            limit,
        )));
        if self.same(&want, &got, &ctx) {
            let (c, page) = want.expect("ok");
            self.model.check_page(&got.expect("ok"), c, &page, &ctx);
        }
    }

    fn op_replies(&mut self, u: usize) {
        let root = self.pick_root(u);
        let after = self.cursor(root.channel);
        let limit = self.limit();
        let ctx = self.note(format!(
            "#{} u{u} replies {root} after={after:?} limit={limit}",
            self.op
        ));
        let want = self.model.replies(u, root, after, limit);
        let got = classify(block_on(self.engine.replies(
            self.uid(u),
            root,
            after,
            limit,
        )));
        if self.same(&want, &got, &ctx) {
            let (c, page) = want.expect("ok");
            self.model.check_page(&got.expect("ok"), c, &page, &ctx);
        }
    }

    fn op_message(&mut self, u: usize) {
        let id = self.pick_message(u);
        let ctx = self.note(format!("#{} u{u} message {id}", self.op));
        let want = self.model.read_message(u, id);
        let got = classify(block_on(self.engine.message(self.uid(u), id)));
        if self.same(&want, &got, &ctx) {
            self.model
                .check_message(&got.expect("ok"), want.expect("ok"), id.seq, &ctx);
        }
    }

    fn op_channel(&mut self, u: usize) {
        let channel = self.pick_channel(u);
        let ctx = self.note(format!("#{} u{u} channel {channel}", self.op));
        let want = self.model.lookup(u, channel);
        let got = classify(block_on(self.engine.channel(self.uid(u), channel)));
        if self.same(&want, &got, &ctx) {
            let c = want.expect("ok");
            let view = got.expect("ok");
            assert_eq!(rows(&[view]), vec![self.model.channel_row(c)], "{ctx}");
        }
    }

    fn op_versions(&mut self, u: usize) {
        let id = self.pick_message(u);
        let ctx = self.note(format!("#{} u{u} versions {id}", self.op));
        let want = self.model.read_message(u, id);
        let got = classify(block_on(self.engine.versions(self.uid(u), id)));
        if self.same(&want, &got, &ctx) {
            let c = want.expect("ok");
            let texts: Vec<String> = got.expect("ok").into_iter().map(|v| v.text).collect();
            assert_eq!(
                texts,
                self.model.channels[c].msgs[&id.seq].versions(),
                "{ctx}"
            );
        }
    }

    // --- whole-state checks --------------------------------------------------------------

    /// Every user's view of the directory: workspace members, the channels each user can
    /// see in each workspace, and the channels each user is in, with their last seqs.
    fn check_directory(&mut self) {
        let ctx = format!("directory check after operation {}", self.op);
        for u in 0..USERS {
            let uid = self.uid(u);
            for w in 0..self.model.workspaces.len() {
                let ws = &self.model.workspaces[w];
                let members = classify(block_on(self.engine.members(uid, ws.id)));
                let visible = classify(block_on(self.engine.channels(uid, ws.id)));
                if !ws.members.contains(&u) {
                    assert_eq!(members.map(|_| ()), Err(NotFound), "{ctx}: u{u} {}", ws.id);
                    assert_eq!(visible.map(|_| ()), Err(NotFound), "{ctx}: u{u} {}", ws.id);
                    continue;
                }
                let mut want: Vec<(UserId, &str)> = ws
                    .members
                    .iter()
                    .map(|m| {
                        let role = if *m == ws.owner { "owner" } else { "member" };
                        (self.uid(*m), role)
                    })
                    .collect();
                want.sort();
                let got: Vec<(UserId, &str)> = members
                    .expect("members")
                    .iter()
                    .map(|m| (m.id, m.role))
                    .collect();
                assert_eq!(got, want, "{ctx}: members of {} seen by u{u}", ws.id);
                let mut want: Vec<_> = (0..self.model.channels.len())
                    .filter(|c| {
                        let ch = &self.model.channels[*c];
                        ch.ws == w && (ch.kind == Kind::Public || ch.members.contains(&u))
                    })
                    .map(|c| self.model.channel_row(c))
                    .collect();
                want.sort();
                let got = rows(&visible.expect("channels"));
                assert_eq!(got, want, "{ctx}: channels of {} seen by u{u}", ws.id);
            }
            let mut want: Vec<_> = (0..self.model.channels.len())
                .filter(|c| self.model.channels[*c].members.contains(&u))
                .map(|c| self.model.channel_row(c))
                .collect();
            want.sort();
            let got = rows(&block_on(self.engine.user_channels(uid)).expect("user_channels"));
            assert_eq!(got, want, "{ctx}: channels of u{u}");
        }
    }

    /// Reads every channel in full through one of its members: history and every thread,
    /// paged with random limits, and every message and its versions.
    fn check_contents(&mut self) {
        for c in 0..self.model.channels.len() {
            let Some(&reader) = self.model.channels[c].members.iter().next() else {
                continue;
            };
            let cid = self.model.channels[c].id;
            let uid = self.uid(reader);
            let ctx = format!("content check of {cid} by u{reader}");
            let mut cursor = None;
            let mut seen = Vec::new();
            loop {
                let limit = 1 + self.rng.below(9);
                let want = self
                    .model
                    .history(reader, cid, cursor, limit)
                    .expect("model");
                let got = block_on(self.engine.history(uid, cid, cursor, limit)).expect("history");
                self.model.check_page(&got, c, &want.1, &ctx);
                seen.extend(got.messages.iter().map(|m| m.seq));
                match got.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            let mut top = self.model.channels[c].top.clone();
            top.reverse();
            assert_eq!(seen, top, "{ctx}: history pages join up exactly");
            let seqs: Vec<u64> = self.model.channels[c].msgs.keys().copied().collect();
            for seq in seqs {
                let id = MessageId { channel: cid, seq };
                let m = block_on(self.engine.message(uid, id)).expect("message");
                self.model.check_message(&m, c, seq, &ctx);
                let texts: Vec<String> = block_on(self.engine.versions(uid, id))
                    .expect("versions")
                    .into_iter()
                    .map(|v| v.text)
                    .collect();
                assert_eq!(
                    texts,
                    self.model.channels[c].msgs[&seq].versions(),
                    "{ctx}: {id}"
                );
                if self.model.channels[c].msgs[&seq].thread.is_some() {
                    continue;
                }
                let mut after = None;
                let mut replies = Vec::new();
                loop {
                    let limit = 1 + self.rng.below(4);
                    let want = self.model.replies(reader, id, after, limit).expect("model");
                    let got =
                        block_on(self.engine.replies(uid, id, after, limit)).expect("replies");
                    self.model.check_page(&got, c, &want.1, &ctx);
                    replies.extend(got.messages.iter().map(|m| m.seq));
                    match got.next_cursor {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                let want = self.model.channels[c]
                    .replies
                    .get(&seq)
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(replies, want, "{ctx}: replies of {id}");
            }
        }
    }

    /// Each user makes a channel of its own (a sentinel, in a workspace of its own, both
    /// known to the model); every frame received up to the sentinel's must be exactly the
    /// model's list for that user. The lists start again empty.
    fn check_frames(&mut self, epoch: usize) {
        let mut sentinels = Vec::new();
        for u in 0..USERS {
            self.create_workspace(u, format!("sentinel{epoch}"));
            let ws = self.model.workspaces.last().expect("sentinel workspace").id;
            self.create_channel(u, ws, "sentinel".to_owned(), ChannelKind::Public);
            let c = self.model.channels.last().expect("sentinel channel");
            assert_eq!(
                c.ws,
                self.model.workspaces.len() - 1,
                "the sentinel was created"
            );
            sentinels.push(c.id.to_string());
        }
        for (u, sentinel) in sentinels.iter().enumerate() {
            let ctx = format!("frames of u{u} (epoch {epoch})");
            let mut got = Vec::new();
            loop {
                let frame = expected_of(&next_frame(&self.frames[u], &ctx));
                let last = frame.channel == *sentinel;
                got.push(frame);
                if last {
                    break;
                }
            }
            let want = std::mem::take(&mut self.model.frames[u]);
            *self.outcomes.entry("~frames".into()).or_default() += want.len();
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert_eq!(g, w, "{ctx}: frame {i} of {}", want.len());
            }
            assert_eq!(got.len(), want.len(), "{ctx}: frame count");
        }
    }

    /// Stops the engine and opens it again on the same directory: everything committed
    /// must come back (channels, seqs, messages, DMs, idempotency keys), and the run goes on.
    fn restart(&mut self) {
        self.check_frames(1);
        self.note(format!("#{} restart", self.op));
        self.frames.clear();
        self.engine.shutdown();
        self.engine = open_engine(self.dir.path());
        for u in 0..USERS {
            let sub = block_on(self.engine.subscribe(self.uid(u))).expect("subscribe");
            self.frames.push(forward(sub));
        }
        self.check_directory();
        self.check_contents();
    }

    fn run(mut self) -> BTreeMap<String, usize> {
        self.setup();
        for _ in 0..OPS_PER_SEED {
            self.step();
            if self.op.is_multiple_of(CHECK_EVERY_OPS) {
                self.check_directory();
            }
            if self.op == OPS_PER_SEED / 2 {
                self.restart();
            }
        }
        self.check_directory();
        self.check_contents();
        self.check_frames(2);
        self.frames.clear();
        self.engine.shutdown();
        let events: usize = self
            .model
            .channels
            .iter()
            .map(|c| c.last_seq as usize)
            .sum();
        *self.outcomes.entry("~events".into()).or_default() += events;
        std::mem::take(&mut self.outcomes)
    }
}

fn seeds() -> Vec<u64> {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
        })
    };
    if let Some(seed) = var("CHORUS_MODEL_SEED") {
        return vec![seed];
    }
    (1..=var("CHORUS_MODEL_SEEDS").unwrap_or(SEEDS_DEFAULT)).collect()
}

// Random ops from seeds agree with the model: decisions, seqs, pages, directory and frames.
#[test]
fn engine_agrees_with_model() {
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    for seed in seeds() {
        let started = std::time::Instant::now();
        for (k, n) in Sim::new(seed).run() {
            *totals.entry(k).or_default() += n;
        }
        eprintln!("model seed {seed}: ok in {:?}", started.elapsed());
    }
    // Shown with --nocapture: how often each operation was allowed or refused, by class.
    eprintln!("model outcomes: {totals:?}");
}

// The generator is a pure function of the seed, so a printed seed replays the same run.
#[test]
fn seeds_replay_the_same_sequence() {
    let draw = |seed| {
        let mut rng = Rng(seed);
        (0..64).map(|_| rng.below(1000)).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

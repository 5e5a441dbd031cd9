//! A simulated client: one user's connections and operations, chosen by the seed.
//!
//! A client connects (its first frame a `resume` from the last seqs it received, or not),
//! posts, edits, deletes and reacts through its session, joins and leaves channels, opens
//! DMs and creates channels through the API (as REST does), types, pings, reads slowly or
//! not at all for a while, and disconnects, cleanly or by vanishing. It checks every frame
//! as it arrives ([`crate::model::World::on_event`]) and records every operation.

use crate::driver::{self, ToClient, ToServer};
use crate::executor::Executor;
use crate::model::{Mine, OpKind, Outcome, WorldRef};
use crate::pipe::Pipe;
use bytes::Bytes;
use chorus_engine::domain::INLINE_BODY_BYTES_MAX;
use chorus_engine::ids::{ChannelId, MessageId, UserId};
use chorus_engine::{Engine, EngineError};
use chorus_gateway::session::{CloseReason, SessionConfig};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Frames a connection holds in each direction: the socket's buffers.
const CONNECTION_FRAMES: usize = 4;

/// The session settings of the simulated server.
pub const SESSION: SessionConfig = SessionConfig {
    heartbeat_interval_s: 30,
    frame_bytes_max: 1 << 20,
    presence_flush: Duration::from_millis(250),
};

/// Chances, in 1/1000, of each action of a connected client; the rest is a short pause.
struct Mix {
    post: u32,
    edit: u32,
    delete: u32,
    react: u32,
    unreact: u32,
    typing: u32,
    ping: u32,
    join: u32,
    leave: u32,
    dm: u32,
    create: u32,
    slow: u32,
    resume: u32,
    silent: u32,
    disconnect: u32,
    vanish: u32,
    presence: u32,
    activity: u32,
    mode: u32,
    read: u32,
}

impl Mix {
    /// The sum of the chances; at most 1,000 (checked below), or the actions past it would
    /// never be chosen.
    const fn total(&self) -> u32 {
        self.post
            + self.edit
            + self.delete
            + self.react
            + self.unreact
            + self.typing
            + self.ping
            + self.join
            + self.leave
            + self.dm
            + self.create
            + self.slow
            + self.resume
            + self.silent
            + self.disconnect
            + self.vanish
            + self.presence
            + self.activity
            + self.mode
            + self.read
    }
}

const MIX: Mix = Mix {
    post: 230,
    edit: 70,
    delete: 40,
    react: 80,
    unreact: 40,
    typing: 40,
    ping: 30,
    join: 60,
    leave: 40,
    dm: 20,
    create: 10,
    slow: 50,
    resume: 15,
    silent: 5,
    disconnect: 40,
    vanish: 20,
    presence: 50,
    activity: 80,
    mode: 30,
    read: 40,
};

const _: () = assert!(
    MIX.total() <= 1000,
    "the chances of a client's actions exceed 1,000"
);

/// A client's open connection.
struct Conn {
    to_server: Pipe<ToServer>,
    from_server: Pipe<ToClient>,
    closed: Option<CloseReason>,
    /// The users whose presence this connection watches, as of its last ack.
    watching: BTreeSet<UserId>,
    /// While a `presence:sub` waits for its ack: the users watched before or after it.
    transition: Option<BTreeSet<UserId>>,
    /// What this connection was last told of each watched user (status and `dnd_until`),
    /// and whether by a `presence` frame (rather than an ack).
    told: BTreeMap<UserId, (Value, bool)>,
}

/// One user's client for one life of the node.
pub struct Client {
    pub(crate) index: usize,
    pub(crate) user: UserId,
    pub(crate) engine: Engine,
    pub(crate) executor: Executor,
    pub(crate) world: WorldRef,
    conn: Option<Conn>,
}

impl Client {
    /// The client of user number `index`.
    pub fn new(index: usize, engine: Engine, executor: Executor, world: WorldRef) -> Client {
        let user = world.borrow().users[index].id;
        Client {
            index,
            user,
            engine,
            executor,
            world,
            conn: None,
        }
    }

    /// Runs `actions` actions, then closes cleanly.
    pub async fn run(mut self, actions: usize) {
        for _ in 0..actions {
            if self.conn.is_none() {
                self.connect().await;
            } else {
                self.act().await;
            }
            self.read_ready();
            let pause = self.executor.below(20_000);
            self.executor.sleep(Duration::from_micros(pause)).await;
        }
        self.disconnect(true).await;
    }

    fn roll(&self) -> u32 {
        self.executor.below(1000) as u32
    }

    fn pick<T: Clone>(&self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        Some(items[self.executor.below(items.len() as u64) as usize].clone())
    }

    /// Opens a connection. Most of the time the first frame is a `resume` from the last
    /// seqs received; sometimes the client waits out the grace, or sends a ping first.
    async fn connect(&mut self) {
        let (to_server, from_server) = (Pipe::new(CONNECTION_FRAMES), Pipe::new(CONNECTION_FRAMES));
        let conn_id = {
            let mut w = self.world.borrow_mut();
            w.counters.connections += 1;
            (self.index as u64) << 32 | (w.users[self.index].connections + 1)
        };
        drop(self.executor.spawn(driver::serve(
            self.engine.clone(),
            self.executor.clone(),
            self.user,
            conn_id,
            SESSION,
            to_server.clone(),
            from_server.clone(),
        )));
        self.conn = Some(Conn {
            to_server,
            from_server,
            closed: None,
            watching: BTreeSet::new(),
            transition: None,
            told: BTreeMap::new(),
        });
        self.trace(format!("connects as {conn_id:x}"));
        let roll = self.roll();
        let named = (roll < 800).then(|| {
            let w = self.world.borrow();
            let u = &w.users[self.index];
            u.last
                .iter()
                .filter(|(c, _)| !u.left.contains(c))
                .map(|(c, s)| (*c, *s))
                .collect::<BTreeMap<ChannelId, u64>>()
        });
        self.world.borrow_mut().users[self.index]
            .connected(named.as_ref().map(|n| n.keys().copied().collect()));
        match named {
            Some(named) => {
                let since: serde_json::Map<String, Value> = named
                    .iter()
                    .map(|(c, s)| (c.to_string(), json!(s)))
                    .collect();
                self.send(json!({"type": "resume", "since": since}));
            }
            None if roll < 900 => self.send(json!({"type": "ping", "ref": "first"})),
            None => {}
        }
        // Most connections watch some users from the start, as a client showing a member
        // list does.
        if self.executor.chance(600) {
            self.presence_sub().await;
        }
    }

    fn send(&mut self, frame: Value) {
        if let Some(conn) = &self.conn {
            if conn.closed.is_none() {
                conn.to_server.push(ToServer::Text(frame.to_string()));
            }
        }
    }

    /// Handles every frame that has arrived; answers to `waiting` are returned.
    fn read_ready(&mut self) -> Vec<Value> {
        let mut answers = Vec::new();
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return answers;
            };
            match conn.from_server.try_next() {
                Some(Some(ToClient::Frame(frame))) => {
                    if let Some(a) = self.on_frame(&frame) {
                        answers.push(a);
                    }
                }
                Some(Some(ToClient::Closed(reason))) => self.on_closed(reason),
                Some(None) | None => return answers,
            }
        }
    }

    fn on_closed(&mut self, reason: CloseReason) {
        self.trace(format!("closed {reason:?}"));
        let mut w = self.world.borrow_mut();
        match reason {
            CloseReason::ResumeRequired => w.counters.resume_required += 1,
            CloseReason::HeartbeatTimeout => w.counters.heartbeat_timeouts += 1,
            CloseReason::PeerClosed | CloseReason::GoingAway => {}
            other => w
                .violations
                .push(format!("user {}: session closed with {other:?}", self.user)),
        }
        if let Some(conn) = self.conn.as_mut() {
            conn.closed = Some(reason);
        }
    }

    /// Checks and records a frame; returns it if it answers a request (`ack`, `error`,
    /// `pong`).
    fn on_frame(&mut self, frame: &Bytes) -> Option<Value> {
        self.trace(
            String::from_utf8_lossy(frame)
                .chars()
                .take(160)
                .collect::<String>(),
        );
        let v: Value = match serde_json::from_slice(frame) {
            Ok(v) => v,
            Err(e) => {
                self.world
                    .borrow_mut()
                    .violations
                    .push(format!("user {}: a frame that is not JSON: {e}", self.user));
                return None;
            }
        };
        if v["type"] == "presence" {
            self.on_presence(&v);
            return None;
        }
        let mut w = self.world.borrow_mut();
        match v["type"].as_str() {
            Some("event") => w.on_event(self.index, frame, &v),
            Some("resumed") => w.on_resumed(self.index, &v),
            Some("read") => w.on_read(self.index, &v),
            Some("typing") => {
                w.counters.typing += 1;
                if v["user_id"].as_str() == Some(&self.user.to_string()) {
                    w.violations
                        .push(format!("user {}: its own typing came back", self.user));
                }
            }
            Some("hello") => {
                if v["user_id"].as_str() != Some(&self.user.to_string()) {
                    w.violations
                        .push(format!("user {}: hello for another user: {v}", self.user));
                }
            }
            Some("ack") | Some("error") | Some("pong") => return Some(v),
            _ => w
                .violations
                .push(format!("user {}: an unknown frame: {v}", self.user)),
        }
        None
    }

    /// Waits for the answer to the frame sent with `reference`, handling every other frame
    /// meanwhile; `None` if the session ended first.
    async fn answer(&mut self, reference: &str) -> Option<Value> {
        loop {
            for a in self.read_ready() {
                if a["ref"].as_str() == Some(reference) {
                    return Some(a);
                }
                // The only frames this client sends without a `ref` are typing notices; one
                // to a channel the user has just left is answered `not_found`, and nothing
                // else may come back without a `ref`.
                if a["type"] == "error" && a["ref"].is_null() && a["code"] != "not_found" {
                    self.world
                        .borrow_mut()
                        .violations
                        .push(format!("user {}: an error without a ref: {a}", self.user));
                }
            }
            let conn = self.conn.as_ref()?;
            // The driver always says why before it ends the connection.
            if conn.closed.is_some() || conn.from_server.is_finished() {
                return None;
            }
            let from_server = conn.from_server.clone();
            from_server.readable().await;
        }
    }

    fn trace(&self, what: impl std::fmt::Display) {
        if crate::model::tracing() {
            eprintln!(
                "[{:>8} {:>12?}] {} {what}",
                self.executor.steps(),
                self.executor.elapsed(),
                self.user
            );
        }
    }

    /// One action of a connected client.
    async fn act(&mut self) {
        if self.conn.as_ref().is_some_and(|c| c.closed.is_some()) {
            self.conn = None;
            return;
        }
        let roll = self.roll();
        let mut at = 0;
        let mut next = |chance: u32| {
            at += chance;
            roll < at
        };
        if next(MIX.post) {
            self.post().await
        } else if next(MIX.edit) {
            self.edit().await
        } else if next(MIX.delete) {
            self.delete().await
        } else if next(MIX.react) {
            self.react().await
        } else if next(MIX.unreact) {
            self.unreact().await
        } else if next(MIX.typing) {
            self.typing()
        } else if next(MIX.ping) {
            self.ping().await
        } else if next(MIX.join) {
            self.join().await
        } else if next(MIX.leave) {
            self.leave().await
        } else if next(MIX.dm) {
            self.open_dm().await
        } else if next(MIX.create) {
            self.create_channel().await
        } else if next(MIX.slow) {
            // A slow reader: nothing is read for a while, so the connection and then the
            // subscriber queue fill up.
            let ms = 50 + self.executor.below(2_000);
            self.executor.sleep(Duration::from_millis(ms)).await;
        } else if next(MIX.resume) {
            self.resume_live().await
        } else if next(MIX.silent) {
            // Silent for longer than two heartbeats: the server closes the session.
            self.executor.sleep(Duration::from_secs(65)).await;
        } else if next(MIX.disconnect) {
            self.disconnect(true).await
        } else if next(MIX.vanish) {
            self.disconnect(false).await
        } else if next(MIX.presence) {
            self.presence_sub().await
        } else if next(MIX.activity) {
            let state = if self.executor.chance(500) {
                "idle"
            } else {
                "active"
            };
            self.send(json!({"type": "activity", "state": state}));
        } else if next(MIX.mode) {
            self.set_mode().await
        } else if next(MIX.read) {
            self.mark_read().await
        }
    }

    /// Whether this client's user shares a workspace with `other`: only then may it see
    /// their presence.
    fn shares_workspace(&self, other: UserId) -> bool {
        let w = self.world.borrow();
        let mine = &w.users[self.index].workspaces;
        w.users
            .iter()
            .find(|u| u.id == other)
            .is_some_and(|u| u.workspaces.iter().any(|ws| mine.contains(ws)))
    }

    fn violation(&self, what: String) {
        self.world
            .borrow_mut()
            .violations
            .push(format!("user {}: {what}", self.user));
    }

    /// Changes the set of users this connection watches (any user of the run, including
    /// ones in no shared workspace, and itself), and checks the ack: exactly the users
    /// added, and `offline` for every user it may not see.
    async fn presence_sub(&mut self) {
        let all: Vec<UserId> = self.world.borrow().users.iter().map(|u| u.id).collect();
        let named: BTreeSet<UserId> = all
            .into_iter()
            .filter(|_| self.executor.chance(500))
            .collect();
        let op = ["set", "add", "remove"][self.executor.below(3) as usize];
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let old = conn.watching.clone();
        let new: BTreeSet<UserId> = match op {
            "set" => named.clone(),
            "add" => old.union(&named).copied().collect(),
            _ => old.difference(&named).copied().collect(),
        };
        conn.transition = Some(old.union(&new).copied().collect());
        let reference = format!("ps{}", self.world.borrow_mut().unique());
        let ids: Vec<String> = named.iter().map(|u| u.to_string()).collect();
        self.send(json!({"type": "presence:sub", "ref": reference, "op": op, "user_ids": ids}));
        let answer = self.answer(&reference).await;
        if let Some(conn) = self.conn.as_mut() {
            conn.transition = None;
        }
        let Some(a) = answer else { return };
        if a["type"] == "error" {
            if a["code"] != "unavailable" {
                self.violation(format!("presence:sub refused: {a}"));
            }
            return;
        }
        let acked = a["users"].as_object().cloned().unwrap_or_default();
        let expected: BTreeSet<String> = match op {
            "remove" => BTreeSet::new(),
            _ => named.iter().map(|u| u.to_string()).collect(),
        };
        if acked.keys().cloned().collect::<BTreeSet<_>>() != expected {
            self.violation(format!("presence:sub {op} acked other users: {a}"));
        }
        let mut told = Vec::new();
        for (id, p) in &acked {
            let Ok(u) = id.parse::<UserId>() else {
                self.violation(format!("an ack names {id}"));
                continue;
            };
            if !self.shares_workspace(u)
                && (p["status"] != "offline" || !p["last_active_at"].is_null())
            {
                self.violation(format!("the presence of {u}, in no shared workspace: {p}"));
            }
            told.push((u, json!([p["status"], p["dnd_until"]])));
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        conn.told.retain(|u, _| new.contains(u));
        for (u, key) in told {
            conn.told.insert(u, (key, false));
        }
        conn.watching = new;
    }

    /// Checks a `presence` frame: only users this connection watches, none it may not
    /// see, none added by a `presence:sub` not yet acked (the older status in the ack
    /// would undo it), and never a user's state as the last frame already showed it (a
    /// change undone within the window sends nothing).
    fn on_presence(&mut self, v: &Value) {
        self.world.borrow_mut().counters.presence += 1;
        let users = v["users"].as_object().cloned().unwrap_or_default();
        if users.is_empty() {
            self.violation(format!("an empty presence frame: {v}"));
        }
        for (id, p) in users {
            let Ok(u) = id.parse::<UserId>() else {
                self.violation(format!("a presence frame names {id}"));
                continue;
            };
            if !self.shares_workspace(u) {
                self.violation(format!("the presence of {u}, in no shared workspace: {v}"));
            }
            let status = p["status"].as_str().unwrap_or("");
            if !["online", "away", "dnd", "offline"].contains(&status) {
                self.violation(format!("a presence status {status:?}"));
            }
            let key = json!([p["status"], p["dnd_until"]]);
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let allowed = conn.transition.as_ref().unwrap_or(&conn.watching);
            let watched = allowed.contains(&u);
            let before_ack = watched && !conn.watching.contains(&u);
            let repeat = conn.told.get(&u) == Some(&(key.clone(), true));
            conn.told.insert(u, (key, true));
            if !watched {
                self.violation(format!("the presence of {u}, not watched: {v}"));
            }
            if before_ack {
                self.violation(format!(
                    "a change of {u} before the ack of the presence:sub that added it: {v}"
                ));
            }
            if repeat {
                self.violation(format!(
                    "a presence frame that changes nothing for {u}: {v}"
                ));
            }
        }
    }

    /// Sets a presence mode through the API, as REST does: sometimes `dnd` until a moment
    /// a few seconds ahead, whose end is a timer event of the owner.
    async fn set_mode(&mut self) {
        use chorus_engine::presence::Mode;
        let mode =
            [Mode::Auto, Mode::Away, Mode::Dnd, Mode::Invisible][self.executor.below(4) as usize];
        let now_us = crate::env::EPOCH_US + self.executor.elapsed().as_micros() as u64;
        let until = (mode == Mode::Dnd && self.executor.chance(700))
            .then(|| now_us + 1_000 + self.executor.below(3_000_000));
        match self.engine.set_presence(self.user, mode, until).await {
            Ok(own) if own.mode != mode || own.dnd_until_us != until => {
                self.violation(format!("set {mode:?} until {until:?}, answered {own:?}"));
            }
            Ok(own) if mode == Mode::Invisible && own.presence.status.as_str() != "offline" => {
                self.violation(format!("invisible, shown {own:?}"));
            }
            _ => {}
        }
    }

    /// Sends a command and records its outcome from the answer.
    async fn command(&mut self, op: usize, frame: Value) -> Option<Value> {
        let reference = format!("op{op}");
        let mut frame = frame;
        frame["ref"] = json!(reference);
        self.trace(
            format!("sends {frame}")
                .chars()
                .take(160)
                .collect::<String>(),
        );
        self.send(frame);
        let answer = self.answer(&reference).await;
        self.trace(
            format!("answer {answer:?}")
                .chars()
                .take(160)
                .collect::<String>(),
        );
        let outcome = match &answer {
            Some(a) if a["type"] == "ack" => Outcome::Acked(Some(a["message"].clone())),
            Some(a) if a["type"] == "error" && a["code"] == "unavailable" => Outcome::Unknown,
            Some(a) if a["type"] == "error" => {
                Outcome::Refused(a["code"].as_str().unwrap_or("?").to_owned())
            }
            _ => Outcome::Unknown,
        };
        let mut w = self.world.borrow_mut();
        if outcome == Outcome::Unknown {
            w.after_unknown(op);
        }
        w.settle(op, outcome);
        answer.filter(|a| a["type"] == "ack")
    }

    fn member_channels(&self) -> Vec<ChannelId> {
        let w = self.world.borrow();
        w.users[self.index].channels.iter().copied().collect()
    }

    async fn post(&mut self) {
        let retry = self.world.borrow_mut().users[self.index].retry.pop();
        let (channel, key, large) = match retry {
            Some(r) => r,
            None => {
                let Some(channel) = self.pick(&self.member_channels()) else {
                    return;
                };
                let key = format!("k{}", self.world.borrow_mut().unique());
                (channel, key, self.executor.chance(10))
            }
        };
        let text = if large {
            format!("{key} {}", "x".repeat(INLINE_BODY_BYTES_MAX + 100))
        } else {
            format!("{key} hello")
        };
        let op = self.world.borrow_mut().issue(
            self.user,
            OpKind::Post {
                channel,
                key: key.clone(),
                large,
            },
        );
        let frame = json!({"type": "message:send", "channel_id": channel.to_string(),
            "text": text, "client_msg_id": key});
        if let Some(ack) = self.command(op, frame).await {
            let id = ack["message"]["id"].as_str().and_then(|m| m.parse().ok());
            if let Some(id) = id {
                let mut w = self.world.borrow_mut();
                w.users[self.index].mine.push(Mine { id, deleted: false });
            }
        }
    }

    fn my_live_message(&self) -> Option<MessageId> {
        let w = self.world.borrow();
        let live: Vec<MessageId> = w.users[self.index]
            .mine
            .iter()
            .filter(|m| !m.deleted)
            .map(|m| m.id)
            .collect();
        drop(w);
        self.pick(&live)
    }

    async fn edit(&mut self) {
        let Some(message) = self.my_live_message() else {
            return;
        };
        let text = format!("edit{}", self.world.borrow_mut().unique());
        let op = self.world.borrow_mut().issue(
            self.user,
            OpKind::Edit {
                message,
                text: text.clone(),
            },
        );
        let frame = json!({"type": "message:edit", "channel_id": message.channel.to_string(),
            "message_id": message.to_string(), "text": text});
        self.command(op, frame).await;
    }

    async fn delete(&mut self) {
        let Some(message) = self.my_live_message() else {
            return;
        };
        {
            let mut w = self.world.borrow_mut();
            let u = &mut w.users[self.index];
            if let Some(m) = u.mine.iter_mut().find(|m| m.id == message) {
                m.deleted = true;
            }
            u.reactions.retain(|(m, _)| *m != message);
        }
        let op = self
            .world
            .borrow_mut()
            .issue(self.user, OpKind::Delete { message });
        let frame = json!({"type": "message:delete", "channel_id": message.channel.to_string(),
            "message_id": message.to_string()});
        self.command(op, frame).await;
    }

    /// A message to react to: one of the user's own, or one seen in a channel it is in.
    fn some_message(&self) -> Option<MessageId> {
        if self.executor.chance(500) {
            if let Some(m) = self.my_live_message() {
                return Some(m);
            }
        }
        let w = self.world.borrow();
        let u = &w.users[self.index];
        let candidates: Vec<MessageId> = w
            .seen
            .iter()
            .rev()
            .take(64)
            .filter(|s| s.user == self.user && u.channels.contains(&s.channel))
            .filter(|s| s.frame.windows(13).any(|x| x == b"\"message:new\""))
            .map(|s| MessageId {
                channel: s.channel,
                seq: s.seq,
            })
            .collect();
        drop(w);
        self.pick(&candidates)
    }

    async fn react(&mut self) {
        let Some(message) = self.some_message() else {
            return;
        };
        let emoji = format!("e{}", self.world.borrow_mut().unique());
        let op = self.world.borrow_mut().issue(
            self.user,
            OpKind::ReactAdd {
                message,
                emoji: emoji.clone(),
            },
        );
        let frame = json!({"type": "reaction:add", "channel_id": message.channel.to_string(),
            "message_id": message.to_string(), "emoji": emoji});
        if self.command(op, frame).await.is_some() {
            self.world.borrow_mut().users[self.index]
                .reactions
                .push((message, emoji));
        }
    }

    async fn unreact(&mut self) {
        let reactions = self.world.borrow().users[self.index].reactions.clone();
        let Some((message, emoji)) = self.pick(&reactions) else {
            return;
        };
        self.world.borrow_mut().users[self.index]
            .reactions
            .retain(|r| *r != (message, emoji.clone()));
        let op = self.world.borrow_mut().issue(
            self.user,
            OpKind::ReactRemove {
                message,
                emoji: emoji.clone(),
            },
        );
        let frame = json!({"type": "reaction:remove", "channel_id": message.channel.to_string(),
            "message_id": message.to_string(), "emoji": emoji});
        self.command(op, frame).await;
    }

    fn typing(&mut self) {
        if let Some(channel) = self.pick(&self.member_channels()) {
            self.send(json!({"type": "typing:start", "channel_id": channel.to_string()}));
        }
    }

    /// A `resume` in the middle of a session, from the last seqs received of every channel
    /// the user is in, often while the connection's first catch-up still runs: it must
    /// bring nothing twice, and either be done (`resumed`) or close the session so that the
    /// client starts over.
    async fn resume_live(&mut self) {
        let since: serde_json::Map<String, Value> = {
            let w = self.world.borrow();
            let u = &w.users[self.index];
            u.last
                .iter()
                .filter(|(c, _)| !u.left.contains(c))
                .map(|(c, s)| (c.to_string(), json!(s)))
                .collect()
        };
        self.trace(format!("resumes {since:?}"));
        self.send(json!({"type": "resume", "since": since}));
    }

    /// Marks a channel read up to the last seq received of it (`read:mark`). The ack's
    /// marker is at least that seq (markers only move forward), at most the channel's
    /// last seq, and counts no more mentions than unread messages. A channel left
    /// meanwhile is `not_found`. (The ack is not checked against the `read` frames: an
    /// answer goes out before events already queued, so it may overtake older frames.)
    async fn mark_read(&mut self) {
        let picked = {
            let w = self.world.borrow();
            let u = &w.users[self.index];
            let known: Vec<(ChannelId, u64)> = u
                .last
                .iter()
                .filter(|(c, _)| u.channels.contains(c))
                .map(|(c, s)| (*c, *s))
                .collect();
            known
        };
        let Some((channel, seq)) = self.pick(&picked) else {
            return;
        };
        let reference = format!("read{}", self.world.borrow_mut().unique());
        self.send(json!({"type": "read:mark", "ref": reference,
            "channel_id": channel.to_string(), "seq": seq}));
        let Some(a) = self.answer(&reference).await else {
            return;
        };
        let r = &a["read"];
        let ok = match a["type"].as_str() {
            Some("ack") => {
                let n = |k: &str| r[k].as_u64().unwrap_or(0);
                r["channel_id"] == channel.to_string()
                    && n("read_seq") >= seq
                    && n("read_seq") <= n("last_seq")
                    && n("mention_count") <= n("unread_count")
            }
            Some("error") => matches!(a["code"].as_str(), Some("not_found" | "unavailable")),
            _ => false,
        };
        if !ok {
            self.world.borrow_mut().violations.push(format!(
                "user {}: read:mark of {channel} at {seq} answered {a}",
                self.user
            ));
        }
    }

    async fn ping(&mut self) {
        let reference = format!("ping{}", self.world.borrow_mut().unique());
        self.send(json!({"type": "ping", "ref": reference}));
        if let Some(a) = self.answer(&reference).await {
            if a["type"] != "pong" {
                self.world
                    .borrow_mut()
                    .violations
                    .push(format!("user {}: ping answered with {a}", self.user));
            }
        }
    }

    /// Records an API call's outcome.
    fn settle_api<T>(&mut self, op: usize, r: &Result<T, EngineError>) {
        let outcome = match r {
            Ok(_) => Outcome::Acked(None),
            Err(EngineError::Domain(e)) => Outcome::Refused(e.code().to_owned()),
            Err(_) => Outcome::Unknown,
        };
        self.world.borrow_mut().settle(op, outcome);
    }

    async fn join(&mut self) {
        let candidates: Vec<ChannelId> = {
            let w = self.world.borrow();
            let u = &w.users[self.index];
            w.workspaces
                .iter()
                .filter(|ws| u.workspaces.contains(&ws.id))
                .flat_map(|ws| ws.public.iter().copied())
                .filter(|c| !u.channels.contains(c))
                .collect()
        };
        let Some(channel) = self.pick(&candidates) else {
            return;
        };
        let op = self
            .world
            .borrow_mut()
            .issue(self.user, OpKind::Join { channel });
        let r = self.engine.join(self.user, channel).await;
        if r.is_ok() {
            self.world.borrow_mut().users[self.index]
                .channels
                .insert(channel);
        }
        self.settle_api(op, &r);
    }

    async fn leave(&mut self) {
        let Some(channel) = self.pick(&self.member_channels()) else {
            return;
        };
        let op = self
            .world
            .borrow_mut()
            .issue(self.user, OpKind::Leave { channel });
        let r = self
            .engine
            .remove_channel_member(self.user, channel, self.user)
            .await;
        if r.is_ok() {
            self.world.borrow_mut().users[self.index]
                .channels
                .remove(&channel);
        }
        self.settle_api(op, &r);
    }

    async fn open_dm(&mut self) {
        let (workspace, others) = {
            let w = self.world.borrow();
            let u = &w.users[self.index];
            let Some(ws) = w.workspaces.iter().find(|ws| u.workspaces.contains(&ws.id)) else {
                return;
            };
            let others: Vec<UserId> = ws
                .members
                .iter()
                .map(|i| w.users[*i].id)
                .filter(|id| *id != self.user)
                .collect();
            (ws.id, others)
        };
        let Some(first) = self.pick(&others) else {
            return;
        };
        let mut with = vec![first];
        if self.executor.chance(300) {
            if let Some(second) = self.pick(&others) {
                with.push(second);
            }
        }
        let op = self.world.borrow_mut().issue(
            self.user,
            OpKind::OpenDm {
                workspace,
                with: with.clone(),
            },
        );
        let r = self.engine.open_dm(self.user, workspace, with).await;
        if let Ok((c, _)) = &r {
            self.world.borrow_mut().users[self.index]
                .channels
                .insert(c.id);
        }
        self.settle_api(op, &r);
    }

    async fn create_channel(&mut self) {
        let workspace = {
            let w = self.world.borrow();
            let ws = w.users[self.index].workspaces.clone();
            drop(w);
            self.pick(&ws)
        };
        let Some(workspace) = workspace else {
            return;
        };
        let name = format!("c{}", self.world.borrow_mut().unique());
        let op = self.world.borrow_mut().issue(
            self.user,
            OpKind::CreateChannel {
                workspace,
                name: name.clone(),
            },
        );
        let r = self
            .engine
            .create_channel(
                self.user,
                workspace,
                &name,
                chorus_engine::domain::ChannelKind::Public,
            )
            .await;
        if let Ok(c) = &r {
            let mut w = self.world.borrow_mut();
            w.users[self.index].channels.insert(c.id);
            if let Some(ws) = w.workspaces.iter_mut().find(|ws| ws.id == workspace) {
                ws.public.push(c.id);
            }
        }
        self.settle_api(op, &r);
    }

    /// Ends the connection: with a close, reading what the server still sends until it
    /// closes too; or by vanishing, without reading anything more.
    async fn disconnect(&mut self, clean: bool) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        if !clean {
            conn.to_server.close_write();
            conn.from_server.close_read();
            self.conn = None;
            return;
        }
        if conn.closed.is_none() {
            conn.to_server.push(ToServer::Close);
        }
        loop {
            self.read_ready();
            let Some(conn) = self.conn.as_ref() else {
                return;
            };
            if conn.closed.is_some() || conn.from_server.is_finished() {
                break;
            }
            let from_server = conn.from_server.clone();
            from_server.readable().await;
        }
        if let Some(conn) = self.conn.take() {
            conn.to_server.close_write();
            conn.from_server.close_read();
        }
    }
}

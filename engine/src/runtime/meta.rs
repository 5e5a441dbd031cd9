//! The metadata partition at run time: its owner's commit task, and the reads every shard
//! answers from its replica.
//!
//! Shard 0 owns the metadata log. It decides each command against its replica and applies
//! the event at once, commits the tick with one fsync, and then sends the committed event
//! to every other shard. The caller hears back only when every shard has applied it (and,
//! for a new channel, when its partition has committed the first members), so any shard
//! it talks to next already knows the change.

use super::{Ack, Countdown, PartitionMsg, Reply, Routes, ShardMsg};
use crate::domain::event::{self, Decoded, MetaEvent, MetaRecord};
use crate::domain::meta::{partition_of, MetaCommand, MetaDecision, MetaState, User};
use crate::domain::{ChannelKind, DomainError};
use crate::durability::{Durability, LocalDurability};
use crate::engine::{EngineError, MetaOutcome};
use crate::ids::{UserId, WorkspaceId};
use crate::view::{ChannelView, MemberView, UserView, WorkspaceView};
use chorus_log::Entry;
use futures::channel::mpsc;
use futures::StreamExt;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// A metadata command as callers send it: raw IDs, turned into principals by the owner.
pub(crate) enum MetaRequest {
    CreateUser {
        email: String,
        name: String,
        password_hash: String,
        reply: Reply<MetaOutcome>,
    },
    CreateWorkspace {
        user: UserId,
        name: String,
        reply: Reply<MetaOutcome>,
    },
    AddMember {
        user: UserId,
        workspace: WorkspaceId,
        email: String,
        reply: Reply<MetaOutcome>,
    },
    CreateChannel {
        user: UserId,
        workspace: WorkspaceId,
        name: String,
        kind: ChannelKind,
        reply: Reply<MetaOutcome>,
    },
    OpenDm {
        user: UserId,
        workspace: WorkspaceId,
        users: Vec<UserId>,
        reply: Reply<MetaOutcome>,
    },
}

/// A read of the metadata replica, answered by whichever shard gets it.
pub(crate) enum MetaRead {
    UserExists {
        user: UserId,
        reply: Reply<bool>,
    },
    UserByEmail {
        email: String,
        reply: Reply<Option<User>>,
    },
    Me {
        user: UserId,
        reply: Reply<(UserView, Vec<WorkspaceView>)>,
    },
    Members {
        user: UserId,
        workspace: WorkspaceId,
        reply: Reply<Vec<MemberView>>,
    },
}

/// Answers a read from a shard's replica.
pub(crate) fn answer(meta: &MetaState, read: MetaRead) {
    match read {
        MetaRead::UserExists { user, reply } => {
            let _ = reply.send(Ok(meta.user(user).is_some()));
        }
        MetaRead::UserByEmail { email, reply } => {
            let _ = reply.send(Ok(meta.user_by_email(&email).cloned()));
        }
        MetaRead::Me { user, reply } => {
            let r = meta
                .user(user)
                .map(|u| {
                    let ws = meta
                        .workspaces_of(user)
                        .into_iter()
                        .map(Into::into)
                        .collect();
                    (UserView::from(u), ws)
                })
                .ok_or(EngineError::Domain(DomainError::NotFound("user")));
            let _ = reply.send(r);
        }
        MetaRead::Members {
            user,
            workspace,
            reply,
        } => {
            let r = meta.principal(user, workspace).map(|p| {
                meta.workspace(&p)
                    .members
                    .iter()
                    .filter_map(|(u, role)| meta.user(*u).map(|u| MemberView::new(u, *role)))
                    .collect()
            });
            let _ = reply.send(r.map_err(Into::into));
        }
    }
}

/// Replays the metadata log into a fresh state.
pub(crate) async fn replay(
    log: &LocalDurability,
    partitions: u32,
) -> Result<MetaState, EngineError> {
    let mut state = MetaState::new(partitions);
    let mut at = log.first_offset();
    while at < log.next_offset() {
        let records = log
            .read(at, 4 << 20)
            .await
            .map_err(|e| EngineError::Corrupt(e.to_string()))?;
        let Some(last) = records.last() else { break };
        at = last.offset + 1;
        for r in records {
            match event::decode(&r.payload) {
                Ok(Decoded::Meta(rec)) => state.apply(&rec.event),
                other => {
                    return Err(EngineError::Corrupt(format!(
                        "metadata log offset {}: {other:?}",
                        r.offset
                    )))
                }
            }
        }
    }
    Ok(state)
}

/// The metadata owner's task.
pub(crate) struct MetaOwner {
    pub log: LocalDurability,
    pub meta: Rc<RefCell<MetaState>>,
    pub routes: Routes,
    /// The shard's own partition queues, for the first members of channels it owns.
    pub local_partitions: Rc<RefCell<std::collections::HashMap<u32, mpsc::Sender<PartitionMsg>>>>,
}

struct Decided {
    record: MetaRecord,
    payload: Vec<u8>,
    reply: Reply<MetaOutcome>,
    outcome: MetaOutcome,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl MetaOwner {
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<MetaRequest>) {
        let mut tick = Vec::new();
        while let Some(first) = rx.next().await {
            tick.push(first);
            while tick.len() < super::partition::TICK_REQUESTS_MAX {
                match rx.try_recv() {
                    Ok(m) => tick.push(m),
                    Err(_) => break,
                }
            }
            self.tick(std::mem::take(&mut tick)).await;
        }
        let _ = self.log.close().await;
    }

    async fn tick(&self, requests: Vec<MetaRequest>) {
        let mut decided = Vec::new();
        for req in requests {
            match self.decide(req) {
                Ok(Some(d)) => decided.push(d),
                Ok(None) => {}
                Err((reply, e)) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if decided.is_empty() {
            return;
        }
        let entries: Vec<Entry<'_>> = decided
            .iter()
            .map(|d| Entry {
                timestamp_us: d.record.at_us,
                payload: &d.payload,
            })
            .collect();
        if let Err(e) = self.log.commit(&entries).await {
            for d in decided {
                let _ = d.reply.send(Err(EngineError::Unavailable(format!(
                    "metadata commit failed: {e}"
                ))));
            }
            return;
        }
        for d in decided {
            self.publish(d).await;
        }
    }

    /// Decides and applies one command. `Ok(None)` when it was answered already (an
    /// existing DM).
    #[allow(clippy::type_complexity)]
    fn decide(
        &self,
        req: MetaRequest,
    ) -> Result<Option<Decided>, (Reply<MetaOutcome>, EngineError)> {
        let mut meta = self.meta.borrow_mut();
        let (cmd, reply) = match req {
            MetaRequest::CreateUser {
                email,
                name,
                password_hash,
                reply,
            } => (
                Ok(MetaCommand::CreateUser {
                    email,
                    name,
                    password_hash,
                }),
                reply,
            ),
            MetaRequest::CreateWorkspace { user, name, reply } => (
                Ok(MetaCommand::CreateWorkspace { owner: user, name }),
                reply,
            ),
            MetaRequest::AddMember {
                user,
                workspace,
                email,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::AddMember { by, email }),
                reply,
            ),
            MetaRequest::CreateChannel {
                user,
                workspace,
                name,
                kind,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::CreateChannel { by, name, kind }),
                reply,
            ),
            MetaRequest::OpenDm {
                user,
                workspace,
                users,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::OpenDm { by, users }),
                reply,
            ),
        };
        let decision = cmd.and_then(|cmd| meta.decide(cmd));
        let event = match decision {
            Err(e) => return Err((reply, e.into())),
            Ok(MetaDecision::Existing(c)) => {
                let view = meta
                    .channel(c)
                    .map(|c| ChannelView::new(c.id, c.workspace, &c.name, c.kind, 0))
                    .expect("existing channel");
                let _ = reply.send(Ok(MetaOutcome::Channel(view, false)));
                return Ok(None);
            }
            Ok(MetaDecision::New(e)) => e,
        };
        meta.apply(&event);
        let outcome = outcome_of(&meta, &event);
        let record = MetaRecord {
            at_us: now_us(),
            event,
        };
        let payload = event::encode_meta(&record);
        Ok(Some(Decided {
            record,
            payload,
            reply,
            outcome,
        }))
    }

    /// Sends a committed event to every other shard; the caller's reply waits for all of
    /// them, and for a new channel's first members.
    async fn publish(&self, d: Decided) {
        let others = self.routes.shard_count() as usize - 1;
        let new_channel = match &d.record.event {
            MetaEvent::ChannelCreated { channel, .. } => Some(*channel),
            _ => None,
        };
        let count = others + new_channel.is_some() as usize;
        if count == 0 {
            let _ = d.reply.send(Ok(d.outcome));
            return;
        }
        let ack: Arc<dyn Ack> = Countdown::new(count, d.reply, Ok(d.outcome));
        let record = Arc::new(d.record);
        for s in 1..self.routes.shard_count() {
            let msg = ShardMsg::MetaApplied {
                record: record.clone(),
                ack: ack.clone(),
            };
            if self.routes.send(s, msg).await.is_err() {
                ack.done();
            }
        }
        if let Some(c) = new_channel {
            let p = partition_of(c);
            if self.routes.owner(p) == 0 {
                let tx = self.local_partitions.borrow().get(&p).cloned();
                match tx {
                    Some(mut tx) => {
                        use futures::SinkExt;
                        let init = PartitionMsg::Init {
                            channel: c,
                            ack: Some(ack.clone()),
                        };
                        if tx.send(init).await.is_err() {
                            ack.done();
                        }
                    }
                    None => ack.done(),
                }
            }
        }
    }
}

fn outcome_of(meta: &MetaState, e: &MetaEvent) -> MetaOutcome {
    match e {
        MetaEvent::UserCreated { user, .. } => {
            MetaOutcome::User(meta.user(*user).map(UserView::from).expect("created user"))
        }
        MetaEvent::WorkspaceCreated {
            workspace, name, ..
        } => MetaOutcome::Workspace(WorkspaceView {
            id: *workspace,
            name: name.clone(),
        }),
        MetaEvent::MemberAdded { user, role, .. } => MetaOutcome::Member(
            meta.user(*user)
                .map(|u| MemberView::new(u, *role))
                .expect("added user"),
        ),
        MetaEvent::ChannelCreated {
            channel,
            workspace,
            name,
            kind,
            members,
            ..
        } => MetaOutcome::Channel(
            ChannelView::new(*channel, *workspace, name, *kind, members.len() as u64),
            true,
        ),
    }
}

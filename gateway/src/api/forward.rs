//! Forwarding (`API.md` §15: every node serves the whole API). A REST call this node's
//! engine refused because another node leads what it writes to (a channel's partition, or
//! the directory) is handed to that node's server over the cluster's connections
//! (`chorus_replication::calls`), which runs it as if it had arrived there; the client
//! gets that answer, status and body.
//!
//! What travels is the call as this node parsed it: method, path and query, the
//! authenticated caller (user and device: the nodes of a cluster share the JWT secret and
//! trust each other), the client's address and the body. The leader runs the call's
//! handler without authenticating or rate-limiting it again (this node did both, the
//! sign-up and login limits included: `Call::forwarded`), and never
//! forwards it further: if it no longer leads either, its 503 is the answer and the client
//! tries again.
//!
//! A call is forwarded once, and only when this node's engine refused it with nothing
//! decided (`NotLeader`); if the leader cannot be reached, the client gets this node's
//! 503. A handler that writes twice runs whole again on the leader when its second write
//! is refused: only a sign-up with a device does (the account, then the device, both in
//! the directory), and only if the directory's leadership moves between the two; the
//! leader then finds the account made and answers 409, and the client logs in.

use super::{decode_params, find, run_current, Call, Found, Reply};
use crate::ctx::{Caller, ShardCtx, Shared};
use crate::error::ApiError;
use crate::protocol::Command;
use bytes::Bytes;
use chorus_engine::domain::channel::Content;
use chorus_engine::ids::{MessageId, UserId};
use chorus_replication::calls::Incoming;
use futures::StreamExt;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// A call as it travels to the leader.
#[derive(Serialize, Deserialize)]
pub(super) struct Forwarded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The authenticated caller, for routes that need one.
    pub user: Option<u64>,
    pub device: Option<String>,
    pub peer: IpAddr,
    /// The body: JSON text, which the call's handler read as UTF-8 already.
    pub body: String,
}

/// The leader's answer.
#[derive(Serialize, Deserialize)]
pub(super) struct Answered {
    pub status: u16,
    /// JSON text; none for 204.
    pub body: Option<String>,
    pub retry_after_ms: Option<u64>,
}

/// What the forwarding node passes along of a call it could not decide.
pub(super) struct Refused<'a> {
    pub method: &'a hyper::Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub caller: Option<&'a Caller>,
    pub peer: IpAddr,
    pub body: &'a Bytes,
}

/// Hands the call to `leader`'s server and returns its answer as this node's; `None` if
/// this node is not in a cluster, the call cannot travel, or the leader did not answer
/// (the caller then answers with its own 503).
pub(super) async fn forward(ctx: &ShardCtx, leader: u64, call: Refused<'_>) -> Option<Reply> {
    let forwarded = Forwarded {
        method: call.method.as_str().to_owned(),
        path: call.path.to_owned(),
        query: call.query.map(str::to_owned),
        user: call.caller.map(|c| c.user.0),
        device: call.caller.and_then(|c| c.device.clone()),
        peer: call.peer,
        body: String::from_utf8(call.body.to_vec()).ok()?,
    };
    let answered = send(&ctx.shared, ctx.shard, leader, &forwarded).await?;
    Some(Reply {
        status: answered.status,
        body: answered.body.map(Bytes::from),
        retry_after: answered.retry_after_ms.map(Duration::from_millis),
    })
}

/// Sends a call to `leader` from shard `shard`, and returns its answer (`None` as for
/// [`forward`]).
pub(super) async fn send(
    shared: &Shared,
    shard: u32,
    leader: u64,
    call: &Forwarded,
) -> Option<Answered> {
    let membership = shared.cluster.as_ref()?.membership();
    send_via(shared, &membership, shard, leader, call).await
}

/// [`send`], with the nodes' addresses `membership` gives (which may name nodes this node
/// has not been asked to place the cluster on yet).
pub(super) async fn send_via(
    shared: &Shared,
    membership: &chorus_replication::transport::Membership,
    shard: u32,
    leader: u64,
    call: &Forwarded,
) -> Option<Answered> {
    let cluster = shared.cluster.as_ref()?;
    if leader == cluster.me {
        return None;
    }
    let request = serde_json::to_vec(call).ok()?;
    let called =
        chorus_replication::calls::call(membership, &cluster.cuts, leader, shard, &request).await;
    let answered: Answered = match called {
        Ok(bytes) => serde_json::from_slice(&bytes).ok()?,
        Err(e) => {
            tracing::debug!(leader, error = %e, "a call to the leader failed");
            return None;
        }
    };
    shared.metrics.forwarded.inc();
    Some(answered)
}

/// A cluster node's way to pass a WebSocket or QUIC session's command, refused here with
/// `NotLeader`, to the leader: as the REST call it is (`message:send` is `POST
/// /channels/{cid}/messages`, and so on), whose answer becomes the `ack` or `error` frame.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
    shard: u32,
}

/// A notice a node sends every peer (one way, best effort: see
/// `chorus_replication::calls::Calls::notify_peers`), as JSON.
#[derive(Serialize, Deserialize)]
enum Notice {
    /// `user` types in `channel`: each node tells its own subscribers of the channel.
    Typing { channel: String, user: u64 },
    /// A login of `email` from `ip` was refused for its password: each node counts the
    /// failure against the login limits (`crate::guard`).
    LoginFailed { email: String, ip: std::net::IpAddr },
}

/// Tells every other node of the cluster (if this node is in one) that a login of `email`
/// from `ip` failed on its password, so that each counts it against the login limits.
pub fn login_failed(ctx: &ShardCtx, email: &str, ip: std::net::IpAddr) {
    let Some(cluster) = &ctx.shared.cluster else {
        return;
    };
    let notice = Notice::LoginFailed {
        email: email.to_owned(),
        ip,
    };
    let bytes = serde_json::to_vec(&notice).expect("notices serialize");
    cluster.calls.notify_peers(ctx.shard, bytes);
}

/// A session command as a REST call: method, path and JSON body.
pub struct AsRest(pub hyper::Method, pub String, pub Value);

impl Relay {
    /// The relay of a shard's sessions; `None` on a single node.
    pub fn of(ctx: &ShardCtx) -> Option<Relay> {
        ctx.shared.cluster.as_ref()?;
        Some(Relay {
            shared: ctx.shared.clone(),
            shard: ctx.shard,
        })
    }

    /// Tells every other node of the cluster that `user` types in `channel` (this node
    /// told its own subscribers already): typing is no channel event, so it reaches other
    /// nodes' subscribers only this way.
    pub fn typing(&self, user: UserId, channel: chorus_engine::ids::ChannelId) {
        let Some(cluster) = &self.shared.cluster else {
            return;
        };
        let notice = Notice::Typing {
            channel: channel.to_string(),
            user: user.0,
        };
        let bytes = serde_json::to_vec(&notice).expect("notices serialize");
        cluster.calls.notify_peers(self.shard, bytes);
    }

    /// The REST call `command` is.
    pub fn rest_of(command: &Command) -> AsRest {
        let in_channel = |m: &MessageId| format!("/api/v1/channels/{}/messages/{m}", m.channel);
        let content = |c: &Content| match c {
            Content::Text(text) => json!({ "text": text }),
            Content::Sealed(s) => json!({"ciphertext": s.ciphertext, "devices_seq": s.devices_seq}),
        };
        match command {
            Command::Send {
                channel,
                content: c,
                client_msg_id,
                thread,
                files,
            } => {
                let mut body = content(c);
                body["client_msg_id"] = json!(client_msg_id);
                body["thread_id"] = json!(thread.map(|t| t.to_string()));
                let files: Vec<String> = files.iter().map(ToString::to_string).collect();
                body["file_ids"] = json!(files);
                let path = format!("/api/v1/channels/{channel}/messages");
                AsRest(hyper::Method::POST, path, body)
            }
            Command::Edit {
                message,
                content: c,
            } => AsRest(hyper::Method::PATCH, in_channel(message), content(c)),
            Command::Delete { message } => {
                AsRest(hyper::Method::DELETE, in_channel(message), Value::Null)
            }
            Command::React {
                message,
                emoji,
                add,
            } => {
                let emoji = utf8_percent_encode(emoji, NON_ALPHANUMERIC);
                let path = format!("{}/reactions/{emoji}", in_channel(message));
                let method = if *add {
                    hyper::Method::PUT
                } else {
                    hyper::Method::DELETE
                };
                AsRest(method, path, Value::Null)
            }
        }
    }

    /// Runs `call` as `user` on `leader`; the message its answer carries, or `None` if it
    /// did not answer.
    pub async fn command(
        &self,
        leader: u64,
        user: UserId,
        call: AsRest,
    ) -> Option<Result<Option<Value>, ApiError>> {
        let answer = self.rest(leader, user, call).await?;
        Some(answer.map(|body| body.get("message").cloned()))
    }

    /// Runs `call` as `user` on `leader`; its answer's body (a success) or error, or
    /// `None` if it did not answer.
    pub async fn rest(
        &self,
        leader: u64,
        user: UserId,
        call: AsRest,
    ) -> Option<Result<Value, ApiError>> {
        self.rest_on_device(leader, user, None, call, None).await
    }

    /// [`Relay::rest`] by `user`'s `device` (the device the session's token is bound to),
    /// with a query string.
    pub async fn rest_on_device(
        &self,
        leader: u64,
        user: UserId,
        device: Option<String>,
        call: AsRest,
        query: Option<String>,
    ) -> Option<Result<Value, ApiError>> {
        let AsRest(method, path, body) = call;
        let forwarded = Forwarded {
            method: method.as_str().to_owned(),
            path,
            query,
            user: Some(user.0),
            device,
            peer: IpAddr::from([0, 0, 0, 0]),
            body: if body.is_null() {
                String::new()
            } else {
                body.to_string()
            },
        };
        let answered = send(&self.shared, self.shard, leader, &forwarded).await?;
        let body: Value = match &answered.body {
            Some(b) => serde_json::from_str(b).ok()?,
            None => Value::Null,
        };
        if (200..300).contains(&answered.status) {
            return Some(Ok(body));
        }
        let error = &body["error"];
        Some(Err(ApiError {
            retry_after: answered.retry_after_ms.map(Duration::from_millis),
            ..ApiError::new(
                answered.status,
                intern(error["code"].as_str().unwrap_or("internal")),
                error["message"].as_str().unwrap_or_default(),
            )
        }))
    }
}

/// An error code from the leader as the `&'static str` an [`ApiError`] holds: each distinct
/// code is kept once (the codes are the server's own, a few dozen).
fn intern(code: &str) -> &'static str {
    static CODES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut codes = CODES.lock().expect("codes");
    if let Some(c) = codes.iter().find(|c| **c == code) {
        return c;
    }
    let kept: &'static str = Box::leak(code.to_owned().into_boxed_str());
    codes.push(kept);
    kept
}

/// Serves the calls peers make to this shard, each as a task of its own, until the
/// receiver closes.
pub async fn serve_calls(
    ctx: Rc<ShardCtx>,
    mut calls: futures::channel::mpsc::UnboundedReceiver<Incoming>,
) {
    while let Some(incoming) = calls.next().await {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            let bytes = if incoming.request.first() == Some(&crate::files::peers::MAGIC) {
                crate::files::peers::answer(&ctx, incoming.from, &incoming.request).await
            } else if super::presence_peers::is_presence(&incoming.request) {
                super::presence_peers::answer(&ctx, &incoming.request).await
            } else if super::notify_peers::is_notify(&incoming.request) {
                super::notify_peers::answer(&ctx)
            } else if super::members::is_ask(&incoming.request) {
                super::members::answer(&ctx.shared)
            } else {
                let answer = answer(&ctx, &incoming.request).await;
                serde_json::to_vec(&answer).expect("answers serialize")
            };
            let _ = incoming.answer.send(bytes);
        })
        .detach();
    }
}

/// Takes this shard's notices from peers for as long as the node runs. A typing notice
/// ([`Relay::typing`]) goes to this node's subscribers of the channel, as a local one would
/// (the channel's replica here checks that the user is a member), and no further; a
/// presence notice goes to this shard's side of presence between nodes
/// (`super::presence_peers`).
pub async fn serve_notices(
    ctx: Rc<ShardCtx>,
    mut notices: futures::channel::mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
) {
    let presence = super::presence_peers::start(ctx.clone());
    while let Some((from, bytes)) = notices.next().await {
        if super::presence_peers::is_presence(&bytes) {
            let _ = presence.unbounded_send((from, bytes));
            continue;
        }
        match serde_json::from_slice::<Notice>(&bytes) {
            Ok(Notice::Typing { channel, user }) => {
                let Ok(channel) = channel.parse() else {
                    continue;
                };
                let engine = ctx.shared.engine.clone();
                glommio::spawn_local(async move {
                    let _ = engine.typing(UserId(user), channel).await;
                })
                .detach();
            }
            Ok(Notice::LoginFailed { email, ip }) => ctx.shared.guard.failed_elsewhere(&email, ip),
            Err(e) => tracing::debug!(from, error = %e, "a notice that does not parse"),
        }
    }
}

/// Runs a forwarded call here, as its route's handler would, without forwarding it again.
async fn answer(ctx: &ShardCtx, request: &[u8]) -> Answered {
    let ran = match serde_json::from_slice::<Forwarded>(request) {
        Ok(f) => run_forwarded(ctx, f).await,
        Err(e) => Err(ApiError::invalid(format!(
            "a forwarded call that does not parse: {e}"
        ))),
    };
    match ran {
        Ok(reply) => Answered {
            status: reply.status,
            body: reply.body.map(|b| String::from_utf8_lossy(&b).into_owned()),
            retry_after_ms: reply.retry_after.map(|d| d.as_millis() as u64),
        },
        Err(e) => Answered {
            status: e.status,
            body: Some(e.body().to_string()),
            retry_after_ms: e.retry_after.map(|d| d.as_millis() as u64),
        },
    }
}

async fn run_forwarded(ctx: &ShardCtx, f: Forwarded) -> Result<Reply, ApiError> {
    let method = hyper::Method::from_bytes(f.method.as_bytes())
        .map_err(|_| ApiError::invalid("a forwarded call with no method"))?;
    if f.path == crate::files::RECORD_PATH {
        return crate::files::record_forwarded(ctx, f.user, &f.body).await;
    }
    if f.path == crate::files::DELETE_PATH {
        return crate::files::delete_forwarded(ctx, f.user, &f.body).await;
    }
    let Found::Route(route, raw) = find(&method, &f.path) else {
        return Err(ApiError::new(404, "not_found", "no such endpoint"));
    };
    let caller = match (route.auth, f.user) {
        (false, _) => None,
        (true, Some(user)) => {
            // The node that took the call checked the token; a device removed since (its
            // removal answered while the call travelled) is refused here too.
            let user = UserId(user);
            let device = f.device.as_deref();
            if device.is_some() && !crate::ctx::credential_live(&ctx.shared, user, device).await? {
                return Err(ApiError::unauthorized("bad token: the device was removed"));
            }
            Some(Caller {
                user,
                device: f.device,
            })
        }
        (true, None) => return Err(ApiError::unauthorized("a forwarded call with no caller")),
    };
    let call = Call {
        ctx,
        caller,
        peer: f.peer,
        forwarded: true,
        params: decode_params(&raw)?,
        query: f.query,
        body: Bytes::from(f.body),
    };
    run_current(route.op, &call).await
}

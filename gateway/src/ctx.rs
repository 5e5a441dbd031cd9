//! What the gateway's connections share: the process-wide [`Shared`] state and each
//! shard's [`ShardCtx`], and [`authenticate`], which the REST router and the WebSocket
//! handshake both use.
//!
//! Code map: `server` accepts connections and owns the shard loops; `api` (REST) and `ws`
//! (the WebSocket session) serve them. All three depend on this module, and it depends on
//! none of them.
//!
//! # Tokens
//!
//! A request is authenticated by a token that is ours, intact and unexpired, *and* names an
//! account that exists now: every request asks the engine (the shard's own metadata
//! replica, no cross-core hop), so a correctly signed token for a user that does not exist
//! is refused with 401 like any bad token. Accounts cannot be removed or disabled yet; when
//! they can, this same check makes every token of such an account stop working on its next
//! request, with no token list to revoke. A token bound to a device stops working once
//! the device is removed; on a cluster node, from the moment the removal is answered,
//! wherever it was taken (`crate::fresh`).

use crate::auth::Tokens;
use crate::config::Config;
use crate::error::ApiError;
use crate::guard::AuthGuard;
use crate::metrics::Metrics;
use crate::ratelimit::Limiter;
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::Engine;
use futures::channel::oneshot;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What every shard shares.
pub struct Shared {
    /// The engine.
    pub engine: Engine,
    /// The settings.
    pub config: Config,
    /// Token signing and checking.
    pub tokens: Tokens,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Set when the drain starts.
    pub draining: AtomicBool,
    /// Open connections across shards (HTTP and WebSocket).
    pub connections: AtomicUsize,
    /// Open QUIC sessions across shards. They hold no file descriptor each, so
    /// `connections_max` does not count them.
    pub quic_sessions: AtomicUsize,
    /// Open connections per source address.
    pub per_ip: ConnectionsPerIp,
    /// Sign-up and login limits.
    pub guard: AuthGuard,
    /// The file store and link signing.
    pub files: crate::files::Files,
    /// The message search index.
    pub search: Arc<chorus_search::Search>,
    /// The cluster this node is part of; `None` for a single node.
    pub cluster: Option<ClusterView>,
    /// On a cluster node that notifies: whether its senders send, and what the sending
    /// node answered (`crate::api::notify_peers`); `None` otherwise.
    pub notify_gate: Option<Arc<chorus_notify::cluster::Gate>>,
}

impl Shared {
    /// On a cluster node, waits until this node's directory holds everything committed
    /// before now (`API.md` §15: a read sees every write acknowledged before it, wherever
    /// it was taken); if no directory leader confirms in time, the read goes on with what
    /// the node has, as reads gathered over partitions do. Nothing on a single node.
    pub async fn directory_current(&self) {
        if self.cluster.is_some() {
            let _ = self.engine.directory_barrier().await;
        }
    }

    /// Whether this node leads the cluster's directory (the metadata partition's group,
    /// numbered after the channel partitions), as its board last showed; false on a single
    /// node.
    pub fn leads_directory(&self) -> bool {
        let me = self.cluster.as_ref().map(|c| c.me);
        me.is_some() && self.directory_leader() == me
    }

    /// The node that leads the cluster's directory, as this node's board last showed;
    /// `None` on a single node or while none is known.
    pub fn directory_leader(&self) -> Option<u64> {
        let directory = u64::from(self.config.partitions);
        let groups = self.cluster.as_ref()?.board.groups();
        groups.get(&directory).and_then(|g| g.leader)
    }

    /// Calls the server of `peer` (another node of this node's cluster) on shard `shard`
    /// with `request`, and answers its answer (`chorus_replication::calls`).
    pub async fn call_peer(
        &self,
        shard: u32,
        peer: u64,
        request: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or_else(|| std::io::Error::other("not in a cluster"))?;
        chorus_replication::calls::call(&cluster.membership(), &cluster.cuts, peer, shard, request)
            .await
    }

    /// [`Shared::call_peer`] on shard 0, given up after `within`: the answer, or `None` if
    /// the call failed (logged at debug, naming `what` was asked) or came too late.
    pub async fn ask_peer(
        &self,
        peer: u64,
        request: &[u8],
        within: std::time::Duration,
        what: &str,
    ) -> Option<Vec<u8>> {
        use futures::future::{select, Either};
        let call = Box::pin(self.call_peer(0, peer, request));
        let late = Box::pin(glommio::timer::sleep(within));
        match select(call, late).await {
            Either::Left((Ok(bytes), _)) => Some(bytes),
            Either::Left((Err(e), _)) => {
                tracing::debug!(peer, error = %e, "{what}: a peer did not answer");
                None
            }
            Either::Right(_) => None,
        }
    }
}

/// What `GET /api/v1/cluster` shows of a cluster node.
pub struct ClusterView {
    /// This node's id.
    pub me: u64,
    /// The cluster's id (what node-to-node connections check).
    pub id: u64,
    /// Every node known and its address between nodes, and the members last asked for
    /// (`PUT /api/v1/cluster/members`).
    pub members: chorus_replication::members::Members,
    /// The key `PUT /api/v1/cluster/members` must carry (`cluster_admin_key_file`); `None`:
    /// the members cannot be changed.
    pub admin_key: Option<Vec<u8>>,
    /// What the node's shards know of groups and peers.
    pub board: chorus_replication::Board,
    /// Where peers' calls to this node's shards arrive (see `crate::api::forward`).
    pub calls: chorus_replication::calls::Calls,
    /// The fault layer's switch (fault tests): the peers this node is cut off from.
    pub cuts: chorus_replication::transport::Cuts,
    /// How current this node's directory is known to be, for device-bound tokens.
    pub fresh: Arc<crate::fresh::Freshness>,
}

impl ClusterView {
    /// This node's membership: the nodes it knows, by their addresses between nodes, and
    /// the cluster's id.
    pub fn membership(&self) -> chorus_replication::transport::Membership {
        chorus_replication::transport::Membership {
            me: self.me,
            nodes: self.members.addresses(),
            cluster: Some(self.id),
        }
    }

    /// The cluster's nodes: those last asked for, or every node of `--cluster` if none
    /// was.
    pub fn nodes(&self) -> std::collections::BTreeMap<u64, std::net::SocketAddr> {
        let (_, addresses, asked) = self.members.read();
        match asked {
            Some(ids) => addresses
                .into_iter()
                .filter(|(id, _)| ids.contains(id))
                .collect(),
            None => addresses,
        }
    }
}

/// A peer counts as up when this node heard from it this recently (heartbeats come every
/// 40 ms; `API.md` §15 asks that a dead node show within 5 s).
pub const PEER_UP_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// What one shard's connections share.
pub struct ShardCtx {
    /// The process-wide state.
    pub shared: Arc<Shared>,
    /// This shard's rate limiter (a user's budget is per shard).
    pub limiter: RefCell<Limiter>,
    /// This shard's typing budget per (user, channel).
    pub typing: RefCell<Limiter>,
    /// Senders that tell this shard's WebSocket sessions to close for a drain.
    pub closers: RefCell<Vec<oneshot::Sender<()>>>,
    /// Set when the shard sends its `closers`, just before: a session polls its drain
    /// receiver once to leave its waker there, and again only after this is set.
    pub closing: std::cell::Cell<bool>,
    /// The engine shard this context runs on.
    pub shard: u32,
}

impl ShardCtx {
    /// The context of a shard's connections.
    pub fn new(shared: Arc<Shared>, shard: u32) -> ShardCtx {
        let config = &shared.config;
        ShardCtx {
            limiter: RefCell::new(Limiter::new(config.rate_per_s, config.rate_burst)),
            typing: RefCell::new(Limiter::new(config.typing_per_s, 1.0)),
            shared,
            closers: RefCell::new(Vec::new()),
            closing: std::cell::Cell::new(false),
            shard,
        }
    }

    /// Registers a session to be told when the server drains.
    pub fn on_drain(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut closers = self.closers.borrow_mut();
        // Sessions that ended dropped their receivers; forget their senders now and then,
        // so the list stays about as long as the open sessions (amortized O(1) a push).
        if closers.len() >= 64 && closers.len().is_power_of_two() {
            closers.retain(|c| !c.is_canceled());
        }
        closers.push(tx);
        rx
    }

    /// Takes one unit of the user's rate budget.
    pub fn take_rate(&self, user: u64) -> Result<(), ApiError> {
        self.limiter
            .borrow_mut()
            .try_take(user, Instant::now())
            .map_err(|after| {
                self.shared.metrics.rate_limited.inc();
                ApiError::rate_limited(after)
            })
    }

    /// Whether the user may send a typing notice to the channel now. Extra notices are
    /// dropped quietly: typing is best effort, and clients send it on every keystroke.
    pub fn typing_allowed(&self, user: UserId, channel: ChannelId) -> bool {
        // Collisions merge two pairs' budgets, which is harmless.
        let key = user.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ channel.0;
        self.typing
            .borrow_mut()
            .try_take(key, Instant::now())
            .is_ok()
    }
}

impl crate::session::Limits for ShardCtx {
    fn take_rate(&self, user: UserId) -> Result<(), ApiError> {
        ShardCtx::take_rate(self, user.0)
    }

    fn typing_allowed(&self, user: UserId, channel: ChannelId) -> bool {
        ShardCtx::typing_allowed(self, user, channel)
    }
}

/// Open connections per source address, across all shards. Touched once when a
/// connection opens and once when it closes, never per request or frame.
pub struct ConnectionsPerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionsPerIp {
    /// A table admitting at most `max` connections per address.
    pub fn new(max: usize) -> ConnectionsPerIp {
        ConnectionsPerIp {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`, unless the address has its maximum open.
    pub fn admit(&self, ip: IpAddr) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Forgets a connection [`admit`](Self::admit) counted.
    pub fn release(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
        // A table that once held a flood of addresses gives its memory back.
        if open.capacity() > 64 && open.len() < open.capacity() / 4 {
            let keep = open.len() * 2;
            open.shrink_to(keep);
        }
    }
}

/// An authenticated caller: the user, and the device its token is bound to, if any
/// (`API.md` §14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: Option<String>,
}

/// The caller a request's token names: `Authorization: Bearer …` (the scheme in any case,
/// RFC 9110 §11.1) or `?token=…`. The account, and the device the token is bound to, must
/// exist now; see the module documentation.
pub async fn authenticate(
    ctx: &ShardCtx,
    headers: &hyper::http::HeaderMap,
    uri: &hyper::http::Uri,
) -> Result<Caller, ApiError> {
    let token = bearer(headers)
        .or_else(|| query_token(uri))
        .ok_or_else(|| ApiError::unauthorized("a bearer token is required"))?;
    authenticate_token(ctx, token).await
}

/// The caller a token names, if it is ours, intact, unexpired, and names an account (and a
/// device) that exists now. Transports that carry the token in a frame (QUIC's `auth`) call
/// this.
pub async fn authenticate_token(ctx: &ShardCtx, token: &str) -> Result<Caller, ApiError> {
    let sub = ctx
        .shared
        .tokens
        .verify(token, token_now())
        .map_err(|e| ApiError::unauthorized(format!("bad token: {e}")))?;
    let user: UserId = (sub.user)
        .parse()
        .map_err(|_| ApiError::unauthorized("bad token: unknown subject"))?;
    if !credential_live(&ctx.shared, user, sub.device.as_deref()).await? {
        let why = match sub.device {
            Some(_) => {
                "bad token: no such account or device (a removed device's tokens stop working)"
            }
            None => "bad token: no such account",
        };
        return Err(ApiError::unauthorized(why));
    }
    Ok(Caller {
        user,
        device: sub.device,
    })
}

/// Whether `user`'s account exists and, for a token bound to a device, the device is
/// registered and not removed, as of the request. On a cluster node a device is found live
/// only while the directory here is fresh (`crate::fresh`: a removal answered anywhere is
/// seen), and a refusal only once the directory has caught up with its leader (the account
/// or device may have been made a moment ago through another node; a genuine refusal
/// costs a barrier, as a 404 does). `unavailable` when a cluster node cannot tell.
pub async fn credential_live(
    shared: &Shared,
    user: UserId,
    device: Option<&str>,
) -> Result<bool, ApiError> {
    let engine = &shared.engine;
    let mut current = false;
    if let (Some(cluster), Some(_)) = (&shared.cluster, device) {
        current = cluster.fresh.current(engine).await?;
    }
    let mut live = engine.credential_live(user, device).await?;
    if !live && !current && shared.cluster.is_some() && engine.directory_barrier().await.is_ok() {
        live = engine.credential_live(user, device).await?;
    }
    Ok(live)
}

/// The credentials of an `Authorization: Bearer <token>` header, whatever the case of the
/// scheme.
fn bearer(headers: &hyper::http::HeaderMap) -> Option<&str> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn query_token(uri: &hyper::http::Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
}

/// Runs blocking work (password hashing, file I/O) off the shard's event loop, on glommio's
/// blocking pool: the shard keeps serving its other connections meanwhile.
pub(crate) async fn off_shard<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

/// The current time in seconds, for tokens.
pub fn token_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The scheme of an Authorization header is matched in any case, and nothing but a
    // bearer scheme with a token is taken.
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let of = |v: &str| {
            let mut h = hyper::http::HeaderMap::new();
            h.insert(hyper::header::AUTHORIZATION, v.parse().unwrap());
            bearer(&h).map(str::to_owned)
        };
        assert_eq!(of("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(of("bearer abc").as_deref(), Some("abc"));
        assert_eq!(of("BEARER  abc ").as_deref(), Some("abc"));
        assert_eq!(of("Basic abc"), None);
        assert_eq!(of("Bearer "), None);
        assert_eq!(of("Bearerabc"), None);
    }

    // The per-address table admits up to its maximum, and a released slot is reusable.
    #[test]
    fn connections_per_ip() {
        let t = ConnectionsPerIp::new(2);
        let a = IpAddr::from([127, 0, 0, 1]);
        let b = IpAddr::from([127, 0, 0, 2]);
        assert!(t.admit(a) && t.admit(a));
        assert!(!t.admit(a));
        assert!(t.admit(b));
        t.release(a);
        assert!(t.admit(a));
    }
}

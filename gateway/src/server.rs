//! The server: the engine, one HTTP/WebSocket listener per shard, and a graceful drain.
//!
//! Every shard binds the same address with `SO_REUSEPORT`, so the kernel spreads new
//! connections over the cores, and serves each connection on its own executor: HTTP through
//! hyper, WebSocket through tungstenite, and the connection's engine subscription on the
//! same shard. Nothing is shared between connections but the engine and atomic counters.
//!
//! SIGTERM (or SIGINT) drains: the listeners stop accepting, every WebSocket is closed with
//! "going away" (1001), requests in flight finish (their commits complete), then the engine
//! closes its logs and the process exits 0.

use crate::auth::Tokens;
use crate::config::Config;
use crate::ctx::{ConnectionsPerIp, ShardCtx, Shared};
use crate::guard::AuthGuard;
use crate::metrics::Metrics;
use chorus_engine::{Engine, EngineConfig};
use futures::channel::oneshot;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a drain waits for connections to finish before closing the engine anyway.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The engine failed.
    #[error("engine: {0}")]
    Engine(#[from] chorus_engine::EngineError),
    /// A socket or file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The search indexer's consumer name.
const SEARCH_CONSUMER: &str = "search-index";
/// The notification decider's consumer name.
const NOTIFY_CONSUMER: &str = "notify-decider";

/// Opens the engine: a single node's, or in a cluster (`API.md` §15) one whose partitions
/// and directory commit through their replication groups (`chorus_replication::ClusterEnv`),
/// with the directory's group numbered after the partitions'.
fn open_engine(
    config: &Config,
    mut engine_config: EngineConfig,
    s3: Option<&Arc<crate::files::store::S3>>,
) -> Result<(Engine, Option<crate::ctx::ClusterView>), ServeError> {
    let nodes = config.cluster_nodes().map_err(std::io::Error::other)?;
    let Some(nodes) = nodes else {
        let engine = match s3 {
            Some(s3) => Engine::open_with_blobs(
                engine_config,
                crate::files::store::S3BlobStore(s3.clone()),
            )?,
            None => Engine::open(engine_config)?,
        };
        return Ok((engine, None));
    };
    // Every node of a cluster shares the token secret: the cluster's id is derived from it,
    // so that nodes added later are of the same cluster and another cluster's are not.
    Tokens::load_or_create(&config.jwt_secret_path(), config.token_ttl_s)?;
    let secret = std::fs::read(config.jwt_secret_path())?;
    let shape = crate::api::members::Shape::of(config);
    let cluster_id = crate::api::members::cluster_id(&secret, shape);
    let membership = chorus_replication::transport::Membership {
        me: config.node_id,
        nodes: nodes.clone(),
        cluster: Some(cluster_id),
    };
    let mut node = chorus_replication::NodeConfig::new(membership, config.partitions + 1);
    if config.cluster_join {
        node.initial = None;
    }
    node.members = chorus_replication::members::Members::new(nodes.clone());
    // The members ask last applied, if any: a node that restarts goes on moving its groups
    // there, and knows the addresses of nodes added since `--cluster` was written.
    if let Some((ask, nodes)) = crate::api::members::load(&config.data_dir)? {
        if !nodes.contains_key(&config.node_id) {
            // Its groups were taken from it: what it holds is no longer kept current, and
            // serving it would serve the past.
            let removed =
                crate::api::members::removed(config.node_id, ask, &nodes, &config.data_dir);
            return Err(std::io::Error::other(removed).into());
        }
        node.members.apply(ask, &nodes);
    }
    // A failed write or fsync stops the node (see `chorus_replication::OnStorageError`); a
    // log found inconsistent stops only its group, as a restart would find it so again.
    node.on_storage_error = chorus_replication::OnStorageError(Some(Arc::new(|group, e| {
        if !matches!(e, chorus_replication::RaftLogError::Corrupt(_)) {
            eprintln!("chorus: group {group} failed on its storage ({e}); the node stops");
            std::process::exit(STORAGE_FAILED_EXIT);
        }
    })));
    let disk = chorus_log::DiskFaults::default();
    if let Some(file) = &config.cluster_fault_file {
        let (members, cuts) = (node.members.clone(), node.cuts.clone());
        follow_fault_file(file.clone(), members, cuts, disk.clone());
    }
    let admin_key = match &config.cluster_admin_key_file {
        Some(path) => Some(std::fs::read(path)?),
        None => None,
    };
    let view = crate::ctx::ClusterView {
        me: config.node_id,
        id: cluster_id,
        members: node.members.clone(),
        admin_key,
        board: node.board.clone(),
        calls: node.calls.clone(),
        cuts: node.cuts.clone(),
        fresh: Default::default(),
    };
    let root = chorus_log::FaultyRoot::new(chorus_log::DiskRoot::new(&config.data_dir), disk);
    // The partitions' event logs share the disk with the journals and are synced only
    // before a snapshot: as little zeroed ahead as keeps their appends off kernel workers.
    engine_config.log_preallocate_bytes = chorus_replication::EVENTS_PREALLOCATE_BYTES;
    let engine = match s3 {
        Some(s3) => {
            // Every node reads and writes the one bucket: nothing to copy between them.
            node.replicate_blobs = false;
            Engine::open_on(
                engine_config,
                root,
                crate::files::store::S3BlobStore(s3.clone()),
                in_cluster(node),
            )?
        }
        None => {
            std::fs::create_dir_all(&config.data_dir)?;
            let blobs = chorus_engine::blob::DiskBlobStore::open(&config.data_dir.join("blobs"))?;
            Engine::open_on(engine_config, root, blobs, in_cluster(node))?
        }
    };
    Ok((engine, Some(view)))
}

/// How often the fault file is read.
const FAULT_FILE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// How a cluster node exits when a storage error stops it: `EX_IOERR` of `sysexits.h`.
pub const STORAGE_FAILED_EXIT: i32 = 74;

/// Fault tests of real processes: cuts this node off from the nodes the lines `cut N` of
/// `file` name, and makes every fsync of its data directory fail while a line
/// `fsync fails` is there, as long as they are there (a missing file cuts nothing), for
/// the process's life, on a thread of its own. Nodes added to the cluster later can be
/// cut too.
fn follow_fault_file(
    file: std::path::PathBuf,
    members: chorus_replication::members::Members,
    cuts: chorus_replication::transport::Cuts,
    disk: chorus_log::DiskFaults,
) {
    std::thread::spawn(move || loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let cut: Vec<u64> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cut ")?.trim().parse().ok())
            .collect();
        for n in members.addresses().into_keys() {
            cuts.set(n, cut.contains(&n));
        }
        disk.set_fsync_fails(text.lines().any(|l| l.trim() == "fsync fails"));
        std::thread::sleep(FAULT_FILE_EVERY);
    });
}

/// A cluster node's data directory: the disk, through a fault layer that fault tests can
/// switch on (the fault file's `fsync fails`).
type ClusterRoot = chorus_log::FaultyRoot<chorus_log::DiskRoot>;

/// Each shard's environment on a cluster node: the real one with the shard's groups.
fn in_cluster<B>(
    node: chorus_replication::NodeConfig,
) -> impl Fn(
    chorus_engine::shard::ShardContext,
    chorus_engine::env::GlommioEnv<ClusterRoot, B>,
) -> chorus_replication::ClusterEnv<ClusterRoot, B>
       + Send
       + Sync
       + 'static
where
    B: chorus_engine::blob::BlobStore + Clone + 'static,
{
    move |ctx, env| chorus_replication::ClusterEnv::new(env, &node, ctx.id as u32)
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub fn serve(config: Config) -> Result<(), ServeError> {
    let shards = config.shard_count();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let metrics = Arc::new(Metrics::default());
    let mut engine_config = EngineConfig::new(&config.data_dir);
    engine_config.observer = chorus_engine::ObserverSlot(Some(Arc::new(EngineMetrics {
        metrics: metrics.clone(),
        slow_writes: crate::metrics::Throttle::new(Duration::from_secs(1)),
    })));
    engine_config.shards = shards;
    engine_config.partitions = config.partitions;
    engine_config.subscriber_queue_frames = config.ws_outbound_frames_max;
    engine_config.presence_offline_grace =
        std::time::Duration::from_secs(config.presence_offline_grace_s);
    engine_config.presence_flush = std::time::Duration::from_millis(config.presence_flush_ms);
    engine_config.consumers = vec![
        crate::workspace_metrics::CONSUMER_NAME.to_owned(),
        SEARCH_CONSUMER.to_owned(),
    ];
    // The decider runs only where pushes or emails can go: a declared consumer that never
    // reads would pin every log (the retention watermark).
    let notifying = !config.push_gateway_url.is_empty() || !config.smtp_url.is_empty();
    if notifying {
        engine_config.consumers.push(NOTIFY_CONSUMER.to_owned());
    }
    // The ports first: a server that cannot listen must not have opened the data.
    let (addr, reserve) = reserve_port(config.http, socket2::Type::STREAM)?;
    let (quic_addr, reserve_quic) = reserve_port(config.quic, socket2::Type::DGRAM)?;
    crate::memory::tune_allocator();
    // With an S3 bucket configured, message bodies over 64 KiB go there too.
    let s3 = match config.s3_config() {
        Some(c) => Some(Arc::new(crate::files::store::S3::connect(&c)?)),
        None => None,
    };
    let (engine, cluster) = open_engine(&config, engine_config, s3.as_ref())?;
    let search = chorus_search::Search::open(&config.data_dir.join("search"))
        .map_err(std::io::Error::other)?;
    metrics.set_search(search.clone());
    let tokens = Tokens::load_or_create(&config.jwt_secret_path(), config.token_ttl_s)?;
    let files = crate::files::Files::open(&config, engine.clone(), metrics.clone(), s3.clone())?;
    let mut sources = crate::files::search_sources::SearchSources {
        blobs: match s3 {
            Some(s3) => {
                crate::files::search_sources::Blobs::S3(crate::files::store::S3BlobStore(s3))
            }
            None => crate::files::search_sources::Blobs::Disk(config.data_dir.join("blobs")),
        },
        store: files.store.clone(),
        exe: std::env::current_exe()?,
        limits: files.limits,
        metrics: metrics.clone(),
        peers: None,
    };
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        config: config.clone(),
        tokens,
        metrics,
        draining: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        quic_sessions: AtomicUsize::new(0),
        per_ip: ConnectionsPerIp::new(config.connections_per_ip_max),
        guard: AuthGuard::new(&config),
        files,
        search: search.clone(),
        notify_gate: (notifying && cluster.is_some())
            .then(|| Arc::new(chorus_notify::cluster::Gate::new())),
        cluster,
    });
    let stop_housekeeping = Arc::new(AtomicBool::new(false));
    let housekeeper = {
        let shared = shared.clone();
        let open = move || shared.connections.load(Ordering::Relaxed);
        crate::memory::housekeeper(open, stop_housekeeping.clone())?
    };
    let quic = quic_setup(&config, shards)?;
    let mut stops = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (shard, forwarded) in quic.1.into_iter().enumerate() {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        stops.push(stop_tx);
        let (shared, ready) = (shared.clone(), ready_tx.clone());
        let listen = Listen {
            http: addr,
            quic: quic_addr,
            quic_setup: quic.0.clone(),
            forwarded,
        };
        futures::executor::block_on(engine.spawn_on(shard, move || {
            shard_main(shared, shard, listen, stop_rx, ready)
        }))?;
    }
    drop(ready_tx);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ServeError::Io(e)),
            Err(_) => return Err(std::io::Error::other("a listener did not start").into()),
        }
    }
    drop(reserve);
    drop(reserve_quic);
    let (stop_counting, counted) = start_workspace_metrics(&shared)?;
    let following = start_following_members(&shared)?;
    if shared.cluster.is_some() {
        sources.peers = Some(shared.clone());
        shared.files.previews.in_cluster(&shared);
    }
    let (stop_indexing, indexer) = {
        let (tx, rx) = oneshot::channel();
        let config = chorus_search::indexer::IndexerConfig {
            engine: engine.clone(),
            consumer: SEARCH_CONSUMER.to_owned(),
            sources: Arc::new(sources),
        };
        (tx, chorus_search::indexer::spawn(search, config, rx)?)
    };
    let notifier = match notifying {
        true => Some(chorus_notify::start(
            &engine,
            NOTIFY_CONSUMER,
            &config.data_dir.join("notify"),
            notify_settings(&config, &shared.metrics, shared.notify_gate.clone()),
        )?),
        false => None,
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening http={addr} quic={quic_addr}")?;
        out.flush()?;
    }
    tracing::info!(%addr, %quic_addr, shards, "serving");
    let mut signals = signals;
    let signal = signals.forever().next();
    tracing::info!(?signal, "draining");
    shared.draining.store(true, Ordering::SeqCst);
    for stop in stops {
        let _ = stop.send(());
    }
    let deadline = std::time::Instant::now() + DRAIN_WAIT;
    let open =
        || shared.connections.load(Ordering::SeqCst) + shared.quic_sessions.load(Ordering::SeqCst);
    while open() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = stop_counting.send(());
    let _ = counted.recv_timeout(DRAIN_WAIT);
    if let Some((stop, done)) = following {
        let _ = stop.send(());
        let _ = done.recv_timeout(DRAIN_WAIT);
    }
    // The indexer commits what it has read and stops before the engine does.
    let _ = stop_indexing.send(());
    let _ = indexer.join();
    if let Some(n) = notifier {
        n.stop();
    }
    stop_housekeeping.store(true, Ordering::Relaxed);
    housekeeper.thread().unpark();
    let _ = housekeeper.join();
    engine.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Feeds the engine's reports into the server's metrics, and warns of a stalled disk.
struct EngineMetrics {
    metrics: Arc<Metrics>,
    /// The warnings of slow durable writes, at most one a second.
    slow_writes: crate::metrics::Throttle,
}

impl chorus_engine::Observer for EngineMetrics {
    fn committed(&self, events: usize, latency: Duration) {
        self.metrics.commits.add(events as u64);
        self.metrics.fsync_latency_seconds.observe_duration(latency);
        if latency >= crate::metrics::SLOW_WRITE
            && self.slow_writes.allow(std::time::Instant::now())
        {
            tracing::warn!(
                ms = latency.as_millis() as u64,
                events,
                "a durable batch write was slow: the disk stalled (at most one such warning a second)"
            );
        }
    }

    fn delivered(&self, frames: usize) {
        self.metrics.deliveries.add(frames as u64);
    }

    fn cut_off(&self) {
        self.metrics.slow_consumer_disconnects.inc();
    }

    fn queue_depth(&self, delta: i64) {
        self.metrics.queue_depth.add(delta);
    }
}

/// The QUIC settings every shard shares, and each shard's queue of forwarded datagrams.
fn quic_setup(
    config: &Config,
    shards: usize,
) -> Result<
    (
        Arc<crate::quic::QuicSetup>,
        Vec<futures::channel::mpsc::Receiver<crate::quic::Forwarded>>,
    ),
    ServeError,
> {
    if shards > crate::quic::cid::SHARDS_MAX {
        return Err(std::io::Error::other("QUIC connection IDs name at most 256 shards").into());
    }
    let configured = config
        .quic_cert_file
        .as_deref()
        .zip(config.quic_key_file.as_deref());
    let identity = crate::quic::cert::load_or_create(configured, &config.data_dir)?;
    tracing::info!(
        sha256 = %identity.fingerprint(),
        "QUIC certificate fingerprint (pin it in clients)"
    );
    let (router, forwarded) = crate::quic::Router::new(shards);
    let setup = crate::quic::QuicSetup::new(identity, router)?;
    Ok((Arc::new(setup), forwarded))
}

/// Where a shard listens.
struct Listen {
    http: SocketAddr,
    quic: SocketAddr,
    quic_setup: Arc<crate::quic::QuicSetup>,
    forwarded: futures::channel::mpsc::Receiver<crate::quic::Forwarded>,
}

/// One shard's listeners: binds HTTP and QUIC, then accepts until the drain, serving each
/// connection on this shard.
async fn shard_main(
    shared: Arc<Shared>,
    shard: usize,
    listen: Listen,
    stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let bound = glommio::net::TcpListener::bind(listen.http).and_then(|tcp| {
        let udp = glommio::net::UdpSocket::bind(listen.quic)?;
        crate::quic::size_socket_buffers(&udp);
        Ok((tcp, udp))
    });
    let (listener, udp) = match bound {
        Ok(b) => {
            let _ = ready.send(Ok(()));
            b
        }
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::other(e.to_string())));
            return;
        }
    };
    let ctx = Rc::new(ShardCtx::new(shared, shard as u32));
    if shard == 0 {
        glommio::spawn_local(crate::files::sweep::run(ctx.clone())).detach();
        glommio::spawn_local(crate::api::notify_peers::run(ctx.clone())).detach();
    }
    if let Some(cluster) = &ctx.shared.cluster {
        let calls = cluster.calls.serve(shard as u32);
        glommio::spawn_local(crate::api::serve_calls(ctx.clone(), calls)).detach();
        let notices = cluster.calls.notices(shard as u32);
        glommio::spawn_local(crate::api::serve_notices(ctx.clone(), notices)).detach();
    }
    let (stop_quic, quic_stopped) = oneshot::channel();
    let quic = glommio::spawn_local(crate::quic::serve_shard(
        ctx.clone(),
        listen.quic_setup,
        shard,
        udp,
        listen.forwarded,
        quic_stopped,
    ));
    accept_loop(&ctx, listener, stop).await;
    let _ = stop_quic.send(());
    // Tell the sessions of this shard, WebSocket and QUIC, to go away.
    ctx.closing.set(true);
    for closer in ctx.closers.borrow_mut().drain(..) {
        let _ = closer.send(());
    }
    quic.await;
}

/// Binds the address once, without listening, to learn the port (when it is 0) and keep
/// it while the shards bind it with `SO_REUSEPORT`. A reserved UDP socket is in the
/// port's group and may take a datagram meant for a shard before it is dropped, which is
/// before the server says it listens.
///
/// `SO_REUSEPORT` would also let a second server bind the same port and take half of its
/// clients, so the server first makes sure nobody else serves there, and refuses to start
/// if someone does: for TCP, a connection to the port must be refused (binding exclusively
/// would also fail for the closing connections a killed predecessor left); for UDP, the
/// port must be free to bind exclusively.
fn reserve_port(
    addr: SocketAddr,
    kind: socket2::Type,
) -> std::io::Result<(SocketAddr, socket2::Socket)> {
    let in_use = |e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{addr} is in use by another process: {e}"),
        )
    };
    let domain = socket2::Domain::for_address(addr);
    let mut addr = addr;
    if kind == socket2::Type::STREAM && addr.port() != 0 {
        if std::net::TcpStream::connect_timeout(&addr, PORT_PROBE_TIMEOUT).is_ok() {
            return Err(in_use(&"a server accepts connections there"));
        }
    } else if kind == socket2::Type::DGRAM {
        let exclusive = socket2::Socket::new(domain, kind, None)?;
        exclusive.bind(&addr.into()).map_err(|e| in_use(&e))?;
        // For port 0, the port the exclusive bind got is the one to share between the
        // shards: a port-0 bind with SO_REUSEPORT may be given a port that another
        // process of the same user already shares that way (two servers on one QUIC
        // port, each getting the other's handshakes), where a plain one is not.
        if let Some(got) = exclusive.local_addr()?.as_socket() {
            addr = got;
        }
    }
    let s = socket2::Socket::new(domain, kind, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    let bound = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((bound, s))
}

/// How long the check for another server on the HTTP port waits for a connection.
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// Accepts HTTP and WebSocket connections until `stop`, serving each on this shard.
async fn accept_loop(
    ctx: &Rc<ShardCtx>,
    listener: glommio::net::TcpListener,
    stop: oneshot::Receiver<()>,
) {
    let mut stop = stop;
    loop {
        let accepted = {
            let accept = std::pin::pin!(listener.accept());
            match futures::future::select(accept, &mut stop).await {
                futures::future::Either::Left((r, _)) => r,
                futures::future::Either::Right(_) => break,
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let Some(ip) = admit(&ctx.shared, &stream) else {
            drop(stream);
            continue;
        };
        ctx.shared.metrics.connection_opened();
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        // Made before the task, so that the task holds the connection's future and not
        // the socket besides.
        let serving = crate::conn::serve(ctx.clone(), stream);
        glommio::spawn_local(async move {
            serving.await;
            release(&ctx.shared, ip);
            ctx.shared.metrics.connection_closed();
        })
        .detach();
    }
}

/// Counts a new connection against `connections_max` and its address's
/// `connections_per_ip_max`; `None` (and nothing counted) if either is reached. Returns the
/// address to release when the connection ends.
fn admit(shared: &Shared, stream: &glommio::net::TcpStream) -> Option<std::net::IpAddr> {
    let ip = match stream.peer_addr() {
        Ok(peer) => peer.ip(),
        Err(e) => {
            tracing::debug!(error = %e, "accepted a connection without a peer address");
            return None;
        }
    };
    let open = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
    if open > shared.config.connections_max {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(open, "connection limit reached; refusing");
        return None;
    }
    if !shared.per_ip.admit(ip) {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(%ip, "connection limit of one address reached; refusing");
        return None;
    }
    Some(ip)
}

fn release(shared: &Shared, ip: std::net::IpAddr) {
    shared.per_ip.release(ip);
    shared.connections.fetch_sub(1, Ordering::SeqCst);
}

/// What the notifier sends through, from the configuration: an empty key is off.
fn notify_settings(
    config: &Config,
    metrics: &Metrics,
    gate: Option<Arc<chorus_notify::cluster::Gate>>,
) -> chorus_notify::Settings {
    let set = |v: &str| Some(v.to_owned()).filter(|v| !v.is_empty());
    chorus_notify::Settings {
        push_gateway_url: set(&config.push_gateway_url),
        email: set(&config.smtp_url).map(|smtp_url| chorus_notify::email::EmailConfig {
            smtp_url,
            from: config.email_from.clone(),
            public_url: config.public_url.clone(),
        }),
        emails_sent: metrics.notify_emails_sent.clone(),
        stats: metrics.notify.clone(),
        gate,
    }
}

/// Starts the per-workspace message counter on shard 0. Returns its stop signal and the
/// channel on which it says it stored its last counts.
/// A background task's stop, and what says it stopped.
type Stopper = (oneshot::Sender<()>, std::sync::mpsc::Receiver<()>);

/// On a cluster node, the task that applies the members asks its directory holds
/// ([`crate::api::members::follow`]).
fn start_following_members(shared: &Arc<Shared>) -> Result<Option<Stopper>, ServeError> {
    if shared.cluster.is_none() {
        return Ok(None);
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let following = shared.clone();
    futures::executor::block_on(shared.engine.spawn_on(0, move || async move {
        crate::api::members::follow(following, stop_rx).await;
        let _ = done_tx.send(());
    }))?;
    Ok(Some((stop_tx, done_rx)))
}

fn start_workspace_metrics(shared: &Arc<Shared>) -> Result<Stopper, ServeError> {
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let engine = shared.engine.clone();
    let metrics = shared.metrics.clone();
    let path = crate::workspace_metrics::state_path(&shared.config.data_dir);
    futures::executor::block_on(shared.engine.spawn_on(0, move || async move {
        crate::workspace_metrics::run(engine, metrics, path, stop_rx).await;
        let _ = done_tx.send(());
    }))?;
    Ok((stop_tx, done_rx))
}

//! The decider against a real engine on a temporary directory: what it decides, counted in
//! the outbox (a push gateway that refuses connections answers nothing, so every decided
//! push stays in the outbox).

use chorus_engine::domain::notify::DeviceInput;
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::{ChannelId, UserId, WorkspaceId};
use chorus_engine::{Engine, EngineConfig};
use futures::executor::block_on;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Members of the channel besides its owner: enough that the metadata log (users,
/// workspace members, devices) takes several pages to read.
const MEMBERS: usize = 3_000;
/// Engine requests in flight while seeding.
const SEED_BATCH: usize = 256;
/// How long the decider may take to decide every push (a guard, not a measurement).
const DECIDE_WAIT: Duration = Duration::from_secs(60);
/// How long the count must stay put after reaching its target.
const SETTLE: Duration = Duration::from_millis(500);

fn open(dir: &Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    config.consumers = vec!["notify".into()];
    Engine::open(config).expect("open engine")
}

/// The owner of a new workspace `acme` and of its public channel `all`: their IDs.
fn acme(engine: &Engine) -> (UserId, WorkspaceId, ChannelId) {
    let owner = block_on(engine.create_user("owner@example.com", "owner", "h"))
        .expect("owner")
        .id;
    let workspace = block_on(engine.create_workspace(owner, "acme"))
        .expect("workspace")
        .id;
    let channel = block_on(engine.create_channel(owner, workspace, "all", ChannelKind::Public))
        .expect("channel")
        .id;
    (owner, workspace, channel)
}

/// A push device with this push key.
fn push_device(pushkey: &str) -> DeviceInput {
    DeviceInput {
        app_id: "chat.test".into(),
        pushkey: pushkey.into(),
        platform: "fcm".into(),
    }
}

/// Runs `f` for each of `0..n`, [`SEED_BATCH`] at a time.
fn fan<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(SEED_BATCH) {
        let batch = (start..n.min(start + SEED_BATCH)).map(&f);
        out.extend(block_on(futures::future::join_all(batch)));
    }
    out
}

// A first start on a directory seeded before it: the decider reads the metadata log and
// the partitions at once, and the partition's page (the members and an `@channel` posted
// before the decider started) can come before every device is read. Each member's device
// was committed before the message, so each gets its push.
#[test]
fn a_message_is_decided_with_every_device_committed_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let (owner, workspace, channel) = acme(&engine);
    let users: Vec<UserId> = fan(MEMBERS, |i| {
        let engine = &engine;
        async move {
            let email = format!("u{i}@example.com");
            let user = engine
                .create_user(&email, &format!("u{i}"), "h")
                .await
                .expect("user")
                .id;
            engine
                .add_member(owner, workspace, &email)
                .await
                .expect("workspace member");
            user
        }
    });
    fan(MEMBERS, |i| {
        let (engine, user) = (&engine, users[i]);
        async move {
            engine.join(user, channel).await.expect("join");
            let device = push_device(&format!("key-{i}"));
            engine.add_push_device(user, device).await.expect("device");
        }
    });
    engine.shutdown();

    let engine = open(dir.path());
    block_on(engine.post(owner, channel, "@channel hello", None, None)).expect("post");
    let settings = chorus_notify::Settings {
        // A port nothing listens on: every push waits in the outbox, retried.
        push_gateway_url: Some("http://127.0.0.1:9/_matrix/push/v1/notify".into()),
        ..chorus_notify::Settings::default()
    };
    let stats = Arc::clone(&settings.stats);
    let notifier = chorus_notify::start(&engine, "notify", &dir.path().join("notify"), settings)
        .expect("notifier");
    let started = Instant::now();
    let depth = || stats.outbox_depth.load(Relaxed);
    while depth() < MEMBERS as u64 && started.elapsed() < DECIDE_WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(SETTLE);
    assert_eq!(
        depth(),
        MEMBERS as u64,
        "one push per member's device, the author excluded"
    );
    notifier.stop();
    engine.shutdown();
}

/// Members of the channel in the snapshot test.
const SNAPSHOT_MEMBERS: usize = 50;

/// Starts the notifier on `engine` with pushes that wait in the outbox; its stats.
fn notifier(engine: &Engine, dir: &Path) -> (chorus_notify::Notifier, Arc<chorus_notify::Stats>) {
    let settings = chorus_notify::Settings {
        push_gateway_url: Some("http://127.0.0.1:9/_matrix/push/v1/notify".into()),
        ..chorus_notify::Settings::default()
    };
    let stats = Arc::clone(&settings.stats);
    let n =
        chorus_notify::start(engine, "notify", &dir.join("notify"), settings).expect("notifier");
    (n, stats)
}

/// Waits until the outbox holds `n` items, and checks it stays there.
#[track_caller]
fn wait_depth(stats: &chorus_notify::Stats, n: u64) {
    let started = Instant::now();
    while stats.outbox_depth.load(Relaxed) < n && started.elapsed() < DECIDE_WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(SETTLE);
    assert_eq!(stats.outbox_depth.load(Relaxed), n);
}

// The decider stores a snapshot of its state when it stops; a restart loads it, reads the
// logs from where it ends, and acknowledges that to the engine, so retention may delete
// what lies before. Messages after the restart are decided from the loaded state exactly
// as before (every member's device, committed before the snapshot, gets its push), and a
// damaged snapshot is ignored for the logs read whole, deciding the same.
#[test]
fn a_restart_loads_the_snapshot_and_acknowledges_where_it_ends() {
    use chorus_engine::LogId;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let (owner, workspace, channel) = acme(&engine);
    fan(SNAPSHOT_MEMBERS, |i| {
        let engine = &engine;
        async move {
            let email = format!("s{i}@example.com");
            let user = engine.create_user(&email, "s", "h").await.expect("user").id;
            engine
                .add_member(owner, workspace, &email)
                .await
                .expect("member");
            engine.join(user, channel).await.expect("join");
            let device = push_device(&format!("key-{i}"));
            engine.add_push_device(user, device).await.expect("device");
        }
    });
    let (n, stats) = notifier(&engine, dir.path());
    block_on(engine.post(owner, channel, "@channel one", None, None)).expect("post");
    wait_depth(&stats, SNAPSHOT_MEMBERS as u64);
    n.stop();
    let snap = dir.path().join("notify").join("decider.snap");
    assert!(snap.exists(), "a snapshot at stop");
    engine.shutdown();

    let engine = open(dir.path());
    assert_eq!(
        engine.retention_watermark(LogId::Meta),
        0,
        "nothing acknowledged yet"
    );
    let (n, stats) = notifier(&engine, dir.path());
    assert!(
        engine.retention_watermark(LogId::Meta) > 0,
        "acknowledged at load"
    );
    let partition = chorus_engine::domain::meta::partition_of(channel);
    assert!(engine.retention_watermark(LogId::Partition(partition)) > 0);
    block_on(engine.post(owner, channel, "@channel two", None, None)).expect("post");
    wait_depth(&stats, 2 * SNAPSHOT_MEMBERS as u64);
    n.stop();
    engine.shutdown();

    let mut bytes = std::fs::read(&snap).expect("snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&snap, bytes).expect("damage");
    let engine = open(dir.path());
    let (n, stats) = notifier(&engine, dir.path());
    block_on(engine.post(owner, channel, "@channel three", None, None)).expect("post");
    wait_depth(&stats, 3 * SNAPSHOT_MEMBERS as u64);
    n.stop();
    engine.shutdown();
}

// Pushes decided while a push gateway was configured wait in the outbox; a start without
// one sends none of them, and its outbox depth leaves them out rather than counting items
// nothing will ever answer. They are still there for a start that has a gateway again.
#[test]
fn the_depth_counts_only_kinds_that_have_a_sender() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let (owner, workspace, channel) = acme(&engine);
    let user = block_on(engine.create_user("m@example.com", "m", "h"))
        .expect("user")
        .id;
    block_on(engine.add_member(owner, workspace, "m@example.com")).expect("member");
    block_on(engine.join(user, channel)).expect("join");
    block_on(engine.add_push_device(user, push_device("key-m"))).expect("device");
    let (n, stats) = notifier(&engine, dir.path());
    block_on(engine.post(owner, channel, "@channel hello", None, None)).expect("post");
    wait_depth(&stats, 1);
    n.stop();

    let settings = chorus_notify::Settings::default();
    let stats = Arc::clone(&settings.stats);
    let n = chorus_notify::start(&engine, "notify", &dir.path().join("notify"), settings)
        .expect("notifier without a gateway");
    assert_eq!(stats.outbox_depth.load(Relaxed), 0);
    n.stop();

    let (n, stats) = notifier(&engine, dir.path());
    assert_eq!(
        stats.outbox_depth.load(Relaxed),
        1,
        "still waiting for a gateway"
    );
    n.stop();
    engine.shutdown();
}

//! Seeding a fresh data directory through the embedded engine, and minting tokens with the
//! server's own key.
//!
//! Signing up 100,000 users over REST would cost 100,000 argon2id hashes (about 40 ms of
//! CPU each), an hour on this machine, and the benchmark would measure password hashing.
//! Instead the harness opens the engine on the data directory the server will use, with
//! the same partition count, creates the users (all with one precomputed hash), the
//! workspace, the channels, the memberships and any history there, and closes it. Tokens
//! are then minted with the key file the server loads at start (`jwt.key`), so they are
//! exactly the tokens a login would have returned.

use super::server::ServerSettings;
use anyhow::Context;
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::{ChannelId, UserId, WorkspaceId};
use chorus_engine::{Engine, EngineConfig, EngineError};
use futures::executor::block_on;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::ProgressBar;
use std::future::Future;
use std::path::Path;

/// The password hash every seeded user gets. No one logs in with it: tokens are minted.
const PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$YmVuY2hzYWx0$bm90LWEtcmVhbC1oYXNo";
/// Engine calls kept in flight while seeding; a partition takes up to 1,024 per commit.
const SEED_IN_FLIGHT: usize = 2_048;

/// Who and what a seeded data directory holds.
#[derive(Clone, Debug)]
pub struct Population {
    /// The workspace owner, who created every channel.
    pub owner: UserId,
    /// The one workspace.
    pub workspace: WorkspaceId,
    /// The other users, by index.
    pub users: Vec<UserId>,
    /// The channels, by index.
    pub channels: Vec<ChannelId>,
}

/// Opens the engine on `data_dir` with the partition and shard counts the server will use.
pub fn open_engine(data_dir: &Path, settings: &ServerSettings) -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new(data_dir);
    config.shards = settings.shards;
    config.partitions = settings.partitions;
    // The seeding process shares the cores with whatever else runs; pinning buys nothing.
    config.pin = false;
    Engine::open(config).context("open the engine to seed the data directory")
}

/// `users` users in one workspace; user `i` is in channel `i / members` (the owner created
/// the channels and left them, so each holds exactly its members). With `members == 0` the
/// users are in no channel.
pub fn users_in_channels(
    engine: &Engine,
    users: usize,
    members: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Population> {
    let (owner, workspace) = block_on(owner_and_workspace(engine))?;
    let ids = create_users(engine, owner, workspace, users, progress)?;
    let channel_count = if members == 0 {
        0
    } else {
        users.div_ceil(members)
    };
    let channels = public_channels(engine, owner, workspace, channel_count, progress)?;
    let (ids_ref, channels_ref) = (&ids, &channels);
    fan(
        progress,
        "join channels",
        users * usize::from(members > 0),
        |i| async move { engine.join(ids_ref[i], channels_ref[i / members]).await },
    )?;
    fan(progress, "owner leaves", channel_count, |c| async move {
        engine
            .remove_channel_member(owner, channels_ref[c], owner)
            .await
    })?;
    Ok(Population {
        owner,
        workspace,
        users: ids,
        channels,
    })
}

/// One channel holding the owner and `others` more users.
pub fn one_big_channel(
    engine: &Engine,
    others: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Population> {
    let (owner, workspace) = block_on(owner_and_workspace(engine))?;
    let ids = create_users(engine, owner, workspace, others, progress)?;
    let channel = block_on(engine.create_channel(owner, workspace, "all", ChannelKind::Public))?;
    let ids_ref = &ids;
    fan(progress, "join channel", others, |i| async move {
        engine.join(ids_ref[i], channel.id).await
    })?;
    Ok(Population {
        owner,
        workspace,
        users: ids,
        channels: vec![channel.id],
    })
}

/// `users` users in one workspace, each a member of every one of `channels` public
/// channels (named `c0`, `c1`, …), which the owner created and stays in.
pub fn users_in_every_channel(
    engine: &Engine,
    users: usize,
    channels: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Population> {
    let (owner, workspace) = block_on(owner_and_workspace(engine))?;
    let ids = create_users(engine, owner, workspace, users, progress)?;
    let made = public_channels(engine, owner, workspace, channels, progress)?;
    let (ids_ref, made_ref) = (&ids, &made);
    fan(
        progress,
        "join channels",
        users * channels,
        |i| async move { engine.join(ids_ref[i % users], made_ref[i / users]).await },
    )?;
    Ok(Population {
        owner,
        workspace,
        users: ids,
        channels: made,
    })
}

/// `count` public channels `c0`, `c1`, … created by `owner`.
fn public_channels(
    engine: &Engine,
    owner: UserId,
    workspace: WorkspaceId,
    count: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<ChannelId>> {
    fan(progress, "create channels", count, |c| async move {
        let name = format!("c{c}");
        let channel = engine
            .create_channel(owner, workspace, &name, ChannelKind::Public)
            .await?;
        Ok(channel.id)
    })
}

/// Posts `count` messages of `body_bytes` into `channel` as `user`, as fast as the engine
/// commits them.
pub fn post_history(
    engine: &Engine,
    user: UserId,
    channel: ChannelId,
    count: usize,
    body_bytes: usize,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    fan(progress, "post history", count, |i| async move {
        let mut text = format!("history message {i} ");
        text.extend(std::iter::repeat_n(
            'h',
            body_bytes.saturating_sub(text.len()),
        ));
        engine
            .post(user, channel, &text, None, None)
            .await
            .map(drop)
    })?;
    Ok(())
}

/// One `fcm` push device for each of `users` (app `chorus.bench`, push key
/// `bench-key-INDEX`), registered through the engine as `POST /me/push-devices` would.
pub fn push_devices(
    engine: &Engine,
    users: &[UserId],
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    fan(progress, "push devices", users.len(), |i| async move {
        let device = chorus_engine::domain::notify::DeviceInput {
            app_id: "chorus.bench".into(),
            pushkey: format!("bench-key-{i}"),
            platform: "fcm".into(),
        };
        engine.add_push_device(users[i], device).await.map(drop)
    })?;
    Ok(())
}

/// A public channel `name` created by `owner` in `workspace`, which `others` join.
pub fn small_channel(
    engine: &Engine,
    owner: UserId,
    workspace: WorkspaceId,
    name: &str,
    others: &[UserId],
) -> anyhow::Result<ChannelId> {
    let channel = block_on(engine.create_channel(owner, workspace, name, ChannelKind::Public))?;
    for user in others {
        block_on(engine.join(*user, channel.id))?;
    }
    Ok(channel.id)
}

/// Mints a token for each of `users` with the server's key in `data_dir`, creating the key
/// as the server would on its first start.
pub fn mint_tokens(data_dir: &Path, users: &[UserId]) -> anyhow::Result<Vec<String>> {
    let key = data_dir.join(chorus_gateway::config::JWT_SECRET_FILE_NAME);
    let tokens = chorus_gateway::auth::Tokens::load_or_create(
        &key,
        chorus_gateway::config::TOKEN_TTL_S_DEFAULT,
    )
    .context("create the server's JWT key")?;
    let now_s = super::schedule::wall_ns() / 1_000_000_000;
    Ok(users
        .iter()
        .map(|u| tokens.issue(&u.to_string(), None, now_s))
        .collect())
}

async fn owner_and_workspace(engine: &Engine) -> Result<(UserId, WorkspaceId), EngineError> {
    let owner = engine
        .create_user("owner@bench.example", "Owner", PASSWORD_HASH)
        .await?;
    let workspace = engine.create_workspace(owner.id, "bench").await?;
    Ok((owner.id, workspace.id))
}

fn create_users(
    engine: &Engine,
    owner: UserId,
    workspace: WorkspaceId,
    count: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<UserId>> {
    let ids = fan(progress, "create users", count, |i| async move {
        let email = format!("user{i}@bench.example");
        let user = engine
            .create_user(&email, &format!("User {i}"), PASSWORD_HASH)
            .await?;
        Ok(user.id)
    })?;
    fan(progress, "add to workspace", count, |i| async move {
        let email = format!("user{i}@bench.example");
        engine.add_member(owner, workspace, &email).await.map(drop)
    })?;
    Ok(ids)
}

/// Runs `call(i)` for every `i` in `0..count` with [`SEED_IN_FLIGHT`] calls in flight, and
/// returns the results in index order; the first failure ends the seeding.
fn fan<T, F, Fut>(
    progress: &ProgressBar,
    label: &str,
    count: usize,
    call: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    progress.set_message(format!("seeding: {label}"));
    progress.set_length(count as u64);
    progress.set_position(0);
    let mut out: Vec<Option<T>> = Vec::with_capacity(count);
    out.resize_with(count, || None);
    block_on(async {
        let mut pending = FuturesUnordered::new();
        let mut next = 0;
        loop {
            while pending.len() < SEED_IN_FLIGHT && next < count {
                let (i, fut) = (next, call(next));
                pending.push(async move { (i, fut.await) });
                next += 1;
            }
            let Some((i, result)) = pending.next().await else {
                return Ok::<(), anyhow::Error>(());
            };
            out[i] = Some(result.with_context(|| format!("{label} #{i}"))?);
            progress.inc(1);
        }
    })?;
    Ok(out
        .into_iter()
        .map(|v| v.expect("every index ran"))
        .collect())
}

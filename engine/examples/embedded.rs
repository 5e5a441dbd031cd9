//! Embedding the Chorus engine: open it in a temporary directory, create a workspace, a
//! channel and members, post, read back, and watch a subscription's frames.
//!
//! Run with `cargo run -p chorus-engine --example embedded`.

use chorus_engine::domain::ChannelKind;
use chorus_engine::{Engine, EngineConfig, EngineError};
use futures::executor::block_on;

fn main() -> Result<(), EngineError> {
    let dir = tempfile::tempdir()
        .map_err(|e| EngineError::Io(chorus_engine::IoError::new("a temporary directory", e)))?;
    let mut config = EngineConfig::new(dir.path());
    config.shards = 2;
    config.partitions = 8;
    let engine = Engine::open(config)?;
    block_on(run(&engine))?;
    engine.shutdown();
    println!("engine shut down cleanly");
    Ok(())
}

async fn run(engine: &Engine) -> Result<(), EngineError> {
    // The embedder authenticates; the engine stores whatever password hash it is given.
    let alice = engine
        .create_user("alice@example.com", "Alice", "$argon2id$placeholder")
        .await?;
    let bob = engine
        .create_user("bob@example.com", "Bob", "$argon2id$placeholder")
        .await?;
    let acme = engine.create_workspace(alice.id, "Acme").await?;
    engine
        .add_member(alice.id, acme.id, "bob@example.com")
        .await?;
    let general = engine
        .create_channel(alice.id, acme.id, "general", ChannelKind::Public)
        .await?;
    engine.join(bob.id, general.id).await?;
    println!(
        "workspace {} has channel #{} ({})",
        acme.name, general.name, general.id
    );

    // Bob subscribes before Alice posts: he receives every event of his channels.
    let mut bob_events = engine.subscribe(bob.id).await?;

    let (hello, _) = engine
        .post(alice.id, general.id, "hello @here", Some("client-1"), None)
        .await?;
    let (again, created) = engine
        .post(alice.id, general.id, "hello @here", Some("client-1"), None)
        .await?;
    assert!(
        !created && again.id == hello.id,
        "a repeated client_msg_id stores nothing"
    );
    let (reply, _) = engine
        .post(bob.id, general.id, "welcome!", None, Some(hello.id))
        .await?;
    engine.react(bob.id, hello.id, "wave", true).await?;
    engine.edit(alice.id, hello.id, "hello everyone").await?;

    let page = engine.history(bob.id, general.id, None, 50).await?;
    for m in &page.messages {
        println!(
            "seq {} {}: {:?} ({} replies, reactions {:?})",
            m.seq, m.user_id, m.text, m.reply_count, m.reactions
        );
    }
    let replies = engine.replies(bob.id, hello.id, None, 50).await?;
    assert_eq!(replies.messages[0].id, reply.id);
    let versions = engine.versions(bob.id, hello.id).await?;
    println!("edit history of {}: {versions:?}", hello.id);

    // Every committed event arrives as the same JSON frame a WebSocket client would get.
    for _ in 0..4 {
        let frame = bob_events.recv().await.expect("subscribed");
        println!("bob got {}", String::from_utf8_lossy(&frame));
    }
    Ok(())
}

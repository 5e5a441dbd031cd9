//! Devices that come and go in an encrypted DM, through the SDK against the real `chorus`
//! binary (`API.md` §14): a device added in the middle of a conversation makes the next
//! send stale, and the SDK shares the key with it and resends; a removed device makes the
//! next send rotate the key, which the removed device never gets.

mod common;
mod sdk_devices;

use chorus_client::e2ee::{MegolmError, Via};
use common::{Server, UNLIMITED};
use sdk_devices::{another_bob_device, session_of, three_devices, Member, ThreeDevices};

/// Messages sent before a device changes.
const BEFORE: usize = 10;
/// Messages sent after it.
const AFTER: usize = 20;

/// The encrypted DM of Alice and Bob, with Alice's laptop and Bob's laptop and phone in it,
/// Alice's tracker caught up with its devices.
async fn encrypted_dm(server: &Server) -> (Member, Member, Member) {
    let ThreeDevices {
        workspace_id,
        alice,
        laptop,
        phone,
    } = three_devices(server).await;
    let bob_id = laptop.user_id().to_owned();
    let dm = (alice.session.open_encrypted_dm(&workspace_id, &[&bob_id]))
        .await
        .unwrap();
    assert!(dm.encrypted);
    let mut alice = Member::join(alice, &dm.id).await;
    alice.sync().await;
    assert_eq!(alice.channel.devices().count(), 3);
    let laptop = Member::join(laptop, &dm.id).await;
    let phone = Member::join(phone, &dm.id).await;
    (alice, laptop, phone)
}

/// Alice sends `texts`, alternating REST and her stream; none is refused. Answers the
/// messages' IDs.
async fn send_all(alice: &mut Member, texts: &[String]) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let via = if i % 2 == 0 { Via::Rest } else { Via::Stream };
        let post = alice.send_via(text, via).await;
        assert_eq!(post.refusals, 0, "{text}");
        assert!(post.unreachable.is_empty(), "{:?}", post.unreachable);
        ids.push(post.message.id);
    }
    ids
}

fn texts(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("message {i}")).collect()
}

// Bob signs in on a third device and uploads its keys in the middle of the conversation:
// Alice's next send, made with her old devices_seq, is refused as stale_devices; the SDK
// catches her tracker up, shares the key with the tablet and resends with the same
// client_msg_id (stored once). The tablet decrypts that message, everything after it and an
// edit of an older message, does not try what came before it, and counts nothing
// undecryptable; the tablet's own message reaches every other device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_midway_gets_the_key_through_the_refused_send() {
    let server = Server::start(UNLIMITED);
    let (mut alice, mut laptop, mut phone) = encrypted_dm(&server).await;
    let bob_id = laptop.device.user_id().to_owned();
    let mut ids = send_all(&mut alice, &texts(0, BEFORE)).await;
    let devices_seq = alice.channel.devices_seq();

    let tablet = another_bob_device(&server, "bob-tablet").await;
    let resent = alice.send(&format!("message {BEFORE}")).await;
    assert_eq!(resent.refusals, 1, "the old devices_seq was refused");
    assert!(alice.channel.devices_seq() > devices_seq);
    assert!(alice.channel.has_device(&bob_id, "bob-tablet"));
    ids.push(resent.message.id.clone());
    ids.extend(send_all(&mut alice, &texts(BEFORE + 1, BEFORE + 1 + AFTER)).await);
    let all_texts = texts(0, BEFORE + 1 + AFTER);
    let edited = "message 0, edited after the tablet came".to_owned();
    alice.edit(&ids[0], &edited).await;
    let channel_id = alice.channel.channel_id().to_owned();
    let history = alice
        .device
        .session
        .all_messages(&channel_id)
        .await
        .unwrap();
    assert_eq!(history.len(), ids.len(), "the resend was stored once");

    let mut tablet = Member::join(tablet, &channel_id).await;
    tablet.read_decrypted(1 + AFTER + 1).await;
    assert!(tablet.failures.is_empty(), "{:?}", tablet.failures);
    assert_eq!(
        tablet.before, BEFORE,
        "messages from before the tablet were not tried"
    );
    assert_eq!(tablet.device.e2ee.undecryptable(), 0);
    for (id, text) in ids.iter().zip(&all_texts).skip(BEFORE) {
        assert_eq!(&tablet.read[id], text);
    }
    assert_eq!(tablet.read[&ids[0]], edited);
    let session = session_of(resent.message.ciphertext.as_deref().unwrap());
    let keys: Vec<&str> = tablet.room_keys.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        keys,
        [session.as_str()],
        "the same session, from its current index"
    );

    for bob in [&mut laptop, &mut phone] {
        bob.read_decrypted(ids.len() + 1).await;
        assert!(bob.failures.is_empty(), "{:?}", bob.failures);
        assert_eq!(bob.device.e2ee.undecryptable(), 0);
        for (id, text) in ids.iter().zip(&all_texts).skip(1) {
            assert_eq!(&bob.read[id], text);
        }
        assert_eq!(bob.read[&ids[0]], edited);
    }

    // The tablet writes: it shares its own key with the other three devices.
    let own = tablet.send("from the tablet").await;
    assert!(own.unreachable.is_empty(), "{:?}", own.unreachable);
    for member in [&mut alice, &mut laptop, &mut phone] {
        member.read_message(&own.message.id).await;
        assert_eq!(member.read[&own.message.id], "from the tablet");
        assert_eq!(member.device.e2ee.undecryptable(), 0);
        assert!(member.failures.is_empty(), "{:?}", member.failures);
    }
    for member in [alice, laptop, phone, tablet] {
        member.close().await;
    }
}

// Bob removes his phone: Alice's next send (over her stream) is refused as stale_devices,
// her tracker learns of the removal, and the SDK rotates the key: the message goes out
// under a new Megolm session shared with the remaining devices only. Bob's laptop reads it
// and everything after; the removed phone never received the new key and cannot decrypt
// the laptop's copy of it, which its manager counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_left_out_of_the_rotated_key() {
    let server = Server::start(UNLIMITED);
    let (mut alice, mut laptop, mut phone) = encrypted_dm(&server).await;
    let bob_id = laptop.device.user_id().to_owned();
    send_all(&mut alice, &texts(0, BEFORE)).await;
    let channel_id = alice.channel.channel_id().to_owned();
    let old_session = alice.device.e2ee.outbound_session_id(&channel_id).unwrap();
    phone.read_decrypted(BEFORE).await;
    assert_eq!(phone.room_keys.len(), 1);

    laptop
        .device
        .session
        .remove_device("bob-phone")
        .await
        .unwrap();
    // Over the stream this time: the refusal is an `error` frame with the same code.
    let rotated = (alice.send_via("after the phone was removed", Via::Stream)).await;
    assert_eq!(rotated.refusals, 1, "the old devices_seq was refused");
    assert!(!alice.channel.has_device(&bob_id, "bob-phone"));
    let new_session = session_of(rotated.message.ciphertext.as_deref().unwrap());
    assert_ne!(new_session, old_session, "the key was rotated");
    assert_eq!(
        alice.device.e2ee.outbound_session_id(&channel_id),
        Some(new_session.clone())
    );
    send_all(&mut alice, &texts(BEFORE + 1, BEFORE + 1 + AFTER)).await;

    laptop.read_decrypted(BEFORE + 1 + AFTER).await;
    assert!(laptop.failures.is_empty(), "{:?}", laptop.failures);
    assert_eq!(laptop.device.e2ee.undecryptable(), 0);
    assert_eq!(
        laptop.read[&rotated.message.id],
        "after the phone was removed"
    );
    let sessions: Vec<&str> = laptop.room_keys.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(sessions, [old_session.as_str(), new_session.as_str()]);
    alice.read_decrypted(BEFORE + 1 + AFTER).await;
    assert_eq!(alice.device.e2ee.undecryptable(), 0);

    // The phone: cut off, with only the old key; the laptop's copy is unreadable to it.
    let copy = (laptop.messages.iter())
        .find(|m| m.id == rotated.message.id)
        .unwrap()
        .clone();
    assert!(phone.room_keys.iter().all(|(_, s)| *s != new_session));
    let r = phone.device.e2ee.decrypt_message(&copy);
    assert!(
        matches!(r, Err(MegolmError::UnknownSession { ref session_id, .. }) if *session_id == new_session),
        "{r:?}"
    );
    assert_eq!(phone.device.e2ee.undecryptable(), 1);
    let refused = phone.device.session.to_device_messages(None, 10).await;
    assert_eq!(refused.unwrap_err().status(), Some(401));
    for member in [alice, laptop] {
        member.close().await;
    }
}

//! End-to-end encryption through the SDK (`chorus-client`) against the real `chorus`
//! binary (`API.md` §14): devices sign in with their IDs, publish keys that vodozemac made
//! (so the server accepts real Olm signatures), query and verify each other, claim one-time
//! keys, start Olm sessions and share a Megolm key over to-device messages, which reach
//! their devices over REST and over the SDK's event stream; then 1,000 messages go through
//! an encrypted DM on the server, and every device reads every one while the server holds
//! only ciphertext. (`e2ee_channels.rs` has devices that come and go in the channel.)

mod common;
mod sdk_devices;

use chorus_client::e2ee::{Received, ToDeviceBatch, Via};
use chorus_client::{ChannelKind, Client, ConnectOptions, Error, Stream, StreamItem};
use common::{Server, PASSWORD, UNLIMITED};
use sdk_devices::{
    files_holding, session_of, three_devices, Member, ThreeDevices, FIRST_KEYS, WAIT,
};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The channel the Megolm session of the to-device test is for (made up: that test is
/// about to-device messages).
const CHANNEL: &str = "C-e2ee-sdk";
/// Messages sent through the encrypted DM, which every device decrypts.
const MESSAGES: usize = 1_000;
/// Every plaintext starts with this, so that one scan finds any of them.
const SECRET: &str = "secret message";

/// The next item of `stream` that is not a channel event, within [`WAIT`].
async fn next_e2ee_item(stream: &mut Stream) -> Result<StreamItem, Error> {
    loop {
        let item = tokio::time::timeout(WAIT, stream.next_item())
            .await
            .expect("nothing came from the stream")?;
        if !matches!(item, StreamItem::Event(_)) {
            return Ok(item);
        }
    }
}

// Alice's device finds Bob's two devices through a key query (each signature verified by
// the SDK), claims a one-time key of each, starts Olm sessions and shares a Megolm key
// through the server; the laptop takes it from its stream (and, after a reconnection,
// is not handed it twice) and acknowledges it there, the phone reads it over REST (and sees
// it on its stream too) and acknowledges it there; no file of the server holds a payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_share_a_megolm_key_through_the_server() {
    let server = Server::start(UNLIMITED);
    let ThreeDevices {
        mut alice,
        mut laptop,
        mut phone,
        ..
    } = three_devices(&server).await;
    let bob_id = laptop.user_id().to_owned();
    let alice_id = alice.user_id().to_owned();
    let mut laptop_stream = laptop
        .session
        .connect(ConnectOptions::default())
        .await
        .unwrap();
    let mut phone_stream = phone
        .session
        .connect(ConnectOptions::default())
        .await
        .unwrap();

    // A session may publish keys only for its own device.
    let r = (laptop.session)
        .publish_keys(phone.e2ee.account_mut(), false)
        .await;
    assert!(matches!(r, Err(Error::WrongDevice { .. })), "{r:?}");

    let mut members = alice.learn(&[&bob_id, &alice_id]).await;
    members.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let names: Vec<&str> = members.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(names, ["alice-laptop", "bob-laptop", "bob-phone"]);
    for bob in [&mut laptop, &mut phone] {
        assert_eq!(bob.learn(&[&alice_id]).await.len(), 1);
    }

    let unreachable = (alice.session)
        .share_group_key(&mut alice.e2ee, CHANNEL, &members)
        .await
        .unwrap();
    assert!(unreachable.is_empty(), "{unreachable:?}");
    let session_id = alice.e2ee.outbound_session_id(CHANNEL).unwrap();
    let room_key = Received::RoomKey {
        channel_id: CHANNEL.into(),
        session_id,
    };
    // Sharing again sends nothing: every device has the key.
    let again = (alice.session)
        .share_group_key(&mut alice.e2ee, CHANNEL, &members)
        .await
        .unwrap();
    assert!(again.is_empty());
    let one_time_keys_left = laptop.session.upload_keys(&json!({})).await.unwrap();
    assert_eq!(one_time_keys_left, FIRST_KEYS as u64 - 1, "one key claimed");

    // The laptop: over its stream, acknowledged there.
    let StreamItem::ToDevice(m) = next_e2ee_item(&mut laptop_stream).await.unwrap() else {
        panic!("expected a to-device message");
    };
    assert_eq!(
        (m.sender_id.as_str(), m.sender_device_id.as_str()),
        (alice_id.as_str(), "alice-laptop")
    );
    let got = laptop
        .e2ee
        .receive_to_device(&m.sender_id, &m.sender_device_id, &m.content);
    assert_eq!(got.unwrap(), room_key);
    // Not acknowledged yet: a new connection gets it again first, and the stream drops
    // the repeat, so the next to-device item is the next message.
    laptop_stream.force_disconnect().await;
    laptop_stream.ping().await.unwrap();
    assert_eq!(laptop_stream.stats().connections, 2);
    let laptop_peer = (members.iter())
        .find(|d| d.device_id == "bob-laptop")
        .unwrap()
        .clone();
    let note = json!({"type": "chorus.test", "n": 2});
    let content = alice.e2ee.encrypt_to_device(&laptop_peer, &note).unwrap();
    let mut batch = ToDeviceBatch::new();
    batch
        .entry(bob_id.clone())
        .or_default()
        .insert("bob-laptop".into(), content);
    alice.session.send_to_device(&batch).await.unwrap();
    let StreamItem::ToDevice(second) = next_e2ee_item(&mut laptop_stream).await.unwrap() else {
        panic!("expected a to-device message");
    };
    assert_eq!(second.id, "2", "the resent first message was dropped");
    let got = (laptop.e2ee).receive_to_device(&second.sender_id, "alice-laptop", &second.content);
    assert_eq!(got.unwrap(), Received::Other(note));
    laptop_stream.ack_to_device(&second.id).await.unwrap();
    let left = laptop.session.to_device_messages(None, 100).await.unwrap();
    assert!(
        left.messages.is_empty(),
        "acknowledged over the stream: {left:?}"
    );

    // The phone: over REST, acknowledged there; its stream had the same message.
    let page = phone.session.to_device_messages(None, 100).await.unwrap();
    assert_eq!(page.messages.len(), 1, "{page:?}");
    let m = &page.messages[0];
    let got = phone
        .e2ee
        .receive_to_device(&m.sender_id, &m.sender_device_id, &m.content);
    assert_eq!(got.unwrap(), room_key);
    let StreamItem::ToDevice(live) = next_e2ee_item(&mut phone_stream).await.unwrap() else {
        panic!("expected a to-device message");
    };
    assert_eq!(&live, m);
    phone.session.ack_to_device(&m.id).await.unwrap();
    let left = phone.session.to_device_messages(None, 100).await.unwrap();
    assert!(left.messages.is_empty(), "acknowledged over REST: {left:?}");

    // The server never held a plaintext: the room key's and the note's payload types are
    // only inside the Olm encryption, and neither any file of the data directory (logs,
    // snapshots, everything) nor the REST answer holds them.
    // The scan does read where the messages are kept: their envelopes' algorithm is there.
    assert!(!files_holding(server.dir(), b"olm.v1").is_empty());
    for marker in ["chorus.room_key", "chorus.test"] {
        let found = files_holding(server.dir(), marker.as_bytes());
        assert!(found.is_empty(), "{marker} in {found:?}");
        assert!(!serde_json::to_string(&page.messages)
            .unwrap()
            .contains(marker));
    }

    laptop_stream.close().await;
    phone_stream.close().await;
}

// A device's stream hears `e2ee:keys_low` when claims leave it fewer than 10 one-time
// keys, and the SDK tops them up; removing a device closes its stream (4001: the stream
// ends with `Unauthorized`) and its token is refused, while the user's other device goes
// on and the removed device is gone from key queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_low_reaches_the_stream_and_a_removed_device_is_cut_off() {
    let server = Server::start(UNLIMITED);
    let ThreeDevices {
        alice,
        mut laptop,
        phone,
        ..
    } = three_devices(&server).await;
    let bob_id = laptop.user_id().to_owned();
    let mut laptop_stream = laptop
        .session
        .connect(ConnectOptions::default())
        .await
        .unwrap();
    let mut phone_stream = phone
        .session
        .connect(ConnectOptions::default())
        .await
        .unwrap();

    // 20 → 10: not low yet; the 11th claim leaves 9.
    for _ in 0..FIRST_KEYS - 10 {
        let keys = alice
            .session
            .claim_keys(&[(&bob_id, "bob-laptop")])
            .await
            .unwrap();
        assert_eq!(keys.len(), 1);
        assert!(!keys[0].fallback);
    }
    alice
        .session
        .claim_keys(&[(&bob_id, "bob-laptop")])
        .await
        .unwrap();
    let item = next_e2ee_item(&mut laptop_stream).await.unwrap();
    assert_eq!(
        item,
        StreamItem::KeysLow {
            one_time_key_count: 9
        }
    );
    let count = (laptop.session)
        .top_up_one_time_keys(laptop.e2ee.account_mut(), 9)
        .await
        .unwrap();
    assert_eq!(
        count,
        chorus_client::e2ee::ONE_TIME_KEYS_PUBLISHED_MAX as u64
    );

    laptop.session.remove_device("bob-phone").await.unwrap();
    let end = next_e2ee_item(&mut phone_stream).await;
    assert!(matches!(end, Err(Error::Unauthorized)), "{end:?}");
    let refused = phone.session.to_device_messages(None, 10).await;
    assert_eq!(refused.unwrap_err().status(), Some(401));
    let again = Client::new(&server.base_url())
        .unwrap()
        .login_on_device("bob@example.com", PASSWORD, "bob-phone")
        .await;
    assert_eq!(
        again.unwrap_err().status(),
        Some(409),
        "a removed ID is retired"
    );
    let listed = alice.session.query_keys(&[&bob_id]).await.unwrap();
    let names: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(names, ["bob-laptop"]);
    laptop_stream
        .ping()
        .await
        .expect("the laptop's stream goes on");
    laptop_stream.close().await;
}

/// A TCP proxy to `upstream` that passes the first connection's request on but drops the
/// connection as soon as the answer starts, so the client never reads it; later
/// connections pass both ways. Answers its address and the count of connections.
fn lossy_proxy(upstream: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(&upstream).unwrap();
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
            if first {
                std::thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    let _ = (&server).read(&mut byte);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                });
            } else {
                pipe(server, client);
            }
        }
    });
    (addr, accepted)
}

/// Copies `from` into `to` on a thread until `from` ends.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.flush();
        let _ = to.shutdown(Shutdown::Write);
    });
}

// A to-device send whose answer the network lost is sent again by the SDK under the same
// txn_id, and the server, which took the first one, delivers the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_to_device_send_with_a_lost_answer_is_retried_and_delivered_once() {
    let server = Server::start(UNLIMITED);
    let ThreeDevices { alice, laptop, .. } = three_devices(&server).await;
    let (proxy, connections) = lossy_proxy(server.addr.clone());
    let through_proxy = Client::new(&format!("http://{proxy}")).unwrap();
    let alice_lossy = through_proxy.device_session(
        alice.session.token.clone(),
        alice.session.user.clone(),
        "alice-laptop",
    );
    let mut batch = ToDeviceBatch::new();
    batch
        .entry(laptop.user_id().to_owned())
        .or_default()
        .insert("bob-laptop".into(), json!({"hello": "once"}));
    alice_lossy
        .send_to_device(&batch)
        .await
        .expect("retried until answered");
    assert!(
        connections.load(Ordering::SeqCst) >= 2,
        "the first answer was lost"
    );
    let page = laptop.session.to_device_messages(None, 100).await.unwrap();
    assert_eq!(page.messages.len(), 1, "{page:?}");
    assert_eq!(page.messages[0].content, json!({"hello": "once"}));
}

// Alice opens an encrypted DM with Bob (a different channel from their plain DM), and all
// three devices follow it from its first event. Alice sends 1,000 messages through the
// server, over REST and over her stream, with one Megolm session shared once with Bob's
// two devices; every device (Alice's own included) decrypts every message, and an edit,
// with none undecryptable. The server never held a plaintext: no file of its data
// directory and no REST answer (history pages, a message's edit history) holds one, while
// the scan does find the ciphertexts where messages are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_through_an_encrypted_dm_reach_every_device() {
    let server = Server::start(UNLIMITED);
    let devices = three_devices(&server).await;
    let bob_id = devices.laptop.user_id().to_owned();
    let (wid, session) = (&devices.workspace_id, devices.alice.session.clone());
    let dm = session.open_encrypted_dm(wid, &[&bob_id]).await.unwrap();
    assert!(dm.encrypted);
    assert_eq!(dm.kind, ChannelKind::Dm);
    let plain = session.open_dm(wid, &[&bob_id]).await.unwrap();
    assert!(!plain.encrypted);
    assert_ne!(plain.id, dm.id, "an encrypted DM is another channel");
    let again = session.open_encrypted_dm(wid, &[&bob_id]).await.unwrap();
    assert_eq!(again.id, dm.id, "same set, same channel");

    let mut alice = Member::join(devices.alice, &dm.id).await;
    let mut laptop = Member::join(devices.laptop, &dm.id).await;
    let mut phone = Member::join(devices.phone, &dm.id).await;
    alice.sync().await;
    let alice_id = alice.device.user_id().to_owned();
    let listed = [
        format!("{alice_id}/alice-laptop"),
        format!("{bob_id}/bob-laptop"),
        format!("{bob_id}/bob-phone"),
    ];
    assert_eq!(alice.devices(), listed);

    let mut sent = Vec::new();
    for i in 0..MESSAGES {
        let via = if i % 4 == 3 { Via::Stream } else { Via::Rest };
        let text = format!("{SECRET} {i}");
        let post = alice.send_via(&text, via).await;
        assert_eq!(post.refusals, 0, "the tracker was current");
        assert!(post.unreachable.is_empty(), "{:?}", post.unreachable);
        assert_eq!(post.message.text, "");
        sent.push((post.message, text));
    }
    let sessions: std::collections::BTreeSet<String> = (sent.iter())
        .map(|(m, _)| session_of(m.ciphertext.as_deref().unwrap()))
        .collect();
    assert_eq!(sessions.len(), 1, "one Megolm session for all");
    let (first, _) = &sent[0];
    let edited = format!("{SECRET} 0, edited");
    alice.edit(&first.id, &edited).await;

    for member in [&mut alice, &mut laptop, &mut phone] {
        member.read_decrypted(MESSAGES + 1).await;
        assert!(member.failures.is_empty(), "{:?}", member.failures);
        assert_eq!(member.decrypted, MESSAGES + 1);
        assert_eq!(member.device.e2ee.undecryptable(), 0);
        assert_eq!(member.before, 0);
        assert_eq!(member.devices(), listed);
        assert_eq!(member.read[&first.id], edited);
        for (message, text) in &sent[1..] {
            assert_eq!(&member.read[&message.id], text);
        }
    }
    assert_eq!(laptop.room_keys.len(), 1, "the key went once");

    // Nothing of a plaintext on the server's disk or in its answers.
    let history = session.all_messages(&dm.id).await.unwrap();
    assert_eq!(history.len(), MESSAGES);
    assert!(history
        .iter()
        .all(|m| m.text.is_empty() && m.ciphertext.is_some()));
    let versions = session.message_history(&dm.id, &first.id).await.unwrap();
    // The edit history holds each ciphertext the message had: the first as sent, then the
    // edit's, which a member device decrypts.
    assert_eq!(versions.len(), 2);
    assert!(versions.iter().all(|v| v.text.is_empty()));
    assert_eq!(versions[0].ciphertext, first.ciphertext);
    let last = versions[1].ciphertext.as_deref().expect("a ciphertext");
    let opened = laptop.device.e2ee.decrypt_channel_message(&dm.id, last);
    assert_eq!(opened.expect("decrypts").text, edited);
    for answer in [
        serde_json::to_string(&history).unwrap(),
        serde_json::to_string(&versions).unwrap(),
    ] {
        assert!(!answer.contains(SECRET), "a plaintext in a REST answer");
    }
    let stored = session_of(history[MESSAGES - 1].ciphertext.as_deref().unwrap());
    assert!(!files_holding(server.dir(), stored.as_bytes()).is_empty());
    let found = files_holding(server.dir(), SECRET.as_bytes());
    assert!(found.is_empty(), "a plaintext in {found:?}");
    for member in [alice, laptop, phone] {
        member.close().await;
    }
}

//! End-to-end encryption through the SDK (`chorus-client`) against the real `chorus`
//! binary (`API.md` §14): devices sign in with their IDs, publish keys that vodozemac made
//! (so the server accepts real Olm signatures), query and verify each other, claim one-time
//! keys, start Olm sessions and share a Megolm key over to-device messages, which reach
//! their devices over REST and over the SDK's event stream.
//!
//! The Megolm ciphertexts themselves go from Alice's device to Bob's two devices in memory:
//! encrypted channels (`ciphertext` messages, `devices_seq`) are not built on the server
//! yet, so only the keys travel through it. The channel is named by an ID string made up
//! here.

mod common;

use chorus_client::e2ee::{DeviceAccount, E2eeManager, PeerDevice, Received, ToDeviceBatch};
use chorus_client::{Client, ConnectOptions, Error, Session, Stream, StreamItem};
use common::{Server, PASSWORD, UNLIMITED};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The channel the Megolm session is for.
const CHANNEL: &str = "C-e2ee-sdk";
/// Channel messages Alice encrypts and each of Bob's devices decrypts.
const MESSAGES: usize = 1_000;
/// One-time keys each device publishes at first.
const FIRST_KEYS: usize = 20;
/// How long a test waits for something from its stream.
const WAIT: Duration = Duration::from_secs(10);

/// One signed-in device: its session (token bound to the device) and its cryptography.
struct Device {
    session: Session,
    e2ee: E2eeManager,
}

impl Device {
    /// A device of the session's user with fresh keys, [`FIRST_KEYS`] one-time keys and a
    /// fallback key published through the SDK.
    async fn publish(session: Session) -> Device {
        let device_id = session.device_id.clone().expect("signed in on a device");
        let mut e2ee = E2eeManager::new(DeviceAccount::new(&session.user.id, &device_id));
        let account = e2ee.account_mut();
        account.generate_one_time_keys(FIRST_KEYS);
        account.generate_fallback_key();
        let count = session.publish_keys(account, true).await.expect("upload");
        assert_eq!(count, FIRST_KEYS as u64);
        assert!(
            e2ee.account().one_time_keys().is_empty(),
            "marked published after the 200"
        );
        Device { session, e2ee }
    }

    fn user_id(&self) -> &str {
        &self.session.user.id
    }

    /// Queries and verifies the devices of `users`, and remembers them.
    async fn learn(&mut self, users: &[&str]) -> Vec<PeerDevice> {
        let found = self.session.query_keys(users).await.expect("query");
        assert!(found.rejected.is_empty(), "{:?}", found.rejected);
        for d in &found.devices {
            self.e2ee.add_device(d.clone()).expect("known keys");
        }
        found.devices
    }
}

/// Alice (one device, `alice-laptop`) and Bob (`bob-laptop` and `bob-phone`) in one
/// workspace, each device with its keys published.
async fn three_devices(server: &Server) -> (Device, Device, Device) {
    let client = Client::new(&server.base_url()).unwrap();
    let alice = (client.signup_on_device("alice@example.com", PASSWORD, "alice", "alice-laptop"))
        .await
        .unwrap();
    let bob_laptop = (client.signup_on_device("bob@example.com", PASSWORD, "bob", "bob-laptop"))
        .await
        .unwrap();
    let bob_phone = (client.login_on_device("bob@example.com", PASSWORD, "bob-phone"))
        .await
        .unwrap();
    assert_eq!(bob_phone.device_id.as_deref(), Some("bob-phone"));
    let acme = alice.create_workspace("acme").await.unwrap();
    alice
        .add_workspace_member(&acme.id, "bob@example.com")
        .await
        .unwrap();
    (
        Device::publish(alice).await,
        Device::publish(bob_laptop).await,
        Device::publish(bob_phone).await,
    )
}

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
// is not handed it twice) and acknowledges it there, the phone reads it over REST (and sees it on its stream too) and acknowledges it there; then
// both decrypt all of 1,000 Megolm messages, none undecryptable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_share_a_megolm_key_through_the_server_and_read_1000_messages() {
    let server = Server::start(UNLIMITED);
    let (mut alice, mut laptop, mut phone) = three_devices(&server).await;
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

    // 1,000 messages, handed over in memory (no encrypted channels on the server yet).
    let mut decrypted = [0usize; 2];
    for i in 0..MESSAGES {
        let text = format!("message {i}");
        let ciphertext = alice.e2ee.encrypt_channel_message(CHANNEL, &text).unwrap();
        for (n, bob) in [&mut laptop, &mut phone].into_iter().enumerate() {
            let plain = bob
                .e2ee
                .decrypt_channel_message(CHANNEL, &ciphertext)
                .unwrap();
            assert_eq!(plain.text, text);
            assert_eq!(
                (plain.sender_id.as_str(), plain.message_index),
                (alice_id.as_str(), i as u32)
            );
            decrypted[n] += 1;
        }
    }
    assert_eq!(decrypted, [MESSAGES, MESSAGES]);
    assert_eq!(
        (laptop.e2ee.undecryptable(), phone.e2ee.undecryptable()),
        (0, 0)
    );
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
    let (alice, mut laptop, phone) = three_devices(&server).await;
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
    let (alice, laptop, _phone) = three_devices(&server).await;
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

/// The files under `dir` (recursively) whose bytes hold `needle`.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("read the data directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}

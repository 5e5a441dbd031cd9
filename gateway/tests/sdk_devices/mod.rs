//! What the end-to-end encryption tests through the SDK (`chorus-client`) share: devices
//! signed in on their IDs with keys published, and members of an encrypted DM, each a
//! device with its own stream (fed from the channel's first event) and device tracker,
//! that send, edit and read through the real server.
//!
//! A test binary uses what it needs of this module, so unused helpers are allowed here.
#![allow(dead_code)]

use crate::common::{Server, PASSWORD};
use chorus_client::e2ee::{
    ChannelDevices, DeviceAccount, E2eeManager, EncryptedPost, Incoming, PeerDevice, Received, Via,
};
use chorus_client::{new_client_msg_id, Client, ConnectOptions, Message, Session, Stream};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// One-time keys each device publishes at first.
pub const FIRST_KEYS: usize = 20;
/// How long a test waits for something from a stream.
pub const WAIT: Duration = Duration::from_secs(10);

/// One signed-in device: its session (token bound to the device) and its cryptography.
pub struct Device {
    pub session: Session,
    pub e2ee: E2eeManager,
}

impl Device {
    /// A device of the session's user with fresh keys, [`FIRST_KEYS`] one-time keys and a
    /// fallback key published through the SDK.
    pub async fn publish(session: Session) -> Device {
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

    pub fn user_id(&self) -> &str {
        &self.session.user.id
    }

    /// Queries and verifies the devices of `users`, and remembers them.
    pub async fn learn(&mut self, users: &[&str]) -> Vec<PeerDevice> {
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
pub struct ThreeDevices {
    pub workspace_id: String,
    pub alice: Device,
    pub laptop: Device,
    pub phone: Device,
}

/// Signs up Alice and Bob on their devices in a new workspace and publishes their keys.
pub async fn three_devices(server: &Server) -> ThreeDevices {
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
    ThreeDevices {
        workspace_id: acme.id,
        alice: Device::publish(alice).await,
        laptop: Device::publish(bob_laptop).await,
        phone: Device::publish(bob_phone).await,
    }
}

/// Signs Bob in on one more device and publishes its keys.
pub async fn another_bob_device(server: &Server, device_id: &str) -> Device {
    let client = Client::new(&server.base_url()).unwrap();
    let session = (client.login_on_device("bob@example.com", PASSWORD, device_id))
        .await
        .unwrap();
    Device::publish(session).await
}

/// A device in an encrypted channel: its stream, its tracker of the channel's devices, and
/// what it has read.
pub struct Member {
    pub device: Device,
    pub stream: Stream,
    pub channel: ChannelDevices,
    /// The latest plaintext of every message it decrypted, by message ID.
    pub read: BTreeMap<String, String>,
    /// Every message it decrypted (each edit again), as the server delivered it.
    pub messages: Vec<Message>,
    /// Messages and edits it decrypted.
    pub decrypted: usize,
    /// Messages from before the channel listed this device (not tried).
    pub before: usize,
    /// Why each message it could not decrypt failed.
    pub failures: Vec<String>,
    /// The room keys it took: `(channel_id, session_id)`.
    pub room_keys: Vec<(String, String)>,
}

impl Member {
    /// `device` in the encrypted channel `channel_id`: a stream that starts at the
    /// channel's first event, so the tracker sees every device the channel lists.
    pub async fn join(device: Device, channel_id: &str) -> Member {
        let since = HashMap::from([(channel_id.to_owned(), 0)]);
        let options = ConnectOptions {
            since: Some(since),
            ..ConnectOptions::default()
        };
        let stream = device.session.connect(options).await.expect("connect");
        let account = device.e2ee.account();
        let channel = ChannelDevices::new(channel_id, account.user_id(), account.device_id());
        Member {
            device,
            stream,
            channel,
            read: BTreeMap::new(),
            messages: Vec::new(),
            decrypted: 0,
            before: 0,
            failures: Vec::new(),
            room_keys: Vec::new(),
        }
    }

    /// The channel's devices as its tracker has them, `user/device`.
    pub fn devices(&self) -> Vec<String> {
        (self.channel.devices())
            .map(|(u, d)| format!("{u}/{d}"))
            .collect()
    }

    /// Catches the tracker up with the channel as it stands.
    pub async fn sync(&mut self) {
        let d = &mut self.device;
        let received = (d
            .session
            .sync_channel(&mut d.e2ee, &mut self.channel, &mut self.stream))
        .await
        .expect("sync");
        for incoming in received {
            self.take(incoming).await;
        }
    }

    /// Sends `text` over REST.
    pub async fn send(&mut self, text: &str) -> EncryptedPost {
        self.send_via(text, Via::Rest).await
    }

    /// Sends `text` over REST or the stream, and takes what the send read on the way.
    pub async fn send_via(&mut self, text: &str, via: Via) -> EncryptedPost {
        let d = &mut self.device;
        let (channel, stream) = (&mut self.channel, &mut self.stream);
        let id = new_client_msg_id();
        let mut post = (d
            .session
            .send_encrypted_via(&mut d.e2ee, channel, stream, text, &id, via))
        .await
        .unwrap_or_else(|e| panic!("sending {text:?}: {e}"));
        assert_eq!(post.message.client_msg_id.as_deref(), Some(id.as_str()));
        for incoming in std::mem::take(&mut post.received) {
            self.take(incoming).await;
        }
        post
    }

    /// Edits a message over REST.
    pub async fn edit(&mut self, message_id: &str, text: &str) -> EncryptedPost {
        let d = &mut self.device;
        let (channel, stream) = (&mut self.channel, &mut self.stream);
        let mut post = (d
            .session
            .edit_encrypted(&mut d.e2ee, channel, stream, message_id, text))
        .await
        .unwrap_or_else(|e| panic!("editing to {text:?}: {e}"));
        for incoming in std::mem::take(&mut post.received) {
            self.take(incoming).await;
        }
        post
    }

    /// Reads the stream, each item within [`WAIT`], until `done` holds.
    pub async fn read_until(&mut self, done: impl Fn(&Member) -> bool) {
        while !done(self) {
            let item = tokio::time::timeout(WAIT, self.stream.next_item())
                .await
                .unwrap_or_else(|_| panic!("{}: nothing came from the stream", self.name()))
                .expect("stream");
            let d = &mut self.device;
            let incoming = (d.session.receive_item(&mut d.e2ee, &mut self.channel, item))
                .await
                .expect("receive");
            self.take(incoming).await;
        }
    }

    /// Reads until `n` messages and edits were decrypted.
    pub async fn read_decrypted(&mut self, n: usize) {
        self.read_until(|m| m.decrypted + m.failures.len() >= n)
            .await;
    }

    /// Reads until the message `id` was decrypted (or something failed to decrypt).
    pub async fn read_message(&mut self, id: &str) {
        self.read_until(|m| m.read.contains_key(id) || !m.failures.is_empty())
            .await;
    }

    fn name(&self) -> String {
        let a = self.device.e2ee.account();
        format!("{}/{}", a.user_id(), a.device_id())
    }

    /// Records one item; a to-device message is acknowledged.
    async fn take(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::Message {
                message, plaintext, ..
            } => match plaintext {
                Ok(p) => {
                    self.decrypted += 1;
                    self.read.insert(message.id.clone(), p.text);
                    self.messages.push(message);
                }
                Err(e) => self.failures.push(format!("{}: {e}", message.id)),
            },
            Incoming::BeforeThisDevice { .. } => self.before += 1,
            Incoming::ToDevice { id, received } => {
                if let Ok(Received::RoomKey {
                    channel_id,
                    session_id,
                }) = received
                {
                    self.room_keys.push((channel_id, session_id));
                }
                self.stream.ack_to_device(&id).await.expect("ack");
            }
            Incoming::Devices(_) | Incoming::Other(_) => {}
        }
    }

    /// Closes the stream.
    pub async fn close(self) -> Device {
        self.stream.close().await;
        self.device
    }
}

/// The Megolm session ID inside a message's ciphertext envelope.
pub fn session_of(ciphertext: &str) -> String {
    let envelope: serde_json::Value = serde_json::from_str(ciphertext).expect("an envelope");
    envelope["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned()
}

/// The files under `dir` (recursively) whose bytes hold `needle`.
pub fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
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

//! The E2EE layer of `chorus-client` end to end, in memory and without a server: two users
//! and three devices (Ada's laptop and phone, Bob's desktop) publish and verify keys, make
//! Olm sessions from claimed one-time keys, share Megolm keys over them, send channel
//! messages, rotate, save and load. The server's part (relaying JSON) is played by the
//! tests, which pass every body through serde_json as the wire would.

use chorus_client::e2ee::{
    verify_device_keys, DeviceAccount, DeviceKeys, E2eeManager, KeyCheckError, LoadError,
    MegolmError, OlmError, PeerDevice, Received, CIPHERTEXT_BYTES_MAX, TO_DEVICE_CONTENT_BYTES_MAX,
};
use serde_json::{json, Value};

const ADA: &str = "U1";
const BOB: &str = "U2";
const CHANNEL: &str = "C7";

struct Devices {
    ada_laptop: E2eeManager,
    ada_phone: E2eeManager,
    bob_desktop: E2eeManager,
}

fn devices() -> Devices {
    Devices {
        ada_laptop: E2eeManager::new(DeviceAccount::new(ADA, "LAPTOP")),
        ada_phone: E2eeManager::new(DeviceAccount::new(ADA, "PHONE")),
        bob_desktop: E2eeManager::new(DeviceAccount::new(BOB, "DESKTOP")),
    }
}

/// What a key query answers for `device`, as a client reads it off the wire: the uploaded
/// `device_keys` plus the server's `created_at`.
fn queried_keys(device: &E2eeManager) -> DeviceKeys {
    let body = device.account().upload_body(true);
    let mut answered = body["device_keys"].clone();
    answered["created_at"] = json!("2026-12-02T12:00:00Z");
    serde_json::from_value(answered).unwrap()
}

/// `device` as another client knows it after querying and verifying its keys.
fn peer(device: &E2eeManager) -> PeerDevice {
    let account = device.account();
    PeerDevice::verified(
        account.user_id(),
        account.device_id(),
        &queried_keys(device),
    )
    .unwrap()
}

/// Plays `keys/upload` then `keys/claim`: `device` publishes a batch of one-time keys and
/// one of them is handed out.
fn claim_one_time_key(device: &mut E2eeManager) -> String {
    let body = device.account_mut().generate_one_time_keys(5);
    device.account_mut().mark_keys_as_published();
    body.into_values().next().unwrap()
}

/// Makes `from` start an Olm session with `to` and makes each know the other's keys.
fn connect(from: &mut E2eeManager, to: &mut E2eeManager) {
    let otk = claim_one_time_key(to);
    from.start_olm_session(&peer(to), &otk).unwrap();
    to.add_device(peer(from)).unwrap();
}

/// The to-device content as the recipient reads it back from the server.
fn relayed(content: &Value) -> Value {
    serde_json::from_str(&serde_json::to_string(content).unwrap()).unwrap()
}

/// The channel's devices as its `device:added` events list them, the sender's own included.
fn channel_devices(d: &Devices) -> [PeerDevice; 3] {
    [
        peer(&d.ada_laptop),
        peer(&d.ada_phone),
        peer(&d.bob_desktop),
    ]
}

/// Ada's laptop shares the channel key with her phone and Bob's desktop, which take it.
fn share_with_both(d: &mut Devices) {
    connect(&mut d.ada_laptop, &mut d.ada_phone);
    connect(&mut d.ada_laptop, &mut d.bob_desktop);
    let batch = d
        .ada_laptop
        .share_group_key(CHANNEL, &channel_devices(d))
        .unwrap();
    assert_eq!(batch.len(), 2, "one entry per user");
    assert_eq!(batch[ADA].len(), 1, "the sender's own device is skipped");
    for (recipient, user, device) in [
        (&mut d.ada_phone, ADA, "PHONE"),
        (&mut d.bob_desktop, BOB, "DESKTOP"),
    ] {
        let content = relayed(&batch[user][device]);
        let received = recipient
            .receive_to_device(ADA, "LAPTOP", &content)
            .unwrap();
        assert!(
            matches!(received, Received::RoomKey { ref channel_id, .. } if channel_id == CHANNEL)
        );
    }
}

// Every device's keys verify for its user and device, and any change to a key, the
// signature, the user or the device makes them fail.
#[test]
fn device_keys_verify_and_tampered_keys_fail() {
    let d = devices();
    let all = [&d.ada_laptop, &d.ada_phone, &d.bob_desktop];
    for device in all {
        let account = device.account();
        let keys = queried_keys(device);
        verify_device_keys(account.user_id(), account.device_id(), &keys).unwrap();
        for key in [&keys.curve25519, &keys.ed25519, &keys.signature] {
            assert!(!key.contains('='), "unpadded base64: {key}");
        }
    }
    let keys = queried_keys(&d.ada_laptop);
    let other = queried_keys(&d.bob_desktop);
    let swapped_curve = DeviceKeys {
        curve25519: other.curve25519.clone(),
        ..keys.clone()
    };
    let swapped_ed = DeviceKeys {
        ed25519: other.ed25519.clone(),
        ..keys.clone()
    };
    let swapped_signature = DeviceKeys {
        signature: other.signature.clone(),
        ..keys.clone()
    };
    for tampered in [swapped_curve, swapped_ed, swapped_signature] {
        let err = verify_device_keys(ADA, "LAPTOP", &tampered).unwrap_err();
        assert!(matches!(err, KeyCheckError::BadSignature(_)), "{err}");
    }
    assert!(
        verify_device_keys(BOB, "LAPTOP", &keys).is_err(),
        "another user"
    );
    assert!(
        verify_device_keys(ADA, "PHONE", &keys).is_err(),
        "another device"
    );
    let mut flipped = keys.clone();
    let first = if flipped.signature.starts_with('A') {
        "B"
    } else {
        "A"
    };
    flipped.signature.replace_range(0..1, first);
    assert!(
        verify_device_keys(ADA, "LAPTOP", &flipped).is_err(),
        "a changed signature"
    );
    let garbled = DeviceKeys {
        signature: "!!".into(),
        ..keys
    };
    let err = verify_device_keys(ADA, "LAPTOP", &garbled).unwrap_err();
    assert!(matches!(err, KeyCheckError::MalformedSignature(_)), "{err}");
}

// The upload body has §14's shape: device keys, one-time keys and a fallback key whose IDs
// do not collide; keys marked published leave it.
#[test]
fn upload_body_has_the_api_shape() {
    let mut laptop = DeviceAccount::new(ADA, "LAPTOP");
    laptop.generate_one_time_keys(4);
    laptop.generate_fallback_key();
    let body = laptop.upload_body(true);
    let device_keys = body["device_keys"].as_object().unwrap();
    let mut fields: Vec<&str> = device_keys.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(fields, ["curve25519", "ed25519", "signature"]);
    let one_time_keys = body["one_time_keys"].as_object().unwrap();
    let fallback = body["fallback_key"].as_object().unwrap();
    assert_eq!((one_time_keys.len(), fallback.len()), (4, 1));
    assert!(fallback.keys().all(|id| !one_time_keys.contains_key(id)));
    laptop.mark_keys_as_published();
    assert_eq!(laptop.upload_body(false), json!({}));
}

// An Olm session made from a claimed one-time key carries payloads both ways; after the
// first answer both sides reuse their one session with normal (type 1) messages, and a
// replayed pre-key message or a message passed off as another device's is refused.
#[test]
fn olm_round_trip_both_ways() {
    let mut d = devices();
    connect(&mut d.ada_laptop, &mut d.bob_desktop);
    let bob = peer(&d.bob_desktop);
    let ada = peer(&d.ada_laptop);

    let first = d
        .ada_laptop
        .encrypt_to_device(&bob, &json!({"hello": "bob"}))
        .unwrap();
    assert_eq!(first["algorithm"], "olm.v1");
    assert_eq!(first["type"], 0, "a pre-key message until Bob answers");
    assert_eq!(first["sender_key"], json!(ada.curve25519));
    let got = d
        .bob_desktop
        .decrypt_to_device(ADA, "LAPTOP", &relayed(&first))
        .unwrap();
    assert_eq!(got, json!({"hello": "bob"}));

    let answer = d
        .bob_desktop
        .encrypt_to_device(&ada, &json!({"hi": "ada"}))
        .unwrap();
    assert_eq!(answer["type"], 1, "Bob answers on the session Ada started");
    let got = d
        .ada_laptop
        .decrypt_to_device(BOB, "DESKTOP", &relayed(&answer))
        .unwrap();
    assert_eq!(got, json!({"hi": "ada"}));

    for i in 0..20 {
        let to_bob = d
            .ada_laptop
            .encrypt_to_device(&bob, &json!({ "n": i }))
            .unwrap();
        assert_eq!(to_bob["type"], 1);
        let got = d
            .bob_desktop
            .decrypt_to_device(ADA, "LAPTOP", &to_bob)
            .unwrap();
        assert_eq!(got, json!({ "n": i }));
        let to_ada = d
            .bob_desktop
            .encrypt_to_device(&ada, &json!({ "m": i }))
            .unwrap();
        let got = d
            .ada_laptop
            .decrypt_to_device(BOB, "DESKTOP", &to_ada)
            .unwrap();
        assert_eq!(got, json!({ "m": i }));
    }

    let replay = d.bob_desktop.decrypt_to_device(ADA, "LAPTOP", &first);
    assert!(matches!(replay, Err(OlmError::Decryption(_))), "{replay:?}");
    d.bob_desktop.add_device(peer(&d.ada_phone)).unwrap();
    let passed_off = d
        .ada_laptop
        .encrypt_to_device(&bob, &json!({"x": 1}))
        .unwrap();
    let wrong_sender = d.bob_desktop.decrypt_to_device(ADA, "PHONE", &passed_off);
    assert!(
        matches!(wrong_sender, Err(OlmError::Mismatch(_))),
        "{wrong_sender:?}"
    );
    let unknown = d.bob_desktop.decrypt_to_device("U9", "X", &passed_off);
    assert!(
        matches!(unknown, Err(OlmError::UnknownDevice { .. })),
        "{unknown:?}"
    );
}

// A message encrypted for one device does not decrypt on another, even of the same user;
// a device without a session must claim a key first; a known device's keys cannot be
// swapped for others.
#[test]
fn olm_messages_are_for_one_device() {
    let mut d = devices();
    connect(&mut d.ada_laptop, &mut d.bob_desktop);
    d.ada_phone.add_device(peer(&d.ada_laptop)).unwrap();
    let for_bob = d
        .ada_laptop
        .encrypt_to_device(&peer(&d.bob_desktop), &json!({}))
        .unwrap();
    assert!(d
        .ada_phone
        .decrypt_to_device(ADA, "LAPTOP", &for_bob)
        .is_err());
    let no_session = d
        .ada_laptop
        .encrypt_to_device(&peer(&d.ada_phone), &json!({}));
    assert!(
        matches!(no_session, Err(OlmError::NoSession { .. })),
        "{no_session:?}"
    );
    d.ada_laptop.add_device(peer(&d.ada_phone)).unwrap();
    d.ada_laptop.add_device(peer(&d.ada_phone)).unwrap();
    let mut substituted = peer(&d.ada_phone);
    substituted.curve25519 = peer(&d.bob_desktop).curve25519;
    let changed = d.ada_laptop.add_device(substituted);
    assert!(
        matches!(changed, Err(OlmError::KeysChanged { .. })),
        "{changed:?}"
    );
}

// A Megolm session shared over Olm with Ada's phone and Bob's desktop decrypts 1,000
// messages on both, in order, with none undecryptable; sharing again sends nothing.
#[test]
fn megolm_thousand_messages_to_two_devices() {
    let mut d = devices();
    share_with_both(&mut d);
    assert!(d
        .ada_laptop
        .share_group_key(CHANNEL, &channel_devices(&d))
        .unwrap()
        .is_empty());
    for i in 0..1000u32 {
        let text = format!("message {i}: ünïcode and \"quotes\"");
        let ciphertext = d
            .ada_laptop
            .encrypt_channel_message(CHANNEL, &text)
            .unwrap();
        assert!(
            !ciphertext.contains("message"),
            "the text is not in the clear"
        );
        for recipient in [&mut d.ada_phone, &mut d.bob_desktop] {
            let plain = recipient
                .decrypt_channel_message(CHANNEL, &ciphertext)
                .unwrap();
            assert_eq!(plain.text, text);
            assert_eq!(
                (plain.sender_id.as_str(), plain.sender_device_id.as_str()),
                (ADA, "LAPTOP")
            );
            assert_eq!(plain.message_index, i);
        }
        if i == 0 {
            let own = d
                .ada_laptop
                .decrypt_channel_message(CHANNEL, &ciphertext)
                .unwrap();
            assert_eq!(own.text, text, "the sender reads its own messages");
        }
    }
    assert_eq!(d.ada_phone.undecryptable(), 0);
    assert_eq!(d.bob_desktop.undecryptable(), 0);
    assert_eq!(d.ada_laptop.undecryptable(), 0);
}

// Sharing needs an Olm session with every recipient; a refusal marks none of them, and
// once the missing session exists one share reaches them all.
#[test]
fn share_needs_a_session_with_every_device() {
    let mut d = devices();
    connect(&mut d.ada_laptop, &mut d.bob_desktop);
    let recipients = [peer(&d.bob_desktop), peer(&d.ada_phone)];
    let refused = d.ada_laptop.share_group_key(CHANNEL, &recipients);
    assert!(
        matches!(&refused, Err(OlmError::NoSession { device_id, .. }) if device_id == "PHONE"),
        "{refused:?}"
    );
    connect(&mut d.ada_laptop, &mut d.ada_phone);
    let batch = d.ada_laptop.share_group_key(CHANNEL, &recipients).unwrap();
    assert_eq!(batch[BOB].len() + batch[ADA].len(), 2);
    for (recipient, user, device) in [
        (&mut d.ada_phone, ADA, "PHONE"),
        (&mut d.bob_desktop, BOB, "DESKTOP"),
    ] {
        recipient
            .receive_to_device(ADA, "LAPTOP", &batch[user][device])
            .unwrap();
    }
    let ciphertext = d.ada_laptop.encrypt_channel_message(CHANNEL, "hi").unwrap();
    assert_eq!(
        d.ada_phone
            .decrypt_channel_message(CHANNEL, &ciphertext)
            .unwrap()
            .text,
        "hi"
    );
    assert_eq!(
        d.bob_desktop
            .decrypt_channel_message(CHANNEL, &ciphertext)
            .unwrap()
            .text,
        "hi"
    );
}

// After rotation (a removed device, or an explicit discard) the next share makes a new
// session; a device that holds only the old key cannot decrypt what is sent after it, even
// with the envelope rewritten to name the old session.
#[test]
fn rotation_locks_out_the_old_key() {
    let mut d = devices();
    share_with_both(&mut d);
    let old_session = d.ada_laptop.outbound_session_id(CHANNEL).unwrap();
    let before = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, "before")
        .unwrap();
    assert_eq!(
        d.bob_desktop
            .decrypt_channel_message(CHANNEL, &before)
            .unwrap()
            .text,
        "before"
    );

    assert_eq!(
        d.ada_laptop.remove_device(BOB, "DESKTOP"),
        vec![CHANNEL.to_owned()]
    );
    let not_shared = d.ada_laptop.encrypt_channel_message(CHANNEL, "too early");
    assert!(
        matches!(not_shared, Err(MegolmError::NotShared(_))),
        "{not_shared:?}"
    );
    let batch = d
        .ada_laptop
        .share_group_key(CHANNEL, &[peer(&d.ada_phone)])
        .unwrap();
    let new_session = d.ada_laptop.outbound_session_id(CHANNEL).unwrap();
    assert_ne!(new_session, old_session);
    assert!(!batch.contains_key(BOB));
    let content = &batch[ADA]["PHONE"];
    d.ada_phone
        .receive_to_device(ADA, "LAPTOP", content)
        .unwrap();

    let after = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, "after")
        .unwrap();
    assert_eq!(
        d.ada_phone
            .decrypt_channel_message(CHANNEL, &after)
            .unwrap()
            .text,
        "after"
    );
    let err = d
        .bob_desktop
        .decrypt_channel_message(CHANNEL, &after)
        .unwrap_err();
    assert!(matches!(err, MegolmError::UnknownSession { .. }), "{err}");
    let mut forged: Value = serde_json::from_str(&after).unwrap();
    forged["session_id"] = json!(old_session);
    let err = d
        .bob_desktop
        .decrypt_channel_message(CHANNEL, &forged.to_string())
        .unwrap_err();
    assert!(matches!(err, MegolmError::Decryption(_)), "{err}");
    assert_eq!(d.bob_desktop.undecryptable(), 2);
    assert_eq!(d.ada_phone.undecryptable(), 0);

    assert!(d.ada_laptop.discard_outbound_session(CHANNEL));
    assert!(!d.ada_laptop.discard_outbound_session(CHANNEL));
    d.ada_laptop
        .share_group_key(CHANNEL, &[peer(&d.ada_phone)])
        .unwrap();
    assert_ne!(
        d.ada_laptop.outbound_session_id(CHANNEL).unwrap(),
        new_session
    );
}

// Saved and loaded with its passphrase, a device keeps its identity and its sessions: it
// decrypts a Megolm message and an Olm message on sessions made before the save. The file
// holds neither its keys nor a known plaintext in the clear, and a wrong passphrase is
// told as such.
#[test]
fn storage_round_trip_keeps_sessions_and_hides_keys() {
    let mut d = devices();
    share_with_both(&mut d);
    let bob_identity = d.bob_desktop.account().curve25519();
    let bob_signing = d.bob_desktop.account().ed25519();
    let secret = "the plaintext that must not reach the disk";
    let earlier = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, secret)
        .unwrap();
    assert_eq!(
        d.bob_desktop
            .decrypt_channel_message(CHANNEL, &earlier)
            .unwrap()
            .text,
        secret
    );
    let olm_payload = json!({ "note": secret });

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bob-desktop.keys");
    d.bob_desktop
        .save(&path, "correct horse battery staple")
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for needle in [
        bob_identity.as_str(),
        bob_signing.as_str(),
        secret,
        "DESKTOP",
        "\"account\"",
    ] {
        assert!(
            !contains(&bytes, needle.as_bytes()),
            "{needle:?} is in the file in the clear"
        );
    }

    let wrong = E2eeManager::load(&path, "Tr0ub4dor&3").unwrap_err();
    assert!(matches!(wrong, LoadError::WrongPassphrase), "{wrong}");
    assert!(wrong.to_string().contains("wrong passphrase"), "{wrong}");
    let missing = E2eeManager::load(&dir.path().join("none"), "x").unwrap_err();
    assert!(matches!(missing, LoadError::Io { .. }), "{missing}");

    let mut loaded = E2eeManager::load(&path, "correct horse battery staple").unwrap();
    assert_eq!(loaded.account().curve25519(), bob_identity);
    assert_eq!(
        loaded.account().device_keys(),
        d.bob_desktop.account().device_keys()
    );
    assert_eq!(
        loaded
            .decrypt_channel_message(CHANNEL, &earlier)
            .unwrap()
            .text,
        secret
    );
    let later = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, "later")
        .unwrap();
    assert_eq!(
        loaded
            .decrypt_channel_message(CHANNEL, &later)
            .unwrap()
            .text,
        "later"
    );
    let bob = peer(&loaded);
    let olm = d.ada_laptop.encrypt_to_device(&bob, &olm_payload).unwrap();
    assert_eq!(
        loaded.decrypt_to_device(ADA, "LAPTOP", &olm).unwrap(),
        olm_payload
    );
    let answer = loaded
        .encrypt_to_device(&peer(&d.ada_laptop), &json!({"ok": true}))
        .unwrap();
    assert_eq!(
        answer["type"], 1,
        "the loaded session answers on the same session"
    );
    assert_eq!(
        d.ada_laptop
            .decrypt_to_device(BOB, "DESKTOP", &answer)
            .unwrap(),
        json!({"ok": true})
    );

    // The sender too: its outbound session survives a save and a load.
    let ada_path = dir.path().join("ada-laptop.keys");
    d.ada_laptop.save(&ada_path, "pw").unwrap();
    let mut ada = E2eeManager::load(&ada_path, "pw").unwrap();
    let session = d.ada_laptop.outbound_session_id(CHANNEL);
    assert_eq!(ada.outbound_session_id(CHANNEL), session);
    let resumed = ada.encrypt_channel_message(CHANNEL, "resumed").unwrap();
    assert_eq!(
        loaded
            .decrypt_channel_message(CHANNEL, &resumed)
            .unwrap()
            .text,
        "resumed"
    );
    assert_eq!(loaded.undecryptable(), 0);
}

// Whatever arrives as a ciphertext, decrypting answers an error and counts it, never
// panicking: not JSON, another algorithm, a damaged body, an unknown session, a message
// moved to another channel, a damaged MAC.
#[test]
fn undecryptable_messages_are_counted() {
    let mut d = devices();
    share_with_both(&mut d);
    let good = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, "fine")
        .unwrap();
    let envelope: Value = serde_json::from_str(&good).unwrap();
    let with = |field: &str, value: Value| {
        let mut changed = envelope.clone();
        changed[field] = value;
        changed.to_string()
    };
    let body = envelope["body"].as_str().unwrap();
    let mut flipped = body.to_owned();
    let last = if flipped.ends_with('A') { "B" } else { "A" };
    flipped.replace_range(flipped.len() - 1.., last);
    let bad = [
        String::new(),
        "not json".to_owned(),
        "{}".to_owned(),
        with("algorithm", json!("olm.v1")),
        with("body", json!("%%%")),
        with("body", json!(&body[..body.len() / 2])),
        with("session_id", json!("unknown")),
        with("sender_key", json!(d.bob_desktop.account().curve25519())),
        with("body", json!(flipped)),
    ];
    for (i, ciphertext) in bad.iter().enumerate() {
        assert!(
            d.bob_desktop
                .decrypt_channel_message(CHANNEL, ciphertext)
                .is_err(),
            "case {i}"
        );
        assert_eq!(d.bob_desktop.undecryptable(), i as u64 + 1);
    }
    let moved = d
        .bob_desktop
        .decrypt_channel_message("C8", &good)
        .unwrap_err();
    assert!(matches!(moved, MegolmError::WrongChannel { .. }), "{moved}");
    assert_eq!(d.bob_desktop.undecryptable(), bad.len() as u64 + 1);
    assert_eq!(
        d.bob_desktop
            .decrypt_channel_message(CHANNEL, &good)
            .unwrap()
            .text,
        "fine"
    );
    assert_eq!(d.bob_desktop.undecryptable(), bad.len() as u64 + 1);
}

// Ciphertexts and to-device messages stay within the server's 64 KiB limits: what would
// be larger is refused before it is sent, and the sessions go on working.
#[test]
fn sizes_stay_within_the_api_limits() {
    let mut d = devices();
    share_with_both(&mut d);
    let fits = "x".repeat(40 * 1024);
    let ciphertext = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, &fits)
        .unwrap();
    assert!(ciphertext.len() <= CIPHERTEXT_BYTES_MAX);
    let too_big = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, &"x".repeat(60 * 1024));
    assert!(
        matches!(too_big, Err(MegolmError::TooLarge { .. })),
        "{too_big:?}"
    );
    let next = d
        .ada_laptop
        .encrypt_channel_message(CHANNEL, "next")
        .unwrap();
    assert_eq!(
        d.bob_desktop
            .decrypt_channel_message(CHANNEL, &ciphertext)
            .unwrap()
            .text,
        fits
    );
    assert_eq!(
        d.bob_desktop
            .decrypt_channel_message(CHANNEL, &next)
            .unwrap()
            .text,
        "next"
    );

    let bob = peer(&d.bob_desktop);
    let payload = json!({ "blob": "y".repeat(30 * 1024) });
    let content = d.ada_laptop.encrypt_to_device(&bob, &payload).unwrap();
    assert!(content.to_string().len() <= TO_DEVICE_CONTENT_BYTES_MAX);
    let too_big = d
        .ada_laptop
        .encrypt_to_device(&bob, &json!({ "blob": "y".repeat(60 * 1024) }));
    assert!(
        matches!(too_big, Err(OlmError::TooLarge { .. })),
        "{too_big:?}"
    );
    assert_eq!(
        d.bob_desktop
            .decrypt_to_device(ADA, "LAPTOP", &content)
            .unwrap(),
        payload
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

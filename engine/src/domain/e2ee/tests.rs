use super::*;
use ed25519_dalek::{Signer, SigningKey};

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);
const STRANGER: UserId = UserId(3);

/// Alice and Bob share a workspace; the stranger shares none with either.
fn shares(a: UserId, b: UserId) -> bool {
    a == b || (a != STRANGER && b != STRANGER)
}

fn b64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// Keys of a device, signed by the ed25519 key made from `seed`.
fn signed_keys(user: UserId, device: &str, seed: u8) -> DeviceKeys {
    let signing = SigningKey::from_bytes(&[seed; 32]);
    let curve25519 = b64(&[seed.wrapping_add(1); 32]);
    let ed25519 = b64(signing.verifying_key().as_bytes());
    let signed = canonical_device_json(user, device, &curve25519, &ed25519);
    DeviceKeys {
        curve25519,
        ed25519,
        signature: b64(&signing.sign(signed.as_bytes()).to_bytes()),
    }
}

fn key(id: &str, byte: u8) -> DeviceKey {
    DeviceKey {
        id: id.to_owned(),
        key: b64(&[byte; 32]),
    }
}

/// Decides and applies; answers what the owner would answer.
fn run(state: &mut E2eeState, cmd: E2eeCommand) -> Result<E2eeOutcome, DomainError> {
    Ok(match state.decide(cmd, shares)? {
        E2eeDecision::Answer(a) => a,
        E2eeDecision::Change(c) => {
            state.apply(&c);
            match c {
                E2eeChange::DeviceRegistered { .. } => E2eeOutcome::Registered,
                E2eeChange::KeysUploaded { user, device, .. } => {
                    E2eeOutcome::KeyCount(state.unclaimed(user, &device))
                }
                E2eeChange::KeysClaimed { keys, .. } => E2eeOutcome::Claimed(keys),
                E2eeChange::DeviceRemoved { .. } => E2eeOutcome::Removed,
                E2eeChange::ToDeviceSent { .. } => E2eeOutcome::ToDeviceSent,
                E2eeChange::ToDeviceAcked { .. } => E2eeOutcome::ToDeviceAcked,
            }
        }
    })
}

fn register(state: &mut E2eeState, user: UserId, device: &str) -> Result<E2eeOutcome, DomainError> {
    let device = device.to_owned();
    run(
        state,
        E2eeCommand::Register {
            user,
            device,
            at_us: 7,
        },
    )
}

fn upload(
    state: &mut E2eeState,
    user: UserId,
    device: &str,
    up: KeysUpload,
) -> Result<E2eeOutcome, DomainError> {
    let (device, upload) = (device.to_owned(), Box::new(up));
    run(
        state,
        E2eeCommand::Upload {
            user,
            device,
            upload,
        },
    )
}

fn claim(state: &mut E2eeState, user: UserId, devices: &[(UserId, &str)]) -> Vec<ClaimedKey> {
    let devices = devices.iter().map(|(u, d)| (*u, d.to_string())).collect();
    match run(state, E2eeCommand::Claim { user, devices }) {
        Ok(E2eeOutcome::Claimed(keys)) => keys,
        other => panic!("claim answered {other:?}"),
    }
}

fn one_time(ids: std::ops::Range<u32>) -> KeysUpload {
    KeysUpload {
        one_time_keys: ids.map(|i| key(&format!("k{i:04}"), i as u8)).collect(),
        ..KeysUpload::default()
    }
}

#[test]
fn device_keys_need_the_devices_own_signature() {
    let good = signed_keys(ALICE, "phone", 9);
    assert_eq!(check_device_keys(ALICE, "phone", &good), Ok(()));
    // The same keys claimed for another device or another user do not verify.
    assert!(matches!(
        check_device_keys(ALICE, "laptop", &good),
        Err(DomainError::BadSignature(_))
    ));
    assert!(matches!(
        check_device_keys(BOB, "phone", &good),
        Err(DomainError::BadSignature(_))
    ));
    // A swapped curve25519 key is not what was signed.
    let mut swapped = good.clone();
    swapped.curve25519 = b64(&[77; 32]);
    assert!(matches!(
        check_device_keys(ALICE, "phone", &swapped),
        Err(DomainError::BadSignature(_))
    ));
    let mut short = good;
    short.signature.truncate(40);
    assert!(matches!(
        check_device_keys(ALICE, "phone", &short),
        Err(DomainError::BadSignature(_))
    ));
}

#[test]
fn canonical_json_sorts_its_keys_and_has_no_whitespace() {
    assert_eq!(
        canonical_device_json(UserId(1), "d1", "C", "E"),
        format!(
            r#"{{"curve25519":"C","device_id":"d1","ed25519":"E","user_id":"{}"}}"#,
            UserId(1)
        )
    );
}

#[test]
fn registration_is_idempotent_bounded_and_never_reuses_a_removed_id() {
    let mut s = E2eeState::default();
    assert_eq!(
        register(&mut s, ALICE, "phone"),
        Ok(E2eeOutcome::Registered)
    );
    assert_eq!(
        register(&mut s, ALICE, "phone"),
        Ok(E2eeOutcome::Registered)
    );
    assert!(matches!(
        register(&mut s, ALICE, "bad id"),
        Err(DomainError::Invalid(_))
    ));
    assert!(matches!(
        register(&mut s, ALICE, ""),
        Err(DomainError::Invalid(_))
    ));
    for i in 1..DEVICES_PER_USER_MAX {
        register(&mut s, ALICE, &format!("d{i}")).unwrap();
    }
    assert!(matches!(
        register(&mut s, ALICE, "one-too-many"),
        Err(DomainError::TooMany(_))
    ));
    // Bob's devices are counted apart.
    assert_eq!(register(&mut s, BOB, "phone"), Ok(E2eeOutcome::Registered));
    let removed = run(
        &mut s,
        E2eeCommand::Remove {
            user: ALICE,
            device: "phone".into(),
        },
    );
    assert_eq!(removed, Ok(E2eeOutcome::Removed));
    assert!(s.device(ALICE, "phone").is_none());
    assert!(matches!(
        register(&mut s, ALICE, "phone"),
        Err(DomainError::Conflict(_))
    ));
    // Room was made: a new ID registers.
    assert_eq!(
        register(&mut s, ALICE, "tablet"),
        Ok(E2eeOutcome::Registered)
    );
    // Only one's own devices can be removed.
    let theirs = run(
        &mut s,
        E2eeCommand::Remove {
            user: ALICE,
            device: "d1".into(),
        },
    );
    assert_eq!(theirs, Ok(E2eeOutcome::Removed));
    let not_mine = run(
        &mut s,
        E2eeCommand::Remove {
            user: BOB,
            device: "d2".into(),
        },
    );
    assert_eq!(not_mine, Err(DomainError::NotFound("device")));
}

#[test]
fn uploads_add_new_keys_repeat_harmlessly_and_refuse_conflicts() {
    let mut s = E2eeState::default();
    register(&mut s, ALICE, "phone").unwrap();
    let unregistered = upload(&mut s, ALICE, "laptop", one_time(0..1));
    assert_eq!(unregistered, Err(DomainError::NotFound("device")));
    assert_eq!(
        upload(&mut s, ALICE, "phone", one_time(0..50)),
        Ok(E2eeOutcome::KeyCount(50))
    );
    // The same keys again change nothing.
    assert_eq!(
        upload(&mut s, ALICE, "phone", one_time(0..50)),
        Ok(E2eeOutcome::KeyCount(50))
    );
    assert_eq!(
        upload(&mut s, ALICE, "phone", one_time(40..90)),
        Ok(E2eeOutcome::KeyCount(90))
    );
    // A known ID with another key, one-time or fallback, claimed or not, is a conflict.
    let mut other = one_time(0..0);
    other.one_time_keys.push(key("k0003", 200));
    assert!(matches!(
        upload(&mut s, ALICE, "phone", other),
        Err(DomainError::KeyConflict(_))
    ));
    let fallback_clash = KeysUpload {
        fallback_key: Some(key("k0004", 201)),
        ..KeysUpload::default()
    };
    assert!(matches!(
        upload(&mut s, ALICE, "phone", fallback_clash),
        Err(DomainError::KeyConflict(_))
    ));
    claim(&mut s, BOB, &[(ALICE, "phone")]);
    let mut claimed_clash = one_time(0..0);
    claimed_clash.one_time_keys.push(key("k0000", 99));
    assert!(matches!(
        upload(&mut s, ALICE, "phone", claimed_clash),
        Err(DomainError::KeyConflict(_))
    ));
    // Limits: 100 keys per upload, 200 unclaimed per device.
    assert!(matches!(
        upload(&mut s, ALICE, "phone", one_time(100..201)),
        Err(DomainError::TooMany(_))
    ));
    assert_eq!(
        upload(&mut s, ALICE, "phone", one_time(100..200)),
        Ok(E2eeOutcome::KeyCount(189))
    );
    assert!(matches!(
        upload(&mut s, ALICE, "phone", one_time(200..212)),
        Err(DomainError::TooMany(_))
    ));
    // Malformed keys and IDs.
    let mut bad = one_time(0..0);
    bad.one_time_keys.push(DeviceKey {
        id: "x".into(),
        key: "not base64!".into(),
    });
    assert!(matches!(
        upload(&mut s, ALICE, "phone", bad),
        Err(DomainError::Invalid(_))
    ));
    let mut bad_id = one_time(0..0);
    bad_id.one_time_keys.push(key("a b", 1));
    assert!(matches!(
        upload(&mut s, ALICE, "phone", bad_id),
        Err(DomainError::Invalid(_))
    ));
}

#[test]
fn device_keys_are_set_once() {
    let mut s = E2eeState::default();
    register(&mut s, ALICE, "phone").unwrap();
    let keys = signed_keys(ALICE, "phone", 1);
    let up = |k: &DeviceKeys| KeysUpload {
        device_keys: Some(k.clone()),
        ..KeysUpload::default()
    };
    assert_eq!(
        s.listed(ALICE).count(),
        0,
        "listed only from the first key upload"
    );
    assert_eq!(
        upload(&mut s, ALICE, "phone", up(&keys)),
        Ok(E2eeOutcome::KeyCount(0))
    );
    assert_eq!(s.listed(ALICE).count(), 1);
    assert_eq!(
        upload(&mut s, ALICE, "phone", up(&keys)),
        Ok(E2eeOutcome::KeyCount(0))
    );
    let other = signed_keys(ALICE, "phone", 2);
    assert!(matches!(
        upload(&mut s, ALICE, "phone", up(&other)),
        Err(DomainError::KeyConflict(_))
    ));
    let forged = DeviceKeys {
        signature: other.signature,
        ..keys
    };
    assert!(matches!(
        upload(&mut s, ALICE, "phone", up(&forged)),
        Err(DomainError::BadSignature(_))
    ));
}

#[test]
fn each_one_time_key_is_handed_out_once_then_the_fallback_is_kept() {
    let mut s = E2eeState::default();
    register(&mut s, ALICE, "phone").unwrap();
    upload(&mut s, ALICE, "phone", one_time(0..3)).unwrap();
    let fallback = KeysUpload {
        fallback_key: Some(key("fb1", 50)),
        ..KeysUpload::default()
    };
    upload(&mut s, ALICE, "phone", fallback).unwrap();
    let mut handed = Vec::new();
    for _ in 0..3 {
        // The same device named twice in one claim gets one key.
        let keys = claim(&mut s, BOB, &[(ALICE, "phone"), (ALICE, "phone")]);
        assert_eq!(keys.len(), 1);
        assert!(!keys[0].fallback);
        handed.push(keys[0].key.id.clone());
    }
    assert_eq!(handed, ["k0000", "k0001", "k0002"]);
    assert_eq!(s.unclaimed(ALICE, "phone"), 0);
    for _ in 0..2 {
        let keys = claim(&mut s, BOB, &[(ALICE, "phone")]);
        assert_eq!(keys.len(), 1);
        assert!(keys[0].fallback);
        assert_eq!(keys[0].key, key("fb1", 50));
    }
    // A new fallback key replaces the old.
    let newer = KeysUpload {
        fallback_key: Some(key("fb2", 51)),
        ..KeysUpload::default()
    };
    upload(&mut s, ALICE, "phone", newer).unwrap();
    assert_eq!(claim(&mut s, BOB, &[(ALICE, "phone")])[0].key.id, "fb2");
}

#[test]
fn claims_reach_only_users_who_share_a_workspace() {
    let mut s = E2eeState::default();
    for user in [ALICE, STRANGER] {
        register(&mut s, user, "phone").unwrap();
        upload(&mut s, user, "phone", one_time(0..5)).unwrap();
    }
    assert!(claim(&mut s, ALICE, &[(STRANGER, "phone")]).is_empty());
    assert!(claim(&mut s, STRANGER, &[(ALICE, "phone"), (ALICE, "none")]).is_empty());
    assert_eq!(s.unclaimed(ALICE, "phone"), 5);
    assert_eq!(s.unclaimed(STRANGER, "phone"), 5);
    // A removed device's keys are gone with it.
    run(
        &mut s,
        E2eeCommand::Remove {
            user: ALICE,
            device: "phone".into(),
        },
    )
    .unwrap();
    assert!(claim(&mut s, BOB, &[(ALICE, "phone")]).is_empty());
}

fn send(
    s: &mut E2eeState,
    txn: &str,
    at_us: u64,
    to: &[(UserId, &str)],
) -> Result<E2eeOutcome, DomainError> {
    let messages = to
        .iter()
        .map(|(u, d)| (*u, d.to_string(), format!("{{\"txn\":\"{txn}\"}}")))
        .collect();
    let cmd = E2eeCommand::SendToDevice {
        user: ALICE,
        device: "phone".into(),
        txn_id: txn.into(),
        messages,
        at_us,
    };
    run(s, cmd)
}

fn ids(s: &E2eeState, user: UserId, device: &str) -> Vec<u64> {
    s.to_device(user, device, 0, usize::MAX)
        .0
        .iter()
        .map(|m| m.id)
        .collect()
}

#[test]
fn to_device_queues_are_idempotent_bounded_and_acknowledged() {
    let mut s = E2eeState::default();
    for (user, device) in [(ALICE, "phone"), (BOB, "laptop"), (STRANGER, "phone")] {
        register(&mut s, user, device).unwrap();
    }
    let hour = 3_600_000_000;
    let to_bob = [(BOB, "laptop"), (BOB, "gone"), (STRANGER, "phone")];
    assert_eq!(
        send(&mut s, "t1", hour, &to_bob),
        Ok(E2eeOutcome::ToDeviceSent)
    );
    // Only Bob's real device got it: the stranger shares no workspace with Alice.
    assert_eq!(ids(&s, BOB, "laptop"), [1]);
    assert!(ids(&s, STRANGER, "phone").is_empty());
    // The same transaction again within a day does nothing; after a day it is new.
    send(&mut s, "t1", 2 * hour, &to_bob).unwrap();
    assert_eq!(ids(&s, BOB, "laptop"), [1]);
    send(&mut s, "t2", 3 * hour, &to_bob).unwrap();
    send(&mut s, "t1", hour + TXN_KEPT_US, &to_bob).unwrap();
    assert_eq!(ids(&s, BOB, "laptop"), [1, 2, 3]);
    let (page, more) = s.to_device(BOB, "laptop", 1, 1);
    assert_eq!((page[0].id, more), (2, true));
    assert_eq!(
        (page[0].sender, page[0].sender_device.as_str()),
        (ALICE, "phone")
    );
    // Acknowledged messages are dropped; their IDs are never given again.
    let ack = |s: &mut E2eeState, upto| {
        run(
            s,
            E2eeCommand::AckToDevice {
                user: BOB,
                device: "laptop".into(),
                upto,
            },
        )
    };
    assert_eq!(ack(&mut s, 2), Ok(E2eeOutcome::ToDeviceAcked));
    assert_eq!(ids(&s, BOB, "laptop"), [3]);
    assert_eq!(
        ack(&mut s, 2),
        Ok(E2eeOutcome::ToDeviceAcked),
        "nothing left to acknowledge"
    );
    ack(&mut s, 3).unwrap();
    send(&mut s, "t3", 4 * hour, &to_bob).unwrap();
    assert_eq!(ids(&s, BOB, "laptop"), [4]);
    // A full queue refuses the whole call, never drops.
    for i in 0..TO_DEVICE_QUEUE_MAX - 1 {
        send(&mut s, &format!("f{i}"), 5 * hour, &[(BOB, "laptop")]).unwrap();
    }
    assert_eq!(ids(&s, BOB, "laptop").len(), TO_DEVICE_QUEUE_MAX);
    register(&mut s, BOB, "tablet").unwrap();
    let both = [(BOB, "tablet"), (BOB, "laptop")];
    assert!(matches!(
        send(&mut s, "full", 6 * hour, &both),
        Err(DomainError::QueueFull(_))
    ));
    assert!(ids(&s, BOB, "tablet").is_empty(), "nothing taken");
    // Removing a device drops its queue.
    run(
        &mut s,
        E2eeCommand::Remove {
            user: BOB,
            device: "laptop".into(),
        },
    )
    .unwrap();
    assert!(ids(&s, BOB, "laptop").is_empty());
}

#[test]
fn to_device_input_is_checked() {
    let mut s = E2eeState::default();
    register(&mut s, ALICE, "phone").unwrap();
    register(&mut s, BOB, "laptop").unwrap();
    assert!(matches!(
        send(&mut s, "", 1, &[(BOB, "laptop")]),
        Err(DomainError::Invalid(_))
    ));
    assert!(matches!(
        send(&mut s, "a b", 1, &[(BOB, "laptop")]),
        Err(DomainError::Invalid(_))
    ));
    let big = E2eeCommand::SendToDevice {
        user: ALICE,
        device: "phone".into(),
        txn_id: "big".into(),
        messages: vec![(
            BOB,
            "laptop".into(),
            "x".repeat(TO_DEVICE_CONTENT_BYTES_MAX + 1),
        )],
        at_us: 1,
    };
    assert!(matches!(run(&mut s, big), Err(DomainError::TooLarge(_))));
    let from_nowhere = E2eeCommand::SendToDevice {
        user: ALICE,
        device: "tablet".into(),
        txn_id: "t".into(),
        messages: vec![],
        at_us: 1,
    };
    assert_eq!(
        run(&mut s, from_nowhere),
        Err(DomainError::NotFound("device"))
    );
    assert!(ids(&s, BOB, "laptop").is_empty());
}

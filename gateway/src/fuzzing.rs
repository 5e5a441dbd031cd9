//! Checked entries for the fuzz targets of the gateway's decoders (`fuzz/`): client frames
//! in both of their forms, REST request bodies, upload forms, and QUIC datagrams. Each takes arbitrary
//! bytes, must not panic, and checks what must hold of what it accepts. The stable test
//! `gateway/tests/fuzz_corpus.rs` replays the committed corpora through the same functions.
//! Not part of the API.

use crate::protocol::{self, ClientFrame};
use crate::session::{Answer, Call, Limits, SessionConfig, SessionCore};
use chorus_engine::ids::{ChannelId, UserId};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Budgets that let everything through: the fuzzer explores the core, not the limiter.
struct Open;

impl Limits for Open {
    fn take_rate(&self, _: UserId) -> Result<(), crate::error::ApiError> {
        Ok(())
    }

    fn typing_allowed(&self, _: UserId, _: ChannelId) -> bool {
        true
    }
}

/// A client frame, as a WebSocket text message (when the bytes are UTF-8) and as a run of
/// length-prefixed QUIC frames: parsing never panics, a parsed frame names only what it
/// parsed, and a session core fed the frames answers each, within its bounds.
pub fn client_frame(data: &[u8]) -> bool {
    let mut texts = Vec::new();
    if let Ok(text) = std::str::from_utf8(data) {
        texts.push(text.to_owned());
    }
    let mut rest = data;
    while let Ok(Some((text, used))) = protocol::decode_length_prefixed(rest, 1 << 20) {
        assert!(used >= 4 && used <= rest.len());
        texts.push(text.to_owned());
        rest = &rest[used..];
    }
    let start = Instant::now();
    let config = SessionConfig {
        heartbeat_interval_s: 30,
        frame_bytes_max: 1 << 20,
        presence_flush: std::time::Duration::from_millis(250),
    };
    let mut core = SessionCore::new(UserId(1), 1, config, start);
    let mut accepted = false;
    for (i, text) in texts.iter().enumerate() {
        let (_, parsed) = protocol::parse_frame(text);
        if let Ok(ClientFrame::Resume { unknown, .. }) = &parsed {
            assert!(unknown.iter().all(|u| u.chars().count() <= 64));
        }
        accepted |= parsed.is_ok();
        let now = start + Duration::from_millis(i as u64);
        if core.wants_client_frames() {
            core.handle_text(now, text, &Open);
        }
        // Every call the core asks for is answered, as a driver would.
        while let Some(call) = core.poll_call() {
            core.handle_answer(now, answer_to(call), &Open);
        }
        let mut sent = 0;
        while core.poll_transmit().is_some() {
            sent += 1;
            assert!(sent <= 64, "a frame answered with more than a batch");
        }
    }
    accepted
}

/// The answer an engine would give a call, successful, for driving the core.
fn answer_to(call: Call) -> Answer {
    match call {
        Call::Start { .. } => Answer::Started(true),
        Call::Resume { reference, .. } => Answer::Resumed {
            reference,
            result: Ok(true),
        },
        Call::Command { reference, .. } => Answer::Command {
            reference,
            result: Ok(None),
        },
        Call::Typing { reference, .. } => Answer::Typing {
            reference,
            result: Ok(()),
        },
        Call::PresenceSub {
            reference, users, ..
        } => Answer::PresenceSub {
            reference,
            result: Ok(users
                .into_iter()
                .map(|u| (u, chorus_engine::presence::Presence::OFFLINE, 0))
                .collect()),
        },
        Call::Activity { .. } => Answer::Activity,
        Call::AckToDevice { reference, .. } => Answer::AckedToDevice {
            reference,
            result: Ok(()),
        },
        Call::MarkRead {
            reference,
            channel,
            seq,
        } => Answer::Read {
            reference,
            result: Ok(crate::session::ReadAck::Here(
                chorus_engine::view::ReadView {
                    channel_id: channel,
                    read_seq: seq,
                    last_seq: seq,
                    unread_count: 0,
                    mention_count: 0,
                },
            )),
        },
    }
}

/// A REST request body, parsed as every request type: never panics, however deep or long.
pub fn rest_body(data: &[u8]) -> bool {
    crate::api::parse_as_every_request(data) > 0
}

/// The boundary of the forms the multipart target reads.
pub const MULTIPART_BOUNDARY: &str = "XyZ";
/// The file limit of the multipart target: small, so the fuzzer reaches it.
pub const MULTIPART_FILE_BYTES_MAX: u64 = 4096;

/// An upload's form (`multipart/form-data` with boundary [`MULTIPART_BOUNDARY`]) read as
/// the upload route reads it, delivered in chunks whose size the first byte chooses (so
/// boundaries fall across chunks): nothing panics, an accepted form has a file of at most
/// the limit whose every byte reached the sink, and its workspace was named first.
/// Returns whether the form was accepted.
pub fn multipart(data: &[u8]) -> bool {
    use crate::files::upload::{read_form, Sink};
    use bytes::Bytes;
    #[derive(Default)]
    struct Memory {
        workspace: Option<String>,
        bytes: Vec<u8>,
    }
    impl Sink for Memory {
        async fn workspace(&mut self, id: &str) -> Result<(), crate::error::ApiError> {
            self.workspace = Some(id.to_owned());
            Ok(())
        }
        async fn write(&mut self, chunk: Bytes) -> Result<(), crate::error::ApiError> {
            assert!(self.workspace.is_some(), "file bytes before the workspace");
            self.bytes.extend_from_slice(&chunk);
            Ok(())
        }
    }
    let Some((first, body)) = data.split_first() else {
        return false;
    };
    let chunk = usize::from(*first % 64) + 1;
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut sink = Memory::default();
    let read = futures::executor::block_on(read_form(
        futures::stream::iter(chunks),
        MULTIPART_BOUNDARY,
        MULTIPART_FILE_BYTES_MAX,
        &mut sink,
    ));
    match read {
        Ok(form) => {
            assert!(form.size <= MULTIPART_FILE_BYTES_MAX);
            assert_eq!(form.size, sink.bytes.len() as u64);
            assert_eq!(sink.workspace.as_deref(), Some(form.workspace_id.as_str()));
            assert!(form.content_type.contains('/'));
            true
        }
        Err(e) => {
            assert!(matches!(e.status, 400 | 404 | 413), "{e:?}");
            false
        }
    }
}

/// The QUIC settings of the target: a certificate generated once per process.
fn quic_setup() -> &'static crate::quic::QuicSetup {
    static SETUP: OnceLock<crate::quic::QuicSetup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("chorus-fuzz-quic-{}", std::process::id()));
        let identity =
            crate::quic::cert::load_or_create(None, &dir).expect("a generated certificate");
        // The identity is in memory now; the files would outlive every fuzzing run.
        let _ = std::fs::remove_dir_all(&dir);
        let (router, _) = crate::quic::Router::new(2);
        crate::quic::QuicSetup::new(identity, router).expect("QUIC settings")
    })
}

/// A datagram at the QUIC port: routing it by its connection ID never panics and names a
/// shard that exists, and a fresh endpoint of ours handles it, and any connection it opens
/// answers, without panicking. Returns whether it opened a connection.
pub fn quic_datagram(data: &[u8]) -> bool {
    let setup = quic_setup();
    match crate::quic::cid::route(&setup.cid_key, data, 0, 2) {
        crate::quic::cid::Route::Here => {}
        crate::quic::cid::Route::Shard(s) => assert!(s < 2),
    }
    let mut endpoint = setup.endpoint(0);
    let now = Instant::now();
    let remote = "127.0.0.1:4433".parse().expect("an address");
    let mut buf = Vec::new();
    let event = endpoint.handle(now, remote, None, None, data.into(), &mut buf);
    let Some(quinn_proto::DatagramEvent::NewConnection(incoming)) = event else {
        return false;
    };
    let Ok((_, mut connection)) = endpoint.accept(incoming, now, &mut buf, None) else {
        return false;
    };
    while connection.poll().is_some() {}
    buf.clear();
    while connection.poll_transmit(now, 1, &mut buf).is_some() {
        buf.clear();
    }
    true
}

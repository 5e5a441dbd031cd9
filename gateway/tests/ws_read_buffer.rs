//! What a server WebSocket holds after a client frame larger than its read buffer
//! (`vendor/tungstenite`'s patch): every byte of every message, and no more memory than
//! before the large frame, once the message is dropped. Upstream, the read buffer grew to
//! the frame's length and kept it for the connection's life, so one `presence:sub` of a
//! hundred users left each connection holding some 2 KiB more.
//!
//! Counted per thread with this binary's own allocator, through tungstenite's public API
//! as the gateway configures it (`READ_BUFFER_BYTES`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Cursor, Read, Write};

use chorus_gateway::ws::READ_BUFFER_BYTES;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

thread_local! {
    /// Bytes this thread allocated less those it freed (the tests run side by side).
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

fn live() -> isize {
    LIVE.with(Cell::get)
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A client's bytes, handed out as a non-blocking socket would: what was asked for, then
/// `WouldBlock` once all are read. Writes (tungstenite's answers) are dropped.
struct Feed {
    bytes: Vec<u8>,
    at: usize,
}

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.bytes.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.bytes.len() - self.at);
        buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The masked frames a client sends for these texts, each a message of its own.
fn client_frames(texts: &[String]) -> Vec<u8> {
    let mut client = WebSocket::from_raw_socket(Cursor::new(Vec::new()), Role::Client, None);
    for text in texts {
        client.send(Message::text(text.clone())).expect("written");
    }
    client.get_ref().get_ref().clone()
}

/// A text of `len` bytes that differs from its neighbours, so a byte out of place shows.
fn text(len: usize, seed: usize) -> String {
    (0..len)
        .map(|i| char::from(b'a' + ((i * 7 + seed * 13) % 26) as u8))
        .collect()
}

fn server(bytes: Vec<u8>) -> WebSocket<Feed> {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    WebSocket::from_raw_socket(Feed { bytes, at: 0 }, Role::Server, Some(config))
}

/// Reads the next message and checks it is the text expected.
fn read_text(ws: &mut WebSocket<Feed>, want: &str) {
    match ws.read().expect("a message") {
        Message::Text(got) => assert!(
            got.as_str() == want,
            "a message of {} bytes changed",
            want.len()
        ),
        other => panic!("expected a text, got {other:?}"),
    }
}

#[test]
fn a_large_frame_leaves_the_read_buffer_as_it_was() {
    let (small, large) = (text(120, 0), text(16_000, 1));
    let mut ws = server(client_frames(&[
        small.clone(),
        large.clone(),
        small.clone(),
    ]));
    read_text(&mut ws, &small);
    let before = live();
    read_text(&mut ws, &large);
    read_text(&mut ws, &small);
    let grown = live() - before;
    // Upstream: the 16,000-byte frame's buffer, kept. Patched: a new buffer of the
    // configured size in place of the first one.
    assert!(
        grown <= READ_BUFFER_BYTES as isize,
        "the connection holds {grown} bytes more after a 16,000-byte frame"
    );
    drop(ws);
}

// Frames of every size around the read buffer's, back to back: whatever a read took past
// the end of a large frame is the start of the next one, and must survive the buffer's
// replacement byte for byte.
#[test]
fn messages_after_large_frames_arrive_whole() {
    let lens = [
        10, 511, 512, 513, 600, 20, 1_000, 1, 5_000, 300, 16_000, 16_000, 2, 64_000, 126, 65_536, 7,
    ];
    let texts: Vec<String> = lens.iter().enumerate().map(|(i, n)| text(*n, i)).collect();
    let mut ws = server(client_frames(&texts));
    for t in &texts {
        read_text(&mut ws, t);
    }
    assert!(
        matches!(ws.read(), Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock)
    );
}

//! The session's frames on their way to the socket, written straight from their payloads.
//!
//! A server frame is a 2-, 4- or 10-byte header (FIN, opcode text, no mask: RFC 6455 §5.2)
//! and the payload, which is the `Bytes` the engine encoded once for every subscriber or
//! the core's own reply. Nothing is copied into a per-connection buffer: a batch goes out
//! in one `sendmsg` whose slices are the headers and the shared payloads, and a frame the
//! socket took only part of stays queued with its offset. So an idle connection keeps no
//! write buffer, however large a frame it once sent (tungstenite's grows to the largest
//! batch and never shrinks), and a batch costs one system call rather than a copy per
//! frame and a write.
//!
//! tungstenite still writes its own frames (the answers to pings and closes) on the same
//! socket; the driver lets it only between whole frames of this queue (see `SyncIo`'s
//! gate in the driver).

use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

/// Frames gathered into one `sendmsg`: two slices each, far under the kernel's 1,024.
const FRAMES_PER_SEND: usize = 128;

/// A server text frame's header.
#[derive(Clone, Copy, Debug)]
struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    /// The header of an unmasked, final text frame of `payload` bytes.
    fn text(payload: usize) -> Header {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x81;
        let len = if payload < 126 {
            bytes[1] = payload as u8;
            2
        } else if let Ok(short) = u16::try_from(payload) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload as u64).to_be_bytes());
            10
        };
        Header { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Frames queued for the socket, in order; the front one may be partly written.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    frames: VecDeque<(Header, Bytes)>,
    /// Bytes of the front frame already written, counting its header first.
    written: usize,
}

impl Outbound {
    /// Whether every queued byte was written.
    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Queues a text frame whose payload is `payload` (UTF-8 already: every frame is
    /// serde_json's output).
    pub(super) fn push_text(&mut self, payload: Bytes) {
        debug_assert!(std::str::from_utf8(&payload).is_ok());
        self.frames
            .push_back((Header::text(payload.len()), payload));
    }

    /// Writes to the socket `fd` until the queue is empty (`Ok(true)`) or the socket is
    /// full (`Ok(false)`, frames left), one `sendmsg` per [`FRAMES_PER_SEND`] frames.
    pub(super) fn send_to(&mut self, fd: RawFd) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let mut slices = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2 * FRAMES_PER_SEND];
            let mut count = 0;
            let mut skip = self.written;
            for (header, payload) in self.frames.iter().take(FRAMES_PER_SEND) {
                for part in [header.as_slice(), &payload[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    let rest = &part[skip..];
                    skip = 0;
                    slices[count] = libc::iovec {
                        iov_base: rest.as_ptr() as *mut libc::c_void,
                        iov_len: rest.len(),
                    };
                    count += 1;
                }
            }
            // SAFETY: `msg` points at `count` initialised slices of buffers this queue owns,
            // alive and unmodified for the call; no name or control data is passed.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = slices.as_mut_ptr();
                msg.msg_iovlen = count as _;
                libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err(e),
                }
            }
            self.advance(sent as usize);
        }
        Ok(true)
    }

    /// The unwritten rest of the front frame's header, or else of its payload: what to
    /// hand the socket's own `poll_write` when the socket was full, so that it registers
    /// for writability (and takes the bytes if there is room by then).
    pub(super) fn front(&self) -> &[u8] {
        let Some((header, payload)) = self.frames.front() else {
            return &[];
        };
        let h = usize::from(header.len);
        if self.written < h {
            &header.as_slice()[self.written..]
        } else {
            &payload[self.written - h..]
        }
    }

    /// Counts `n` more bytes as written, dropping the frames they complete.
    pub(super) fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some((header, payload)) = self.frames.front() else {
                debug_assert!(false, "advanced past the queue");
                return;
            };
            let left = usize::from(header.len) + payload.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            self.frames.pop_front();
        }
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            // Every idle connection would keep it: it is allocated again per burst.
            self.frames = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// Reads the frames out of `bytes` as a client would: (payload) per frame.
    fn parse(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0x81, "FIN + text");
            assert_eq!(bytes[1] & 0x80, 0, "a server frame is not masked");
            let (len, at) = match bytes[1] {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (usize::from(n), 2),
            };
            frames.push(bytes[at..at + len].to_vec());
            bytes = &bytes[at + len..];
        }
        frames
    }

    // Each length takes the shortest header RFC 6455 allows, at every boundary.
    #[test]
    fn headers_at_each_boundary() {
        for (len, header) in [
            (0, 2),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (1 << 20, 10),
        ] {
            let h = Header::text(len);
            assert_eq!(h.as_slice().len(), header, "{len}");
            let payload = vec![b'x'; len];
            let mut bytes = h.as_slice().to_vec();
            bytes.extend_from_slice(&payload);
            assert_eq!(parse(&bytes), vec![payload]);
        }
    }

    // Frames of every size go out whole and in order through a socket that keeps filling
    // up, each resumed at its exact byte: the reader sees exactly the frames pushed.
    #[test]
    fn a_full_socket_resumes_mid_frame() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let sizes = [3usize, 125, 126, 70_000, 10, 300_000, 0, 65_535, 65_536, 5];
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| b'a' + ((i + j) % 26) as u8).collect())
            .collect();
        let mut out = Outbound::default();
        for p in &payloads {
            out.push_text(Bytes::from(p.clone()));
        }
        let mut received = Vec::new();
        let mut fulls = 0;
        loop {
            if out.send_to(ours.as_raw_fd()).unwrap() {
                break;
            }
            fulls += 1;
            assert!(!out.front().is_empty(), "a full socket leaves a front");
            let mut chunk = vec![0u8; 50_000];
            let n = theirs.read(&mut chunk).unwrap();
            received.extend_from_slice(&chunk[..n]);
        }
        assert!(fulls > 0, "the socket filled at least once");
        assert!(out.is_empty() && out.front().is_empty());
        drop(ours);
        theirs.read_to_end(&mut received).unwrap();
        assert_eq!(parse(&received), payloads);
    }

    // `advance` counts bytes across frame boundaries, and `front` follows it from the
    // header into the payload.
    #[test]
    fn advance_and_front_agree() {
        let mut out = Outbound::default();
        out.push_text(Bytes::from_static(b"hello"));
        out.push_text(Bytes::from_static(b"world!"));
        assert_eq!(out.front(), &[0x81, 5]);
        out.advance(1);
        assert_eq!(out.front(), &[5]);
        out.advance(3);
        assert_eq!(out.front(), b"llo");
        out.advance(3 + 2);
        assert_eq!(out.front(), b"world!");
        out.advance(6);
        assert!(out.is_empty());
    }

    // A closed peer is an error, not a signal that kills the process.
    #[test]
    fn a_closed_peer_is_an_error() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let mut out = Outbound::default();
        out.push_text(Bytes::from_static(b"x"));
        assert!(out.send_to(ours.as_raw_fd()).is_err());
    }
}

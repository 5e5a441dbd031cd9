//! What the tests that run nodes on real sockets share.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long any one wait of these tests may take.
pub const MINUTE: Duration = Duration::from_secs(60);

/// `n` loopback addresses free a moment ago.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Waits until `ok`, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Binds a node's listener, waiting while a restarted node finds its port still held.
pub async fn bind(addr: SocketAddr) -> glommio::net::TcpListener {
    loop {
        match glommio::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(_) => glommio::timer::sleep(Duration::from_millis(20)).await,
        }
    }
}

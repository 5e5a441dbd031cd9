//! What the scripted-server tests share.

use chorus_client::types::User;
use chorus_client::{Client, Session};
use std::net::SocketAddr;

/// A session of user `U1` against the scripted server at `addr` (which checks no token).
pub fn session_at(addr: SocketAddr) -> Session {
    let client = Client::new(&format!("http://{addr}")).expect("client");
    let user = User {
        id: "U1".into(),
        email: "a@example.com".into(),
        name: "A".into(),
    };
    client.session("token".into(), user)
}

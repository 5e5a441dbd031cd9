//! The load generator's side of a Chorus WebSocket: connecting from a chosen loopback
//! source address, and reading only the fields of a frame that a measurement needs.
//!
//! A worker holds thousands of these on one current-thread runtime, so nothing here spawns
//! threads or keeps more than the socket and tungstenite's buffers per connection.

use serde::Deserialize;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// An open, authenticated WebSocket session (its `hello` already read).
pub type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to the server at `server` from `source` (any free port), authenticated
/// with `token`, and waits for its `hello`.
pub async fn connect(server: SocketAddr, source: IpAddr, token: &str) -> anyhow::Result<Ws> {
    use futures_util::{SinkExt, StreamExt};
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    defer_port_choice(&socket)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}/ws/v1/connect?token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if Frame::parse(&text)?.kind == "hello" => {}
        other => anyhow::bail!("expected hello, got {other:?}"),
    }
    // The server holds a new session's events for a short grace in case its first frame
    // is a `resume`; any other first frame starts it live at once. A client with nothing to
    // resume says so with a ping, so the run never waits out the grace, and the `pong`
    // says the session is live: a measurement that starts after it finds no session still
    // starting.
    ws.send(Message::text(r#"{"type":"ping"}"#)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if Frame::parse(&text)?.kind == "pong" => return Ok(ws),
            Some(Ok(_)) => {}
            other => anyhow::bail!("expected pong, got {other:?}"),
        }
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`, so that binding to a source address leaves the port to
/// `connect`. Without it, `bind(addr, 0)` searches for a port free for every destination,
/// which costs the kernel more the more sockets are bound: at 9,500 connections it took a
/// whole core of system time while connecting.
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd, and a pointer to an int of the size passed, as the option
    // expects.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The fields of a server frame the harness reads; everything else is skipped unparsed.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    /// `hello`, `event`, `ack`, `error`, `pong`, ...
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The request's `ref`, echoed in `ack` and `error`.
    #[serde(rename = "ref", default, borrow)]
    pub reference: Option<Cow<'a, str>>,
    /// The event of an `event` frame.
    #[serde(default, borrow)]
    pub event: Option<EventBody<'a>>,
}

/// The `event` object of an `event` frame.
#[derive(Debug, Deserialize)]
pub struct EventBody<'a> {
    /// `message:new`, `member:joined`, ...
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The message, for `message:*` events.
    #[serde(default, borrow)]
    pub message: Option<MessageBody<'a>>,
}

/// The one field of a message the harness reads.
#[derive(Debug, Deserialize)]
pub struct MessageBody<'a> {
    /// The message text, where senders put their due time.
    #[serde(borrow)]
    pub text: Cow<'a, str>,
}

impl<'a> Frame<'a> {
    /// Parses a frame's JSON text.
    pub fn parse(text: &'a str) -> serde_json::Result<Frame<'a>> {
        serde_json::from_str(text)
    }

    /// The text of a `message:new` event, if this is one.
    pub fn new_message_text(&self) -> Option<&str> {
        let event = self.event.as_ref().filter(|e| e.kind == "message:new")?;
        event.message.as_ref().map(|m| m.text.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An event frame yields its message text; acks and hellos yield their type and ref.
    #[test]
    fn frames_parse() {
        let event = r#"{"type":"event","channel_id":"C1","seq":3,"event":{"type":"message:new",
            "message":{"id":"M1-3","text":"123 4 xx","reactions":{}}}}"#;
        let f = Frame::parse(event).unwrap();
        assert_eq!(f.new_message_text(), Some("123 4 xx"));
        let ack = r#"{"message":{"text":"9 1"},"ref":"77","type":"ack"}"#;
        let f = Frame::parse(ack).unwrap();
        assert_eq!(
            (f.kind.as_ref(), f.reference.as_deref()),
            ("ack", Some("77"))
        );
        assert_eq!(f.new_message_text(), None);
        let joined = r#"{"type":"event","event":{"type":"member:joined","user_id":"U1"}}"#;
        assert_eq!(Frame::parse(joined).unwrap().new_message_text(), None);
    }
}

//! The QUIC transport of the event stream (`API.md` §8): the same frames as the WebSocket,
//! each a 4-byte big-endian length and the JSON, on the first bidirectional stream, which
//! begins with `{"type":"auth","token"}`.
//!
//! The server's certificate is pinned by the SHA-256 of its DER bytes, which the server
//! logs at start: a self-signed certificate then needs no certificate authority, and a
//! certificate other than the pinned one is refused. The rest of the stream (resume,
//! dedupe, reconnects) is the WebSocket stream's, through an adapter that presents QUIC
//! frames as WebSocket messages.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

/// The ALPN protocol of a Chorus session.
pub const ALPN: &[u8] = b"chorus/1";
/// The largest frame the client reads.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Where a QUIC stream connects, and the certificate it accepts.
#[derive(Clone, Debug)]
pub struct QuicTarget {
    /// The server's QUIC address (`listening ... quic=ADDR`).
    pub addr: SocketAddr,
    /// The name sent in TLS (SNI); the pin, not the name, decides trust.
    pub server_name: String,
    /// The SHA-256 of the server certificate's DER bytes, as hex.
    pub pin_sha256: String,
}

/// An open QUIC session, presented as the WebSocket stream's parts.
pub(crate) struct QuicConn {
    pub read: mpsc::Receiver<Result<WsMessage, WsError>>,
    pub writes: mpsc::Sender<WsMessage>,
    pub writer: JoinHandle<()>,
    pub connection: quinn::Connection,
    /// Kept so that the socket lives as long as the connection.
    pub endpoint: quinn::Endpoint,
}

/// Why a QUIC session could not be opened.
pub(crate) fn describe(e: impl std::fmt::Display) -> String {
    format!("quic: {e}")
}

/// Connects, opens the session stream and sends `auth` and then `first` (the `resume`).
pub(crate) async fn open(
    target: &QuicTarget,
    token: &str,
    first: String,
    write_queue: usize,
) -> Result<QuicConn, String> {
    let bind: SocketAddr = if target.addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(describe)?;
    endpoint.set_default_client_config(client_config(&target.pin_sha256)?);
    let connection = endpoint
        .connect(target.addr, &target.server_name)
        .map_err(describe)?
        .await
        .map_err(describe)?;
    let (mut send, recv) = connection.open_bi().await.map_err(describe)?;
    let auth = serde_json::json!({"type": "auth", "token": token}).to_string();
    write_frame(&mut send, auth.as_bytes())
        .await
        .map_err(describe)?;
    write_frame(&mut send, first.as_bytes())
        .await
        .map_err(describe)?;
    let (read_tx, read) = mpsc::channel(write_queue.max(16));
    tokio::spawn(read_loop(recv, connection.clone(), read_tx));
    let (writes, rx) = mpsc::channel(write_queue);
    let writer = tokio::spawn(write_loop(send, connection.clone(), rx));
    Ok(QuicConn {
        read,
        writes,
        writer,
        connection,
        endpoint,
    })
}

async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), quinn::WriteError> {
    let len = u32::try_from(frame.len()).expect("frames are far below 4 GiB");
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(frame).await
}

/// Reads frames and hands them on as WebSocket text messages; a broken frame is reported
/// as the WebSocket error of the same kind, so the stream fails the connection alike.
async fn read_loop(
    mut recv: quinn::RecvStream,
    connection: quinn::Connection,
    out: mpsc::Sender<Result<WsMessage, WsError>>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if recv.read_exact(&mut prefix).await.is_err() {
            // The server ends a session by finishing the stream and then closing the
            // connection with its code, which reaches the stream as a WebSocket close would.
            if let Some(frame) = close_frame_of(&connection.closed().await) {
                let _ = out.send(Ok(WsMessage::Close(Some(frame)))).await;
            }
            return;
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > FRAME_BYTES_MAX {
            let e = WsError::Capacity(
                tokio_tungstenite::tungstenite::error::CapacityError::MessageTooLong {
                    size: len,
                    max_size: FRAME_BYTES_MAX,
                },
            );
            let _ = out.send(Err(e)).await;
            return;
        }
        let mut frame = vec![0u8; len];
        if recv.read_exact(&mut frame).await.is_err() {
            let _ = out
                .send(Err(WsError::Protocol(
                    ProtocolError::ResetWithoutClosingHandshake,
                )))
                .await;
            return;
        }
        let message = match String::from_utf8(frame) {
            Ok(text) => Ok(WsMessage::text(text)),
            Err(e) => Err(WsError::Utf8(e.to_string())),
        };
        let failed = message.is_err();
        if out.send(message).await.is_err() || failed {
            return;
        }
    }
}

/// The close frame a WebSocket would have carried for how the server closed the QUIC
/// connection, if it closed it with an application error code.
fn close_frame_of(e: &quinn::ConnectionError) -> Option<CloseFrame> {
    let quinn::ConnectionError::ApplicationClosed(close) = e else {
        return None;
    };
    let code = u16::try_from(close.error_code.into_inner()).ok()?;
    Some(CloseFrame {
        code: code.into(),
        reason: String::from_utf8_lossy(&close.reason).into_owned().into(),
    })
}

/// Writes queued frames; a close message closes the connection with its code as the
/// application error code.
async fn write_loop(
    mut send: quinn::SendStream,
    connection: quinn::Connection,
    mut rx: mpsc::Receiver<WsMessage>,
) {
    while let Some(message) = rx.recv().await {
        match message {
            WsMessage::Text(text) if write_frame(&mut send, text.as_bytes()).await.is_err() => {
                return
            }
            WsMessage::Close(frame) => {
                close(&connection, frame.as_ref());
                return;
            }
            _ => {}
        }
    }
}

/// Closes the connection as a WebSocket close frame would.
pub(crate) fn close(connection: &quinn::Connection, frame: Option<&CloseFrame>) {
    let (code, reason) = frame.map_or((1000, ""), |f| (u16::from(f.code), f.reason.as_str()));
    connection.close(quinn::VarInt::from_u32(u32::from(code)), reason.as_bytes());
}

/// A quinn client configuration for Chorus: ALPN `chorus/1`, TLS 1.3 with the ring
/// provider, and only the certificate whose SHA-256 is `pin_sha256` accepted.
pub fn client_config(pin_sha256: &str) -> Result<quinn::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinVerifier {
        pin: pin_sha256.to_ascii_lowercase(),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(describe)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(describe)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Accepts exactly the certificate whose SHA-256 is pinned, and checks its handshake
/// signatures as any verifier would.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The SHA-256 of a certificate's DER bytes, as lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity.as_ref()) == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

//! An SMTP server on loopback for the end-to-end tests of email digests (`API.md` §13):
//! `aiosmtpd` (PyPI), run by a small Python script started here, which parses each
//! message with Python's own `email` package and prints its recipient, subject and text
//! and HTML parts as one JSON line. A test skips with a reason when aiosmtpd is not
//! installed, except where `CHORUS_REQUIRE_PEERS` is set (CI installs it and sets that).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a digest may take to arrive after its window closed.
pub const ARRIVE_WAIT: Duration = Duration::from_secs(20);
/// The `public_url` the servers of these tests link to.
pub const PUBLIC_URL: &str = "https://chat.example.com/app";

/// The SMTP server: receives, parses and prints each message as JSON, after refusing the
/// first `sys.argv[1]` messages with a transient 451 (printed as `{"refused": true}`).
const SINK: &str = r#"
import asyncio, email, email.policy, json, sys
from aiosmtpd.smtp import SMTP

refusals = int(sys.argv[1])

class Handler:
    async def handle_DATA(self, server, session, envelope):
        global refusals
        if refusals > 0:
            refusals -= 1
            print(json.dumps({"refused": True}), flush=True)
            return "451 4.3.0 try again later"
        m = email.message_from_bytes(envelope.content, policy=email.policy.default)
        text = m.get_body(preferencelist=("plain",))
        html = m.get_body(preferencelist=("html",))
        print(json.dumps({
            "rcpt": envelope.rcpt_tos,
            "from": str(m["from"]),
            "to": str(m["to"]),
            "subject": str(m["subject"]),
            "multipart": m.get_content_type(),
            "text": text.get_content() if text else None,
            "html": html.get_content() if html else None,
        }), flush=True)
        return "250 OK"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Handler()), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

/// An SMTP server on loopback, killed on drop.
pub struct Smtp {
    child: Child,
    pub port: u16,
    pub received: Arc<Mutex<Vec<Value>>>,
}

impl Smtp {
    /// Starts the sink; `None` (the test skips, saying why) when aiosmtpd is missing,
    /// which CI forbids.
    pub fn start() -> Option<Smtp> {
        Smtp::refusing(0)
    }

    /// Starts the sink refusing the first `refusals` messages with a transient error.
    pub fn refusing(refusals: usize) -> Option<Smtp> {
        let mut child = Command::new("python3")
            .args(["-c", SINK, &refusals.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let Some(Ok(port)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                std::env::var_os("CHORUS_REQUIRE_PEERS").is_none(),
                "aiosmtpd is not installed and CHORUS_REQUIRE_PEERS is set"
            );
            eprintln!("SKIPPED: aiosmtpd is not installed (python3 -m pip install aiosmtpd)");
            return None;
        };
        let port = port.trim().parse().expect("the sink's port");
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                r.lock().unwrap().push(v);
            }
        });
        Some(Smtp {
            child,
            port,
            received,
        })
    }

    /// The server's config: email through this sink, no push gateway.
    pub fn config(&self) -> String {
        format!(
            "{}smtp_url = \"smtp://127.0.0.1:{}\"\n\
             email_from = \"Chorus <chorus@example.com>\"\npublic_url = \"{PUBLIC_URL}/\"\n",
            super::UNLIMITED,
            self.port
        )
    }

    /// The digests received for `address`, in arrival order.
    pub fn to(&self, address: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m["rcpt"] == json!([address]))
            .cloned()
            .collect()
    }

    /// Waits for the `n`th digest to `address` and answers it with its arrival time.
    #[track_caller]
    pub fn wait_for(&self, address: &str, n: usize) -> (Value, Instant) {
        let deadline = Instant::now() + ARRIVE_WAIT;
        loop {
            if let Some(m) = self.to(address).get(n - 1) {
                return (m.clone(), Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "no digest {n} to {address}; got {:?}",
                self.received.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

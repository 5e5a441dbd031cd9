//! `moto_server` (PyPI `moto[server]`), a real S3 API on loopback, for the tests of the S3
//! backend. A test skips, saying why, when moto is not installed, except where
//! `CHORUS_REQUIRE_PEERS` is set (CI installs it and sets that).

use super::UNLIMITED;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket the tests make.
pub const BUCKET: &str = "chorus-files";

/// A `moto_server` on a free loopback port, killed on drop.
pub struct Moto {
    child: Child,
    /// Its endpoint URL.
    pub url: String,
}

impl Moto {
    /// Starts one; `None` if `moto_server` is not installed or did not listen.
    pub fn start() -> Option<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || moto.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(moto)
    }

    /// moto with the bucket made, and a server config that stores blobs there; `None`
    /// (the test skips, saying why) when moto is not installed, which CI forbids.
    pub fn with_bucket() -> Option<(Moto, String)> {
        let Some(moto) = Moto::start() else {
            assert!(
                std::env::var_os("CHORUS_REQUIRE_PEERS").is_none(),
                "moto_server is not installed and CHORUS_REQUIRE_PEERS is set"
            );
            eprintln!(
                "SKIPPED: moto_server is not installed (python3 -m pip install 'moto[server]')"
            );
            return None;
        };
        let created = ureq::put(&format!("{}/{BUCKET}", moto.url)).call();
        assert!(created.is_ok(), "create the bucket: {created:?}");
        let config = format!(
            "{UNLIMITED}blob_store = \"s3://{BUCKET}\"\ns3_endpoint = \"{}\"\n\
             s3_allow_http = true\ns3_access_key_id = \"test\"\n\
             s3_secret_access_key = \"test\"\n",
            moto.url
        );
        Some((moto, config))
    }

    /// The keys of the files' objects in the bucket (the engine's blobs aside).
    pub fn file_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| !k.starts_with("blobs/"))
            .collect()
    }

    /// The keys of the objects in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let body = ureq::get(&format!("{}/{BUCKET}?list-type=2", self.url))
            .call()
            .expect("list")
            .into_string()
            .expect("XML");
        body.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

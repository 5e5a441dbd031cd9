//! A push gateway on loopback for the end-to-end tests (`API.md` §13): a tiny HTTP/1.1
//! server that records each JSON body and answers 200, 500, 400, `{"rejected":[...]}`, or
//! closes the connection.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a push may take to arrive in these tests.
pub const ARRIVE_WAIT: Duration = Duration::from_secs(20);

/// How the sink answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Ok,
    Fail,
    /// 400: a push the gateway will never take.
    Refuse,
    /// Close the connection without an answer.
    Close,
    Reject(Vec<String>),
}

#[derive(Default)]
struct SinkState {
    answer: Option<Answer>,
    /// Bodies answered 200, in arrival order.
    accepted: Vec<Value>,
    /// Requests of any outcome.
    attempts: usize,
}

/// A push gateway on loopback.
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    state: Arc<Mutex<SinkState>>,
}

impl Sink {
    pub fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        let url = format!(
            "http://{}/_matrix/push/v1/notify",
            listener.local_addr().unwrap()
        );
        let state = Arc::new(Mutex::new(SinkState {
            answer: Some(Answer::Ok),
            ..Default::default()
        }));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(conn, s));
            }
        });
        Sink { url, state }
    }

    pub fn answer(&self, a: Answer) {
        self.state.lock().unwrap().answer = Some(a);
    }

    pub fn accepted(&self) -> Vec<Value> {
        self.state.lock().unwrap().accepted.clone()
    }

    pub fn attempts(&self) -> usize {
        self.state.lock().unwrap().attempts
    }

    /// The accepted pushes of a message, as `event_id`s.
    pub fn count(&self, event_id: &str) -> usize {
        self.accepted()
            .iter()
            .filter(|b| b["notification"]["event_id"] == event_id)
            .count()
    }

    /// Waits for an accepted push of the message to `pushkey`; returns its notification.
    #[track_caller]
    pub fn wait_for(&self, event_id: &str, pushkey: &str) -> Value {
        let deadline = Instant::now() + ARRIVE_WAIT;
        loop {
            let found = self.accepted().into_iter().find(|b| {
                let n = &b["notification"];
                n["event_id"] == event_id && n["devices"][0]["pushkey"] == pushkey
            });
            if let Some(b) = found {
                return b["notification"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no push of {event_id} to {pushkey}; got {:?}",
                self.accepted()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[track_caller]
    pub fn wait_attempts(&self, n: usize) {
        let deadline = Instant::now() + ARRIVE_WAIT;
        while self.attempts() < n {
            assert!(Instant::now() < deadline, "fewer than {n} attempts");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Serves one keep-alive connection.
fn serve(conn: TcpStream, state: Arc<Mutex<SinkState>>) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        // The request line, then headers up to the empty line.
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let answer = {
            let mut s = state.lock().unwrap();
            s.attempts += 1;
            let answer = s.answer.clone().unwrap_or(Answer::Ok);
            if matches!(answer, Answer::Ok | Answer::Reject(_)) {
                s.accepted
                    .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            }
            answer
        };
        let (status, text) = match answer {
            Answer::Ok => ("200 OK", json!({"rejected": []}).to_string()),
            Answer::Reject(keys) => ("200 OK", json!({ "rejected": keys }).to_string()),
            Answer::Fail => ("500 Internal Server Error", "{}".to_string()),
            Answer::Refuse => ("400 Bad Request", "{}".to_string()),
            Answer::Close => return,
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            text.len()
        );
        // One write: a head and a body written apart wait for the client's delayed ACK
        // (Nagle), which holds every answer some 40 ms.
        if conn.write_all(format!("{head}{text}").as_bytes()).is_err() {
            return;
        }
    }
}

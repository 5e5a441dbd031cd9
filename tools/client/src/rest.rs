//! The REST calls of `API.md`: [`Client`] signs up and logs in (on an end-to-end
//! encryption device or not), [`Session`] makes every authenticated call with its token and
//! opens the event stream. The calls of `API.md` §14 are in `e2ee/net.rs`.
//!
//! Each call answers with the typed shape of `API.md`, or [`Error::Api`] with the status and
//! the server's error `code`. Calls are not retried: a 429 comes back with its
//! `retry_after`, and the caller decides. IDs and emoji go into paths as percent-encoded
//! path segments.

use crate::error::Error;
use crate::frames::Content;
use crate::types::{Channel, ChannelKind, Me, Member, Message, MessagePage, Posted, User};
use crate::types::{Version, Workspace};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// How long one REST call may take before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest page the server hands out; [`Session::all_messages`] reads pages of this size.
pub const PAGE_LIMIT_MAX: usize = 200;

/// A connection to a Chorus server (or to the nodes of a cluster, `API.md` §15), before
/// logging in. Cheap to clone; clones share which node they use.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    nodes: std::sync::Arc<Nodes>,
}

/// The servers a client may use (every node of a cluster serves the whole API), and the
/// one it uses now.
#[derive(Debug)]
struct Nodes {
    bases: Vec<Url>,
    current: std::sync::atomic::AtomicUsize,
}

/// A logged-in user: the token and the user it names, and every call that needs them.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Session {
    client: Client,
    /// The bearer token (a JWT issued by the server).
    pub token: String,
    /// The user the token names.
    pub user: User,
    /// The end-to-end encryption device the token is bound to (`API.md` §14), when it was
    /// signed in on one.
    pub device_id: Option<String>,
}

#[derive(Deserialize)]
struct AuthAnswer {
    user: User,
    token: String,
    #[serde(default)]
    device_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorFields,
}

#[derive(Deserialize)]
struct ErrorFields {
    code: String,
    #[serde(default)]
    message: String,
}

impl Client {
    /// A client for the server at `base_url`, such as `http://127.0.0.1:8080`. Only plain
    /// `http://` is supported; the event stream uses `ws://` on the same host and port.
    pub fn new(base_url: &str) -> Result<Client, Error> {
        Client::cluster(&[base_url])
    }

    /// A client for the nodes of a cluster at `base_urls` (at least one), each like
    /// [`Client::new`]'s. It uses the first; an event stream whose connection is lost, or
    /// cannot be made, moves to the next ([`Client::next_node`]), and the REST calls of
    /// every clone follow.
    pub fn cluster(base_urls: &[&str]) -> Result<Client, Error> {
        let bases = (base_urls.iter())
            .map(|base_url| {
                let base =
                    Url::parse(base_url).map_err(|e| Error::Url(format!("{base_url}: {e}")))?;
                if base.scheme() != "http" || base.host_str().is_none() {
                    return Err(Error::Url(format!(
                        "{base_url}: an http:// URL with a host"
                    )));
                }
                Ok(base)
            })
            .collect::<Result<Vec<Url>, Error>>()?;
        if bases.is_empty() {
            return Err(Error::Url("no server URL".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(Error::Http)?;
        let nodes = Nodes {
            bases,
            current: std::sync::atomic::AtomicUsize::new(0),
        };
        Ok(Client {
            http,
            nodes: std::sync::Arc::new(nodes),
        })
    }

    /// The base URL of the server this client uses now.
    pub fn base_url(&self) -> Url {
        let n = &self.nodes;
        n.bases[n.current.load(std::sync::atomic::Ordering::Relaxed) % n.bases.len()].clone()
    }

    /// Moves this client and its clones to the next of its servers (nothing with one).
    pub fn next_node(&self) {
        self.nodes
            .current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many servers this client knows.
    pub fn nodes(&self) -> usize {
        self.nodes.bases.len()
    }

    /// The URL of the WebSocket endpoint on the same host and port.
    pub(crate) fn ws_url(&self) -> Url {
        let mut url = self.url(&["ws", "v1", "connect"]);
        url.set_scheme("ws").expect("http and ws URLs are alike");
        url
    }

    /// `base/api/v1/<segments>`, each segment percent-encoded.
    pub(crate) fn api(&self, segments: &[&str]) -> Url {
        let mut all = vec!["api", "v1"];
        all.extend_from_slice(segments);
        self.url(&all)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base_url();
        url.path_segments_mut()
            .expect("checked in new: an http URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// `POST /api/v1/auth/signup`: creates an account and logs it in.
    pub async fn signup(&self, email: &str, password: &str, name: &str) -> Result<Session, Error> {
        let body = json!({"email": email, "password": password, "name": name});
        self.auth("signup", body).await
    }

    /// `POST /api/v1/auth/signup` with a `device_id`: creates an account and logs it in on
    /// that end-to-end encryption device (registered, and bound to the token).
    pub async fn signup_on_device(
        &self,
        email: &str,
        password: &str,
        name: &str,
        device_id: &str,
    ) -> Result<Session, Error> {
        let body =
            json!({"email": email, "password": password, "name": name, "device_id": device_id});
        self.auth("signup", body).await
    }

    /// `POST /api/v1/auth/login`.
    pub async fn login(&self, email: &str, password: &str) -> Result<Session, Error> {
        let body = json!({"email": email, "password": password});
        self.auth("login", body).await
    }

    /// `POST /api/v1/auth/login` with a `device_id`: logs in on that end-to-end encryption
    /// device, registering it if it is new. A removed device's ID is refused (409).
    pub async fn login_on_device(
        &self,
        email: &str,
        password: &str,
        device_id: &str,
    ) -> Result<Session, Error> {
        let body = json!({"email": email, "password": password, "device_id": device_id});
        self.auth("login", body).await
    }

    async fn auth(&self, which: &str, body: Value) -> Result<Session, Error> {
        let request = self.http.post(self.api(&["auth", which])).json(&body);
        let (_, a): (_, AuthAnswer) = call(request).await?;
        // The device is the one the server says it bound the token to, not the one asked
        // for: a server that ignored the ID bound the token to none.
        Ok(Session {
            device_id: a.device_id,
            ..self.session(a.token, a.user)
        })
    }

    /// A session from a token kept from an earlier login without a device.
    pub fn session(&self, token: String, user: User) -> Session {
        Session {
            client: self.clone(),
            token,
            user,
            device_id: None,
        }
    }

    /// A session from a token kept from an earlier login on `device_id`.
    pub fn device_session(&self, token: String, user: User, device_id: &str) -> Session {
        Session {
            device_id: Some(device_id.to_owned()),
            ..self.session(token, user)
        }
    }

    /// `GET /healthz`: whether the server accepts requests.
    pub async fn healthy(&self) -> bool {
        let request = self.http.get(self.url(&["healthz"]));
        matches!(request.send().await, Ok(r) if r.status().is_success())
    }
}

/// Sends a request; returns the status and the JSON answer, or the server's error.
pub(crate) async fn call<T: DeserializeOwned>(
    request: RequestBuilder,
) -> Result<(StatusCode, T), Error> {
    let (status, bytes) = exchange(request).await?;
    let undecodable = |e: &dyn std::fmt::Display| {
        Error::Decode(format!("{e} in {}", String::from_utf8_lossy(&bytes)))
    };
    // The body checked as UTF-8 once, whole, and then parsed as text: parsing the bytes
    // checks every string on its own, which took a fifth of a 50-message page's parse
    // (56 against 45 us).
    let text = std::str::from_utf8(&bytes).map_err(|e| undecodable(&e))?;
    let value = serde_json::from_str(text).map_err(|e| undecodable(&e))?;
    Ok((status, value))
}

/// Sends a request whose answer has no body worth reading.
pub(crate) async fn call_empty(request: RequestBuilder) -> Result<(), Error> {
    exchange(request).await.map(|_| ())
}

async fn exchange(request: RequestBuilder) -> Result<(StatusCode, bytes::Bytes), Error> {
    let response = request.send().await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = response.bytes().await?;
    if status.is_success() {
        return Ok((status, bytes));
    }
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (
            "unknown".to_owned(),
            String::from_utf8_lossy(&bytes).into_owned(),
        ),
    };
    Err(Error::Api {
        status: status.as_u16(),
        code,
        message,
        retry_after,
    })
}

/// Takes `{key: T}` out of an answer.
pub(crate) fn field<T: DeserializeOwned>(mut value: Value, key: &str) -> Result<T, Error> {
    let inner = value
        .get_mut(key)
        .map(Value::take)
        .ok_or_else(|| Error::Decode(format!("no {key:?} in {value}")))?;
    serde_json::from_value(inner).map_err(|e| Error::Decode(format!("{key}: {e}")))
}

impl Session {
    /// The client this session came from.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.client
            .http
            .request(method, self.client.api(segments))
            .bearer_auth(&self.token)
    }

    pub(crate) fn request_url(&self, method: Method, url: Url) -> RequestBuilder {
        self.client
            .http
            .request(method, url)
            .bearer_auth(&self.token)
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str], key: &str) -> Result<T, Error> {
        let (_, v) = call(self.request(Method::GET, segments)).await?;
        field(v, key)
    }

    async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: Value,
        key: &str,
    ) -> Result<T, Error> {
        let (_, v) = call(self.request(Method::POST, segments).json(&body)).await?;
        field(v, key)
    }

    /// `GET /api/v1/me`: the caller and their workspaces.
    pub async fn me(&self) -> Result<Me, Error> {
        let (_, me) = call(self.request(Method::GET, &["me"])).await?;
        Ok(me)
    }

    /// `POST /api/v1/workspaces`: a new workspace owned by the caller.
    pub async fn create_workspace(&self, name: &str) -> Result<Workspace, Error> {
        self.post(&["workspaces"], json!({"name": name}), "workspace")
            .await
    }

    /// `POST /api/v1/workspaces/{wid}/members`: adds a user by email (owner or admin only).
    pub async fn add_workspace_member(
        &self,
        workspace_id: &str,
        email: &str,
    ) -> Result<Member, Error> {
        let path = ["workspaces", workspace_id, "members"];
        self.post(&path, json!({"email": email}), "member").await
    }

    /// `GET /api/v1/workspaces/{wid}/members`.
    pub async fn workspace_members(&self, workspace_id: &str) -> Result<Vec<Member>, Error> {
        self.get(&["workspaces", workspace_id, "members"], "members")
            .await
    }

    /// `GET /api/v1/workspaces/{wid}/channels`: the channels the caller can see (its own,
    /// and the workspace's public ones).
    pub async fn channels(&self, workspace_id: &str) -> Result<Vec<Channel>, Error> {
        self.get(&["workspaces", workspace_id, "channels"], "channels")
            .await
    }

    /// `POST /api/v1/workspaces/{wid}/channels`: a public or private channel.
    pub async fn create_channel(
        &self,
        workspace_id: &str,
        name: &str,
        kind: ChannelKind,
    ) -> Result<Channel, Error> {
        let body = json!({"name": name, "kind": kind});
        self.post(&["workspaces", workspace_id, "channels"], body, "channel")
            .await
    }

    /// `POST /api/v1/workspaces/{wid}/dms`: the DM or group DM of exactly the caller and
    /// these users, created if it did not exist.
    pub async fn open_dm(&self, workspace_id: &str, user_ids: &[&str]) -> Result<Channel, Error> {
        self.dm(workspace_id, user_ids, false).await
    }

    /// `POST /api/v1/workspaces/{wid}/dms` with `"encrypted": true` (`API.md` §14): the
    /// end-to-end encrypted DM or group DM of exactly the caller and these users, a
    /// different channel from the plain one of the same set, created if it did not exist.
    /// Its messages go through [`Session::send_encrypted`].
    pub async fn open_encrypted_dm(
        &self,
        workspace_id: &str,
        user_ids: &[&str],
    ) -> Result<Channel, Error> {
        self.dm(workspace_id, user_ids, true).await
    }

    async fn dm(
        &self,
        workspace_id: &str,
        user_ids: &[&str],
        encrypted: bool,
    ) -> Result<Channel, Error> {
        let mut body = json!({"user_ids": user_ids});
        if encrypted {
            body["encrypted"] = json!(true);
        }
        self.post(&["workspaces", workspace_id, "dms"], body, "channel")
            .await
    }

    /// `GET /api/v1/channels/{cid}`: a channel with its `last_seq`.
    pub async fn channel(&self, channel_id: &str) -> Result<Channel, Error> {
        self.get(&["channels", channel_id], "channel").await
    }

    /// `POST /api/v1/channels/{cid}/join`: joins a public channel.
    pub async fn join_channel(&self, channel_id: &str) -> Result<(), Error> {
        call_empty(self.request(Method::POST, &["channels", channel_id, "join"])).await
    }

    /// `POST /api/v1/channels/{cid}/members`: adds a workspace member to the channel.
    pub async fn add_channel_member(&self, channel_id: &str, user_id: &str) -> Result<(), Error> {
        let request = self
            .request(Method::POST, &["channels", channel_id, "members"])
            .json(&json!({"user_id": user_id}));
        call_empty(request).await
    }

    /// `DELETE /api/v1/channels/{cid}/members/{uid}`: leaves (the caller's own ID) or
    /// removes a member.
    pub async fn remove_channel_member(
        &self,
        channel_id: &str,
        user_id: &str,
    ) -> Result<(), Error> {
        let path = ["channels", channel_id, "members", user_id];
        call_empty(self.request(Method::DELETE, &path)).await
    }

    /// `POST /api/v1/channels/{cid}/messages`: posts a message, or a thread reply when
    /// `thread_id` names the root. A `client_msg_id` used before by this user answers with
    /// the first message and stores nothing ([`Posted::created`] is then `false`).
    pub async fn post_message(
        &self,
        channel_id: &str,
        text: &str,
        client_msg_id: Option<&str>,
        thread_id: Option<&str>,
    ) -> Result<Posted, Error> {
        let content = Content::Text(text.to_owned());
        self.post_content(channel_id, &content, client_msg_id, thread_id)
            .await
    }

    /// `POST /api/v1/channels/{cid}/messages` in an encrypted channel (`API.md` §14): posts
    /// a `ciphertext` made for the device list up to `devices_seq`, idempotent on
    /// `client_msg_id` as [`Session::post_message`] is. A device list that is behind is
    /// refused with 409 `stale_devices`; [`Session::send_encrypted`] does the whole
    /// exchange, keys included.
    pub async fn post_ciphertext(
        &self,
        channel_id: &str,
        ciphertext: &str,
        devices_seq: u64,
        client_msg_id: Option<&str>,
        thread_id: Option<&str>,
    ) -> Result<Posted, Error> {
        let content = Content::encrypted(ciphertext, devices_seq);
        self.post_content(channel_id, &content, client_msg_id, thread_id)
            .await
    }

    async fn post_content(
        &self,
        channel_id: &str,
        content: &Content,
        client_msg_id: Option<&str>,
        thread_id: Option<&str>,
    ) -> Result<Posted, Error> {
        let mut body = json!({});
        content.write_into(&mut body);
        if let Some(k) = client_msg_id {
            body["client_msg_id"] = json!(k);
        }
        if let Some(t) = thread_id {
            body["thread_id"] = json!(t);
        }
        let request = self
            .request(Method::POST, &["channels", channel_id, "messages"])
            .json(&body);
        let (status, v) = call(request).await?;
        Ok(Posted {
            message: field(v, "message")?,
            created: status == StatusCode::CREATED,
        })
    }

    /// `GET /api/v1/channels/{cid}/messages`: one page of top-level messages, newest first,
    /// before the `before` cursor; `limit` is 1 to 200.
    pub async fn messages(
        &self,
        channel_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<MessagePage, Error> {
        let mut url = self.client.api(&["channels", channel_id, "messages"]);
        paging(&mut url, "before", before, limit);
        let (_, page) = call(self.request_url(Method::GET, url)).await?;
        Ok(page)
    }

    /// Every top-level message of a channel, oldest first, read page by page.
    pub async fn all_messages(&self, channel_id: &str) -> Result<Vec<Message>, Error> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .messages(channel_id, cursor.as_deref(), PAGE_LIMIT_MAX)
                .await?;
            all.extend(page.messages);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        all.reverse();
        Ok(all)
    }

    /// `GET /api/v1/channels/{cid}/messages/{mid}/replies`: one page of a thread's
    /// replies, oldest first, after the `after` cursor.
    pub async fn replies(
        &self,
        channel_id: &str,
        message_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<MessagePage, Error> {
        let mut url = self
            .client
            .api(&["channels", channel_id, "messages", message_id, "replies"]);
        paging(&mut url, "after", after, limit);
        let (_, page) = call(self.request_url(Method::GET, url)).await?;
        Ok(page)
    }

    /// `GET /api/v1/channels/{cid}/messages/{mid}`: one message as it stands.
    pub async fn message(&self, channel_id: &str, message_id: &str) -> Result<Message, Error> {
        let path = ["channels", channel_id, "messages", message_id];
        self.get(&path, "message").await
    }

    /// `PATCH /api/v1/channels/{cid}/messages/{mid}`: edits a message (author only).
    pub async fn edit_message(
        &self,
        channel_id: &str,
        message_id: &str,
        text: &str,
    ) -> Result<Message, Error> {
        let content = Content::Text(text.to_owned());
        self.edit_content(channel_id, message_id, &content).await
    }

    /// `PATCH /api/v1/channels/{cid}/messages/{mid}` in an encrypted channel: a new
    /// `ciphertext` for the device list up to `devices_seq`, checked like a post's
    /// (409 `stale_devices`). [`Session::edit_encrypted`] does the whole exchange.
    pub async fn edit_ciphertext(
        &self,
        channel_id: &str,
        message_id: &str,
        ciphertext: &str,
        devices_seq: u64,
    ) -> Result<Message, Error> {
        let content = Content::encrypted(ciphertext, devices_seq);
        self.edit_content(channel_id, message_id, &content).await
    }

    async fn edit_content(
        &self,
        channel_id: &str,
        message_id: &str,
        content: &Content,
    ) -> Result<Message, Error> {
        let path = ["channels", channel_id, "messages", message_id];
        let mut body = json!({});
        content.write_into(&mut body);
        let (_, v) = call(self.request(Method::PATCH, &path).json(&body)).await?;
        field(v, "message")
    }

    /// `DELETE /api/v1/channels/{cid}/messages/{mid}`: deletes a message (author, or a
    /// channel or workspace admin).
    pub async fn delete_message(&self, channel_id: &str, message_id: &str) -> Result<(), Error> {
        let path = ["channels", channel_id, "messages", message_id];
        call_empty(self.request(Method::DELETE, &path)).await
    }

    /// `GET /api/v1/channels/{cid}/messages/{mid}/history`: every text the message had,
    /// oldest first.
    pub async fn message_history(
        &self,
        channel_id: &str,
        message_id: &str,
    ) -> Result<Vec<Version>, Error> {
        let path = ["channels", channel_id, "messages", message_id, "history"];
        self.get(&path, "versions").await
    }

    /// `PUT /api/v1/channels/{cid}/messages/{mid}/reactions/{emoji}`.
    pub async fn add_reaction(
        &self,
        channel_id: &str,
        message_id: &str,
        emoji: &str,
    ) -> Result<(), Error> {
        let path = [
            "channels",
            channel_id,
            "messages",
            message_id,
            "reactions",
            emoji,
        ];
        call_empty(self.request(Method::PUT, &path)).await
    }

    /// `DELETE /api/v1/channels/{cid}/messages/{mid}/reactions/{emoji}`.
    pub async fn remove_reaction(
        &self,
        channel_id: &str,
        message_id: &str,
        emoji: &str,
    ) -> Result<(), Error> {
        let path = [
            "channels",
            channel_id,
            "messages",
            message_id,
            "reactions",
            emoji,
        ];
        call_empty(self.request(Method::DELETE, &path)).await
    }

    /// The `last_seq` of every channel the caller can see, in every workspace: where an
    /// event stream that should miss nothing from now on starts.
    pub async fn channel_seqs(&self) -> Result<HashMap<String, u64>, Error> {
        let mut seqs = HashMap::new();
        for w in self.me().await?.workspaces {
            for c in self.channels(&w.id).await? {
                seqs.insert(c.id, c.last_seq);
            }
        }
        Ok(seqs)
    }
}

pub(crate) fn paging(url: &mut Url, key: &str, cursor: Option<&str>, limit: usize) {
    let mut q = url.query_pairs_mut();
    if let Some(c) = cursor {
        q.append_pair(key, c);
    }
    q.append_pair("limit", &limit.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    // A client of a cluster moves to the next node and back around; its clones move with
    // it; an empty list or a URL that is not http:// is refused.
    #[test]
    fn a_cluster_client_moves_from_node_to_node() {
        let c = Client::cluster(&["http://127.0.0.1:1", "http://127.0.0.1:2"]).unwrap();
        let clone = c.clone();
        assert_eq!(c.nodes(), 2);
        assert_eq!(c.base_url().port(), Some(1));
        c.next_node();
        assert_eq!(clone.base_url().port(), Some(2));
        assert_eq!(clone.ws_url().as_str(), "ws://127.0.0.1:2/ws/v1/connect");
        clone.next_node();
        assert_eq!(c.base_url().port(), Some(1));
        assert!(Client::cluster(&[]).is_err());
        assert!(Client::cluster(&["http://127.0.0.1:1", "ftp://x"]).is_err());
    }

    // Paths are built from percent-encoded segments under the base, and the stream's URL
    // is the same host with ws://.
    #[test]
    fn urls() {
        let c = Client::new("http://127.0.0.1:9/").unwrap();
        assert_eq!(
            c.api(&["channels", "C1", "messages", "M1-1", "reactions", "+1 ok/x"])
                .as_str(),
            "http://127.0.0.1:9/api/v1/channels/C1/messages/M1-1/reactions/+1%20ok%2Fx"
        );
        assert_eq!(c.ws_url().as_str(), "ws://127.0.0.1:9/ws/v1/connect");
        let mut u = c.api(&["channels", "C1", "messages"]);
        paging(&mut u, "before", Some("s1f"), 50);
        assert_eq!(u.query(), Some("before=s1f&limit=50"));
        assert!(Client::new("https://example.com").is_err());
        assert!(Client::new("not a url").is_err());
    }
}

//! The REST API of `API.md`: one route table, the router that matches requests against it,
//! the handlers that turn each call into engine calls, and the OpenAPI 3 document, which is
//! generated from the same table so that it cannot drift from what is served.
//!
//! A request goes through the same steps in the same order: match the route (404 for an
//! unknown path, 405 for a known path with another method), check the token (401), take one
//! unit of the user's rate budget (429), read the body within its limit (413) and parse it
//! into the call's typed request (400), then ask the engine. The engine decides membership
//! and permissions; this module only translates.
//!
//! API boundary: an ID that does not parse is answered like an ID that does not exist (404),
//! and both are answered like an ID of a workspace the caller is not in, so a caller learns
//! nothing about other workspaces. Unknown fields in a body are ignored, so that newer
//! clients can talk to older servers; a field of the wrong type is refused with serde's
//! message.

mod e2ee;
mod forward;
pub mod members;
mod notify;
pub mod notify_peers;
mod presence_peers;
mod search;

pub use forward::{serve_calls, serve_notices, AsRest, Relay};

use crate::body::ReqBody;
use crate::ctx::{authenticate, off_shard, token_now, Caller, ShardCtx};
use crate::error::ApiError;
use crate::protocol::{message_in, parse_id};
use bytes::Bytes;
use chorus_engine::domain::{ChannelKind, PAGE_LIMIT_MAX};
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use chorus_engine::presence::{Mode, PRESENCE_QUERY_MAX};
use chorus_engine::view::UserView;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::OnceLock;

/// Items in a page when the request names no `limit`.
pub const PAGE_LIMIT_DEFAULT: usize = 50;
/// Most channels in one page of `GET /workspaces/{wid}/unreads`, and its default: a
/// user's whole sidebar in one answer (counting costs binary searches, not walks).
pub const UNREADS_PAGE_MAX: usize = 1000;

/// Bytes of an oversized body read and thrown away before answering 413. Reading a little
/// past the limit lets a client that sent a slightly large body finish sending and read the
/// answer; closing with unread bytes would reset the connection under it. Larger bodies
/// are cut off.
pub const OVERSIZED_DRAIN_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The longest path the router looks at, in segments; longer paths are unknown.
const PATH_SEGMENTS_MAX: usize = 16;

// ---------------------------------------------------------------------------------------
// The route table
// ---------------------------------------------------------------------------------------

/// An HTTP method the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// `DELETE`.
    Delete,
}

impl Verb {
    /// The method's name, as HTTP spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Patch => "PATCH",
            Verb::Delete => "DELETE",
        }
    }

    pub(crate) fn of(method: &Method) -> Option<Verb> {
        Some(match *method {
            Method::GET => Verb::Get,
            Method::POST => Verb::Post,
            Method::PUT => Verb::Put,
            Method::PATCH => Verb::Patch,
            Method::DELETE => Verb::Delete,
            _ => return None,
        })
    }
}

/// What a route does: one handler each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `POST /auth/signup`.
    Signup,
    /// `POST /auth/login`.
    Login,
    /// `GET /me`.
    Me,
    /// `GET /cluster`.
    Cluster,
    /// `PUT /cluster/members`.
    ClusterMembers,
    /// `GET /workspaces`.
    ListWorkspaces,
    /// `POST /workspaces`.
    CreateWorkspace,
    /// `POST /workspaces/{wid}/members`.
    AddMember,
    /// `GET /workspaces/{wid}/members`.
    ListMembers,
    /// `GET /workspaces/{wid}/channels`.
    ListChannels,
    /// `POST /workspaces/{wid}/channels`.
    CreateChannel,
    /// `POST /workspaces/{wid}/dms`.
    OpenDm,
    /// `GET /channels/{cid}`.
    GetChannel,
    /// `POST /channels/{cid}/join`.
    Join,
    /// `POST /channels/{cid}/members`.
    AddChannelMember,
    /// `DELETE /channels/{cid}/members/{uid}`.
    RemoveChannelMember,
    /// `POST /channels/{cid}/messages`.
    PostMessage,
    /// `GET /channels/{cid}/messages`.
    ListMessages,
    /// `GET /channels/{cid}/messages/{mid}`.
    GetMessage,
    /// `PATCH /channels/{cid}/messages/{mid}`.
    EditMessage,
    /// `DELETE /channels/{cid}/messages/{mid}`.
    DeleteMessage,
    /// `GET /channels/{cid}/messages/{mid}/replies`.
    ListReplies,
    /// `GET /channels/{cid}/messages/{mid}/history`.
    History,
    /// `PUT /channels/{cid}/messages/{mid}/reactions/{emoji}`.
    AddReaction,
    /// `DELETE /channels/{cid}/messages/{mid}/reactions/{emoji}`.
    RemoveReaction,
    /// `PUT /me/presence`.
    SetPresence,
    /// `GET /workspaces/{wid}/presence`.
    GetPresence,
    /// `POST /channels/{cid}/read`.
    MarkRead,
    /// `GET /workspaces/{wid}/unreads`.
    Unreads,
    /// `GET /openapi.json`.
    OpenApi,
    /// A files route, served by [`crate::files`].
    File(crate::files::FileOp),
    /// `GET /workspaces/{wid}/search/messages`.
    SearchMessages,
    /// `GET /workspaces/{wid}/search/users`.
    SearchUsers,
    /// `GET /workspaces/{wid}/search/files`.
    SearchFiles,
    /// `GET /me/notification-prefs`.
    GetNotifyPrefs,
    /// `PATCH /me/notification-prefs`.
    PatchNotifyPrefs,
    /// `GET /channels/{cid}/notification-prefs`.
    GetChannelNotifyPrefs,
    /// `PUT /channels/{cid}/notification-prefs`.
    PutChannelNotifyPrefs,
    /// `GET /me/push-devices`.
    ListPushDevices,
    /// `POST /me/push-devices`.
    AddPushDevice,
    /// `DELETE /me/push-devices/{did}`.
    RemovePushDevice,
    /// `POST /e2ee/keys/upload`.
    UploadKeys,
    /// `POST /e2ee/keys/query`.
    QueryKeys,
    /// `POST /e2ee/keys/claim`.
    ClaimKeys,
    /// `DELETE /e2ee/devices/{device_id}`.
    RemoveDevice,
    /// `PUT /e2ee/to-device/{txn_id}`.
    SendToDevice,
    /// `GET /e2ee/to-device`.
    ListToDevice,
}

impl Op {
    /// Whether the route reads the directory (users, workspaces, channels, preferences,
    /// devices, to-device queues). On a cluster node such a read first passes the
    /// directory barrier, so that it sees every write acknowledged before it, whichever
    /// node took the write (`API.md` §15); reads of a channel's partition pass its own.
    fn reads_directory(self) -> bool {
        matches!(
            self,
            Op::Me
                | Op::ListWorkspaces
                | Op::ListMembers
                | Op::ListChannels
                | Op::GetChannel
                | Op::GetPresence
                | Op::Unreads
                | Op::GetNotifyPrefs
                | Op::GetChannelNotifyPrefs
                | Op::ListPushDevices
                | Op::QueryKeys
                | Op::ListToDevice
        )
    }
}

/// The JSON type of a body field or query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    /// A string.
    String,
    /// An integer.
    Integer,
    /// An array of strings.
    Strings,
    /// A file's bytes (a multipart form's file field).
    Binary,
    /// `true` or `false`.
    Boolean,
    /// A JSON object (described in the field's text), or `null` where the text says so.
    Object,
}

/// A body field or query parameter, for the OpenAPI document.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: Ty,
    /// Whether a request must carry it.
    pub required: bool,
    /// What it means.
    pub about: &'static str,
}

pub(crate) const fn req(name: &'static str, ty: Ty, about: &'static str) -> Field {
    Field {
        name,
        ty,
        required: true,
        about,
    }
}

pub(crate) const fn opt(name: &'static str, ty: Ty, about: &'static str) -> Field {
    Field {
        name,
        ty,
        required: false,
        about,
    }
}

/// One call of the API: the router matches against these, and the OpenAPI document lists
/// them.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// The method.
    pub verb: Verb,
    /// The path, with `{name}` for each path parameter.
    pub path: &'static str,
    /// The handler.
    pub op: Op,
    /// One line on what it does.
    pub summary: &'static str,
    /// Whether it needs a bearer token (and is rate limited).
    pub auth: bool,
    /// The success statuses, the usual one first.
    pub statuses: &'static [u16],
    /// The fields of its JSON body; empty for calls without a body.
    pub body: &'static [Field],
    /// Its query parameters.
    pub query: &'static [Field],
    /// Whether the body is `multipart/form-data` (with `body` as its fields) rather than
    /// JSON.
    pub form: bool,
}

pub(crate) const fn route(
    verb: Verb,
    path: &'static str,
    op: Op,
    status: u16,
    summary: &'static str,
) -> Route {
    Route {
        verb,
        path,
        op,
        summary,
        auth: true,
        statuses: match status {
            200 => &[200],
            201 => &[201],
            204 => &[204],
            _ => panic!("a route succeeds with 200, 201 or 204"),
        },
        body: &[],
        query: &[],
        form: false,
    }
}

impl Route {
    pub(crate) const fn public(mut self) -> Route {
        self.auth = false;
        self
    }

    pub(crate) const fn body(mut self, fields: &'static [Field]) -> Route {
        self.body = fields;
        self
    }

    pub(crate) const fn query(mut self, fields: &'static [Field]) -> Route {
        self.query = fields;
        self
    }

    /// A `multipart/form-data` body with these fields.
    pub(crate) const fn form(mut self, fields: &'static [Field]) -> Route {
        self.body = fields;
        self.form = true;
        self
    }

    /// For calls that answer 202 while their answer is being made.
    pub(crate) const fn or_pending(mut self) -> Route {
        self.statuses = &[200, 202];
        self
    }

    /// For calls that answer 201 when they create and 200 when the thing existed.
    const fn or_existing(mut self) -> Route {
        self.statuses = &[201, 200];
        self
    }
}

const LIMIT: Field = opt("limit", Ty::Integer, "page size, 1 to 200, default 50");
const TEXT: Field = opt(
    "text",
    Ty::String,
    "the message text, up to 1 MiB; required but in an encrypted channel, which takes none",
);
const CIPHERTEXT: Field = opt(
    "ciphertext",
    Ty::String,
    "an encrypted channel's message instead of text, opaque, up to 64 KiB (API.md §14)",
);
const DEVICES_SEQ: Field = opt("devices_seq", Ty::Integer, "with ciphertext: the seq of the newest device event the sender has seen; an older one is 409 stale_devices");

/// Every REST call. `/healthz`, `/metrics` and the WebSocket endpoint are served by
/// [`crate::server`] and are not part of this table.
#[rustfmt::skip] // One route per line reads as the table it is.
pub static ROUTES: &[Route] = &[
    route(Verb::Post, "/api/v1/auth/signup", Op::Signup, 201, "Create an account and get a token")
        .public()
        .body(&[
            req("email", Ty::String, "login email"),
            req("password", Ty::String, "the password"),
            req("name", Ty::String, "display name"),
            opt("device_id", Ty::String, "1 to 64 of A-Z a-z 0-9 - _ .: registers the device and binds the token to it (end-to-end encryption)"),
        ]),
    route(Verb::Post, "/api/v1/auth/login", Op::Login, 200, "Log in and get a token")
        .public()
        .body(&[
            req("email", Ty::String, "login email"),
            req("password", Ty::String, "the password"),
            opt("device_id", Ty::String, "registers the device if new and binds the token to it; a removed device's ID is 409"),
        ]),
    route(Verb::Get, "/api/v1/openapi.json", Op::OpenApi, 200, "This document").public(),
    route(Verb::Get, "/api/v1/me", Op::Me, 200, "The caller and their workspaces"),
    route(
        Verb::Get,
        "/api/v1/cluster",
        Op::Cluster,
        200,
        "This node, the cluster's nodes, and each partition's leader and replicas",
    ),
    route(Verb::Put, "/api/v1/cluster/members", Op::ClusterMembers, 200, "Place the cluster on these nodes: add a node started with --join, or remove one (an operator's call)")
        .public()
        .body(&[
            req("key", Ty::String, "the contents of cluster_admin_key_file"),
            req("nodes", Ty::Object, "every node of the cluster to be, {\"ID\": \"IP:PORT\"} (the address between nodes)"),
            opt("local", Ty::Boolean, "apply on this node only (what the node that takes the call sends the others)"),
        ]),
    route(Verb::Put, "/api/v1/me/presence", Op::SetPresence, 200, "Set the caller's presence mode")
        .body(&[
            req("mode", Ty::String, "auto, away, dnd or invisible"),
            opt("dnd_until", Ty::String, "RFC 3339 UTC time when dnd ends (mode dnd); null: until changed"),
        ]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/presence", Op::GetPresence, 200, "The presence of members of a workspace")
        .query(&[opt("user_ids", Ty::String, "comma-separated user IDs, at most 500; non-members are left out")]),
    route(Verb::Get, "/api/v1/workspaces", Op::ListWorkspaces, 200, "The caller's workspaces"),
    route(Verb::Post, "/api/v1/workspaces", Op::CreateWorkspace, 201, "Create a workspace owned by the caller")
        .body(&[req("name", Ty::String, "workspace name")]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/members", Op::ListMembers, 200, "The members of a workspace"),
    route(Verb::Post, "/api/v1/workspaces/{wid}/members", Op::AddMember, 201, "Add a user by email (owner or admin only)")
        .body(&[req("email", Ty::String, "the user's login email")]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/channels", Op::ListChannels, 200, "The channels the caller can see"),
    route(Verb::Post, "/api/v1/workspaces/{wid}/channels", Op::CreateChannel, 201, "Create a public or private channel")
        .body(&[
            req("name", Ty::String, "channel name, no spaces"),
            opt("kind", Ty::String, "\"public\" (default) or \"private\""),
        ]),
    route(Verb::Post, "/api/v1/workspaces/{wid}/dms", Op::OpenDm, 201, "The DM or group DM of exactly the caller and these users")
        .or_existing()
        .body(&[
            req("user_ids", Ty::Strings, "the other users"),
            opt("encrypted", Ty::Boolean, "an end-to-end encrypted DM (API.md §14): a different channel from the plain one of the same set"),
        ]),
    route(Verb::Get, "/api/v1/channels/{cid}", Op::GetChannel, 200, "A channel with its last seq"),
    route(Verb::Post, "/api/v1/channels/{cid}/join", Op::Join, 200, "Join a public channel"),
    route(Verb::Post, "/api/v1/channels/{cid}/members", Op::AddChannelMember, 201, "Add a workspace member to the channel")
        .body(&[req("user_id", Ty::String, "the user to add")]),
    route(Verb::Delete, "/api/v1/channels/{cid}/members/{uid}", Op::RemoveChannelMember, 204, "Leave (self) or remove a member"),
    route(Verb::Post, "/api/v1/channels/{cid}/messages", Op::PostMessage, 201, "Post a message or a thread reply")
        .or_existing()
        .body(&[
            TEXT,
            CIPHERTEXT,
            DEVICES_SEQ,
            opt("client_msg_id", Ty::String, "idempotency key: a repeat answers 200 with the first message"),
            opt("thread_id", Ty::String, "the thread root, for a reply"),
            opt("file_ids", Ty::Strings, "files the caller uploaded to this workspace, at most 10; text may then be empty"),
        ]),
    route(Verb::Get, "/api/v1/channels/{cid}/messages", Op::ListMessages, 200, "Top-level messages, newest first")
        .query(&[opt("before", Ty::String, "the next_cursor of the previous page"), LIMIT]),
    route(Verb::Get, "/api/v1/channels/{cid}/messages/{mid}", Op::GetMessage, 200, "One message as it stands"),
    route(Verb::Patch, "/api/v1/channels/{cid}/messages/{mid}", Op::EditMessage, 200, "Edit a message (author only)")
        .body(&[TEXT, CIPHERTEXT, DEVICES_SEQ]),
    route(Verb::Delete, "/api/v1/channels/{cid}/messages/{mid}", Op::DeleteMessage, 204, "Delete a message (author, or channel or workspace admin)"),
    route(Verb::Get, "/api/v1/channels/{cid}/messages/{mid}/replies", Op::ListReplies, 200, "A thread's replies, oldest first")
        .query(&[opt("after", Ty::String, "the next_cursor of the previous page"), LIMIT]),
    route(Verb::Get, "/api/v1/channels/{cid}/messages/{mid}/history", Op::History, 200, "Every text a message had, oldest first"),
    route(Verb::Put, "/api/v1/channels/{cid}/messages/{mid}/reactions/{emoji}", Op::AddReaction, 204, "Add the caller's reaction"),
    route(Verb::Delete, "/api/v1/channels/{cid}/messages/{mid}/reactions/{emoji}", Op::RemoveReaction, 204, "Remove the caller's reaction"),
    route(Verb::Post, "/api/v1/channels/{cid}/read", Op::MarkRead, 200, "Move the caller's read marker forward (a lower seq answers the marker as it is)")
        .body(&[req("seq", Ty::Integer, "the highest seq read, at most the channel's last_seq")]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/unreads", Op::Unreads, 200, "The caller's read state in each of their channels")
        .query(&[
            opt("cursor", Ty::String, "the next_cursor of the previous page"),
            opt("limit", Ty::Integer, "page size, 1 to 1000, default 1000"),
        ]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/search/messages", Op::SearchMessages, 200, "Messages the caller can read that match a query (README: search query grammar)")
        .query(&[
            opt("q", Ty::String, "the query, up to 1000 characters"),
            opt("sort", Ty::String, "relevance (default) or newest"),
            SEARCH_CURSOR, SEARCH_LIMIT,
        ]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/search/files", Op::SearchFiles, 200, "Files the caller can read whose name or text (text, code and PDF files) matches a query (README: search query grammar)")
        .query(&[opt("q", Ty::String, "the query, up to 1000 characters"), SEARCH_CURSOR, SEARCH_LIMIT]),
    route(Verb::Get, "/api/v1/workspaces/{wid}/search/users", Op::SearchUsers, 200, "Members with a name word or email starting with each word of q")
        .query(&[opt("q", Ty::String, "words, up to 1000 characters"), SEARCH_CURSOR, SEARCH_LIMIT]),
    route(Verb::Get, "/api/v1/me/notification-prefs", Op::GetNotifyPrefs, 200, "The caller's notification preferences"),
    route(Verb::Patch, "/api/v1/me/notification-prefs", Op::PatchNotifyPrefs, 200, "Change some of the caller's notification preferences")
        .body(&[
            opt("push", Ty::String, "all, mentions (default) or none"),
            opt("email", Ty::String, "all, mentions (default) or none"),
            opt("email_digest_s", Ty::Integer, "seconds between email digests, 0 (never) to 604800, default 900"),
            opt("keywords", Ty::Strings, "at most 50, each 1 to 64 characters; each counts as a mention as a whole word, in any case"),
            opt("dnd_schedule", Ty::Object, "{\"tz\": IANA time zone, \"days\": [\"mon\"…\"sun\"] on which it starts, \"start\": \"HH:MM\", \"end\": \"HH:MM\" (before start: past midnight)}, or null for none"),
        ]),
    route(Verb::Get, "/api/v1/channels/{cid}/notification-prefs", Op::GetChannelNotifyPrefs, 200, "The caller's notification preferences for a channel"),
    route(Verb::Put, "/api/v1/channels/{cid}/notification-prefs", Op::PutChannelNotifyPrefs, 200, "Replace the caller's notification preferences for a channel")
        .body(&[
            opt("level", Ty::String, "default (the caller's prefs; the default), all, mentions or none"),
            opt("muted", Ty::Boolean, "a muted channel notifies nothing; default false"),
        ]),
    route(Verb::Get, "/api/v1/me/push-devices", Op::ListPushDevices, 200, "The caller's push devices"),
    route(Verb::Post, "/api/v1/me/push-devices", Op::AddPushDevice, 201, "Register a push device (the same app_id and pushkey again keeps its ID)")
        .body(&[
            req("app_id", Ty::String, "the push gateway's app ID, 1 to 64 characters"),
            req("pushkey", Ty::String, "the device's push key, 1 to 512 bytes"),
            req("platform", Ty::String, "apns, fcm or webpush"),
        ]),
    route(Verb::Delete, "/api/v1/me/push-devices/{did}", Op::RemovePushDevice, 204, "Remove one of the caller's push devices"),
    route(Verb::Post, "/api/v1/e2ee/keys/upload", Op::UploadKeys, 200, "Upload the caller's device's identity, one-time and fallback keys (the token must be bound to a device)")
        .body(&[
            opt("device_keys", Ty::Object, "{\"curve25519\",\"ed25519\",\"signature\"}: unpadded base64; the signature by the ed25519 key over the canonical JSON of {curve25519, device_id, ed25519, user_id}; set once"),
            opt("one_time_keys", Ty::Object, "{KEY_ID: KEY}: curve25519 keys, at most 100 per call and 200 unclaimed per device"),
            opt("fallback_key", Ty::Object, "{KEY_ID: KEY}: one key, handed out when the one-time keys run out; replaces the one before"),
        ]),
    route(Verb::Post, "/api/v1/e2ee/keys/query", Op::QueryKeys, 200, "The devices and identity keys of users who share a workspace with the caller")
        .body(&[req("user_ids", Ty::Strings, "at most 1,000 user IDs; the others are left out")]),
    route(Verb::Post, "/api/v1/e2ee/keys/claim", Op::ClaimKeys, 200, "Claim one key of each device: a one-time key handed out once, ever, or the fallback key")
        .body(&[req("devices", Ty::Object, "{user_id: [device_id, …]}: at most 1,000 devices")]),
    route(Verb::Put, "/api/v1/e2ee/to-device/{txn_id}", Op::SendToDevice, 200, "Send to-device messages from the caller's device; kept for each device until it acknowledges them (429 queue_full if one holds 10,000)")
        .body(&[req("messages", Ty::Object, "{user_id: {device_id: CONTENT}}: each CONTENT a JSON object of at most 64 KiB; devices of users who share no workspace with the caller get nothing")]),
    route(Verb::Get, "/api/v1/e2ee/to-device", Op::ListToDevice, 200, "The caller's device's to-device messages; reading after an ID acknowledges everything up to it")
        .query(&[
            opt("after", Ty::String, "a message ID: acknowledges it and those before it, and lists those after it"),
            opt("limit", Ty::Integer, "page size, 1 to 200, default 100"),
        ]),
    route(Verb::Delete, "/api/v1/e2ee/devices/{device_id}", Op::RemoveDevice, 204, "Remove one of the caller's devices: its tokens stop working and its ID is never used again"),
];

const SEARCH_CURSOR: Field = opt("cursor", Ty::String, "the next_cursor of the previous page");
const SEARCH_LIMIT: Field = opt("limit", Ty::Integer, "page size, 1 to 100, default 20");

// ---------------------------------------------------------------------------------------
// The router
// ---------------------------------------------------------------------------------------

/// Path parameters as they appear in the path, still percent-encoded.
type RawParams<'p> = Vec<(&'static str, &'p str)>;

/// What the table says about a request's method and path.
enum Found<'p> {
    Route(&'static Route, RawParams<'p>),
    /// The path exists with these methods only.
    WrongMethod(Vec<&'static str>),
    Nothing,
}

/// Matches a path against a pattern, returning its parameters.
pub(crate) fn match_path<'p>(pattern: &'static str, path: &'p str) -> Option<RawParams<'p>> {
    let mut params = Vec::new();
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(h)) => match w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                Some(name) if !h.is_empty() => params.push((name, h)),
                Some(_) => return None,
                None if w == h => {}
                None => return None,
            },
            _ => return None,
        }
    }
}

fn find<'p>(method: &Method, path: &'p str) -> Found<'p> {
    if path.split('/').count() > PATH_SEGMENTS_MAX {
        return Found::Nothing;
    }
    // HEAD is served wherever GET is (RFC 9110 §9.3.2): the GET runs, and hyper sends its
    // headers without the body.
    let verb = if method == Method::HEAD {
        Some(Verb::Get)
    } else {
        Verb::of(method)
    };
    let mut allowed = Vec::new();
    for r in ROUTES {
        if let Some(params) = match_path(r.path, path) {
            if Some(r.verb) == verb {
                return Found::Route(r, params);
            }
            allowed.push(r.verb.as_str());
            if r.verb == Verb::Get {
                allowed.push("HEAD");
            }
        }
    }
    if allowed.is_empty() {
        Found::Nothing
    } else {
        Found::WrongMethod(allowed)
    }
}

/// Serves one REST request: routes it, checks the token and the rate, reads the body and
/// runs the call. Every answer is JSON (or empty, for 204).
pub async fn handle(
    ctx: Rc<ShardCtx>,
    req: Request<ReqBody>,
    peer: Option<IpAddr>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match find(req.method(), &path) {
        Found::Route(route, params) => match serve(&ctx, route, &params, req, peer).await {
            Ok(reply) => reply.response(),
            Err(e) => e.response(),
        },
        Found::WrongMethod(allowed) => {
            let mut r = ApiError::method_not_allowed().response();
            if let Ok(v) = hyper::header::HeaderValue::from_str(&allowed.join(", ")) {
                r.headers_mut().insert(hyper::header::ALLOW, v);
            }
            r
        }
        Found::Nothing => ApiError::new(404, "not_found", "no such endpoint").response(),
    }
}

async fn serve(
    ctx: &ShardCtx,
    route: &'static Route,
    raw: &RawParams<'_>,
    req: Request<ReqBody>,
    peer: Option<IpAddr>,
) -> Result<Reply, ApiError> {
    let caller = if route.auth {
        let caller = authenticate(ctx, req.headers(), req.uri()).await?;
        ctx.take_rate(caller.user.0)?;
        Some(caller)
    } else {
        None
    };
    let params = decode_params(raw)?;
    let query = req.uri().query().map(str::to_owned);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body = if route.body.is_empty() {
        Bytes::new()
    } else {
        let limit = ctx.shared.config.request_body_bytes_max;
        read_body(req.into_body(), limit).await?
    };
    let call = Call {
        ctx,
        caller,
        peer: peer.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        forwarded: false,
        params,
        query,
        body,
    };
    match run_current(route.op, &call).await {
        // Another node leads what the call writes to: it answers, if it can be reached.
        Err(e) if e.leader.is_some() => {
            let refused = forward::Refused {
                method: &method,
                path: &path,
                query: call.query.as_deref(),
                caller: call.caller.as_ref(),
                peer: call.peer,
                body: &call.body,
            };
            let leader = e.leader.expect("checked");
            forward::forward(ctx, leader, refused).await.ok_or(e)
        }
        ran => ran,
    }
}

fn decode_params(raw: &RawParams<'_>) -> Result<Vec<(&'static str, String)>, ApiError> {
    raw.iter()
        .map(|(name, value)| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map(|v| (*name, v.into_owned()))
                .map_err(|_| ApiError::invalid(format!("path parameter {name} is not UTF-8")))
        })
        .collect()
}

/// Reads a body of at most `limit` bytes.
async fn read_body(mut body: ReqBody, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("the request body is over {limit} bytes"));
    let declared = body.size_hint().exact().unwrap_or(0);
    if declared > limit.saturating_add(OVERSIZED_DRAIN_BYTES_MAX) as u64 {
        return Err(too_large());
    }
    match Limited::new(&mut body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            crate::body::read_at_most(&mut body, OVERSIZED_DRAIN_BYTES_MAX as u64).await;
            Err(too_large())
        }
        Err(e) => Err(ApiError::invalid(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// Parses a body into a call's request: a UTF-8 JSON object.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_json(format!("the body is not valid UTF-8: {e}")))?;
    let start = text.trim_start();
    if start.is_empty() {
        return Err(ApiError::bad_json("a JSON object body is required"));
    }
    // serde reads a struct from a JSON array too; the API takes objects only.
    if !start.starts_with('{') {
        return Err(ApiError::bad_json("the body must be a JSON object"));
    }
    if !crate::json::depth_within(body, crate::json::JSON_DEPTH_MAX) {
        return Err(too_deep());
    }
    serde_json::from_str(text).map_err(|e| ApiError::bad_json(e.to_string()))
}

/// 400 for JSON nested deeper than [`crate::json::JSON_DEPTH_MAX`].
pub fn too_deep() -> ApiError {
    ApiError::bad_json(format!(
        "JSON may nest at most {} levels deep",
        crate::json::JSON_DEPTH_MAX
    ))
}

/// A parsed request, as handlers see it.
struct Call<'a> {
    ctx: &'a ShardCtx,
    caller: Option<Caller>,
    /// The client's address, for the sign-up and login limits.
    peer: IpAddr,
    /// Passed here by the cluster node the client called (`forward`), which applied the
    /// sign-up and login limits already.
    forwarded: bool,
    params: Vec<(&'static str, String)>,
    query: Option<String>,
    body: Bytes,
}

impl Call<'_> {
    fn engine(&self) -> &chorus_engine::Engine {
        &self.ctx.shared.engine
    }

    /// Before a read of what this node's directory holds: [`Shared::directory_current`],
    /// unless this call was forwarded here (this node leads the directory).
    async fn directory_current(&self) {
        if !self.forwarded {
            self.ctx.shared.directory_current().await;
        }
    }

    /// The authenticated caller; only routes with `auth` reach handlers that ask.
    fn user(&self) -> UserId {
        self.caller.as_ref().expect("authenticated route").user
    }

    /// The device the caller's token is bound to; 400 for a token bound to none.
    fn device(&self) -> Result<&str, ApiError> {
        let caller = self.caller.as_ref().expect("authenticated route");
        caller.device.as_deref().ok_or_else(|| {
            ApiError::invalid(
                "this token is bound to no device: sign up or log in with a device_id",
            )
        })
    }

    fn param(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .expect("the route names this parameter")
    }

    fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(&self.body)
    }

    fn workspace(&self) -> Result<WorkspaceId, ApiError> {
        parse_id(self.param("wid"), "workspace")
    }

    fn channel(&self) -> Result<ChannelId, ApiError> {
        parse_id(self.param("cid"), "channel")
    }

    /// The path's message, which must be in the path's channel.
    fn message(&self) -> Result<MessageId, ApiError> {
        let channel = self.channel()?;
        message_in(self.param("mid"), channel)
    }

    /// A query parameter, decoded; `None` when absent or empty.
    fn query(&self, key: &str) -> Result<Option<String>, ApiError> {
        let Some(q) = self.query.as_deref() else {
            return Ok(None);
        };
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k != key {
                continue;
            }
            let v = v.replace('+', " ");
            let v = percent_encoding::percent_decode_str(&v)
                .decode_utf8()
                .map_err(|_| ApiError::invalid(format!("query parameter {key} is not UTF-8")))?;
            return Ok(Some(v.into_owned()).filter(|v| !v.is_empty()));
        }
        Ok(None)
    }

    fn limit(&self) -> Result<usize, ApiError> {
        self.limit_within(PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX)
    }

    /// The `limit` query parameter: 1 to `max`, `default` when absent.
    fn limit_within(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.query("limit")? {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(format!("limit must be an integer from 1 to {max}"))
                }),
        }
    }

    fn cursor(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.query(key)?.map(|c| decode_cursor(&c)).transpose()
    }
}

/// A page cursor: a seq, written so that clients do not take it for a number.
pub fn encode_cursor(seq: u64) -> String {
    format!("s{seq:x}")
}

/// Reads a cursor made by [`encode_cursor`].
pub fn decode_cursor(s: &str) -> Result<u64, ApiError> {
    s.strip_prefix('s')
        .filter(|h| !h.is_empty() && h.len() <= 16)
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| ApiError::invalid("the cursor is not one this server gave out"))
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

/// A successful answer.
pub(crate) struct Reply {
    status: u16,
    body: Option<Bytes>,
    /// A `Retry-After` to send (an error answered by another node, when forwarded).
    retry_after: Option<std::time::Duration>,
}

impl Reply {
    pub(crate) fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Reply {
        let body = chorus_engine::view::json(value).expect("answers always serialize");
        Reply {
            status,
            body: Some(body),
            retry_after: None,
        }
    }

    pub(crate) fn empty() -> Reply {
        Reply {
            status: 204,
            body: None,
            retry_after: None,
        }
    }

    fn response(self) -> Response<Full<Bytes>> {
        let json = self.body.is_some();
        let mut r = Response::new(Full::new(self.body.unwrap_or_default()));
        *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        if json {
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
        }
        if let Some(after) = self.retry_after {
            let secs = crate::ratelimit::retry_after_header_s(after);
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

/// `{key: value}`, serialized straight from the view without building a JSON tree.
struct One<'a, T: ?Sized>(&'static str, &'a T);

impl<T: Serialize + ?Sized> Serialize for One<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(self.0, self.1)?;
        map.end()
    }
}

/// A list answer: `{key: [...], "next_cursor": ... | null}`.
struct List<'a, T>(&'static str, &'a [T], Option<u64>);

impl<T: Serialize> Serialize for List<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(self.0, self.1)?;
        map.serialize_entry("next_cursor", &self.2.map(encode_cursor))?;
        map.end()
    }
}

/// `{"user","token"}`.
#[derive(Serialize)]
struct Session<'a> {
    user: &'a UserView,
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct SignupReq {
    email: String,
    password: String,
    name: String,
    #[serde(default)]
    device_id: Option<String>,
}

#[derive(Deserialize)]
struct LoginReq {
    email: String,
    password: String,
    #[serde(default)]
    device_id: Option<String>,
}

#[derive(Deserialize)]
struct NameReq {
    name: String,
}

#[derive(Deserialize)]
struct EmailReq {
    email: String,
}

#[derive(Deserialize)]
struct ChannelReq {
    name: String,
    kind: Option<String>,
}

#[derive(Deserialize)]
struct DmReq {
    user_ids: Vec<String>,
    #[serde(default)]
    encrypted: bool,
}

#[derive(Deserialize)]
struct UserIdReq {
    user_id: String,
}

#[derive(Deserialize)]
struct PresenceReq {
    mode: String,
    #[serde(default)]
    dnd_until: Option<String>,
}

#[derive(Deserialize)]
struct PostReq {
    #[serde(flatten)]
    content: crate::protocol::ContentFields,
    client_msg_id: Option<String>,
    thread_id: Option<String>,
    #[serde(default)]
    file_ids: Vec<String>,
}

#[derive(Deserialize)]
struct EditReq {
    #[serde(flatten)]
    content: crate::protocol::ContentFields,
}

#[derive(Deserialize)]
struct SeqReq {
    seq: u64,
}

/// Parses `body` as every request type of the API, for the fuzz target: none may panic,
/// whatever the bytes. Returns how many accepted it.
pub(crate) fn parse_as_every_request(body: &[u8]) -> usize {
    [
        parse_json::<SignupReq>(body).is_ok(),
        parse_json::<LoginReq>(body).is_ok(),
        parse_json::<NameReq>(body).is_ok(),
        parse_json::<EmailReq>(body).is_ok(),
        parse_json::<ChannelReq>(body).is_ok(),
        parse_json::<DmReq>(body).is_ok(),
        parse_json::<UserIdReq>(body).is_ok(),
        parse_json::<PostReq>(body).is_ok(),
        parse_json::<EditReq>(body).is_ok(),
        parse_json::<PresenceReq>(body).is_ok(),
        parse_json::<SeqReq>(body).is_ok(),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
        + notify::parse_as_every_request(body)
        + e2ee::parse_as_every_request(body)
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

/// Runs a call; on a cluster node, a call that reads the directory passes the directory
/// barrier first ([`Op::reads_directory`]), and a call answered 404 runs once more after
/// the barrier (`Engine::directory_barrier`), since what it did not find may have been
/// made a moment ago through another node. A genuine 404 costs a barrier.
async fn run_current(op: Op, call: &Call<'_>) -> Result<Reply, ApiError> {
    if op.reads_directory() {
        call.directory_current().await;
    }
    match run(op, call).await {
        Err(e) if e.status == 404 && call.ctx.shared.cluster.is_some() => {
            match call.engine().directory_barrier().await {
                Ok(()) => run(op, call).await,
                Err(_) => Err(e),
            }
        }
        ran => ran,
    }
}

async fn run(op: Op, call: &Call<'_>) -> Result<Reply, ApiError> {
    match op {
        Op::Signup => signup(call).await,
        Op::Login => login(call).await,
        Op::OpenApi => Ok(openapi_reply()),
        Op::Me => me(call).await,
        Op::Cluster => Ok(Reply::json(200, &cluster_view(&call.ctx.shared))),
        Op::ClusterMembers => members::put_members(call).await,
        Op::ListWorkspaces => list_workspaces(call).await,
        Op::CreateWorkspace => create_workspace(call).await,
        Op::AddMember => add_member(call).await,
        Op::ListMembers => list_members(call).await,
        Op::ListChannels => list_channels(call).await,
        Op::CreateChannel => create_channel(call).await,
        Op::OpenDm => open_dm(call).await,
        Op::GetChannel => get_channel(call).await,
        Op::Join => join(call).await,
        Op::AddChannelMember => add_channel_member(call).await,
        Op::RemoveChannelMember => remove_channel_member(call).await,
        Op::PostMessage => post_message(call).await,
        Op::ListMessages => list_messages(call).await,
        Op::GetMessage => get_message(call).await,
        Op::EditMessage => edit_message(call).await,
        Op::DeleteMessage => delete_message(call).await,
        Op::ListReplies => list_replies(call).await,
        Op::History => history(call).await,
        Op::AddReaction => react(call, true).await,
        Op::RemoveReaction => react(call, false).await,
        Op::SetPresence => set_presence(call).await,
        Op::GetPresence => get_presence(call).await,
        Op::MarkRead => mark_read(call).await,
        Op::Unreads => unreads(call).await,
        // The files routes are not in this router's table: `conn` sends their paths to
        // `crate::files`, which streams their bodies.
        Op::File(_) => Err(ApiError::new(404, "not_found", "no such endpoint")),
        Op::SearchMessages => search::messages(call).await,
        Op::SearchUsers => search::users(call).await,
        Op::SearchFiles => search::files(call).await,
        Op::GetNotifyPrefs => notify::get_prefs(call).await,
        Op::PatchNotifyPrefs => notify::patch_prefs(call).await,
        Op::GetChannelNotifyPrefs => notify::get_channel_prefs(call).await,
        Op::PutChannelNotifyPrefs => notify::put_channel_prefs(call).await,
        Op::ListPushDevices => notify::list_devices(call).await,
        Op::AddPushDevice => notify::add_device(call).await,
        Op::RemovePushDevice => notify::remove_device(call).await,
        Op::UploadKeys => e2ee::upload(call).await,
        Op::QueryKeys => e2ee::query(call).await,
        Op::ClaimKeys => e2ee::claim(call).await,
        Op::RemoveDevice => e2ee::remove_device(call).await,
        Op::SendToDevice => e2ee::send_to_device(call).await,
        Op::ListToDevice => e2ee::list_to_device(call).await,
    }
}

/// A hash to verify against when the email is unknown, so that a login for an unknown
/// email takes as long as one with a wrong password and does not reveal which it was.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| crate::auth::hash_password("chorus-decoy-password"))
}

/// A signed-in session: its token, bound to the device if one is named, which is then
/// registered for the user first (`API.md` §14).
async fn session(
    call: &Call<'_>,
    user: &UserView,
    device: Option<&str>,
    status: u16,
) -> Result<Reply, ApiError> {
    if let Some(device) = device {
        call.engine().register_device(user.id, device).await?;
    }
    let tokens = &call.ctx.shared.tokens;
    let token = tokens.issue(&user.id.to_string(), device, token_now());
    Ok(Reply::json(
        status,
        &Session {
            user,
            token: &token,
            device_id: device,
        },
    ))
}

/// Checks a sign-in's `device_id` before any password is hashed; the engine checks it again.
fn check_device_id(device: Option<&str>) -> Result<(), ApiError> {
    Ok(device.map_or(Ok(()), chorus_engine::domain::e2ee::check_device_id)?)
}

async fn signup(call: &Call<'_>) -> Result<Reply, ApiError> {
    let r: SignupReq = call.json()?;
    crate::auth::check_password(&r.password).map_err(ApiError::invalid)?;
    check_device_id(r.device_id.as_deref())?;
    // A malformed address is refused before hashing too; the engine checks it again.
    chorus_engine::domain::input::check_email(r.email.trim())?;
    if !call.forwarded {
        call.ctx.shared.guard.signup(call.peer)?;
    }
    // Checked before hashing so that a taken email costs no hash; the engine checks again
    // when it creates the user, which settles a race between two sign-ups.
    if call.engine().user_by_email(&r.email).await?.is_some() {
        return Err(ApiError::new(
            409,
            "conflict",
            "email is already registered",
        ));
    }
    let password = r.password;
    let hash = off_shard(move || crate::auth::hash_password(&password)).await;
    let user = call.engine().create_user(&r.email, &r.name, &hash).await?;
    session(call, &user, r.device_id.as_deref(), 201).await
}

async fn login(call: &Call<'_>) -> Result<Reply, ApiError> {
    let r: LoginReq = call.json()?;
    check_device_id(r.device_id.as_deref())?;
    let guard = &call.ctx.shared.guard;
    let attempt = match call.forwarded {
        false => Some(guard.login(&r.email, call.peer)?),
        true => None,
    };
    let mut found = call.engine().user_by_email(&r.email).await?;
    if found.is_none() && call.ctx.shared.cluster.is_some() {
        // A cluster node's directory may not have applied a sign-up another node just
        // took: once it has everything committed before now, look again (`API.md` §15),
        // rather than count a failure against a right password.
        if call.engine().directory_barrier().await.is_ok() {
            found = call.engine().user_by_email(&r.email).await?;
        }
    }
    let hash = found.as_ref().map(|u| u.password_hash.clone());
    let password = r.password;
    let ok = off_shard(move || match hash {
        Some(h) => crate::auth::verify_password(&password, &h),
        None => {
            crate::auth::verify_password(&password, decoy_hash());
            false
        }
    })
    .await;
    match found {
        Some(user) if ok => {
            if let Some(attempt) = attempt {
                guard.login_succeeded(attempt);
            }
            let device = r.device_id.as_deref();
            session(call, &UserView::from(&user), device, 200).await
        }
        _ => {
            if attempt.is_some() {
                forward::login_failed(call.ctx, &r.email, call.peer);
            }
            Err(ApiError::unauthorized("wrong email or password"))
        }
    }
}

async fn me(call: &Call<'_>) -> Result<Reply, ApiError> {
    let (user, workspaces) = call.engine().me(call.user()).await?;
    Ok(Reply::json(
        200,
        &serde_json::json!({"user": user, "workspaces": workspaces}),
    ))
}

/// `GET /api/v1/cluster` (`API.md` §15): no workspace data. A single node is node 1,
/// leading every partition, with no cluster address. Beside §15's fields, each partition
/// names its `learners` (nodes that hold and apply it without a vote), and `directory`
/// shows the directory's group the same way.
fn cluster_view(shared: &crate::ctx::Shared) -> serde_json::Value {
    let partitions = shared.config.partitions;
    let Some(c) = &shared.cluster else {
        let parts: Vec<_> = (0..partitions)
            .map(|p| serde_json::json!({"id": p, "leader": 1, "replicas": [1], "learners": []}))
            .collect();
        return serde_json::json!({
            "node_id": 1,
            "nodes": [{"id": 1, "addr": null, "up": true}],
            "partitions": parts,
            "directory": {"leader": 1, "replicas": [1], "learners": []},
        });
    };
    let now = std::time::Instant::now();
    let nodes: Vec<_> = c
        .nodes()
        .iter()
        .map(|(id, addr)| {
            let up = *id == c.me
                || c.board
                    .last_heard(*id)
                    .is_some_and(|t| now.duration_since(t) < crate::ctx::PEER_UP_WITHIN);
            serde_json::json!({"id": id, "addr": addr.to_string(), "up": up})
        })
        .collect();
    let groups = c.board.groups();
    let group = |id: u32| {
        let g = groups.get(&u64::from(id));
        serde_json::json!({
            "leader": g.and_then(|g| g.leader),
            "replicas": g.map(|g| g.voters.clone()).unwrap_or_default(),
            "learners": g.map(|g| g.learners.clone()).unwrap_or_default(),
        })
    };
    let parts: Vec<_> = (0..partitions)
        .map(|p| {
            let mut part = group(p);
            part["id"] = p.into();
            part
        })
        .collect();
    // Beyond §15: the directory's group (numbered after the partitions), whose leader
    // decides metadata writes and sends the cluster's pushes and email.
    let directory = group(partitions);
    // Beyond §15: the number of the members ask this node applied (`PUT
    // /api/v1/cluster/members`), the same on every node once it has reached them all.
    serde_json::json!({"node_id": c.me, "nodes": nodes, "partitions": parts,
        "directory": directory, "members_ask": c.members.ask()})
}

async fn list_workspaces(call: &Call<'_>) -> Result<Reply, ApiError> {
    let (_, workspaces) = call.engine().me(call.user()).await?;
    Ok(Reply::json(200, &List("workspaces", &workspaces, None)))
}

async fn create_workspace(call: &Call<'_>) -> Result<Reply, ApiError> {
    let r: NameReq = call.json()?;
    let w = call.engine().create_workspace(call.user(), &r.name).await?;
    Ok(Reply::json(201, &One("workspace", &w)))
}

async fn add_member(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let r: EmailReq = call.json()?;
    let m = call.engine().add_member(call.user(), wid, &r.email).await?;
    Ok(Reply::json(201, &One("member", &m)))
}

async fn list_members(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let members = call.engine().members(call.user(), wid).await?;
    Ok(Reply::json(200, &List("members", &members, None)))
}

async fn set_presence(call: &Call<'_>) -> Result<Reply, ApiError> {
    let req: PresenceReq = call.json()?;
    let mode = Mode::parse(&req.mode)
        .ok_or_else(|| ApiError::invalid("mode must be auto, away, dnd or invisible"))?;
    let until = match (mode, req.dnd_until.as_deref()) {
        (Mode::Dnd, Some(at)) => Some(parse_future_time(at)?),
        (_, Some(_)) => return Err(ApiError::invalid("dnd_until goes with mode dnd only")),
        (_, None) => None,
    };
    let user = call.user();
    let own = call.engine().set_presence(user, mode, until).await?;
    let value = crate::protocol::own_presence_value(user, &own);
    Ok(Reply::json(200, &One("presence", &value)))
}

/// An RFC 3339 UTC time that has not passed, in microseconds since the epoch.
fn parse_future_time(at: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid("dnd_until must be an RFC 3339 UTC time, such as 2030-01-01T09:00:00Z")
    };
    let time = humantime::parse_rfc3339(at).map_err(|_| bad())?;
    let us = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_micros();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    if us <= now {
        return Err(ApiError::invalid("dnd_until has passed"));
    }
    u64::try_from(us).map_err(|_| bad())
}

async fn get_presence(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let raw = call.query("user_ids")?.unwrap_or_default();
    let ids: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if ids.len() > PRESENCE_QUERY_MAX {
        return Err(ApiError::new(
            400,
            "too_many",
            format!("at most {PRESENCE_QUERY_MAX} user ids, not {}", ids.len()),
        ));
    }
    // An ID that does not parse names no member: it is left out, like a non-member.
    let users: Vec<UserId> = ids.iter().filter_map(|s| s.parse().ok()).collect();
    let found = call.engine().presence(call.user(), wid, &users).await?;
    let list: Vec<serde_json::Value> = found
        .iter()
        .map(|(u, p)| crate::protocol::presence_value(*u, p))
        .collect();
    Ok(Reply::json(200, &List("presence", &list, None)))
}

async fn list_channels(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let channels = call.engine().channels(call.user(), wid).await?;
    Ok(Reply::json(200, &List("channels", &channels, None)))
}

fn channel_kind(kind: Option<&str>) -> Result<ChannelKind, ApiError> {
    match kind.unwrap_or("public") {
        "public" => Ok(ChannelKind::Public),
        "private" => Ok(ChannelKind::Private),
        _ => Err(ApiError::invalid("kind must be \"public\" or \"private\"")),
    }
}

async fn create_channel(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let r: ChannelReq = call.json()?;
    let kind = channel_kind(r.kind.as_deref())?;
    let c = call
        .engine()
        .create_channel(call.user(), wid, &r.name, kind)
        .await?;
    Ok(Reply::json(201, &One("channel", &c)))
}

async fn open_dm(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let r: DmReq = call.json()?;
    let users = r
        .user_ids
        .iter()
        .map(|u| parse_id(u, "user"))
        .collect::<Result<Vec<UserId>, _>>()?;
    let engine = call.engine();
    let (c, created) = if r.encrypted {
        engine.open_encrypted_dm(call.user(), wid, users).await?
    } else {
        engine.open_dm(call.user(), wid, users).await?
    };
    Ok(Reply::json(
        if created { 201 } else { 200 },
        &One("channel", &c),
    ))
}

async fn get_channel(call: &Call<'_>) -> Result<Reply, ApiError> {
    let c = call.engine().channel(call.user(), call.channel()?).await?;
    Ok(Reply::json(200, &One("channel", &c)))
}

/// Answers a membership change with the channel as it stands after it.
async fn channel_reply(call: &Call<'_>, cid: ChannelId, status: u16) -> Result<Reply, ApiError> {
    let c = call.engine().channel(call.user(), cid).await?;
    Ok(Reply::json(status, &One("channel", &c)))
}

async fn join(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    call.engine().join(call.user(), cid).await?;
    channel_reply(call, cid, 200).await
}

async fn add_channel_member(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let r: UserIdReq = call.json()?;
    let target = parse_id(&r.user_id, "user")?;
    call.engine()
        .add_channel_member(call.user(), cid, target)
        .await?;
    channel_reply(call, cid, 201).await
}

async fn remove_channel_member(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let target = parse_id(call.param("uid"), "user")?;
    call.engine()
        .remove_channel_member(call.user(), cid, target)
        .await?;
    Ok(Reply::empty())
}

async fn post_message(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let r: PostReq = call.json()?;
    let thread = r
        .thread_id
        .as_deref()
        .map(|t| message_in(t, cid))
        .transpose()?;
    let files = crate::protocol::file_ids(&r.file_ids)?;
    let content = r.content.content()?;
    let (m, created) = call
        .engine()
        .post_content(
            call.user(),
            cid,
            content,
            r.client_msg_id.as_deref(),
            thread,
            files,
        )
        .await?;
    Ok(Reply::json(
        if created { 201 } else { 200 },
        &One("message", &m),
    ))
}

async fn mark_read(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let r: SeqReq = call.json()?;
    let read = call.engine().mark_read(call.user(), cid, r.seq).await?;
    Ok(Reply::json(200, &One("read", &read)))
}

async fn unreads(call: &Call<'_>) -> Result<Reply, ApiError> {
    let wid = call.workspace()?;
    let after = call.cursor("cursor")?.map(ChannelId);
    let limit = call.limit_within(UNREADS_PAGE_MAX, UNREADS_PAGE_MAX)?;
    let (reads, next) = call
        .engine()
        .unreads(call.user(), wid, after, limit)
        .await?;
    Ok(Reply::json(
        200,
        &List("unreads", &reads, next.map(|c| c.0)),
    ))
}

async fn list_messages(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let (before, limit) = (call.cursor("before")?, call.limit()?);
    let page = call
        .engine()
        .history(call.user(), cid, before, limit)
        .await?;
    Ok(Reply::json(
        200,
        &List("messages", &page.messages, page.next_cursor),
    ))
}

async fn get_message(call: &Call<'_>) -> Result<Reply, ApiError> {
    let m = call.engine().message(call.user(), call.message()?).await?;
    Ok(Reply::json(200, &One("message", &m)))
}

async fn edit_message(call: &Call<'_>) -> Result<Reply, ApiError> {
    let mid = call.message()?;
    let r: EditReq = call.json()?;
    let content = r.content.content()?;
    let m = call
        .engine()
        .edit_content(call.user(), mid, content)
        .await?;
    Ok(Reply::json(200, &One("message", &m)))
}

async fn delete_message(call: &Call<'_>) -> Result<Reply, ApiError> {
    call.engine().delete(call.user(), call.message()?).await?;
    Ok(Reply::empty())
}

async fn list_replies(call: &Call<'_>) -> Result<Reply, ApiError> {
    let root = call.message()?;
    let (after, limit) = (call.cursor("after")?, call.limit()?);
    let page = call
        .engine()
        .replies(call.user(), root, after, limit)
        .await?;
    Ok(Reply::json(
        200,
        &List("messages", &page.messages, page.next_cursor),
    ))
}

async fn history(call: &Call<'_>) -> Result<Reply, ApiError> {
    let versions = call.engine().versions(call.user(), call.message()?).await?;
    Ok(Reply::json(200, &List("versions", &versions, None)))
}

async fn react(call: &Call<'_>, add: bool) -> Result<Reply, ApiError> {
    let mid = call.message()?;
    let emoji = call.param("emoji");
    call.engine().react(call.user(), mid, emoji, add).await?;
    Ok(Reply::empty())
}

// ---------------------------------------------------------------------------------------
// The OpenAPI document
// ---------------------------------------------------------------------------------------

fn openapi_reply() -> Reply {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    let body = DOC.get_or_init(|| {
        serde_json::to_vec(&openapi())
            .expect("the document serializes")
            .into()
    });
    Reply {
        status: 200,
        body: Some(body.clone()),
        retry_after: None,
    }
}

fn param_about(name: &str) -> &'static str {
    match name {
        "wid" => "a workspace ID",
        "cid" => "a channel ID",
        "mid" => "a message ID (of that channel)",
        "uid" => "a user ID",
        "emoji" => "an emoji name, percent-encoded",
        "fid" => "a file ID",
        "kind" => "a preview kind: thumb, page1 or code",
        "did" => "a push device ID (of the caller)",
        "device_id" => "an end-to-end encryption device ID (of the caller), as given at sign-in",
        "txn_id" => {
            "the sender device's transaction ID: the same one again within 24 h does nothing"
        }
        _ => "",
    }
}

fn schema_of(ty: Ty) -> serde_json::Value {
    match ty {
        Ty::String => serde_json::json!({"type": "string"}),
        Ty::Integer => serde_json::json!({"type": "integer"}),
        Ty::Strings => serde_json::json!({"type": "array", "items": {"type": "string"}}),
        Ty::Binary => serde_json::json!({"type": "string", "format": "binary"}),
        Ty::Boolean => serde_json::json!({"type": "boolean"}),
        Ty::Object => serde_json::json!({"type": "object", "nullable": true}),
    }
}

fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn operation(r: &Route) -> serde_json::Value {
    use serde_json::json;
    let mut parameters: Vec<serde_json::Value> = path_params(r.path)
        .map(|name| {
            json!({"name": name, "in": "path", "required": true,
                   "description": param_about(name), "schema": {"type": "string"}})
        })
        .collect();
    parameters.extend(r.query.iter().map(|f| {
        json!({"name": f.name, "in": "query", "required": f.required,
               "description": f.about, "schema": schema_of(f.ty)})
    }));
    let mut responses = serde_json::Map::new();
    for status in r.statuses {
        let answer = if *status == 204 {
            json!({"description": "done"})
        } else {
            json!({"description": "the answer",
                   "content": {"application/json": {"schema": {"type": "object"}}}})
        };
        responses.insert(status.to_string(), answer);
    }
    responses.insert(
        "default".into(),
        json!({"description": "an error",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
    );
    let mut op = json!({
        "operationId": format!("{:?}", r.op),
        "summary": r.summary,
        "parameters": parameters,
        "responses": responses,
    });
    if !r.auth {
        op["security"] = json!([]);
    }
    if !r.body.is_empty() {
        let media = if r.form {
            "multipart/form-data"
        } else {
            "application/json"
        };
        op["requestBody"] = json!({"required": true,
            "content": {media: {"schema": body_schema(r.body)}}});
    }
    op
}

fn body_schema(fields: &[Field]) -> serde_json::Value {
    let properties: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|f| {
            let mut s = schema_of(f.ty);
            s["description"] = f.about.into();
            (f.name.to_owned(), s)
        })
        .collect();
    let required: Vec<&str> = fields
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name)
        .collect();
    serde_json::json!({"type": "object", "properties": properties, "required": required})
}

/// The OpenAPI 3 document of [`ROUTES`].
pub fn openapi() -> serde_json::Value {
    use serde_json::json;
    let mut paths = serde_json::Map::new();
    for r in ROUTES.iter().chain(crate::files::ROUTES) {
        let item = paths.entry(r.path).or_insert_with(|| json!({}));
        item[r.verb.as_str().to_lowercase()] = operation(r);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Chorus REST API",
            "version": "1",
            "description": "Errors are {\"error\": {\"code\", \"message\"}}. List answers carry next_cursor (a string, or null on the last page).",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    }},
                },
            },
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every path the table serves is matched to its own route, parameters and all, and a
    // path of the table with another method is told apart from an unknown path.
    #[test]
    fn router_matches_the_table() {
        for r in ROUTES {
            let path = r
                .path
                .replace("{wid}", "W1")
                .replace("{cid}", "C1")
                .replace("{mid}", "M1-1")
                .replace("{uid}", "U1")
                .replace("{emoji}", "tada");
            let method = Method::from_bytes(r.verb.as_str().as_bytes()).unwrap();
            match find(&method, &path) {
                Found::Route(found, params) => {
                    assert_eq!(found.op, r.op, "{path}");
                    assert_eq!(params.len(), path_params(r.path).count());
                }
                _ => panic!("{} {path} is not routed", r.verb.as_str()),
            }
        }
        assert!(matches!(
            find(&Method::PUT, "/api/v1/me"),
            Found::WrongMethod(m) if m == ["GET", "HEAD"]
        ));
        // HEAD is routed wherever GET is, and nowhere else.
        assert!(matches!(
            find(&Method::HEAD, "/api/v1/me"),
            Found::Route(r, _) if r.op == Op::Me
        ));
        assert!(matches!(
            find(&Method::HEAD, "/api/v1/auth/signup"),
            Found::WrongMethod(m) if m == ["POST"]
        ));
        for unknown in ["/api/v1/nope", "/api/v1/me/", "/api/v1/channels//join", "/"] {
            assert!(
                matches!(find(&Method::GET, unknown), Found::Nothing),
                "{unknown}"
            );
        }
    }

    // No two routes share a method and a path, and each path parameter has a description.
    #[test]
    fn table_is_unambiguous() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(!(a.verb == b.verb && a.path == b.path), "{}", a.path);
            }
            for p in path_params(a.path) {
                assert!(!param_about(p).is_empty(), "{p}");
            }
        }
    }

    // Cursors round-trip, and anything this server did not make is refused.
    #[test]
    fn cursors() {
        for seq in [0, 1, 50, u64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(seq)), Ok(seq));
        }
        for bad in [
            "",
            "s",
            "12",
            "sG",
            "s-1",
            "s+1",
            "s11111111111111111",
            "S1",
        ] {
            assert_eq!(decode_cursor(bad).unwrap_err().status, 400, "{bad}");
        }
    }

    #[derive(Deserialize)]
    struct TextReq {
        text: String,
    }

    // Bodies must be UTF-8 JSON objects of the right field types; unknown fields pass.
    #[test]
    fn body_parsing() {
        let ok: TextReq = parse_json(br#"{"text":"hi","future":1}"#).unwrap();
        assert_eq!(ok.text, "hi");
        for bad in [
            &b""[..],
            b"  ",
            b"[\"hi\"]",
            b"\"hi\"",
            b"{\"text\":5}",
            b"{}",
            b"{\"text\":\"\xff\"}",
            b"{\"text\":",
        ] {
            let Err(e) = parse_json::<TextReq>(bad) else {
                panic!("{bad:?} parsed");
            };
            assert_eq!((e.status, e.code), (400, "invalid_json"));
        }
    }

    // The document lists every route with its method, path parameters and security.
    #[test]
    fn openapi_lists_every_route() {
        let doc = openapi();
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.verb.as_str().to_lowercase()];
            assert_eq!(op["summary"], r.summary);
            let params = op["parameters"].as_array().unwrap();
            assert_eq!(
                params.iter().filter(|p| p["in"] == "path").count(),
                path_params(r.path).count()
            );
            assert_eq!(op.get("security").is_some(), !r.auth, "{}", r.path);
        }
    }
}

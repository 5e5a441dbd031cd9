//! Files (`API.md` §11): uploads streamed into the file store, their content with `Range`,
//! signed links, and deletion.
//!
//! This module owns the `/api/v1/files/` routes. Their table ([`ROUTES`]) is part of the
//! OpenAPI document like every other route, but they are served here, not by
//! [`crate::api`], because their bodies are streams both ways: an upload is read chunk by
//! chunk into the store, and content is read from the store chunk by chunk as the socket
//! takes it. Neither ever holds a whole file in memory.
//!
//! Metadata lives in the engine's metadata log (`FileStored`, `FileDeleted`), so every
//! shard can answer from its own replica whether a file exists; the bytes live in the
//! [`store::FileStore`]. Who may read a file: its uploader, and every member of a channel
//! with a message (not deleted) that carries it, which the channel partitions answer.
//! Everyone else gets 404, as for an unknown ID, and so does everyone for a deleted file.
//!
//! Previews are made off the server's threads, by a worker process per preview
//! ([`previews`] supervises, [`preview`] runs in the worker); the preview route answers 202
//! while one is owed.
//!
//! API boundary: file names are stored and shown as given and are never part of a path;
//! the store names bytes by their SHA-256 only.

pub mod link;
pub mod pdf_text;
pub mod peers;
pub mod preview;
pub mod previews;
pub mod search_sources;
pub mod store;
pub mod sweep;
#[cfg(test)]
mod test_pdf;
pub mod upload;

use crate::api::{Route, Verb};
use crate::body::ReqBody;
use crate::ctx::{authenticate, off_shard, token_now, ShardCtx};
use crate::error::ApiError;
use bytes::Bytes;
use chorus_engine::ids::{FileId, UserId, WorkspaceId};
use chorus_engine::view::FileView;
use chorus_engine::{EngineError, Unavailable};
use futures::Stream;
use futures::StreamExt;
use glommio::channels::local_channel::{self, LocalSender};
use http_body_util::Full;
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use store::{FileStore, Pending, PendingBytes, PendingHash};

/// Bytes of an upload gathered before they are written to the store in one blocking call
/// (and hashed in another). Measured on 20 MiB uploads: 2 MiB pieces went about 8 % faster
/// than 1 MiB, 4 MiB no faster than 2, and 256 KiB slower.
pub const UPLOAD_FLUSH_BYTES: usize = 2 << 20;
/// Bytes read from the store per blocking call when serving content.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// How long an upload waits between tries while a removal holds the same bytes.
const PIN_RETRY: Duration = Duration::from_millis(2);

/// The body of every HTTP response: JSON or text in one piece, or file content streamed
/// from the blocking pool. Not `Send`: it lives on its connection's shard.
pub enum Body {
    /// One piece.
    Full(Full<Bytes>),
    /// Chunks read as the connection takes them, and the bytes still to come.
    Stream(Pin<Box<dyn Stream<Item = io::Result<Bytes>>>>, u64),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Body::Stream(chunks, left) => match chunks.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    *left = left.saturating_sub(chunk.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(_, left) => *left == 0,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(_, left) => hyper::body::SizeHint::with_exact(*left),
        }
    }
}

/// A response body in one piece.
pub fn full(body: Full<Bytes>) -> Body {
    Body::Full(body)
}

/// Wraps a one-piece response.
pub fn boxed(r: Response<Full<Bytes>>) -> Response<Body> {
    r.map(full)
}

/// What the files routes share, process-wide.
pub struct Files {
    /// The bytes.
    pub store: Arc<FileStore>,
    /// Signs and checks links.
    pub signer: link::Signer,
    /// The queue of files to preview.
    pub previews: previews::Previews,
    /// The limits of every worker process.
    pub limits: previews::PreviewLimits,
}

impl Files {
    /// Opens the store and the link key under the data directory, and starts the preview
    /// supervisor. Blocking.
    pub fn open(
        config: &crate::config::Config,
        engine: chorus_engine::Engine,
        metrics: Arc<crate::metrics::Metrics>,
        s3: Option<Arc<store::S3>>,
    ) -> io::Result<Files> {
        let backend = match s3 {
            None => store::Backend::Disk,
            Some(s3) => store::Backend::S3(s3),
        };
        let store = Arc::new(FileStore::open_with(&config.data_dir, backend)?);
        let limits = previews::PreviewLimits {
            timeout: Duration::from_millis(config.preview_timeout_ms),
            cpu_s: config.preview_cpu_s,
            memory_bytes: config.preview_memory_bytes_max,
            workers: config.preview_workers,
        };
        Ok(Files {
            previews: previews::Previews::start(
                engine,
                store.clone(),
                metrics,
                limits,
                config.cluster_nodes().map_err(io::Error::other)?.is_some(),
            )?,
            store,
            signer: match config.cluster_nodes().map_err(io::Error::other)? {
                // A link made by one node must work on every node.
                Some(_) => link::Signer::for_cluster(&std::fs::read(config.jwt_secret_path())?),
                None => link::Signer::load_or_create(&config.data_dir)?,
            },
            limits,
        })
    }
}

/// What a files route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// `POST /files/upload`.
    Upload,
    /// `GET /files/{fid}`.
    Get,
    /// `GET /files/{fid}/content`.
    Content,
    /// `POST /files/{fid}/url`.
    Url,
    /// `DELETE /files/{fid}`.
    Delete,
    /// `GET /files/{fid}/preview/{kind}`.
    Preview,
}

/// The files routes, for the router below and the OpenAPI document.
#[rustfmt::skip] // One route per line reads as the table it is.
pub static ROUTES: &[Route] = &[
    crate::api::route(Verb::Post, "/api/v1/files/upload", crate::api::Op::File(FileOp::Upload), 201, "Upload a file (multipart/form-data: workspace_id, then file)")
        .form(&[
            crate::api::req("workspace_id", crate::api::Ty::String, "the workspace to upload to"),
            crate::api::req("file", crate::api::Ty::Binary, "the file, with its filename and content type"),
        ]),
    crate::api::route(Verb::Get, "/api/v1/files/{fid}", crate::api::Op::File(FileOp::Get), 200, "A file's metadata"),
    crate::api::route(Verb::Get, "/api/v1/files/{fid}/content", crate::api::Op::File(FileOp::Content), 200, "A file's bytes; Range gives 206; a signed link needs no token")
        .query(&[
            crate::api::opt("expires", crate::api::Ty::Integer, "from a signed link: its expiry, Unix seconds"),
            crate::api::opt("sig", crate::api::Ty::String, "from a signed link: its signature"),
        ]),
    crate::api::route(Verb::Get, "/api/v1/files/{fid}/preview/{kind}", crate::api::Op::File(FileOp::Preview), 200, "A preview: 200 when made, 202 with Retry-After while it is made, 404 no_preview if there will be none")
        .or_pending(),
    crate::api::route(Verb::Post, "/api/v1/files/{fid}/url", crate::api::Op::File(FileOp::Url), 200, "A signed link to the content that works without a token until it expires"),
    crate::api::route(Verb::Delete, "/api/v1/files/{fid}", crate::api::Op::File(FileOp::Delete), 204, "Delete a file (the uploader or a workspace admin)"),
];

/// Serves a request under `/api/v1/files/`.
pub async fn handle(ctx: Rc<ShardCtx>, req: Request<ReqBody>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let verb = if req.method() == Method::HEAD {
        Some(Verb::Get)
    } else {
        Verb::of(req.method())
    };
    let mut allowed = Vec::new();
    for r in ROUTES {
        let Some(params) = crate::api::match_path(r.path, &path) else {
            continue;
        };
        if Some(r.verb) != verb {
            allowed.push(r.verb.as_str());
            continue;
        }
        let crate::api::Op::File(op) = r.op else {
            unreachable!("the files table holds file routes only")
        };
        let fid = params.iter().find(|(n, _)| *n == "fid").map(|(_, v)| *v);
        let kind = params.iter().find(|(n, _)| *n == "kind").map(|(_, v)| *v);
        return match serve(&ctx, op, fid, kind, req).await {
            Ok(r) => r,
            Err(e) => boxed(e.response()),
        };
    }
    if allowed.is_empty() {
        return boxed(ApiError::new(404, "not_found", "no such endpoint").response());
    }
    let mut r = boxed(ApiError::method_not_allowed().response());
    if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

async fn serve(
    ctx: &ShardCtx,
    op: FileOp,
    fid: Option<&str>,
    kind: Option<&str>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    // An ID that does not parse is unknown, like an ID of another workspace.
    let fid = fid
        .map(|f| f.parse::<FileId>().map_err(|_| ApiError::not_found("file")))
        .transpose()?;
    if op == FileOp::Content {
        if let Some((expires, sig)) = signed(req.uri().query()) {
            let fid = fid.expect("the content route names a file");
            return signed_content(ctx, fid, &expires, &sig, &req).await;
        }
    }
    let user = authenticate(ctx, req.headers(), req.uri()).await?.user;
    ctx.take_rate(user.0)?;
    match (op, fid) {
        (FileOp::Upload, _) => upload(ctx, user, req).await,
        (FileOp::Get, Some(fid)) => {
            let f = readable(ctx, user, fid).await?;
            Ok(json(200, &serde_json::json!({ "file": f })))
        }
        (FileOp::Content, Some(fid)) => {
            let f = readable(ctx, user, fid).await?;
            content(ctx, &f, &req).await
        }
        (FileOp::Url, Some(fid)) => {
            readable(ctx, user, fid).await?;
            let expires = token_now() + ctx.shared.config.file_url_ttl_s;
            let url = ctx.shared.files.signer.link(fid, expires);
            let at = chorus_engine::view::rfc3339(expires * 1_000_000);
            Ok(json(
                200,
                &serde_json::json!({ "url": url, "expires_at": at }),
            ))
        }
        (FileOp::Delete, Some(fid)) => delete(ctx, user, fid).await,
        (FileOp::Preview, Some(fid)) => {
            let f = readable(ctx, user, fid).await?;
            preview(ctx, &f, kind.unwrap_or(""), &req).await
        }
        (_, None) => unreachable!("every other files route names a file"),
    }
}

/// The file if `user` may read it: its uploader, and every user who can read a message
/// (not deleted) that carries it. Anyone else, and everyone for a deleted, unknown or
/// foreign file, gets the same 404.
async fn readable(ctx: &ShardCtx, user: UserId, fid: FileId) -> Result<FileView, ApiError> {
    // A file recorded or deleted through another node is seen at once.
    ctx.shared.directory_current().await;
    readable_now(ctx, user, fid).await
}

/// [`readable`], from what this node's directory holds now.
async fn readable_now(ctx: &ShardCtx, user: UserId, fid: FileId) -> Result<FileView, ApiError> {
    let f = ctx.shared.engine.file(user, fid).await?;
    if f.user_id == user || !ctx.shared.engine.file_channels(user, fid).await?.is_empty() {
        return Ok(f);
    }
    Err(ApiError::not_found("file"))
}

fn json(status: u16, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Full::new(Bytes::from(value.to_string()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

// ---------------------------------------------------------------------------------------
// Upload
// ---------------------------------------------------------------------------------------

/// Streams the form's file into the store, then commits its record; 201 once both are
/// durable.
async fn upload(
    ctx: &ShardCtx,
    user: UserId,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let boundary = upload::boundary(content_type)?;
    let max = ctx.shared.config.file_bytes_max;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max.saturating_add(upload::FORM_OVERHEAD_BYTES_MAX)) {
        return Err(ApiError::too_large(format!(
            "a file is at most {max} bytes"
        )));
    }
    let stream = http_body_util::BodyStream::new(req.into_body()).filter_map(|frame| {
        futures::future::ready(match frame {
            Ok(frame) => frame.into_data().ok().map(Ok),
            Err(e) => Some(Err(e)),
        })
    });
    let mut sink = StoreSink {
        ctx,
        user,
        workspace: None,
        stages: None,
        piece: Vec::new(),
        piece_bytes: 0,
    };
    let form = upload::read_form(stream, &boundary, max, &mut sink).await?;
    let workspace = sink.workspace.expect("the form named its workspace first");
    let finished = sink.finish().await?;
    let sha = finished.sha;
    let store = ctx.shared.files.store.clone();
    let pin = pin_upload(&store, sha).await;
    let publish = store.clone();
    off_shard(move || publish.publish(finished))
        .await
        .map_err(internal)?;
    if peers::copies(ctx) {
        // On a majority of the nodes before the record that names them is committed.
        if let Err(e) = peers::copy_to_majority(ctx, sha, form.size).await {
            drop(pin);
            reclaim(ctx, sha).await;
            return Err(unavailable(e.to_string()));
        }
    }
    let file = chorus_engine::NewFile {
        name: form.name,
        size: form.size,
        content_type: form.content_type,
        sha256: sha,
    };
    let recorded = match record(ctx, user, workspace, file.clone()).await {
        // In a cluster, another node leads the directory: it records the file (its bytes
        // are in the bucket every node reads).
        Err(EngineError::Unavailable(Unavailable::MetaNotLeader { leader: Some(l) })) => {
            record_on(ctx, l, user, workspace, &file).await
        }
        other => other.map_err(ApiError::from),
    };
    match recorded {
        Ok(answer) => Ok(json(201, &answer)),
        Err(e) => {
            // The record was refused (a bad name, say): the bytes may now be unused.
            drop(pin);
            reclaim(ctx, sha).await;
            Err(e)
        }
    }
}

/// The path of the call by which a cluster node that took an upload asks the directory's
/// leader to record the file ([`record_forwarded`]). Only a node of the cluster can call
/// it: it names bytes by their SHA-256 alone, which a client must never be able to do
/// (it would read any file whose hash it knows).
pub const RECORD_PATH: &str = "/internal/v1/files/record";

/// The file's record as [`RECORD_PATH`] carries it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    workspace_id: String,
    name: String,
    size: u64,
    content_type: String,
    sha256: String,
}

/// Commits the file's record here and queues its previews; the answer's body.
async fn record(
    ctx: &ShardCtx,
    user: UserId,
    workspace: WorkspaceId,
    file: chorus_engine::NewFile,
) -> Result<serde_json::Value, EngineError> {
    let f = ctx.shared.engine.store_file(user, workspace, file).await?;
    ctx.shared.files.previews.submit(f.clone());
    Ok(serde_json::json!({ "file": f }))
}

/// Asks `leader`, which leads the directory, to record the file: its answer, or this
/// node's 503 if it cannot be reached.
async fn record_on(
    ctx: &ShardCtx,
    leader: u64,
    user: UserId,
    workspace: WorkspaceId,
    file: &chorus_engine::NewFile,
) -> Result<serde_json::Value, ApiError> {
    let body = Record {
        workspace_id: workspace.to_string(),
        name: file.name.clone(),
        size: file.size,
        content_type: file.content_type.clone(),
        sha256: store::hex(&file.sha256),
    };
    let body = serde_json::to_value(&body).map_err(|e| internal(io::Error::other(e)))?;
    let call = crate::api::AsRest(hyper::Method::POST, RECORD_PATH.to_owned(), body);
    let unreachable = || {
        ApiError::from(EngineError::Unavailable(Unavailable::MetaNotLeader {
            leader: None,
        }))
    };
    let relay = crate::api::Relay::of(ctx).ok_or_else(unreachable)?;
    relay
        .rest(leader, user, call)
        .await
        .ok_or_else(unreachable)?
}

/// Serves [`RECORD_PATH`] for a peer that took an upload: records the file here (this
/// node leads the directory, or answers 503 for the peer's client to try again).
pub(crate) async fn record_forwarded(
    ctx: &ShardCtx,
    user: Option<u64>,
    body: &str,
) -> Result<crate::api::Reply, ApiError> {
    let user = UserId(user.ok_or_else(|| ApiError::unauthorized("a record with no caller"))?);
    let r: Record = serde_json::from_str(body)
        .map_err(|e| ApiError::invalid(format!("a file record that does not parse: {e}")))?;
    let workspace: WorkspaceId = r
        .workspace_id
        .parse()
        .map_err(|_| ApiError::not_found("workspace"))?;
    let sha256 = store::unhex_sha(&r.sha256)
        .ok_or_else(|| ApiError::invalid("a file record with no SHA-256"))?;
    // The previews are made here, from this node's copy.
    peers::ensure_local(ctx, sha256, r.size)
        .await
        .map_err(|e| unavailable(format!("the file's bytes are on no node reached: {e}")))?;
    let file = chorus_engine::NewFile {
        name: r.name,
        size: r.size,
        content_type: r.content_type,
        sha256,
    };
    let answer = record(ctx, user, workspace, file).await?;
    Ok(crate::api::Reply::json(201, &answer))
}

/// Receives the file's bytes: checks the workspace first, then hands them on in pieces
/// of [`UPLOAD_FLUSH_BYTES`] to two stages on the blocking pool, one writing the
/// temporary file and one hashing, each its own task taking pieces in order from a
/// queue of [`PIECES_QUEUED`]. The shard reads the next piece from the socket meanwhile,
/// and waits only when a stage's queue is full: reading, writing and hashing overlap, and
/// neither the writer nor the hasher waits for the other, so an upload takes about as
/// long as its slowest stage. (In lockstep, each piece waiting for both before the next
/// began, every piece took as long as the slower of the two on that piece; on the
/// project's virtual disk, writing and hashing a 2 MiB piece each take about 1.2 ms.) A
/// piece is the body's own chunks (`Bytes` that share the parser's buffers), never
/// copied on the shard.
struct StoreSink<'a> {
    ctx: &'a ShardCtx,
    user: UserId,
    workspace: Option<WorkspaceId>,
    /// The two stages, once the upload has begun.
    stages: Option<Stages>,
    /// The next piece's chunks, and their bytes.
    piece: Vec<Bytes>,
    piece_bytes: usize,
}

/// Pieces a stage holds besides the one it is working on. With two stages and one piece
/// being read, an upload holds at most `2 × (PIECES_QUEUED + 1) + 1` pieces' bytes (some
/// shared by both stages).
const PIECES_QUEUED: usize = 1;

/// An upload's writing and hashing tasks, fed through their queues.
struct Stages {
    to_writer: LocalSender<Vec<Bytes>>,
    to_hasher: LocalSender<Vec<Bytes>>,
    writer: glommio::task::JoinHandle<io::Result<PendingBytes>>,
    hasher: glommio::task::JoinHandle<PendingHash>,
}

impl Stages {
    fn start(pending: Pending) -> Stages {
        let (bytes, hash) = pending.split();
        let (to_writer, writes) = local_channel::new_bounded::<Vec<Bytes>>(PIECES_QUEUED);
        let (to_hasher, hashes) = local_channel::new_bounded::<Vec<Bytes>>(PIECES_QUEUED);
        let writer = glommio::spawn_local(async move {
            let mut bytes = bytes;
            while let Some(piece) = writes.recv().await {
                bytes = off_shard(move || {
                    bytes.write_chunks(&piece)?;
                    io::Result::Ok(bytes)
                })
                .await?;
            }
            Ok(bytes)
        });
        let hasher = glommio::spawn_local(async move {
            let mut hash = hash;
            while let Some(piece) = hashes.recv().await {
                hash = off_shard(move || {
                    hash.update_chunks(&piece);
                    hash
                })
                .await;
            }
            hash
        });
        Stages {
            to_writer,
            to_hasher,
            writer: writer.detach(),
            hasher: hasher.detach(),
        }
    }

    /// Queues a piece for both stages, waiting while a queue is full. A stage that has
    /// stopped (its write failed) refuses it, and [`Stages::finish`] tells why.
    async fn send(&self, piece: Vec<Bytes>) -> Result<(), ()> {
        self.to_hasher.send(piece.clone()).await.map_err(drop)?;
        self.to_writer.send(piece).await.map_err(drop)
    }

    /// Closes the queues and waits for both stages: the upload, every piece written and
    /// hashed.
    async fn finish(self) -> Result<Pending, ApiError> {
        let Stages {
            to_writer,
            to_hasher,
            writer,
            hasher,
        } = self;
        drop((to_writer, to_hasher));
        let cancelled = || internal(io::Error::other("an upload task was cancelled"));
        let bytes = writer.await.ok_or_else(cancelled)?.map_err(internal)?;
        let hash = hasher.await.ok_or_else(cancelled)?;
        Pending::join(bytes, hash).map_err(internal)
    }
}

impl StoreSink<'_> {
    /// Queues the piece read so far.
    async fn flush(&mut self) -> Result<(), ApiError> {
        let piece = std::mem::take(&mut self.piece);
        self.piece_bytes = 0;
        let stages = self.stages.as_ref().expect("the upload has begun");
        if stages.send(piece).await.is_err() {
            // A stage stopped: its error is the upload's.
            let stages = self.stages.take().expect("the upload has begun");
            stages.finish().await?;
            return Err(internal(io::Error::other("an upload stage stopped")));
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<store::Finished, ApiError> {
        if !self.piece.is_empty() {
            self.flush().await?;
        }
        let stages = self.stages.take().expect("the upload has begun");
        let pending = stages.finish().await?;
        off_shard(move || pending.finish()).await.map_err(internal)
    }
}

impl upload::Sink for StoreSink<'_> {
    async fn workspace(&mut self, workspace_id: &str) -> Result<(), ApiError> {
        if self.workspace.is_some() {
            return Err(ApiError::invalid("workspace_id is given twice"));
        }
        let wid: WorkspaceId = workspace_id
            .parse()
            .map_err(|_| ApiError::not_found("workspace"))?;
        self.ctx.shared.engine.check_member(self.user, wid).await?;
        let store = self.ctx.shared.files.store.clone();
        let pending = off_shard(move || store.begin()).await.map_err(internal)?;
        self.stages = Some(Stages::start(pending));
        self.workspace = Some(wid);
        Ok(())
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), ApiError> {
        self.piece_bytes += chunk.len();
        self.piece.push(chunk);
        if self.piece_bytes >= UPLOAD_FLUSH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }
}

/// An upload's pin on its bytes, released when dropped (also when the request is dropped
/// half way).
pub(crate) struct PinGuard {
    store: Arc<FileStore>,
    sha: store::Sha256,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.store.pins.unpin_upload(&self.sha);
    }
}

pub(crate) async fn pin_upload(store: &Arc<FileStore>, sha: store::Sha256) -> PinGuard {
    while !store.pins.pin_upload(&sha) {
        glommio::timer::sleep(PIN_RETRY).await;
    }
    PinGuard {
        store: store.clone(),
        sha,
    }
}

/// Removes the bytes with this SHA-256 if no live file has them and no upload holds them.
/// Failures are logged: the bytes then stay, unused, which loses nothing.
async fn reclaim(ctx: &ShardCtx, sha: store::Sha256) {
    reclaim_if(ctx, sha, None).await;
}

/// [`reclaim`], and only bytes last stored before `before` when it is given; whether they
/// were removed.
pub(crate) async fn reclaim_if(
    ctx: &ShardCtx,
    sha: store::Sha256,
    before: Option<std::time::SystemTime>,
) -> bool {
    let store = ctx.shared.files.store.clone();
    if !store.pins.mark_removing(&sha) {
        return false;
    }
    let in_use = ctx.shared.engine.file_bytes_in_use(sha).await;
    let mut removed = false;
    if let Ok(false) = in_use {
        let remover = store.clone();
        let removal = off_shard(move || match before {
            None => remover.remove(&sha).map(|()| true),
            Some(before) => remover.remove_if_stored_before(&sha, before),
        });
        match removal.await {
            Ok(r) => removed = r,
            Err(e) => {
                tracing::warn!(error = %e, sha = %store::hex(&sha), "could not remove a file's bytes")
            }
        }
    }
    store.pins.unmark_removing(&sha);
    removed
}

/// A 503 for the client to try again: the nodes that hold, or must hold, a file's bytes
/// cannot be reached now.
fn unavailable(why: String) -> ApiError {
    tracing::warn!(why, "a file's bytes could not be copied or fetched");
    ApiError {
        retry_after: Some(Duration::from_secs(1)),
        ..ApiError::unavailable(why)
    }
}

fn internal(e: io::Error) -> ApiError {
    tracing::error!(error = %e, "file store I/O failed");
    ApiError::new(500, "internal", "internal error")
}

// ---------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------

/// `expires` and `sig` of a signed link's query, when both are there.
fn signed(query: Option<&str>) -> Option<(String, String)> {
    let (mut expires, mut sig) = (None, None);
    for pair in query?.split('&') {
        match pair.split_once('=') {
            Some(("expires", v)) => expires = Some(v.to_owned()),
            Some(("sig", v)) => sig = Some(v.to_owned()),
            _ => {}
        }
    }
    Some((expires?, sig?))
}

/// Content through a signed link: 403 for a tampered or expired link, 404 for a file
/// deleted since.
async fn signed_content(
    ctx: &ShardCtx,
    fid: FileId,
    expires: &str,
    sig: &str,
    req: &Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    ctx.shared
        .files
        .signer
        .check(fid, expires, sig, token_now())
        .map_err(|e| match e {
            link::LinkError::Tampered => ApiError::new(403, "invalid_link", e.to_string()),
            link::LinkError::Expired => ApiError::new(403, "link_expired", e.to_string()),
        })?;
    ctx.shared.directory_current().await;
    let f = ctx.shared.engine.linked_file(fid).await?;
    content(ctx, &f, req).await
}

/// A byte range of a file, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// The first byte.
    pub start: u64,
    /// The last byte.
    pub end: u64,
}

/// What a `Range` header asks of a file of `len` bytes: `Ok(None)` for the whole file
/// (no header, another unit, several ranges, or a header that does not parse, which
/// RFC 9110 §14.2 lets a server ignore), `Err(())` when nothing of it can be served (416).
#[allow(clippy::result_unit_err)]
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<ByteRange>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        // The last n bytes.
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || len == 0 {
            return Err(());
        }
        ByteRange {
            start: len.saturating_sub(n),
            end: len - 1,
        }
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            u64::MAX
        } else {
            match b.parse::<u64>() {
                Ok(end) if end >= start => end,
                _ => return Ok(None),
            }
        };
        if start >= len {
            return Err(());
        }
        ByteRange {
            start,
            end: end.min(len - 1),
        }
    };
    Ok(Some(range))
}

/// The file's bytes, whole or the range asked for, with the headers that keep a browser
/// from running them.
async fn content(
    ctx: &ShardCtx,
    f: &FileView,
    req: &Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let served = Served {
        sha: f.sha256,
        size: f.size,
        content_type: &f.content_type,
        disposition: disposition(&f.name, &f.content_type),
    };
    serve_bytes(ctx, served, req).await
}

/// Stored bytes to serve, and how.
struct Served<'a> {
    sha: store::Sha256,
    size: u64,
    content_type: &'a str,
    disposition: String,
}

/// Serves stored bytes, whole or the range asked for, with an ETag of their SHA-256.
async fn serve_bytes(
    ctx: &ShardCtx,
    f: Served<'_>,
    req: &Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let etag = format!("\"{}\"", store::hex(&f.sha));
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "sandbox; default-src 'none'",
        )
        .header(header::CACHE_CONTROL, "private, no-cache")
        .header(header::CONTENT_DISPOSITION, &f.disposition);
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if not_modified {
        return Ok(builder
            .status(304)
            .body(full(Full::default()))
            .expect("valid response"));
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    if peers::copies(ctx) {
        // A node that was away when the bytes were stored fetches them now.
        peers::ensure_local(ctx, f.sha, f.size)
            .await
            .map_err(|e| unavailable(format!("the file's bytes are on no node reached: {e}")))?;
    }
    let range = match parse_range(range, f.size) {
        Ok(r) => r,
        Err(()) => {
            let mut e = boxed(
                ApiError::new(
                    416,
                    "range_not_satisfiable",
                    "the range is outside the file",
                )
                .response(),
            );
            let v = HeaderValue::from_str(&format!("bytes */{}", f.size)).expect("ascii");
            e.headers_mut().insert(header::CONTENT_RANGE, v);
            return Ok(e);
        }
    };
    let (status, start, len) = match range {
        Some(r) => {
            builder = builder.header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{}", r.start, r.end, f.size),
            );
            (206, r.start, r.end - r.start + 1)
        }
        None => (200, 0, f.size),
    };
    let store = ctx.shared.files.store.clone();
    let (sha, size) = (f.sha, f.size);
    let file = off_shard(move || store.open_bytes(&sha, size))
        .await
        .map_err(internal)?;
    Ok(builder
        .status(status)
        .header(header::CONTENT_TYPE, f.content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(stream_file(
            ctx.shared.files.store.clone(),
            file,
            start,
            len,
        ))
        .expect("valid response"))
}

/// `inline` for a raster image a browser shows, `attachment` for everything else; the
/// name goes in RFC 8187 form, with an ASCII fallback.
fn disposition(name: &str, content_type: &str) -> String {
    let kind = if upload::INLINE_TYPES.contains(&content_type) {
        "inline"
    } else {
        "attachment"
    };
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// A file's preview of `kind`: the bytes once made, 202 with `Retry-After` while it is
/// being made, 404 `no_preview` when there will be none (a kind the file cannot have, or a
/// worker that refused or crashed).
async fn preview(
    ctx: &ShardCtx,
    f: &FileView,
    kind: &str,
    req: &Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let none = || ApiError::new(404, "no_preview", format!("the file has no {kind} preview"));
    if preview::kind_for(&f.content_type) != Some(kind) {
        return Err(none());
    }
    let Some(record) = f.preview(kind) else {
        let mut r = json(202, &serde_json::json!({ "preview": "pending" }));
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(r);
    };
    let made = record.made.as_ref().ok_or_else(none)?;
    let name = format!("{}.{kind}", f.name);
    let served = Served {
        sha: made.sha256,
        size: made.size,
        content_type: &made.content_type,
        disposition: disposition(&name, &made.content_type),
    };
    serve_bytes(ctx, served, req).await
}

/// Streams `len` bytes of `file` from `offset`, one blocking read of at most
/// [`READ_CHUNK_BYTES`] at a time, as the connection takes them.
fn stream_file(store: Arc<FileStore>, file: store::Source, offset: u64, len: u64) -> Body {
    let file = Arc::new(file);
    let chunks = futures::stream::unfold((file, offset, len), move |(file, at, left)| {
        let store = store.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(READ_CHUNK_BYTES as u64) as usize;
            let reader = file.clone();
            let read = off_shard(move || store.read_at(&reader, at, n).map(Bytes::from)).await;
            // After a failed read the response ends there: the client sees a short body.
            let left = if read.is_ok() { left - n as u64 } else { 0 };
            Some((read, (file, at + n as u64, left)))
        }
    });
    Body::Stream(Box::pin(chunks), len)
}

// ---------------------------------------------------------------------------------------
// Delete
// ---------------------------------------------------------------------------------------

/// Deletes a file: from the answer on, its content and links are 404; its bytes go once no
/// other live file has them.
async fn delete(ctx: &ShardCtx, user: UserId, fid: FileId) -> Result<Response<Body>, ApiError> {
    delete_file(ctx, user, fid, true).await?;
    let mut r = Response::new(full(Full::default()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

/// The path of the call by which a cluster node that took a deletion asks the directory's
/// leader to decide it ([`delete_forwarded`]): `{"file_id"}`, by the caller.
pub const DELETE_PATH: &str = "/internal/v1/files/delete";

/// Deletes the file here; on a cluster node that does not lead the directory (and
/// `may_forward`), the leader decides it through [`DELETE_PATH`]. The bytes here go at
/// once when this node decides, else with its next sweep (`sweep`).
async fn delete_file(
    ctx: &ShardCtx,
    user: UserId,
    fid: FileId,
    may_forward: bool,
) -> Result<(), ApiError> {
    let may_read = readable(ctx, user, fid).await.is_ok();
    let deleted = match ctx.shared.engine.delete_file(user, fid).await {
        Ok(f) => f,
        // A member who cannot read the file must not learn that it exists.
        Err(EngineError::Domain(chorus_engine::domain::DomainError::Forbidden(_))) if !may_read => {
            return Err(ApiError::not_found("file"))
        }
        Err(EngineError::Unavailable(Unavailable::MetaNotLeader { leader: Some(l) }))
            if may_forward =>
        {
            let body = serde_json::json!({ "file_id": fid.to_string() });
            let call = crate::api::AsRest(hyper::Method::POST, DELETE_PATH.to_owned(), body);
            let unreachable = || {
                ApiError::from(EngineError::Unavailable(Unavailable::MetaNotLeader {
                    leader: None,
                }))
            };
            let relay = crate::api::Relay::of(ctx).ok_or_else(unreachable)?;
            return relay
                .rest(l, user, call)
                .await
                .ok_or_else(unreachable)?
                .map(drop);
        }
        Err(e) => return Err(e.into()),
    };
    reclaim(ctx, deleted.sha256).await;
    for made in deleted.previews.iter().filter_map(|p| p.made.as_ref()) {
        reclaim(ctx, made.sha256).await;
    }
    Ok(())
}

/// Serves [`DELETE_PATH`] for a peer that took a deletion: decides it here (this node
/// leads the directory, or answers 503 for the peer's client to try again).
pub(crate) async fn delete_forwarded(
    ctx: &ShardCtx,
    user: Option<u64>,
    body: &str,
) -> Result<crate::api::Reply, ApiError> {
    let user = UserId(user.ok_or_else(|| ApiError::unauthorized("a deletion with no caller"))?);
    let v: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| ApiError::invalid(format!("a deletion that does not parse: {e}")))?;
    let fid: FileId = v["file_id"]
        .as_str()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| ApiError::invalid("a deletion without a file"))?;
    delete_file(ctx, user, fid, false).await?;
    Ok(crate::api::Reply::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Range headers: one range in any of its three forms, clamped to the file; 416 only
    // when nothing of the file is asked for; the whole file for what cannot be read.
    #[test]
    fn ranges() {
        let r = |s, e| Ok(Some(ByteRange { start: s, end: e }));
        assert_eq!(parse_range(Some("bytes=0-9"), 100), r(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), r(90, 99));
        assert_eq!(parse_range(Some("bytes=90-1000"), 100), r(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), r(90, 99));
        assert_eq!(parse_range(Some("bytes=-1000"), 100), r(0, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=0-"), 0), Err(()));
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-2"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=x-1"), 100), Ok(None));
    }
}

//! The search calls of `API.md` §12: messages, files and people.
//!
//! The caller's readable set comes from the engine (`Engine::channels`: their channels and
//! the workspace's public ones, and 404 for a workspace they are not in) and is handed to
//! the index as part of the query (see `chorus_search::search`); files narrow it to the
//! caller's own channels, as the files API does. The tantivy search runs
//! on the shard's blocking pool, so a long query never stalls the shard's other
//! connections; so do a file's snippet and highlights. Each hit is then read from the
//! engine as it stands, which also renders it exactly as every other call does: a message
//! deleted, or a file deleted or no longer shared with the caller, since the index's last
//! commit is left out of the page.

use super::{encode_cursor, Call, Reply};
use crate::error::ApiError;
use chorus_engine::view::{FileView, MessageView};
use chorus_engine::EngineError;
use chorus_search::highlight::Snippet;
use chorus_search::search::{Scope, Sort, LIMIT_DEFAULT, LIMIT_MAX, OFFSET_MAX};
use serde::Serialize;

#[derive(Serialize)]
struct MessageHit {
    message: MessageView,
    highlights: Vec<[usize; 2]>,
}

#[derive(Serialize)]
struct MessageResults {
    results: Vec<MessageHit>,
    next_cursor: Option<String>,
    total: usize,
}

#[derive(Serialize)]
struct FileHit {
    file: FileView,
    /// Into `file.name`.
    highlights: Vec<[usize; 2]>,
    /// A window of the file's text around the first match, or `null` when the text did not
    /// match (or matched past the part a snippet is looked for in).
    snippet: Option<Snippet>,
}

#[derive(Serialize)]
struct FileResults {
    results: Vec<FileHit>,
    next_cursor: Option<String>,
    total: usize,
}

#[derive(Serialize)]
struct Person<'a> {
    id: chorus_engine::ids::UserId,
    email: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct People<'a> {
    users: Vec<Person<'a>>,
    next_cursor: Option<String>,
}

/// `limit` (1 to 100, default 20) and the offset the cursor names.
fn page(call: &Call<'_>) -> Result<(usize, usize), ApiError> {
    let limit = call.limit_within(LIMIT_DEFAULT, LIMIT_MAX)?;
    let offset = call.cursor("cursor")?.unwrap_or(0);
    if offset > OFFSET_MAX as u64 {
        return Err(ApiError::invalid(format!(
            "results are paged up to the {OFFSET_MAX}th; narrow the query"
        )));
    }
    Ok((limit, offset as usize))
}

fn next_cursor(offset: usize, limit: usize, total: usize) -> Option<String> {
    (offset + limit < total).then(|| encode_cursor((offset + limit) as u64))
}

/// `GET /workspaces/{wid}/search/messages`.
pub(super) async fn messages(call: &Call<'_>) -> Result<Reply, ApiError> {
    let workspace = call.workspace()?;
    let q = call.query("q")?.unwrap_or_default();
    let parsed = chorus_search::query::parse(&q).map_err(|e| ApiError::invalid(e.to_string()))?;
    let (limit, offset) = page(call)?;
    let sort = match call.query("sort")?.as_deref() {
        None | Some("relevance") => Sort::Relevance,
        Some("newest") => Sort::Newest,
        Some(_) => return Err(ApiError::invalid("sort must be relevance or newest")),
    };
    let user = call.user();
    let scope = scope(call, workspace, Readers::Messages).await?;
    let search = call.ctx.shared.search.clone();
    let query = parsed.clone();
    let hits = off_shard(&q, move || {
        chorus_search::search::run(&search.live(), &query, &scope, sort, offset, limit)
    })
    .await?;
    let mut results = Vec::with_capacity(hits.ids.len());
    for id in hits.ids {
        match call.engine().found_message(user, id).await {
            // Deleted or left since the index last committed: not the caller's to see.
            Ok(m) if m.deleted => {}
            Err(EngineError::Domain(_)) => {}
            Ok(message) => {
                let highlights = chorus_search::highlight::highlights(&parsed, &message.text);
                results.push(MessageHit {
                    message,
                    highlights,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    let body = MessageResults {
        results,
        next_cursor: next_cursor(offset, limit, hits.total),
        total: hits.total,
    };
    Ok(Reply::json(200, &body))
}

/// Whose rule a search's readable channels follow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Readers {
    /// `API.md` §12: the caller's channels and every public channel of the workspace.
    Messages,
    /// `API.md` §11: the channels the caller is in (and, in the query, their own uploads).
    Files,
}

/// The caller's readable set in the workspace; 404 for a workspace they are not in. The
/// hits are read by the same rule, so `total` counts only what a page can show.
async fn scope(
    call: &Call<'_>,
    workspace: chorus_engine::ids::WorkspaceId,
    readers: Readers,
) -> Result<Scope, ApiError> {
    let user = call.user();
    let channels = call.engine().channels(user, workspace).await?;
    // A workspace's list carries the caller's read state, whose marker only a member has.
    let member =
        |c: &chorus_engine::view::ChannelView| c.read.is_some_and(|r| r.read_seq.is_some());
    Ok(Scope {
        user,
        workspace,
        channels: channels
            .into_iter()
            .filter(|c| readers == Readers::Messages || member(c))
            .map(|c| (c.id, c.name))
            .collect(),
    })
}

/// Runs a search on the shard's blocking pool. A panic inside the index library must
/// answer this request (503), not leave it waiting for a blocking thread that died.
async fn off_shard<T: Send + 'static>(
    q: &str,
    search: impl FnOnce() -> Result<T, chorus_search::search::SearchError> + Send + 'static,
) -> Result<T, ApiError> {
    let ran = glommio::executor()
        .spawn_blocking(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(search)))
        .await;
    match ran {
        Ok(Ok(hits)) => Ok(hits),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "search failed");
            Err(ApiError::unavailable("search is unavailable; try again"))
        }
        Err(_) => {
            tracing::error!(q = %q, "search panicked");
            Err(ApiError::unavailable("search failed on this query"))
        }
    }
}

/// `GET /workspaces/{wid}/search/files`.
pub(super) async fn files(call: &Call<'_>) -> Result<Reply, ApiError> {
    let workspace = call.workspace()?;
    let q = call.query("q")?.unwrap_or_default();
    let parsed =
        chorus_search::query::parse_files(&q).map_err(|e| ApiError::invalid(e.to_string()))?;
    let (limit, offset) = page(call)?;
    let scope = scope(call, workspace, Readers::Files).await?;
    let search = call.ctx.shared.search.clone();
    let query = parsed.clone();
    let found = off_shard(&q, move || {
        let found =
            chorus_search::search::run_files(&search.live(), &query, &scope, offset, limit)?;
        let hits: Vec<_> = found
            .hits
            .into_iter()
            .map(|h| (h.id, chorus_search::highlight::snippet(&query, &h.text)))
            .collect();
        Ok((hits, found.total))
    })
    .await?;
    let (hits, total) = found;
    // The files API's read rule, as it stands now: the index's clause may be one commit
    // behind a deletion or an unshare.
    let checks = hits.iter().map(|(id, _)| readable_file(call, *id));
    let files = futures::future::join_all(checks).await;
    let mut results = Vec::with_capacity(hits.len());
    for ((_, snippet), file) in hits.into_iter().zip(files) {
        let Some(file) = file? else { continue };
        let highlights = chorus_search::highlight::highlights(&parsed, &file.name);
        results.push(FileHit {
            file,
            highlights,
            snippet,
        });
    }
    let body = FileResults {
        results,
        next_cursor: next_cursor(offset, limit, total),
        total,
    };
    Ok(Reply::json(200, &body))
}

/// The file if the caller may read it now (`API.md` §11: its uploader, or a reader of a
/// channel where a live message carries it); `None` when not, or when it is deleted.
async fn readable_file(
    call: &Call<'_>,
    id: chorus_engine::ids::FileId,
) -> Result<Option<FileView>, ApiError> {
    let user = call.user();
    let file = match call.engine().file(user, id).await {
        Ok(f) => f,
        Err(EngineError::Domain(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if file.user_id == user || !call.engine().file_channels(user, id).await?.is_empty() {
        return Ok(Some(file));
    }
    Ok(None)
}

/// `GET /workspaces/{wid}/search/users`.
pub(super) async fn users(call: &Call<'_>) -> Result<Reply, ApiError> {
    let workspace = call.workspace()?;
    let q = call.query("q")?.unwrap_or_default();
    if q.chars().count() > chorus_search::query::QUERY_CHARS_MAX {
        return Err(ApiError::invalid(format!(
            "q is over {} characters",
            chorus_search::query::QUERY_CHARS_MAX
        )));
    }
    let (limit, offset) = page(call)?;
    let words = chorus_search::people::query_words(&q);
    let mut members = call.engine().members(call.user(), workspace).await?;
    members.retain(|m| chorus_search::people::matches(&words, &m.name, &m.email));
    members.sort_by_key(|m| (m.name.to_lowercase(), m.id));
    let total = members.len();
    let users = members
        .iter()
        .skip(offset)
        .take(limit)
        .map(|m| Person {
            id: m.id,
            email: &m.email,
            name: &m.name,
        })
        .collect();
    let body = People {
        users,
        next_cursor: next_cursor(offset, limit, total),
    };
    Ok(Reply::json(200, &body))
}

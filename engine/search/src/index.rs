//! The index on disk: its schema, its documents, and opening it (or starting it over when
//! it is missing or does not open).
//!
//! **One index for every workspace.** A message's workspace is a field, and every query
//! is filtered by it (see [`crate::search`]). An index per workspace would hold a writer,
//! its files and its memory arena per workspace: 10,000 workspaces would need tens of
//! thousands of file handles and gigabytes of writer arenas, most of them idle. One index
//! has one writer, one reader and a bounded number of segments (tantivy's merge policy),
//! whatever the number of workspaces.
//!
//! **Index format, version 3** ([`INDEX_FORMAT_VERSION`]): the schema of [`Fields`], the
//! tokenizers of [`crate::text`] registered as `chorus_words` and `chorus_cjk`, and the
//! commit payload [`Payload`] (JSON) holding the cursor of every partition and of the
//! metadata log. Two kinds of document share the index, told apart by the `kind` field:
//! messages ([`MessageDoc`]) and files ([`FileDoc`]). Version 2 added the `flags` field (a
//! message posted with files keeps `has:file` through the rewrites of its edits and
//! reactions); version 3 added files (their name, text, uploader and the channels where a
//! live message shares them) and a message's file IDs. An index of an older version, or of
//! another schema, is rebuilt from the logs.

use crate::text::{CjkTokenizer, WordTokenizer};
use chorus_engine::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, INDEXED, STORED,
    STRING,
};
use tantivy::{Index, IndexReader, ReloadPolicy, TantivyDocument, Term};

/// The index format written by this code.
pub const INDEX_FORMAT_VERSION: u32 = 3;
const WORD_TOKENIZER: &str = "chorus_words";
const CJK_TOKENIZER: &str = "chorus_cjk";

/// The `flags` value of a message with at least one reaction.
pub const FLAG_REACTION: &str = "reaction";
/// The `flags` value of a thread reply.
pub const FLAG_REPLY: &str = "reply";
/// The `flags` value of a message posted with files.
pub const FLAG_FILE: &str = "file";
/// The `flags` value of a file whose text is still to be extracted.
pub const FLAG_TEXT_PENDING: &str = "text_pending";

/// The `kind` of a message document.
pub const KIND_MESSAGE: &str = "message";
/// The `kind` of a file document whose upload the index has seen.
pub const KIND_FILE: &str = "file";
/// The `kind` of a file document that only knows where the file is shared: the channel
/// partition that shares it was indexed before the metadata log's `FileStored`. It
/// matches no search until the upload's record makes it a [`KIND_FILE`].
pub const KIND_FILE_PARTIAL: &str = "file_partial";

/// The fields of the index's documents. A message uses the ones it needs and so does a
/// file; `kind` tells them apart, and every query requires one kind.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// The message ID (`M…`) or file ID (`F…`), the key rewrites and deletions replace by.
    pub id: Field,
    /// [`KIND_MESSAGE`], [`KIND_FILE`] or [`KIND_FILE_PARTIAL`].
    pub kind: Field,
    /// The workspace, as its number.
    pub workspace: Field,
    /// The channel, as its number: a message's one, or every channel where a live message
    /// shares a file (who besides its uploader may read it).
    pub channel: Field,
    /// The message's seq.
    pub seq: Field,
    /// The author, or a file's uploader.
    pub user: Field,
    /// Creation time, microseconds since the epoch (fast: `sort=newest`).
    pub at_us: Field,
    /// The thread root's seq, 0 for a top-level message.
    pub thread: Field,
    /// Reactions (emoji and user pairs) on it now.
    pub reactions: Field,
    /// `reaction`, `reply`, `file`: what `has:` and `is:` filter on; `text_pending` on a
    /// file whose text is still to be extracted.
    pub flags: Field,
    /// The text as words ([`crate::text::words`]), with positions for phrases: a message's
    /// text, or a file's extracted text.
    pub text: Field,
    /// The text's CJK bigrams ([`crate::text::cjk_terms`]), with positions.
    pub cjk: Field,
    /// A message's file IDs (stored only: a deletion takes back the files' shares).
    pub files: Field,
    /// A file's name as words, with positions.
    pub name: Field,
    /// A file's name as CJK bigrams.
    pub name_cjk: Field,
    /// A file's media type (stored only).
    pub content_type: Field,
    /// A file's length in bytes (stored only).
    pub size: Field,
    /// A file's SHA-256 (stored only: the extractor reads the bytes by it).
    pub sha256: Field,
    /// The messages that share a file, `channel.seq` (stored only).
    pub shares: Field,
}

impl Fields {
    fn schema() -> (Schema, Fields) {
        let mut b = Schema::builder();
        let words = TextOptions::default().set_stored().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(WORD_TOKENIZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let cjk = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(CJK_TOKENIZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let fields = Fields {
            id: b.add_text_field("id", STRING | STORED),
            kind: b.add_text_field("kind", STRING),
            workspace: b.add_u64_field("workspace", INDEXED | STORED),
            channel: b.add_u64_field("channel", INDEXED | STORED),
            seq: b.add_u64_field("seq", STORED),
            user: b.add_u64_field("user", INDEXED | STORED),
            at_us: b.add_i64_field("at_us", INDEXED | FAST | STORED),
            thread: b.add_u64_field("thread", STORED),
            reactions: b.add_u64_field("reactions", STORED),
            flags: b.add_text_field("flags", STRING | STORED),
            text: b.add_text_field("text", words.clone()),
            cjk: b.add_text_field("cjk", cjk.clone()),
            files: b.add_text_field("files", STORED),
            name: b.add_text_field("name", words),
            name_cjk: b.add_text_field("name_cjk", cjk),
            content_type: b.add_text_field("content_type", STORED),
            size: b.add_u64_field("size", STORED),
            sha256: b.add_bytes_field("sha256", STORED),
            shares: b.add_text_field("shares", STORED),
        };
        (b.build(), fields)
    }

    /// The term that names one message.
    pub fn id_term(&self, id: MessageId) -> Term {
        Term::from_field_text(self.id, &id.to_string())
    }

    /// The term that names one file.
    pub fn file_term(&self, id: FileId) -> Term {
        Term::from_field_text(self.id, &id.to_string())
    }

    /// The term of a document kind.
    pub fn kind_term(&self, kind: &str) -> Term {
        Term::from_field_text(self.kind, kind)
    }
}

/// A message as the index holds it: everything needed to write its document again when
/// an edit or a reaction changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageDoc {
    /// Its workspace.
    pub workspace: WorkspaceId,
    /// Its ID (channel and seq).
    pub id: MessageId,
    /// Its author.
    pub user: UserId,
    /// Creation time, microseconds since the epoch.
    pub at_us: i64,
    /// The thread root's seq, for a reply.
    pub thread: Option<u64>,
    /// Reactions on it now.
    pub reactions: u64,
    /// Its text now.
    pub text: String,
    /// The files it was posted with (`has:file`; a deletion unshares them).
    pub files: Vec<FileId>,
}

impl MessageDoc {
    /// The tantivy document.
    pub fn to_document(&self, f: &Fields) -> TantivyDocument {
        let mut d = TantivyDocument::new();
        d.add_text(f.id, self.id.to_string());
        d.add_text(f.kind, KIND_MESSAGE);
        d.add_u64(f.workspace, self.workspace.0);
        d.add_u64(f.channel, self.id.channel.0);
        d.add_u64(f.seq, self.id.seq);
        d.add_u64(f.user, self.user.0);
        d.add_i64(f.at_us, self.at_us);
        d.add_u64(f.thread, self.thread.unwrap_or(0));
        d.add_u64(f.reactions, self.reactions);
        if self.reactions > 0 {
            d.add_text(f.flags, FLAG_REACTION);
        }
        if self.thread.is_some() {
            d.add_text(f.flags, FLAG_REPLY);
        }
        if !self.files.is_empty() {
            d.add_text(f.flags, FLAG_FILE);
        }
        for file in &self.files {
            d.add_text(f.files, file.to_string());
        }
        d.add_text(f.text, &self.text);
        d.add_text(f.cjk, &self.text);
        d
    }

    /// Reads a stored document back; `None` if a field is missing (not a document of this
    /// format).
    pub fn from_document(
        d: &TantivyDocument,
        f: &Fields,
        workspace: WorkspaceId,
    ) -> Option<MessageDoc> {
        let u = |field| d.get_first(field).and_then(|v| v.as_u64());
        let thread = u(f.thread)?;
        Some(MessageDoc {
            workspace,
            id: MessageId {
                channel: ChannelId(u(f.channel)?),
                seq: u(f.seq)?,
            },
            user: UserId(u(f.user)?),
            at_us: d.get_first(f.at_us).and_then(|v| v.as_i64())?,
            thread: (thread != 0).then_some(thread),
            reactions: u(f.reactions)?,
            text: d.get_first(f.text).and_then(|v| v.as_str())?.to_owned(),
            files: d
                .get_all(f.files)
                .map(|v| v.as_str().and_then(|s| s.parse().ok()))
                .collect::<Option<Vec<FileId>>>()?,
        })
    }
}

/// What the upload's record (`FileStored`) says of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// The uploader.
    pub user: UserId,
    /// The name as given.
    pub name: String,
    /// Its media type.
    pub content_type: String,
    /// Its length in bytes.
    pub size: u64,
    /// The SHA-256 of its bytes: their address in the file store.
    pub sha256: [u8; 32],
    /// When it was uploaded, microseconds since the epoch.
    pub at_us: i64,
}

/// A file as the index holds it. Its document is written again whole whenever its
/// record, its shares or its text change, so everything is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDoc {
    /// The file.
    pub id: FileId,
    /// Its workspace.
    pub workspace: WorkspaceId,
    /// Its record; `None` while only its shares are known (see [`KIND_FILE_PARTIAL`]).
    pub meta: Option<FileMeta>,
    /// The live messages that carry it, `(channel, seq)`: its readers besides the uploader
    /// are the members of these channels.
    pub shares: BTreeSet<(ChannelId, u64)>,
    /// Its extracted text (at most [`crate::extract::TEXT_BYTES_MAX`] bytes; empty for a
    /// file without text).
    pub text: String,
    /// Whether its text is still to be extracted.
    pub text_pending: bool,
}

impl FileDoc {
    /// A file known only by a share, before its record is indexed.
    pub fn partial(id: FileId, workspace: WorkspaceId) -> FileDoc {
        FileDoc {
            id,
            workspace,
            meta: None,
            shares: BTreeSet::new(),
            text: String::new(),
            text_pending: false,
        }
    }

    /// The tantivy document.
    pub fn to_document(&self, f: &Fields) -> TantivyDocument {
        let mut d = TantivyDocument::new();
        d.add_text(f.id, self.id.to_string());
        let kind = match self.meta {
            Some(_) => KIND_FILE,
            None => KIND_FILE_PARTIAL,
        };
        d.add_text(f.kind, kind);
        d.add_u64(f.workspace, self.workspace.0);
        let channels: BTreeSet<ChannelId> = self.shares.iter().map(|(c, _)| *c).collect();
        for c in channels {
            d.add_u64(f.channel, c.0);
        }
        for (c, seq) in &self.shares {
            d.add_text(f.shares, format!("{}.{seq}", c.0));
        }
        if let Some(m) = &self.meta {
            d.add_u64(f.user, m.user.0);
            d.add_i64(f.at_us, m.at_us);
            d.add_text(f.name, &m.name);
            d.add_text(f.name_cjk, &m.name);
            d.add_text(f.content_type, &m.content_type);
            d.add_u64(f.size, m.size);
            d.add_bytes(f.sha256, &m.sha256[..]);
        }
        if self.text_pending {
            d.add_text(f.flags, FLAG_TEXT_PENDING);
        }
        d.add_text(f.text, &self.text);
        d.add_text(f.cjk, &self.text);
        d
    }

    /// Reads a stored document back; `None` if it is not a file document of this format.
    pub fn from_document(d: &TantivyDocument, f: &Fields) -> Option<FileDoc> {
        let u = |field| d.get_first(field).and_then(|v| v.as_u64());
        let s = |field| d.get_first(field).and_then(|v| v.as_str());
        let id: FileId = s(f.id)?.parse().ok()?;
        let shares = d
            .get_all(f.shares)
            .map(|v| {
                let (c, seq) = v.as_str()?.split_once('.')?;
                Some((ChannelId(c.parse().ok()?), seq.parse().ok()?))
            })
            .collect::<Option<BTreeSet<_>>>()?;
        let meta = match s(f.name) {
            None => None,
            Some(name) => Some(FileMeta {
                user: UserId(u(f.user)?),
                name: name.to_owned(),
                content_type: s(f.content_type)?.to_owned(),
                size: u(f.size)?,
                sha256: d.get_first(f.sha256)?.as_bytes()?.try_into().ok()?,
                at_us: d.get_first(f.at_us).and_then(|v| v.as_i64())?,
            }),
        };
        Some(FileDoc {
            id,
            workspace: WorkspaceId(u(f.workspace)?),
            meta,
            shares,
            text: s(f.text).unwrap_or("").to_owned(),
            text_pending: d
                .get_all(f.flags)
                .any(|v| v.as_str() == Some(FLAG_TEXT_PENDING)),
        })
    }
}

/// What each commit records beside the documents: the log offset to read next, per
/// partition. Index and cursors are one commit, so after a crash they agree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// [`INDEX_FORMAT_VERSION`].
    pub version: u32,
    /// Next offset to index, by partition.
    pub cursors: BTreeMap<u32, u64>,
    /// Next offset to index in the metadata log (files' records).
    #[serde(default)]
    pub meta: u64,
}

/// An open index.
pub struct Opened {
    /// The index.
    pub index: Index,
    /// Its reader: reloaded explicitly after each commit, never on its own.
    pub reader: IndexReader,
    /// The cursors of its last commit.
    pub payload: Payload,
    /// Its fields.
    pub fields: Fields,
    /// Whether it was started over (missing, or it did not open), so everything is
    /// indexed again from the logs.
    pub rebuilt: bool,
}

/// Why an index could not be opened or made.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory could not be made or moved aside.
    #[error("search index directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// tantivy refused to create a new index.
    #[error("search index could not be created: {0}")]
    Create(#[from] tantivy::TantivyError),
}

/// Opens the index at `dir`. One that is missing is created; one that does not open, or
/// is of another format, is moved aside to `<dir>.corrupt` (replacing an older one) and
/// created anew. Either way `rebuilt` is set and the cursors start at 0.
pub fn open(dir: &Path) -> Result<Opened, OpenError> {
    if !crate::directory::IndexDirectory::commit_point_files(dir).is_empty() {
        match open_existing(dir) {
            Ok(opened) => return Ok(opened),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "search index does not open; rebuilding it from the logs");
                return start_over(dir);
            }
        }
    }
    create(dir)
}

/// Moves whatever is at `dir` aside to `<dir>.corrupt` (replacing an older one, kept for a
/// post-mortem) and creates an empty index there.
pub fn start_over(dir: &Path) -> Result<Opened, OpenError> {
    let aside = dir.with_extension("corrupt");
    let io = |source| OpenError::Dir {
        path: dir.to_owned(),
        source,
    };
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(io)?;
    }
    if dir.exists() {
        std::fs::rename(dir, &aside).map_err(io)?;
    }
    create(dir)
}

fn create(dir: &Path) -> Result<Opened, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    // Whatever a half-made index left here is not an index; start clean.
    clear_dir(dir).map_err(|source| OpenError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let (schema, fields) = Fields::schema();
    let directory =
        crate::directory::IndexDirectory::open(dir).map_err(tantivy::TantivyError::from)?;
    let index = Index::create(directory, schema, tantivy::IndexSettings::default())?;
    register(&index);
    let reader = reader(&index)?;
    Ok(Opened {
        index,
        reader,
        payload: Payload {
            version: INDEX_FORMAT_VERSION,
            cursors: BTreeMap::new(),
            meta: 0,
        },
        fields,
        rebuilt: true,
    })
}

/// An empty index of this format in memory, for the fuzz target's checks.
pub fn create_in_ram() -> tantivy::Result<crate::Live> {
    let (schema, fields) = Fields::schema();
    let index = Index::create_in_ram(schema);
    register(&index);
    let reader = reader(&index)?;
    Ok(crate::Live {
        index,
        reader,
        fields,
    })
}

fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn open_existing(dir: &Path) -> Result<Opened, String> {
    let directory = crate::directory::IndexDirectory::open(dir).map_err(|e| e.to_string())?;
    let index = Index::open(directory).map_err(|e| e.to_string())?;
    let (schema, fields) = Fields::schema();
    if index.schema() != schema {
        return Err("the index has another schema".into());
    }
    register(&index);
    let metas = index.load_metas().map_err(|e| e.to_string())?;
    let payload: Payload = match metas.payload.as_deref() {
        Some(p) => serde_json::from_str(p).map_err(|e| format!("commit payload: {e}"))?,
        None => return Err("the index has no commit payload".into()),
    };
    if payload.version != INDEX_FORMAT_VERSION {
        return Err(format!(
            "index format {} is not {INDEX_FORMAT_VERSION}",
            payload.version
        ));
    }
    let reader = reader(&index).map_err(|e| e.to_string())?;
    // Open every segment's stored documents now: a damaged file fails here, at start,
    // rather than in a query.
    let searcher = reader.searcher();
    for segment in searcher.segment_readers() {
        segment.get_store_reader(0).map_err(|e| e.to_string())?;
    }
    Ok(Opened {
        index,
        reader,
        payload,
        fields,
        rebuilt: false,
    })
}

fn register(index: &Index) {
    index.tokenizers().register(WORD_TOKENIZER, WordTokenizer);
    index.tokenizers().register(CJK_TOKENIZER, CjkTokenizer);
}

fn reader(index: &Index) -> tantivy::Result<IndexReader> {
    index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
}

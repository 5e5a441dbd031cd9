//! A parsed query run against the index, inside the caller's readable set.
//!
//! **Architecture invariant: isolation is part of the query.** Every query is a boolean
//! query whose required clauses include the document kind, the caller's workspace and the
//! set of channels they may read (their channels and the workspace's public ones, as the
//! engine answers them at the moment of the search). Results, counts and cursors therefore
//! come only from that set: nothing is filtered after the search, so `total` is exact and
//! a page is never short because of documents the caller may not see. `in:` narrows that
//! set; a channel outside it leaves it empty, and an empty set matches nothing.
//!
//! For files the readable set is the files API's rule (`API.md` §11) as a clause: the
//! caller uploaded the file, or a live message in one of their readable channels carries
//! it (the file document's channels). With `in:`, only files shared in the named readable
//! channels match. Each word must match the file's name or its extracted text; a match in
//! the name ranks above one in the text ([`NAME_BOOST`]).
//!
//! Scoring: filters score 0 (they are wrapped as constant scores); a word scores BM25,
//! and a word of 5+ letters also matches terms one edit away with a small constant, so an
//! exact match always ranks above a match that is only one edit away.

use crate::forward::ForwardOnly;
use crate::index::{FileDoc, FLAG_FILE, FLAG_REACTION, FLAG_REPLY, KIND_FILE, KIND_MESSAGE};
use crate::query::{ChannelRef, Match, Parsed, UserRef};
use crate::Live;
use chorus_engine::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use std::ops::Bound;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    BooleanQuery, BoostQuery, ConstScoreQuery, FuzzyTermQuery, Occur, PhrasePrefixQuery,
    PhraseQuery, Query, RangeQuery, RegexQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::{Field, IndexRecordOption, Value};
use tantivy::{DocAddress, DocId, Order, Score, Searcher, SegmentReader, TantivyDocument, Term};

/// The most results per page (`API.md` §12).
pub const LIMIT_MAX: usize = 100;
/// Results per page when the caller does not say.
pub const LIMIT_DEFAULT: usize = 20;
/// The deepest offset a cursor may reach: deeper pages cost a sort of every hit before
/// them and nobody reads them.
pub const OFFSET_MAX: usize = 10_000;
/// The score of a match one edit away, below any exact match's BM25 plus this.
const FUZZY_SCORE: f32 = 0.1;
/// How much more a word found in a file's name counts than one found in its text.
pub const NAME_BOOST: f32 = 2.0;

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Best match first.
    Relevance,
    /// Newest `created_at` first.
    Newest,
}

/// Who searches, and what they may read.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The caller (`from:me`).
    pub user: UserId,
    /// The workspace searched.
    pub workspace: WorkspaceId,
    /// Every channel of the workspace the caller may read, with its name.
    pub channels: Vec<(ChannelId, String)>,
}

/// One page of results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hits {
    /// The messages, in order.
    pub ids: Vec<MessageId>,
    /// Every match, not just this page.
    pub total: usize,
}

/// One file found, with its stored text (for the snippet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHit {
    /// The file.
    pub id: FileId,
    /// Its extracted text (empty when it has none, or none yet).
    pub text: String,
}

/// One page of file results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHits {
    /// The files, in order.
    pub hits: Vec<FileHit>,
    /// Every match, not just this page.
    pub total: usize,
}

/// Why a search failed: the index could not be read.
#[derive(Debug, thiserror::Error)]
#[error("search index: {0}")]
pub struct SearchError(#[from] tantivy::TantivyError);

/// Runs `parsed` for `scope` over messages: `limit` results from `offset`.
pub fn run(
    live: &Live,
    parsed: &Parsed,
    scope: &Scope,
    sort: Sort,
    offset: usize,
    limit: usize,
) -> Result<Hits, SearchError> {
    let query = build(live, parsed, scope);
    let searcher = live.reader.searcher();
    let (total, addresses) = top(&searcher, &query, parsed, sort, offset, limit)?;
    let ids = addresses
        .into_iter()
        .map(|a| message_id(&searcher, live, a))
        .collect::<Result<Option<Vec<_>>, _>>()?
        .unwrap_or_default();
    Ok(Hits { ids, total })
}

/// Runs `parsed` for `scope` over files: `limit` results from `offset`, best first (the
/// newest first for a query without words).
pub fn run_files(
    live: &Live,
    parsed: &Parsed,
    scope: &Scope,
    offset: usize,
    limit: usize,
) -> Result<FileHits, SearchError> {
    let query = build_files(live, parsed, scope);
    let searcher = live.reader.searcher();
    let (total, addresses) = top(&searcher, &query, parsed, Sort::Relevance, offset, limit)?;
    let mut hits = Vec::with_capacity(addresses.len());
    for a in addresses {
        let doc: TantivyDocument = searcher.doc(a)?;
        if let Some(file) = FileDoc::from_document(&doc, &live.fields) {
            hits.push(FileHit {
                id: file.id,
                text: file.text,
            });
        }
    }
    Ok(FileHits { hits, total })
}

/// The count of `query`'s matches and the addresses of one page of them.
fn top(
    searcher: &Searcher,
    query: &BooleanQuery,
    parsed: &Parsed,
    sort: Sort,
    offset: usize,
    limit: usize,
) -> Result<(usize, Vec<DocAddress>), SearchError> {
    let top = TopDocs::with_limit(limit.max(1)).and_offset(offset);
    // Without a word every match scores the same: relevance has nothing to order by, so
    // such a query (operators, exclusions) lists the newest first.
    let sort = if parsed.include.is_empty() {
        Sort::Newest
    } else {
        sort
    };
    Ok(match sort {
        Sort::Relevance => {
            // Equal scores (the same words, in documents alike) are ordered newest first,
            // not by where a document sits: a merge between two pages moves documents, and
            // a cursor's offset would then repeat one and skip another.
            let by_score = top.tweak_score(|segment: &SegmentReader| {
                let at =
                    (segment.fast_fields().i64("at_us").ok()).map(|c| c.first_or_default_col(0));
                move |doc: DocId, score: Score| (score, at.as_ref().map_or(0, |c| c.get_val(doc)))
            });
            let (n, docs) = searcher.search(query, &(Count, by_score))?;
            (n, docs.into_iter().map(|(_, a)| a).collect())
        }
        Sort::Newest => {
            let by_time = top.order_by_fast_field::<i64>("at_us", Order::Desc);
            let (n, docs) = searcher.search(query, &(Count, by_time))?;
            (n, docs.into_iter().map(|(_, a)| a).collect())
        }
    })
}

fn message_id(
    searcher: &Searcher,
    live: &Live,
    address: DocAddress,
) -> Result<Option<MessageId>, SearchError> {
    let doc: TantivyDocument = searcher.doc(address)?;
    let u = |f| doc.get_first(f).and_then(|v| v.as_u64());
    Ok(u(live.fields.channel)
        .zip(u(live.fields.seq))
        .map(|(c, s)| MessageId {
            channel: ChannelId(c),
            seq: s,
        }))
}

/// The whole query over messages: the isolation filter, the operators, and the text.
pub fn build(live: &Live, parsed: &Parsed, scope: &Scope) -> BooleanQuery {
    let f = &live.fields;
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![
        filter(TermQuery::new(
            f.kind_term(KIND_MESSAGE),
            IndexRecordOption::Basic,
        )),
        filter(TermQuery::new(
            Term::from_field_u64(f.workspace, scope.workspace.0),
            IndexRecordOption::Basic,
        )),
        filter(channels_in(live, readable(parsed, scope))),
    ];
    operators(live, parsed, scope, &mut clauses);
    for (on, flag) in [
        (parsed.has_file, FLAG_FILE),
        (parsed.has_reaction, FLAG_REACTION),
        (parsed.is_thread, FLAG_REPLY),
    ] {
        if on {
            clauses.push(filter(TermQuery::new(
                Term::from_field_text(f.flags, flag),
                IndexRecordOption::Basic,
            )));
        }
    }
    let (words, cjk) = (f.text, f.cjk);
    for m in &parsed.include {
        clauses.push((Occur::Must, text_query(words, cjk, m, true)));
    }
    for m in &parsed.exclude {
        let excluded = ForwardOnly(text_query(words, cjk, m, false));
        clauses.push((Occur::MustNot, Box::new(excluded)));
    }
    BooleanQuery::new(clauses)
}

/// The whole query over files: the kind, the workspace, the files API's read rule, the
/// operators that apply to files (`from:` the uploader, the dates of the upload, `in:` a
/// channel where the file is shared), and the text, each item in the name or the text.
pub fn build_files(live: &Live, parsed: &Parsed, scope: &Scope) -> BooleanQuery {
    let f = &live.fields;
    let shared_in = channels_in(live, readable(parsed, scope));
    let access: Box<dyn Query> = if parsed.channels.is_empty() {
        let own = TermQuery::new(
            Term::from_field_u64(f.user, scope.user.0),
            IndexRecordOption::Basic,
        );
        Box::new(BooleanQuery::new(vec![
            (Occur::Should, Box::new(own)),
            (Occur::Should, Box::new(shared_in)),
        ]))
    } else {
        Box::new(shared_in)
    };
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![
        filter(TermQuery::new(
            f.kind_term(KIND_FILE),
            IndexRecordOption::Basic,
        )),
        filter(TermQuery::new(
            Term::from_field_u64(f.workspace, scope.workspace.0),
            IndexRecordOption::Basic,
        )),
        (
            Occur::Must,
            Box::new(ConstScoreQuery::new(access, 0.0)) as Box<dyn Query>,
        ),
    ];
    operators(live, parsed, scope, &mut clauses);
    for m in &parsed.include {
        clauses.push((Occur::Must, name_or_text(live, m, true)));
    }
    for m in &parsed.exclude {
        let excluded = ForwardOnly(name_or_text(live, m, false));
        clauses.push((Occur::MustNot, Box::new(excluded)));
    }
    BooleanQuery::new(clauses)
}

/// A text item found in a file's name (ranked higher) or in its text.
fn name_or_text(live: &Live, m: &Match, fuzzy: bool) -> Box<dyn Query> {
    let f = &live.fields;
    let name = BoostQuery::new(text_query(f.name, f.name_cjk, m, fuzzy), NAME_BOOST);
    Box::new(BooleanQuery::new(vec![
        (Occur::Should, Box::new(name) as Box<dyn Query>),
        (Occur::Should, text_query(f.text, f.cjk, m, fuzzy)),
    ]))
}

fn channels_in(live: &Live, channels: Vec<ChannelId>) -> TermSetQuery {
    TermSetQuery::new(
        channels
            .into_iter()
            .map(|c| Term::from_field_u64(live.fields.channel, c.0)),
    )
}

/// `from:` and the dates, which messages and files share.
fn operators(
    live: &Live,
    parsed: &Parsed,
    scope: &Scope,
    clauses: &mut Vec<(Occur, Box<dyn Query>)>,
) {
    let f = &live.fields;
    if !parsed.authors.is_empty() {
        let authors = parsed.authors.iter().map(|a| {
            let user = match a {
                UserRef::Me => scope.user,
                UserRef::Id(u) => *u,
            };
            Term::from_field_u64(f.user, user.0)
        });
        clauses.push(filter(TermSetQuery::new(authors)));
    }
    for (from, to) in &parsed.windows {
        let bound = |v: i64, edge: i64, b: fn(Term) -> Bound<Term>| {
            if v == edge {
                Bound::Unbounded
            } else {
                b(Term::from_field_i64(f.at_us, v))
            }
        };
        clauses.push(filter(RangeQuery::new(
            bound(*from, i64::MIN, Bound::Included),
            bound(*to, i64::MAX, Bound::Excluded),
        )));
    }
}

/// The channels searched: the readable set, narrowed by `in:` to the channels it names
/// that are in the set.
fn readable(parsed: &Parsed, scope: &Scope) -> Vec<ChannelId> {
    scope
        .channels
        .iter()
        .filter(|(id, name)| {
            parsed.channels.is_empty()
                || parsed.channels.iter().any(|c| match c {
                    ChannelRef::Id(c) => c == id,
                    ChannelRef::Name(n) => n == name,
                })
        })
        .map(|(id, _)| *id)
        .collect()
}

fn filter(q: impl Query) -> (Occur, Box<dyn Query>) {
    (
        Occur::Must,
        Box::new(ConstScoreQuery::new(Box::new(q), 0.0)),
    )
}

/// One text item in the fields `words` and `cjk`: its words (a word, a prefix, a phrase)
/// and its CJK runs, all required. `fuzzy` allows a single word of 5+ letters to match one
/// edit away.
fn text_query(words: Field, cjk: Field, m: &Match, fuzzy: bool) -> Box<dyn Query> {
    let mut parts: Vec<Box<dyn Query>> = Vec::new();
    let terms: Vec<Term> = m
        .words
        .iter()
        .map(|w| Term::from_field_text(words, w))
        .collect();
    match (terms.len(), m.prefix) {
        (0, _) => {}
        (1, false) => {
            let exact: Box<dyn Query> = Box::new(TermQuery::new(
                terms[0].clone(),
                IndexRecordOption::WithFreqs,
            ));
            if fuzzy && m.fuzzy() {
                let near = FuzzyTermQuery::new(terms[0].clone(), 1, true);
                let near = ConstScoreQuery::new(Box::new(near), FUZZY_SCORE);
                parts.push(Box::new(BooleanQuery::new(vec![
                    (Occur::Should, exact),
                    (Occur::Should, Box::new(near)),
                ])));
            } else {
                parts.push(exact);
            }
        }
        (1, true) => parts.push(prefix_query(words, &m.words[0])),
        (_, false) => parts.push(Box::new(PhraseQuery::new(terms))),
        (_, true) => parts.push(Box::new(PhrasePrefixQuery::new(terms))),
    }
    for run in &m.cjk {
        parts.push(cjk_query(cjk, run));
    }
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    Box::new(BooleanQuery::new(
        parts.into_iter().map(|q| (Occur::Must, q)).collect(),
    ))
}

/// Terms of `field` that start with `prefix`.
fn prefix_query(field: Field, prefix: &str) -> Box<dyn Query> {
    let pattern = format!("{}.*", regex_escape(prefix));
    match RegexQuery::from_pattern(&pattern, field) {
        Ok(q) => Box::new(q),
        // The escape leaves no syntax to refuse; were it refused, match the word itself.
        Err(_) => Box::new(TermQuery::new(
            Term::from_field_text(field, prefix),
            IndexRecordOption::Basic,
        )),
    }
}

/// A CJK run: the phrase of its bigrams; a single character, any bigram holding it.
fn cjk_query(field: Field, run: &str) -> Box<dyn Query> {
    let chars: Vec<char> = run.chars().collect();
    if chars.len() == 1 {
        let c = regex_escape(run);
        let pattern = format!("{c}.?|.{c}");
        return match RegexQuery::from_pattern(&pattern, field) {
            Ok(q) => Box::new(q),
            Err(_) => Box::new(TermQuery::new(
                Term::from_field_text(field, run),
                IndexRecordOption::Basic,
            )),
        };
    }
    let bigrams: Vec<Term> = chars
        .windows(2)
        .map(|w| Term::from_field_text(field, &w.iter().collect::<String>()))
        .collect();
    if bigrams.len() == 1 {
        return Box::new(TermQuery::new(
            bigrams[0].clone(),
            IndexRecordOption::WithFreqs,
        ));
    }
    Box::new(PhraseQuery::new(bigrams))
}

/// Escapes every character that regular-expression syntax gives a meaning to.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_punctuation() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

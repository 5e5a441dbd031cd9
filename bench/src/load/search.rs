//! `search`: the search benchmark of issue 15, Chorus side by side with PostgreSQL
//! full-text search (`tsvector` + GIN, what Zulip uses) on the same messages, in the same
//! run.
//!
//! 1. **Load.** `messages` messages of the generated corpus ([`super::corpus`]) are posted
//!    to the real `chorus` server over REST (`POST /channels/{cid}/messages`, `in_flight`
//!    requests at once over as many kept-alive connections), as fast as it accepts them,
//!    and the run waits until search finds them all. The server's CPU over that window,
//!    and that of its search threads alone, is divided by the messages.
//! 2. **Queries.** `queries` queries of the mix (words, a phrase, `from:`, `in:`,
//!    `after:`), after a warm-up of a tenth as many, from `searchers` concurrent
//!    searchers, each timed from request to parsed page (`GET
//!    /workspaces/{wid}/search/messages`, 20 results and the exact `total`).
//! 3. **Freshness.** Posts at `fresh_rate` per second, open loop, for `fresh_secs`, into
//!    [`FRESH_CHANNELS`] channels of their own; each text holds the marker word and a
//!    unique token. One poller per channel asks every [`POLL_EVERY`] for the `total` of
//!    `MARKER in:CHANNEL` (one result, newest first). A channel is one partition, indexed
//!    in log order, so its searchable messages are always its first `total`: a message's
//!    figure is its 201 (the ack) → the response of the first poll that counted its rank
//!    in the channel (an upper bound, at most a poll interval and a poll late). Counting
//!    instead of listing keeps each poll to one rendered result: pages of 20, listed
//!    while the server took 1,000 posts/s, fell behind and measured their own backlog.
//!    Afterwards, every [`TOKEN_CHECK_EVERY`]th message is searched by its unique token
//!    alone, and must be the one found.
//! 4. **Index size.** The server's `search/` directory after the queries, per message.
//!
//! PostgreSQL ([`crate::peers::postgres::search`]) then loads the same rows (with the
//! `created_at` Chorus gave each) and answers the same queries.

use super::corpus::{Corpus, Query};
use super::procstat::{self, UsageWindow};
use super::seed;
use super::server::{self, ChorusServer, ServerSettings};
use super::ServerUsage;
use anyhow::{ensure, Context};
use chorus_engine::ids::MessageId;
use chorus_engine::view::rfc3339;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Channels the freshness posts go to, one poller each.
pub const FRESH_CHANNELS: usize = 2;
/// How often each freshness poller searches. A poll asks for one result and the count:
/// pages of 20 rendered through the engine while it took 1,000 posts/s were slower than
/// the messages came in, and the pollers measured their own backlog.
pub const POLL_EVERY: Duration = Duration::from_millis(10);
/// One freshness message in this many is also searched by its own token afterwards.
pub const TOKEN_CHECK_EVERY: usize = 50;
/// The word every freshness message holds (four characters: matched exactly, never one
/// edit away).
const MARKER: &str = "zq9x";
/// How long after the last freshness ack the pollers go on looking.
const FRESH_GIVE_UP: Duration = Duration::from_secs(5);
/// How long the bulk load may take to become searchable after its last ack.
const CATCH_UP_GIVE_UP: Duration = Duration::from_secs(600);
/// Results per search page, as the API's default.
pub const PAGE: usize = 20;
/// The name prefixes (`comm`, 15 bytes at most) of the server's search threads: the
/// indexer and extractor, and tantivy's indexing, segment, merge and doc-store threads.
const SEARCH_THREADS: &[&str] = &[
    "search-",
    "thrd-tantivy",
    "segment_updater",
    "merge_thread",
    "docstore-compre",
];

/// The sizes of a `search` run.
#[derive(Clone, Debug)]
pub struct SearchShape {
    /// Messages loaded before querying.
    pub messages: usize,
    /// Channels they are spread over.
    pub channels: usize,
    /// Authors they are spread over.
    pub authors: usize,
    /// Posts in flight during the load.
    pub in_flight: usize,
    /// Queries measured on each system.
    pub queries: usize,
    /// Concurrent searchers.
    pub searchers: usize,
    /// Freshness posts per second.
    pub fresh_rate: f64,
    /// Seconds of freshness posts.
    pub fresh_secs: f64,
    /// The corpus and query seed.
    pub seed: u64,
}

impl SearchShape {
    /// The size: 1M messages, 4 searchers, 1,000 msgs/s for 20 s.
    pub fn standard() -> SearchShape {
        SearchShape {
            messages: 1_000_000,
            channels: 20,
            authors: 50,
            in_flight: 64,
            queries: 2_000,
            searchers: 4,
            fresh_rate: 1_000.0,
            fresh_secs: 20.0,
            seed: 0x5eac_4c0d_e15e_ed15,
        }
    }

    /// The suite's size: 200,000 messages, the rest as standard.
    pub fn suite() -> SearchShape {
        SearchShape {
            messages: 200_000,
            queries: 1_000,
            ..SearchShape::standard()
        }
    }

    /// A size that runs in seconds on a debug build.
    pub fn smoke() -> SearchShape {
        SearchShape {
            messages: 2_000,
            channels: 4,
            authors: 4,
            in_flight: 16,
            queries: 40,
            searchers: 2,
            fresh_rate: 100.0,
            fresh_secs: 1.0,
            ..SearchShape::standard()
        }
    }
}

/// What the Chorus side of a `search` run measured.
#[derive(Clone, Debug)]
pub struct ChorusSearch {
    /// Messages loaded.
    pub messages: usize,
    /// First post → the last loaded message searchable.
    pub load: Duration,
    /// The server over the load (posts, log, indexing).
    pub load_usage: ServerUsage,
    /// Of that, the search threads' CPU seconds.
    pub load_search_cpu_secs: f64,
    /// Request → parsed page, one record per measured query, microseconds.
    pub query: Histogram<u64>,
    /// Each measured query's `total`, in query order.
    pub totals: Vec<u64>,
    /// Freshness messages acked.
    pub fresh_sent: usize,
    /// Of those, found by the pollers.
    pub fresh_found: usize,
    /// Ack → first poll that listed it, microseconds.
    pub fresh: Histogram<u64>,
    /// Intended send → ack of the freshness posts, microseconds.
    pub fresh_ack: Histogram<u64>,
    /// The server over the freshness phase (posts, indexing, and the pollers' searches).
    pub fresh_usage: ServerUsage,
    /// Of that, the search threads' CPU seconds.
    pub fresh_search_cpu_secs: f64,
    /// Polls made in the freshness phase.
    pub polls: u64,
    /// Their latency (request → response), microseconds.
    pub poll: Histogram<u64>,
    /// Index commits in the freshness phase, and the seconds they took (`/metrics`).
    pub fresh_commits: (f64, f64),
    /// Freshness messages searched by their token, and those found.
    pub tokens: (usize, usize),
    /// Bytes of the server's `search/` directory after the queries.
    pub index_bytes: u64,
}

/// What the PostgreSQL side measured.
#[derive(Clone, Debug)]
pub struct PgSearch {
    /// The `COPY` of every row (the `tsvector` computed as a generated column).
    pub load: Duration,
    /// Building the GIN index afterwards.
    pub index: Duration,
    /// PostgreSQL's CPU over the copy and the index build.
    pub load_cpu_secs: f64,
    /// Request → rows parsed, microseconds.
    pub query: Histogram<u64>,
    /// Each measured query's exact count.
    pub totals: Vec<u64>,
    /// The table's bytes (heap and TOAST).
    pub table_bytes: u64,
    /// The GIN index's bytes.
    pub gin_bytes: u64,
}

/// What a `search` run measured.
#[derive(Clone, Debug)]
pub struct SearchOutcome {
    /// Chorus's side.
    pub chorus: ChorusSearch,
    /// PostgreSQL's, or why there is none.
    pub postgres: Result<PgSearch, String>,
}

/// Targets of issue 15.
pub mod targets {
    /// Chorus's query p99 at most this share of PostgreSQL's.
    pub const QUERY_P99_RATIO: f64 = 0.5;
    /// Ack → searchable p99 at the sustained rate, microseconds.
    pub const FRESH_P99_US: u64 = 200_000;
    /// Every message searchable within this, microseconds (the guarantee).
    pub const FRESH_MAX_US: u64 = 1_000_000;
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1e3)
}

fn q(h: &Histogram<u64>, p: f64) -> u64 {
    h.value_at_quantile(p)
}

impl SearchOutcome {
    /// Chorus's query p99 over PostgreSQL's, when PostgreSQL ran.
    pub fn query_ratio(&self) -> Option<f64> {
        let pg = self.postgres.as_ref().ok()?;
        Some(q(&self.chorus.query, 0.99) as f64 / q(&pg.query, 0.99).max(1) as f64)
    }

    /// Queries whose `total` was the same on both systems.
    pub fn totals_equal(&self) -> Option<usize> {
        let pg = self.postgres.as_ref().ok()?;
        Some(
            self.chorus
                .totals
                .iter()
                .zip(&pg.totals)
                .filter(|(a, b)| a == b)
                .count(),
        )
    }

    /// Whether every freshness message was found, and within the guarantee.
    pub fn fresh_all_within_guarantee(&self) -> bool {
        let c = &self.chorus;
        c.fresh_found == c.fresh_sent && c.fresh.max() <= targets::FRESH_MAX_US
    }

    /// The printed table.
    pub fn table(&self, shape: &SearchShape) -> String {
        let c = &self.chorus;
        let pg = self.postgres.as_ref();
        let per_msg_us = |cpu: f64, n: usize| cpu * 1e6 / n.max(1) as f64;
        let n = shape.messages;
        let mut t = String::new();
        t.push_str("| measure | Chorus | PostgreSQL | Chorus / PostgreSQL | target |\n");
        t.push_str("|---|---|---|---|---|\n");
        let lat = |h: &Histogram<u64>| {
            format!(
                "p50 {}, p99 {}, max {}",
                ms(q(h, 0.5)),
                ms(q(h, 0.99)),
                ms(h.max())
            )
        };
        let (pg_cell, ratio_cell) = match pg {
            Ok(p) => (
                lat(&p.query),
                format!(
                    "p99 {:.2}, p50 {:.2}",
                    self.query_ratio().unwrap_or(0.0),
                    q(&c.query, 0.5) as f64 / q(&p.query, 0.5).max(1) as f64
                ),
            ),
            Err(why) => (format!("n/a ({why})"), "–".into()),
        };
        t.push_str(&format!(
            "| query (ms), {n} messages, {} searchers, {} mixed queries | {} | {pg_cell} | {ratio_cell} | p99 ≤ {:.2} |\n",
            shape.searchers,
            shape.queries,
            lat(&c.query),
            targets::QUERY_P99_RATIO,
        ));
        if let (Some(eq), Ok(_)) = (self.totals_equal(), pg) {
            t.push_str(&format!(
                "| queries with the same `total` on both | {eq} of {} (Chorus also matches words of 5+ letters one edit away) | | | – |\n",
                shape.queries
            ));
        }
        t.push_str(&format!(
            "| ack → searchable (ms) at {}/s for {} s | {}; {}/{} found; {}/{} found by token | visible at commit | – | p99 ≤ {}, all ≤ {} |\n",
            shape.fresh_rate,
            shape.fresh_secs,
            lat(&c.fresh),
            c.fresh_found,
            c.fresh_sent,
            c.tokens.1,
            c.tokens.0,
            ms(targets::FRESH_P99_US),
            ms(targets::FRESH_MAX_US),
        ));
        t.push_str(&format!(
            "| freshness posts: intended send → 201 (ms) | {}; {} polls ({}), {:.0} commits, {:.1} ms each on average | | | – |\n",
            lat(&c.fresh_ack),
            c.polls,
            lat(&c.poll),
            c.fresh_commits.0,
            c.fresh_commits.1 * 1e3 / c.fresh_commits.0.max(1.0),
        ));
        let pg_load = match pg {
            Ok(p) => format!(
                "COPY {:.1} s + GIN {:.1} s; {:.1} µs CPU per message",
                p.load.as_secs_f64(),
                p.index.as_secs_f64(),
                per_msg_us(p.load_cpu_secs, n)
            ),
            Err(_) => "n/a".into(),
        };
        let load_ratio = pg.map_or("–".into(), |p| {
            format!("{:.2}", c.load_usage.cpu_secs / p.load_cpu_secs.max(1e-9))
        });
        t.push_str(&format!(
            "| bulk load: server CPU per message (µs), all / search threads | {:.1} / {:.1} ({:.0} msgs/s over REST, {:.1} s to searchable) | {pg_load} | {load_ratio} (all) | report |\n",
            per_msg_us(c.load_usage.cpu_secs, n),
            per_msg_us(c.load_search_cpu_secs, n),
            n as f64 / c.load.as_secs_f64(),
            c.load.as_secs_f64(),
        ));
        t.push_str(&format!(
            "| at {}/s: server CPU per message (µs), all (posts, indexing, polls) / search threads | {:.1} / {:.1} | – | – | report |\n",
            shape.fresh_rate,
            per_msg_us(c.fresh_usage.cpu_secs, c.fresh_sent),
            per_msg_us(c.fresh_search_cpu_secs, c.fresh_sent),
        ));
        let total_msgs = n + c.fresh_sent;
        let (pg_bytes, bytes_ratio) = match pg {
            Ok(p) => {
                let per = (p.table_bytes + p.gin_bytes) as f64 / n as f64;
                (
                    format!(
                        "{per:.1} (table {:.1} + GIN {:.1})",
                        p.table_bytes as f64 / n as f64,
                        p.gin_bytes as f64 / n as f64
                    ),
                    format!("{:.2}", c.index_bytes as f64 / total_msgs as f64 / per),
                )
            }
            Err(_) => ("n/a".into(), "–".into()),
        };
        t.push_str(&format!(
            "| bytes per message: Chorus's index (text stored) / PostgreSQL's table + GIN | {:.1} | {pg_bytes} | {bytes_ratio} | report |\n",
            c.index_bytes as f64 / total_msgs as f64,
        ));
        t
    }
}

/// The suite's summary rows: `[target, Chorus, peer, ratio, verdict]`.
pub fn summary_rows(
    shape: &SearchShape,
    outcome: &Result<SearchOutcome, String>,
) -> Vec<[String; 5]> {
    let query_target = format!(
        "search: query p99 ≤ {:.1}× PostgreSQL's (`tsvector` + GIN), {} messages, {} searchers, mixed queries",
        targets::QUERY_P99_RATIO,
        shape.messages,
        shape.searchers
    );
    let fresh_target = format!(
        "search: ack → searchable p99 ≤ {} ms at {}/s, every message within {} ms",
        ms(targets::FRESH_P99_US),
        shape.fresh_rate,
        ms(targets::FRESH_MAX_US)
    );
    let o = match outcome {
        Ok(o) => o,
        Err(why) => {
            let na = format!("n/a ({why})");
            return [query_target, fresh_target]
                .map(|t| [t, na.clone(), "–".into(), "–".into(), "unknown".into()])
                .into();
        }
    };
    let c = &o.chorus;
    let (peer, ratio, verdict) = match &o.postgres {
        Ok(p) => {
            let r = o.query_ratio().unwrap_or(f64::INFINITY);
            (
                format!("{} ms", ms(q(&p.query, 0.99))),
                format!("{r:.2}× PostgreSQL"),
                super::report::verdict(r <= targets::QUERY_P99_RATIO).to_owned(),
            )
        }
        Err(why) => (format!("n/a ({why})"), "–".into(), "unknown".into()),
    };
    vec![
        [
            query_target,
            format!("{} ms", ms(q(&c.query, 0.99))),
            peer,
            ratio,
            verdict,
        ],
        [
            fresh_target,
            format!(
                "p99 {} ms, max {} ms, {}/{} found",
                ms(q(&c.fresh, 0.99)),
                ms(c.fresh.max()),
                c.fresh_found,
                c.fresh_sent
            ),
            "–".into(),
            "–".into(),
            super::report::verdict(
                q(&c.fresh, 0.99) <= targets::FRESH_P99_US && o.fresh_all_within_guarantee(),
            )
            .to_owned(),
        ],
    ]
}

/// The suite's detailed section.
pub fn details(shape: &SearchShape, outcome: &Result<SearchOutcome, String>) -> String {
    let mut out = format!(
        "### search\n\n{} messages of the generated corpus ({} channels, {} authors) posted over \
         REST, then the same rows in PostgreSQL (`to_tsvector('simple', body)` as a stored \
         generated column, GIN index built after the `COPY`); {} queries of the mix from {} \
         searchers on each; then {}/s posts for {} s, each found by polling.\n\n",
        shape.messages,
        shape.channels,
        shape.authors,
        shape.queries,
        shape.searchers,
        shape.fresh_rate,
        shape.fresh_secs
    );
    match outcome {
        Ok(o) => out.push_str(&o.table(shape)),
        Err(why) => out.push_str(&format!("- Chorus: no result ({why})\n")),
    }
    out.push('\n');
    out
}

/// The medians over `runs` of the key figures, one line each.
pub fn medians(runs: &[SearchOutcome]) -> String {
    fn median(v: Vec<f64>) -> String {
        if v.is_empty() {
            return "n/a".into();
        }
        format!("{:.2}", crate::latency::median(&v))
    }
    let ms_of = |f: &dyn Fn(&SearchOutcome) -> Option<u64>| {
        median(
            runs.iter()
                .filter_map(f)
                .map(|us| us as f64 / 1e3)
                .collect(),
        )
    };
    let of =
        |f: &dyn Fn(&SearchOutcome) -> Option<f64>| median(runs.iter().filter_map(f).collect());
    fn pg(o: &SearchOutcome) -> Option<(&PgSearch, &SearchOutcome)> {
        o.postgres.as_ref().ok().map(|p| (p, o))
    }
    let mut out = format!("medians of {} run(s):\n\n", runs.len());
    let mut line = |name: &str, value: String| out.push_str(&format!("- {name}: {value}\n"));
    line(
        "Chorus query p50 ms",
        ms_of(&|o| Some(q(&o.chorus.query, 0.5))),
    );
    line(
        "Chorus query p99 ms",
        ms_of(&|o| Some(q(&o.chorus.query, 0.99))),
    );
    line(
        "PostgreSQL query p50 ms",
        ms_of(&|o| pg(o).map(|(p, _)| q(&p.query, 0.5))),
    );
    line(
        "PostgreSQL query p99 ms",
        ms_of(&|o| pg(o).map(|(p, _)| q(&p.query, 0.99))),
    );
    line("query p99 Chorus / PostgreSQL", of(&|o| o.query_ratio()));
    line(
        "query p50 Chorus / PostgreSQL",
        of(&|o| {
            pg(o).map(|(p, o)| q(&o.chorus.query, 0.5) as f64 / q(&p.query, 0.5).max(1) as f64)
        }),
    );
    line(
        "ack → searchable p50 ms",
        ms_of(&|o| Some(q(&o.chorus.fresh, 0.5))),
    );
    line(
        "ack → searchable p99 ms",
        ms_of(&|o| Some(q(&o.chorus.fresh, 0.99))),
    );
    line(
        "ack → searchable max ms",
        ms_of(&|o| Some(o.chorus.fresh.max())),
    );
    line(
        "freshness messages found, share",
        of(&|o| Some(o.chorus.fresh_found as f64 / o.chorus.fresh_sent.max(1) as f64)),
    );
    line(
        "mean commit ms in the freshness phase",
        of(&|o| Some(o.chorus.fresh_commits.1 * 1e3 / o.chorus.fresh_commits.0.max(1.0))),
    );
    line(
        "bulk load server CPU µs per message (all)",
        of(&|o| Some(o.chorus.load_usage.cpu_secs * 1e6 / messages_of(o))),
    );
    line(
        "bulk load search-thread CPU µs per message",
        of(&|o| Some(o.chorus.load_search_cpu_secs * 1e6 / messages_of(o))),
    );
    line(
        "PostgreSQL COPY + GIN CPU µs per message",
        of(&|o| pg(o).map(|(p, o)| p.load_cpu_secs * 1e6 / messages_of(o))),
    );
    line(
        "freshness phase server CPU µs per message (all)",
        of(&|o| Some(o.chorus.fresh_usage.cpu_secs * 1e6 / o.chorus.fresh_sent.max(1) as f64)),
    );
    line(
        "freshness phase search-thread CPU µs per message",
        of(&|o| Some(o.chorus.fresh_search_cpu_secs * 1e6 / o.chorus.fresh_sent.max(1) as f64)),
    );
    line(
        "Chorus index bytes per message",
        of(&|o| Some(o.chorus.index_bytes as f64 / (messages_of(o) + o.chorus.fresh_sent as f64))),
    );
    line(
        "PostgreSQL table + GIN bytes per message",
        of(&|o| pg(o).map(|(p, o)| (p.table_bytes + p.gin_bytes) as f64 / messages_of(o))),
    );
    out
}

/// The messages of a run's bulk load.
fn messages_of(o: &SearchOutcome) -> f64 {
    o.chorus.messages.max(1) as f64
}

/// The rows PostgreSQL loads and the queries it answers, as the Chorus run made them.
pub struct PgJob<'a> {
    /// The corpus.
    pub corpus: &'a Corpus,
    /// `created_at` of message `i`, as Chorus stamped it.
    pub created_at: &'a [String],
    /// The warm-up queries, then the measured ones.
    pub warmup: &'a [Query],
    /// See `warmup`.
    pub queries: &'a [Query],
    /// Concurrent searchers.
    pub searchers: usize,
}

/// Runs the Chorus side, then `postgres` (PostgreSQL's side, given the rows and queries),
/// in fresh directories under `work_root`.
pub fn run(
    binary: &Path,
    work_root: &Path,
    shape: &SearchShape,
    progress: &ProgressBar,
    postgres: impl FnOnce(&PgJob<'_>, &Path) -> anyhow::Result<PgSearch>,
) -> anyhow::Result<SearchOutcome> {
    ensure!(
        shape.messages > 0 && shape.queries > 0 && shape.searchers > 0,
        "nothing to measure"
    );
    let corpus = Corpus::new(shape.seed, shape.channels, shape.authors);
    let yesterday = rfc3339(now_us().saturating_sub(86_400_000_000))[..10].to_owned();
    let all = corpus.queries(shape.queries + shape.queries / 10, shape.seed, &yesterday);
    let (queries, warmup) = all.split_at(shape.queries);
    std::fs::create_dir_all(work_root)?;
    let dir = tempfile::Builder::new()
        .prefix("chorus-bench-search-")
        .tempdir_in(work_root)?;
    let (chorus, created_at) = chorus_side(
        binary,
        dir.path(),
        shape,
        &corpus,
        warmup,
        queries,
        progress,
    )?;
    drop(dir);
    progress.set_message("search: PostgreSQL");
    let job = PgJob {
        corpus: &corpus,
        created_at: &created_at,
        warmup,
        queries,
        searchers: shape.searchers,
    };
    let postgres = (|| {
        let dir = tempfile::Builder::new()
            .prefix("chorus-bench-peer-")
            .tempdir_in(work_root)?;
        postgres(&job, dir.path())
    })()
    .map_err(|e| format!("{e:#}"));
    Ok(SearchOutcome { chorus, postgres })
}

/// The IDs the Chorus side addresses, as strings.
#[derive(Clone)]
struct Names {
    workspace: String,
    channels: Vec<String>,
    fresh: Vec<String>,
    authors: Vec<String>,
    tokens: Vec<String>,
    searcher: String,
}

fn chorus_side(
    binary: &Path,
    dir: &Path,
    shape: &SearchShape,
    corpus: &Corpus,
    warmup: &[Query],
    queries: &[Query],
    progress: &ProgressBar,
) -> anyhow::Result<(ChorusSearch, Vec<String>)> {
    let settings = ServerSettings::default();
    let data = server::data_dir(dir);
    progress.set_message("search: seeding");
    let engine = seed::open_engine(&data, &settings)?;
    let pop = seed::users_in_every_channel(
        &engine,
        shape.authors,
        shape.channels + FRESH_CHANNELS,
        progress,
    );
    engine.shutdown();
    let pop = pop?;
    let mut who = pop.users.clone();
    who.push(pop.owner);
    let mut tokens = seed::mint_tokens(&data, &who)?;
    let names = Names {
        workspace: pop.workspace.to_string(),
        channels: pop.channels[..shape.channels]
            .iter()
            .map(|c| c.to_string())
            .collect(),
        fresh: pop.channels[shape.channels..]
            .iter()
            .map(|c| c.to_string())
            .collect(),
        authors: pop.users.iter().map(|u| u.to_string()).collect(),
        searcher: tokens.pop().expect("the owner's token"),
        tokens,
    };
    let server = ChorusServer::start(binary, dir, &settings)?;
    let api = Api {
        client: reqwest::Client::new(),
        base: format!("http://{}/api/v1", server.addr),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pid = server.pid();

    // 1. The bulk load, until all of it is searchable.
    let usage = UsageWindow::start(pid);
    let search_cpu = procstat::named_threads_cpu_secs(pid, SEARCH_THREADS);
    let started = Instant::now();
    let created_at = rt.block_on(load(&api, &names, shape, corpus, progress))?;
    progress.set_message("search: waiting for the index to catch up");
    rt.block_on(wait_searchable(&api, &names, shape.messages))?;
    let load = started.elapsed();
    let load_usage = usage.finish();
    let load_search_cpu_secs = procstat::named_threads_cpu_secs(pid, SEARCH_THREADS) - search_cpu;

    // 2. The queries.
    progress.set_message("search: Chorus queries");
    let chorus_q: Vec<String> = queries.iter().map(|q| chorus_query(q, &names)).collect();
    let warm_q: Vec<String> = warmup.iter().map(|q| chorus_query(q, &names)).collect();
    rt.block_on(run_queries(&api, &names, &warm_q, shape.searchers))?;
    let (query, totals) = rt.block_on(run_queries(&api, &names, &chorus_q, shape.searchers))?;

    // 3. Freshness.
    progress.set_message("search: freshness at the sustained rate");
    let commits_before = search_metrics(&rt, &api)?;
    let usage = UsageWindow::start(pid);
    let search_cpu = procstat::named_threads_cpu_secs(pid, SEARCH_THREADS);
    let fresh = rt.block_on(freshness(&api, &names, shape, corpus))?;
    let fresh_usage = usage.finish();
    let fresh_search_cpu_secs = procstat::named_threads_cpu_secs(pid, SEARCH_THREADS) - search_cpu;
    let commits_after = search_metrics(&rt, &api)?;
    progress.set_message("search: tokens");
    let tokens = rt.block_on(check_tokens(&api, &names, &fresh.acked))?;
    let index_bytes = crate::dir_bytes(&data.join("search"));
    drop(rt);
    server.stop()?;
    let chorus = ChorusSearch {
        messages: shape.messages,
        load,
        load_usage,
        load_search_cpu_secs,
        query,
        totals,
        fresh_sent: fresh.acked.len(),
        fresh_found: fresh.found,
        fresh: fresh.latency,
        fresh_ack: fresh.ack,
        fresh_usage,
        fresh_search_cpu_secs,
        polls: fresh.polls,
        poll: fresh.poll,
        fresh_commits: (
            commits_after.0 - commits_before.0,
            commits_after.1 - commits_before.1,
        ),
        tokens,
        index_bytes,
    };
    Ok((chorus, created_at))
}

/// The REST API of the server under test.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct Posted {
    message: PostedMessage,
}

#[derive(Deserialize)]
struct PostedMessage {
    id: String,
    created_at: String,
}

#[derive(Deserialize)]
struct Page {
    results: Vec<Hit>,
    total: u64,
}

#[derive(Deserialize)]
struct Hit {
    message: HitMessage,
}

#[derive(Deserialize)]
struct HitMessage {
    id: String,
}

impl Api {
    /// Posts `text` into `channel` as the holder of `token`; the message's ID and time.
    async fn post(&self, token: &str, channel: &str, text: &str) -> anyhow::Result<PostedMessage> {
        let resp = self
            .client
            .post(format!("{}/channels/{channel}/messages", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(serde_json::json!({ "text": text }).to_string())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        ensure!(
            status == 201,
            "post answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(serde_json::from_slice::<Posted>(&body)?.message)
    }

    /// One page of message search.
    async fn search(
        &self,
        names: &Names,
        q: &str,
        sort: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Page> {
        let limit = limit.to_string();
        let mut params = vec![("q", q), ("sort", sort), ("limit", &limit)];
        params.extend(cursor.map(|c| ("cursor", c)));
        let resp = self
            .client
            .get(format!(
                "{}/workspaces/{}/search/messages",
                self.base, names.workspace
            ))
            .bearer_auth(&names.searcher)
            .query(&params)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        ensure!(
            status == 200,
            "search {q:?} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(serde_json::from_slice(&body)?)
    }
}

/// Posts the corpus; returns each message's `created_at`.
async fn load(
    api: &Api,
    names: &Names,
    shape: &SearchShape,
    corpus: &Corpus,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<String>> {
    progress.set_message("search: posting the corpus to Chorus");
    progress.set_length(shape.messages as u64);
    progress.set_position(0);
    let mut created = vec![String::new(); shape.messages];
    let mut posts = stream::iter(0..shape.messages)
        .map(|i| async move {
            let m = corpus.message(i as u64);
            let posted = api
                .post(&names.tokens[m.author], &names.channels[m.channel], &m.text)
                .await
                .with_context(|| format!("posting message {i}"))?;
            anyhow::Ok((i, posted.created_at))
        })
        .buffer_unordered(shape.in_flight);
    while let Some(r) = posts.next().await {
        let (i, at) = r?;
        created[i] = at;
        progress.inc(1);
    }
    Ok(created)
}

/// Waits until a search that every loaded message matches counts `messages`.
async fn wait_searchable(api: &Api, names: &Names, messages: usize) -> anyhow::Result<()> {
    let q = format!("after:{}", &rfc3339(0)[..10]);
    let deadline = Instant::now() + CATCH_UP_GIVE_UP;
    loop {
        let page = api.search(names, &q, "newest", None, 1).await?;
        if page.total >= messages as u64 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {messages} messages searchable after {CATCH_UP_GIVE_UP:?}",
            page.total
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The query text Chorus gets for `q`.
fn chorus_query(q: &Query, names: &Names) -> String {
    let mut s = if q.phrase {
        format!("\"{}\"", q.text)
    } else {
        q.text.clone()
    };
    if let Some(a) = q.author {
        s.push_str(&format!(" from:{}", names.authors[a]));
    }
    if let Some(c) = q.channel {
        s.push_str(&format!(" in:{}", names.channels[c]));
    }
    if let Some(d) = &q.after {
        s.push_str(&format!(" after:{d}"));
    }
    s
}

/// Runs `queries` from `searchers` concurrent searchers, each taking the next query when
/// its last is answered; the latencies, and each query's `total` in order.
async fn run_queries(
    api: &Api,
    names: &Names,
    queries: &[String],
    searchers: usize,
) -> anyhow::Result<(Histogram<u64>, Vec<u64>)> {
    let mut latency = crate::latency::histogram_us();
    let mut totals = vec![0; queries.len()];
    let mut answers = stream::iter(queries.iter().enumerate())
        .map(|(i, q)| async move {
            let started = Instant::now();
            let page = api.search(names, q, "relevance", None, PAGE).await?;
            anyhow::Ok((i, started.elapsed(), page.total))
        })
        .buffer_unordered(searchers);
    while let Some(r) = answers.next().await {
        let (i, took, total) = r?;
        crate::latency::record(&mut latency, took);
        totals[i] = total;
    }
    Ok((latency, totals))
}

/// What the freshness phase saw.
struct Freshness {
    /// Each acked message: its ID and token.
    acked: Vec<(String, String)>,
    found: usize,
    latency: Histogram<u64>,
    ack: Histogram<u64>,
    polls: u64,
    /// Each poll's request → response.
    poll: Histogram<u64>,
}

/// The unique token of freshness message `k`: four characters, a digit first (no corpus
/// word has one), so matched exactly and never one edit away.
fn token(k: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let (mut n, mut s) = (k, vec![DIGITS[k % 10]]);
    n /= 10;
    for _ in 0..3 {
        s.push(DIGITS[n % 36]);
        n /= 36;
    }
    String::from_utf8(s).expect("ASCII")
}

async fn freshness(
    api: &Api,
    names: &Names,
    shape: &SearchShape,
    corpus: &Corpus,
) -> anyhow::Result<Freshness> {
    let count = (shape.fresh_rate * shape.fresh_secs).round().max(1.0) as usize;
    ensure!(count <= 466_560, "more freshness messages than tokens");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = names
        .fresh
        .iter()
        .map(|channel| {
            let (api, done, names) = (api.clone(), done.clone(), names.clone());
            let q = format!("{MARKER} in:{channel}");
            tokio::spawn(async move { poll(&api, &names, &q, &done).await })
        })
        .collect();
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let posts: Vec<_> = (0..count)
        .map(|k| {
            let api = api.clone();
            let author = names.tokens[k % names.tokens.len()].clone();
            let channel = names.fresh[k % names.fresh.len()].clone();
            let mut text = corpus.message(u64::MAX - k as u64).text;
            text.push_str(&format!(" {MARKER} {}", token(k)));
            let at = start + Duration::from_secs_f64(k as f64 / shape.fresh_rate);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let posted = api.post(&author, &channel, &text).await?;
                anyhow::Ok((posted.id, Instant::now(), at.elapsed()))
            })
        })
        .collect();
    let mut acked = Vec::with_capacity(count);
    let mut ack = crate::latency::histogram_us();
    for (k, p) in posts.into_iter().enumerate() {
        let (id, at, took) = p.await.context("a freshness post panicked")??;
        crate::latency::record(&mut ack, took);
        let id: MessageId = id.parse().context("a message ID")?;
        acked.push((id, token(k), at));
    }
    // Each channel's messages in channel order: the one of rank `r` (from 1) is searchable
    // once a poll counts `r`.
    let per_channel = names.fresh.len();
    let mut ranked: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); per_channel];
    for (k, (id, _, at)) in acked.iter().enumerate() {
        ranked[k % per_channel].push((id.seq, *at));
    }
    for r in &mut ranked {
        r.sort_unstable_by_key(|(seq, _)| *seq);
    }
    tokio::time::sleep(FRESH_GIVE_UP).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latency = crate::latency::histogram_us();
    let mut poll_latency = crate::latency::histogram_us();
    let (mut found, mut polls) = (0, 0);
    for (p, ranked) in pollers.into_iter().zip(&ranked) {
        let (counts, took) = p.await.context("a poller panicked")??;
        poll_latency
            .add(&took)
            .expect("histograms of one shape add");
        polls += counts.len() as u64;
        for (r, (_, acked_at)) in ranked.iter().enumerate() {
            let first = counts.partition_point(|&(_, total)| total < r as u64 + 1);
            if let Some((at, _)) = counts.get(first) {
                crate::latency::record(&mut latency, at.saturating_duration_since(*acked_at));
                found += 1;
            }
        }
    }
    Ok(Freshness {
        acked: acked
            .into_iter()
            .map(|(id, t, _)| (id.to_string(), t))
            .collect(),
        found,
        latency,
        ack,
        polls,
        poll: poll_latency,
    })
}

/// One channel's poller: every [`POLL_EVERY`], asks for `q`'s `total` (one result, newest
/// first); returns each answer's time and count, and the polls' latencies. A channel is
/// one partition, indexed in log order, so its searchable messages are always its first
/// `total`: a message is searchable from the first answer that counts its rank.
async fn poll(
    api: &Api,
    names: &Names,
    q: &str,
    done: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<(Vec<(Instant, u64)>, Histogram<u64>)> {
    let mut counts = Vec::new();
    let mut took = crate::latency::histogram_us();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let next = tokio::time::Instant::now() + POLL_EVERY;
        let sent = Instant::now();
        let page = api.search(names, q, "newest", None, 1).await?;
        let now = Instant::now();
        crate::latency::record(&mut took, now - sent);
        counts.push((now, page.total));
        tokio::time::sleep_until(next).await;
    }
    Ok((counts, took))
}

/// Searches every [`TOKEN_CHECK_EVERY`]th freshness message by its token alone; how many
/// were searched and how many found.
async fn check_tokens(
    api: &Api,
    names: &Names,
    acked: &[(String, String)],
) -> anyhow::Result<(usize, usize)> {
    let (mut searched, mut found) = (0, 0);
    for (id, token) in acked.iter().step_by(TOKEN_CHECK_EVERY) {
        let page = api.search(names, token, "relevance", None, PAGE).await?;
        searched += 1;
        found += usize::from(page.results.iter().any(|h| &h.message.id == id));
    }
    Ok((searched, found))
}

/// The index's commit count and seconds committing, from the server's `/metrics`.
fn search_metrics(rt: &tokio::runtime::Runtime, api: &Api) -> anyhow::Result<(f64, f64)> {
    let base = api.base.trim_end_matches("/api/v1");
    let text = rt.block_on(async {
        let resp = api.client.get(format!("{base}/metrics")).send().await?;
        anyhow::Ok(resp.text().await?)
    })?;
    let value = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                k.ends_with(name).then(|| v.trim().parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    };
    Ok((
        value("search_index_commits_total"),
        value("search_index_commit_seconds_total"),
    ))
}

fn now_us() -> u64 {
    super::schedule::wall_ns() / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tokens are distinct, four characters, a digit first.
    #[test]
    fn tokens_are_distinct() {
        let all: std::collections::HashSet<String> = (0..50_000).map(token).collect();
        assert_eq!(all.len(), 50_000);
        assert!(all
            .iter()
            .all(|t| t.len() == 4 && t.as_bytes()[0].is_ascii_digit()));
    }
}

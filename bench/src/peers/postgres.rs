//! PostgreSQL 15 as the peer for `history` (the seeds' "PostgreSQL with partitioning"
//! alternative to Cassandra) and for `search` (full-text search with a `tsvector` column
//! and a GIN index, as Zulip uses it; see [`search`]).
//!
//! Messages live in one table keyed by `(channel_id, seq)`, whose primary-key index serves
//! the page query, hash-partitioned by channel (8 partitions; a channel's rows are all in
//! one). The channel is bulk-loaded with binary `COPY`, vacuumed and analysed (what
//! autovacuum would have done on a live table), and then `concurrency` readers each read
//! their share of pages at uniformly random `before` cursors:
//!
//! ```sql
//! SELECT seq, author_id, sent_at, body FROM messages
//! WHERE channel_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3
//! ```
//!
//! The cluster is our own: `initdb` into a fresh directory under `work_dir`, then
//! `postgres` on a loopback port with the default settings (`fsync = on`,
//! `synchronous_commit = on`, `shared_buffers = 128MB`), changing only what it must:
//! where it listens, no Unix socket, and `max_connections` when the readers need more.
//! PostgreSQL refuses to run as root, so when the harness is root the cluster runs as the
//! `postgres` system user that Debian's package creates; the data directory is given to
//! that user, and any directory above it that the user could not pass through gets the
//! search (`o+x`) bit, nothing more.

use super::{find_binary, free_port, fresh_dir, loopback, runtime, PeerProcess};
use crate::latency::histogram_us;
use crate::load::corpus::{Query, Rng};
use crate::load::procstat::{switches_between, thread_switches, Switches};
use crate::load::search::{PgJob, PgSearch};
use crate::load::{HistoryOutcome, HistoryShape, ServerUsage};
use anyhow::{bail, ensure, Context};
use futures::pin_mut;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

/// Bytes of text in each history message, as in the Chorus driver (`history message {i} `
/// padded with `h`).
pub const HISTORY_BODY_BYTES: usize = 100;
/// The channel the messages are in.
const CHANNEL_ID: i64 = 1;
/// Hash partitions of the messages table.
const PARTITIONS: usize = 8;
/// The seed of the readers' cursors; reader `r` uses `CURSOR_SEED ^ r`, so runs repeat.
pub const CURSOR_SEED: u64 = 0x5eed_c0de_2024_0006;
/// The superuser `initdb` creates; connections use it with `trust` auth on loopback.
const DB_USER: &str = "bench";
/// Connections PostgreSQL keeps beyond the readers (the loader, and its own reserve).
const CONNECTIONS_SPARE: usize = 10;
/// How long the server may take to accept a login once it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The page query, newest first below a cursor.
const PAGE_QUERY: &str = "SELECT seq, author_id, sent_at, body FROM messages \
                          WHERE channel_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";

/// Whether PostgreSQL's `initdb` and `postgres` are installed (and, when running as root,
/// the `postgres` user to run them as exists).
pub fn available() -> bool {
    binaries().is_some() && run_as().is_ok()
}

/// Runs `history` against PostgreSQL and returns what it measured.
pub fn history(shape: &HistoryShape, work_dir: &Path) -> anyhow::Result<HistoryOutcome> {
    ensure!(
        shape.page > 0,
        "history needs a page of at least one message"
    );
    ensure!(
        shape.messages >= shape.page,
        "history needs at least a page of messages"
    );
    ensure!(shape.concurrency > 0, "history needs at least one reader");
    let server = PgServer::start(work_dir, shape.concurrency + CONNECTIONS_SPARE)?;
    let outcome = runtime()?.block_on(async {
        let loader = server.connect().await?;
        let load = load_channel(&loader, shape.messages).await?;
        let usage = TreeUsage::start(server.pid());
        let mut readers = Vec::with_capacity(shape.concurrency);
        for r in 0..shape.concurrency {
            let client = server.connect().await?;
            let queries = shape.queries / shape.concurrency
                + usize::from(r < shape.queries % shape.concurrency);
            let shape = shape.clone();
            readers.push(tokio::spawn(async move {
                read_pages(&client, &shape, queries, CURSOR_SEED ^ r as u64).await
            }));
        }
        let (mut page, mut wrong) = (histogram_us(), 0);
        for reader in readers {
            let (latencies, bad) = reader.await.context("reader panicked")??;
            page.add(&latencies)
                .expect("histograms of one shape always add");
            wrong += bad;
        }
        anyhow::Ok(HistoryOutcome {
            page,
            load,
            wrong,
            server: usage.finish(),
        })
    })?;
    server.stop()?;
    Ok(outcome)
}

/// The `search` table: the messages with their `tsvector` as a stored generated column
/// (`to_tsvector('simple', body)`: lowercased words, no stemming and no stop words, the
/// closest of PostgreSQL's configurations to Chorus's folding), indexed with GIN.
const SEARCH_SCHEMA: &str = "CREATE TABLE messages (
    id bigint PRIMARY KEY,
    channel_id bigint NOT NULL,
    author_id bigint NOT NULL,
    created_at timestamptz NOT NULL,
    body text NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED
)";

/// Runs `search` against PostgreSQL: loads the rows with text `COPY` (the generated
/// column computes each `tsvector`), builds the GIN index, vacuums and analyses, then
/// answers the warm-up and measured queries from `job.searchers` connections at once, each
/// as one statement that returns the page of 20 by `ts_rank` with the exact count
/// (`count(*) OVER ()`), since Chorus's `total` is exact.
pub fn search(job: &PgJob<'_>, work_dir: &Path) -> anyhow::Result<PgSearch> {
    let server = PgServer::start(work_dir, job.searchers + CONNECTIONS_SPARE)?;
    let outcome = runtime()?.block_on(async {
        let loader = server.connect().await?;
        loader
            .batch_execute(SEARCH_SCHEMA)
            .await
            .context("creating the table")?;
        let cpu = tree_cpu_secs(server.pid());
        let started = Instant::now();
        copy_messages(&loader, job).await?;
        let load = started.elapsed();
        let started = Instant::now();
        loader
            .batch_execute("CREATE INDEX messages_tsv ON messages USING gin (tsv)")
            .await
            .context("building the GIN index")?;
        let index = started.elapsed();
        let load_cpu_secs = tree_cpu_secs(server.pid()) - cpu;
        loader
            .batch_execute("VACUUM ANALYZE messages")
            .await
            .context("VACUUM ANALYZE")?;
        let size = |sql: &'static str| {
            let loader = &loader;
            async move {
                let row = loader.query_one(sql, &[]).await?;
                anyhow::Ok(row.try_get::<_, i64>(0)? as u64)
            }
        };
        let table_bytes = size("SELECT pg_table_size('messages')").await?;
        let gin_bytes = size("SELECT pg_relation_size('messages_tsv')").await?;
        let mut clients = Vec::with_capacity(job.searchers);
        for _ in 0..job.searchers {
            clients.push(server.connect().await?);
        }
        pg_queries(&clients, job.warmup).await?;
        let (query, totals) = pg_queries(&clients, job.queries).await?;
        anyhow::Ok(PgSearch {
            load,
            index,
            load_cpu_secs,
            query,
            totals,
            table_bytes,
            gin_bytes,
        })
    })?;
    server.stop()?;
    Ok(outcome)
}

/// Loads every message of `job` with text `COPY` (the corpus has no tab, newline or
/// backslash, so its text needs no escaping; checked).
async fn copy_messages(client: &Client, job: &PgJob<'_>) -> anyhow::Result<()> {
    use futures::SinkExt;
    let sink = client
        .copy_in("COPY messages (id, channel_id, author_id, created_at, body) FROM STDIN")
        .await
        .context("starting COPY")?;
    pin_mut!(sink);
    let mut buf = bytes::BytesMut::with_capacity(1 << 20);
    for (i, at) in job.created_at.iter().enumerate() {
        let m = job.corpus.message(i as u64);
        ensure!(
            !m.text.contains(['\t', '\n', '\r', '\\']),
            "message {i} needs COPY escaping"
        );
        buf.extend_from_slice(
            format!("{i}\t{}\t{}\t{at}\t{}\n", m.channel, m.author, m.text).as_bytes(),
        );
        if buf.len() >= 1 << 20 {
            sink.send(buf.split().freeze()).await.context("COPY data")?;
        }
    }
    sink.send(buf.freeze()).await.context("COPY data")?;
    let rows = sink.as_mut().finish().await.context("finishing COPY")?;
    ensure!(
        rows == job.created_at.len() as u64,
        "COPY loaded {rows} rows of {}",
        job.created_at.len()
    );
    Ok(())
}

/// The statement answering `q`: the page by rank with the exact count. `after:` is
/// exclusive of its (UTC) day, as in Chorus.
fn search_sql(q: &Query) -> String {
    let tsquery = if q.phrase {
        "phraseto_tsquery"
    } else {
        "plainto_tsquery"
    };
    let mut sql = format!(
        "SELECT id, channel_id, author_id, created_at, body, count(*) OVER () \
         FROM messages, {tsquery}('simple', $1) q WHERE tsv @@ q"
    );
    let mut n = 1;
    let mut param = |sql: &mut String, clause: &str| {
        n += 1;
        sql.push_str(&clause.replace('$', &format!("${n}")));
    };
    if q.author.is_some() {
        param(&mut sql, " AND author_id = $");
    }
    if q.channel.is_some() {
        param(&mut sql, " AND channel_id = $");
    }
    if q.after.is_some() {
        param(
            &mut sql,
            " AND created_at >= (($::text::date + 1)::timestamp AT TIME ZONE 'UTC')",
        );
    }
    sql.push_str(&format!(
        " ORDER BY ts_rank(tsv, q) DESC LIMIT {}",
        crate::load::search::PAGE
    ));
    sql
}

/// Runs `queries` from each of `clients` in turn, each taking the next query when its
/// last is answered; the latencies (request → rows parsed) and each query's count.
async fn pg_queries(
    clients: &[Client],
    queries: &[Query],
) -> anyhow::Result<(Histogram<u64>, Vec<u64>)> {
    use futures::stream::{self, StreamExt};
    use tokio_postgres::types::ToSql;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let per_client = clients.iter().map(|client| {
        let next = &next;
        async move {
            let mut statements = HashMap::new();
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(q) = queries.get(i) else {
                    return anyhow::Ok(out);
                };
                let sql = search_sql(q);
                if !statements.contains_key(&sql) {
                    let st = client.prepare(&sql).await.context("preparing a search")?;
                    statements.insert(sql.clone(), st);
                }
                let (author, channel) = (q.author.map(|a| a as i64), q.channel.map(|c| c as i64));
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&q.text];
                params.extend(author.as_ref().map(|a| a as &(dyn ToSql + Sync)));
                params.extend(channel.as_ref().map(|c| c as &(dyn ToSql + Sync)));
                params.extend(q.after.as_ref().map(|d| d as &(dyn ToSql + Sync)));
                let started = Instant::now();
                let rows = client
                    .query(&statements[&sql], &params)
                    .await
                    .with_context(|| format!("search {sql}"))?;
                let mut total = 0;
                for row in &rows {
                    let _: (i64, i64, i64, SystemTime, String) = (
                        row.try_get(0)?,
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                        row.try_get(4)?,
                    );
                    total = row.try_get::<_, i64>(5)? as u64;
                }
                out.push((i, started.elapsed(), total));
            }
        }
    });
    let mut latency = histogram_us();
    let mut totals = vec![0; queries.len()];
    let mut all = stream::iter(per_client).buffer_unordered(clients.len());
    while let Some(done) = all.next().await {
        for (i, took, total) in done? {
            crate::latency::record(&mut latency, took);
            totals[i] = total;
        }
    }
    Ok((latency, totals))
}

/// Creates the partitioned table and loads `messages` messages into the channel with
/// binary `COPY`; returns how long the `COPY` took. Then vacuums and analyses the table
/// (not counted), as autovacuum would have on a live one.
async fn load_channel(client: &Client, messages: usize) -> anyhow::Result<Duration> {
    let mut schema = String::from(
        "CREATE TABLE messages (
             channel_id bigint NOT NULL,
             seq bigint NOT NULL,
             author_id bigint NOT NULL,
             sent_at timestamptz NOT NULL,
             body text NOT NULL,
             PRIMARY KEY (channel_id, seq)
         ) PARTITION BY HASH (channel_id);",
    );
    for p in 0..PARTITIONS {
        schema.push_str(&format!(
            "CREATE TABLE messages_p{p} PARTITION OF messages \
             FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {p});"
        ));
    }
    client
        .batch_execute(&schema)
        .await
        .context("creating the table")?;
    let started = Instant::now();
    let sink = client
        .copy_in(
            "COPY messages (channel_id, seq, author_id, sent_at, body) FROM STDIN (FORMAT binary)",
        )
        .await
        .context("starting COPY")?;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let epoch = SystemTime::now() - Duration::from_secs(messages as u64);
    for seq in 1..=messages as i64 {
        let author = seq % 1_000;
        let sent_at = epoch + Duration::from_secs(seq as u64);
        let body = history_body(seq);
        writer
            .as_mut()
            .write(&[&CHANNEL_ID, &seq, &author, &sent_at, &body])
            .await
            .context("COPY row")?;
    }
    let rows = writer.as_mut().finish().await.context("finishing COPY")?;
    let load = started.elapsed();
    ensure!(
        rows == messages as u64,
        "COPY loaded {rows} rows of {messages}"
    );
    client
        .batch_execute("VACUUM ANALYZE messages")
        .await
        .context("VACUUM ANALYZE")?;
    Ok(load)
}

/// The text of message `seq`, the same shape as the Chorus driver's history messages.
fn history_body(seq: i64) -> String {
    let mut text = format!("history message {seq} ");
    text.extend(std::iter::repeat_n(
        'h',
        HISTORY_BODY_BYTES.saturating_sub(text.len()),
    ));
    text
}

/// One reader: `queries` page reads at random cursors, each timed from the request to the
/// parsed page; returns the latencies and the number of wrong pages.
async fn read_pages(
    client: &Client,
    shape: &HistoryShape,
    queries: usize,
    seed: u64,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let statement = client
        .prepare(PAGE_QUERY)
        .await
        .context("preparing the page query")?;
    let mut cursors = Rng::new(seed, 0);
    let (mut latencies, mut wrong) = (histogram_us(), 0);
    let limit = shape.page as i64;
    // Cursors from `page + 1` to `messages + 1`: every page is full.
    let span = (shape.messages - shape.page + 1) as u64;
    for _ in 0..queries {
        let before = (shape.page as u64 + 1 + cursors.next_u64() % span) as i64;
        let started = Instant::now();
        let rows = client
            .query(&statement, &[&CHANNEL_ID, &before, &limit])
            .await
            .context("page query")?;
        let page: Vec<(i64, i64, SystemTime, String)> = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                    row.try_get(3)?,
                ))
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .context("parsing a page")?;
        crate::latency::record(&mut latencies, started.elapsed());
        if !page_is_right(&page, before, shape.page) {
            wrong += 1;
        }
    }
    Ok((latencies, wrong))
}

/// Whether `page` holds exactly the `len` messages below `before`, newest first, each with
/// its own text.
fn page_is_right(page: &[(i64, i64, SystemTime, String)], before: i64, len: usize) -> bool {
    page.len() == len
        && page.iter().zip(1..).all(|((seq, author, _, body), back)| {
            *seq == before - back && *author == seq % 1_000 && *body == history_body(*seq)
        })
}

/// The PostgreSQL programs this peer runs.
struct PgBinaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

/// `initdb` and `postgres` from `PATH`, or from the newest `/usr/lib/postgresql/*/bin`.
fn binaries() -> Option<PgBinaries> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    let extra: Vec<PathBuf> = versions.into_iter().map(|(_, dir)| dir).collect();
    Some(PgBinaries {
        initdb: find_binary("initdb", &extra)?,
        postgres: find_binary("postgres", &extra)?,
    })
}

/// The user and group to run PostgreSQL as: `None` to run as ourselves, or the `postgres`
/// user's ids when we are root (PostgreSQL refuses to run as root).
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: getpwnam reads the user database and returns a pointer to static storage,
    // which is copied out at once; no other thread of the harness calls the getpw*
    // functions.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        bail!("running as root, and there is no `postgres` user to run PostgreSQL as");
    }
    // SAFETY: entry is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

/// Gives `data` to `uid` and makes every directory above it passable by that user, adding
/// only the search bit for others where it is missing.
fn hand_over(data: &Path, (uid, gid): (u32, u32)) -> anyhow::Result<()> {
    std::os::unix::fs::chown(data, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", data.display()))?;
    for dir in data.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
        let mode = meta.permissions().mode();
        if meta.uid() != uid && mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("chmod o+x {}", dir.display()))?;
        }
    }
    Ok(())
}

/// A PostgreSQL cluster of our own, started on a loopback port.
struct PgServer {
    process: PeerProcess,
    port: u16,
}

impl PgServer {
    fn start(work_dir: &Path, max_connections: usize) -> anyhow::Result<PgServer> {
        let bins = binaries().context("PostgreSQL is not installed (bench/setup-peers.sh)")?;
        let user = run_as()?;
        let dir = fresh_dir(work_dir, "postgres-history")?;
        let data = dir.join("data");
        std::fs::create_dir(&data)?;
        if let Some(user) = user {
            hand_over(&data, user)?;
        }
        let as_user = |program: &Path| {
            let mut command = Command::new(program);
            command.current_dir(&data);
            if let Some((uid, gid)) = user {
                command.uid(uid).gid(gid);
            }
            command
        };
        let output = as_user(&bins.initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let port = free_port()?;
        let mut command = as_user(&bins.postgres);
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args([
                "-c",
                &format!("max_connections={}", max_connections.max(100)),
            ]);
        // SIGINT is PostgreSQL's "fast" shutdown: clients are cut off, data is flushed.
        let log = dir.join("postgres.log");
        let mut process = PeerProcess::spawn("postgres", command, log, libc::SIGINT)?;
        process.wait_listening(loopback(port))?;
        Ok(PgServer { process, port })
    }

    /// A client connection; retried while the server is still starting up.
    async fn connect(&self) -> anyhow::Result<Client> {
        let config = format!(
            "host=127.0.0.1 port={} user={DB_USER} dbname=postgres",
            self.port
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match tokio_postgres::connect(&config, NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    return Ok(client);
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "connecting to postgres {}",
                        self.process.log_tail()
                    ))
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn stop(self) -> anyhow::Result<()> {
        self.process.stop()
    }
}

/// CPU and memory of a process and all its children: PostgreSQL does its work in one
/// backend process per connection, forked by the postmaster, so the postmaster alone
/// would show almost nothing.
struct TreeUsage {
    root: u32,
    cpu_start: f64,
    switches_start: HashMap<u32, Switches>,
}

impl TreeUsage {
    fn start(root: u32) -> TreeUsage {
        TreeUsage {
            root,
            cpu_start: tree_cpu_secs(root),
            switches_start: tree_switches(root),
        }
    }

    /// CPU since the start, and memory now. Memory is the sum of proportional set sizes
    /// (`Pss`), which counts pages shared between the processes (`shared_buffers`) once,
    /// where a sum of RSS would count them in every backend that touched them.
    fn finish(&self) -> ServerUsage {
        let tree = process_tree(self.root);
        let (voluntary, involuntary) =
            switches_between(&self.switches_start, &tree_switches(self.root));
        ServerUsage {
            cpu_secs: (tree_cpu_secs(self.root) - self.cpu_start).max(0.0),
            rss_bytes: tree.iter().filter_map(|&pid| pss_bytes(pid)).sum(),
            voluntary_switches: voluntary,
            involuntary_switches: involuntary,
        }
    }
}

/// The context switches of every thread of every process in the tree under `root`, by
/// thread id (unique across processes). A backend that exits takes its switches with it.
fn tree_switches(root: u32) -> HashMap<u32, Switches> {
    process_tree(root)
        .into_iter()
        .flat_map(thread_switches)
        .collect()
}

/// `root` and every process descended from it.
fn process_tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_fields(pid)?.ppid)))
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// CPU seconds used by the tree under `root`: the live processes' own time, plus the time
/// of the root's children that have already exited (which the kernel adds to the root's
/// `cutime`/`cstime` when it reaps them).
fn tree_cpu_secs(root: u32) -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let reaped = stat_fields(root).map_or(0, |f| f.children_ticks);
    let own: u64 = process_tree(root)
        .iter()
        .filter_map(|&pid| stat_fields(pid))
        .map(|f| f.own_ticks)
        .sum();
    (own + reaped) as f64 / ticks_per_s
}

/// The fields of `/proc/PID/stat` this module uses.
struct StatFields {
    ppid: u32,
    own_ticks: u64,
    children_ticks: u64,
}

fn stat_fields(pid: u32) -> Option<StatFields> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses `/proc/PID/stat`, counting fields after the command name's closing `)` (the
/// name may hold spaces): state is field 3, ppid 4, utime 14, stime 15, cutime 16, cstime
/// 17.
fn parse_stat(stat: &str) -> Option<StatFields> {
    let rest: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
    Some(StatFields {
        ppid: u32::try_from(field(4)?).ok()?,
        own_ticks: field(14)? + field(15)?,
        children_ticks: field(16)? + field(17)?,
    })
}

/// The proportional set size of `pid` in bytes, from `/proc/PID/smaps_rollup`.
fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fields are counted after a command name with spaces and parentheses.
    #[test]
    fn parses_stat() {
        let stat = "77 (postgres: bench (x)) S 76 2 3 4 5 6 7 8 9 10 250 75 30 12 20 0 3 0";
        let f = parse_stat(stat).unwrap();
        assert_eq!((f.ppid, f.own_ticks, f.children_ticks), (76, 325, 42));
    }

    // A page is right only if it is the full run of messages below the cursor, newest
    // first, with their own texts.
    #[test]
    fn page_check() {
        let row = |seq: i64| (seq, seq % 1_000, SystemTime::UNIX_EPOCH, history_body(seq));
        let good: Vec<_> = [9, 8, 7].into_iter().map(row).collect();
        assert!(page_is_right(&good, 10, 3));
        assert!(!page_is_right(&good, 11, 3));
        assert!(!page_is_right(&good[..2], 10, 3));
        let mut bad = good.clone();
        bad[1].3 = history_body(5);
        assert!(!page_is_right(&bad, 10, 3));
        assert_eq!(history_body(42).len(), HISTORY_BODY_BYTES);
    }

    // This process's tree holds at least itself, and its memory reads as positive.
    #[test]
    fn reads_own_tree() {
        let me = std::process::id();
        assert!(process_tree(me).contains(&me));
        assert!(tree_cpu_secs(me) >= 0.0);
        assert!(pss_bytes(me).unwrap() > 0);
        assert!(
            tree_switches(me).contains_key(&me),
            "the main thread's tid is the pid"
        );
    }
}

//! `files`: the file benchmark of issue 14, each figure against a limit measured in the
//! same run.
//!
//! 1. **Upload throughput**: `upload_files` files of `upload_bytes` each, one at a time,
//!    over HTTP multipart to the real `chorus` server, against the raw sequential write
//!    bandwidth of the same filesystem (the same number of files of the same size written
//!    with `write` + `fsync` into the server's data directory). Each upload has a raw
//!    write just before and just after it, so both see the same machine, and each figure
//!    is the file size over the median time (of the uploads; of the raw writes). On this
//!    virtual disk the raw rate of a run ranged from 196 to 1,079 MiB/s within a quarter
//!    of an hour; with sums of times, one stalled write moved a run's ratio by a third.
//! 2. **Thumbnail**: a photo-like `thumb_w` × `thumb_h` JPEG (gradient plus noise), made
//!    into a thumb by the server's real path, a `chorus preview-worker --kind thumb`
//!    process, against `vipsthumbnail -s 360` on the same file; medians of `thumb_runs`
//!    runs each. The in-process time of the same code (`preview::make`) is shown too.
//! 3. **Preview latency**: open-loop uploads of a `preview_w` × `preview_h` JPEG at
//!    `preview_rate` per second for `preview_secs`; each upload's `thumb` is polled until
//!    200. Latency runs from the upload's intended send time to the first 200.

use super::seed;
use super::server::{self, ChorusServer, ServerSettings};
use anyhow::{bail, ensure, Context};
use chorus_gateway::files::preview::{self, THUMB_SIDE_MAX};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The multipart boundary of every upload.
const BOUNDARY: &str = "chorus-bench-files-boundary-7f3a";
/// How often a pending preview is asked for again.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How long a preview may take before the run counts it as never ready.
const PREVIEW_GIVE_UP: Duration = Duration::from_secs(120);
/// The worker's limits, as the server's defaults give them.
const WORKER_MEMORY_BYTES: u64 = 2 << 30;
const WORKER_CPU_S: u64 = 30;

/// The sizes of a `files` run.
#[derive(Clone, Debug)]
pub struct FilesShape {
    /// Files uploaded (and raw-written) for the throughput figure.
    pub upload_files: usize,
    /// Bytes of each.
    pub upload_bytes: usize,
    /// The thumbnail source JPEG's size.
    pub thumb_w: u32,
    /// See `thumb_w`.
    pub thumb_h: u32,
    /// Runs of each thumbnailer; the median counts.
    pub thumb_runs: usize,
    /// The preview-latency JPEG's size.
    pub preview_w: u32,
    /// See `preview_w`.
    pub preview_h: u32,
    /// Uploads per second in the preview-latency part.
    pub preview_rate: f64,
    /// Seconds of uploads in the preview-latency part.
    pub preview_secs: f64,
    /// Fail when `vipsthumbnail` is missing instead of skipping the comparison.
    pub require_vips: bool,
}

impl FilesShape {
    /// The sizes: 20 MiB uploads, a 4000×3000 JPEG, 20 uploads/s for 10 s of a
    /// 1600×1200 JPEG.
    pub fn standard() -> FilesShape {
        FilesShape {
            upload_files: 10,
            upload_bytes: 20 << 20,
            thumb_w: 4000,
            thumb_h: 3000,
            thumb_runs: 5,
            preview_w: 1600,
            preview_h: 1200,
            preview_rate: 20.0,
            preview_secs: 10.0,
            require_vips: false,
        }
    }

    /// A size that runs in seconds on a debug build.
    pub fn smoke() -> FilesShape {
        FilesShape {
            upload_files: 2,
            upload_bytes: 1 << 20,
            thumb_w: 400,
            thumb_h: 300,
            thumb_runs: 3,
            preview_w: 400,
            preview_h: 300,
            preview_rate: 5.0,
            preview_secs: 1.0,
            require_vips: false,
        }
    }
}

/// What the upload-throughput part measured.
#[derive(Debug, Clone, Copy)]
pub struct UploadFigures {
    /// Raw `write` + `fsync` bandwidth, bytes per second.
    pub raw_bytes_per_s: f64,
    /// Upload throughput (request sent → 201 read), bytes per second.
    pub upload_bytes_per_s: f64,
    /// Uploads answered 201, of `upload_files`.
    pub uploads_created: usize,
}

impl UploadFigures {
    /// Upload throughput as a fraction of the raw write bandwidth.
    pub fn ratio(&self) -> f64 {
        self.upload_bytes_per_s / self.raw_bytes_per_s
    }

    /// The table's header and its upload row.
    pub fn table(&self, shape: &FilesShape) -> String {
        let mib = |b: f64| b / f64::from(1u32 << 20);
        let mut t = String::new();
        t.push_str("| measure | Chorus | limit / peer | ratio | target |\n");
        t.push_str("|---|---|---|---|---|\n");
        t.push_str(&format!(
            "| upload {} × {:.0} MiB (MiB/s) | {:.1} | raw write+fsync {:.1} | {:.2} | ≥ 0.50 |\n",
            shape.upload_files,
            mib(shape.upload_bytes as f64),
            mib(self.upload_bytes_per_s),
            mib(self.raw_bytes_per_s),
            self.ratio()
        ));
        t
    }
}

/// What a `files` run measured.
#[derive(Debug)]
pub struct FilesOutcome {
    /// Upload throughput against raw writes.
    pub uploads: UploadFigures,
    /// The thumb's size as the worker reported it.
    pub thumb_size: (u32, u32),
    /// Median wall time of a `chorus preview-worker --kind thumb` process.
    pub thumb_worker: Duration,
    /// Median time of the same code called in this process.
    pub thumb_in_process: Duration,
    /// Median wall time of `vipsthumbnail`, and its output's size; `None` when it is not
    /// installed.
    pub vips: Option<(Duration, (u32, u32))>,
    /// Upload intended time → first 200 of its `thumb`, microseconds.
    pub preview: Histogram<u64>,
    /// Upload intended time → 201, microseconds, in the preview part.
    pub preview_upload: Histogram<u64>,
    /// Uploads sent in the preview part.
    pub preview_sent: usize,
    /// Of those, the ones whose thumb became ready.
    pub previews_ready: usize,
}

impl FilesOutcome {
    /// The worker's thumb time over vips's, when vips ran.
    pub fn thumb_ratio(&self) -> Option<f64> {
        self.vips
            .map(|(v, _)| self.thumb_worker.as_secs_f64() / v.as_secs_f64())
    }

    /// The printed table.
    pub fn table(&self, shape: &FilesShape) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1e3;
        let mut t = self.uploads.table(shape);
        let (vips_cell, ratio_cell) = match (self.vips, self.thumb_ratio()) {
            (Some((v, (w, h))), Some(r)) => (
                format!("vipsthumbnail {:.1} ms ({w}×{h})", ms(v)),
                format!("{r:.2}"),
            ),
            _ => ("vipsthumbnail not installed".into(), "-".into()),
        };
        t.push_str(&format!(
            "| thumb of {}×{} JPEG, worker process (ms, median of {}) | {:.1} ({}×{}; in-process {:.1}) | {vips_cell} | {ratio_cell} | ≤ 2.00 |\n",
            shape.thumb_w,
            shape.thumb_h,
            shape.thumb_runs,
            ms(self.thumb_worker),
            self.thumb_size.0,
            self.thumb_size.1,
            ms(self.thumb_in_process),
        ));
        t.push_str(&format!(
            "| upload → thumb ready, {}×{} JPEG at {}/s for {} s (ms) | p50 {:.1}, p99 {:.1}, max {:.1}; {}/{} ready | upload → 201 p50 {:.1}, p99 {:.1} | - | p99 reported |\n",
            shape.preview_w,
            shape.preview_h,
            shape.preview_rate,
            shape.preview_secs,
            q(&self.preview, 0.5),
            q(&self.preview, 0.99),
            self.preview.max() as f64 / 1e3,
            self.previews_ready,
            self.preview_sent,
            q(&self.preview_upload, 0.5),
            q(&self.preview_upload, 0.99),
        ));
        t
    }
}

/// A server on freshly seeded data in a directory of its own, and a client of it.
struct Bench {
    dir: tempfile::TempDir,
    server: ChorusServer,
    rt: tokio::runtime::Runtime,
    up: Uploader,
}

impl Bench {
    /// Seeds a workspace and its owner, and starts `binary` on it.
    fn start(binary: &Path, work_root: &Path, progress: &ProgressBar) -> anyhow::Result<Bench> {
        std::fs::create_dir_all(work_root)?;
        let dir = tempfile::Builder::new()
            .prefix("chorus-bench-files-")
            .tempdir_in(work_root)?;
        let settings = ServerSettings::default();
        let data = server::data_dir(dir.path());
        progress.set_message("files: seeding");
        let engine = seed::open_engine(&data, &settings)?;
        let pop = seed::users_in_channels(&engine, 0, 0, progress);
        engine.shutdown();
        let pop = pop?;
        let token = seed::mint_tokens(&data, &[pop.owner])?.remove(0);
        let server = ChorusServer::start(binary, dir.path(), &settings)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let up = Uploader {
            client: reqwest::Client::new(),
            base: format!("http://{}/api/v1", server.addr),
            token,
            workspace: pop.workspace.to_string(),
        };
        Ok(Bench {
            dir,
            server,
            rt,
            up,
        })
    }

    fn stop(self) -> anyhow::Result<()> {
        drop(self.rt);
        self.server.stop()
    }
}

/// 1. Upload throughput against raw write + fsync on the same filesystem.
fn upload_throughput(
    bench: &Bench,
    shape: &FilesShape,
    progress: &ProgressBar,
) -> anyhow::Result<UploadFigures> {
    progress.set_message("files: uploads against raw writes");
    let raw_dir = server::data_dir(bench.dir.path()).join("bench-raw-writes");
    std::fs::create_dir_all(&raw_dir)?;
    let (mut raw_times, mut upload_times, mut created) = (Vec::new(), Vec::new(), 0);
    let raw_write = |path: &Path, bytes: &[u8]| -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        let took = started.elapsed();
        std::fs::remove_file(path)?;
        Ok(took)
    };
    let up = &bench.up;
    for i in 0..shape.upload_files {
        let bytes = noise_file(i as u64, shape.upload_bytes);
        let path = raw_dir.join(format!("raw-{i}"));
        raw_times.push(raw_write(&path, &bytes)?);
        let body = up.form(&format!("blob-{i}.bin"), "application/octet-stream", &bytes);
        let started = Instant::now();
        let (status, _) = bench.rt.block_on(up.post(body))?;
        upload_times.push(started.elapsed());
        created += usize::from(status == 201);
        raw_times.push(raw_write(&path, &bytes)?);
    }
    std::fs::remove_dir(&raw_dir)?;
    let file = shape.upload_bytes as f64;
    Ok(UploadFigures {
        raw_bytes_per_s: file / median(raw_times).as_secs_f64(),
        upload_bytes_per_s: file / median(upload_times).as_secs_f64(),
        uploads_created: created,
    })
}

/// Runs only the upload-throughput part of the `files` benchmark.
pub fn run_uploads(
    binary: &Path,
    work_root: &Path,
    shape: &FilesShape,
    progress: &ProgressBar,
) -> anyhow::Result<UploadFigures> {
    ensure!(shape.upload_files > 0, "nothing to measure");
    let bench = Bench::start(binary, work_root, progress)?;
    let uploads = upload_throughput(&bench, shape, progress)?;
    bench.stop()?;
    Ok(uploads)
}

/// Runs the `files` benchmark against `binary`, in a fresh directory under `work_root`.
pub fn run(
    binary: &Path,
    work_root: &Path,
    shape: &FilesShape,
    progress: &ProgressBar,
) -> anyhow::Result<FilesOutcome> {
    ensure!(
        shape.upload_files > 0 && shape.thumb_runs > 0,
        "nothing to measure"
    );
    let bench = Bench::start(binary, work_root, progress)?;
    let uploads = upload_throughput(&bench, shape, progress)?;
    let dir = bench.dir.path();

    // 2. The thumb of a big JPEG: the worker process, in-process, and vips.
    progress.set_message("files: thumbnails");
    let jpeg = photo_jpeg(shape.thumb_w, shape.thumb_h, 1)?;
    let input = dir.join("photo.jpg");
    std::fs::write(&input, &jpeg)?;
    let mut worker_times = Vec::new();
    let mut thumb_size = (0, 0);
    for r in 0..shape.thumb_runs {
        let out = dir.join(format!("worker-thumb-{r}.png"));
        let started = Instant::now();
        let output = Command::new(binary)
            .args(["preview-worker", "--kind", "thumb", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .args(["--name", "photo.jpg", "--memory-bytes"])
            .arg(WORKER_MEMORY_BYTES.to_string())
            .arg("--cpu-s")
            .arg(WORKER_CPU_S.to_string())
            .output()?;
        worker_times.push(started.elapsed());
        ensure!(
            output.status.success(),
            "preview-worker failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let made: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let dim = |k: &str| made[k].as_u64().unwrap_or(0) as u32;
        thumb_size = (dim("width"), dim("height"));
        ensure!(
            image::image_dimensions(&out)? == thumb_size,
            "the worker's PNG is not the size it reported"
        );
    }
    let mut in_process = Vec::new();
    for _ in 0..shape.thumb_runs {
        let started = Instant::now();
        let made = preview::make("thumb", jpeg.clone(), "photo.jpg")
            .map_err(|e| anyhow::anyhow!("in-process thumb: {e}"))?;
        in_process.push(started.elapsed());
        ensure!(
            (made.width, made.height) == thumb_size,
            "in-process thumb size"
        );
    }
    let vips = if vips_installed() {
        let mut times = Vec::new();
        let mut size = (0, 0);
        for r in 0..shape.thumb_runs {
            let out = dir.join(format!("vips-thumb-{r}.png"));
            let started = Instant::now();
            let output = Command::new("vipsthumbnail")
                .arg(&input)
                .arg("-s")
                .arg(THUMB_SIDE_MAX.to_string())
                .arg("-o")
                .arg(&out)
                .output()?;
            times.push(started.elapsed());
            ensure!(
                output.status.success(),
                "vipsthumbnail failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            size = image::image_dimensions(&out)?;
        }
        Some((median(times), size))
    } else if shape.require_vips {
        bail!("vipsthumbnail is not installed (bench/setup-peers.sh installs libvips-tools)");
    } else {
        None
    };

    // 3. Upload → thumb ready, open loop.
    progress.set_message("files: preview latency");
    let small = photo_jpeg(shape.preview_w, shape.preview_h, 2)?;
    let count = (shape.preview_rate * shape.preview_secs).round().max(1.0) as usize;
    let (preview, preview_upload, ready) = bench.rt.block_on(preview_latency(
        &bench.up,
        &small,
        count,
        shape.preview_rate,
    ))?;
    bench.stop()?;
    Ok(FilesOutcome {
        uploads,
        thumb_size,
        thumb_worker: median(worker_times),
        thumb_in_process: median(in_process),
        vips,
        preview,
        preview_upload,
        preview_sent: count,
        previews_ready: ready,
    })
}

/// Whether `vipsthumbnail` is on the PATH.
pub fn vips_installed() -> bool {
    Command::new("vipsthumbnail")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[derive(Clone)]
struct Uploader {
    client: reqwest::Client,
    base: String,
    token: String,
    workspace: String,
}

impl Uploader {
    /// A whole multipart form: `workspace_id`, then `file`.
    fn form(&self, name: &str, content_type: &str, bytes: &[u8]) -> Vec<u8> {
        let mut body = Vec::with_capacity(bytes.len() + 512);
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"workspace_id\"\r\n\r\n\
                 {}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{name}\"\r\nContent-Type: {content_type}\r\n\r\n",
                self.workspace
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    /// Posts a form; the status and the new file's ID (on 201).
    async fn post(&self, body: Vec<u8>) -> anyhow::Result<(u16, Option<String>)> {
        let resp = self
            .client
            .post(format!("{}/files/upload", self.base))
            .bearer_auth(&self.token)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.bytes().await?;
        let id = if status == 201 {
            let v: serde_json::Value = serde_json::from_slice(&text)?;
            v["file"]["id"].as_str().map(str::to_owned)
        } else {
            None
        };
        Ok((status, id))
    }

    /// Polls a file's `thumb` until 200; `false` on 404 or after the give-up time.
    async fn wait_thumb(&self, fid: &str) -> anyhow::Result<bool> {
        let url = format!("{}/files/{fid}/preview/thumb", self.base);
        let deadline = Instant::now() + PREVIEW_GIVE_UP;
        while Instant::now() < deadline {
            let resp = self
                .client
                .get(&url)
                .bearer_auth(&self.token)
                .send()
                .await?;
            match resp.status().as_u16() {
                200 => {
                    resp.bytes().await?;
                    return Ok(true);
                }
                202 => {
                    resp.bytes().await?;
                    tokio::time::sleep(POLL_EVERY).await;
                }
                _ => return Ok(false),
            }
        }
        Ok(false)
    }
}

/// Uploads `count` copies of `jpeg` (each made distinct by a comment segment, so no two
/// share a blob) at `rate` per second, and waits for each one's thumb.
async fn preview_latency(
    up: &Uploader,
    jpeg: &[u8],
    count: usize,
    rate: f64,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>, usize)> {
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let up = up.clone();
            let body = up.form(&format!("p{i}.jpg"), "image/jpeg", &unique_jpeg(jpeg, i));
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let (status, id) = up.post(body).await?;
                let uploaded = at.elapsed();
                let (Some(id), 201) = (id, status) else {
                    bail!("preview upload {i} answered {status}");
                };
                let ready = up.wait_thumb(&id).await?;
                Ok::<_, anyhow::Error>((uploaded, ready.then(|| at.elapsed())))
            })
        })
        .collect();
    let mut preview = crate::latency::histogram_us();
    let mut uploaded = crate::latency::histogram_us();
    let mut ready = 0;
    for t in tasks {
        let (u, r) = t.await.context("a preview task panicked")??;
        crate::latency::record(&mut uploaded, u);
        if let Some(r) = r {
            crate::latency::record(&mut preview, r);
            ready += 1;
        }
    }
    Ok((preview, uploaded, ready))
}

/// `len` bytes of noise from `seed`, starting with a text tag so that no magic number is
/// sniffed in them.
fn noise_file(seed: u64, len: usize) -> Vec<u8> {
    let mut out = format!("chorus bench file {seed}\n").into_bytes();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A photo-like JPEG: smooth gradients with per-pixel noise, quality 85.
pub fn photo_jpeg(w: u32, h: u32, seed: u64) -> anyhow::Result<Vec<u8>> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let img = image::RgbImage::from_fn(w, h, |px, py| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (x & 0x1f) as i32 - 16;
        let fx = px as f32 / w as f32;
        let fy = py as f32 / h as f32;
        let c = |v: f32| (v * 255.0) as i32 + n;
        let r = c(0.5 + 0.5 * (fx * 6.0).sin() * fy);
        let g = c(fy * 0.8 + 0.1 * (fx * 17.0 + fy * 5.0).cos());
        let b = c(1.0 - fx * 0.7);
        image::Rgb([
            r.clamp(0, 255) as u8,
            g.clamp(0, 255) as u8,
            b.clamp(0, 255) as u8,
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(&img)?;
    Ok(out)
}

/// `jpeg` with a COM segment holding `i` right after its SOI marker: the same picture,
/// different bytes.
fn unique_jpeg(jpeg: &[u8], i: usize) -> Vec<u8> {
    let text = format!("chorus bench {i}");
    let mut out = Vec::with_capacity(jpeg.len() + text.len() + 4);
    out.extend_from_slice(&jpeg[..2]);
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((text.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    // The comment segment keeps the JPEG decodable and the same size.
    #[test]
    fn unique_jpegs_decode() {
        let jpeg = photo_jpeg(40, 30, 3).unwrap();
        let a = unique_jpeg(&jpeg, 1);
        assert_ne!(a, unique_jpeg(&jpeg, 2));
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), (40, 30));
    }
}

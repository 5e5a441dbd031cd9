//! Making previews, inside the `chorus preview-worker` process: the decoders of untrusted
//! files run here and nowhere else.
//!
//! The server starts one worker per preview ([`super::previews`]); the worker first limits
//! itself (`setrlimit` on its address space and CPU time), then reads the file, writes the
//! preview, and prints its dimensions. A decoder that crashes, hangs, or is fed a bomb takes
//! down this process only, and the server records the file as having no preview.
//!
//! Kinds (`API.md` §11): `thumb`, a PNG whose longest side is at most 360 px, never
//! upscaled, of a PNG, JPEG, GIF or WebP image (decoded by `image` with decoder limits,
//! resized by `fast_image_resize`); `page1`, a PNG of a PDF's first page, longest side
//! 1024 px (`hayro`); `code`, syntax-highlighted HTML of the first 200 lines of source code
//! or text (`syntect`, with its pure-Rust regex engine).
//!
//! The worker also extracts a PDF's text for file search (kind `text`, not a preview:
//! see [`super::pdf_text`]), for the same reason: the PDF is untrusted.

use std::io::Cursor;

/// The longest side of a `thumb`, in pixels.
pub const THUMB_SIDE_MAX: u32 = 360;
/// The longest side of a `page1`, in pixels.
pub const PAGE_SIDE_MAX: u32 = 1024;
/// Lines of a file a `code` preview shows.
pub const CODE_LINES_MAX: usize = 200;
/// Bytes of a file a `code` preview reads, whatever its lines.
pub const CODE_BYTES_MAX: usize = 256 * 1024;
/// The most pixels an image may have to get a thumbnail (`API.md` §11: 50 megapixels).
pub const IMAGE_PIXELS_MAX: u64 = 50_000_000;
/// What the image decoders may allocate beyond the image itself.
const DECODER_ALLOC_BYTES_MAX: u64 = 512 << 20;

/// Preview kinds.
pub const KINDS: [&str; 3] = ["thumb", "page1", "code"];
/// The worker's kind that extracts a PDF's text for search (not a preview).
pub const TEXT_KIND: &str = "text";

/// The preview kind a file gets, from its stored media type: images, PDFs, and text or
/// source code.
pub fn kind_for(content_type: &str) -> Option<&'static str> {
    match content_type {
        "image/png" | "image/jpeg" | "image/gif" | "image/webp" => Some("thumb"),
        "application/pdf" => Some("page1"),
        t if t.starts_with("text/") => Some("code"),
        "application/json"
        | "application/javascript"
        | "application/xml"
        | "application/x-sh"
        | "application/x-yaml"
        | "application/toml"
        | "application/sql" => Some("code"),
        _ => None,
    }
}

/// A preview made: its bytes, media type and dimensions (0 × 0 for HTML).
pub struct Made {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// `image/png` or `text/html; charset=utf-8`.
    pub content_type: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Makes the preview of `kind` of a file. `Err` says why there is none (a clean refusal,
/// not a crash).
pub fn make(kind: &str, bytes: Vec<u8>, name: &str) -> Result<Made, String> {
    match kind {
        "thumb" => thumb(&bytes),
        "page1" => page1(bytes),
        "code" => code(&bytes, name),
        TEXT_KIND => Ok(Made {
            bytes: super::pdf_text::pdf_text(bytes)?.into_bytes(),
            content_type: "text/plain; charset=utf-8",
            width: 0,
            height: 0,
        }),
        other => Err(format!("unknown preview kind {other}")),
    }
}

/// The size that fits `(w, h)` within `side` on its longest side, never larger than it is.
pub fn fit(w: u32, h: u32, side: u32) -> (u32, u32) {
    let longest = w.max(h);
    if longest <= side {
        return (w.max(1), h.max(1));
    }
    let scale = |v: u32| {
        ((u64::from(v) * u64::from(side) + u64::from(longest) / 2) / u64::from(longest)).max(1)
            as u32
    };
    (scale(w), scale(h))
}

fn thumb(bytes: &[u8]) -> Result<Made, String> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let (w, h) = reader.into_dimensions().map_err(|e| e.to_string())?;
    if u64::from(w) * u64::from(h) > IMAGE_PIXELS_MAX {
        return Err(format!("{w}×{h} is over {IMAGE_PIXELS_MAX} pixels"));
    }
    reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(DECODER_ALLOC_BYTES_MAX);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| e.to_string())?;
    let src = image::DynamicImage::ImageRgba8(decoded.to_rgba8());
    drop(decoded);
    let (tw, th) = fit(src.width(), src.height(), THUMB_SIDE_MAX);
    let rgba = if (tw, th) == (src.width(), src.height()) {
        src.into_rgba8()
    } else {
        let mut dst =
            fast_image_resize::images::Image::new(tw, th, fast_image_resize::PixelType::U8x4);
        fast_image_resize::Resizer::new()
            .resize(&src, &mut dst, None)
            .map_err(|e| e.to_string())?;
        image::RgbaImage::from_raw(tw, th, dst.into_vec()).ok_or("resized buffer size")?
    };
    png(rgba)
}

fn png(rgba: image::RgbaImage) -> Result<Made, String> {
    let (width, height) = rgba.dimensions();
    let mut out = Cursor::new(Vec::new());
    rgba.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(Made {
        bytes: out.into_inner(),
        content_type: "image/png",
        width,
        height,
    })
}

fn page1(bytes: Vec<u8>) -> Result<Made, String> {
    use hayro::hayro_syntax::Pdf;
    let pdf =
        Pdf::new(std::sync::Arc::new(bytes)).map_err(|e| format!("not a readable PDF: {e:?}"))?;
    let pages = pdf.pages();
    let page = pages.first().ok_or("the PDF has no pages")?;
    let (w, h) = page.render_dimensions();
    if !(w.is_finite() && h.is_finite() && w >= 1.0 && h >= 1.0) {
        return Err(format!("the first page is {w}×{h}"));
    }
    let scale = PAGE_SIDE_MAX as f32 / w.max(h);
    let settings = hayro::RenderSettings {
        x_scale: scale,
        y_scale: scale,
        bg_color: hayro::vello_cpu::color::palette::css::WHITE,
        ..Default::default()
    };
    let pixmap = hayro::render(
        page,
        &hayro::hayro_interpret::InterpreterSettings::default(),
        &settings,
    );
    let (pw, ph) = (u32::from(pixmap.width()), u32::from(pixmap.height()));
    let pixels: Vec<u8> = pixmap
        .take_unpremultiplied()
        .into_iter()
        .flat_map(|p| [p.r, p.g, p.b, p.a])
        .collect();
    let rgba = image::RgbaImage::from_raw(pw, ph, pixels).ok_or("page buffer size")?;
    png(rgba)
}

fn code(bytes: &[u8], name: &str) -> Result<Made, String> {
    use syntect::parsing::SyntaxSet;
    let head = &bytes[..bytes.len().min(CODE_BYTES_MAX)];
    // Text only: UTF-8 (a character cut at the read limit aside) without NUL bytes.
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).expect("valid up to here")
        }
        Err(_) => return Err("the file is not UTF-8 text".into()),
    };
    if text.contains('\0') {
        return Err("the file is binary".into());
    }
    let lines: String = text.split_inclusive('\n').take(CODE_LINES_MAX).collect();
    let syntaxes = SyntaxSet::load_defaults_newlines();
    let extension = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    let syntax = syntaxes
        .find_syntax_by_extension(extension)
        .or_else(|| syntaxes.find_syntax_by_first_line(&lines))
        .unwrap_or_else(|| syntaxes.find_syntax_plain_text());
    let themes = syntect::highlighting::ThemeSet::load_defaults();
    let theme = themes
        .themes
        .get("InspiredGitHub")
        .or_else(|| themes.themes.values().next())
        .ok_or("no theme")?;
    let html = syntect::html::highlighted_html_for_string(&lines, &syntaxes, syntax, theme)
        .map_err(|e| e.to_string())?;
    Ok(Made {
        bytes: html.into_bytes(),
        content_type: "text/html; charset=utf-8",
        width: 0,
        height: 0,
    })
}

/// Limits of a worker process.
#[derive(Clone, Copy, Debug)]
pub struct WorkerLimits {
    /// `RLIMIT_AS`, bytes.
    pub address_space_bytes: u64,
    /// `RLIMIT_CPU`, seconds.
    pub cpu_s: u64,
}

/// Applies the limits to this process. Past the CPU limit the kernel sends SIGXCPU (and
/// SIGKILL a second later); past the address space, allocations fail and the process
/// aborts.
pub fn limit_self(limits: WorkerLimits) -> std::io::Result<()> {
    let set = |resource, value: u64| {
        let lim = libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we pass and changes only this process.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // The worker dies with the server: a worker of a killed server must not go on writing
    // into the store the next server uses.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches nothing else.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        return Err(std::io::Error::other("the server is gone"));
    }
    set(libc::RLIMIT_AS, limits.address_space_bytes)?;
    set(libc::RLIMIT_CPU, limits.cpu_s)?;
    // A crash leaves no core file behind in the data directory.
    set(libc::RLIMIT_CORE, 0)
}

/// Exit status of a worker that refused a file cleanly: the file has no preview, and the
/// worker did not crash.
pub const EXIT_REFUSED: u8 = 3;

/// `chorus preview-worker`: limits itself, makes one preview of `input` into `output`, and
/// prints `{"width","height","content_type"}`.
pub fn run_worker(args: &crate::config::PreviewWorkerArgs) -> std::process::ExitCode {
    let limits = WorkerLimits {
        address_space_bytes: args.memory_bytes,
        cpu_s: args.cpu_s,
    };
    if let Err(e) = limit_self(limits) {
        eprintln!("preview-worker: setrlimit: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let bytes = match std::fs::read(&args.input) {
        Ok(b) => b,
        Err(e) => {
            // Not the decoder's doing: a refusal, not a crash.
            eprintln!("preview-worker: read {}: {e}", args.input.display());
            return std::process::ExitCode::from(EXIT_REFUSED);
        }
    };
    match make(&args.kind, bytes, &args.name) {
        Ok(made) => {
            if let Err(e) = std::fs::write(&args.output, &made.bytes) {
                eprintln!("preview-worker: write {}: {e}", args.output.display());
                return std::process::ExitCode::FAILURE;
            }
            let out = serde_json::json!({
                "width": made.width,
                "height": made.height,
                "content_type": made.content_type,
            });
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("preview-worker: no preview: {why}");
            std::process::ExitCode::from(EXIT_REFUSED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fitting keeps the aspect, caps the longest side, and never upscales.
    #[test]
    fn fit_never_upscales() {
        assert_eq!(fit(800, 600, 360), (360, 270));
        assert_eq!(fit(600, 800, 360), (270, 360));
        assert_eq!(fit(100, 50, 360), (100, 50));
        assert_eq!(fit(10_000, 1, 360), (360, 1));
        assert_eq!(fit(1224, 1584, 1024), (791, 1024));
    }

    // Kinds follow the stored media type.
    #[test]
    fn kinds() {
        assert_eq!(kind_for("image/png"), Some("thumb"));
        assert_eq!(kind_for("image/svg+xml"), None);
        assert_eq!(kind_for("application/pdf"), Some("page1"));
        assert_eq!(kind_for("text/x-rust"), Some("code"));
        assert_eq!(kind_for("application/json"), Some("code"));
        assert_eq!(kind_for("application/octet-stream"), None);
    }

    // A thumbnail of a real image has the fitted size; a corrupt image and one over the
    // pixel limit (only its header is needed to tell) are refused, not crashed on.
    #[test]
    fn thumbs() {
        let img = image::RgbaImage::from_pixel(800, 600, image::Rgba([10, 200, 30, 255]));
        let mut png_bytes = Cursor::new(Vec::new());
        img.write_to(&mut png_bytes, image::ImageFormat::Png)
            .unwrap();
        let made = thumb(png_bytes.get_ref()).unwrap();
        assert_eq!((made.width, made.height), (360, 270));
        let back = image::load_from_memory(&made.bytes).unwrap();
        assert_eq!((back.width(), back.height()), (360, 270));
        let mut corrupt = png_bytes.into_inner();
        corrupt.truncate(60);
        assert!(thumb(&corrupt).is_err());
        assert!(thumb(&huge_png_header(8000, 7500)).is_err());
    }

    /// A PNG signature and an IHDR chunk claiming `w` × `h`, and nothing else.
    fn huge_png_header(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        let crc = crc32(&ihdr);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for b in bytes {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    // Code is highlighted HTML of at most 200 lines, with the text escaped.
    #[test]
    fn code_is_highlighted_and_cut() {
        let src: String = (0..300)
            .map(|i| format!("let x{i} = \"<b>{i}</b>\";\n"))
            .collect();
        let made = code(src.as_bytes(), "main.rs").unwrap();
        let html = String::from_utf8(made.bytes).unwrap();
        assert!(html.contains("x199"));
        assert!(!html.contains("x200"));
        assert!(!html.contains("<b>"));
        assert!(html.contains("<span"));
        assert!(code(b"\x00\x01binary", "a.txt").is_err());
        assert!(code(b"\xff\xfe\xfd", "a.txt").is_err());
    }
}

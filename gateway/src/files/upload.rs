//! Reading an upload's `multipart/form-data` body (`multer`): the `workspace_id` field,
//! then the `file` field, whose bytes are handed on as they arrive and counted against
//! `file_bytes_max`, and its media type decided against the bytes' magic numbers (`infer`).
//!
//! The reading is generic over a [`Sink`], so that the server streams into the file store
//! and the fuzz target into memory through the same code.

use crate::error::ApiError;
use bytes::Bytes;
use futures::Stream;

/// Bytes of the form around the file (boundaries, headers, `workspace_id`) allowed beyond
/// `file_bytes_max` before the whole body is refused.
pub const FORM_OVERHEAD_BYTES_MAX: u64 = 64 * 1024;
/// Most bytes of a text field.
pub const TEXT_FIELD_BYTES_MAX: usize = 1024;
/// Bytes of the file's start kept to sniff its type.
pub const SNIFF_BYTES: usize = 8 * 1024;
/// Fields before the file; more is not a form this API takes.
const FIELDS_BEFORE_FILE_MAX: usize = 16;

/// Media types served inline: raster images that browsers show and that cannot carry
/// script. Anything else (HTML and SVG above all) is served as an attachment.
pub const INLINE_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/avif",
];

/// Where the file's bytes go.
#[allow(async_fn_in_trait)]
pub trait Sink {
    /// The form named this workspace, before any byte of the file.
    async fn workspace(&mut self, workspace_id: &str) -> Result<(), ApiError>;
    /// The next bytes of the file.
    async fn write(&mut self, chunk: Bytes) -> Result<(), ApiError>;
}

/// The file field as the form described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormFile {
    /// The workspace it was uploaded to, as given.
    pub workspace_id: String,
    /// The file name, as given.
    pub name: String,
    /// The media type to store, decided by [`decide_type`].
    pub content_type: String,
    /// Its length.
    pub size: u64,
}

/// Reads a form from `stream`: `workspace_id`, then `file`. Fields after the file are not
/// read. The file's bytes go to `sink` as they arrive; more than `file_bytes_max` is 413.
pub async fn read_form<S, E>(
    stream: S,
    boundary: &str,
    file_bytes_max: u64,
    sink: &mut impl Sink,
) -> Result<FormFile, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let whole = file_bytes_max.saturating_add(FORM_OVERHEAD_BYTES_MAX);
    let limits = multer::SizeLimit::new()
        .whole_stream(whole)
        .per_field(whole)
        .for_field("workspace_id", TEXT_FIELD_BYTES_MAX as u64);
    let constraints = multer::Constraints::new().size_limit(limits);
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut workspace_id = None;
    for _ in 0..=FIELDS_BEFORE_FILE_MAX {
        let Some(mut field) = form.next_field().await.map_err(form_error)? else {
            break;
        };
        match field.name() {
            Some("workspace_id") => {
                let text = field.text().await.map_err(form_error)?;
                sink.workspace(text.trim()).await?;
                workspace_id = Some(text.trim().to_owned());
            }
            Some("file") => {
                let workspace_id = workspace_id
                    .ok_or_else(|| ApiError::invalid("workspace_id must come before file"))?;
                let name = field
                    .file_name()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::invalid("the file field needs a filename"))?;
                let declared = field.content_type().map(|m| m.essence_str().to_owned());
                let mut head = Vec::new();
                let mut size = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(form_error)? {
                    size += chunk.len() as u64;
                    if size > file_bytes_max {
                        return Err(too_large(file_bytes_max));
                    }
                    if head.len() < SNIFF_BYTES {
                        let take = (SNIFF_BYTES - head.len()).min(chunk.len());
                        head.extend_from_slice(&chunk[..take]);
                    }
                    sink.write(chunk).await?;
                }
                let content_type = decide_type(declared.as_deref(), &head)?;
                return Ok(FormFile {
                    workspace_id,
                    name,
                    content_type,
                    size,
                });
            }
            // Fields this API does not know are skipped, within the form's size limit.
            _ => while field.chunk().await.map_err(form_error)?.is_some() {},
        }
    }
    Err(ApiError::invalid(
        "the form needs a workspace_id field and then a file field",
    ))
}

fn too_large(file_bytes_max: u64) -> ApiError {
    ApiError::too_large(format!("a file is at most {file_bytes_max} bytes"))
}

fn form_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { limit }
        | multer::Error::FieldSizeExceeded { limit, .. } => {
            ApiError::too_large(format!("the form is over its limit of {limit} bytes"))
        }
        other => ApiError::invalid(format!("the multipart form is malformed: {other}")),
    }
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: Option<&str>) -> Result<String, ApiError> {
    content_type
        .filter(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("multipart/form-data"))
        })
        .and_then(|t| multer::parse_boundary(t).ok())
        .ok_or_else(|| ApiError::invalid("the body must be multipart/form-data with a boundary"))
}

/// The media type to store for a file whose client said `declared` and whose first bytes
/// are `head`. The bytes decide when they are recognised: a type they contradict is
/// refused (400 `content_type_mismatch`), and a type served inline must be what the bytes
/// are. Without a declared type (or with `application/octet-stream`) the sniffed type, or
/// `application/octet-stream`, is stored.
pub fn decide_type(declared: Option<&str>, head: &[u8]) -> Result<String, ApiError> {
    let sniffed = infer::get(head).map(|t| t.mime_type());
    let declared = declared
        .map(normalise)
        .filter(|d| d != "application/octet-stream");
    let Some(declared) = declared else {
        return Ok(sniffed.unwrap_or("application/octet-stream").to_owned());
    };
    if declared.len() > chorus_engine::domain::meta::CONTENT_TYPE_BYTES_MAX
        || !declared.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid("the file's content type is not valid"));
    }
    let agrees = match sniffed {
        Some(s) => s == declared || (container(s) && !INLINE_TYPES.contains(&declared.as_str())),
        None => !INLINE_TYPES.contains(&declared.as_str()),
    };
    if !agrees {
        return Err(ApiError::new(
            400,
            "content_type_mismatch",
            format!(
                "the file is declared {declared} but its bytes are {}",
                sniffed.unwrap_or("not that")
            ),
        ));
    }
    Ok(declared)
}

/// Container formats that many declared types are made of (OOXML, ODF, EPUB and JAR are
/// ZIP files; old Office documents are OLE), so a declared type more precise than the
/// sniffed container is believed.
fn container(sniffed: &str) -> bool {
    matches!(
        sniffed,
        "application/zip" | "application/x-ole-storage" | "text/xml" | "application/xml"
    )
}

/// Lowercase, with the common aliases mapped to their registered names.
fn normalise(t: &str) -> String {
    let t = t.trim().to_ascii_lowercase();
    match t.as_str() {
        "image/jpg" | "image/pjpeg" => "image/jpeg".into(),
        "application/x-pdf" => "application/pdf".into(),
        "application/x-zip-compressed" => "application/zip".into(),
        _ => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    // The bytes decide the type when they are recognised: an agreeing or missing declared
    // type passes, a contradicting one is refused, and nothing unrecognised passes as an
    // image that would be shown inline.
    #[test]
    fn declared_types_are_checked_against_the_bytes() {
        assert_eq!(decide_type(Some("image/png"), PNG).unwrap(), "image/png");
        assert_eq!(decide_type(None, PNG).unwrap(), "image/png");
        assert_eq!(
            decide_type(Some("application/octet-stream"), PNG).unwrap(),
            "image/png"
        );
        assert_eq!(
            decide_type(Some("Image/JPG"), b"\xff\xd8\xff\xe0").unwrap(),
            "image/jpeg"
        );
        let e = decide_type(Some("image/jpeg"), PNG).unwrap_err();
        assert_eq!((e.status, e.code), (400, "content_type_mismatch"));
        let e = decide_type(Some("image/png"), b"<html><script>").unwrap_err();
        assert_eq!(e.code, "content_type_mismatch");
        assert_eq!(
            decide_type(Some("text/html"), b"<html>").unwrap(),
            "text/html"
        );
        assert_eq!(
            decide_type(Some("text/plain"), b"hello").unwrap(),
            "text/plain"
        );
        assert_eq!(
            decide_type(None, b"hello").unwrap(),
            "application/octet-stream"
        );
        assert_eq!(
            decide_type(
                Some("application/vnd.oasis.opendocument.text"),
                b"PK\x03\x04"
            )
            .unwrap(),
            "application/vnd.oasis.opendocument.text"
        );
        assert_eq!(decide_type(Some("a b/c"), b"x").unwrap_err().status, 400);
    }

    // Only multipart/form-data with a boundary is taken.
    #[test]
    fn boundaries() {
        assert_eq!(
            boundary(Some("multipart/form-data; boundary=abc")).unwrap(),
            "abc"
        );
        assert!(boundary(Some("application/json")).is_err());
        assert!(boundary(Some("multipart/form-data")).is_err());
        assert!(boundary(None).is_err());
    }
}

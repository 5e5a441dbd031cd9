//! Errors as clients see them: `{"error": {"code", "message"}}` with the status of `API.md`,
//! and the same code and message in a WebSocket `error` frame.

use bytes::Bytes;
use chorus_engine::domain::DomainError;
use chorus_engine::{EngineError, Unavailable};
use http_body_util::Full;
use hyper::{Response, StatusCode};
use std::time::Duration;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The snake_case code.
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
    /// For 429: when to try again.
    pub retry_after: Option<Duration>,
    /// For a 503 of a cluster node that does not lead what the request writes to: the node
    /// that does, if known (the request may be forwarded there).
    pub leader: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            leader: None,
        }
    }

    /// 400 with `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request", message)
    }

    /// 400 for a body that is not the JSON the call expects.
    pub fn bad_json(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_json", message)
    }

    /// 401 for a missing or bad token.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(401, "unauthorized", message)
    }

    /// 404 with the kind of thing not found.
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(404, "not_found", format!("{what} not found"))
    }

    /// 405 for a path that exists with another method.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(405, "method_not_allowed", "method not allowed on this path")
    }

    /// 413 for a body or frame over its limit.
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(413, "too_large", message)
    }

    /// 429 with the time to wait.
    pub fn rate_limited(retry_after: Duration) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(429, "rate_limited", "too many requests; slow down")
        }
    }

    /// 503 while the server cannot serve.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "unavailable", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }

    /// The HTTP response.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(self.body().to_string())));
        *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            let secs = crate::ratelimit::retry_after_header_s(after);
            h.insert(hyper::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

/// How long a write refused for want of a leader here is told to wait: an election takes
/// a few hundred milliseconds, a hand-off a few.
const NOT_LEADER_RETRY: Duration = Duration::from_secs(1);

/// How long a sender refused by a full to-device queue is told to wait.
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(5);

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> ApiError {
        let retry_after = matches!(e, DomainError::QueueFull(_)).then_some(QUEUE_FULL_RETRY);
        ApiError {
            retry_after,
            ..ApiError::new(e.status(), e.code(), e.to_string())
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Domain(d) => d.into(),
            // In a cluster, a partition (or the directory) without a leader here: the
            // client tries again shortly (API.md §15).
            EngineError::Unavailable(
                m @ (Unavailable::NotLeader { leader, .. } | Unavailable::MetaNotLeader { leader }),
            ) => ApiError {
                retry_after: Some(NOT_LEADER_RETRY),
                leader,
                ..ApiError::unavailable(m.to_string())
            },
            EngineError::Unavailable(m) => ApiError::unavailable(m.to_string()),
            other => {
                tracing::error!(error = %other, "engine error");
                ApiError::new(500, "internal", "internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A write refused because this node does not lead its partition, or the directory, is
    // a 503 `unavailable` with `Retry-After` (API.md §15); other unavailability has none.
    #[test]
    fn not_leader_is_503_with_retry_after() {
        for e in [
            Unavailable::NotLeader {
                partition: 3,
                leader: Some(2),
            },
            Unavailable::MetaNotLeader { leader: None },
        ] {
            let r = ApiError::from(EngineError::Unavailable(e)).response();
            assert_eq!(r.status(), 503);
            assert_eq!(r.headers()[hyper::header::RETRY_AFTER], "1");
        }
        let r = ApiError::from(EngineError::Unavailable(Unavailable::ShuttingDown)).response();
        assert_eq!(r.status(), 503);
        assert!(r.headers().get(hyper::header::RETRY_AFTER).is_none());
    }
}

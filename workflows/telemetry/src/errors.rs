//! Error classification (the user's `classifyError`), the exit codes that carry it to the WorkflowRun's retry
//! policy, and a retry helper.
//!
//! | exit code | meaning | WorkflowRun `spec.retry` |
//! | --- | --- | --- |
//! | 0 | success | — |
//! | 75 (`EX_TEMPFAIL`) | transient failure: retry | `transientExitCodes: [75]` |
//! | 65 (`EX_DATAERR`) | permanent failure: bad data or a refused request | `permanentExitCodes: [65, 78]` |
//! | 78 (`EX_CONFIG`) | permanent failure: the workflow is misconfigured | `permanentExitCodes: [65, 78]` |
//! | 101 | a panic (Rust's exit code) | permanent when `transientExitCodes` is set, as in the examples |

use std::error::Error;
use std::future::Future;
use std::time::Duration;

/// Transient failures are worth retrying; permanent ones are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Transient,
    Permanent,
}

/// Exit codes a workflow ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    Permanent = 65,
    Transient = 75,
    Config = 78,
}

impl ErrorKind {
    pub fn exit_code(self) -> ExitCode {
        match self {
            ErrorKind::Transient => ExitCode::Transient,
            ErrorKind::Permanent => ExitCode::Permanent,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// What `classify_error` says: the kind and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorClass {
    pub kind: ErrorKind,
    pub message: String,
}

/// HTTP statuses: 408, 425, 429 and 5xx are transient, other 4xx permanent.
fn status_kind(status: u16) -> Option<ErrorKind> {
    match status {
        408 | 425 | 429 | 500..=599 => Some(ErrorKind::Transient),
        400..=499 => Some(ErrorKind::Permanent),
        _ => None,
    }
}

/// A status code written after `status`, `http` or `code` in a message (`HTTP 503`, `status: 429`).
fn status_in(message: &str) -> Option<u16> {
    let lower = message.to_ascii_lowercase();
    for marker in ["status code", "status", "http"] {
        let mut rest = lower.as_str();
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let digits: String = rest
                .trim_start_matches([' ', ':', '=', '/', '1', '.'])
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if digits.len() == 3
                && let Ok(code) = digits.parse()
            {
                return Some(code);
            }
        }
    }
    None
}

const TRANSIENT_WORDS: [&str; 12] = [
    "timed out",
    "timeout",
    "connection refused",
    "connection reset",
    "connection aborted",
    "broken pipe",
    "econnrefused",
    "econnreset",
    "etimedout",
    "temporarily unavailable",
    "too many requests",
    "rate limit",
];

/// Classifies an error by its whole source chain: I/O errors of a network or timing kind, timeouts, HTTP
/// 408/425/429/5xx and the usual transient phrases are transient; anything else is permanent (retrying what is not
/// understood would only repeat it).
pub fn classify_error(error: &(dyn Error + 'static)) -> ErrorClass {
    let message = error.to_string();
    let mut current: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            if matches!(
                io.kind(),
                Io::TimedOut
                    | Io::ConnectionRefused
                    | Io::ConnectionReset
                    | Io::ConnectionAborted
                    | Io::BrokenPipe
                    | Io::NotConnected
                    | Io::Interrupted
                    | Io::WouldBlock
                    | Io::AddrNotAvailable
                    | Io::NetworkUnreachable
                    | Io::HostUnreachable
            ) {
                return ErrorClass { kind: ErrorKind::Transient, message };
            }
        }
        if e.is::<tokio::time::error::Elapsed>() {
            return ErrorClass { kind: ErrorKind::Transient, message };
        }
        let text = e.to_string();
        if let Some(kind) = status_in(&text).and_then(status_kind) {
            return ErrorClass { kind, message };
        }
        let lower = text.to_ascii_lowercase();
        if TRANSIENT_WORDS.iter().any(|w| lower.contains(w)) {
            return ErrorClass { kind: ErrorKind::Transient, message };
        }
        current = e.source();
    }
    ErrorClass { kind: ErrorKind::Permanent, message }
}

/// How `retry` retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 3, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(5) }
    }
}

/// Runs `op` until it succeeds, fails permanently, or `policy.attempts` are used: each transient failure is
/// counted in `workflow.retry.count` (`workflow_name`, `step_name`) and followed by an exponential backoff.
pub async fn retry<T, E, F, Fut>(workflow: &str, step: &str, policy: RetryPolicy, mut op: F) -> Result<T, E>
where
    E: Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = policy.base_delay;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let class = classify_error(&e);
                if class.kind == ErrorKind::Permanent || attempt >= policy.attempts {
                    return Err(e);
                }
                crate::metrics::record_retry(workflow, step);
                tracing::warn!(workflow, step, attempt, error = %class.message, "transient failure; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max_delay);
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Msg(&'static str);

    #[derive(Debug, thiserror::Error)]
    #[error("uploading the image failed")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn transient_and_permanent_errors() {
        let transient: [&(dyn Error + 'static); 6] = [
            &Msg("request timed out after 5s"),
            &Msg("ECONNREFUSED 10.0.0.1:5432"),
            &Msg("upstream returned HTTP 503"),
            &Msg("status: 429 Too Many Requests"),
            &Msg("connection reset by peer"),
            &Msg("server responded with status code 502"),
        ];
        for e in transient {
            assert_eq!(classify_error(e).kind, ErrorKind::Transient, "{e}");
        }
        let permanent: [&(dyn Error + 'static); 4] = [
            &Msg("HTTP 404 not found"),
            &Msg("status 400: invalid phone id"),
            &Msg("duplicate key value violates unique constraint"),
            &Msg("HTTP 401"),
        ];
        for e in permanent {
            assert_eq!(classify_error(e).kind, ErrorKind::Permanent, "{e}");
        }
    }

    #[test]
    fn the_source_chain_is_read() {
        let e = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify_error(&e).kind, ErrorKind::Transient);
        assert_eq!(classify_error(&e).message, "uploading the image failed");
    }

    #[test]
    fn exit_codes_match_the_documented_table() {
        assert_eq!(ErrorKind::Transient.exit_code() as i32, 75);
        assert_eq!(ErrorKind::Permanent.exit_code() as i32, 65);
        assert_eq!(ExitCode::Config as i32, 78);
    }

    #[tokio::test]
    async fn retry_retries_transient_failures_only() {
        let mut calls = 0;
        let policy = RetryPolicy { attempts: 5, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        let r: Result<u32, Msg> = retry("wf", "step", policy, || {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err(Msg("timeout")) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.ok(), Some(3));
        let mut calls = 0;
        let r: Result<u32, Msg> = retry("wf", "step", policy, || {
            calls += 1;
            async { Err(Msg("HTTP 404")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "a permanent failure is not retried");
    }
}

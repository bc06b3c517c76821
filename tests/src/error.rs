//! The harness's error type: every failure says what the harness was doing when it happened.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("binary {name} not found at {}: run `cargo build --workspace --bins` first", path.display())]
    MissingBinary { name: String, path: PathBuf },
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("a thread running in network namespace {netns} panicked")]
    ThreadPanicked { netns: String },
}

impl HarnessError {
    pub fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        HarnessError::Invalid {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Attaches what the harness was doing to an I/O error.
pub trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| HarnessError::Io {
            context: context(),
            error,
        })
    }
}

//! Sources: turn an outside description of the cluster (a directory of YAML manifests, or
//! the Kubernetes API) into a [`ClusterState`](crate::model::ClusterState) for the index.

pub mod dir;
pub mod kube;
mod manifest;

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use crate::model::ClusterState;

/// Failures that stop a source; problems with single objects are [`Problem`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("the file watcher for {path} stopped")]
    WatcherStopped { path: PathBuf },
    #[error("loading {path} failed: {message}")]
    LoadTask { path: PathBuf, message: String },
}

/// Something in the input that was skipped (an invalid object) or kept at its last good
/// version (an unparsable file). Never fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// `Kind namespace/name` (`Kind name` for namespaces) when the object could be named.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The conflicts of `state` not yet in `logged` (which then holds exactly the current ones),
/// so that a source logs each conflict once while it lasts, and again if it comes back,
/// rather than on every rebuild.
pub(crate) fn new_conflicts(state: &ClusterState, logged: &mut BTreeSet<String>) -> Vec<String> {
    let current: BTreeSet<String> = state.conflicts().into_iter().collect();
    let new = current.difference(logged).cloned().collect();
    *logged = current;
    new
}

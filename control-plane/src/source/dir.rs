//! The standalone source: a directory of Kubernetes-shaped YAML manifests, watched for
//! changes, each change published to the index as a whole new state.
//!
//! Bad input never removes good state: a file that does not parse keeps its last good
//! objects, and an object that became invalid (same kind, namespace and name) keeps its
//! last valid version until it is fixed or deleted. Both are reported as [`Problem`]s.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::manifest::{parse_documents, Object};
use super::{Problem, SourceError};
use crate::index::Index;
use crate::model::ClusterState;

/// Quiet time after the last file event before reloading: editors and `kubectl`-style tools
/// write a file in several steps, and one reload per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// A directory that never stops changing is still reloaded this often.
const MAX_RELOAD_DELAY: Duration = Duration::from_secs(1);
/// Manifests are small; anything bigger is a mistake we refuse rather than buffer.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    /// Each file's objects from its last successful parse, so that a file caught mid-write
    /// or saved broken keeps contributing what it last said instead of vanishing.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
    /// Each object's last valid version, by `Kind namespace/name`, so that an edit that
    /// breaks one object (say a bad regex in a policy) leaves its previous version in force
    /// rather than dropping it (which could open up what the policy was protecting).
    last_valid: BTreeMap<String, Object>,
}

/// The result of one load: the state to publish and what was wrong with the input.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub state: ClusterState,
    pub problems: Vec<Problem>,
}

impl DirSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            dir: path,
            last_good: BTreeMap::new(),
            last_valid: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads every `*.yaml` / `*.yml` file directly in the directory. Fails only when the
    /// directory itself cannot be listed; everything else becomes a [`Problem`].
    pub fn load(&mut self) -> Result<LoadReport, SourceError> {
        let files = self.manifest_files()?;
        let mut problems = Vec::new();
        let mut next_good = BTreeMap::new();
        // Invalid objects found in this load: (file, index into `problems`).
        let mut invalid = Vec::new();
        for file in files {
            let failure = match read_manifest(&file) {
                Ok(None) => continue, // deleted between listing and reading
                Ok(Some(text)) => match parse_documents(&text) {
                    Ok(parsed) => {
                        for problem in parsed.problems {
                            if problem.object.is_some() {
                                invalid.push((file.clone(), problems.len()));
                            }
                            problems.push(Problem {
                                file: file.clone(),
                                object: problem.object,
                                message: problem.message,
                            });
                        }
                        next_good.insert(file, parsed.objects);
                        continue;
                    }
                    Err(e) => format!("not valid YAML: {e}"),
                },
                Err(message) => message,
            };
            let message = match self.last_good.remove(&file) {
                Some(objects) => {
                    let message = format!(
                        "{failure}; keeping its {} object(s) from the last good load",
                        objects.len()
                    );
                    next_good.insert(file.clone(), objects);
                    message
                }
                None => format!("{failure}; it contributes nothing until fixed"),
            };
            problems.push(Problem {
                file,
                object: None,
                message,
            });
        }
        self.retain_last_valid(&mut next_good, &mut problems, &invalid);
        self.last_valid.clear();
        for object in next_good.values().flatten() {
            // First in file order, as in `merge`.
            self.last_valid
                .entry(object.describe())
                .or_insert_with(|| object.clone());
        }
        self.last_good = next_good;
        let state = merge(&self.last_good, &mut problems);
        Ok(LoadReport { state, problems })
    }

    /// Puts the last valid version of each invalid object back into the file that now holds
    /// the invalid one, unless a valid object of that identity exists anyway.
    fn retain_last_valid(
        &self,
        files: &mut BTreeMap<PathBuf, Vec<Object>>,
        problems: &mut [Problem],
        invalid: &[(PathBuf, usize)],
    ) {
        let mut present: BTreeSet<String> =
            files.values().flatten().map(Object::describe).collect();
        for (file, at) in invalid {
            let Some(problem) = problems.get_mut(*at) else {
                continue;
            };
            let Some(described) = problem.object.clone() else {
                continue;
            };
            if present.contains(&described) {
                continue;
            }
            let Some(previous) = self.last_valid.get(&described) else {
                continue;
            };
            problem.message.push_str("; keeping its last valid version");
            files
                .entry(file.clone())
                .or_default()
                .push(previous.clone());
            present.insert(described);
        }
    }

    fn manifest_files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let read_error = |source| SourceError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read_error)? {
            let path = entry.map_err(read_error)?.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            // Dotfiles are editor swap files and Kubernetes ConfigMap internals (`..data`).
            let is_manifest = !name.starts_with('.')
                && Path::new(name)
                    .extension()
                    .and_then(|ext| ext.to_str())
                    .is_some_and(|ext| {
                        ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml")
                    });
            // `metadata` follows symlinks, which is how ConfigMap volumes present their files.
            if is_manifest && std::fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Publishes the directory's state to `index` now and after every change, until the
    /// watcher fails. Fails at once if the directory cannot be watched or read.
    pub async fn run(self, index: Arc<Index>) -> Result<(), SourceError> {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            // A closed channel means run() has returned; the event no longer matters.
            let _ = events_tx.send(event);
        })
        .map_err(|source| SourceError::Watch {
            path: self.dir.clone(),
            source,
        })?;
        // Watch before the first load so that no change slips in between.
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|source| SourceError::Watch {
                path: self.dir.clone(),
                source,
            })?;

        let dir = self.dir.clone();
        let mut logged_conflicts = BTreeSet::new();
        let (mut source, report) = load_in_background(self).await?;
        let report = report?;
        publish(&dir, &index, report, &mut logged_conflicts);

        loop {
            match events.recv().await {
                None => return Err(SourceError::WatcherStopped { path: dir }),
                Some(event) if !is_change(&event) => continue,
                Some(_) => {}
            }
            let deadline = Instant::now() + MAX_RELOAD_DELAY;
            loop {
                let quiet_until = (Instant::now() + DEBOUNCE).min(deadline);
                match tokio::time::timeout_at(quiet_until, events.recv()).await {
                    Ok(Some(_)) if Instant::now() < deadline => continue,
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => return Err(SourceError::WatcherStopped { path: dir }),
                }
            }
            let (returned, report) = load_in_background(source).await?;
            source = returned;
            match report {
                Ok(report) => publish(&dir, &index, report, &mut logged_conflicts),
                // The directory may be briefly gone (being replaced): keep serving the last state.
                Err(e) => {
                    tracing::warn!(error = %e, "reloading manifests failed; keeping the last state")
                }
            }
        }
    }
}

/// File I/O off the async workers; the source travels with the task and comes back.
async fn load_in_background(
    mut source: DirSource,
) -> Result<(DirSource, Result<LoadReport, SourceError>), SourceError> {
    let path = source.dir.clone();
    tokio::task::spawn_blocking(move || {
        let report = source.load();
        (source, report)
    })
    .await
    .map_err(|e| SourceError::LoadTask {
        path,
        message: e.to_string(),
    })
}

/// `logged_conflicts` holds the conflicts already logged, so that a conflict is logged once
/// while it lasts (and again if it comes back), not on every reload.
fn publish(dir: &Path, index: &Index, report: LoadReport, logged_conflicts: &mut BTreeSet<String>) {
    for problem in &report.problems {
        tracing::warn!(
            file = %problem.file.display(),
            object = problem.object.as_deref().unwrap_or(""),
            "{}", problem.message
        );
    }
    for conflict in super::new_conflicts(&report.state, logged_conflicts) {
        tracing::warn!(dir = %dir.display(), "{conflict}");
    }
    let state = &report.state;
    let (namespaces, pods, services, traffic_splits, http_routes, authorization_policies) = (
        state.namespaces.len(),
        state.pods.len(),
        state.services.len(),
        state.traffic_splits.len(),
        state.http_routes.len(),
        state.authorization_policies.len(),
    );
    if index.publish(report.state) {
        tracing::info!(dir = %dir.display(), namespaces, pods, services, traffic_splits, http_routes, authorization_policies, problems = report.problems.len(), "published cluster state");
    }
}

/// Whether a file event can mean the manifests changed. Our own reads open files, and
/// inotify reports those opens: reacting to them would reload forever.
fn is_change(event: &notify::Result<Event>) -> bool {
    match event {
        // Errors include queue overflows: reload to be safe.
        Err(_) => true,
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
    }
}

/// `Ok(None)` when the file no longer exists.
fn read_manifest(path: &Path) -> Result<Option<String>, String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| "not UTF-8 text".to_owned())
}

/// Builds one state from every file's objects, in file order: of two objects with the same
/// kind, namespace and name the first wins and the second is reported.
fn merge(files: &BTreeMap<PathBuf, Vec<Object>>, problems: &mut Vec<Problem>) -> ClusterState {
    let mut state = ClusterState::default();
    let mut defined_in: BTreeMap<String, &Path> = BTreeMap::new();
    let mut cluster_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (file, objects) in files {
        for object in objects {
            let described = object.describe();
            let reject = |problems: &mut Vec<Problem>, message: String| {
                problems.push(Problem {
                    file: file.clone(),
                    object: Some(described.clone()),
                    message,
                })
            };
            match defined_in.entry(described.clone()) {
                Entry::Occupied(first) => {
                    let message =
                        format!("duplicate of the one in {}; ignored", first.get().display());
                    reject(problems, message);
                    continue;
                }
                Entry::Vacant(slot) => {
                    slot.insert(file);
                }
            }
            if let Object::Service(svc) = object {
                if let Some(ip) = svc.cluster_ip {
                    if let Some(owner) = cluster_ips.get(&ip) {
                        let message =
                            format!("cluster IP {ip} already belongs to {owner}; ignored");
                        reject(problems, message);
                        defined_in.remove(&described);
                        continue;
                    }
                    cluster_ips.insert(ip, described.clone());
                }
            }
            object.clone().insert_into(&mut state);
        }
    }
    state
}

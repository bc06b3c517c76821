//! Child processes started inside network namespaces: command description, log capture to
//! files, signalling, bounded waiting, and cleanup on drop.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, IoContext, Result};
use crate::prereqs::find_tool;

pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGKILL: i32 = libc::SIGKILL;
pub const SIGINT: i32 = libc::SIGINT;

/// How long a process gets between SIGTERM and SIGKILL when the harness stops it.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How much of each log the failure report prints: enough for the last events, not a flood.
const LOG_TAIL_BYTES: usize = 16 * 1024;

/// A program with its arguments and extra environment.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// `program arg1 arg2` for messages.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn short_name(&self) -> String {
        let base = Path::new(&self.program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match self.args.first() {
            Some(first) if !first.to_string_lossy().starts_with('-') => {
                format!("{base}-{}", first.to_string_lossy())
            }
            _ => base,
        }
    }
}

impl<const N: usize> From<[&str; N]> for Cmd {
    fn from(parts: [&str; N]) -> Cmd {
        Cmd::from(&parts[..])
    }
}

impl From<&[&str]> for Cmd {
    fn from(parts: &[&str]) -> Cmd {
        match parts.split_first() {
            Some((program, args)) => Cmd::new(program).args(args),
            None => Cmd::new(""),
        }
    }
}

/// What the cluster remembers about every process it started, so it can kill stragglers and
/// print every log when a test fails.
pub(crate) struct ProcRecord {
    label: String,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Set once the child is reaped: from then on its pid may belong to someone else.
    reaped: AtomicBool,
}

pub(crate) struct ProcRegistry {
    log_dir: PathBuf,
    next: AtomicU32,
    records: Mutex<Vec<Arc<ProcRecord>>>,
}

impl ProcRegistry {
    pub(crate) fn new(log_dir: PathBuf) -> ProcRegistry {
        ProcRegistry {
            log_dir,
            next: AtomicU32::new(0),
            records: Mutex::new(Vec::new()),
        }
    }

    /// A fresh path in the log dir (kept with the logs), e.g. for a capture file.
    pub(crate) fn scratch_file(&self, name: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.log_dir.join(format!("{n:03}-{name}"))
    }

    fn records(&self) -> Vec<Arc<ProcRecord>> {
        match self.records.lock() {
            Ok(records) => records.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// SIGKILLs every process that has not been reaped yet (their `Proc` reaps them later).
    pub(crate) fn kill_all(&self) {
        for record in self.records() {
            if !record.reaped.load(Ordering::SeqCst) {
                send_signal(record.pid, SIGKILL);
            }
        }
    }

    /// The tail of every process's stdout and stderr, for a failure report.
    pub(crate) fn dump_logs(&self) -> String {
        let mut out = String::new();
        for record in self.records() {
            for (stream, path) in [("stdout", &record.stdout), ("stderr", &record.stderr)] {
                let text = read_lossy(path);
                if text.trim().is_empty() {
                    continue;
                }
                out.push_str(&format!(
                    "----- {} [pid {}] {stream} ({}) -----\n{}\n",
                    record.label,
                    record.pid,
                    path.display(),
                    tail(&text, LOG_TAIL_BYTES)
                ));
            }
        }
        out
    }

    /// Starts `cmd` in network namespace `netns` (via `ip netns exec`, which execs, so the
    /// child's pid is the program's), optionally as `user` = (uid, gid) via `setpriv`.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        netns: &str,
        user: Option<(u32, u32)>,
        cmd: &Cmd,
    ) -> Result<Proc> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let short_ns = netns.rsplit('-').next().unwrap_or(netns);
        let stem = format!("{n:03}-{short_ns}-{}", cmd.short_name());
        let stdout_path = self.log_dir.join(format!("{stem}.out"));
        let stderr_path = self.log_dir.join(format!("{stem}.err"));
        let stdout =
            File::create(&stdout_path).context(|| format!("creating {}", stdout_path.display()))?;
        let stderr =
            File::create(&stderr_path).context(|| format!("creating {}", stderr_path.display()))?;

        let mut command = Command::new(tool_path("ip"));
        command.args([OsStr::new("netns"), OsStr::new("exec"), OsStr::new(netns)]);
        if let Some((uid, gid)) = user {
            command
                .arg(tool_path("setpriv"))
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--"]);
        }
        command
            .arg(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .env("PATH", augmented_path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let user_label = user.map(|(u, _)| format!(" (uid {u})")).unwrap_or_default();
        let label = format!("[{netns}]{user_label} {}", cmd.display());
        let child = command.spawn().context(|| format!("starting {label}"))?;
        let record = Arc::new(ProcRecord {
            label,
            pid: child.id(),
            stdout: stdout_path,
            stderr: stderr_path,
            reaped: AtomicBool::new(false),
        });
        match self.records.lock() {
            Ok(mut records) => records.push(record.clone()),
            Err(poisoned) => poisoned.into_inner().push(record.clone()),
        }
        Ok(Proc {
            child,
            record,
            status: None,
        })
    }
}

/// A running child process. Dropping it stops it: SIGTERM, then SIGKILL after a short wait.
pub struct Proc {
    child: Child,
    record: Arc<ProcRecord>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// `[netns] (uid) program args`, as used in failure reports.
    pub fn label(&self) -> &str {
        &self.record.label
    }

    /// Sends `signal` (e.g. [`SIGTERM`]). Refused once the process has been reaped, because
    /// its pid may have been reused.
    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.status.is_some() {
            return Err(HarnessError::invalid(
                "signal",
                format!("{} already exited", self.label()),
            ));
        }
        if send_signal(self.pid(), signal) {
            Ok(())
        } else {
            Err(HarnessError::Io {
                context: format!("sending signal {signal} to {}", self.label()),
                error: std::io::Error::last_os_error(),
            })
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let status = self
            .child
            .try_wait()
            .context(|| format!("waiting for {}", self.record.label))?;
        if let Some(status) = status {
            self.status = Some(status);
            self.record.reaped.store(true, Ordering::SeqCst);
        }
        Ok(status)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after a short grace period.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // The process may exit between the check and the signal: that is fine, it is a zombie
        // (not reaped), so its pid cannot have been reused.
        send_signal(self.pid(), SIGTERM);
        if let Some(status) = self.wait_timeout(STOP_GRACE)? {
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        send_signal(self.pid(), SIGKILL);
        let status = self
            .child
            .wait()
            .context(|| format!("waiting for {}", self.record.label))?;
        self.status = Some(status);
        self.record.reaped.store(true, Ordering::SeqCst);
        Ok(status)
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.record.stdout)
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.record.stderr)
    }

    /// stdout followed by stderr.
    pub fn logs(&self) -> String {
        format!(
            "--- stdout of {} ---\n{}--- stderr ---\n{}",
            self.label(),
            self.stdout(),
            self.stderr()
        )
    }

    pub fn stdout_path(&self) -> &Path {
        &self.record.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.record.stderr
    }

    /// Waits until `needle` appears in stdout or stderr (e.g. "listening on"). Fails at once
    /// if the process exits first, with its logs in the error.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                // Output written just before exit counts too.
                if self.stdout().contains(needle) || self.stderr().contains(needle) {
                    return Ok(());
                }
                return Err(HarnessError::CommandFailed {
                    command: self.label().to_string(),
                    status: format!("exited with {status} before printing {needle:?}"),
                    stderr: self.logs(),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("{needle:?} in the output of {}", self.label()),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit and returns the exit status with the captured output; stops the process
    /// and fails if it is still running after `timeout`.
    pub fn output(mut self, timeout: Duration) -> Result<Output> {
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(Output {
                status,
                stdout: std::fs::read(&self.record.stdout).unwrap_or_default(),
                stderr: std::fs::read(&self.record.stderr).unwrap_or_default(),
            }),
            None => {
                let _ = self.stop();
                Err(HarnessError::Timeout {
                    what: format!("{} to exit\n{}", self.label(), self.logs()),
                    timeout,
                })
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("weft-e2e: stopping {}: {e}", self.label());
        }
    }
}

/// Returns whether the signal was delivered.
fn send_signal(pid: u32, signal: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) only takes plain integers. Callers only pass pids of children that have
    // not been reaped yet, so the pid cannot name an unrelated process.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Kills an arbitrary pid (one found inside a namespace the harness owns).
pub(crate) fn kill_pid(pid: u32) {
    if pid != std::process::id() {
        send_signal(pid, SIGKILL);
    }
}

/// The tool's full path if found, else its bare name (so the spawn error names it).
pub(crate) fn tool_path(tool: &str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| PathBuf::from(tool))
}

/// `$PATH` plus the sbin directories, so programs inside namespaces find `iptables` & co.
fn augmented_path() -> OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(PathBuf::from(extra));
        }
    }
    std::env::join_paths(dirs).unwrap_or_else(|_| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"))
}

pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_from_array_and_display() {
        let cmd = Cmd::from(["weft-testapp", "echo-server", "--listen", "0.0.0.0:8080"]);
        assert_eq!(
            cmd.display(),
            "weft-testapp echo-server --listen 0.0.0.0:8080"
        );
        assert_eq!(cmd.short_name(), "weft-testapp-echo-server");
        assert_eq!(Cmd::new("/x/tcpdump").arg("-i").short_name(), "tcpdump");
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("xaé", 2), "é");
    }
}

//! A handle on one network namespace: run programs in it (as root or another user) and run
//! in-test client code in it on a thread that has joined it with setns(2).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{HarnessError, IoContext, Result};
use crate::http::{http_get, HttpResponse};
use crate::proc::{Cmd, Proc, ProcRegistry};

/// How long [`Netns::run`] lets a command take before it is killed and reported.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Connect/read timeout for in-test HTTP requests.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Netns {
    name: String,
    registry: Arc<ProcRegistry>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    pub(crate) fn new(name: String, registry: Arc<ProcRegistry>) -> Netns {
        Netns { name, registry }
    }

    /// The name under /run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh file path in the cluster's temp dir (next to the process logs).
    pub fn scratch_file(&self, name: &str) -> std::path::PathBuf {
        self.registry.scratch_file(name)
    }

    /// Starts `cmd` as root in this namespace.
    pub fn spawn(&self, cmd: impl Into<Cmd>) -> Result<Proc> {
        self.registry.spawn(&self.name, None, &cmd.into())
    }

    /// Starts `cmd` as `uid`/`gid` (no supplementary groups) in this namespace.
    pub fn spawn_as(&self, uid: u32, gid: u32, cmd: impl Into<Cmd>) -> Result<Proc> {
        self.registry
            .spawn(&self.name, Some((uid, gid)), &cmd.into())
    }

    /// Runs `cmd` as root to completion (at most [`RUN_TIMEOUT`]), whatever its exit status.
    pub fn run(&self, cmd: impl Into<Cmd>) -> Result<Output> {
        self.spawn(cmd)?.output(RUN_TIMEOUT)
    }

    /// Runs `cmd` as `uid`/`gid` to completion, whatever its exit status.
    pub fn run_as(&self, uid: u32, gid: u32, cmd: impl Into<Cmd>) -> Result<Output> {
        self.spawn_as(uid, gid, cmd)?.output(RUN_TIMEOUT)
    }

    /// Runs `cmd` as root and fails unless it exits 0.
    pub fn run_ok(&self, cmd: impl Into<Cmd>) -> Result<Output> {
        let cmd = cmd.into();
        let output = self.run(cmd.clone())?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(HarnessError::CommandFailed {
                command: format!("[{}] {}", self.name, cmd.display()),
                status: output.status.to_string(),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            })
        }
    }

    /// Runs `f` on a fresh thread that has joined this namespace; a panic in `f` is re-raised
    /// here, so assertions inside `f` fail the test.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.name, f)
    }

    /// A TCP connection made from inside this namespace. The socket stays in the namespace,
    /// so the caller can use it from any thread.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.in_netns(|| TcpStream::connect_timeout(&addr, timeout))?
            .context(|| format!("connecting to {addr} from {}", self.name))
    }

    /// A listener bound inside this namespace.
    pub fn bind(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.in_netns(|| TcpListener::bind(addr))?
            .context(|| format!("binding {addr} in {}", self.name))
    }

    /// HTTP/1.0 GET from inside this namespace.
    pub fn http_get(&self, url: &str) -> Result<HttpResponse> {
        self.in_netns(|| http_get(url, HTTP_TIMEOUT))?
    }
}

/// Runs `f` on a new thread joined to network namespace `/run/netns/<netns>`. Only the network
/// namespace changes (setns on one thread is allowed for it even in a multi-threaded process),
/// and the thread ends with `f`, so no other code runs in the wrong namespace.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let ns_file = File::open(&path).context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        let joined = scope
            .spawn(move || -> Result<T> {
                // SAFETY: the fd is a valid, open network-namespace file for the whole call, and
                // CLONE_NEWNET only moves this thread.
                let rc = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context(|| format!("setns into {path}"));
                }
                Ok(f())
            })
            .join();
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

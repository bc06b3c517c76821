//! The iptables backends (nft and legacy): finding their binaries, choosing one, and
//! running `*-save` / `*-restore` with useful errors.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::rules::IpFamily;
use super::{InitError, IptablesMode};

/// Where iptables lives when an init container's PATH lacks the sbin directories.
const FALLBACK_DIRS: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// How long a legacy restore waits for the xtables lock held by another writer
/// (kube-proxy, CNI plugins) instead of failing straight away.
const XTABLES_LOCK_WAIT_SECS: u32 = 10;

/// `CAP_NET_ADMIN`'s bit in the capability sets (linux/capability.h).
const CAP_NET_ADMIN_BIT: u32 = 12;

/// One of the two kernel interfaces iptables can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn binary(self, family: IpFamily, tool: &str) -> String {
        let prefix = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        format!("{prefix}-{}-{tool}", self.name())
    }

    pub fn restore_binary(self, family: IpFamily) -> String {
        self.binary(family, "restore")
    }

    pub fn save_binary(self, family: IpFamily) -> String {
        self.binary(family, "save")
    }
}

/// Looks `name` up in PATH, then in the usual sbin directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn require_binary(name: &str) -> Result<PathBuf, InitError> {
    find_binary(name).ok_or_else(|| InitError::BinaryMissing {
        binary: name.to_string(),
    })
}

/// Whether this process lacks `CAP_NET_ADMIN`; `None` when it cannot tell.
fn lacks_net_admin() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN_BIT) == 0)
}

/// Runs an iptables tool, feeding it `stdin`, and returns its stdout.
fn run_tool(binary: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let path = require_binary(binary)?;
    let mut child = Command::new(&path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::Spawn {
            binary: binary.to_string(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that dies early closes its stdin; its exit status and stderr say why,
        // so a broken pipe here is not the error worth reporting.
        match pipe.write_all(input.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                return Err(InitError::Spawn {
                    binary: binary.to_string(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|source| InitError::Spawn {
            binary: binary.to_string(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if !output.status.success() {
        let says_permission = stderr.contains("Permission denied")
            || stderr.contains("Operation not permitted")
            || stderr.contains("must be root");
        if says_permission || lacks_net_admin() == Some(true) {
            return Err(InitError::PermissionDenied {
                binary: binary.to_string(),
                stderr,
            });
        }
        return Err(InitError::CommandFailed {
            binary: binary.to_string(),
            status: output.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `iptables-save -t nat` for one backend and family.
pub fn save_nat(backend: Backend, family: IpFamily) -> Result<String, InitError> {
    run_tool(&backend.save_binary(family), &["-t", "nat"], None)
}

/// Feeds `input` to the backend's restore tool without touching anything it does not name.
pub fn restore(backend: Backend, family: IpFamily, input: &str) -> Result<(), InitError> {
    let wait = format!("--wait={XTABLES_LOCK_WAIT_SECS}");
    let args: &[&str] = match backend {
        // Only legacy iptables serialises writers with the xtables lock; nft commits
        // transactionally.
        Backend::Legacy => &["--noflush", wait.as_str()],
        Backend::Nft => &["--noflush"],
    };
    run_tool(&backend.restore_binary(family), args, Some(input)).map(|_| ())
}

/// How many rules a backend holds across all tables and both families, as evidence of
/// which backend the node's other components (kube-proxy, CNI) use.
fn rule_count(backend: Backend) -> usize {
    [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .filter_map(|family| run_tool(&backend.save_binary(family), &[], None).ok())
        .map(|saved| saved.lines().filter(|l| l.starts_with("-A ")).count())
        .sum()
}

/// The backend chosen and why, for the log line.
#[derive(Debug)]
pub struct Choice {
    pub backend: Backend,
    pub reason: String,
}

/// Picks the backend: the forced one, or in auto mode the one already holding rules.
///
/// Mixing backends in one network namespace makes both rule sets apply in an order
/// nobody chose, so weft follows whatever is there. With no rules anywhere, nft is the
/// modern default, unless only the legacy binaries are installed.
pub fn choose(mode: IptablesMode) -> Result<Choice, InitError> {
    let forced = |backend: Backend| Choice {
        backend,
        reason: "forced by --iptables-mode".to_string(),
    };
    match mode {
        IptablesMode::Nft => return Ok(forced(Backend::Nft)),
        IptablesMode::Legacy => return Ok(forced(Backend::Legacy)),
        IptablesMode::Auto => {}
    }
    let nft_installed = find_binary(&Backend::Nft.restore_binary(IpFamily::V4)).is_some();
    let legacy_installed = find_binary(&Backend::Legacy.restore_binary(IpFamily::V4)).is_some();
    let (backend, reason) = match (nft_installed, legacy_installed) {
        (false, false) => {
            return Err(InitError::BinaryMissing {
                binary: format!(
                    "{} or {}",
                    Backend::Nft.restore_binary(IpFamily::V4),
                    Backend::Legacy.restore_binary(IpFamily::V4)
                ),
            })
        }
        (true, false) => (Backend::Nft, "only iptables-nft is installed".to_string()),
        (false, true) => (
            Backend::Legacy,
            "only iptables-legacy is installed".to_string(),
        ),
        (true, true) => {
            let nft_rules = rule_count(Backend::Nft);
            let legacy_rules = rule_count(Backend::Legacy);
            let backend = if legacy_rules > nft_rules {
                Backend::Legacy
            } else {
                Backend::Nft
            };
            (
                backend,
                format!("detected: legacy holds {legacy_rules} rules, nft {nft_rules}"),
            )
        }
    };
    Ok(Choice { backend, reason })
}

/// Whether the ip6tables side can be programmed here: the tool exists and the kernel
/// has IPv6 at all (booting with `ipv6.disable=1` removes `/proc/net/if_inet6`).
pub fn ipv6_unavailable_reason(backend: Backend) -> Option<String> {
    let binary = backend.restore_binary(IpFamily::V6);
    if find_binary(&binary).is_none() {
        return Some(format!("{binary} is not installed"));
    }
    if !Path::new("/proc/net/if_inet6").exists() {
        return Some("the kernel has IPv6 disabled".to_string());
    }
    None
}

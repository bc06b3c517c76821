//! A test cluster: a "node" network namespace holding a bridge (198.18.0.1/24), pods as
//! network namespaces joined to it by veth pairs, a temp dir, and cleanup of all of it
//! (processes, namespaces, files) on drop, with every process log printed if the test panics.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{HarnessError, IoContext, Result};
use crate::manifests::Manifests;
use crate::mesh::IdentityFiles;
use crate::netns::Netns;
use crate::proc::{kill_pid, tool_path, ProcRegistry};

/// The node's address on the pod bridge. 198.18.0.0/15 is reserved for benchmarking
/// (RFC 2544), so it never collides with a real network on the test machine.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const POD_PREFIX_LEN: u8 = 24;
const BRIDGE: &str = "br0";
/// Every namespace the harness creates starts with this, followed by `<test>-<pid>-<n>`.
const NETNS_PREFIX: &str = "weft-";

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    name: String,
    test: String,
    tmp_dir: PathBuf,
    registry: Arc<ProcRegistry>,
    node: Netns,
    /// Namespaces created so far, in creation order (deleted in reverse).
    created_netns: Mutex<Vec<String>>,
    pod_octets: Mutex<Vec<u8>>,
    manifests: Manifests,
    pub(crate) identity: Mutex<Option<IdentityFiles>>,
}

impl Cluster {
    /// A fresh node namespace with the pod bridge, and a temp dir (world-readable, because the
    /// proxy runs as an unprivileged user and reads trust anchors and tokens from it).
    pub fn new(test: &str) -> Result<Cluster> {
        remove_stale_namespaces();
        let short: String = test
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(8)
            .collect();
        let n = NEXT_CLUSTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NETNS_PREFIX}{short}-{}-{n}", std::process::id());
        let tmp_dir = std::env::temp_dir().join(format!("weft-e2e-{name}"));
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir)
                .context(|| format!("removing stale {}", tmp_dir.display()))?;
        }
        let log_dir = tmp_dir.join("logs");
        std::fs::create_dir_all(&log_dir).context(|| format!("creating {}", log_dir.display()))?;
        make_world_readable_dir(&tmp_dir)?;
        let manifests = Manifests::new(tmp_dir.join("manifests"))?;
        let registry = Arc::new(ProcRegistry::new(log_dir));
        let cluster = Cluster {
            node: Netns::new(name.clone(), registry.clone()),
            name,
            test: test.to_string(),
            tmp_dir,
            registry,
            created_netns: Mutex::new(Vec::new()),
            pod_octets: Mutex::new(Vec::new()),
            manifests,
            identity: Mutex::new(None),
        };
        // From here on, a failure still cleans up through Drop.
        cluster.add_netns(&cluster.name)?;
        let node = cluster.name.as_str();
        ip(&["-n", node, "link", "set", "lo", "up"])?;
        ip(&["-n", node, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{NODE_IP}/{POD_PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["-n", node, "link", "set", BRIDGE, "up"])?;
        Ok(cluster)
    }

    /// `weft-<test>-<pid>-<n>`: also the node namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn test_name(&self) -> &str {
        &self.test
    }

    /// The node namespace, where the bridge and the control plane live.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// The manifests directory the control plane reads (`--source dir:<path>`).
    pub fn manifests(&self) -> &Manifests {
        &self.manifests
    }

    /// A pod: namespace `<cluster>-<name>` whose `eth0` has 198.18.0.<ip_last_octet>/24 and a
    /// default route via the node; the other veth end (`wv<octet>`) is on the node's bridge.
    pub fn add_pod(&self, name: &str, ip_last_octet: u8) -> Result<Pod> {
        if !(2..=254).contains(&ip_last_octet) {
            return Err(HarnessError::invalid(
                "pod address",
                format!("last octet {ip_last_octet} (must be 2..=254; .1 is the node)"),
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(HarnessError::invalid(
                "pod name",
                format!("{name:?} (use lowercase letters, digits and '-')"),
            ));
        }
        {
            let mut octets = lock(&self.pod_octets);
            if octets.contains(&ip_last_octet) {
                return Err(HarnessError::invalid(
                    "pod address",
                    format!("198.18.0.{ip_last_octet} is already used in this cluster"),
                ));
            }
            octets.push(ip_last_octet);
        }
        let netns = format!("{}-{name}", self.name);
        let ip_addr = Ipv4Addr::new(198, 18, 0, ip_last_octet);
        // Interface names are limited to 15 bytes; they only need to be unique in the node
        // namespace, which belongs to this cluster alone.
        let host_veth = format!("wv{ip_last_octet}");
        self.add_netns(&netns)?;
        let node = self.name.as_str();
        ip(&[
            "-n", node, "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", node, "link", "set", &host_veth, "master", BRIDGE])?;
        ip(&["-n", node, "link", "set", &host_veth, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_addr}/{POD_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &NODE_IP.to_string(),
        ])?;
        Ok(Pod {
            netns: Netns::new(netns, self.registry.clone()),
            node: self.node.clone(),
            name: name.to_string(),
            ip: ip_addr,
            host_veth,
        })
    }

    /// Names of the namespaces this cluster created and has not deleted yet.
    pub fn netns_names(&self) -> Vec<String> {
        lock(&self.created_netns).clone()
    }

    /// The tail of every process log (what a failing test prints).
    pub fn dump_logs(&self) -> String {
        self.registry.dump_logs()
    }

    fn add_netns(&self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        lock(&self.created_netns).push(name.to_string());
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== weft-e2e: {} failed; process logs (cluster {}) =====\n{}===== end of logs ({}) =====",
                self.test,
                self.name,
                self.registry.dump_logs(),
                if keep_tmp() {
                    format!("files kept in {}", self.tmp_dir.display())
                } else {
                    "set WEFT_KEEP_TMP=1 to keep the temp dir".to_string()
                }
            );
        }
        self.registry.kill_all();
        let created = std::mem::take(&mut *lock(&self.created_netns));
        for netns in created.iter().rev() {
            delete_netns(netns);
        }
        if !keep_tmp() {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp_dir) {
                eprintln!("weft-e2e: removing {}: {e}", self.tmp_dir.display());
            }
        }
    }
}

/// One pod (a network namespace on the node's bridge). Derefs to its [`Netns`], so
/// `pod.spawn(..)`, `pod.run(..)`, `pod.connect(..)` run inside the pod.
#[derive(Clone, Debug)]
pub struct Pod {
    netns: Netns,
    node: Netns,
    name: String,
    ip: Ipv4Addr,
    host_veth: String,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `<pod ip>:<port>`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node namespace this pod hangs off.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The node-side end of the pod's veth pair (capture there to see the pod's wire traffic).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
}

impl Deref for Pod {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.netns
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn keep_tmp() -> bool {
    std::env::var("WEFT_KEEP_TMP").is_ok_and(|v| v == "1")
}

/// Runs `ip <args>` on the host and fails with its stderr if it does not exit 0.
fn ip(args: &[&str]) -> Result<String> {
    let output = Command::new(tool_path("ip"))
        .args(args)
        .output()
        .context(|| format!("running ip {}", args.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::CommandFailed {
            command: format!("ip {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Kills whatever still runs in `netns` (grandchildren the harness never saw included) and
/// deletes it. Best effort: cleanup must go on after a failure.
fn delete_netns(netns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", netns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            kill_pid(pid);
        }
    }
    if let Err(e) = ip(&["netns", "delete", netns]) {
        eprintln!("weft-e2e: deleting netns {netns}: {e}");
    }
}

/// Namespaces left behind by a test process that died without cleaning up (killed, or
/// aborted): recognisable by our prefix and a pid that no longer exists.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(name);
        }
    }
}

fn make_world_readable_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .context(|| format!("chmod 755 {}", dir.display()))
}

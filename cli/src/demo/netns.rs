//! A one-machine stand-in for a cluster: a "node" network namespace holding a bridge,
//! and one namespace per pod wired to it by a veth pair. Everything it creates (namespaces,
//! processes) is removed when it is dropped.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// The node's address on the pods' bridge; the control plane listens here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub struct Sandbox {
    prefix: String,
    node: String,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    pods: usize,
    logs: PathBuf,
}

impl Sandbox {
    /// `prefix` keeps namespace names unique per run (kernel limit: none; ours: short, for `ip netns list`).
    pub fn new(prefix: &str, logs: &Path) -> anyhow::Result<Self> {
        let node = format!("{prefix}-node");
        let mut sb = Sandbox {
            prefix: prefix.to_string(),
            node: node.clone(),
            namespaces: Vec::new(),
            procs: Vec::new(),
            pods: 0,
            logs: logs.to_path_buf(),
        };
        sb.add_netns(&node)?;
        ip(&["-n", &node, "link", "set", "lo", "up"])?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        Ok(sb)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        // A namespace left over by a killed earlier run would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// A pod namespace with `eth0` = `ip`/24 on the node's bridge and a default route via the node.
    pub fn add_pod(&mut self, name: &str, pod_ip: Ipv4Addr) -> anyhow::Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        self.add_netns(&ns)?;
        self.pods += 1;
        let host_end = format!("veth{}", self.pods);
        ip(&[
            "-n", &self.node, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        ip(&[
            "-n", &self.node, "link", "set", &host_end, "master", "br0", "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &NODE_IP.to_string(),
        ])?;
        Ok(ns)
    }

    /// Runs a command to completion inside `ns`.
    pub fn exec(&self, ns: &str, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {:?} in {ns} failed: {}",
                program.display(),
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts a long-running process inside `ns` (as `uid` when given), logging to `<logs>/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        uid: Option<u32>,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let log_path = self.logs.join(format!("{name}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
            cmd.args(["setpriv", &u, &g, "--clear-groups", "--"]);
        }
        cmd.arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    /// Whether every process started is still running; names the first that exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited ({status}); see {}/{name}.log",
                    self.logs.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`; sockets it opens live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    match handle.join() {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::anyhow!("joining network namespace {ns}: {e}")),
        Err(_) => bail!("thread in {ns} panicked"),
    }
}

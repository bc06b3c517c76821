//! Tests of `weft-proxy init`: golden rule sets and input validation (no privileges),
//! and, as root, idempotency, backend detection and real redirection inside throwaway
//! network namespaces.

use std::error::Error;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use weft_proxy::init::{render_rules, InitArgs, InitError, InterceptConfig, IpFamily};

type TestResult = Result<(), Box<dyn Error>>;

const WEFT_PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// Parses `weft-proxy init` arguments the way the binary does.
#[derive(Parser)]
struct InitCli {
    #[command(flatten)]
    args: InitArgs,
}

fn init_args(args: &[&str]) -> Result<InitArgs, clap::Error> {
    InitCli::try_parse_from(std::iter::once("init").chain(args.iter().copied())).map(|c| c.args)
}

fn config(args: &[&str]) -> Result<InterceptConfig, Box<dyn Error>> {
    Ok(InterceptConfig::from_args(&init_args(args)?)?)
}

const SKIP_ARGS: [&str; 6] = [
    "--skip-inbound-ports",
    "22, 8081",
    "--skip-outbound-ports",
    "443,5432",
    "--skip-outbound-cidrs",
    "10.0.0.0/8, 169.254.169.254, fd00::/8",
];

/// Compares `actual` with `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites the file.
fn assert_golden(name: &str, actual: &str) -> TestResult {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&path, actual)?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    })?;
    assert_eq!(
        actual,
        expected,
        "rules differ from {} (UPDATE_GOLDEN=1 rewrites it after review)",
        path.display()
    );
    Ok(())
}

#[test]
fn golden_default_rules() -> TestResult {
    let cfg = config(&[])?;
    assert_eq!(cfg, InterceptConfig::default());
    assert_golden("init_default_v4.txt", &render_rules(&cfg, IpFamily::V4))?;
    assert_golden("init_default_v6.txt", &render_rules(&cfg, IpFamily::V6))
}

#[test]
fn golden_rules_with_skips() -> TestResult {
    let cfg = config(&SKIP_ARGS)?;
    assert_golden("init_skips_v4.txt", &render_rules(&cfg, IpFamily::V4))?;
    assert_golden("init_skips_v6.txt", &render_rules(&cfg, IpFamily::V6))
}

#[test]
fn invalid_ports_are_rejected() -> TestResult {
    for (flag, value) in [
        ("--skip-inbound-ports", "22,0"),
        ("--skip-inbound-ports", "70000"),
        ("--skip-outbound-ports", "https"),
        ("--skip-outbound-ports", "443;80"),
    ] {
        let result = config(&[flag, value]);
        let err = result
            .err()
            .ok_or_else(|| format!("{flag} {value} was accepted"))?;
        match err.downcast_ref::<InitError>() {
            Some(InitError::InvalidPort { flag: f, .. }) => assert_eq!(*f, flag),
            other => panic!("{flag} {value}: expected InvalidPort, got {other:?}"),
        }
    }
    // The proxy's own ports are checked by clap (range) and for collisions.
    assert!(init_args(&["--inbound-port", "0"]).is_err());
    assert!(init_args(&["--admin-port", "65536"]).is_err());
    let collision = config(&["--admin-port", "7140"])
        .err()
        .ok_or("colliding admin and outbound ports were accepted")?;
    assert!(matches!(
        collision.downcast_ref::<InitError>(),
        Some(InitError::ConflictingPorts { port: 7140, .. })
    ));
    Ok(())
}

#[test]
fn invalid_cidrs_are_rejected() -> TestResult {
    for value in [
        "10.0.0.0/33",
        "10.0.0.0/8,300.1.1.1",
        "fd00::/129",
        "10.0.0.0/x",
    ] {
        let err = config(&["--skip-outbound-cidrs", value])
            .err()
            .ok_or_else(|| format!("{value} was accepted"))?;
        assert!(
            matches!(
                err.downcast_ref::<InitError>(),
                Some(InitError::InvalidCidr { .. })
            ),
            "{value}: expected InvalidCidr, got {err:?}"
        );
    }
    Ok(())
}

#[test]
fn ipv6_flag_forms() -> TestResult {
    assert!(!init_args(&[])?.ipv6);
    assert!(init_args(&["--ipv6"])?.ipv6);
    assert!(!init_args(&["--ipv6=false"])?.ipv6);
    assert!(!init_args(&["--ipv6", "false", "--dry-run"])?.ipv6);
    Ok(())
}

/// The binary's dry run prints exactly the rendered rules and needs no privileges.
#[test]
fn dry_run_prints_rules_and_touches_nothing() -> TestResult {
    let output = Command::new(WEFT_PROXY)
        .arg("init")
        .arg("--dry-run")
        .arg("--ipv6")
        .args(SKIP_ARGS)
        // A missing backend would fail any real run; a dry run must not care.
        .env("PATH", "/nonexistent")
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let cfg = config(&SKIP_ARGS)?;
    let expected = format!(
        "{}\n{}",
        render_rules(&cfg, IpFamily::V4),
        render_rules(&cfg, IpFamily::V6)
    );
    assert_eq!(String::from_utf8(output.stdout)?, expected);

    let v4_only = Command::new(WEFT_PROXY)
        .args(["init", "--dry-run"])
        .output()?;
    assert_eq!(
        String::from_utf8(v4_only.stdout)?,
        render_rules(&InterceptConfig::default(), IpFamily::V4)
    );

    let bad = Command::new(WEFT_PROXY)
        .args(["init", "--dry-run", "--skip-outbound-cidrs", "10.0.0.0/40"])
        .output()?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8(bad.stderr)?;
    assert!(stderr.contains("10.0.0.0/40"), "{stderr}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Root tests: each works in its own network namespaces.

/// Whether root tests may run. Without root they are skipped locally, but fail in CI,
/// where skipping would hide that they never ran.
fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("needs root: {test} creates network namespaces and iptables rules; run the tests as root in CI");
    }
    println!("SKIPPED (needs root): {test}");
    false
}

static NETNS_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace, deleted on drop (also when the test panics).
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Result<Self, Box<dyn Error>> {
        let name = format!(
            "weft-init-{}-{}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String, Box<dyn Error>> {
        run_ok(self.command(program).args(args))
    }

    fn init(&self, args: &[&str]) -> Result<String, Box<dyn Error>> {
        let mut cmd = self.command(WEFT_PROXY);
        // The root tests cover both families; IPv6 is opt-in.
        cmd.arg("init").arg("--ipv6").args(args);
        run_ok(&mut cmd)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates stay in
    /// the namespace after it returns.
    fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, Box<dyn Error>> {
        let path = format!("/run/netns/{}", self.name);
        let joined = std::thread::spawn(move || -> io::Result<T> {
            let ns_file = File::open(&path)?;
            // SAFETY: a valid namespace fd; setns(CLONE_NEWNET) only affects this thread.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| "thread inside the namespace panicked")?;
        Ok(joined?)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> Result<String, Box<dyn Error>> {
    let output: Output = cmd.output()?;
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(output.stdout)?)
}

fn save_tool(mode: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => format!("iptables-{mode}-save"),
        IpFamily::V6 => format!("ip6tables-{mode}-save"),
    }
}

/// The `-A` rule lines of a restore input or save output.
fn rule_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("-A ")).collect()
}

/// Asserts the namespace's nat table (per backend and family) holds every rule of `cfg`
/// exactly once and no other rule touching a WEFT_ chain.
fn assert_installed_once(
    ns: &NetNs,
    mode: &str,
    family: IpFamily,
    cfg: &InterceptConfig,
) -> TestResult {
    let saved = ns.run(&save_tool(mode, family), &["-t", "nat"])?;
    let saved_rules = rule_lines(&saved);
    let rendered = render_rules(cfg, family);
    let wanted = rule_lines(&rendered);
    for rule in &wanted {
        let copies = saved_rules.iter().filter(|l| *l == rule).count();
        assert_eq!(
            copies, 1,
            "{mode} {family}: {rule:?} present {copies} times in\n{saved}"
        );
    }
    let weft_rules = saved_rules.iter().filter(|l| l.contains("WEFT_")).count();
    assert_eq!(
        weft_rules,
        wanted.len(),
        "{mode} {family}: unexpected WEFT rules in\n{saved}"
    );
    Ok(())
}

fn weft_rule_count(ns: &NetNs, mode: &str, family: IpFamily) -> Result<usize, Box<dyn Error>> {
    let saved = ns.run(&save_tool(mode, family), &["-t", "nat"])?;
    Ok(rule_lines(&saved)
        .iter()
        .filter(|l| l.contains("WEFT_"))
        .count())
}

fn check_idempotent(mode: &str) -> TestResult {
    let ns = NetNs::new()?;
    // Somebody else's rules in the same tables must survive untouched.
    let iptables = format!("iptables-{mode}");
    ns.run(
        &iptables,
        &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN"],
    )?;
    ns.run(
        &iptables,
        &["-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"],
    )?;

    let mut args = vec!["--iptables-mode", mode];
    args.extend(SKIP_ARGS);
    ns.init(&args)?;
    ns.init(&args)?;
    let cfg = config(&SKIP_ARGS)?;
    for family in [IpFamily::V4, IpFamily::V6] {
        assert_installed_once(&ns, mode, family, &cfg)?;
    }
    let nat = ns.run(&save_tool(mode, IpFamily::V4), &["-t", "nat"])?;
    assert!(nat.contains("-A OUTPUT -p udp -j RETURN\n"), "{nat}");
    let filter = ns.run(&save_tool(mode, IpFamily::V4), &["-t", "filter"])?;
    assert!(
        filter.contains("-A INPUT -p tcp -m tcp --dport 9 -j ACCEPT\n"),
        "{filter}"
    );

    // A rerun with another configuration replaces the rule set rather than adding to it.
    ns.init(&["--iptables-mode", mode, "--skip-outbound-ports", "8443"])?;
    let changed = config(&["--skip-outbound-ports", "8443"])?;
    for family in [IpFamily::V4, IpFamily::V6] {
        assert_installed_once(&ns, mode, family, &changed)?;
    }
    Ok(())
}

#[test]
fn init_twice_installs_each_rule_once_nft() -> TestResult {
    if !have_root("init_twice_installs_each_rule_once_nft") {
        return Ok(());
    }
    check_idempotent("nft")
}

#[test]
fn init_twice_installs_each_rule_once_legacy() -> TestResult {
    if !have_root("init_twice_installs_each_rule_once_legacy") {
        return Ok(());
    }
    check_idempotent("legacy")
}

#[test]
fn auto_mode_follows_the_backend_holding_rules() -> TestResult {
    if !have_root("auto_mode_follows_the_backend_holding_rules") {
        return Ok(());
    }
    let cfg = InterceptConfig::default();

    // Empty namespace: nft.
    let fresh = NetNs::new()?;
    let log = fresh.init(&[])?;
    assert!(log.contains("using iptables-nft"), "{log}");
    assert_installed_once(&fresh, "nft", IpFamily::V4, &cfg)?;
    assert_eq!(weft_rule_count(&fresh, "legacy", IpFamily::V4)?, 0);

    // Legacy already in use (as by a legacy kube-proxy/CNI): weft joins it.
    let legacy = NetNs::new()?;
    legacy.run(
        "iptables-legacy",
        &["-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"],
    )?;
    let log = legacy.init(&[])?;
    assert!(log.contains("using iptables-legacy"), "{log}");
    assert_installed_once(&legacy, "legacy", IpFamily::V4, &cfg)?;
    assert_installed_once(&legacy, "legacy", IpFamily::V6, &cfg)?;
    assert_eq!(weft_rule_count(&legacy, "nft", IpFamily::V4)?, 0);
    assert_eq!(weft_rule_count(&legacy, "nft", IpFamily::V6)?, 0);
    Ok(())
}

#[test]
fn init_without_privileges_fails_clearly() -> TestResult {
    if !have_root("init_without_privileges_fails_clearly") {
        return Ok(());
    }
    let ns = NetNs::new()?;
    let output = ns
        .command("setpriv")
        .args([
            "--reuid",
            "2170",
            "--regid",
            "2170",
            "--clear-groups",
            "--inh-caps=-all",
            WEFT_PROXY,
            "init",
            "--iptables-mode",
            "nft",
        ])
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr)?;
    assert!(
        stderr.contains("CAP_NET_ADMIN") && stderr.contains("Permission denied"),
        "{stderr}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Behaviour: connections really land on the proxy's listeners, or really do not.

/// The address a REDIRECTed connection was originally sent to.
fn original_dst(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: a zeroed sockaddr_in is valid; the kernel writes at most `len` bytes.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

fn listen(ns: &NetNs, addr: &str) -> Result<TcpListener, Box<dyn Error>> {
    let addr: SocketAddr = addr.parse()?;
    let listener = ns.enter(move || TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn connect(ns: &NetNs, addr: &str) -> Result<TcpStream, Box<dyn Error>> {
    let addr: SocketAddr = addr.parse()?;
    ns.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .map_err(|e| format!("connect to {addr} in {}: {e}", ns.name).into())
}

/// The next connection on `listener`, waiting up to two seconds.
fn accept(listener: &TcpListener, what: &str) -> Result<TcpStream, Box<dyn Error>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("{what}: no connection arrived ({e})").into()),
        }
    }
}

/// Asserts nothing is waiting on `listener` (call after the expected connection arrived
/// elsewhere, so a misrouted one would already be queued).
fn assert_idle(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: unexpected connection from {peer}"),
        Err(e) => panic!("{what}: accept failed: {e}"),
    }
}

fn check_redirection(mode: &str) -> TestResult {
    // "pod" gets the rules; "peer" stands for everything outside the pod.
    let pod = NetNs::new()?;
    let peer = NetNs::new()?;
    run_ok(Command::new("ip").args([
        "-n",
        &pod.name,
        "link",
        "add",
        "weft-pod",
        "type",
        "veth",
        "peer",
        "name",
        "weft-peer",
        "netns",
        &peer.name,
    ]))?;
    for (ns, dev, addr) in [
        (&pod, "weft-pod", "198.18.0.1/24"),
        (&peer, "weft-peer", "198.18.0.99/24"),
    ] {
        run_ok(Command::new("ip").args(["-n", &ns.name, "addr", "add", addr, "dev", dev]))?;
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", dev, "up"]))?;
    }
    pod.init(&["--iptables-mode", mode, "--skip-inbound-ports", "22"])?;

    let outbound = listen(&pod, "127.0.0.1:7140")?;
    let inbound = listen(&pod, "0.0.0.0:7143")?;
    let skipped_inbound = listen(&pod, "0.0.0.0:22")?;
    let app_on_loopback = listen(&pod, "127.0.0.1:9000")?;
    let peer_server = listen(&peer, "198.18.0.99:80")?;

    // The app (root, not the proxy's UID) dialing out lands on the outbound listener.
    let _app = connect(&pod, "198.18.0.99:80")?;
    let redirected = accept(&outbound, "app → 198.18.0.99:80 on the outbound listener")?;
    assert_eq!(original_dst(&redirected)?, "198.18.0.99:80".parse()?);
    assert_idle(
        &peer_server,
        "peer server (app connection must be intercepted)",
    );

    // The proxy's UID dials out directly.
    let status = pod
        .command("setpriv")
        .args([
            "--reuid",
            "2170",
            "--regid",
            "2170",
            "--clear-groups",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/198.18.0.99/80 && echo proxy-uid >&3",
        ])
        .status()?;
    assert!(status.success(), "proxy-uid connection failed: {status}");
    let mut direct = accept(&peer_server, "proxy uid → peer server")?;
    direct.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = String::new();
    direct.read_to_string(&mut greeting)?;
    assert_eq!(greeting, "proxy-uid\n");
    assert_idle(
        &outbound,
        "outbound listener (proxy uid must not be intercepted)",
    );

    // Inbound from outside the pod lands on the inbound listener...
    let _from_peer = connect(&peer, "198.18.0.1:8080")?;
    let inbound_conn = accept(&inbound, "peer → pod:8080 on the inbound listener")?;
    assert_eq!(original_dst(&inbound_conn)?, "198.18.0.1:8080".parse()?);

    // ...except on a skipped port, which reaches the app as is.
    let _ssh = connect(&peer, "198.18.0.1:22")?;
    let ssh = accept(&skipped_inbound, "peer → pod:22 (skipped)")?;
    // With conntrack active, SO_ORIGINAL_DST answers for unNATed connections too, with
    // the address the connection really has.
    assert_eq!(SocketAddr::V4(original_dst(&ssh)?), ssh.local_addr()?);
    assert_idle(&inbound, "inbound listener (port 22 is skipped)");

    // The app calling its own pod IP is inbound traffic, not outbound.
    let _own = connect(&pod, "198.18.0.1:8080")?;
    let own = accept(&inbound, "app → own pod IP on the inbound listener")?;
    assert_eq!(original_dst(&own)?, "198.18.0.1:8080".parse()?);
    assert_idle(&outbound, "outbound listener (own pod IP is inbound)");

    // Loopback is never intercepted.
    let mut loopback_client = connect(&pod, "127.0.0.1:9000")?;
    loopback_client.write_all(b"x")?;
    let loopback = accept(&app_on_loopback, "app → 127.0.0.1:9000")?;
    assert_eq!(
        SocketAddr::V4(original_dst(&loopback)?),
        loopback.local_addr()?
    );
    assert_idle(&outbound, "outbound listener (loopback)");
    assert_idle(&inbound, "inbound listener (loopback)");
    Ok(())
}

#[test]
fn redirects_real_connections_nft() -> TestResult {
    if !have_root("redirects_real_connections_nft") {
        return Ok(());
    }
    check_redirection("nft")
}

#[test]
fn redirects_real_connections_legacy() -> TestResult {
    if !have_root("redirects_real_connections_legacy") {
        return Ok(());
    }
    check_redirection("legacy")
}

//! `weft demo`: the standalone control plane plus three pods on this machine — a meshed
//! client and server, and an unmeshed "legacy" pod — with real iptables interception and
//! mTLS between the proxies. It shows what the server's proxy sees (peer identities, TLS,
//! bytes) and checks it; with `--duration` it runs unattended and exits non-zero on failure.

pub mod app;
mod canary;
mod netns;
mod policy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netns::{in_netns, Sandbox, NODE_IP};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run for this many seconds without interaction, then exit (non-zero if a check failed).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Directory for the demo's files and logs (default: a new temporary directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

const PROXY_UID: u32 = 2170;
const NAMESPACE: &str = "demo";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const LEGACY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// The `echo` Service's cluster IP: not routable anywhere, only the client's proxy resolves it.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const APP_PORT: u16 = 8080;

struct Pod {
    name: &'static str,
    ip: Ipv4Addr,
    service_account: &'static str,
    meshed: bool,
    /// Extra YAML label lines (the `app` label is always the pod's name, or as set here).
    labels: &'static str,
}

const PODS: [Pod; 5] = [
    Pod {
        name: "server",
        ip: SERVER_IP,
        service_account: "server",
        meshed: true,
        labels: "    app: server\n",
    },
    Pod {
        name: "client",
        ip: CLIENT_IP,
        service_account: "client",
        meshed: true,
        labels: "    app: client\n",
    },
    Pod {
        name: "legacy",
        ip: LEGACY_IP,
        service_account: "legacy",
        meshed: false,
        labels: "    app: legacy\n",
    },
    Pod {
        name: "web-v1",
        ip: Ipv4Addr::new(198, 18, 0, 5),
        service_account: "web",
        meshed: true,
        labels: "    app: web\n    version: v1\n",
    },
    Pod {
        name: "web-v2",
        ip: Ipv4Addr::new(198, 18, 0, 6),
        service_account: "web",
        meshed: true,
        labels: "    app: web\n    version: v2\n",
    },
];

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    preflight()?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("locating weft's own directory")?;
    let proxy = bin_dir.join("weft-proxy");
    let control = bin_dir.join("weft-control");
    for b in [&proxy, &control] {
        if !b.exists() {
            bail!("{} not found next to weft; build the workspace first (cargo build --workspace --bins)", b.display());
        }
    }
    let work = match &args.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("weft-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let identity_dir = work.join("identity");
    let manifests = work.join("manifests");
    let logs = work.join("logs");
    for d in [&manifests, &logs] {
        std::fs::create_dir_all(d)?;
    }
    // The proxies run as an unprivileged user and must read their token and the anchors.
    set_mode(&work, 0o755)?;
    set_mode(&manifests, 0o755)?;

    step("generating a trust anchor and issuer");
    let generated = weft_certs::generate_identity(
        "cluster.local",
        Duration::from_secs(86_400 * 30),
        Duration::from_secs(86_400 * 7),
    )?;
    crate::identity::write_identity(&identity_dir, &generated, true)?;
    set_mode(&identity_dir, 0o755)?;
    let anchors = identity_dir.join("trust-anchors.pem");

    let mut tokens = BTreeMap::new();
    for pod in PODS.iter().filter(|p| p.meshed) {
        let token = random_token();
        let path = work.join(format!("{}.token", pod.name));
        std::fs::write(&path, &token)?;
        set_mode(&path, 0o644)?;
        tokens.insert(pod.name, (path, token));
    }
    write_manifests(&manifests, &tokens)?;
    std::fs::write(
        manifests.join("web.yaml"),
        canary::services_yaml(NAMESPACE, APP_PORT),
    )?;
    canary::write_split(&manifests, NAMESPACE, canary::PHASES[0])?;
    std::fs::write(
        manifests.join("policy.yaml"),
        policy::policy_yaml(NAMESPACE, APP_PORT),
    )?;

    let prefix = format!("wd{}", std::process::id() % 100_000);
    let mut sb = Sandbox::new(&prefix, &logs)?;
    step(&format!(
        "control plane on {NODE_IP}:7150 (namespace {})",
        sb.node()
    ));
    let node = sb.node().to_string();
    sb.spawn(
        "control",
        &node,
        None,
        &control,
        &[
            "--source",
            &format!("dir:{}", manifests.display()),
            "--identity",
            &identity_dir.display().to_string(),
            "--listen",
            &format!("{NODE_IP}:7150"),
        ],
        &[("WEFT_LOG", "info".to_string())],
    )?;

    let mut pod_ns = BTreeMap::new();
    for pod in &PODS {
        let ns = sb.add_pod(pod.name, pod.ip)?;
        if pod.meshed {
            sb.exec(&ns, &proxy, &["init"])
                .context("installing iptables rules")?;
            let (token_path, _) = &tokens[pod.name];
            let env = [
                ("WEFT_CONTROL_ADDR", format!("{NODE_IP}:7150")),
                (
                    "WEFT_CONTROL_IDENTITY",
                    "spiffe://cluster.local/ns/weft/sa/weft-control".to_string(),
                ),
                ("WEFT_TRUST_ANCHORS", anchors.display().to_string()),
                ("WEFT_IDENTITY_TOKEN_FILE", token_path.display().to_string()),
                ("WEFT_NAMESPACE", NAMESPACE.to_string()),
                ("WEFT_SERVICE_ACCOUNT", pod.service_account.to_string()),
                ("WEFT_POD_NAME", pod.name.to_string()),
                ("WEFT_LOG", "info".to_string()),
            ];
            sb.spawn(
                &format!("proxy-{}", pod.name),
                &ns,
                Some(PROXY_UID),
                &proxy,
                &[],
                &env,
            )?;
            step(&format!(
                "pod {:<7} {}  meshed (iptables + proxy as uid {PROXY_UID}, sa {})",
                pod.name, pod.ip, pod.service_account
            ));
        } else {
            step(&format!("pod {:<7} {}  not meshed", pod.name, pod.ip));
        }
        pod_ns.insert(pod.name, ns);
    }
    let me = std::env::current_exe()?;
    sb.spawn(
        "app-server",
        &pod_ns["server"],
        None,
        &me,
        &["demo-echo", "--listen", &format!("0.0.0.0:{APP_PORT}")],
        &[],
    )?;
    for version in ["web-v1", "web-v2"] {
        let listen = format!("0.0.0.0:{APP_PORT}");
        let args = ["demo-http", "--listen", listen.as_str(), "--name", version];
        sb.spawn(
            &format!("app-{version}"),
            &pod_ns[version],
            None,
            &me,
            &args,
            &[],
        )?;
    }

    for pod in PODS.iter().filter(|p| p.meshed) {
        wait_ready(&mut sb, &node, pod)?;
    }
    wait_listening(
        &mut sb,
        &pod_ns["server"],
        SocketAddr::from(([127, 0, 0, 1], APP_PORT)),
    )?;
    for version in ["web-v1", "web-v2"] {
        wait_listening(
            &mut sb,
            &pod_ns[version],
            SocketAddr::from(([127, 0, 0, 1], APP_PORT)),
        )?;
    }
    step("all proxies ready (each holds a workload certificate)");
    println!();

    let service = SocketAddr::from((SERVICE_IP, 80));
    let server_direct = SocketAddr::from((SERVER_IP, APP_PORT));
    println!("client → echo Service {service} (→ server:{APP_PORT}, mTLS between the proxies)");
    println!("legacy → server pod {server_direct} directly (plaintext; no proxy on legacy)");
    println!(
        "client → web Service {}:80 over HTTP, split by a TrafficSplit the demo edits: 90/10 → 50/50 → 0/100",
        canary::WEB_IP
    );
    match args.duration {
        Some(secs) => println!("running for {secs} s\n"),
        None => println!("running until Ctrl-C (the split moves every 20 s)\n"),
    }

    let started = Instant::now();
    let phase_len = args.duration.map_or(Duration::from_secs(20), |s| {
        Duration::from_secs(s.max(9)) / 3
    });
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let interrupted = interrupt_flag()?;
    let mut stats = Stats::default();
    let mut phases: Vec<canary::PhaseTally> =
        canary::PHASES.iter().map(|_| Default::default()).collect();
    let (mut phase, mut phase_started) = (0usize, Instant::now());
    let mut table: Option<canary::RouteTable> = None;
    let mut round = 0u64;
    loop {
        round += 1;
        let msg =
            format!("hello #{round} from the client pod, through two weft proxies").into_bytes();
        record(
            &mut stats.client,
            in_netns(&pod_ns["client"], move || app::echo_once(service, &msg))?,
        );
        if round % 3 == 1 {
            let msg = format!("plaintext #{round} from legacy").into_bytes();
            record(
                &mut stats.legacy,
                in_netns(&pod_ns["legacy"], move || {
                    app::echo_once(server_direct, &msg)
                })?,
            );
        }
        // Requests during the first 2 s of a phase may still follow the previous split.
        let settled = phase_started.elapsed() >= Duration::from_secs(2);
        for _ in 0..5 {
            let result = in_netns(&pod_ns["client"], canary::get_web)?;
            if settled || result.as_ref().map_or(true, |(status, _)| *status != 200) {
                canary::request(&mut phases[phase], result);
            }
        }
        sb.check_alive()?;
        if round % 5 == 1 {
            print_view(&node)?;
            let now = read_table(&node)?;
            now.print(table.as_ref(), canary::PHASES[phase]);
            table = Some(now);
        }
        if phase + 1 < canary::PHASES.len() && phase_started.elapsed() >= phase_len {
            phase += 1;
            phase_started = Instant::now();
            let (v1, v2) = canary::PHASES[phase];
            canary::write_split(&manifests, NAMESPACE, (v1, v2))?;
            println!("\n• TrafficSplit web-canary edited: web-v1 {v1}% / web-v2 {v2}%\n");
        }
        if deadline.is_some_and(|d| Instant::now() >= d)
            || interrupted.load(std::sync::atomic::Ordering::Relaxed)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // Traffic has stopped, so a windowed view would show zeros: totals since start instead.
    println!("\nfinal view (totals since the proxies started):");
    let inbound = print_view(&node)?;
    read_table(&node)?.print(None, canary::PHASES[phase]);
    let mut checks = evaluate(&stats, &inbound);
    checks.extend(canary_checks(&phases, phase));
    println!();
    let web = canary::WEB_IP;
    let v1 = policy::web_pod(Ipv4Addr::new(198, 18, 0, 5), APP_PORT);
    let calls = vec![
        in_netns(&pod_ns["client"], move || {
            policy::call("client", SocketAddr::from((web, 80)), "/api/items", 200)
        })?,
        in_netns(&pod_ns["client"], move || {
            policy::call("client", SocketAddr::from((web, 80)), "/admin", 403)
        })?,
        in_netns(&pod_ns["legacy"], move || {
            policy::call("legacy", v1, "/", 403)
        })?,
    ];
    checks.extend(policy::print(&calls));
    println!();
    let mut failed = 0;
    for (ok, what) in &checks {
        println!("  [{}] {what}", if *ok { " ok " } else { "FAIL" });
        failed += usize::from(!ok);
    }
    println!("\nfiles and logs: {}", work.display());
    drop(sb);
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    client: Tally,
    legacy: Tally,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    bytes: u64,
    last_error: Option<String>,
}

fn record(t: &mut Tally, result: Result<usize, String>) {
    match result {
        Ok(n) => {
            t.ok += 1;
            t.bytes += n as u64;
        }
        Err(e) => {
            t.failed += 1;
            eprintln!("  connection failed: {e}");
            t.last_error = Some(e);
        }
    }
}

/// One row of the server proxy's inbound view, keyed by (peer identity, tls).
type InboundView = BTreeMap<(String, String), (u64, u64, u64)>;

fn print_view(node: &str) -> anyhow::Result<InboundView> {
    let admin = SocketAddr::from((SERVER_IP, 7191));
    let (status, body) =
        in_netns(node, move || app::http_get(admin, "/metrics"))?.map_err(anyhow::Error::msg)?;
    if status != 200 {
        bail!("server proxy /metrics answered {status}");
    }
    let mut view = InboundView::new();
    for (name, labels, value) in parse_metrics(&body) {
        if labels.get("direction").map(String::as_str) != Some("inbound") {
            continue;
        }
        let key = (
            labels.get("peer_identity").cloned().unwrap_or_default(),
            labels.get("tls").cloned().unwrap_or_default(),
        );
        let row = view.entry(key).or_default();
        match name.as_str() {
            "weft_tcp_connections_opened_total" => row.0 = value as u64,
            "weft_tcp_read_bytes_total" => row.1 = value as u64,
            "weft_tcp_write_bytes_total" => row.2 = value as u64,
            _ => {}
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  server proxy, inbound:  {:<44} {:>5} {:>7} {:>10} {:>10}",
        "peer identity", "tls", "conns", "bytes in", "bytes out"
    );
    for ((peer, tls), (conns, read, written)) in &view {
        let peer = if peer.is_empty() {
            "(unauthenticated)"
        } else {
            peer
        };
        let _ = writeln!(
            out,
            "                          {peer:<44} {tls:>5} {conns:>7} {read:>10} {written:>10}"
        );
    }
    print!("{out}");
    Ok(view)
}

fn evaluate(stats: &Stats, inbound: &InboundView) -> Vec<(bool, String)> {
    let client_id = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/client");
    let mtls = inbound
        .get(&(client_id.clone(), "true".to_string()))
        .map_or(0, |r| r.0);
    let plain = inbound
        .get(&(String::new(), "false".to_string()))
        .map_or(0, |r| r.0);
    vec![
        (
            stats.client.ok > 0 && stats.client.failed == 0,
            format!(
                "client → Service: {} echoes intact, {} failed{}",
                stats.client.ok,
                stats.client.failed,
                suffix(&stats.client)
            ),
        ),
        (
            stats.legacy.ok > 0 && stats.legacy.failed == 0,
            format!(
                "legacy → server: {} echoes intact, {} failed{}",
                stats.legacy.ok,
                stats.legacy.failed,
                suffix(&stats.legacy)
            ),
        ),
        (
            mtls >= stats.client.ok && mtls > 0,
            format!("server proxy saw {mtls} mTLS connection(s) from {client_id}"),
        ),
        (
            plain >= stats.legacy.ok && plain > 0,
            format!("server proxy saw {plain} plaintext connection(s) from the unmeshed pod"),
        ),
    ]
}

fn suffix(t: &Tally) -> String {
    t.last_error
        .as_ref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default()
}

/// (metric name, labels, value) for each sample line of a Prometheus text exposition.
fn parse_metrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
        }
        out.push((name.to_string(), map, value));
    }
    out
}

fn wait_ready(sb: &mut Sandbox, node: &str, pod: &Pod) -> anyhow::Result<()> {
    let admin = SocketAddr::from((pod.ip, 7191));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok((200, _))) = in_netns(node, move || app::http_get(admin, "/ready")) {
            return Ok(());
        }
        sb.check_alive()?;
        if Instant::now() > deadline {
            bail!("proxy of pod {} not ready after 30 s", pod.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_table(node: &str) -> anyhow::Result<canary::RouteTable> {
    let admin = SocketAddr::from((CLIENT_IP, 7191));
    let (_, body) =
        in_netns(node, move || app::http_get(admin, "/metrics"))?.map_err(anyhow::Error::msg)?;
    Ok(canary::RouteTable::read(&body, "web.demo"))
}

/// Every HTTP request succeeded, and once the last split (0/100) settled only web-v2 served.
fn canary_checks(phases: &[canary::PhaseTally], reached: usize) -> Vec<(bool, String)> {
    let failed: u64 = phases.iter().map(|p| p.failed).sum();
    let served: u64 = phases.iter().flat_map(|p| p.served_by.values()).sum();
    let last_error = phases
        .iter()
        .find_map(|p| p.last_error.clone())
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    let mut checks = vec![(
        failed == 0 && served > 0,
        format!("HTTP through the split: {served} responses, {failed} failed{last_error}"),
    )];
    if reached + 1 == canary::PHASES.len() {
        let last = &phases[reached];
        let v1 = last.served_by.get("web-v1").copied().unwrap_or(0);
        let v2 = last.served_by.get("web-v2").copied().unwrap_or(0);
        checks.push((
            v1 == 0 && v2 > 0,
            format!("after the split moved to 0/100: web-v2 served {v2}, web-v1 {v1}"),
        ));
    }
    checks
}

fn wait_listening(sb: &mut Sandbox, ns: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })? {
        sb.check_alive()?;
        if Instant::now() > deadline {
            bail!("the echo app is not listening on {addr} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn write_manifests(dir: &Path, tokens: &BTreeMap<&str, (PathBuf, String)>) -> anyhow::Result<()> {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  annotations:\n    weft.io/inject: enabled\n"
    );
    for pod in &PODS {
        let mut annotations = String::new();
        if pod.meshed {
            let digest = ring::digest::digest(&ring::digest::SHA256, tokens[pod.name].1.as_bytes());
            let _ = writeln!(
                annotations,
                "    weft.io/token-sha256: \"{}\"",
                hex::encode(digest.as_ref())
            );
        } else {
            annotations.push_str("    weft.io/inject: disabled\n");
        }
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels:\n{labels}  annotations:\n{annotations}spec:\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    ports:\n    - containerPort: {APP_PORT}\nstatus:\n  podIP: {ip}\n",
            name = pod.name,
            labels = pod.labels,
            sa = pod.service_account,
            ip = pod.ip,
        );
    }
    let _ = write!(
        yaml,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: {NAMESPACE}\nspec:\n  clusterIP: {SERVICE_IP}\n  selector:\n    app: server\n  ports:\n  - name: echo\n    port: 80\n    targetPort: {APP_PORT}\n"
    );
    let path = dir.join("demo.yaml");
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("weft demo needs root: it creates network namespaces and iptables rules (run it as root)");
    }
    for tool in ["ip", "setpriv", "iptables-restore"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            bail!(
                "weft demo needs `{tool}` (Debian: apt-get install iproute2 util-linux iptables)"
            );
        }
    }
    Ok(())
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn step(what: &str) {
    println!("• {what}");
}

/// Set when the user presses Ctrl-C, so the demo can print its summary and clean up.
fn interrupt_flag() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                set.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    });
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# HELP x y\nweft_tcp_connections_opened_total{direction=\"inbound\",peer_identity=\"spiffe://cluster.local/ns/demo/sa/client\",tls=\"true\"} 3\nplain 1.5\n# EOF\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].0, "weft_tcp_connections_opened_total");
        assert_eq!(
            samples[0].1["peer_identity"],
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert_eq!(samples[0].1["tls"], "true");
        assert_eq!(samples[0].2, 3.0);
        assert_eq!(samples[1], ("plain".to_string(), BTreeMap::new(), 1.5));
    }
}

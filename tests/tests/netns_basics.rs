//! Self-test of the harness without any weft binary: pods talk over the bridge, captures see
//! plaintext, users and signals work, and a dropped cluster leaves nothing behind.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use anyhow::{ensure, Context};
use weft_e2e::{
    bin, e2e_test, require_prereqs, run_client, start_server, Capture, Cluster, Cmd, ServerKind,
    BASE_TOOLS, SIGTERM,
};

const MARKER: &str = "WEFT-PLAINTEXT-MARKER-5c81";
const CAPTURE_TOOLS: &[&str] = &["ip", "setpriv", "tcpdump"];

#[test]
fn one_mib_echo_crosses_the_bridge_in_plaintext() {
    e2e_test(
        "netns_echo",
        CAPTURE_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let server = cluster.add_pod("server", 20)?;
            let client = cluster.add_pod("client", 10)?;
            let _echo = start_server(&server, ServerKind::Echo, 8080)?;
            // On the node side of the client's veth: what the pod puts on the wire.
            let capture = Capture::start(cluster.node(), client.host_veth(), "tcp port 8080")?;
            let summary = run_client(
                &client,
                server.addr(8080),
                &["--bytes", "1048576", "--marker", MARKER],
            )?;
            let captured = capture.stop()?;
            ensure!(
                summary.ok == 1 && summary.failed == 0 && summary.bytes == 1 << 20,
                "1 MiB echo failed: {summary:?}"
            );
            ensure!(
                captured.contains(MARKER.as_bytes()),
                "the capture must see the plaintext marker ({} payload bytes in {} packets)",
                captured.payload_bytes(),
                captured.packets
            );
            let flows = captured.flows();
            let to_server = flows
                .iter()
                .filter(|((_, dst), _)| *dst == server.addr(8080))
                .map(|(_, bytes)| bytes.len())
                .sum::<usize>();
            let from_server = flows
                .iter()
                .filter(|((src, _), _)| *src == server.addr(8080))
                .map(|(_, bytes)| bytes.len())
                .sum::<usize>();
            ensure!(
                to_server >= 1 << 20 && from_server >= 1 << 20,
                "both directions must carry the whole MiB: sent {to_server}, echoed {from_server}"
            );
            Ok(())
        },
    );
}

#[test]
fn concurrent_sink_clients_verify_hashes_and_capture_works_inside_a_pod() {
    e2e_test(
        "netns_sink",
        CAPTURE_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let server = cluster.add_pod("server", 20)?;
            let client = cluster.add_pod("client", 10)?;
            let _sink = start_server(&server, ServerKind::Sink, 9000)?;
            let capture = Capture::start(&client, "eth0", "tcp port 9000")?;
            let summary = run_client(
                &client,
                server.addr(9000),
                &[
                    "--mode",
                    "sink",
                    "--bytes",
                    "100000",
                    "--connections",
                    "50",
                    "--marker",
                    MARKER,
                ],
            )?;
            let captured = capture.stop()?;
            ensure!(summary.ok == 50 && summary.failed == 0, "{summary:?}");
            ensure!(
                captured.contains(MARKER.as_bytes()),
                "marker not seen from inside the pod"
            );
            ensure!(
                captured.payload_bytes() >= 50 * 100_000,
                "capture missed data"
            );
            Ok(())
        },
    );
}

#[test]
fn namespaces_are_isolated_and_reachable_over_http() {
    e2e_test("netns_http", BASE_TOOLS, |cluster| -> anyhow::Result<()> {
        let web = cluster.add_pod("web", 30)?;
        let other = cluster.add_pod("other", 31)?;
        let listener = web.bind("0.0.0.0:9080".parse()?)?;
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            for conn in listener.incoming().take(3) {
                let mut conn = conn?;
                let mut request = [0u8; 1024];
                let n = conn.read(&mut request)?;
                let missing = request[..n].starts_with(b"GET /missing ");
                let response: &[u8] = if missing {
                    b"HTTP/1.0 404 Not Found\r\n\r\nno"
                } else {
                    b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"
                };
                conn.write_all(response)?;
            }
            Ok(())
        });
        let url = format!("http://{}:9080/", web.ip());
        let from_pod = other.http_get(&url)?;
        ensure!(
            from_pod.status == 200 && from_pod.body == b"hello\n",
            "{from_pod:?}"
        );
        let from_node = cluster.node().http_get(&url)?;
        ensure!(from_node.status == 200, "{from_node:?}");

        // The testapp's http-get mode: exit status follows the HTTP status.
        let testapp = bin("weft-testapp")?;
        let missing = other.run(Cmd::new(&testapp).args(["http-get", &format!("{url}missing")]))?;
        ensure!(!missing.status.success(), "a 404 must fail http-get");
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;

        // Loopback belongs to each namespace: a listener on web's 127.0.0.1 is not on other's.
        let _loopback_only = web.bind("127.0.0.1:9081".parse()?)?;
        ensure!(
            other
                .connect("127.0.0.1:9081".parse()?, Duration::from_secs(2))
                .is_err(),
            "another pod's loopback must not be reachable"
        );
        Ok(())
    });
}

#[test]
fn spawn_as_drops_to_the_given_user_and_logs_are_collected() {
    e2e_test("netns_user", BASE_TOOLS, |cluster| -> anyhow::Result<()> {
        let pod = cluster.add_pod("app", 40)?;
        let output = pod.run_as(2170, 2170, ["sh", "-c", "id -u; id -g; id -G"])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "{output:?}");
        ensure!(
            stdout.lines().collect::<Vec<_>>() == ["2170", "2170", "2170"],
            "expected uid, gid and only group 2170, got {stdout:?}"
        );
        let root = pod.run_ok(["id", "-u"])?;
        ensure!(String::from_utf8_lossy(&root.stdout).trim() == "0");
        pod.run_ok(["sh", "-c", "echo hello-from-the-pod >&2"])?;
        ensure!(
            cluster.dump_logs().contains("hello-from-the-pod"),
            "the failure report must contain process output"
        );
        Ok(())
    });
}

#[test]
fn signals_reach_the_process_and_exit_status_is_reported() {
    e2e_test(
        "netns_signal",
        BASE_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let pod = cluster.add_pod("app", 50)?;
            let mut proc = pod.spawn([
                "sh",
                "-c",
                "trap 'echo got-term; exit 7' TERM; echo started; while :; do sleep 0.05; done",
            ])?;
            proc.wait_for_output("started", Duration::from_secs(5))?;
            ensure!(
                proc.wait_timeout(Duration::from_millis(200))?.is_none(),
                "exited on its own"
            );
            proc.signal(SIGTERM)?;
            let status = proc
                .wait_timeout(Duration::from_secs(5))?
                .context("no exit after SIGTERM")?;
            ensure!(status.code() == Some(7), "{status}");
            ensure!(proc.stdout().contains("got-term"));
            ensure!(
                proc.signal(SIGTERM).is_err(),
                "signalling a reaped process must be refused"
            );
            Ok(())
        },
    );
}

#[test]
fn dropping_the_cluster_kills_everything_and_deletes_namespaces() -> anyhow::Result<()> {
    require_prereqs!("netns_cleanup", BASE_TOOLS);
    let cluster = Cluster::new("netns_cleanup")?;
    let pod = cluster.add_pod("app", 60)?;
    let mut child = pod.spawn(["sleep", "300"])?;
    // A grandchild the harness never sees directly: only `ip netns pids` can find it.
    let mut parent = pod.spawn(["sh", "-c", "sleep 300 & echo $!; wait"])?;
    let mut grandchild_pid = None;
    weft_e2e::wait_for("the grandchild's pid", Duration::from_secs(5), || {
        grandchild_pid = parent.stdout().trim().parse::<u32>().ok();
        grandchild_pid.is_some()
    })?;
    let grandchild_pid = grandchild_pid.context("no grandchild pid")?;
    let names = cluster.netns_names();
    let tmp_dir = cluster.tmp_dir().to_path_buf();
    ensure!(
        names.len() == 2,
        "expected node + pod namespaces, got {names:?}"
    );

    drop(cluster);

    let status = child
        .wait_timeout(Duration::from_secs(5))?
        .context("the cluster did not kill its process")?;
    ensure!(status.signal() == Some(9), "expected SIGKILL, got {status}");
    ensure!(parent.wait_timeout(Duration::from_secs(5))?.is_some());
    weft_e2e::wait_for("the grandchild to die", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{grandchild_pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    })?;
    let list = std::process::Command::new(weft_e2e::prereqs::find_tool("ip").context("no ip")?)
        .args(["netns", "list"])
        .output()?;
    let list = String::from_utf8_lossy(&list.stdout);
    for name in &names {
        ensure!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} still exists:\n{list}"
        );
    }
    if std::env::var("WEFT_KEEP_TMP").as_deref() != Ok("1") {
        ensure!(!tmp_dir.exists(), "{} was not removed", tmp_dir.display());
    }
    Ok(())
}

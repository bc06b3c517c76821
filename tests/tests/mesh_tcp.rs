//! Foundation acceptance tests: transparent mTLS TCP between two meshed pods, checked on the
//! wire and in the proxies' metrics, across certificate renewal, a control-plane outage and a
//! proxy's SIGTERM drain. Every test builds its own cluster.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use weft_e2e::mesh::control_plane_addr;
use weft_e2e::{
    client_summary, e2e_test, run_client, spawn_client, start_server, Capture, Cluster, MeshPod,
    MeshPodSpec, Proc, ServerKind, MESH_TOOLS, SIGTERM,
};

const NS: &str = "shop";
const ECHO_PORT: u16 = 8080;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const MARKER: &str = "WEFT-SECRET-MARKER-93ab";
const CERT_EXPIRY: &str = "weft_identity_cert_expiry_timestamp_seconds";
const OPENED: &str = "weft_tcp_connections_opened_total";
const OPEN: &str = "weft_tcp_open_connections";

/// A client pod and an echo-server pod, both meshed and ready, and the control plane.
struct Mesh {
    control_plane: Proc,
    client: MeshPod,
    server: MeshPod,
    _echo: Proc,
}

fn mesh(
    cluster: &Cluster,
    control_plane_args: &[&str],
    server_env: &[(&str, &str)],
) -> anyhow::Result<Mesh> {
    let control_plane = cluster.start_control_plane(control_plane_args)?;
    let mut server_spec = MeshPodSpec::new("server", 20, NS, "server-sa");
    for (key, value) in server_env {
        server_spec = server_spec.env(key, value);
    }
    let mut server = cluster.add_mesh_pod(server_spec)?;
    let mut client = cluster.add_mesh_pod(MeshPodSpec::new("client", 10, NS, "client-sa"))?;
    let echo = start_server(&server, ServerKind::Echo, ECHO_PORT)?;
    server.wait_ready(READY_TIMEOUT)?;
    client.wait_ready(READY_TIMEOUT)?;
    Ok(Mesh {
        control_plane,
        client,
        server,
        _echo: echo,
    })
}

/// Inbound mTLS connections from `client` that `server`'s proxy has counted.
fn inbound_mtls_opened(server: &MeshPod, client: &MeshPod) -> anyhow::Result<f64> {
    let labels = [
        ("direction", "inbound"),
        ("peer_identity", client.identity()),
        ("tls", "true"),
    ];
    Ok(server.metrics()?.value(OPENED, &labels).unwrap_or(0.0))
}

/// Writes `message` and reads the same bytes back.
fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream
        .write_all(message)
        .context("writing on the held connection")?;
    let mut echoed = vec![0u8; message.len()];
    stream
        .read_exact(&mut echoed)
        .context("reading the echo on the held connection")?;
    ensure!(echoed == message, "the echo differs from what was sent");
    Ok(())
}

/// Half-closes and expects the echo server's EOF: the connection ends cleanly.
fn finish(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).context("waiting for EOF")?;
    ensure!(rest.is_empty(), "unexpected {} trailing bytes", rest.len());
    Ok(())
}

#[test]
fn meshed_echo_carries_1_mib_and_100_mib_intact() {
    e2e_test("mesh_bulk", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let m = mesh(cluster, &[], &[])?;
        let target = m.server.addr(ECHO_PORT);
        let small = run_client(&m.client, target, &["--bytes", "1048576"])?;
        ensure!(
            small.ok == 1 && small.failed == 0 && small.bytes == 1 << 20,
            "1 MiB: {small:?}"
        );
        let big = spawn_client(
            &m.client,
            target,
            &["--bytes", "104857600", "--timeout-secs", "60"],
        )?;
        let big = client_summary(big, Duration::from_secs(600))?;
        ensure!(
            big.ok == 1 && big.failed == 0 && big.bytes == 100 << 20,
            "100 MiB: {big:?}"
        );
        // Both went through the proxies, not around them.
        let opened = inbound_mtls_opened(&m.server, &m.client)?;
        ensure!(
            opened >= 2.0,
            "server proxy counted {opened} mTLS connections, expected 2"
        );
        Ok(())
    });
}

#[test]
fn meshed_echo_handles_200_concurrent_connections() {
    e2e_test(
        "mesh_concurrent",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let m = mesh(cluster, &[], &[])?;
            let summary = run_client(
                &m.client,
                m.server.addr(ECHO_PORT),
                &["--bytes", "65536", "--connections", "200"],
            )?;
            ensure!(summary.ok == 200 && summary.failed == 0, "{summary:?}");
            let opened = inbound_mtls_opened(&m.server, &m.client)?;
            ensure!(
                opened >= 200.0,
                "server proxy counted {opened} mTLS connections, expected 200"
            );
            Ok(())
        },
    );
}

#[test]
fn meshed_traffic_is_mutual_tls_on_the_wire() {
    e2e_test("mesh_wire", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let m = mesh(cluster, &[], &[])?;
        let filter = format!("tcp and host {} and port {ECHO_PORT}", m.server.ip());
        let capture = Capture::start(&m.client, "eth0", &filter)?;
        let summary = run_client(
            &m.client,
            m.server.addr(ECHO_PORT),
            &["--bytes", "262144", "--marker", MARKER],
        )?;
        let captured = capture.stop()?;
        ensure!(summary.ok == 1 && summary.failed == 0, "{summary:?}");
        ensure!(
            captured.payload_bytes() >= 2 * 262_144,
            "the capture saw only {} payload bytes: did traffic leave the pod on eth0?",
            captured.payload_bytes()
        );
        ensure!(
            !captured.contains(MARKER.as_bytes()),
            "the plaintext marker crossed the wire"
        );
        ensure!(
            captured.contains(&[0x17, 0x03, 0x03]),
            "no TLS application-data record on the wire"
        );
        // The ClientHello is plaintext: it names the server's identity (SNI) and the opaque
        // TCP protocol (ALPN), as the contract fixes.
        ensure!(
            captured.contains(b"server-sa.shop.serviceaccount.identity.weft.cluster.local"),
            "no SNI naming the server's identity in the ClientHello"
        );
        ensure!(
            captured.contains(b"weft.opaque/1"),
            "no ALPN weft.opaque/1 in the ClientHello"
        );
        Ok(())
    });
}

#[test]
fn metrics_label_peer_identity_and_tls_state() {
    e2e_test(
        "mesh_metrics",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let m = mesh(cluster, &[], &[])?;
            let mut held = m
                .client
                .connect(m.server.addr(ECHO_PORT), Duration::from_secs(5))?;
            echo_round_trip(&mut held, b"hello through the mesh")?;

            let inbound_mtls = [
                ("direction", "inbound"),
                ("peer_identity", m.client.identity()),
                ("tls", "true"),
            ];
            let outbound_mtls = [
                ("direction", "outbound"),
                ("peer_identity", m.server.identity()),
                ("tls", "true"),
            ];
            weft_e2e::wait_for(
                "the held connection in both proxies' metrics",
                Duration::from_secs(10),
                || {
                    let server = m.server.metrics().unwrap_or_default();
                    let client = m.client.metrics().unwrap_or_default();
                    server.value(OPEN, &inbound_mtls).unwrap_or(0.0) >= 1.0
                        && server.value(OPENED, &inbound_mtls).unwrap_or(0.0) >= 1.0
                        && client.value(OPEN, &outbound_mtls).unwrap_or(0.0) >= 1.0
                        && client.value(OPENED, &outbound_mtls).unwrap_or(0.0) >= 1.0
                },
            )
            .with_context(|| {
                format!(
                    "server metrics:\n{}\nclient metrics:\n{}",
                    m.server.metrics_text().unwrap_or_default(),
                    m.client.metrics_text().unwrap_or_default()
                )
            })?;
            let server = m.server.metrics()?;
            ensure!(
                server.value(OPENED, &[("tls", "false")]).is_none(),
                "no plaintext connection has been made yet"
            );

            // An unmeshed pod (no proxy, no iptables) reaches the meshed server in plaintext.
            let legacy = cluster.add_plain_pod(NS, "legacy", 30)?;
            let plain = run_client(&legacy, m.server.addr(ECHO_PORT), &["--bytes", "4096"])?;
            ensure!(
                plain.ok == 1 && plain.failed == 0,
                "unmeshed client: {plain:?}"
            );
            let inbound_plain = [
                ("direction", "inbound"),
                ("peer_identity", ""),
                ("tls", "false"),
            ];
            weft_e2e::wait_for(
                "a tls=\"false\" series on the server",
                Duration::from_secs(10),
                || {
                    m.server
                        .metrics()
                        .is_ok_and(|s| s.value(OPENED, &inbound_plain).unwrap_or(0.0) >= 1.0)
                },
            )
            .with_context(|| m.server.metrics_text().unwrap_or_default())?;

            finish(&mut held)?;
            Ok(())
        },
    );
}

#[test]
fn certificates_renew_under_continuous_traffic() {
    e2e_test(
        "mesh_renewal",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let mut m = mesh(cluster, &["--cert-lifetime-secs", "60"], &[])?;
            let mut traffic = spawn_client(
                &m.client,
                m.server.addr(ECHO_PORT),
                &[
                    "--bytes",
                    "16384",
                    "--duration-secs",
                    "180",
                    "--interval-ms",
                    "100",
                    "--timeout-secs",
                    "10",
                ],
            )?;
            let mut client_expiries = BTreeSet::new();
            let mut server_expiries = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(240);
            while traffic.try_wait()?.is_none() {
                ensure!(
                    Instant::now() < deadline,
                    "the traffic client did not finish"
                );
                for (pod, seen) in [
                    (&m.client, &mut client_expiries),
                    (&m.server, &mut server_expiries),
                ] {
                    if let Some(expiry) = pod.metrics().ok().and_then(|s| s.value(CERT_EXPIRY, &[]))
                    {
                        seen.insert(expiry as i64);
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            let summary = client_summary(traffic, Duration::from_secs(5))?;
            ensure!(
                summary.failed == 0,
                "connections failed across renewals: {summary:?}"
            );
            ensure!(
                summary.ok >= 300,
                "too little traffic to prove anything: {summary:?}"
            );
            for (name, seen) in [("client", &client_expiries), ("server", &server_expiries)] {
                ensure!(
                    seen.len() >= 3,
                    "the {name} proxy's {CERT_EXPIRY} took {} values in 180 s with 60 s certs \
                 (expected the first and at least two renewals): {seen:?}",
                    seen.len()
                );
            }
            ensure!(
                m.client.proxy().try_wait()?.is_none(),
                "the client proxy exited"
            );
            ensure!(
                m.control_plane.try_wait()?.is_none(),
                "the control plane exited"
            );
            Ok(())
        },
    );
}

#[test]
fn control_plane_outage_keeps_traffic_flowing_but_new_proxies_wait() {
    e2e_test("mesh_outage", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let mut m = mesh(cluster, &[], &[])?;
        let target = m.server.addr(ECHO_PORT);
        // Makes the destination known to the client proxy before the outage.
        let warm = run_client(&m.client, target, &["--bytes", "4096"])?;
        ensure!(warm.success(), "before the outage: {warm:?}");
        let mut held = m.client.connect(target, Duration::from_secs(5))?;
        echo_round_trip(&mut held, b"before the outage")?;

        m.control_plane.kill()?;
        ensure!(
            cluster
                .node()
                .connect(control_plane_addr(), Duration::from_secs(1))
                .is_err(),
            "the control plane still accepts connections"
        );
        std::thread::sleep(Duration::from_secs(2));

        echo_round_trip(&mut held, b"during the outage")?;
        let during = run_client(
            &m.client,
            target,
            &["--bytes", "65536", "--connections", "5"],
        )?;
        ensure!(
            during.ok == 5 && during.failed == 0,
            "new connections to a known destination must work without the control plane: {during:?}"
        );

        let mut late = cluster.add_mesh_pod(MeshPodSpec::new("late", 30, NS, "late-sa"))?;
        let not_ready_until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < not_ready_until {
            let status = late.ready_status();
            ensure!(
                status != Some(200),
                "a proxy that never got a certificate reported ready"
            );
            ensure!(
                late.proxy().try_wait()?.is_none(),
                "the new proxy exited:\n{}",
                late.proxy().logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }

        let _restarted = cluster.start_control_plane(&[])?;
        late.wait_ready(READY_TIMEOUT)?;
        echo_round_trip(&mut held, b"after the outage")?;
        finish(&mut held)?;
        let after = run_client(&late, target, &["--bytes", "65536"])?;
        ensure!(
            after.success(),
            "the late pod cannot reach the server: {after:?}"
        );
        Ok(())
    });
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    e2e_test("mesh_drain", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let mut m = mesh(cluster, &[], &[("WEFT_SHUTDOWN_GRACE_SECS", "30")])?;
        let target = m.server.addr(ECHO_PORT);
        let mut held = m.client.connect(target, Duration::from_secs(5))?;
        echo_round_trip(&mut held, b"before SIGTERM")?;

        let signalled = Instant::now();
        m.server.proxy().signal(SIGTERM)?;

        // New connections to the server pod hit its closed inbound listener.
        weft_e2e::wait_for(
            "the draining proxy to refuse connections",
            Duration::from_secs(5),
            || {
                matches!(
                    cluster.node().in_netns(|| TcpStream::connect_timeout(&target, Duration::from_secs(2))),
                    Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused
                )
            },
        )?;
        let refused = run_client(
            &m.client,
            target,
            &["--bytes", "1024", "--timeout-secs", "5"],
        )?;
        ensure!(
            refused.ok == 0 && refused.failed == 1,
            "a meshed client connected to a draining proxy: {refused:?}"
        );

        // The open connection keeps working and completes within the grace period.
        let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        echo_round_trip(&mut held, &payload)?;
        finish(&mut held)?;
        drop(held);

        let status = m
            .server
            .proxy()
            .wait_timeout(Duration::from_secs(35))?
            .context("the proxy did not exit after its last connection closed")?;
        ensure!(status.success(), "the proxy exited with {status}");
        ensure!(
            signalled.elapsed() < Duration::from_secs(32),
            "the drain took longer than the grace period"
        );
        Ok(())
    });
}

//! Authorization acceptance tests: `AuthorizationPolicy` identity, L4 and HTTP method/path
//! rules; default inbound policies from the control plane's flag, a namespace and a pod
//! annotation; require-mTLS ports; a client of a second trust domain; DENY over ALLOW; AUDIT;
//! live policy edits on open connections; a pathological regex; invalid objects kept out; and
//! exact allow/deny counters. Clients dial pod IPs. Every test builds its own cluster.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use weft_e2e::h1::{H1Connection, H1Response};
use weft_e2e::httpapp::{request_counts, start_grpc_server, start_http_server, SERVED_BY};
use weft_e2e::load::{run_load_blocking, LoadConfig, LoadReport};
use weft_e2e::manifests::{
    AuthorizationPolicySpec, PolicyRule, PolicySource, PolicyTarget,
    DEFAULT_INBOUND_POLICY_ANNOTATION, REQUIRE_MTLS_PORTS_ANNOTATION,
};
use weft_e2e::meshtls::ALPN_OPAQUE;
use weft_e2e::metrics::Sample;
use weft_e2e::{
    e2e_test, grpcapp, spiffe_id, spiffe_id_in, start_server, wait_for, Capture, Cluster, MeshPod,
    MeshPodSpec, MeshTlsStream, Netns, Pod, Proc, ServerKind, WorkloadCert, MESH_TOOLS,
};

const NS: &str = "shop";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
/// A default opaque port: policy applies per connection.
const POSTGRES_PORT: u16 = 5432;
const GRPC_PORT: u16 = 50051;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds every read: a request that neither gets an answer nor a close in this time fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a policy edit may take to reach a proxy when the test does not measure it.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);
const AUTHZ_TOTAL: &str = "weft_inbound_authz_total";
const OTHER_TRUST_DOMAIN: &str = "other.local";

// ---------------------------------------------------------------------------------------------
// Helpers

fn mesh_pod(cluster: &Cluster, name: &str, ip_last_octet: u8) -> anyhow::Result<MeshPod> {
    // Each pod's service account is its name: `shop/api` is the pod `api`.
    Ok(cluster.add_mesh_pod(MeshPodSpec::new(name, ip_last_octet, NS, name))?)
}

fn wait_ready(pods: &mut [&mut MeshPod]) -> anyhow::Result<()> {
    for pod in pods.iter_mut() {
        pod.wait_ready(READY_TIMEOUT)?;
    }
    Ok(())
}

/// Clients with service account `shop/<name>`.
fn service_account(name: &str) -> PolicySource {
    PolicySource::service_accounts(&[&format!("{NS}/{name}")])
}

/// At most 60 characters of `text`, for messages about 8 KB paths.
fn short(text: &str) -> String {
    if text.len() <= 60 {
        text.to_string()
    } else {
        let cut = (0..=60)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}...({} bytes)", &text[..cut], text.len())
    }
}

/// A connection from inside `client`, with [`IO_TIMEOUT`] on reads and writes.
fn tcp_connect(client: &Netns, server: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = client.connect(server, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `method path` on `conn` (POSTs carry a small body) and reads the response.
fn send(
    conn: &mut H1Connection,
    server: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<H1Response> {
    let body: Option<&[u8]> = match method {
        "POST" | "PUT" | "PATCH" => Some(b"{\"id\":1}"),
        _ => None,
    };
    conn.request(method, path, &server.to_string(), &[], body)
        .with_context(|| format!("{method} {} to {server}", short(path)))
}

/// One request on a fresh connection from inside `client`.
fn request(
    client: &Netns,
    server: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<H1Response> {
    let mut conn = H1Connection::new(client.connect(server, CONNECT_TIMEOUT)?, IO_TIMEOUT)?;
    send(&mut conn, server, method, path)
}

/// A denial comes from the proxy, not the app, and says why.
fn check_denial(response: &H1Response, what: &str) -> anyhow::Result<()> {
    ensure!(
        response.header(SERVED_BY).is_none(),
        "{what}: the 403 came from the app, so the request reached it: {response:?}"
    );
    ensure!(
        !response.body_text().trim().is_empty(),
        "{what}: a 403 without a reason in its body"
    );
    Ok(())
}

fn check_status(response: &H1Response, what: &str, expected: u16) -> anyhow::Result<()> {
    ensure!(
        response.status() == expected,
        "{what}: got {} (expected {expected}): {}",
        response.status(),
        short(&response.body_text())
    );
    if expected == 403 {
        check_denial(response, what)?;
    }
    Ok(())
}

/// `method path` from `who` (a pod) to `server` on a fresh connection gets `expected`.
fn expect_status(
    client: &Netns,
    who: &str,
    server: SocketAddr,
    method: &str,
    path: &str,
    expected: u16,
) -> anyhow::Result<()> {
    let what = format!("{who}: {method} {}", short(path));
    let response = request(client, server, method, path).with_context(|| what.clone())?;
    check_status(&response, &what, expected)
}

/// How reading a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Eof,
    /// Reset, TLS alert or similar: the peer is gone.
    Error(ErrorKind),
    /// Nothing more arrived within the read timeout: the peer kept the connection open.
    TimedOut,
}

/// Reads until the peer closes or the stream's read timeout passes.
fn read_until_closed(stream: &mut impl Read) -> (Vec<u8>, Ending) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (data, Ending::Eof),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (data, Ending::TimedOut)
            }
            Err(e) => return (data, Ending::Error(e.kind())),
        }
    }
}

/// Writes `message` and reads the same bytes back.
fn echo_round_trip(
    stream: &mut (impl Read + Write),
    message: &[u8],
    what: &str,
) -> anyhow::Result<()> {
    stream
        .write_all(message)
        .with_context(|| format!("{what}: writing"))?;
    let mut echoed = vec![0u8; message.len()];
    stream
        .read_exact(&mut echoed)
        .with_context(|| format!("{what}: reading the echo"))?;
    ensure!(
        echoed == message,
        "{what}: the echo differs from what was sent"
    );
    Ok(())
}

/// A refused connection: whatever the client writes, nothing comes back and the connection
/// is closed (not left hanging).
fn expect_closed_unanswered(stream: &mut (impl Read + Write), what: &str) -> anyhow::Result<()> {
    // On an already closed connection the write itself may fail; what comes back is what
    // counts.
    let _ = stream.write_all(b"hello? are you there?\n");
    let (data, ending) = read_until_closed(stream);
    ensure!(
        data.is_empty(),
        "{what}: a refused connection answered {} bytes: {:?}",
        data.len(),
        short(&String::from_utf8_lossy(&data))
    );
    ensure!(
        ending != Ending::TimedOut,
        "{what}: the connection was neither answered nor closed within {IO_TIMEOUT:?}"
    );
    Ok(())
}

/// A plaintext GET (no proxy on the client side) is refused: the proxy answers 403, or
/// closes the connection without a response.
fn expect_plaintext_http_refused(
    client: &Netns,
    server: SocketAddr,
    path: &str,
    what: &str,
) -> anyhow::Result<()> {
    let mut stream = tcp_connect(client, server)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes());
    let (data, ending) = read_until_closed(&mut stream);
    if data.is_empty() {
        ensure!(
            ending != Ending::TimedOut,
            "{what}: plaintext GET {path} was neither answered nor closed within {IO_TIMEOUT:?}"
        );
        return Ok(());
    }
    let text = String::from_utf8_lossy(&data);
    let status_line = text.lines().next().unwrap_or_default();
    ensure!(
        status_line.starts_with("HTTP/1.1 403") || status_line.starts_with("HTTP/1.0 403"),
        "{what}: plaintext GET {path} got {status_line:?} (expected a 403 or a close)"
    );
    ensure!(
        !text.to_ascii_lowercase().contains(SERVED_BY),
        "{what}: the 403 came from the app: {text}"
    );
    Ok(())
}

/// Runs `config` from inside `pod`.
fn load(pod: &Pod, config: &LoadConfig) -> anyhow::Result<LoadReport> {
    Ok(pod.in_netns(|| run_load_blocking(config))??)
}

/// Lines added to `proc`'s stderr after byte `from`.
fn log_since(proc: &Proc, from: usize) -> String {
    let log = proc.stderr();
    log.get(from..).unwrap_or_default().to_string()
}

/// Log entries: a line starting with a timestamp (`2026-...`) and the lines after it that
/// do not (a multi-line message, such as a regex parse error with its caret).
fn log_entries(log: &str) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in log.lines() {
        let bytes = line.as_bytes();
        let starts_entry =
            bytes.len() > 4 && bytes[..4].iter().all(u8::is_ascii_digit) && bytes[4] == b'-';
        match entries.last_mut() {
            Some(entry) if !starts_entry => {
                entry.push('\n');
                entry.push_str(line);
            }
            _ => entries.push(line.to_string()),
        }
    }
    entries
}

/// Waits until an entry added to `proc`'s stderr after byte `from` satisfies `matches`;
/// returns that entry.
fn wait_for_log_entry(
    proc: &Proc,
    from: usize,
    what: &str,
    matches: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + CONFIG_TIMEOUT;
    loop {
        if let Some(entry) = log_entries(&log_since(proc, from))
            .into_iter()
            .find(|e| matches(e))
        {
            return Ok(entry);
        }
        ensure!(
            Instant::now() < deadline,
            "no log entry {what} within {CONFIG_TIMEOUT:?}; log since the edit:\n{}",
            log_since(proc, from)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Entries of `proxy`'s stderr after byte `from` that mention an audit and [`LEDGER_POLICY`]:
/// waits up to 5 s for the first, then 1 s more for any late ones.
fn audit_lines(proxy: &Proc, from: usize) -> Vec<String> {
    let mentions = || -> Vec<String> {
        log_entries(&log_since(proxy, from))
            .into_iter()
            .filter(|l| l.to_ascii_lowercase().contains("audit") && l.contains(LEDGER_POLICY))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while mentions().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    mentions()
}

/// One `weft_inbound_authz_total` series (summed over the labels left open).
#[derive(Debug, Clone, Copy)]
struct AuthzSeries {
    decision: &'static str,
    /// The policy's name; its label may read `shop/<name>` or `<name>`.
    policy: Option<&'static str>,
    port: Option<u16>,
}

fn names_policy(sample: &Sample, name: &str) -> bool {
    sample
        .labels
        .get("policy")
        .is_some_and(|v| v == name || *v == format!("{NS}/{name}"))
}

fn authz_counts(pod: &MeshPod, series: &[AuthzSeries]) -> anyhow::Result<Vec<f64>> {
    let snapshot = pod.metrics()?;
    Ok(series
        .iter()
        .map(|s| {
            let port = s.port.map(|p| p.to_string());
            let mut labels = vec![("decision", s.decision)];
            if let Some(port) = &port {
                labels.push(("port", port.as_str()));
            }
            snapshot
                .matching(AUTHZ_TOTAL, &labels)
                .filter(|sample| s.policy.is_none_or(|p| names_policy(sample, p)))
                .map(|sample| sample.value)
                .sum()
        })
        .collect())
}

/// Reads `series` on `pod` until each is at least its `min` and two reads 300 ms apart
/// agree, so every request answered so far is counted; returns the values.
fn settled_authz(pod: &MeshPod, series: &[AuthzSeries], min: &[f64]) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + METRICS_TIMEOUT;
    let mut previous = authz_counts(pod, series)?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let current = authz_counts(pod, series)?;
        if current == previous && current.iter().zip(min).all(|(v, m)| v >= m) {
            return Ok(current);
        }
        ensure!(
            Instant::now() < deadline,
            "{AUTHZ_TOTAL} on {} did not settle at {min:?}: {series:?} = {current:?}\n{}",
            pod.name(),
            pod.metrics_text().unwrap_or_default()
        );
        previous = current;
    }
}

/// Waits for every series to grow by its expected amount, then fails unless each grew by
/// exactly that (also half a second later, so late extra counts are caught).
fn expect_authz_deltas(
    pod: &MeshPod,
    series: &[AuthzSeries],
    baseline: &[f64],
    expected: &[f64],
) -> anyhow::Result<()> {
    let deltas = || -> anyhow::Result<Vec<f64>> {
        Ok(authz_counts(pod, series)?
            .iter()
            .zip(baseline)
            .map(|(v, b)| v - b)
            .collect())
    };
    let _ = wait_for(
        "the authorization counters to grow",
        METRICS_TIMEOUT,
        || deltas().is_ok_and(|d| d.iter().zip(expected).all(|(d, e)| d >= e)),
    );
    std::thread::sleep(Duration::from_millis(500));
    let deltas = deltas()?;
    ensure!(
        deltas == expected,
        "{AUTHZ_TOTAL} on {} grew by {deltas:?} for {series:?}, expected exactly {expected:?}\n{}",
        pod.name(),
        pod.metrics_text().unwrap_or_default()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. The seed scenario

/// api may call GET /api/v1/users/<anything> and POST /api/v1/orders on internal:8080.
fn internal_api_policy() -> AuthorizationPolicySpec {
    AuthorizationPolicySpec::allow(&[("app", "internal")])
        .ports(&[HTTP_PORT])
        .rule(
            PolicyRule::new()
                .from(service_account("api"))
                .to(PolicyTarget::new(&["GET"], &["regex:/api/v1/users/.*"]))
                .to(PolicyTarget::new(&["POST"], &["/api/v1/orders"])),
        )
}

#[test]
fn seed_scenario_only_api_reaches_postgres_and_the_internal_routes_it_is_granted() {
    e2e_test("authz_seed", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let m = cluster.manifests();
        m.namespace_with_annotations(NS, false, &[(DEFAULT_INBOUND_POLICY_ANNOTATION, "deny")])?;
        m.authorization_policy(
            NS,
            "postgres-from-api",
            &AuthorizationPolicySpec::allow(&[("app", "postgres")])
                .ports(&[POSTGRES_PORT])
                .rule(PolicyRule::new().from(service_account("api"))),
        )?;
        m.authorization_policy(NS, "internal-api", &internal_api_policy())?;
        // Everything is in place before the control plane starts: the proxies' very first
        // policy is the right one.
        let _control_plane = cluster.start_control_plane(&[])?;
        let mut postgres = mesh_pod(cluster, "postgres", 20)?;
        let mut internal = mesh_pod(cluster, "internal", 21)?;
        let mut api = mesh_pod(cluster, "api", 10)?;
        let mut web = mesh_pod(cluster, "web", 11)?;
        let _postgres_app = start_server(&postgres, ServerKind::Echo, POSTGRES_PORT)?;
        let _internal_app = start_http_server(&internal, "internal", HTTP_PORT, &[])?;
        wait_ready(&mut [&mut postgres, &mut internal, &mut api, &mut web])?;

        // web → postgres: closed before the app accepts anything. The server proxy reaches the
        // app over the pod's loopback, so a SYN to 5432 there is the app being dialled.
        let pg = postgres.addr(POSTGRES_PORT);
        const APP_SYNS: &str = "tcp dst port 5432 and tcp[13] & 2 != 0";
        let capture = Capture::start(&postgres, "lo", APP_SYNS)?;
        for i in 0..3 {
            let mut stream = tcp_connect(&web, pg)?;
            expect_closed_unanswered(&mut stream, &format!("web → postgres:5432 (#{i})"))?;
        }
        let denied = capture.stop()?;
        ensure!(
            denied.packets == 0,
            "the postgres app was dialled {} times for web's denied connections",
            denied.packets
        );
        // api → postgres: a data round trip, and the same capture does see the app dialled.
        let capture = Capture::start(&postgres, "lo", APP_SYNS)?;
        for i in 0..3 {
            let mut stream = tcp_connect(&api, pg)?;
            echo_round_trip(
                &mut stream,
                format!("SELECT {i} FROM orders;\n").as_bytes(),
                "api → postgres:5432",
            )?;
        }
        let allowed = capture.stop()?;
        ensure!(
            allowed.packets >= 3,
            "the capture saw {} SYNs to the postgres app for 3 allowed connections: it cannot \
             tell whether denied ones reached the app",
            allowed.packets
        );

        let target = internal.addr(HTTP_PORT);
        for (method, path, expected) in [
            ("GET", "/api/v1/users/42", 200),
            ("POST", "/api/v1/orders", 200),
            ("DELETE", "/api/v1/users/42", 403),
            ("GET", "/admin", 403),
            // Each `to` entry pairs its methods with its paths.
            ("POST", "/api/v1/users/42", 403),
            ("GET", "/api/v1/orders", 403),
            // A regex matches the whole path.
            ("GET", "/api/v1/users", 403),
            ("GET", "/v2/api/v1/users/42", 403),
            // An exact path is exact.
            ("POST", "/api/v1/orders/7", 403),
        ] {
            expect_status(&api, "api", target, method, path, expected)?;
        }
        for (method, path) in [
            ("GET", "/api/v1/users/42"),
            ("POST", "/api/v1/orders"),
            ("DELETE", "/api/v1/users/42"),
            ("GET", "/"),
        ] {
            expect_status(&web, "web", target, method, path, 403)?;
        }
        let counts = request_counts(&internal, HTTP_PORT)?;
        ensure!(
            counts.total == 2 && counts.method("GET") == 1 && counts.method("POST") == 1,
            "the internal app should have seen exactly the 2 allowed requests: {counts:?}"
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Default policies, require-mTLS ports, another trust domain

/// A server pod whose proxy also trusts the other trust domain's anchor (`bundle`), so a
/// refusal of that domain's clients is the policy's and not the TLS handshake's.
fn server_pod(
    cluster: &Cluster,
    bundle: &Path,
    name: &str,
    ip_last_octet: u8,
    annotations: &[(&str, &str)],
) -> anyhow::Result<MeshPod> {
    let mut spec = MeshPodSpec::new(name, ip_last_octet, NS, name).trust_anchors(bundle);
    for (key, value) in annotations {
        spec = spec.annotation(key, value);
    }
    Ok(cluster.add_mesh_pod(spec)?)
}

#[test]
fn default_policies_refuse_unauthenticated_and_foreign_clients_as_configured() {
    e2e_test(
        "authz_defaults",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            cluster.manifests().namespace(NS, false)?;
            let _control_plane =
                cluster.start_control_plane(&["--default-inbound-policy", "all-authenticated"])?;
            let other = cluster.other_trust_domain(OTHER_TRUST_DOMAIN)?;
            let bundle = cluster.trust_bundle(&[&other])?;
            // authn: the control plane's default (all-authenticated).
            let mut authn = server_pod(cluster, &bundle, "authn", 20, &[])?;
            let mut strict = server_pod(
                cluster,
                &bundle,
                "strict",
                21,
                &[(DEFAULT_INBOUND_POLICY_ANNOTATION, "cluster-authenticated")],
            )?;
            let mut open = server_pod(
                cluster,
                &bundle,
                "open",
                22,
                &[
                    (DEFAULT_INBOUND_POLICY_ANNOTATION, "all-unauthenticated"),
                    (REQUIRE_MTLS_PORTS_ANNOTATION, "8080"),
                ],
            )?;
            let mut client = mesh_pod(cluster, "client", 10)?;
            // No proxy, no iptables: its connections reach the servers' proxies as sent.
            let legacy = cluster.add_plain_pod(NS, "legacy", 30)?;
            let mut apps = Vec::new();
            for pod in [&authn, &strict, &open] {
                apps.push(start_http_server(pod, pod.name(), HTTP_PORT, &[])?);
                apps.push(start_server(pod, ServerKind::Echo, ECHO_PORT)?);
            }
            wait_ready(&mut [&mut authn, &mut strict, &mut open, &mut client])?;
            let foreign =
                WorkloadCert::mint(&other, &spiffe_id_in(OTHER_TRUST_DOMAIN, NS, "foreign"))?;
            let visitor = WorkloadCert::mint(&cluster.identity()?, &spiffe_id(NS, "visitor"))?;
            let mesh_tls = |server: &MeshPod, cert: &WorkloadCert| {
                MeshTlsStream::connect(
                    &legacy,
                    server.addr(ECHO_PORT),
                    server.identity(),
                    cert,
                    &bundle,
                    ALPN_OPAQUE,
                    IO_TIMEOUT,
                )
            };

            // all-authenticated: meshed in, unmeshed out, another trusted domain in.
            expect_status(
                &client,
                "meshed client",
                authn.addr(HTTP_PORT),
                "GET",
                "/",
                200,
            )?;
            let mut stream = tcp_connect(&client, authn.addr(ECHO_PORT))?;
            echo_round_trip(&mut stream, b"meshed\n", "meshed client → authn:9000")?;
            expect_plaintext_http_refused(
                &legacy,
                authn.addr(HTTP_PORT),
                "/",
                "unmeshed → authn:8080 (all-authenticated)",
            )?;
            let mut stream = tcp_connect(&legacy, authn.addr(ECHO_PORT))?;
            expect_closed_unanswered(&mut stream, "unmeshed → authn:9000 (all-authenticated)")?;
            let mut tls = mesh_tls(&authn, &foreign)?;
            echo_round_trip(
                &mut tls,
                b"from other.local\n",
                "other.local client → authn:9000 (all-authenticated)",
            )?;
            let counts = request_counts(&authn, HTTP_PORT)?;
            ensure!(
                counts.total == 1,
                "authn's app should have seen only the meshed GET: {counts:?}"
            );

            // cluster-authenticated (pod annotation over the flag): only cluster.local.
            let strict_denials = [AuthzSeries {
                decision: "deny",
                policy: None,
                port: None,
            }];
            let denials_before = authz_counts(&strict, &strict_denials)?;
            let mut tls = mesh_tls(&strict, &foreign)?;
            expect_closed_unanswered(
                &mut tls,
                "other.local client → strict:9000 (cluster-authenticated)",
            )?;
            // The server trusts that anchor (authn let the same certificate in): this refusal
            // is the authorization's, and counted as one.
            wait_for(
                "strict's proxy to count the other.local client's denial",
                METRICS_TIMEOUT,
                || {
                    authz_counts(&strict, &strict_denials)
                        .is_ok_and(|now| now[0] > denials_before[0])
                },
            )
            .with_context(|| strict.metrics_text().unwrap_or_default())?;
            let mut tls = mesh_tls(&strict, &visitor)?;
            echo_round_trip(
                &mut tls,
                b"from cluster.local\n",
                "cluster.local client (same TLS client) → strict:9000",
            )?;
            expect_status(
                &client,
                "meshed client",
                strict.addr(HTTP_PORT),
                "GET",
                "/",
                200,
            )?;
            let mut stream = tcp_connect(&client, strict.addr(ECHO_PORT))?;
            echo_round_trip(&mut stream, b"meshed\n", "meshed client → strict:9000")?;
            expect_plaintext_http_refused(
                &legacy,
                strict.addr(HTTP_PORT),
                "/",
                "unmeshed → strict:8080 (cluster-authenticated)",
            )?;

            // all-unauthenticated with require-mtls-ports 8080: plaintext only off 8080.
            let mut stream = tcp_connect(&legacy, open.addr(ECHO_PORT))?;
            echo_round_trip(
                &mut stream,
                b"plaintext is fine here\n",
                "unmeshed → open:9000 (all-unauthenticated)",
            )?;
            expect_plaintext_http_refused(
                &legacy,
                open.addr(HTTP_PORT),
                "/",
                "unmeshed → open:8080 (require-mtls-ports)",
            )?;
            expect_status(
                &client,
                "meshed client",
                open.addr(HTTP_PORT),
                "GET",
                "/",
                200,
            )?;
            let counts = request_counts(&open, HTTP_PORT)?;
            ensure!(
                counts.total == 1,
                "open's app should have seen only the meshed GET: {counts:?}"
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 3. DENY over ALLOW; AUDIT

const LEDGER_POLICY: &str = "ledger-rollout";

#[test]
fn deny_beats_allow_and_audit_lets_through_but_counts_and_logs() {
    e2e_test(
        "authz_deny_audit",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let m = cluster.manifests();
            m.namespace(NS, false)?;
            m.authorization_policy(
                NS,
                "internal-allow",
                &AuthorizationPolicySpec::allow(&[("app", "internal")]).rule(
                    PolicyRule::new()
                        .from(PolicySource::service_accounts(&["shop/api", "shop/web"])),
                ),
            )?;
            m.authorization_policy(
                NS,
                "internal-deny-admin",
                &AuthorizationPolicySpec::deny(&[("app", "internal")])
                    .ports(&[HTTP_PORT])
                    .rule(
                        PolicyRule::new()
                            .from(service_account("web"))
                            .to(PolicyTarget::paths(&["/admin/*"])),
                    ),
            )?;
            m.authorization_policy(
                NS,
                "internal-deny-grpc",
                &AuthorizationPolicySpec::deny(&[("app", "internal")])
                    .ports(&[GRPC_PORT])
                    .rule(PolicyRule::new().from(service_account("web"))),
            )?;
            // The allow-list about to be enforced on ledger, rehearsed: only api is on it.
            m.authorization_policy(
                NS,
                LEDGER_POLICY,
                &AuthorizationPolicySpec::audit(&[("app", "ledger")])
                    .ports(&[HTTP_PORT])
                    .rule(PolicyRule::new().from(service_account("api"))),
            )?;
            let _control_plane = cluster.start_control_plane(&[])?;
            let mut internal = mesh_pod(cluster, "internal", 20)?;
            let mut ledger = mesh_pod(cluster, "ledger", 21)?;
            let mut api = mesh_pod(cluster, "api", 10)?;
            let mut web = mesh_pod(cluster, "web", 11)?;
            let _apps = [
                start_http_server(&internal, "internal", HTTP_PORT, &[])?,
                start_grpc_server(&internal, "internal", GRPC_PORT)?,
                start_http_server(&ledger, "ledger", HTTP_PORT, &[])?,
            ];
            wait_ready(&mut [&mut internal, &mut ledger, &mut api, &mut web])?;

            // DENY wins over an ALLOW that matches the same request.
            let http = internal.addr(HTTP_PORT);
            expect_status(&web, "web", http, "GET", "/admin/settings", 403)?;
            expect_status(&web, "web", http, "POST", "/admin/users", 403)?;
            expect_status(&web, "web", http, "GET", "/public", 200)?;
            expect_status(&api, "api", http, "GET", "/admin/settings", 200)?;
            let grpc = internal.addr(GRPC_PORT);
            let denied = web.in_netns(|| grpcapp::echo_blocking(grpc, &[("from web", 0)]))??;
            ensure!(
                denied[0].code == tonic::Code::PermissionDenied && denied[0].served_by.is_empty(),
                "web's gRPC call should end PERMISSION_DENIED (7) at the proxy: {denied:?}"
            );
            let allowed = api.in_netns(|| grpcapp::echo_blocking(grpc, &[("from api", 0)]))??;
            ensure!(
                allowed[0].code == tonic::Code::Ok
                    && allowed[0].message == "from api"
                    && allowed[0].served_by == "internal",
                "api's gRPC call: {allowed:?}"
            );

            // AUDIT: web is not on the list, yet gets through; each of its requests is counted
            // as a would-be denial and logged, the log rate-limited.
            let url = format!("http://{}/", ledger.addr(HTTP_PORT));
            // api is on the list: no audit count, no audit line (and the port's policy is
            // loaded before the baselines).
            let warm = load(&api, &LoadConfig::get(&url, 1, 1))?;
            ensure!(warm.all_succeeded(), "api → ledger: {warm:?}");
            let audited = [
                AuthzSeries {
                    decision: "audit_deny",
                    policy: Some(LEDGER_POLICY),
                    port: Some(HTTP_PORT),
                },
                AuthzSeries {
                    decision: "audit_deny",
                    policy: None,
                    port: None,
                },
                AuthzSeries {
                    decision: "deny",
                    policy: None,
                    port: None,
                },
            ];
            let baseline = settled_authz(&ledger, &audited, &[0.0, 0.0, 0.0])?;

            // One request: through, counted once, logged once.
            let log_from = ledger.proxy().stderr().len();
            let report = load(&web, &LoadConfig::get(&url, 1, 1))?;
            ensure!(
                report.status_count(200) == 1 && report.errors == 0,
                "AUDIT must let web's request through: {report:?}"
            );
            expect_authz_deltas(&ledger, &audited, &baseline, &[1.0, 1.0, 0.0])?;
            let lines = audit_lines(ledger.proxy(), log_from);
            ensure!(
                lines.len() == 1,
                "one audited request should be logged exactly once, naming {LEDGER_POLICY}; \
                 got {} lines:\n{}",
                lines.len(),
                lines.join("\n")
            );

            // A burst: every request counted, fewer lines than requests.
            let burst = 50;
            let log_from = ledger.proxy().stderr().len();
            let burst_report = load(&web, &LoadConfig::get(&url, burst, 1))?;
            ensure!(
                burst_report.status_count(200) == burst && burst_report.errors == 0,
                "AUDIT must let web's requests through: {burst_report:?}"
            );
            let report = load(&api, &LoadConfig::get(&url, 5, 1))?;
            ensure!(report.all_succeeded(), "api → ledger: {report:?}");
            let expected = (1 + burst) as f64;
            expect_authz_deltas(&ledger, &audited, &baseline, &[expected, expected, 0.0])?;
            let lines = audit_lines(ledger.proxy(), log_from);
            eprintln!(
                "a burst of {burst} audited requests in {:.0} ms was logged in {} entries",
                burst_report.elapsed_ms,
                lines.len()
            );
            ensure!(
                !lines.is_empty() && lines.len() < burst as usize,
                "a burst of {burst} audited requests (in {:.0} ms) should be logged, \
                 rate-limited; got {} lines naming {LEDGER_POLICY}",
                burst_report.elapsed_ms,
                lines.len()
            );
            let counts = request_counts(&ledger, HTTP_PORT)?;
            ensure!(
                counts.total == 1 + 1 + burst + 5,
                "ledger's app should have seen every request: {counts:?}"
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Live policy changes

#[test]
fn a_policy_edit_flips_allow_to_deny_within_2s_even_on_an_open_keep_alive_connection() {
    e2e_test("authz_live", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let m = cluster.manifests();
        m.namespace(NS, false)?;
        let allow_only = |client: &str| {
            AuthorizationPolicySpec::allow(&[("app", "internal")])
                .ports(&[HTTP_PORT])
                .rule(PolicyRule::new().from(service_account(client)))
        };
        m.authorization_policy(NS, "internal-clients", &allow_only("api"))?;
        let _control_plane = cluster.start_control_plane(&[])?;
        let mut internal = mesh_pod(cluster, "internal", 20)?;
        let mut api = mesh_pod(cluster, "api", 10)?;
        let mut web = mesh_pod(cluster, "web", 11)?;
        let _app = start_http_server(&internal, "internal", HTTP_PORT, &[])?;
        wait_ready(&mut [&mut internal, &mut api, &mut web])?;

        let target = internal.addr(HTTP_PORT);
        expect_status(&web, "web", target, "GET", "/", 403)?;
        let mut held = H1Connection::new(tcp_connect(&api, target)?, IO_TIMEOUT)?;
        for i in 0..3 {
            let response = send(&mut held, target, "GET", &format!("/before/{i}"))?;
            check_status(&response, "api on the held connection", 200)?;
        }

        let written = Instant::now();
        m.authorization_policy(NS, "internal-clients", &allow_only("web"))?;
        let mut allowed_after_edit = 0;
        let (flipped_after, denial) = loop {
            let response = send(&mut held, target, "GET", "/during")?;
            match response.status() {
                200 => allowed_after_edit += 1,
                403 => break (written.elapsed(), response),
                other => bail!("unexpected {other} on the held connection: {response:?}"),
            }
            ensure!(
                written.elapsed() < Duration::from_secs(10),
                "api is still allowed 10 s after the edit ({allowed_after_edit} requests)"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        check_denial(&denial, "api on the held connection after the edit")?;
        ensure!(
            flipped_after <= Duration::from_secs(2),
            "the edit took {flipped_after:?} to deny requests on the open connection \
             ({allowed_after_edit} still allowed)"
        );
        // Still denied on that connection (if the proxy kept it) and on new ones, while web
        // now gets in.
        if !denial.head.closes() {
            let response = send(&mut held, target, "GET", "/after")?;
            check_status(&response, "api on the held connection, later", 403)?;
        }
        expect_status(&api, "api", target, "GET", "/", 403)?;
        expect_status(&web, "web", target, "GET", "/", 200)?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 5. A pathological regex; invalid policies

const GUARD: &str = "path-guard";
/// Far beyond what a backtracking engine can take on `(a+)+$` (it doubles its work with each
/// `a`), and short enough that the request line stays under the 8 KiB up to which the client
/// proxy recognises HTTP/1 (a longer one goes out as opaque TCP, which path rules never allow).
const LONG_PATH_AS: usize = 8_000;

/// Anyone may request paths made of `a`s only.
fn guard_policy() -> AuthorizationPolicySpec {
    AuthorizationPolicySpec::allow(&[("app", "internal")])
        .ports(&[HTTP_PORT])
        .rule(PolicyRule::new().to(PolicyTarget::paths(&["regex:/(a+)+$"])))
}

#[test]
fn a_pathological_regex_is_fast_and_invalid_policies_leave_the_last_good_one_in_force() {
    e2e_test("authz_regex", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        let m = cluster.manifests();
        m.namespace(NS, false)?;
        m.authorization_policy(NS, GUARD, &guard_policy())?;
        let control_plane = cluster.start_control_plane(&[])?;
        let mut internal = mesh_pod(cluster, "internal", 20)?;
        let mut api = mesh_pod(cluster, "api", 10)?;
        let _app = start_http_server(&internal, "internal", HTTP_PORT, &[])?;
        wait_ready(&mut [&mut internal, &mut api])?;

        let target = internal.addr(HTTP_PORT);
        let only_as = format!("/{}", "a".repeat(LONG_PATH_AS));
        let then_b = format!("{only_as}b");
        // Every answer must come within IO_TIMEOUT; a backtracking engine would take longer
        // than the age of the universe on the second path.
        let started = Instant::now();
        for (path, expected) in [
            (only_as.as_str(), 200),
            (then_b.as_str(), 403),
            ("/aaa", 200),
            ("/", 403),
            ("/aaab", 403),
        ] {
            expect_status(&api, "api", target, "GET", path, expected)?;
        }
        for _ in 0..5 {
            expect_status(&api, "api", target, "GET", &then_b, 403)?;
        }
        eprintln!(
            "10 requests with the pathological regex took {:?}",
            started.elapsed()
        );
        // What the last good policy decides, checked after each rejected edit.
        let still_in_force = |after: &str| -> anyhow::Result<()> {
            // A wrongly applied edit would take effect about now.
            std::thread::sleep(Duration::from_secs(1));
            for (path, expected) in [("/", 403), (only_as.as_str(), 200), ("/aaab", 403)] {
                expect_status(
                    &api,
                    &format!("api after {after}"),
                    target,
                    "GET",
                    path,
                    expected,
                )?;
            }
            Ok(())
        };

        // An invalid regex next to a path that would open "/": all or nothing.
        let from = control_plane.stderr().len();
        m.authorization_policy(
            NS,
            GUARD,
            &guard_policy()
                .rule(PolicyRule::new().to(PolicyTarget::paths(&["/", "regex:/([unclosed"]))),
        )?;
        let line = wait_for_log_entry(
            &control_plane,
            from,
            "naming the policy and its `paths` field",
            |l| l.contains(GUARD) && l.contains("paths"),
        )?;
        eprintln!("invalid regex reported as: {line}");
        still_in_force("an invalid regex")?;

        // An invalid CIDR in a rule that, dropped or half-read, would let everyone in.
        let from = control_plane.stderr().len();
        m.authorization_policy(
            NS,
            GUARD,
            &guard_policy()
                .rule(PolicyRule::new().from(PolicySource::network("198.18.0.0/33", &[]))),
        )?;
        let line = wait_for_log_entry(
            &control_plane,
            from,
            "naming the policy and its `networks`/`cidr` field",
            |l| {
                let lower = l.to_ascii_lowercase();
                l.contains(GUARD) && (lower.contains("cidr") || lower.contains("networks"))
            },
        )?;
        eprintln!("invalid CIDR reported as: {line}");
        still_in_force("an invalid CIDR")?;

        // The file is still watched: a valid edit of the same object applies.
        m.authorization_policy(
            NS,
            GUARD,
            &guard_policy().rule(PolicyRule::new().to(PolicyTarget::paths(&["/"]))),
        )?;
        wait_for("a valid edit to open \"/\"", CONFIG_TIMEOUT, || {
            request(&api, target, "GET", "/").is_ok_and(|r| r.status() == 200)
        })?;
        expect_status(&api, "api after a valid edit", target, "GET", &then_b, 403)?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Exact counters

#[test]
fn allow_and_deny_counters_match_the_requests_sent_exactly() {
    e2e_test(
        "authz_metrics",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            const POLICY: &str = "internal-api";
            const ALLOWED: u64 = 17;
            const DENIED: u64 = 9;
            let m = cluster.manifests();
            m.namespace(NS, false)?;
            m.authorization_policy(
                NS,
                POLICY,
                &AuthorizationPolicySpec::allow(&[("app", "internal")])
                    .ports(&[HTTP_PORT])
                    .rule(PolicyRule::new().from(service_account("api"))),
            )?;
            let _control_plane = cluster.start_control_plane(&[])?;
            let mut internal = mesh_pod(cluster, "internal", 20)?;
            let mut api = mesh_pod(cluster, "api", 10)?;
            let mut web = mesh_pod(cluster, "web", 11)?;
            let _app = start_http_server(&internal, "internal", HTTP_PORT, &[])?;
            wait_ready(&mut [&mut internal, &mut api, &mut web])?;

            let target = internal.addr(HTTP_PORT);
            expect_status(&api, "api", target, "GET", "/warm-up", 200)?;
            expect_status(&web, "web", target, "GET", "/warm-up", 403)?;
            let series = [
                AuthzSeries {
                    decision: "allow",
                    policy: Some(POLICY),
                    port: Some(HTTP_PORT),
                },
                AuthzSeries {
                    decision: "allow",
                    policy: None,
                    port: None,
                },
                // Which policy a default-deny is charged to is the proxy's choice; the port's
                // total is what must match.
                AuthzSeries {
                    decision: "deny",
                    policy: None,
                    port: Some(HTTP_PORT),
                },
                AuthzSeries {
                    decision: "audit_deny",
                    policy: None,
                    port: None,
                },
            ];
            let baseline = settled_authz(&internal, &series, &[1.0, 1.0, 1.0, 0.0])?;

            let url = format!("http://{target}/items");
            let report = load(&api, &LoadConfig::get(&url, ALLOWED, 2))?;
            ensure!(
                report.status_count(200) == ALLOWED && report.all_succeeded(),
                "api: {report:?}"
            );
            let report = load(&web, &LoadConfig::get(&url, DENIED, 2))?;
            ensure!(
                report.status_count(403) == DENIED && report.errors == 0,
                "web: {report:?}"
            );
            expect_authz_deltas(
                &internal,
                &series,
                &baseline,
                &[ALLOWED as f64, ALLOWED as f64, DENIED as f64, 0.0],
            )?;
            let counts = request_counts(&internal, HTTP_PORT)?;
            ensure!(
            counts.total == 1 + ALLOWED,
            "the app should have seen the warm-up and the {ALLOWED} allowed requests: {counts:?}"
        );
            Ok(())
        },
    );
}

#[test]
fn log_entries_keep_multi_line_messages_together() {
    let log = "2026-01-01T00:00:00Z WARN first: regex parse error:\n    ^(?:/([)$\n          ^\nerror: unclosed object=\"p\"\n2026-01-01T00:00:01Z INFO second\n";
    let entries = log_entries(log);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries[0].starts_with("2026-01-01T00:00:00Z WARN first"));
    assert!(entries[0].ends_with("object=\"p\""));
    assert_eq!(entries[1], "2026-01-01T00:00:01Z INFO second");
}

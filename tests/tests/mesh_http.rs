//! HTTP data-plane acceptance tests: traffic split (SMI and Gateway API) applied live, path
//! routing, retries with a budget, timeouts, gRPC, HTTP/1.1 features and bounded memory, a
//! server-first protocol on an opaque port, exact request metrics, latency-aware load
//! balancing, and malformed requests. The client app always dials a Service's cluster IP
//! (198.19.0.0/24), which only its proxy can resolve. Every test builds its own cluster.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tokio_tungstenite::tungstenite::Message;
use weft_e2e::grpcapp::{self, CHAT_COUNT, ECHO_TRAILER, ECHO_TRAILER_VALUE, SERVED_BY};
use weft_e2e::h1::{chunked, H1Connection};
use weft_e2e::httpapp::{
    request_counts, start_banner_server, start_grpc_server, start_http_server, ws_echo_blocking,
};
use weft_e2e::load::{run_load_blocking, LoadConfig, LoadReport};
use weft_e2e::manifests::RouteRule;
use weft_e2e::procstat::vm_rss_bytes;
use weft_e2e::testapp::Pattern;
use weft_e2e::{
    e2e_test, wait_for, Cluster, Manifests, MeshPod, MeshPodSpec, Pod, Proc, MESH_TOOLS,
};

const NS: &str = "shop";
/// Where the HTTP test servers listen in their pods.
const APP_PORT: u16 = 8080;
/// The port every HTTP Service exposes (mapped to [`APP_PORT`]).
const SVC_PORT: u16 = 80;
const GRPC_APP_PORT: u16 = 50051;
const GRPC_SVC_PORT: u16 = 9090;
/// A default opaque port (MySQL's): the server speaks first.
const BANNER_PORT: u16 = 3306;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a route or Service written to the manifests may take to reach the client proxy.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

const REQUESTS_TOTAL: &str = "weft_http_requests_total";
const RESPONSES_TOTAL: &str = "weft_http_responses_total";
const LATENCY_COUNT: &str = "weft_http_response_latency_seconds_count";
const RETRIES_TOTAL: &str = "weft_http_retries_total";
const TIMEOUTS_TOTAL: &str = "weft_http_timeouts_total";
const TCP_OPENED: &str = "weft_tcp_connections_opened_total";

/// 198.19.0.<last>: the Service range, routed nowhere; only proxies resolve it.
fn cluster_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, last)
}

fn svc_addr(last: u8) -> SocketAddr {
    SocketAddr::from((cluster_ip(last), SVC_PORT))
}

fn svc_url(last: u8, path: &str) -> String {
    format!("http://{}{path}", svc_addr(last))
}

/// What runs in a backend pod.
#[derive(Clone, Copy)]
enum App {
    /// `http-server --name <pod name> <args>` on [`APP_PORT`].
    Http(&'static [&'static str]),
    /// `grpc-server --name <pod name>` on [`GRPC_APP_PORT`].
    Grpc,
    /// `banner-server --banner <text>` on [`BANNER_PORT`].
    Banner(&'static str),
}

struct Backend {
    name: &'static str,
    ip_last_octet: u8,
    /// Labels besides `app: <name>` (for Services selecting several pods).
    labels: &'static [(&'static str, &'static str)],
    app: App,
}

const fn http_backend(name: &'static str, ip_last_octet: u8) -> Backend {
    Backend {
        name,
        ip_last_octet,
        labels: &[],
        app: App::Http(&[]),
    }
}

/// The control plane, a meshed client pod and meshed backend pods running their apps, all
/// ready.
struct Shop {
    _control_plane: Proc,
    client: MeshPod,
    backends: BTreeMap<&'static str, MeshPod>,
    _apps: Vec<Proc>,
}

impl Shop {
    fn backend(&self, name: &str) -> anyhow::Result<&MeshPod> {
        self.backends
            .get(name)
            .with_context(|| format!("no backend {name}"))
    }

    fn backend_mut(&mut self, name: &str) -> anyhow::Result<&mut MeshPod> {
        self.backends
            .get_mut(name)
            .with_context(|| format!("no backend {name}"))
    }
}

/// Writes the namespace and whatever `objects` writes (Services, routes) before the control
/// plane starts, so it reads them at startup; then starts the control plane, the backends and
/// the client.
fn shop(
    cluster: &Cluster,
    backends: &[Backend],
    objects: impl FnOnce(&Manifests) -> weft_e2e::Result<()>,
) -> anyhow::Result<Shop> {
    let manifests = cluster.manifests();
    manifests.namespace(NS, false)?;
    objects(manifests)?;
    let control_plane = cluster.start_control_plane(&[])?;
    let mut pods = BTreeMap::new();
    let mut apps = Vec::new();
    for backend in backends {
        let pod = cluster.add_mesh_pod(MeshPodSpec::new(
            backend.name,
            backend.ip_last_octet,
            NS,
            &format!("{}-sa", backend.name),
        ))?;
        if !backend.labels.is_empty() {
            manifests.add_pod_labels(NS, backend.name, backend.labels)?;
        }
        apps.push(match backend.app {
            App::Http(args) => start_http_server(&pod, backend.name, APP_PORT, args)?,
            App::Grpc => start_grpc_server(&pod, backend.name, GRPC_APP_PORT)?,
            App::Banner(text) => start_banner_server(&pod, BANNER_PORT, text)?,
        });
        pods.insert(backend.name, pod);
    }
    let mut client = cluster.add_mesh_pod(MeshPodSpec::new("client", 10, NS, "client-sa"))?;
    for pod in pods.values_mut() {
        pod.wait_ready(READY_TIMEOUT)?;
    }
    client.wait_ready(READY_TIMEOUT)?;
    Ok(Shop {
        _control_plane: control_plane,
        client,
        backends: pods,
        _apps: apps,
    })
}

/// An HTTP Service `name` at 198.19.0.<last>:80 → pods labelled `selector`, port 8080.
fn http_service(
    manifests: &Manifests,
    name: &str,
    last: u8,
    selector: &[(&str, &str)],
) -> weft_e2e::Result<PathBuf> {
    manifests.service(NS, name, cluster_ip(last), selector, SVC_PORT, APP_PORT)
}

/// Runs `config` from inside `pod` (the test process's thread joins its network namespace,
/// so the pod's iptables send the connections to its proxy).
fn load(pod: &Pod, config: &LoadConfig) -> anyhow::Result<LoadReport> {
    Ok(pod.in_netns(|| run_load_blocking(config))??)
}

/// Sends single GETs until one gets a response `accept` likes: the route or Service has
/// reached the client proxy. Returns the accepted report.
fn wait_for_response(
    pod: &Pod,
    url: &str,
    accept: impl Fn(&LoadReport) -> bool,
) -> anyhow::Result<LoadReport> {
    let mut config = LoadConfig::get(url, 1, 1);
    config.timeout = Duration::from_secs(5);
    let deadline = Instant::now() + CONFIG_TIMEOUT;
    loop {
        let report = load(pod, &config)?;
        if accept(&report) {
            return Ok(report);
        }
        ensure!(
            Instant::now() < deadline,
            "GET {url} never got the expected response; last: {report:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for_ok(pod: &Pod, url: &str) -> anyhow::Result<()> {
    wait_for_response(pod, url, |r| r.status_count(200) == 1).map(|_| ())
}

/// The summed value of `name` with `labels` on `pod`'s proxy (0 when there is no such series).
fn metric(pod: &MeshPod, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    Ok(pod.metrics()?.value(name, labels).unwrap_or(0.0))
}

/// Reads every `(name, labels)` series on `pod` until each is at least `min` and two reads
/// 300 ms apart agree, so requests already answered are all recorded; returns the values.
fn settled(
    pod: &MeshPod,
    series: &[(&str, Vec<(&str, &str)>)],
    min: f64,
) -> anyhow::Result<Vec<f64>> {
    let read = || -> anyhow::Result<Vec<f64>> {
        let snapshot = pod.metrics()?;
        Ok(series
            .iter()
            .map(|(name, labels)| snapshot.value(name, labels).unwrap_or(0.0))
            .collect())
    };
    let deadline = Instant::now() + METRICS_TIMEOUT;
    let mut previous = read()?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let current = read()?;
        if current == previous && current.iter().all(|v| *v >= min) {
            return Ok(current);
        }
        ensure!(
            Instant::now() < deadline,
            "metrics on {} did not settle at >= {min}: {series:?} = {current:?}\n{}",
            pod.name(),
            pod.metrics_text().unwrap_or_default()
        );
        previous = current;
    }
}

/// Waits until `metric` reaches `expected`, then fails unless it equals it exactly.
fn expect_metric(
    pod: &MeshPod,
    name: &str,
    labels: &[(&str, &str)],
    baseline: f64,
    expected: f64,
) -> anyhow::Result<()> {
    let _ = wait_for(
        &format!("{name}{labels:?} to grow by {expected}"),
        METRICS_TIMEOUT,
        || metric(pod, name, labels).is_ok_and(|v| v - baseline >= expected),
    );
    let delta = metric(pod, name, labels)? - baseline;
    ensure!(
        delta == expected,
        "{name}{labels:?} on {} grew by {delta}, expected exactly {expected}\n{}",
        pod.name(),
        pod.metrics_text().unwrap_or_default()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Traffic split

const WEB_APEX: u8 = 10;

/// web-v1 and web-v2 (both labelled `group: web`) behind the apex Service `web`, which
/// selects both: without a split they would share traffic evenly.
fn split_backends() -> [Backend; 2] {
    const GROUP: &[(&str, &str)] = &[("group", "web")];
    [
        Backend {
            labels: GROUP,
            ..http_backend("web-v1", 21)
        },
        Backend {
            labels: GROUP,
            ..http_backend("web-v2", 22)
        },
    ]
}

fn split_services(m: &Manifests) -> weft_e2e::Result<()> {
    http_service(m, "web", WEB_APEX, &[("group", "web")])?;
    http_service(m, "web-v1", 11, &[("app", "web-v1")])?;
    http_service(m, "web-v2", 12, &[("app", "web-v2")])?;
    Ok(())
}

/// 90/10 holds over 2,000 requests; rewriting the object to 50/50 during a constant-rate load
/// takes effect within 2 s without failing a request.
fn split_holds_and_shifts_live(
    cluster: &Cluster,
    write_weights: impl Fn(&Manifests, u32, u32) -> weft_e2e::Result<PathBuf>,
) -> anyhow::Result<()> {
    let shop = shop(cluster, &split_backends(), |m| {
        split_services(m)?;
        write_weights(m, 90, 10).map(|_| ())
    })?;
    let client = shop.client.pod().clone();
    let url = svc_url(WEB_APEX, "/");
    wait_for_ok(&client, &url)?;

    let report = load(&client, &LoadConfig::get(&url, 2000, 8))?;
    ensure!(report.all_succeeded(), "90/10 load: {report:?}");
    let v2 = report.served_by_fraction("web-v2");
    ensure!(
        (v2 - 0.10).abs() <= 0.03,
        "90/10 split sent {:.1}% to web-v2: {report:?}",
        v2 * 100.0
    );

    let mut config = LoadConfig::get(&url, 900, 4);
    config.rate = Some(100.0);
    config.keep_records = true;
    let started = Instant::now();
    let (report, changed_at) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let running = scope.spawn(|| load(&client, &config));
        std::thread::sleep(Duration::from_secs(3));
        let written = write_weights(cluster.manifests(), 50, 50);
        let changed_at = started.elapsed();
        let report = match running.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        written?;
        Ok((report?, changed_at))
    })?;
    let failed: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.status != Some(200))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} requests failed across the change, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let changed_ms = changed_at.as_secs_f64() * 1000.0;
    let share = |records: &[&weft_e2e::load::RequestRecord]| {
        let v2 = records
            .iter()
            .filter(|r| r.served_by.as_deref() == Some("web-v2"))
            .count();
        v2 as f64 / records.len().max(1) as f64
    };
    let before: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.start_ms + r.latency_ms < changed_ms)
        .collect();
    let after: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.start_ms >= changed_ms + 2000.0)
        .collect();
    ensure!(
        before.len() >= 150 && after.len() >= 300,
        "too few requests around the change: {} before, {} after 2 s",
        before.len(),
        after.len()
    );
    ensure!(
        share(&before) < 0.25,
        "before the change web-v2 got {:.1}% (expected ~10%)",
        share(&before) * 100.0
    );
    ensure!(
        (share(&after) - 0.5).abs() <= 0.1,
        "from 2 s after the change web-v2 got {:.1}% of {} requests (expected ~50%)",
        share(&after) * 100.0,
        after.len()
    );
    Ok(())
}

#[test]
fn traffic_split_weights_hold_and_shift_live() {
    e2e_test("http_smi_split", MESH_TOOLS, |cluster| {
        split_holds_and_shifts_live(cluster, |m, v1, v2| {
            m.traffic_split(NS, "web-split", "web", &[("web-v1", v1), ("web-v2", v2)])
        })
    });
}

#[test]
fn http_route_weights_hold_and_shift_live() {
    e2e_test("http_route_split", MESH_TOOLS, |cluster| {
        split_holds_and_shifts_live(cluster, |m, v1, v2| {
            m.http_route(
                NS,
                "web-split",
                "web",
                &[],
                &[RouteRule::to_backends(&[
                    ("web-v1", SVC_PORT, v1),
                    ("web-v2", SVC_PORT, v2),
                ])],
            )
        })
    });
}

#[test]
fn http_route_path_prefix_picks_the_backend_and_unmatched_paths_get_404() {
    e2e_test(
        "http_route_paths",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let shop = shop(cluster, &split_backends(), |m| {
                split_services(m)?;
                m.http_route(
                    NS,
                    "web-paths",
                    "web",
                    &[],
                    &[
                        RouteRule::path_prefix("/api/v2", "web-v2", SVC_PORT),
                        RouteRule::path_prefix("/api", "web-v1", SVC_PORT),
                    ],
                )
                .map(|_| ())
            })?;
            let client = shop.client.pod();
            wait_for_response(client, &svc_url(WEB_APEX, "/api/v2/items"), |r| {
                r.served_by_count("web-v2") == 1
            })?;
            for (path, served_by) in [
                ("/api/v2/items", "web-v2"),
                ("/api/v2", "web-v2"),
                ("/api/v2/", "web-v2"),
                ("/api/v1/items", "web-v1"),
                // PathPrefix is element-wise: /api/v2x is not under /api/v2.
                ("/api/v2x", "web-v1"),
                ("/api", "web-v1"),
            ] {
                let report = load(client, &LoadConfig::get(&svc_url(WEB_APEX, path), 40, 4))?;
                ensure!(
                    report.all_succeeded() && report.served_by_count(served_by) == 40,
                    "{path} should all go to {served_by}: {report:?}"
                );
            }
            for path in ["/other", "/", "/apiary"] {
                let report = load(client, &LoadConfig::get(&svc_url(WEB_APEX, path), 10, 2))?;
                ensure!(
                    report.status_count(404) == 10 && report.by_served_by.is_empty(),
                    "{path} matches no rule and should get the proxy's 404: {report:?}"
                );
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Retries

#[test]
fn retries_recover_failed_gets_never_repeat_posts_and_stay_within_the_budget() {
    e2e_test(
        "http_retries",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            const FLAKY: u8 = 20;
            const BROKEN: u8 = 21;
            let backends = [
                Backend {
                    app: App::Http(&["--fail-percent", "30"]),
                    ..http_backend("flaky", 31)
                },
                Backend {
                    app: App::Http(&["--fail-percent", "100"]),
                    ..http_backend("broken", 32)
                },
            ];
            let shop = shop(cluster, &backends, |m| {
                http_service(m, "flaky", FLAKY, &[("app", "flaky")])?;
                http_service(m, "broken", BROKEN, &[("app", "broken")])?;
                // The default budget (20% of requests) cannot cover a 30% failure rate; this
                // part is about which requests are retried, the budget is checked below.
                m.http_route(
                    NS,
                    "flaky-retry",
                    "flaky",
                    &[("retry.weft.io/budget-percent", "100")],
                    &[RouteRule::to_backends(&[("flaky", SVC_PORT, 1)]).retry(
                        &[503],
                        3,
                        Some("10ms"),
                    )],
                )?;
                m.http_route(
                    NS,
                    "broken-retry",
                    "broken",
                    &[
                        ("retry.weft.io/budget-percent", "20"),
                        ("retry.weft.io/min-retries-per-second", "1"),
                    ],
                    &[RouteRule::to_backends(&[("broken", SVC_PORT, 1)]).retry(
                        &[503],
                        3,
                        Some("10ms"),
                    )],
                )?;
                Ok(())
            })?;
            let client = shop.client.pod();
            let flaky = shop.backend("flaky")?;
            let broken = shop.backend("broken")?;
            wait_for_ok(client, &svc_url(FLAKY, "/"))?;

            // GETs: every failure is retried, so the client sees (nearly) none.
            let before = request_counts(flaky, APP_PORT)?;
            let gets = 500;
            let report = load(client, &LoadConfig::get(&svc_url(FLAKY, "/"), gets, 4))?;
            let ok = report.status_count(200);
            ensure!(
                ok as f64 >= gets as f64 * 0.99 && report.errors == 0,
                "only {ok} of {gets} retried GETs succeeded: {report:?}"
            );
            let server_gets = request_counts(flaky, APP_PORT)?.method("GET") - before.method("GET");
            ensure!(
                server_gets >= gets + gets / 10,
                "the server saw {server_gets} GETs for {gets} requests: no retries happened?"
            );
            let route = [("route", "flaky-retry"), ("dst_service", "flaky.shop")];
            ensure!(
                metric(&shop.client, RETRIES_TOTAL, &route)? > 0.0,
                "no {RETRIES_TOTAL}{route:?} on the client proxy\n{}",
                shop.client.metrics_text()?
            );

            // POSTs are not idempotent: a 503 goes back to the client, never to the server again.
            let before = request_counts(flaky, APP_PORT)?;
            let posts = 200;
            let mut config = LoadConfig::get(&svc_url(FLAKY, "/"), posts, 4);
            config.method = http::Method::POST;
            config.body_bytes = 1024;
            let report = load(client, &config)?;
            let server_posts =
                request_counts(flaky, APP_PORT)?.method("POST") - before.method("POST");
            ensure!(
                server_posts == posts,
                "the server saw {server_posts} POSTs for {posts} sent: POSTs were retried"
            );
            ensure!(
                report.errors == 0 && report.status_count(503) >= 40,
                "30% of POSTs should come back as 503: {report:?}"
            );

            // A backend that always fails: retries stay within 20% of requests plus 1/s.
            let before = request_counts(broken, APP_PORT)?;
            let requests = 1000;
            let mut config = LoadConfig::get(&svc_url(BROKEN, "/"), requests, 8);
            config.rate = Some(100.0);
            let report = load(client, &config)?;
            ensure!(
                report.status_count(503) == requests && report.errors == 0,
                "every request to the broken backend should end in 503: {report:?}"
            );
            let attempts = request_counts(broken, APP_PORT)?.method("GET") - before.method("GET");
            let seconds = report.elapsed_ms / 1000.0;
            // The floor may also be banked for one 10 s window before the load starts.
            let bound = requests as f64 * 1.2 + 1.0 * (seconds + 10.0) + 10.0;
            ensure!(
            (attempts as f64) <= bound,
            "{attempts} attempts for {requests} requests over {seconds:.1} s exceed the budget \
             ({bound:.0})"
        );
            ensure!(
            attempts >= requests + 50,
            "{attempts} attempts for {requests} requests: the budget allowed (almost) no retries"
        );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Timeouts

#[test]
fn request_timeout_returns_504_in_time() {
    e2e_test(
        "http_timeout",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            const SLOW: u8 = 30;
            let shop = shop(cluster, &[http_backend("slow", 41)], |m| {
                http_service(m, "slow", SLOW, &[("app", "slow")])?;
                m.http_route(
                    NS,
                    "slow-timeout",
                    "slow",
                    &[],
                    &[RouteRule::to_backends(&[("slow", SVC_PORT, 1)]).request_timeout("200ms")],
                )
                .map(|_| ())
            })?;
            let client = shop.client.pod();
            wait_for_ok(client, &svc_url(SLOW, "/sleep/1"))?;
            let route = [("route", "slow-timeout"), ("dst_service", "slow.shop")];
            let timeouts_before = metric(&shop.client, TIMEOUTS_TOTAL, &route)?;
            for i in 0..5 {
                let mut conn = H1Connection::new(
                    client.connect(svc_addr(SLOW), Duration::from_secs(5))?,
                    Duration::from_secs(5),
                )?;
                let started = Instant::now();
                let response = conn.get("/sleep/2000", "slow.shop.svc.cluster.local")?;
                let elapsed = started.elapsed();
                ensure!(
                    response.status() == 504,
                    "request {i}: expected 504, got {response:?}"
                );
                ensure!(
                    elapsed < Duration::from_millis(400) && elapsed >= Duration::from_millis(150),
                    "request {i}: 504 after {elapsed:?} (timeout 200ms)"
                );
            }
            let fast = load(client, &LoadConfig::get(&svc_url(SLOW, "/sleep/20"), 10, 2))?;
            ensure!(
                fast.all_succeeded(),
                "requests within the timeout: {fast:?}"
            );
            wait_for(
                &format!("{TIMEOUTS_TOTAL}{route:?} to count 5 timeouts"),
                METRICS_TIMEOUT,
                || {
                    metric(&shop.client, TIMEOUTS_TOTAL, &route)
                        .is_ok_and(|v| v - timeouts_before >= 5.0)
                },
            )
            .with_context(|| shop.client.metrics_text().unwrap_or_default())?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 4. gRPC

#[test]
fn grpc_unary_and_bidi_streaming_keep_status_and_trailers() {
    e2e_test("http_grpc", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        const GRPC: u8 = 40;
        let backends = [Backend {
            app: App::Grpc,
            ..http_backend("grpc-1", 51)
        }];
        let shop = shop(cluster, &backends, |m| {
            m.service(
                NS,
                "grpc",
                cluster_ip(GRPC),
                &[("app", "grpc-1")],
                GRPC_SVC_PORT,
                GRPC_APP_PORT,
            )
            .map(|_| ())
        })?;
        let client = shop.client.pod();
        let addr = SocketAddr::from((cluster_ip(GRPC), GRPC_SVC_PORT));

        let mut calls = vec![("hello", 0), ("missing", 5)];
        calls.extend(std::iter::repeat_n(("again", 0), 18));
        let outcomes = client.in_netns(|| grpcapp::echo_blocking(addr, &calls))??;
        let hello = &outcomes[0];
        ensure!(
            hello.code == tonic::Code::Ok
                && hello.message == "hello"
                && hello.served_by == "grpc-1"
                && hello.metadata.get(SERVED_BY).map(String::as_str) == Some("grpc-1"),
            "unary OK through the mesh: {hello:?}"
        );
        let missing = &outcomes[1];
        ensure!(
            missing.code == tonic::Code::NotFound
                && missing.message == "requested failure"
                && missing.metadata.get(ECHO_TRAILER).map(String::as_str)
                    == Some(ECHO_TRAILER_VALUE),
            "unary NOT_FOUND with trailers through the mesh: {missing:?}"
        );
        ensure!(
            outcomes[2..]
                .iter()
                .all(|o| o.code == tonic::Code::Ok && o.message == "again"),
            "18 multiplexed calls: {outcomes:?}"
        );

        let texts = ["one", "two", "three", "four", "five"];
        let chat = client.in_netns(|| grpcapp::chat_blocking(addr, &texts, 0))??;
        let echoed: Vec<&str> = chat.replies.iter().map(|r| r.text.as_str()).collect();
        ensure!(
            chat.code == tonic::Code::Ok
                && echoed == texts
                && chat.trailers.get(CHAT_COUNT).map(String::as_str) == Some("5")
                && chat.trailers.get(SERVED_BY).map(String::as_str) == Some("grpc-1"),
            "bidi stream ending OK with trailers: {chat:?}"
        );
        let aborted = client.in_netns(|| grpcapp::chat_blocking(addr, &["a", "b", "c"], 10))??;
        ensure!(
            aborted.code == tonic::Code::Aborted
                && aborted.status_message == "chat ended"
                && aborted.replies.len() == 3
                && aborted.trailers.get(CHAT_COUNT).map(String::as_str) == Some("3"),
            "bidi stream ending ABORTED after its messages: {aborted:?}"
        );

        for (grpc_status, at_least) in [("0", 20.0), ("5", 1.0), ("10", 1.0)] {
            let labels = [
                ("direction", "outbound"),
                ("dst_service", "grpc.shop"),
                ("grpc_status", grpc_status),
            ];
            wait_for(
                &format!("{RESPONSES_TOTAL}{labels:?} >= {at_least}"),
                METRICS_TIMEOUT,
                || metric(&shop.client, RESPONSES_TOTAL, &labels).is_ok_and(|v| v >= at_least),
            )
            .with_context(|| shop.client.metrics_text().unwrap_or_default())?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 5. HTTP/1.1 features and memory

#[test]
fn http1_keep_alive_chunked_websocket_and_a_200_mib_upload_in_bounded_memory() {
    e2e_test("http_h1", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        const WEB: u8 = 10;
        const HOST: &str = "web.shop.svc.cluster.local";
        let mut shop = shop(cluster, &[http_backend("web", 21)], |m| {
            http_service(m, "web", WEB, &[("app", "web")]).map(|_| ())
        })?;
        let client = shop.client.pod().clone();
        wait_for_ok(&client, &svc_url(WEB, "/"))?;

        // Several requests on one connection.
        let mut conn = H1Connection::new(
            client.connect(svc_addr(WEB), Duration::from_secs(5))?,
            Duration::from_secs(10),
        )?;
        for i in 0..5 {
            let response = conn.get(&format!("/keepalive/{i}"), HOST)?;
            ensure!(
                response.status() == 200
                    && response.body_text() == "web"
                    && !response.head.closes(),
                "keep-alive request {i}: {response:?}"
            );
        }

        // Chunked request body, chunked response body.
        let pieces: [&[u8]; 3] = [b"first chunk, ", &[b'x'; 5000], b", last chunk"];
        let mut request =
            format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n")
                .into_bytes();
        request.extend_from_slice(&chunked(&pieces));
        conn.send_raw(&request)?;
        let response = conn.read_response()?;
        ensure!(
            response.status() == 200 && response.head.is_chunked(),
            "chunked echo: {:?}",
            response.head
        );
        ensure!(
            response.body == pieces.concat(),
            "chunked echo body differs ({} bytes)",
            response.body.len()
        );
        let response = conn.get("/after-chunked", HOST)?;
        ensure!(response.status() == 200, "after chunked: {response:?}");
        ensure!(
            !conn.is_closed(Duration::from_millis(100)),
            "the keep-alive connection was closed"
        );

        // WebSocket upgrade.
        let messages = vec![
            Message::text("hello through the mesh"),
            Message::binary(vec![0x5a; 100 * 1024]),
            Message::text("bye"),
        ];
        let echoes =
            client.in_netns(|| ws_echo_blocking(svc_addr(WEB), HOST, "/ws", &messages))??;
        ensure!(
            echoes == messages,
            "WebSocket echoes differ from what was sent"
        );
        // The same from an unmeshed client straight to the server's pod: plaintext HTTP/1
        // served by the server proxy's inbound side (keep-alive, then an upgrade).
        let legacy = cluster.add_plain_pod(NS, "legacy", 40)?;
        let web_addr = shop.backend("web")?.pod().addr(APP_PORT);
        let mut plain = H1Connection::new(
            legacy.connect(web_addr, Duration::from_secs(5))?,
            Duration::from_secs(10),
        )?;
        for i in 0..3 {
            let response = plain.get(&format!("/plain/{i}"), HOST)?;
            ensure!(
                response.status() == 200
                    && response.body_text() == "web"
                    && !response.head.closes(),
                "plaintext keep-alive request {i}: {response:?}"
            );
        }
        let echoes = legacy.in_netns(|| ws_echo_blocking(web_addr, HOST, "/ws", &messages))??;
        ensure!(
            echoes == messages,
            "plaintext WebSocket echoes (unmeshed client → server proxy) differ from what was sent"
        );

        // 200 MiB streamed through both proxies while their memory is watched.
        let pids = [
            ("client proxy", shop.client.proxy().pid()),
            ("server proxy", shop.backend_mut("web")?.proxy().pid()),
        ];
        let upload_len: u64 = 200 << 20;
        let mut conn = H1Connection::new(
            client.connect(svc_addr(WEB), Duration::from_secs(5))?,
            Duration::from_secs(60),
        )?;
        let mut writer = conn.writer_clone()?;
        let done = AtomicBool::new(false);
        let (sent_digest, received, received_digest, peaks) = std::thread::scope(
            |scope| -> anyhow::Result<_> {
                let sampler = scope.spawn(|| {
                    let mut peaks = [0u64; 2];
                    let mut samples = 0u32;
                    while !done.load(Ordering::SeqCst) {
                        for (peak, (_, pid)) in peaks.iter_mut().zip(pids) {
                            if let Ok(rss) = vm_rss_bytes(pid) {
                                *peak = (*peak).max(rss);
                            }
                        }
                        samples += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    (peaks, samples)
                });
                let sender = scope.spawn(move || -> std::io::Result<Vec<u8>> {
                    writer.write_all(
                        format!(
                            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {upload_len}\r\n\r\n"
                        )
                        .as_bytes(),
                    )?;
                    let mut pattern = Pattern::new(200, b"WEFT-UPLOAD");
                    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut left = upload_len;
                    while left > 0 {
                        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        pattern.fill(&mut buf[..n]);
                        digest.update(&buf[..n]);
                        writer.write_all(&buf[..n])?;
                        left -= n as u64;
                    }
                    Ok(digest.finish().as_ref().to_vec())
                });
                let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                let received = conn.read_head().and_then(|head| {
                    if head.status == 200 {
                        conn.read_body(&head, |chunk| digest.update(chunk))
                    } else {
                        Err(weft_e2e::HarnessError::invalid(
                            "upload response",
                            format!("{head:?}"),
                        ))
                    }
                });
                done.store(true, Ordering::SeqCst);
                let sent = match sender.join() {
                    Ok(sent) => sent,
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                let (peaks, samples) = match sampler.join() {
                    Ok(result) => result,
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                let received = received?;
                let sent = sent.context("sending the upload")?;
                ensure!(
                    samples >= 5,
                    "only {samples} memory samples during the upload"
                );
                Ok((sent, received, digest.finish().as_ref().to_vec(), peaks))
            },
        )?;
        ensure!(
            received == upload_len,
            "echoed {received} of {upload_len} bytes"
        );
        ensure!(
            sent_digest == received_digest,
            "the echoed 200 MiB differ from what was sent"
        );
        for ((what, _), peak) in pids.iter().zip(peaks) {
            ensure!(
                peak < 64 << 20,
                "the {what}'s RSS peaked at {:.1} MiB during the upload (limit 64 MiB)",
                peak as f64 / (1 << 20) as f64
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Server-speaks-first protocol on an opaque port

#[test]
fn server_first_protocol_on_an_opaque_port_gets_its_banner_at_once() {
    e2e_test("http_banner", MESH_TOOLS, |cluster| -> anyhow::Result<()> {
        const DB: u8 = 50;
        const BANNER: &str = "WEFT-BANNER-READY";
        let backends = [Backend {
            app: App::Banner(BANNER),
            ..http_backend("db", 61)
        }];
        let shop = shop(cluster, &backends, |m| {
            m.service(
                NS,
                "db",
                cluster_ip(DB),
                &[("app", "db")],
                BANNER_PORT,
                BANNER_PORT,
            )
            .map(|_| ())
        })?;
        let client = shop.client.pod();
        let target = SocketAddr::from((cluster_ip(DB), BANNER_PORT));
        let expected = format!("{BANNER}\n");
        // The first connection also makes the destination known to the client proxy.
        for i in 0..4 {
            let started = Instant::now();
            let mut stream = client.connect(target, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut banner = vec![0u8; expected.len()];
            stream
                .read_exact(&mut banner)
                .with_context(|| format!("connection {i}: reading the banner"))?;
            let elapsed = started.elapsed();
            ensure!(
                banner == expected.as_bytes(),
                "connection {i}: banner {:?}",
                String::from_utf8_lossy(&banner)
            );
            let limit = if i == 0 {
                Duration::from_secs(2)
            } else {
                Duration::from_millis(500)
            };
            ensure!(
                elapsed < limit,
                "connection {i}: the banner took {elapsed:?} (limit {limit:?}): the proxy waited \
                 for the client to speak"
            );
            stream.write_all(b"ping\n")?;
            let mut echo = [0u8; 5];
            stream.read_exact(&mut echo)?;
            ensure!(&echo == b"ping\n", "connection {i}: echo {echo:?}");
        }
        let db = shop.backend("db")?;
        let labels = [
            ("direction", "outbound"),
            ("peer_identity", db.identity()),
            ("tls", "true"),
        ];
        wait_for(
            "the banner connections as outbound mTLS on the client proxy",
            METRICS_TIMEOUT,
            || metric(&shop.client, TCP_OPENED, &labels).is_ok_and(|v| v >= 4.0),
        )
        .with_context(|| shop.client.metrics_text().unwrap_or_default())?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 7. Metrics

#[test]
fn request_metrics_count_exactly_per_route() {
    e2e_test(
        "http_metrics",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            const WEB: u8 = 10;
            const API: u8 = 11;
            const PLAIN: u8 = 12;
            let shop = shop(
                cluster,
                &[http_backend("web", 21), http_backend("api", 22)],
                |m| {
                    http_service(m, "web", WEB, &[("app", "web")])?;
                    http_service(m, "api", API, &[("app", "api")])?;
                    // No route: requests to it are labelled route="default".
                    http_service(m, "plain", PLAIN, &[("app", "api")])?;
                    m.http_route(
                        NS,
                        "web-route",
                        "web",
                        &[],
                        &[RouteRule::to_backends(&[("web", SVC_PORT, 1)])],
                    )?;
                    m.http_route(
                        NS,
                        "api-route",
                        "api",
                        &[],
                        &[RouteRule::to_backends(&[("api", SVC_PORT, 1)])],
                    )?;
                    Ok(())
                },
            )?;
            let client = shop.client.pod();
            let web = shop.backend("web")?;
            let api = shop.backend("api")?;
            let cases = [
                (WEB, "/items", "web-route", "web.shop", "web.shop", 37u64),
                (API, "/v1/things", "api-route", "api.shop", "api.shop", 23),
                (PLAIN, "/", "default", "plain.shop", "plain.shop", 11),
            ];
            for (last, path, ..) in cases {
                wait_for_ok(client, &svc_url(last, path))?;
            }
            // Counters are compared with a snapshot taken once the warm-up requests are
            // all recorded.
            let mut client_series = Vec::new();
            let mut client_expected = Vec::new();
            for (_, _, route, service, backend, n) in cases {
                let labels = vec![
                    ("direction", "outbound"),
                    ("route", route),
                    ("dst_service", service),
                    ("dst_backend", backend),
                ];
                let mut with_tls = labels.clone();
                with_tls.push(("tls", "true"));
                client_series.push((REQUESTS_TOTAL, with_tls));
                client_series.push((LATENCY_COUNT, labels));
                client_expected.extend([n as f64, n as f64]);
            }
            let client_baseline = settled(&shop.client, &client_series, 1.0)?;
            // Inbound series carry the calling workload's identity (the source).
            let inbound = vec![
                ("direction", "inbound"),
                ("client_id", shop.client.identity()),
            ];
            let server_series = vec![(REQUESTS_TOTAL, inbound.clone()), (LATENCY_COUNT, inbound)];
            // api also serves the route-less Service, so it saw two warm-ups.
            let server_cases = [(web, 1.0, 37.0), (api, 2.0, 23.0 + 11.0)];
            let mut server_baselines = Vec::new();
            for (pod, warm_ups, _) in server_cases {
                server_baselines.push(settled(pod, &server_series, warm_ups)?);
            }

            for (last, path, _, _, _, n) in cases {
                let report = load(client, &LoadConfig::get(&svc_url(last, path), n, 3))?;
                ensure!(report.all_succeeded(), "{path}: {report:?}");
            }

            for (((name, labels), baseline), n) in client_series
                .iter()
                .zip(&client_baseline)
                .zip(&client_expected)
            {
                expect_metric(&shop.client, name, labels, *baseline, *n)?;
            }
            for ((pod, _, n), baselines) in server_cases.iter().zip(&server_baselines) {
                for ((name, labels), baseline) in server_series.iter().zip(baselines) {
                    expect_metric(pod, name, labels, *baseline, *n)?;
                }
            }
            let ok = [
                ("direction", "outbound"),
                ("route", "web-route"),
                ("dst_service", "web.shop"),
                ("status_code", "200"),
            ];
            ensure!(
                metric(&shop.client, RESPONSES_TOTAL, &ok)? >= 37.0,
                "{RESPONSES_TOTAL}{ok:?} is missing\n{}",
                shop.client.metrics_text()?
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Load balancing

#[test]
fn load_balancer_avoids_the_slow_endpoint() {
    e2e_test(
        "http_balance",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            const LB: u8 = 60;
            const TIER: &[(&str, &str)] = &[("tier", "lb")];
            let backends = [
                Backend {
                    labels: TIER,
                    app: App::Http(&["--delay-ms", "5"]),
                    ..http_backend("lb-1", 21)
                },
                Backend {
                    labels: TIER,
                    app: App::Http(&["--delay-ms", "5"]),
                    ..http_backend("lb-2", 22)
                },
                Backend {
                    labels: TIER,
                    app: App::Http(&["--delay-ms", "50"]),
                    ..http_backend("lb-slow", 23)
                },
            ];
            let shop = shop(cluster, &backends, |m| {
                http_service(m, "lb", LB, TIER).map(|_| ())
            })?;
            let client = shop.client.pod();
            let url = svc_url(LB, "/");
            wait_for_ok(client, &url)?;
            // All three endpoints known to the client proxy (each pod's labels arrive on their own).
            let deadline = Instant::now() + CONFIG_TIMEOUT;
            loop {
                let report = load(client, &LoadConfig::get(&url, 30, 3))?;
                if report.by_served_by.len() == 3 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "not all three endpoints answer: {report:?}"
                );
            }
            // Over 4 keep-alive connections, then over a fresh connection per request: a
            // balancer that picks per connection rather than per request cannot pass both.
            for keep_alive in [true, false] {
                let mut config = LoadConfig::get(&url, 600, 4);
                config.keep_alive = keep_alive;
                let report = load(client, &config)?;
                ensure!(
                    report.all_succeeded(),
                    "keep-alive {keep_alive}: {report:?}"
                );
                let slow = report.served_by_fraction("lb-slow");
                ensure!(
                    slow < 0.15,
                    "keep-alive {keep_alive}: the 10x slower endpoint got {:.1}% of requests: \
                 {report:?}",
                    slow * 100.0
                );
                ensure!(
                    report.served_by_count("lb-1") > 150 && report.served_by_count("lb-2") > 150,
                    "keep-alive {keep_alive}: the fast endpoints should share the load: {report:?}"
                );
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Malformed HTTP

#[test]
fn malformed_requests_get_400_or_431_and_do_not_disturb_other_connections() {
    e2e_test(
        "http_malformed",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            const WEB: u8 = 10;
            const HOST: &str = "web.shop.svc.cluster.local";
            let shop = shop(cluster, &[http_backend("web", 21)], |m| {
                http_service(m, "web", WEB, &[("app", "web")]).map(|_| ())
            })?;
            let client = shop.client.pod().clone();
            wait_for_ok(&client, &svc_url(WEB, "/"))?;

            let mut healthy = H1Connection::new(
                client.connect(svc_addr(WEB), Duration::from_secs(5))?,
                Duration::from_secs(10),
            )?;
            let first = healthy.get("/", HOST)?;
            ensure!(first.status() == 200, "healthy connection: {first:?}");

            let mut big_headers = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n");
            for i in 0..5 {
                big_headers.push_str(&format!("X-Big-{i}: {}\r\n", "a".repeat(16 * 1024)));
            }
            big_headers.push_str("\r\n");
            let malformed: [(&str, Vec<u8>, &[u16]); 3] = [
            (
                "a control character in the request line",
                format!("GET /a\x01b HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes(),
                &[400],
            ),
            ("80 KiB of headers", big_headers.into_bytes(), &[431]),
            (
                "an invalid chunk size",
                format!(
                    "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                )
                .into_bytes(),
                &[400],
            ),
        ];

            let stop = AtomicBool::new(false);
            std::thread::scope(|scope| -> anyhow::Result<()> {
                // The healthy keep-alive connection keeps working throughout.
                let background = scope.spawn(|| -> anyhow::Result<u32> {
                    let mut served = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let response = healthy.get(&format!("/healthy/{served}"), HOST)?;
                        ensure!(
                            response.status() == 200 && response.body_text() == "web",
                            "healthy request {served} during the malformed ones: {response:?}"
                        );
                        served += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(served)
                });
                let result = (|| -> anyhow::Result<()> {
                    for (what, bytes, statuses) in &malformed {
                        let mut conn = H1Connection::new(
                            client.connect(svc_addr(WEB), Duration::from_secs(5))?,
                            Duration::from_secs(10),
                        )?;
                        // The proxy may answer and close before reading everything: a failed
                        // write is fine as long as the response arrives.
                        let _ = conn.send_raw(bytes);
                        let response = conn
                            .read_response()
                            .with_context(|| format!("{what}: no response"))?;
                        ensure!(
                            statuses.contains(&response.status()),
                            "{what}: expected {statuses:?}, got {response:?}"
                        );
                        ensure!(
                            conn.is_closed(Duration::from_secs(2)),
                            "{what}: the connection stayed open after {}",
                            response.status()
                        );
                    }
                    Ok(())
                })();
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::SeqCst);
                let served = match background.join() {
                    Ok(served) => served,
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                result?;
                let served = served?;
                ensure!(served >= 5, "only {served} healthy requests ran alongside");
                Ok(())
            })?;
            let last = healthy.get("/", HOST)?;
            ensure!(
                last.status() == 200,
                "healthy connection afterwards: {last:?}"
            );
            Ok(())
        },
    );
}

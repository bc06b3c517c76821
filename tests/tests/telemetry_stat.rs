//! `weft stat` against ground truth, and metric cardinality under hostile request variety,
//! with real proxies in network-namespace pods and a real Prometheus (the Debian package).
//!
//! 1. A known mix on route `checkout` (600 requests, exactly 60 of them 503): the built
//!    `weft stat` binary, reading Prometheus (`--prometheus`) and reading the proxies
//!    directly (`--from-proxies`, windowed and as totals), reports 600 requests, a 90% success
//!    rate and a p99 inside the histogram bucket that holds the client's own p99, in its
//!    table and in its JSON.
//! 2. Cardinality: 10,000 requests with distinct paths, random query strings, random header
//!    values and all the usual methods leave exactly as many series in the proxies'
//!    `/metrics` (and in Prometheus) as the first 100 requests did.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use weft_e2e::httpapp::{current_thread_runtime, start_http_server};
use weft_e2e::load::{run_load_blocking, LoadConfig, LoadReport};
use weft_e2e::manifests::RouteRule;
use weft_e2e::mesh::ADMIN_PORT;
use weft_e2e::prometheus::{
    bucket_of, Prometheus, ScrapeTarget, PROMETHEUS_TOOLS, SCRAPE_INTERVAL,
};
use weft_e2e::{bins::bin, e2e_test, wait_for, Cluster, Cmd, MeshPod, MeshPodSpec, Pod};

const NS: &str = "shop";
const APP_PORT: u16 = 8080;
const SVC_PORT: u16 = 80;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(20);
const STAT_TIMEOUT: Duration = Duration::from_secs(60);

const GROUND_TRUTH_REQUESTS: u64 = 600;
/// Each response waits 140 ms: just inside the proxy's (128, 256] ms bucket, whose upper edge
/// leaves ~115 ms for scheduling jitter on a busy machine before client and proxy could see
/// the tail in different buckets (no latency can fall below the delay).
const DELAY_MS: &str = "140";
/// Client connections for the ground truth: 600 × 140 ms / 10 ≈ 8.4 s of load.
const GROUND_TRUTH_CONNECTIONS: usize = 10;
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
/// `--from-proxies` window for the ground truth: long enough for the 600 requests (~9 s at
/// [`GROUND_TRUTH_CONNECTIONS`]) plus slack.
const STAT_WINDOW_SECS: u64 = 25;

fn svc_url(path: &str) -> String {
    format!("http://{SERVICE_IP}:{SVC_PORT}{path}")
}

fn load(pod: &Pod, config: &LoadConfig) -> anyhow::Result<LoadReport> {
    Ok(pod.in_netns(|| run_load_blocking(config))??)
}

/// Single GETs until one is answered with `status` (the client proxy has the route).
fn wait_for_status(pod: &Pod, url: &str, status: u16) -> anyhow::Result<()> {
    let mut config = LoadConfig::get(url, 1, 1);
    config.timeout = Duration::from_secs(5);
    let deadline = Instant::now() + CONFIG_TIMEOUT;
    loop {
        let report = load(pod, &config)?;
        if report.status_count(status) == 1 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "GET {url} never got {status}; last: {report:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A meshed pod per `(name, last octet, http-server args)`; `None`: no app.
fn start_pods(
    cluster: &Cluster,
    plan: &[(&str, u8, Option<&[&str]>)],
) -> anyhow::Result<(Vec<MeshPod>, Vec<weft_e2e::Proc>)> {
    let mut pods = Vec::new();
    let mut apps = Vec::new();
    for (name, last, app) in plan {
        let pod = cluster.add_mesh_pod(MeshPodSpec::new(name, *last, NS, name))?;
        if let Some(args) = app {
            apps.push(start_http_server(&pod, name, APP_PORT, args)?);
        }
        pods.push(pod);
    }
    for pod in &mut pods {
        pod.wait_ready(READY_TIMEOUT)?;
    }
    Ok((pods, apps))
}

fn start_prometheus(cluster: &Cluster, pods: &[MeshPod]) -> anyhow::Result<Prometheus> {
    let targets: Vec<ScrapeTarget> = pods
        .iter()
        .map(|pod| ScrapeTarget::proxy(pod.addr(ADMIN_PORT), NS, pod.name(), pod.name()))
        .collect();
    let prometheus = Prometheus::start(cluster, &targets)?;
    let mut last = Vec::new();
    let all_up = wait_for("Prometheus to scrape every proxy", SCRAPE_TIMEOUT, || {
        last = prometheus.targets().unwrap_or_default();
        last.len() == targets.len() && last.iter().all(|(_, health, _)| health == "up")
    });
    if all_up.is_err() {
        bail!(
            "scrape targets not all up: {last:?}\n{}",
            prometheus.proc().logs()
        );
    }
    Ok(prometheus)
}

/// `weft stat` run to completion in the node namespace; its stdout.
fn weft_stat(cluster: &Cluster, args: &[String]) -> anyhow::Result<String> {
    let proc = cluster
        .node()
        .spawn(Cmd::new(bin("weft")?).arg("stat").args(args))?;
    finish(proc)
}

fn finish(proc: weft_e2e::Proc) -> anyhow::Result<String> {
    let label = proc.label().to_string();
    let output = proc.output(STAT_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "{label} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// What one `weft stat` row said about the route.
#[derive(Debug)]
struct Reported {
    requests: f64,
    success_rate: f64,
    p99_seconds: f64,
}

/// The one JSON row of route `checkout`.
fn from_json(stdout: &str) -> anyhow::Result<Reported> {
    let doc: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("weft stat -o json printed {stdout:?}"))?;
    let rows = doc["rows"].as_array().context("no rows")?;
    let checkout: Vec<&Value> = rows.iter().filter(|r| r["route"] == "checkout").collect();
    let [row] = checkout.as_slice() else {
        bail!("expected one checkout row: {doc}");
    };
    ensure!(
        row["direction"] == "outbound"
            && row["workload"] == "client"
            && row["namespace"] == NS
            && row["dst_service"] == "payments.shop",
        "unexpected row keys: {row}"
    );
    let number = |field: &str| {
        row[field]
            .as_f64()
            .with_context(|| format!("{field} is not a number in {row}"))
    };
    Ok(Reported {
        requests: number("requests")?,
        success_rate: number("success_rate")?,
        p99_seconds: number("latency_p99_seconds")?,
    })
}

/// The table row of route `checkout`, read by its header.
fn from_table(stdout: &str) -> anyhow::Result<Reported> {
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .context("empty table")?
        .split_whitespace()
        .collect();
    let rows: Vec<BTreeMap<&str, &str>> = lines
        .map(|l| header.iter().copied().zip(l.split_whitespace()).collect())
        .filter(|r: &BTreeMap<&str, &str>| r.get("ROUTE") == Some(&"checkout"))
        .collect();
    let [row] = rows.as_slice() else {
        bail!("expected one checkout row in\n{stdout}");
    };
    let cell = |name: &str| {
        row.get(name)
            .copied()
            .with_context(|| format!("no {name} column in\n{stdout}"))
    };
    let requests: f64 = cell("REQUESTS")?.parse()?;
    let success: f64 = cell("SUCCESS")?
        .strip_suffix('%')
        .context("SUCCESS without %")?
        .parse()?;
    let p99_ms: f64 = cell("P99")?
        .strip_suffix("ms")
        .context("P99 without ms")?
        .parse()?;
    Ok(Reported {
        requests,
        success_rate: success / 100.0,
        p99_seconds: p99_ms / 1000.0,
    })
}

/// Checks one report against the truth. The table rounds latency to 0.1 ms, so its p99 may
/// sit that much past a bucket edge.
fn check(what: &str, got: &Reported, bucket: (f64, f64), rounding: f64) -> anyhow::Result<()> {
    ensure!(
        got.requests == GROUND_TRUTH_REQUESTS as f64,
        "{what}: {} requests, the client sent {GROUND_TRUTH_REQUESTS}",
        got.requests
    );
    ensure!(
        (got.success_rate - 0.9).abs() <= 0.01,
        "{what}: success rate {}, expected 0.90 ± 0.01",
        got.success_rate
    );
    ensure!(
        bucket.0 - rounding < got.p99_seconds && got.p99_seconds <= bucket.1 + rounding,
        "{what}: p99 {} s outside the bucket ({}, {}] holding the client's p99",
        got.p99_seconds,
        bucket.0,
        bucket.1
    );
    eprintln!("telemetry_stat: {what}: {got:?}");
    Ok(())
}

#[test]
fn weft_stat_matches_ground_truth_from_prometheus_and_from_proxies() {
    e2e_test(
        "telemetry_stat",
        PROMETHEUS_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let m = cluster.manifests();
            m.namespace(NS, false)?;
            m.service(
                NS,
                "payments",
                SERVICE_IP,
                &[("app", "payments")],
                SVC_PORT,
                APP_PORT,
            )?;
            // `warmup` makes the routes known to the client proxy without touching `checkout`,
            // so checkout's counters hold the ground truth and nothing else.
            m.http_route(
                NS,
                "checkout",
                "payments",
                &[],
                &[RouteRule::path_prefix("/checkout", "payments", SVC_PORT)],
            )?;
            m.http_route(
                NS,
                "warmup",
                "payments",
                &[],
                &[RouteRule::path_prefix("/warmup", "payments", SVC_PORT)],
            )?;
            let _control_plane = cluster.start_control_plane(&[])?;
            let app_args: &[&str] = &["--fail-percent", "10", "--delay-ms", DELAY_MS];
            let (pods, _apps) = start_pods(
                cluster,
                &[("payments", 31, Some(app_args)), ("client", 10, None)],
            )?;
            let client_pod = pods
                .iter()
                .find(|p| p.name() == "client")
                .context("no client")?;
            let client = client_pod.pod();
            let prometheus = start_prometheus(cluster, &pods)?;
            wait_for_status(client, &svc_url("/warmup"), 200)?;

            let client_admin = client_pod.addr(ADMIN_PORT);
            let target = format!("{NS}/client/client={client_admin}");
            let common = |source: &[&str], window: &str, output: &str| -> Vec<String> {
                let mut args: Vec<String> = [
                    "route",
                    "--route",
                    "checkout",
                    "--direction",
                    "outbound",
                    "-n",
                    NS,
                    "--window",
                    window,
                    "-o",
                    output,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(source.iter().map(|s| s.to_string()));
                args
            };
            let proxies = ["--from-proxies", target.as_str()];
            let window = format!("{STAT_WINDOW_SECS}s");

            // Windowed --from-proxies: both runs take their first scrape before the load.
            let mut windowed = Vec::new();
            for output in ["json", "table"] {
                let mut proc = cluster.node().spawn(
                    Cmd::new(bin("weft")?)
                        .arg("stat")
                        .args(common(&proxies, &window, output)),
                )?;
                proc.wait_for_output("first scrape", Duration::from_secs(15))?;
                windowed.push(proc);
            }
            let started = Instant::now();
            let mut config = LoadConfig::get(
                &svc_url("/checkout"),
                GROUND_TRUTH_REQUESTS,
                GROUND_TRUTH_CONNECTIONS,
            );
            config.keep_records = true;
            let report = load(client, &config)?;
            let expected_failures = GROUND_TRUTH_REQUESTS / 10;
            ensure!(
                report.errors == 0
                    && report.status_count(503) == expected_failures
                    && report.status_count(200) == GROUND_TRUTH_REQUESTS - expected_failures,
                "the backend did not fail exactly 10%: {report:?}"
            );
            ensure!(
                started.elapsed() < Duration::from_secs(STAT_WINDOW_SECS - 5),
                "the load took {:?}, too close to the {window} window",
                started.elapsed()
            );
            // The proxy counts a response when its body ends: give it a moment.
            std::thread::sleep(Duration::from_millis(500));

            let bounds = latency_bounds(client_pod)?;
            let client_p99 = report
                .p99_seconds_nearest_rank()
                .with_context(|| format!("no latency records: {report:?}"))?;
            let bucket = bucket_of(&bounds, client_p99)
                .with_context(|| format!("no bucket holds {client_p99} in {bounds:?}"))?;
            eprintln!("telemetry_stat: client p99 {client_p99} s, bucket {bucket:?}");

            let mut windowed = windowed.into_iter();
            let json_proc = windowed.next().context("json run")?;
            let table_proc = windowed.next().context("table run")?;
            check(
                "--from-proxies --window 25s -o json",
                &from_json(&finish(json_proc)?)?,
                bucket,
                0.0,
            )?;
            check(
                "--from-proxies --window 25s (table)",
                &from_table(&finish(table_proc)?)?,
                bucket,
                0.00005,
            )?;

            // Totals since the proxy started: checkout saw exactly the ground truth.
            let proxy_totals = from_json(&weft_stat(cluster, &common(&proxies, "0", "json"))?)?;
            check(
                "--from-proxies --window 0 -o json",
                &proxy_totals,
                bucket,
                0.0,
            )?;
            check(
                "--from-proxies --window 0 (table)",
                &from_table(&weft_stat(cluster, &common(&proxies, "0", "table"))?)?,
                bucket,
                0.00005,
            )?;

            // Prometheus, once it has scraped the last response.
            let done = format!(
                r#"sum(weft_http_responses_total{{namespace="{NS}",route="checkout",direction="outbound"}})"#
            );
            wait_for(
                "Prometheus to see every checkout response",
                SCRAPE_TIMEOUT,
                || {
                    prometheus
                        .query(&done)
                        .is_ok_and(|s| s.len() == 1 && s[0].value == GROUND_TRUTH_REQUESTS as f64)
                },
            )?;
            let url = prometheus.base_url().to_string();
            let prom = ["--prometheus", url.as_str()];
            for window in ["0", "5m"] {
                let reported = from_json(&weft_stat(cluster, &common(&prom, window, "json"))?)?;
                check(
                    &format!("--prometheus --window {window} -o json"),
                    &reported,
                    bucket,
                    0.0,
                )?;
                // Same counts, same buckets: both sources compute the same p99.
                ensure!(
                    (reported.p99_seconds - proxy_totals.p99_seconds).abs() < 1e-9
                        && reported.success_rate == proxy_totals.success_rate,
                    "Prometheus (window {window}) says {reported:?}, the proxy's totals {proxy_totals:?}"
                );
                check(
                    &format!("--prometheus --window {window} (table)"),
                    &from_table(&weft_stat(cluster, &common(&prom, window, "table"))?)?,
                    bucket,
                    0.00005,
                )?;
            }
            Ok(())
        },
    );
}

/// The latency histogram's upper bounds as the proxy exports them, sorted.
fn latency_bounds(pod: &MeshPod) -> anyhow::Result<Vec<f64>> {
    let metrics = pod.metrics()?;
    let mut bounds: Vec<f64> = metrics
        .matching("weft_http_response_latency_seconds_bucket", &[])
        .filter_map(|s| s.labels.get("le"))
        .filter_map(|le| match le.as_str() {
            "+Inf" => Some(f64::INFINITY),
            finite => finite.parse().ok(),
        })
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    ensure!(bounds.len() > 2, "no latency buckets on {}", pod.name());
    Ok(bounds)
}

// --- Cardinality -------------------------------------------------------------------------

const CARDINALITY_REQUESTS: usize = 10_000;
const FIRST_BATCH: usize = 100;
const CONNECTIONS: usize = 8;
const WEB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const METHODS: [Method; 7] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
    Method::PATCH,
];

/// Request `i`: a path no other request uses (half under `/items`, which has a route, half
/// elsewhere, which has none and gets the proxy's 404), a random query string, random header
/// values, a method from the usual set.
fn hostile_request(i: usize) -> anyhow::Result<http::Request<Empty<Bytes>>> {
    let r = rand::random::<u64>;
    let prefix = if i.is_multiple_of(2) {
        "items"
    } else {
        "other"
    };
    let path = format!(
        "/{prefix}/{i}/{:x}?q={:x}&page={}&{:x}={:x}",
        r(),
        r(),
        r() % 1000,
        r(),
        r()
    );
    let method = METHODS[(r() % METHODS.len() as u64) as usize].clone();
    Ok(http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("web.{NS}"))
        .header(http::header::USER_AGENT, format!("agent/{:x}", r()))
        .header("x-request-tag", format!("{:x}", r()))
        .header(http::header::ACCEPT_LANGUAGE, format!("x-{:x}", r() % 97))
        .body(Empty::new())?)
}

/// Sends requests `range` over `CONNECTIONS` keep-alive connections; returns the status
/// counts.
async fn send_batch(range: std::ops::Range<usize>) -> anyhow::Result<BTreeMap<u16, u64>> {
    let addr = SocketAddr::from((WEB_IP, SVC_PORT));
    let next = std::rc::Rc::new(std::cell::Cell::new(range.start));
    let end = range.end;
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let next = next.clone();
        workers.push(async move {
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
            loop {
                let i = next.get();
                if i >= end {
                    return Ok::<_, anyhow::Error>(statuses);
                }
                next.set(i + 1);
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    let stream = tokio::net::TcpStream::connect(addr).await?;
                    let (s, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    tokio::task::spawn_local(async move {
                        let _ = conn.await;
                    });
                    sender = Some(s);
                }
                let s = sender.as_mut().context("no connection")?;
                s.ready().await?;
                let response = tokio::time::timeout(
                    Duration::from_secs(10),
                    s.send_request(hostile_request(i)?),
                )
                .await
                .context("request timed out")??;
                let status = response.status().as_u16();
                response.into_body().collect().await?;
                *statuses.entry(status).or_default() += 1;
            }
        });
    }
    let mut total: BTreeMap<u16, u64> = BTreeMap::new();
    for result in futures_util::future::join_all(workers).await {
        for (status, n) in result? {
            *total.entry(status).or_default() += n;
        }
    }
    Ok(total)
}

fn send(client: &Pod, range: std::ops::Range<usize>) -> anyhow::Result<BTreeMap<u16, u64>> {
    client.in_netns(move || -> anyhow::Result<BTreeMap<u16, u64>> {
        let runtime = current_thread_runtime()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, send_batch(range))
    })?
}

/// Sample lines (series) in every proxy's `/metrics`, per proxy.
fn series_counts(pods: &[MeshPod]) -> anyhow::Result<Vec<(String, usize)>> {
    pods.iter()
        .map(|p| Ok((p.name().to_string(), p.metrics()?.samples.len())))
        .collect()
}

/// `count({__name__=~"weft_.*"})` once two answers a few scrapes apart agree.
fn prometheus_series(prometheus: &Prometheus) -> anyhow::Result<f64> {
    let expr = format!(r#"count({{__name__=~"weft_.*",namespace="{NS}"}})"#);
    let mut previous = f64::NAN;
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    loop {
        std::thread::sleep(SCRAPE_INTERVAL * 3);
        let now = prometheus.scalar_at(&expr, None)?;
        if now == previous {
            return Ok(now);
        }
        ensure!(Instant::now() < deadline, "{expr} never settled: {now}");
        previous = now;
    }
}

#[test]
fn distinct_paths_queries_headers_and_methods_add_no_metric_series() {
    e2e_test(
        "telemetry_stat_cardinality",
        PROMETHEUS_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let m = cluster.manifests();
            m.namespace(NS, false)?;
            m.service(NS, "web", WEB_IP, &[("app", "web")], SVC_PORT, APP_PORT)?;
            m.http_route(
                NS,
                "items",
                "web",
                &[],
                &[RouteRule::path_prefix("/items", "web", SVC_PORT)],
            )?;
            let _control_plane = cluster.start_control_plane(&[])?;
            let (pods, _apps) =
                start_pods(cluster, &[("web", 32, Some(&[])), ("client", 10, None)])?;
            let client = pods
                .iter()
                .find(|p| p.name() == "client")
                .context("no client")?;
            let prometheus = start_prometheus(cluster, &pods)?;
            wait_for_status(
                client.pod(),
                &format!("http://{WEB_IP}:{SVC_PORT}/items/ready"),
                200,
            )?;
            let requests_before = client
                .metrics()?
                .value("weft_http_requests_total", &[("direction", "outbound")])
                .unwrap_or(0.0);

            let started = Instant::now();
            let first = send(client.pod(), 0..FIRST_BATCH)?;
            ensure!(
                first.get(&200).is_some_and(|n| *n > 0) && first.get(&404).is_some_and(|n| *n > 0),
                "the first batch should see routed (200) and unrouted (404) requests: {first:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
            let after_first = series_counts(&pods)?;
            let prometheus_first = prometheus_series(&prometheus)?;

            let rest = send(client.pod(), FIRST_BATCH..CARDINALITY_REQUESTS)?;
            let elapsed = started.elapsed();
            std::thread::sleep(Duration::from_millis(300));
            let after_all = series_counts(&pods)?;
            let prometheus_all = prometheus_series(&prometheus)?;

            let sent: u64 = first.values().chain(rest.values()).sum();
            ensure!(
                sent == CARDINALITY_REQUESTS as u64 && rest.keys().all(|s| *s == 200 || *s == 404),
                "unexpected answers: first {first:?}, rest {rest:?}"
            );
            // Every request is counted, the proxy's own 404s for unrouted paths included
            // (under route "default", with no backend).
            let requests_after = client
                .metrics()?
                .value("weft_http_requests_total", &[("direction", "outbound")])
                .unwrap_or(0.0);
            ensure!(
                requests_after - requests_before == sent as f64,
                "the client proxy counted {} requests, {sent} were sent",
                requests_after - requests_before
            );
            eprintln!(
                "telemetry_stat: {CARDINALITY_REQUESTS} requests in {elapsed:?} ({rest:?} after the first {FIRST_BATCH}); \
                 series per proxy after {FIRST_BATCH}: {after_first:?}, after all: {after_all:?}; \
                 Prometheus: {prometheus_first} → {prometheus_all}"
            );
            ensure!(
                after_first == after_all,
                "series grew with request variety: after {FIRST_BATCH} {after_first:?}, after {CARDINALITY_REQUESTS} {after_all:?}"
            );
            ensure!(
                prometheus_first == prometheus_all,
                "Prometheus series grew: {prometheus_first} → {prometheus_all}"
            );
            Ok(())
        },
    );
}

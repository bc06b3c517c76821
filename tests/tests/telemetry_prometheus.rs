//! Telemetry acceptance with a real Prometheus (the Debian package) scraping five proxies in
//! the node namespace, with the target labels Kubernetes discovery would add (`namespace`,
//! `pod`, `workload`): every PromQL query in the chart's Grafana dashboards returns data
//! under a traffic mix that exercises each signal (routes, retries, timeouts, denials, audit
//! denials, opaque TCP), and a route's golden signals match what the client measured: the request count
//! exactly, the success rate of a backend failing exactly 10%, and p99 within the histogram
//! bucket holding the client's p99.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use weft_e2e::httpapp::{start_banner_server, start_http_server};
use weft_e2e::load::{run_load_blocking, LoadConfig, LoadReport};
use weft_e2e::manifests::{
    AuthorizationPolicySpec, PolicyRule, PolicySource, PolicyTarget, RouteRule,
};
use weft_e2e::mesh::ADMIN_PORT;
use weft_e2e::prometheus::{
    bucket_of, dashboard_queries, dashboards_dir, label_values_query, load_dashboards,
    substitute_variables, Prometheus, ScrapeTarget, PROMETHEUS_TOOLS, SCRAPE_INTERVAL,
};
use weft_e2e::{e2e_test, wait_for, Cluster, Manifests, MeshPod, MeshPodSpec, Pod};

const NS: &str = "shop";
const APP_PORT: u16 = 8080;
const SVC_PORT: u16 = 80;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Prometheus may take to show what the proxies count (a few scrapes).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(20);

/// The ground-truth mix: a backend that fails exactly this share of consecutive requests
/// (`httpapp::fails`), sent exactly this many requests.
const FAIL_PERCENT: &str = "10";
const GROUND_TRUTH_REQUESTS: u64 = 600;
/// Every payments response waits this long, so latencies start well inside the 64..128 ms
/// bucket and leave ~45 ms for scheduling jitter before the next boundary, where client and
/// proxy measurements could land on different sides.
const PAYMENTS_DELAY_MS: &str = "80";

const PAYMENTS_IP: u8 = 20;
const WEB_IP: u8 = 21;
const SLOW_IP: u8 = 22;
const DB_IP: u8 = 23;
/// MySQL's port: opaque by default, the server speaks first (TCP-only signals).
const DB_PORT: u16 = 3306;
const DB_BANNER: &str = "WEFT-DB-READY";

/// What runs next to a pod's proxy.
#[derive(Clone, Copy)]
enum App {
    /// `http-server` on [`APP_PORT`] with these arguments.
    Http(&'static [&'static str]),
    /// `banner-server` on [`DB_PORT`].
    Banner,
    None,
}

/// A meshed pod in the shop: name (also its service account, `app` label, Service and
/// workload), last octet of its IP, and its app.
struct PodPlan {
    name: &'static str,
    ip_last_octet: u8,
    app: App,
}

const PODS: &[PodPlan] = &[
    PodPlan {
        name: "payments",
        ip_last_octet: 31,
        app: App::Http(&[
            "--fail-percent",
            FAIL_PERCENT,
            "--delay-ms",
            PAYMENTS_DELAY_MS,
        ]),
    },
    PodPlan {
        name: "web",
        ip_last_octet: 32,
        app: App::Http(&[]),
    },
    PodPlan {
        name: "slow",
        ip_last_octet: 33,
        app: App::Http(&["--delay-ms", "300"]),
    },
    PodPlan {
        name: "db",
        ip_last_octet: 34,
        app: App::Banner,
    },
    PodPlan {
        name: "client",
        ip_last_octet: 10,
        app: App::None,
    },
];

fn svc_url(last: u8, path: &str) -> String {
    format!("http://198.19.0.{last}:{SVC_PORT}{path}")
}

/// Services, routes and policies, written before the control plane starts.
fn shop_objects(m: &Manifests) -> weft_e2e::Result<()> {
    m.namespace(NS, false)?;
    for (name, last) in [
        ("payments", PAYMENTS_IP),
        ("web", WEB_IP),
        ("slow", SLOW_IP),
    ] {
        m.service(
            NS,
            name,
            std::net::Ipv4Addr::new(198, 19, 0, last),
            &[("app", name)],
            SVC_PORT,
            APP_PORT,
        )?;
    }
    m.service(
        NS,
        "db",
        std::net::Ipv4Addr::new(198, 19, 0, DB_IP),
        &[("app", "db")],
        DB_PORT,
        DB_PORT,
    )?;
    // The ground-truth route: no retries, so every 503 reaches the client.
    m.http_route(
        NS,
        "checkout",
        "payments",
        &[],
        &[RouteRule::path_prefix("/checkout", "payments", SVC_PORT)],
    )?;
    m.http_route(
        NS,
        "payments-retry",
        "payments",
        &[],
        &[RouteRule::path_prefix("/retry", "payments", SVC_PORT).retry(&[503], 2, Some("5ms"))],
    )?;
    m.http_route(
        NS,
        "slow-route",
        "slow",
        &[],
        &[RouteRule::to_backends(&[("slow", SVC_PORT, 1)]).request_timeout("100ms")],
    )?;
    m.authorization_policy(
        NS,
        "web-deny-admin",
        &AuthorizationPolicySpec::deny(&[("app", "web")])
            .rule(PolicyRule::new().to(PolicyTarget::paths(&["/admin/*"]))),
    )?;
    // An allow-list being rehearsed on slow: the client is not on it, so its requests are
    // let through and counted as audit denials.
    m.authorization_policy(
        NS,
        "slow-audit",
        &AuthorizationPolicySpec::audit(&[("app", "slow")])
            .ports(&[APP_PORT])
            .rule(PolicyRule::new().from(PolicySource::service_accounts(&["shop/nobody"]))),
    )?;
    Ok(())
}

fn load(pod: &Pod, config: &LoadConfig) -> anyhow::Result<LoadReport> {
    Ok(pod.in_netns(|| run_load_blocking(config))??)
}

fn get(pod: &Pod, url: &str, requests: u64) -> anyhow::Result<LoadReport> {
    load(pod, &LoadConfig::get(url, requests, 2))
}

/// Sends single GETs until one is answered with `status` (the route has reached the client
/// proxy).
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

/// The sum of `name{labels}` on `pod`'s proxy once two reads 300 ms apart agree.
fn settled_proxy_value(pod: &MeshPod, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let read = || -> anyhow::Result<f64> { Ok(pod.metrics()?.value(name, labels).unwrap_or(0.0)) };
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let mut previous = read()?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let current = read()?;
        if current == previous {
            return Ok(current);
        }
        ensure!(
            Instant::now() < deadline,
            "{name}{labels:?} on {} never settled",
            pod.name()
        );
        previous = current;
    }
}

/// Polls `expr` until it returns exactly `expected`; returns the evaluation timestamp of the
/// first answer that did.
fn wait_for_prometheus_value(
    prometheus: &Prometheus,
    expr: &str,
    expected: f64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    loop {
        let samples = prometheus.query(expr)?;
        if let [one] = samples.as_slice() {
            if one.value == expected {
                return Ok(one.timestamp);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "Prometheus never showed {expr} = {expected}; last answer: {samples:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The expression of the panel titled `title` in `dashboard`, the target chosen by `pick`.
fn panel_expr(
    dashboards: &[(String, Value)],
    dashboard: &str,
    title: &str,
    pick: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let (name, json) = dashboards
        .iter()
        .find(|(name, _)| name == dashboard)
        .with_context(|| format!("no dashboard {dashboard}"))?;
    dashboard_queries(name, json)
        .into_iter()
        .find(|q| q.panel == title && pick(&q.expr))
        .map(|q| q.expr)
        .with_context(|| format!("{dashboard} has no panel {title:?} with the wanted query"))
}

/// The value of the sample whose `direction` label is `outbound`.
fn outbound_value(prometheus: &Prometheus, expr: &str, time: f64) -> anyhow::Result<f64> {
    let samples = prometheus.query_at(expr, Some(time))?;
    samples
        .iter()
        .find(|s| s.labels.get("direction").map(String::as_str) == Some("outbound"))
        .map(|s| s.value)
        .with_context(|| format!("{expr} has no outbound sample: {samples:?}"))
}

struct Shop {
    _control_plane: weft_e2e::Proc,
    _apps: Vec<weft_e2e::Proc>,
    pods: Vec<MeshPod>,
}

impl Shop {
    fn pod(&self, name: &str) -> anyhow::Result<&MeshPod> {
        self.pods
            .iter()
            .find(|p| p.name() == name)
            .with_context(|| format!("no pod {name}"))
    }
}

fn start_shop(cluster: &Cluster) -> anyhow::Result<Shop> {
    shop_objects(cluster.manifests())?;
    let control_plane = cluster.start_control_plane(&[])?;
    let mut pods = Vec::new();
    let mut apps = Vec::new();
    for plan in PODS {
        let pod = cluster.add_mesh_pod(MeshPodSpec::new(
            plan.name,
            plan.ip_last_octet,
            NS,
            plan.name,
        ))?;
        match plan.app {
            App::Http(args) => apps.push(start_http_server(&pod, plan.name, APP_PORT, args)?),
            App::Banner => apps.push(start_banner_server(&pod, DB_PORT, DB_BANNER)?),
            App::None => {}
        }
        pods.push(pod);
    }
    for pod in &mut pods {
        pod.wait_ready(READY_TIMEOUT)?;
    }
    Ok(Shop {
        _control_plane: control_plane,
        _apps: apps,
        pods,
    })
}

fn start_prometheus(cluster: &Cluster, shop: &Shop) -> anyhow::Result<Prometheus> {
    let targets: Vec<ScrapeTarget> = shop
        .pods
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

/// Traffic that gives every dashboard panel something to show: plain requests, a route with
/// retries, a route timeout, denied and audit-denied requests.
fn background_traffic(client: &Pod) -> anyhow::Result<()> {
    wait_for_status(client, &svc_url(WEB_IP, "/items"), 200)?;
    wait_for_status(client, &svc_url(SLOW_IP, "/"), 504)?;
    let report = get(client, &svc_url(WEB_IP, "/items"), 100)?;
    ensure!(report.all_succeeded(), "web: {report:?}");
    let report = get(client, &svc_url(WEB_IP, "/admin/users"), 5)?;
    ensure!(report.status_count(403) == 5, "denied: {report:?}");
    let report = get(client, &svc_url(PAYMENTS_IP, "/retry"), 50)?;
    ensure!(report.errors == 0, "retry route: {report:?}");
    let report = get(client, &svc_url(SLOW_IP, "/"), 3)?;
    ensure!(report.status_count(504) == 3, "slow route: {report:?}");
    // Opaque TCP: whole connections to the banner server (the first one also makes the
    // destination known to the client proxy). A pause after the first lets Prometheus scrape
    // the new series before the others: a counter's first sample is its baseline, so growth
    // inside one scrape interval of its creation never shows in rate().
    let db = SocketAddr::from(([198, 19, 0, DB_IP], DB_PORT));
    let expected = format!("{DB_BANNER}\n");
    for i in 0..4 {
        let mut stream = client.connect(db, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut banner = vec![0u8; expected.len()];
        stream
            .read_exact(&mut banner)
            .with_context(|| format!("db connection {i}: reading the banner"))?;
        ensure!(
            banner == expected.as_bytes(),
            "db connection {i}: banner {:?}",
            String::from_utf8_lossy(&banner)
        );
        stream.write_all(b"ping\n")?;
        let mut echo = [0u8; 5];
        stream.read_exact(&mut echo)?;
        ensure!(&echo == b"ping\n", "db connection {i}: echo {echo:?}");
        drop(stream);
        if i == 0 {
            std::thread::sleep(SCRAPE_INTERVAL * 3);
        }
    }
    Ok(())
}

/// Runs every dashboard query (template variables substituted) and lists those that return
/// no finite value.
fn broken_dashboard_queries(
    prometheus: &Prometheus,
    dashboards: &[(String, Value)],
) -> anyhow::Result<(usize, Vec<String>)> {
    // A window covering the whole test, so every counter has samples on both sides of traffic.
    let variables = [
        ("namespace", NS),
        ("workload", ".*"),
        ("route", ".*"),
        ("__rate_interval", "5m"),
        ("__interval", "1m"),
        ("__range", "5m"),
    ];
    let mut checked = 0;
    let mut broken = Vec::new();
    for (name, json) in dashboards {
        for query in dashboard_queries(name, json) {
            checked += 1;
            let expr = substitute_variables(&query.expr, &variables);
            let where_ = format!("{} / {}: {expr}", query.dashboard, query.panel);
            let outcome = match label_values_query(&expr) {
                Some((selector, label)) => prometheus.query(&selector).map(|samples| {
                    samples
                        .iter()
                        .any(|s| s.labels.get(&label).is_some_and(|v| !v.is_empty()))
                }),
                None => prometheus
                    .query(&expr)
                    .map(|samples| samples.iter().any(|s| s.value.is_finite())),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => broken.push(format!("{where_}\n    returned no data")),
                Err(e) => broken.push(format!("{where_}\n    {e}")),
            }
        }
    }
    Ok((checked, broken))
}

#[test]
fn prometheus_scrapes_proxies_dashboards_have_data_and_golden_signals_match_ground_truth() {
    e2e_test(
        "telemetry_prometheus",
        PROMETHEUS_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let dashboards = load_dashboards(&dashboards_dir())?;
            ensure!(
                dashboards.len() >= 6,
                "expected the six dashboards in {}, found {:?}",
                dashboards_dir().display(),
                dashboards.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
            let shop = start_shop(cluster)?;
            let prometheus = start_prometheus(cluster, &shop)?;
            let client_pod = shop.pod("client")?;
            let client = client_pod.pod();
            background_traffic(client)?;

            // --- Ground truth on route `checkout` -------------------------------------
            let checkout = svc_url(PAYMENTS_IP, "/checkout");
            wait_for_status(client, &checkout, 200)?;
            // Warm-up: 20 consecutive requests hold two 503s, so the 200 and 503 series
            // both exist before the measured window opens.
            let warm_up = get(client, &checkout, 20)?;
            ensure!(warm_up.errors == 0, "warm-up: {warm_up:?}");
            let proxy_labels = [("direction", "outbound"), ("route", "checkout")];
            let selector =
                r#"namespace="shop", workload="client", direction="outbound", route="checkout""#;
            let requests_series = format!("weft_http_requests_total{{{selector}}}");
            let failures_series =
                format!(r#"weft_http_responses_total{{{selector}, status_code="503"}}"#);
            let requests_expr = format!("sum({requests_series})");
            let failures_expr = format!("sum({failures_series})");
            let baseline_requests =
                settled_proxy_value(client_pod, "weft_http_requests_total", &proxy_labels)?;
            let mut failure_labels = proxy_labels.to_vec();
            failure_labels.push(("status_code", "503"));
            let baseline_failures =
                settled_proxy_value(client_pod, "weft_http_responses_total", &failure_labels)?;
            ensure!(
                baseline_failures >= 1.0,
                "the warm-up left no 503 series: {warm_up:?}"
            );
            wait_for_prometheus_value(&prometheus, &requests_expr, baseline_requests)?;
            let baseline_at =
                wait_for_prometheus_value(&prometheus, &failures_expr, baseline_failures)?;
            // Two more scrapes of the baseline, so the rate window below opens on it.
            std::thread::sleep(SCRAPE_INTERVAL * 2);

            let mut config = LoadConfig::get(&checkout, GROUND_TRUTH_REQUESTS, 6);
            config.keep_records = true;
            let report = load(client, &config)?;
            let expected_failures = GROUND_TRUTH_REQUESTS / 10;
            ensure!(
                report.errors == 0
                    && report.status_count(503) == expected_failures
                    && report.status_count(200) == GROUND_TRUTH_REQUESTS - expected_failures,
                "the backend did not fail exactly {FAIL_PERCENT}%: {report:?}"
            );

            let requests_total = baseline_requests + GROUND_TRUTH_REQUESTS as f64;
            wait_for_prometheus_value(&prometheus, &requests_expr, requests_total)?;
            let evaluated_at = wait_for_prometheus_value(
                &prometheus,
                &failures_expr,
                baseline_failures + expected_failures as f64,
            )?;

            // Exact counts: the counters' growth between the two instants.
            let count_expr = format!("{requests_expr} - sum({requests_series} @ {baseline_at:.3})");
            let counted = prometheus.scalar_at(&count_expr, Some(evaluated_at))?;
            ensure!(
                counted == GROUND_TRUTH_REQUESTS as f64,
                "Prometheus counted {counted} requests on route checkout, the client sent {GROUND_TRUTH_REQUESTS}"
            );
            let failed_expr =
                format!("{failures_expr} - sum({failures_series} @ {baseline_at:.3})");
            let failed = prometheus.scalar_at(&failed_expr, Some(evaluated_at))?;
            ensure!(
                failed == expected_failures as f64,
                "Prometheus counted {failed} 503s, the client got {expected_failures}"
            );

            // Success rate and p99 as the route dashboard computes them, over a window that
            // opens after the baseline and closes after the last response.
            let window_ms = ((evaluated_at - baseline_at - 1.0) * 1000.0).floor() as u64;
            let window = format!("{window_ms}ms");
            let route_values = [
                ("namespace", NS),
                ("workload", "client"),
                ("route", "checkout"),
                ("__rate_interval", window.as_str()),
            ];
            let success_expr = substitute_variables(
                &panel_expr(&dashboards, "weft-route.json", "Success rate", |_| true)?,
                &route_values,
            );
            let success_rate = outbound_value(&prometheus, &success_expr, evaluated_at)?;
            ensure!(
                (success_rate - 0.9).abs() <= 0.01,
                "success rate {success_rate} for route checkout, expected 0.90 ± 0.01 ({success_expr})"
            );
            let p99_expr = substitute_variables(
                &panel_expr(&dashboards, "weft-route.json", "Latency", |e| {
                    e.starts_with("histogram_quantile(0.99,")
                })?,
                &route_values,
            );
            let prometheus_p99 = outbound_value(&prometheus, &p99_expr, evaluated_at)?;
            let bounds_expr =
                format!("count by (le) (weft_http_response_latency_seconds_bucket{{{selector}}})");
            let mut bounds: Vec<f64> = prometheus
                .query_at(&bounds_expr, Some(evaluated_at))?
                .iter()
                .filter_map(|s| s.labels.get("le"))
                .filter_map(|le| match le.as_str() {
                    "+Inf" => Some(f64::INFINITY),
                    finite => finite.parse().ok(),
                })
                .collect();
            bounds.sort_by(f64::total_cmp);
            let client_p99 = report
                .p99_seconds_nearest_rank()
                .with_context(|| format!("no latency records: {report:?}"))?;
            let (lower, upper) = bucket_of(&bounds, client_p99)
                .with_context(|| format!("no bucket holds {client_p99} in {bounds:?}"))?;
            ensure!(
                lower < prometheus_p99 && prometheus_p99 <= upper,
                "Prometheus p99 {prometheus_p99} s is outside the bucket ({lower}, {upper}] \
                 holding the client's p99 {client_p99} s ({p99_expr})"
            );
            eprintln!(
                "telemetry_prometheus: route checkout: {counted} requests, {failed} 503s, \
                 success rate {success_rate}, p99 {prometheus_p99} s (client {client_p99} s, \
                 bucket ({lower}, {upper}])"
            );

            // --- Every dashboard query returns data -------------------------------------
            let (checked, broken) = broken_dashboard_queries(&prometheus, &dashboards)?;
            ensure!(
                broken.is_empty(),
                "{} of {checked} dashboard queries returned no data or failed:\n{}",
                broken.len(),
                broken.join("\n")
            );
            eprintln!("telemetry_prometheus: all {checked} dashboard queries returned data");
            Ok(())
        },
    );
}

//! The HTTP/1.1 load generator behind `weft-httpapp http-load`: N requests over C keep-alive
//! connections, optionally at a constant rate, reported as status and `x-served-by` counts,
//! latency percentiles and (on request) one record per request. It runs on a current-thread
//! runtime, so it can also run inside a test thread that joined a pod's network namespace.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::bins::bin;
use crate::error::{HarnessError, Result};
use crate::http::{parse_url, HttpUrl};
use crate::httpapp::{current_thread_runtime, SERVED_BY};
use crate::netns::Netns;
use crate::proc::{Cmd, Proc};

/// A report keeps this many error messages; the count stays exact.
const MAX_ERROR_MESSAGES: usize = 10;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `http://host:port/path`; the authority is also the Host header.
    pub url: String,
    pub requests: u64,
    /// Keep-alive connections, each carrying one request at a time.
    pub concurrency: usize,
    /// Requests per second across all connections: request `i` starts no earlier than
    /// `i / rate` seconds after the start. `None`: as fast as the connections allow.
    pub rate: Option<f64>,
    pub method: Method,
    /// Request body size (0: no body).
    pub body_bytes: usize,
    /// Bound on each request, connect included.
    pub timeout: Duration,
    /// Keep one [`RequestRecord`] per request in the report.
    pub keep_records: bool,
    /// Keep connections open between requests (HTTP/1.1 keep-alive); when false, every
    /// request gets a fresh connection.
    pub keep_alive: bool,
}

impl LoadConfig {
    /// `requests` GETs of `url` over `concurrency` connections, unpaced, 10 s timeout.
    pub fn get(url: &str, requests: u64, concurrency: usize) -> LoadConfig {
        LoadConfig {
            url: url.to_string(),
            requests,
            concurrency,
            rate: None,
            method: Method::GET,
            body_bytes: 0,
            timeout: Duration::from_secs(10),
            keep_records: false,
            keep_alive: true,
        }
    }
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// When it was sent, in ms since the load started.
    pub start_ms: f64,
    pub latency_ms: f64,
    /// `None` when no response arrived (see `error`).
    pub status: Option<u16>,
    pub served_by: Option<String>,
    pub error: Option<String>,
}

/// The load generator's one-line JSON report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests attempted.
    pub total: u64,
    /// Responses by status code.
    pub by_status: BTreeMap<String, u64>,
    /// Responses by their `x-served-by` header (absent header: not counted).
    pub by_served_by: BTreeMap<String, u64>,
    /// Latency percentiles over requests that got a response.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests that got no complete response (connect failure, reset, timeout).
    pub errors: u64,
    #[serde(default)]
    pub error_messages: Vec<String>,
    pub elapsed_ms: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<RequestRecord>,
}

impl LoadReport {
    /// The client's own p99 (nearest rank) over the kept records that got a response, in
    /// seconds; `None` without such records (`keep_records` off, or no response at all).
    pub fn p99_seconds_nearest_rank(&self) -> Option<f64> {
        let mut latencies: Vec<f64> = self
            .records
            .iter()
            .filter(|r| r.status.is_some())
            .map(|r| r.latency_ms / 1000.0)
            .collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_by(f64::total_cmp);
        let rank = (latencies.len() as f64 * 0.99).ceil() as usize;
        latencies.get(rank.saturating_sub(1)).copied()
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status
            .get(&status.to_string())
            .copied()
            .unwrap_or(0)
    }

    pub fn served_by_count(&self, name: &str) -> u64 {
        self.by_served_by.get(name).copied().unwrap_or(0)
    }

    /// Share of the responses naming a server that `name` served (0 when none did).
    pub fn served_by_fraction(&self, name: &str) -> f64 {
        let named: u64 = self.by_served_by.values().sum();
        if named == 0 {
            0.0
        } else {
            self.served_by_count(name) as f64 / named as f64
        }
    }

    /// Every request got a 2xx and none failed.
    pub fn all_succeeded(&self) -> bool {
        self.errors == 0
            && self
                .by_status
                .iter()
                .all(|(status, _)| status.starts_with('2'))
            && self.by_status.values().sum::<u64>() == self.total
    }

    /// The report from the load generator's stdout (its last non-empty line).
    pub fn from_stdout(stdout: &str) -> Result<LoadReport> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| HarnessError::invalid("load report", "empty output"))?;
        serde_json::from_str(line)
            .map_err(|e| HarnessError::invalid("load report", format!("{e}: {line:?}")))
    }
}

/// Shared by the workers of one run (one thread: no locking needed).
struct Run<'a> {
    config: &'a LoadConfig,
    target: HttpUrl,
    body: Bytes,
    start: Instant,
    next: Cell<u64>,
    records: RefCell<Vec<Option<RequestRecord>>>,
}

/// Runs the load to completion. Must be called inside a tokio runtime (current-thread is
/// enough); connections are made from the calling thread.
pub async fn run_load(config: &LoadConfig) -> Result<LoadReport> {
    let target = parse_url(&config.url)?;
    if config.concurrency == 0 {
        return Err(HarnessError::invalid("load config", "concurrency is 0"));
    }
    if config.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(HarnessError::invalid(
            "load config",
            "rate must be positive",
        ));
    }
    let slots = usize::try_from(config.requests)
        .map_err(|_| HarnessError::invalid("load config", "too many requests"))?;
    let run = Run {
        config,
        target,
        body: Bytes::from(vec![b'x'; config.body_bytes]),
        start: Instant::now(),
        next: Cell::new(0),
        records: RefCell::new(vec![None; slots]),
    };
    let workers = (0..config.concurrency).map(|_| worker(&run));
    futures_util::future::join_all(workers).await;
    let elapsed = run.start.elapsed();
    let records: Vec<RequestRecord> = run.records.into_inner().into_iter().flatten().collect();
    Ok(summarize(records, elapsed, config.keep_records))
}

/// [`run_load`] on a fresh current-thread runtime (call it inside `pod.in_netns(..)`).
pub fn run_load_blocking(config: &LoadConfig) -> Result<LoadReport> {
    current_thread_runtime()?.block_on(run_load(config))
}

async fn worker(run: &Run<'_>) {
    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        let i = run.next.get();
        if i >= run.config.requests {
            return;
        }
        run.next.set(i + 1);
        if let Some(rate) = run.config.rate {
            let due = run.start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let sent = Instant::now();
        let outcome =
            tokio::time::timeout(run.config.timeout, one_request(run, &mut connection)).await;
        let latency_ms = sent.elapsed().as_secs_f64() * 1000.0;
        if !run.config.keep_alive {
            connection = None;
        }
        let (status, served_by, error) = match outcome {
            Ok(Ok((status, served_by))) => (Some(status), served_by, None),
            Ok(Err(e)) => {
                connection = None;
                (None, None, Some(e))
            }
            Err(_) => {
                // The request was abandoned mid-flight: its connection is unusable.
                connection = None;
                (
                    None,
                    None,
                    Some(format!("timed out after {:?}", run.config.timeout)),
                )
            }
        };
        let record = RequestRecord {
            start_ms: sent.duration_since(run.start).as_secs_f64() * 1000.0,
            latency_ms,
            status,
            served_by,
            error,
        };
        // No await while the cell is borrowed, so the workers' borrows never overlap.
        let index = usize::try_from(i).unwrap_or(usize::MAX);
        if let Some(slot) = run.records.borrow_mut().get_mut(index) {
            *slot = Some(record);
        }
    }
}

/// Sends one request on `connection` (made or remade as needed) and reads the whole response.
async fn one_request(
    run: &Run<'_>,
    connection: &mut Option<SendRequest<Full<Bytes>>>,
) -> std::result::Result<(u16, Option<String>), String> {
    // A connection the peer closed between requests is replaced before sending, so an idle
    // close is not counted as a failed request.
    let reusable = match connection.as_mut() {
        Some(sender) if !sender.is_closed() => sender.ready().await.is_ok(),
        _ => false,
    };
    if !reusable {
        *connection = Some(connect(&run.target).await?);
    }
    let Some(sender) = connection.as_mut() else {
        return Err("no connection".to_string());
    };
    let mut request = Request::builder()
        .method(run.config.method.clone())
        .uri(run.target.path.as_str())
        .header(header::HOST, run.target.host.as_str());
    if !run.body.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/octet-stream");
    }
    let request = request
        .body(Full::new(run.body.clone()))
        .map_err(|e| format!("building the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get(SERVED_BY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the {status} response body: {e}"))?;
    Ok((status, served_by))
}

async fn connect(target: &HttpUrl) -> std::result::Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        // Errors surface on the request that was in flight.
        let _ = connection.await;
    });
    Ok(sender)
}

fn summarize(records: Vec<RequestRecord>, elapsed: Duration, keep_records: bool) -> LoadReport {
    let mut report = LoadReport {
        total: records.len() as u64,
        elapsed_ms: elapsed.as_secs_f64() * 1000.0,
        ..LoadReport::default()
    };
    let mut latencies = Vec::new();
    for record in &records {
        if let Some(status) = record.status {
            *report.by_status.entry(status.to_string()).or_default() += 1;
            latencies.push(record.latency_ms);
        }
        if let Some(name) = &record.served_by {
            *report.by_served_by.entry(name.clone()).or_default() += 1;
        }
        if let Some(error) = &record.error {
            report.errors += 1;
            if report.error_messages.len() < MAX_ERROR_MESSAGES {
                report.error_messages.push(error.clone());
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    report.p50_ms = percentile(&latencies, 0.50);
    report.p99_ms = percentile(&latencies, 0.99);
    if keep_records {
        report.records = records;
    }
    report
}

/// Nearest-rank percentile of sorted `values` (0 when empty).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `weft-httpapp http-load <args>` as root inside `netns` and returns its report.
pub fn run_http_load(netns: &Netns, args: &[&str], timeout: Duration) -> Result<LoadReport> {
    let proc = spawn_http_load(netns, args)?;
    http_load_report(proc, timeout)
}

/// Starts the load generator without waiting (pair with [`http_load_report`]).
pub fn spawn_http_load(netns: &Netns, args: &[&str]) -> Result<Proc> {
    netns.spawn(Cmd::new(bin("weft-httpapp")?).arg("http-load").args(args))
}

/// Waits (up to `timeout`) for a load generator and parses its report.
pub fn http_load_report(proc: Proc, timeout: Duration) -> Result<LoadReport> {
    let label = proc.label().to_string();
    let output = proc.output(timeout)?;
    LoadReport::from_stdout(&String::from_utf8_lossy(&output.stdout)).map_err(|e| {
        HarnessError::CommandFailed {
            command: label,
            status: format!("{} ({e})", output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn summary_counts_statuses_servers_and_errors() {
        let record = |status: Option<u16>, by: Option<&str>, error: Option<&str>| RequestRecord {
            start_ms: 0.0,
            latency_ms: 1.0,
            status,
            served_by: by.map(str::to_string),
            error: error.map(str::to_string),
        };
        let report = summarize(
            vec![
                record(Some(200), Some("a"), None),
                record(Some(200), Some("b"), None),
                record(Some(503), Some("a"), None),
                record(None, None, Some("reset")),
            ],
            Duration::from_millis(5),
            false,
        );
        assert_eq!(report.total, 4);
        assert_eq!(report.status_count(200), 2);
        assert_eq!(report.status_count(503), 1);
        assert_eq!(report.served_by_count("a"), 2);
        assert!((report.served_by_fraction("b") - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(report.errors, 1);
        assert_eq!(report.error_messages, vec!["reset".to_string()]);
        assert!(report.records.is_empty());
        assert!(!report.all_succeeded());
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            LoadReport::from_stdout(&format!("noise\n{json}\n")).unwrap(),
            report
        );
    }

    #[test]
    fn refused_connections_are_errors() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let report = run_load_blocking(&LoadConfig::get(&format!("http://{addr}/"), 3, 2)).unwrap();
        assert_eq!(report.total, 3);
        assert_eq!(report.errors, 3);
        assert!(
            report.error_messages[0].starts_with("connect"),
            "{report:?}"
        );
    }
}

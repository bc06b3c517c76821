//! `weft stat`: golden signals (request rate, success rate, latency quantiles, request count,
//! TCP connections and bytes) per workload, pod, route or split backend, inbound and
//! outbound, read from Prometheus (`--prometheus URL`, PromQL) or straight from proxies'
//! admin ports (`--from-proxies ADDR,...`, two scrapes a window apart). Both sources apply the
//! same rules (see `model.rs` and `prom.rs`), so they agree on the same traffic.

pub mod exposition;
mod http;
pub mod model;
mod prom;
pub mod quantile;
pub mod render;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use self::exposition::Sample;
use self::model::{Match, Resource, Scrape, Selector};
use self::render::Frame;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectionArg {
    Inbound,
    Outbound,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// `weft stat RESOURCE [NAME] [-n NS] [--to SVC] [--route R] (--prometheus URL | --from-proxies ADDR,...)`
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    weft stat deploy -n shop --prometheus http://prometheus:9090\n  \
    weft stat route --to payments --window 30s --prometheus http://prometheus:9090\n  \
    weft stat pod --from-proxies shop/web/web-0=10.0.0.7:7191,shop/web/web-1=10.0.0.8:7191 --watch\n  \
    weft stat backend --to web.shop --direction outbound --window 0 -o json --from-proxies 10.0.0.9:7191")]
pub struct StatArgs {
    /// What a row is: workload (alias deploy), pod, route, backend (the split's choice).
    pub resource: Resource,
    /// Only this workload / pod / route / backend Service (`name.namespace`).
    pub name: Option<String>,
    /// Only this namespace (the `namespace` target label).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only traffic to this Service (`name` or `name.namespace`); outbound rows only.
    #[arg(long, value_name = "SERVICE")]
    pub to: Option<String>,
    /// Only this route (HTTPRoute name, or `default`).
    #[arg(long)]
    pub route: Option<String>,
    #[arg(long, value_enum, default_value = "both")]
    pub direction: DirectionArg,
    /// Prometheus base URL (http://host:port); signals are computed by PromQL.
    #[arg(long, value_name = "URL", required_unless_present = "from_proxies")]
    pub prometheus: Option<String>,
    /// Proxy admin endpoints to scrape: `[NAMESPACE/]WORKLOAD[/POD]=HOST:PORT` or `HOST:PORT`
    /// (the proxy exports no pod labels; the name given here stands in for them).
    #[arg(
        long,
        value_name = "ADDRS",
        value_delimiter = ',',
        conflicts_with = "prometheus"
    )]
    pub from_proxies: Vec<String>,
    /// Window the signals cover (`30s`, `1m`, `500ms`); `0` for totals since the proxies started.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub window: Duration,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Redraw every SECONDS (default 2) until Ctrl-C.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<u64>,
    /// Bound on each HTTP request (`10s`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `0`, `250ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 1m or 500ms"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// A proxy to scrape and the target labels it stands for.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub url: String,
    pub labels: Vec<(String, String)>,
}

/// `[NAMESPACE/]WORKLOAD[/POD]=ADDR` or `ADDR`; ADDR is `host:port` or an `http://` URL.
pub fn parse_target(spec: &str) -> anyhow::Result<Target> {
    let (name, addr) = match spec.split_once('=') {
        Some((name, addr)) => (Some(name), addr),
        None => (None, spec),
    };
    let addr = addr.trim();
    if addr.is_empty() {
        bail!("empty proxy address in {spec:?}");
    }
    let url = if addr.starts_with("http://") {
        addr.to_string()
    } else {
        format!("http://{addr}/metrics")
    };
    let (namespace, workload, pod) = match name.map(|n| n.split('/').collect::<Vec<_>>()) {
        None => ("", "", addr),
        Some(parts) => match parts.as_slice() {
            [w] => ("", *w, addr),
            [ns, w] => (*ns, *w, addr),
            [ns, w, p] => (*ns, *w, *p),
            _ => bail!("{spec:?}: want [NAMESPACE/]WORKLOAD[/POD]=ADDR"),
        },
    };
    Ok(Target {
        url,
        labels: vec![
            ("namespace".into(), namespace.into()),
            ("workload".into(), workload.into()),
            ("pod".into(), pod.into()),
        ],
    })
}

/// The label filters the flags ask for.
pub fn selector(args: &StatArgs) -> Selector {
    let mut s = Selector::default();
    if let Some(ns) = &args.namespace {
        s = s.exact("namespace", ns);
    }
    match args.direction {
        DirectionArg::Inbound => s = s.exact("direction", "inbound"),
        DirectionArg::Outbound => s = s.exact("direction", "outbound"),
        DirectionArg::Both => {}
    }
    if let Some(to) = &args.to {
        s = s.with("dst_service", service_match(to));
    }
    if let Some(route) = &args.route {
        s = s.exact("route", route);
    }
    if let Some(name) = &args.name {
        s = match args.resource {
            Resource::Backend => s.with("dst_backend", service_match(name)),
            r => s.exact(r.name_label(), name),
        };
    }
    s
}

fn service_match(name: &str) -> Match {
    if name.contains('.') {
        Match::Exact(name.to_string())
    } else {
        Match::ServiceName(name.to_string())
    }
}

/// Scrapes every target at once; samples per target, in order.
pub async fn scrape_all(targets: &[Target], timeout: Duration) -> anyhow::Result<Vec<Vec<Sample>>> {
    let handles: Vec<_> = targets
        .iter()
        .map(|t| {
            let url = t.url.clone();
            tokio::spawn(async move { http::get(&url, timeout).await })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for (handle, target) in handles.into_iter().zip(targets) {
        let (status, body) = handle
            .await
            .context("scrape task")?
            .with_context(|| format!("scraping {}", target.url))?;
        if status != 200 {
            bail!("{} answered HTTP {status}", target.url);
        }
        out.push(exposition::parse(&body).with_context(|| format!("parsing {}", target.url))?);
    }
    Ok(out)
}

/// The `--from-proxies` source: scrapes kept for as long as the window needs.
struct ProxySource {
    targets: Vec<Target>,
    history: VecDeque<(Instant, Vec<Vec<Sample>>)>,
}

impl ProxySource {
    /// Rows over the window: the newest scrape against the newest one at least a window old
    /// (the first frame waits one window). `None` when interrupted while waiting.
    async fn frame(
        &mut self,
        args: &StatArgs,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Frame>> {
        let selector = selector(args);
        if args.window.is_zero() {
            let now = scrape_all(&self.targets, args.timeout).await?;
            let scrapes = self.with_labels(now.iter().map(|s| model::deltas(s, None)));
            return Ok(Some(Frame {
                source: "proxies",
                resource: args.resource,
                window_seconds: 0.0,
                rows: model::rows_from_scrapes(&scrapes, args.resource, &selector, 0.0),
            }));
        }
        if self.history.is_empty() {
            let first = scrape_all(&self.targets, args.timeout).await?;
            self.history.push_back((Instant::now(), first));
            // On stderr, so a script (or a test) knows when the window opened.
            eprintln!(
                "weft stat: first scrape of {} prox{} done; the window closes in {:?}",
                self.targets.len(),
                if self.targets.len() == 1 { "y" } else { "ies" },
                args.window
            );
            if pause(args.window, stop).await {
                return Ok(None);
            }
        }
        let now = scrape_all(&self.targets, args.timeout).await?;
        let at = Instant::now();
        self.history.push_back((at, now));
        let base = self
            .history
            .iter()
            .rposition(|(t, _)| at.duration_since(*t) >= args.window)
            .unwrap_or(0);
        self.history.drain(..base);
        let ((base_at, base_samples), (_, now_samples)) =
            match (self.history.front(), self.history.back()) {
                (Some(b), Some(n)) => (b, n),
                _ => bail!("no scrape kept"),
            };
        let window = at.duration_since(*base_at).as_secs_f64();
        let grown: Vec<Vec<Sample>> = now_samples
            .iter()
            .zip(base_samples)
            .map(|(n, b)| model::deltas(n, Some(b)))
            .collect();
        let scrapes = self.with_labels(grown.into_iter());
        Ok(Some(Frame {
            source: "proxies",
            resource: args.resource,
            window_seconds: window,
            rows: model::rows_from_scrapes(&scrapes, args.resource, &selector, window),
        }))
    }

    fn with_labels(&self, samples: impl Iterator<Item = Vec<Sample>>) -> Vec<Scrape> {
        self.targets
            .iter()
            .zip(samples)
            .map(|(t, samples)| Scrape {
                target_labels: t.labels.clone(),
                samples,
            })
            .collect()
    }
}

/// Sleeps `d`; true when Ctrl-C came first.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

pub fn run(args: &StatArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &StatArgs) -> anyhow::Result<()> {
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let mut proxies = if args.from_proxies.is_empty() {
        None
    } else {
        let targets = args
            .from_proxies
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_target(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Some(ProxySource {
            targets,
            history: VecDeque::new(),
        })
    };
    loop {
        let frame = match (&mut proxies, &args.prometheus) {
            (Some(source), _) => source.frame(args, &mut stop).await?,
            (None, Some(url)) => Some(Frame {
                source: "prometheus",
                resource: args.resource,
                window_seconds: args.window.as_secs_f64(),
                rows: prom::rows(
                    url,
                    args.resource,
                    &selector(args),
                    args.window,
                    args.timeout,
                )
                .await?,
            }),
            (None, None) => bail!("give --prometheus URL or --from-proxies ADDR,..."),
        };
        let Some(frame) = frame else { return Ok(()) };
        show(args, &frame)?;
        let Some(every) = args.watch else {
            return Ok(());
        };
        if pause(Duration::from_secs(every.max(1)), &mut stop).await {
            return Ok(());
        }
    }
}

fn show(args: &StatArgs, frame: &Frame) -> anyhow::Result<()> {
    match args.output {
        OutputFormat::Json => {
            println!("{}", serde_json::to_string(&render::json(frame))?);
        }
        OutputFormat::Table => {
            if args.watch.is_some() {
                // Clear the screen and home the cursor, then a title line.
                print!("\x1b[2J\x1b[H");
                println!(
                    "weft stat {} · {} · window {:.0}s · every {}s (Ctrl-C to stop)\n",
                    frame.resource.as_str(),
                    frame.source,
                    frame.window_seconds,
                    args.watch.unwrap_or_default()
                );
            }
            print!("{}", render::table(frame));
            if frame.rows.is_empty() {
                eprintln!("weft stat: no matching traffic");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_targets_parse() {
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("-1s").is_err());
        let t = parse_target("shop/client/client-0=198.18.0.10:7191").unwrap();
        assert_eq!(t.url, "http://198.18.0.10:7191/metrics");
        assert_eq!(t.labels[0], ("namespace".to_string(), "shop".to_string()));
        assert_eq!(t.labels[2], ("pod".to_string(), "client-0".to_string()));
        let bare = parse_target("127.0.0.1:7191").unwrap();
        assert_eq!(bare.labels[1].1, "");
        assert_eq!(bare.labels[2].1, "127.0.0.1:7191");
        assert!(parse_target("a/b/c/d=x:1").is_err());
        assert!(parse_target("a=").is_err());
    }
}

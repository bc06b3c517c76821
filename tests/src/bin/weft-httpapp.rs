//! `weft-httpapp`: the HTTP-era applications the e2e tests put in pods: an HTTP/1.1 + h2c
//! server, a speak-first TCP server, a gRPC server and an HTTP load generator.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use http::Method;
use weft_e2e::grpcapp::serve_grpc;
use weft_e2e::httpapp::{serve_banner, serve_http, HttpServerConfig};
use weft_e2e::load::{run_load, LoadConfig};

#[derive(Parser)]
#[command(name = "weft-httpapp", about = "weft's HTTP e2e test applications")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP/1.1 and h2c server: `/`, `/status/<code>`, `/sleep/<ms>`, `/echo`, `/count`, `/ws`;
    /// every response carries `x-served-by: <name>`.
    HttpServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Answer this share of requests with 503, spread evenly (30 → 3 of every 10).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
        fail_percent: u32,
        /// Delay every response by this much.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// TCP server that writes `<banner>\n` on accept, then echoes.
    BannerServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        banner: String,
    },
    /// gRPC server for `weft.e2e.v1.TestService` (unary Echo, bidirectional Chat).
    GrpcServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// HTTP/1.1 load: prints a JSON report (status and x-served-by counts, p50/p99, errors).
    HttpLoad {
        #[arg(long)]
        url: String,
        #[arg(long)]
        requests: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Requests per second (constant rate); as fast as possible when absent.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value = "GET")]
        method: Method,
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Include one record per request in the report.
        #[arg(long)]
        records: bool,
        /// A fresh connection for every request instead of keep-alive.
        #[arg(long)]
        no_keep_alive: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-httpapp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::HttpServer {
            listen,
            name,
            fail_percent,
            delay_ms,
        } => multi_thread_runtime()?.block_on(async move {
            let listener = bind(listen).await?;
            serve_http(
                listener,
                HttpServerConfig {
                    name,
                    fail_percent,
                    delay: Duration::from_millis(delay_ms),
                },
            )
            .await
            .context("accepting connections")
        }),
        Command::BannerServer { listen, banner } => {
            let listener =
                std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            announce(listener.local_addr()?);
            serve_banner(listener, &banner).context("accepting connections")
        }
        Command::GrpcServer { listen, name } => multi_thread_runtime()?.block_on(async move {
            let listener = bind(listen).await?;
            serve_grpc(listener, &name).await.context("serving gRPC")
        }),
        Command::HttpLoad {
            url,
            requests,
            concurrency,
            rate,
            method,
            body_bytes,
            timeout_ms,
            records,
            no_keep_alive,
        } => {
            let config = LoadConfig {
                url,
                requests,
                concurrency,
                rate,
                method,
                body_bytes,
                timeout: Duration::from_millis(timeout_ms),
                keep_records: records,
                keep_alive: !no_keep_alive,
            };
            // One thread: the load generator shares no state across threads.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the runtime")?;
            let report = runtime.block_on(run_load(&config))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn multi_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the runtime")
}

async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    announce(listener.local_addr()?);
    Ok(listener)
}

/// The harness waits for this line before sending traffic.
fn announce(local: SocketAddr) {
    eprintln!("listening on {local}");
}

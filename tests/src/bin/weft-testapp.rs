//! `weft-testapp`: the application the e2e tests put in pods: echo and sink servers, a client
//! that verifies every byte, and a tiny HTTP GET.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_e2e::http::http_get;
use weft_e2e::testapp::{run_client, serve, ClientConfig, Mode};

#[derive(Parser)]
#[command(name = "weft-testapp", about = "weft's e2e test application")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every connection until EOF, then half-close.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Read every connection until EOF, reply with the 32-byte SHA-256 of what was read.
    SinkServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send deterministic data, half-close, verify the reply; print a JSON summary.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes per connection.
        #[arg(long)]
        bytes: u64,
        /// Simultaneous connections (workers with --duration-secs).
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Written at the start of every 4 KiB block, for packet captures to look for.
        #[arg(long, default_value = "")]
        marker: String,
        /// echo: expect the bytes back; sink: expect their SHA-256.
        #[arg(long, default_value = "echo")]
        mode: Mode,
        /// Keep opening new connections for this long.
        #[arg(long)]
        duration_secs: Option<u64>,
        /// Pause between one worker's connections with --duration-secs.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Bound on connect and on each read and write.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// HTTP/1.0 GET; prints the body; fails on a non-2xx status.
    HttpGet {
        url: String,
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-testapp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::EchoServer { listen } => serve_on(listen, Mode::Echo),
        Command::SinkServer { listen } => serve_on(listen, Mode::Sink),
        Command::Client {
            connect,
            bytes,
            connections,
            marker,
            mode,
            duration_secs,
            interval_ms,
            timeout_secs,
        } => {
            let summary = run_client(&ClientConfig {
                connect,
                bytes,
                connections,
                marker,
                mode,
                duration: duration_secs.map(Duration::from_secs),
                interval: Duration::from_millis(interval_ms),
                io_timeout: Duration::from_secs(timeout_secs),
            });
            println!("{}", serde_json::to_string(&summary)?);
            Ok(if summary.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::HttpGet { url, timeout_secs } => {
            let response = http_get(&url, Duration::from_secs(timeout_secs))?;
            print!("{}", response.body_text());
            if response.is_success() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("weft-testapp: GET {url}: status {}", response.status);
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn serve_on(listen: SocketAddr, mode: Mode) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    // The harness waits for this line before sending traffic.
    eprintln!("listening on {local}");
    serve(listener, mode).context("accepting connections")?;
    Ok(ExitCode::SUCCESS)
}

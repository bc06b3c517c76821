//! `weft-proxy`: with no subcommand, runs the sidecar proxy (configured by `WEFT_*`
//! environment variables); `weft-proxy init` installs the pod's iptables interception.

use clap::{Parser, Subcommand};
use weft_proxy::config::{LogFormat, ProxyConfig};
use weft_proxy::init;

#[derive(Parser)]
#[command(
    name = "weft-proxy",
    version,
    about = "weft's sidecar proxy",
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    proxy: ProxyConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Install the iptables rules that redirect the pod's TCP traffic to the proxy.
    Init(init::InitArgs),
    /// Wait until the proxy's admin server answers GET /ready with 200 (the injector's
    /// post-start hook on clusters without native sidecars).
    WaitReady {
        /// Admin port of the proxy on 127.0.0.1.
        #[arg(long, default_value_t = 7191)]
        port: u16,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Init(args)) => match init::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-proxy init: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Some(Command::WaitReady { port, timeout_secs }) => {
            if wait_ready(port, std::time::Duration::from_secs(timeout_secs)) {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("weft-proxy wait-ready: not ready after {timeout_secs}s");
                std::process::ExitCode::FAILURE
            }
        }
        None => match run_proxy(cli.proxy) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-proxy: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn run_proxy(config: ProxyConfig) -> anyhow::Result<()> {
    init_logging(&config.log, config.log_format);
    let settings = config.settings()?;
    let runtime = if config.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(weft_proxy::run::run(settings))
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("weft-proxy: invalid WEFT_LOG {filter:?} ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Polls `GET /ready` on the loopback admin port until it answers 200 or `timeout` passes.
fn wait_ready(port: u16, timeout: std::time::Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let step = std::time::Duration::from_millis(200);
    while std::time::Instant::now() < deadline {
        if let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, step) {
            let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut head = [0u8; 16];
            let asked = tcp.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n");
            if asked.is_ok() && tcp.read_exact(&mut head).is_ok() && head[8..13] == *b" 200 " {
                return true;
            }
        }
        std::thread::sleep(step);
    }
    false
}

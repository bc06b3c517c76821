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

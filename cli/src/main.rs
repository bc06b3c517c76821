//! `weft`: the command line. `identity` generates a trust anchor and issuer; `demo` runs
//! the whole mesh on this machine (pods as network namespaces).

mod check;
mod demo;
mod identity;
mod inject;
mod install;
mod stat;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft", version, about = "weft service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a trust anchor and an issuer (trust-anchors.pem, issuer.pem, issuer-key.pem).
    Identity(identity::IdentityArgs),
    /// Add the proxy to the pods and pod templates of YAML on stdin (writes YAML to stdout).
    Inject(inject::InjectArgs),
    /// Run the control plane and meshed pods (network namespaces) on this machine. Needs root.
    Demo(demo::DemoArgs),
    /// Print the Kubernetes manifests of a weft install (for `kubectl apply -f -`).
    Install(install::InstallArgs),
    /// Check a Kubernetes install (API server from KUBECONFIG); exits 1 on any failure.
    Check(check::CheckArgs),
    /// Golden signals per workload, pod, route or backend, from Prometheus or the proxies.
    Stat(stat::StatArgs),
    /// The demo's tiny echo server (run inside a demo pod).
    #[command(hide = true)]
    DemoEcho {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// The demo's HTTP app (run inside a demo pod).
    #[command(hide = true)]
    DemoHttp {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        name: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Identity(args) => identity::run(&args),
        Command::Inject(args) => inject::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Stat(args) => stat::run(&args),
        Command::Install(args) => install::run(&args),
        Command::Check(args) => check::run(&args),
        Command::DemoEcho { listen } => demo::app::echo_server(listen),
        Command::DemoHttp { listen, name } => demo::app::http_server(listen, name),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `weft-control`: the control plane. Standalone it reads Kubernetes-shaped YAML from a
//! directory (`--source dir:<path>`); in a cluster it watches the API server (`--source
//! kube`) and proves workload tokens with TokenReviews. It serves Identity, Destination and
//! Inbound over TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::transport::Server;
use weft_api::destination::destination_server::DestinationServer;
use weft_api::identity::identity_server::IdentityServer;
use weft_api::inbound::inbound_server::InboundServer;
use weft_certs::{server_config, CertStore, ClientAuth, Issuer, SpiffeId, TrustAnchors};
use weft_control::grpc::destination::DestinationService;
use weft_control::grpc::identity::IdentityService;
use weft_control::grpc::inbound::InboundService;
use weft_control::identity_proof::TokenVerifier;
use weft_control::index::Index;
use weft_control::model::DefaultInboundPolicy;
use weft_control::source::dir::DirSource;
use weft_control::source::kube::KubeSource;
use weft_control::tls_server;

#[derive(Parser, Debug)]
#[command(name = "weft-control", version, about = "weft's control plane")]
struct Args {
    /// Where the cluster state comes from: `dir:<path>` (a directory of Kubernetes-shaped YAML,
    /// watched) or `kube` (the Kubernetes API: in-cluster config, KUBECONFIG or --kubeconfig).
    #[arg(long)]
    source: String,
    /// Kubeconfig for `--source kube` / `--token-review` instead of the default lookup.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Prove identity tokens with Kubernetes TokenReviews (audience identity.weft.io) rather
    /// than bootstrap-token annotations. Always on with `--source kube`.
    #[arg(long)]
    token_review: bool,
    /// With `--source kube`: do not write status conditions on TrafficSplits, HTTPRoutes and
    /// AuthorizationPolicies (for read-only RBAC).
    #[arg(long)]
    no_status: bool,
    /// Directory holding trust-anchors.pem, issuer.pem and issuer-key.pem (see `weft identity`).
    #[arg(long)]
    identity: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:7150")]
    listen: SocketAddr,
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, default_value_t = 86_400)]
    cert_lifetime_secs: u64,
    /// Namespace and service account of the control plane's own identity. In a cluster the
    /// install sets WEFT_NAMESPACE from the pod's namespace, which is also the namespace the
    /// injector names in every proxy's WEFT_CONTROL_IDENTITY: the two must agree.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft")]
    namespace: String,
    #[arg(long, default_value = "weft-control")]
    service_account: String,
    /// What a pod port allows when no AuthorizationPolicy selects it, unless the pod or its
    /// namespace says otherwise (annotation config.weft.io/default-inbound-policy):
    /// all-unauthenticated, all-authenticated, cluster-authenticated or deny.
    #[arg(long, default_value_t = DefaultInboundPolicy::AllUnauthenticated)]
    default_inbound_policy: DefaultInboundPolicy,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-control: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-control: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = match (args.source.as_str(), args.source.strip_prefix("dir:")) {
        ("kube", _) => None,
        (_, Some(dir)) => Some(dir.to_owned()),
        _ => bail!(
            "unsupported --source {:?}: expected dir:<path> or kube",
            args.source
        ),
    };
    if args.cert_lifetime_secs < 10 {
        bail!("--cert-lifetime-secs must be at least 10");
    }
    let read = |name: &str| {
        let path = args.identity.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let anchors = TrustAnchors::from_pem(read("trust-anchors.pem")?.as_bytes())
        .context("parsing trust-anchors.pem")?;
    let issuer = Arc::new(
        Issuer::from_pem(&read("issuer.pem")?, &read("issuer-key.pem")?)
            .context("loading the issuer")?,
    );
    let own_id = SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
        .context("control plane identity")?;

    // The control plane's own serving certificate, re-minted well before it expires.
    let store = CertStore::new(own_id.clone());
    let own_lifetime = Duration::from_secs(86_400);
    let (key, not_after) = issuer.issue_own(&own_id, own_lifetime)?;
    store.install(key, not_after);
    tokio::spawn({
        let (issuer, store, own_id) = (issuer.clone(), store.clone(), own_id.clone());
        async move {
            loop {
                tokio::time::sleep(own_lifetime.mul_f64(0.7)).await;
                match issuer.issue_own(&own_id, own_lifetime) {
                    Ok((key, not_after)) => store.install(key, not_after),
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the control plane's own certificate")
                    }
                }
            }
        }
    });

    let index = Index::new();
    let needs_kube = dir.is_none() || args.token_review;
    let client = if needs_kube {
        Some(kube_client(args.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    match (&dir, &client) {
        (Some(dir), _) => {
            let mut source = DirSource::new(PathBuf::from(dir));
            let report = source.load().with_context(|| format!("loading {dir}"))?;
            for p in &report.problems {
                tracing::warn!(file = %p.file.display(), object = ?p.object, "{}", p.message);
            }
            index.publish(report.state);
            tokio::spawn({
                let index = index.clone();
                async move {
                    if let Err(e) = source.run(index).await {
                        tracing::error!(error = %e, "directory source stopped; serving the last state");
                    }
                }
            });
        }
        (None, Some(client)) => {
            let source = KubeSource::new(client.clone(), !args.no_status);
            tokio::spawn({
                let index = index.clone();
                async move {
                    if let Err(e) = source.run(index).await {
                        tracing::error!(error = %e, "Kubernetes source stopped; serving the last state");
                    }
                }
            });
        }
        (None, None) => bail!("--source kube needs a Kubernetes client"),
    }
    let verifier = match client {
        Some(client) => TokenVerifier::TokenReview(client),
        None => TokenVerifier::Bootstrap(index.clone()),
    };

    let tls = server_config(&anchors, store, ClientAuth::Optional, &[b"h2"])?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, identity = %own_id, source = %args.source, "serving");
    let identity = IdentityService {
        verifier,
        issuer,
        trust_domain: args.trust_domain.clone(),
        lifetime: Duration::from_secs(args.cert_lifetime_secs),
    };
    let destination = DestinationService {
        index: index.clone(),
        trust_domain: args.trust_domain.clone(),
    };
    let inbound = InboundService {
        index,
        trust_domain: args.trust_domain.clone(),
        default_policy: args.default_inbound_policy,
    };
    Server::builder()
        // Requests are small (a CSR and a token; a target name): refuse big ones before decoding.
        .add_service(IdentityServer::new(identity).max_decoding_message_size(64 * 1024))
        .add_service(DestinationServer::new(destination).max_decoding_message_size(16 * 1024))
        .add_service(InboundServer::new(inbound).max_decoding_message_size(16 * 1024))
        .serve_with_incoming_shutdown(
            tls_server::incoming(listener, TlsAcceptor::from(tls)),
            shutdown_signal(),
        )
        .await
        .context("gRPC server")?;
    Ok(())
}

/// `--kubeconfig` when given, else kube's default lookup (KUBECONFIG, ~/.kube/config,
/// in-cluster service account).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding Kubernetes credentials (in-cluster or KUBECONFIG)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

//! `weft-injector`: the mutating admission webhook (TLS on 8443, path `/inject`). A thin
//! shell around the library: TLS, HTTP, the Namespace lookup and the cluster version.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use weft_injector::{admission, NamespaceMeta, ProxyArgs, ProxySettings};

/// The largest AdmissionReview accepted; the API server caps objects at ~3 MiB.
const MAX_BODY: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client gets this long to send its whole AdmissionReview.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(5);
const VERSION_REFRESH: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(
    name = "weft-injector",
    version,
    about = "weft's proxy injector (mutating admission webhook)"
)]
struct Args {
    /// Address of the HTTPS server (POST /inject, GET /ready).
    #[arg(long, env = "WEFT_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// PEM certificate chain the webhook serves.
    #[arg(long, env = "WEFT_INJECTOR_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WEFT_INJECTOR_TLS_KEY")]
    tls_key: PathBuf,
    /// Kubernetes version to assume (e.g. 1.28), instead of asking the API server.
    /// Native sidecars are used from 1.29 on.
    #[arg(long, env = "WEFT_INJECTOR_KUBERNETES_VERSION")]
    kubernetes_version: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WEFT_INJECTOR_LOG", default_value = "info")]
    log: String,
    #[command(flatten)]
    proxy: ProxyArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-injector: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-injector: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

struct State {
    settings: ProxySettings,
    client: Client,
    native_by_default: AtomicBool,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let settings = args.proxy.settings()?;
    let tls = tls_config(&args.tls_cert, &args.tls_key)?;
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;

    let fixed =
        match &args.kubernetes_version {
            Some(text) => Some(weft_injector::parse_kubernetes_version(text).with_context(
                || format!("--kubernetes-version {text:?} is not a version like 1.29"),
            )?),
            None => None,
        };
    let native = match fixed {
        Some(native) => native,
        None => cluster_supports_native(&client).await.unwrap_or_else(|e| {
            // Native sidecars need ≥ 1.29; guessing "no" only costs the older layout.
            tracing::warn!(error = %e, "could not read the API server version; using regular sidecars until it can be read");
            false
        }),
    };
    tracing::info!(native_sidecars = native, "cluster version checked");
    let state = Arc::new(State {
        settings,
        client: client.clone(),
        native_by_default: AtomicBool::new(native),
    });
    if fixed.is_none() {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(VERSION_REFRESH).await;
                match cluster_supports_native(&state.client).await {
                    Ok(native) => state.native_by_default.store(native, Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "refreshing the API server version"),
                }
            }
        });
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "weft-injector serving");
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| serve(state.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
        });
    }
}

async fn cluster_supports_native(client: &Client) -> anyhow::Result<bool> {
    let info = client.apiserver_version().await?;
    weft_injector::supports_native_sidecars(&info.major, &info.minor).with_context(|| {
        format!(
            "unexpected version major={:?} minor={:?}",
            info.major, info.minor
        )
    })
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<rustls::ServerConfig> {
    let cert_pem =
        std::fs::read(cert).with_context(|| format!("reading --tls-cert {}", cert.display()))?;
    let key_pem =
        std::fs::read(key).with_context(|| format!("reading --tls-key {}", key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    // The error names the file and what is missing, never the key's bytes.
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{} holds no readable private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the serving certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

async fn serve(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let text = |status, body: &str| respond(status, "text/plain", body.as_bytes().to_vec());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => Ok(text(StatusCode::OK, "ready\n")),
        (&Method::POST, "/inject") => {
            let limited = Limited::new(req.into_body(), MAX_BODY).collect();
            let body = match tokio::time::timeout(BODY_TIMEOUT, limited).await {
                Ok(Ok(collected)) => collected.to_bytes(),
                Err(_) => {
                    return Ok(text(
                        StatusCode::REQUEST_TIMEOUT,
                        "the body did not arrive in time\n",
                    ))
                }
                Ok(Err(e)) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        &format!("unreadable body (at most {MAX_BODY} bytes): {e}\n"),
                    ))
                }
            };
            let native = state.native_by_default.load(Ordering::Relaxed);
            let client = state.client.clone();
            let reply = admission::handle(&body, &state.settings, native, |ns| {
                lookup_namespace(client, ns)
            })
            .await;
            tracing::info!(status = reply.status, "{}", reply.summary);
            let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_REQUEST);
            let bytes = serde_json::to_vec(&reply.body).unwrap_or_default();
            Ok(respond(status, "application/json", bytes))
        }
        (_, "/inject" | "/ready") => {
            Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"))
        }
        _ => Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    }
}

async fn lookup_namespace(client: Client, name: String) -> Result<NamespaceMeta, String> {
    if name.is_empty() {
        return Err("the request names no namespace".into());
    }
    let api: Api<Namespace> = Api::all(client);
    match tokio::time::timeout(NAMESPACE_TIMEOUT, api.get(&name)).await {
        Ok(Ok(ns)) => Ok(NamespaceMeta {
            name,
            annotations: ns.metadata.annotations.unwrap_or_default(),
            labels: ns.metadata.labels.unwrap_or_default(),
        }),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {NAMESPACE_TIMEOUT:?}")),
    }
}

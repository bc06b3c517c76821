//! Wires the proxy together: admin first (so `/ready` can say "not yet"), then the
//! workload certificate, then the inbound and outbound listeners; SIGTERM drains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_certs::{client_config, server_config, CertStore, ClientAuth, TrustAnchors};

use crate::admin::config_view::ConfigSources;
use crate::admin::Admin;
use crate::authz::{Authz, PolicyWatch};
use crate::config::Settings;
use crate::discovery::Discovery;
use crate::drain::Drain;
use crate::http::client::Clients;
use crate::http::outbound::HttpContext;
use crate::http::ALPN_H2;
use crate::identity::Identity;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::{control, ALPN_OPAQUE};

/// The control plane speaks plain gRPC over TLS.
const ALPN_GRPC: &[u8] = b"h2";

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let anchors_source = settings.trust_anchors.describe();
    let anchors_pem = settings
        .trust_anchors
        .read()
        .with_context(|| format!("reading trust anchors {anchors_source}"))?;
    let anchors = TrustAnchors::from_pem(&anchors_pem)
        .with_context(|| format!("parsing trust anchors {anchors_source}"))?;
    let store = CertStore::new(settings.identity.clone());
    let metrics = Metrics::new();
    if let Some(trace) = &settings.trace {
        crate::trace::install(trace, &settings, &metrics).context("starting trace export")?;
    }
    let drain = Drain::new();

    let admin_listener = TcpListener::bind(settings.admin_addr)
        .await
        .with_context(|| format!("binding admin {}", settings.admin_addr))?;
    let admin = Arc::new(Admin {
        store: store.clone(),
        metrics: metrics.clone(),
        drain: drain.clone(),
        listening: AtomicBool::new(false),
        config: ConfigSources::new(&settings.control_addr),
    });
    tokio::spawn(admin.clone().serve(admin_listener));

    let control_name = ServerName::try_from(settings.control_identity.tls_server_name())
        .context("control-plane identity does not form a TLS server name")?;
    // Certify runs before this proxy has a certificate, so its channel never offers one;
    // discovery runs after, over mTLS, so the control plane knows who is asking.
    let identity_channel = control::channel(
        &settings.control_addr,
        control_name.clone(),
        client_config(&anchors, None, &[ALPN_GRPC])?,
    )?;
    let discovery_channel = control::channel(
        &settings.control_addr,
        control_name,
        client_config(&anchors, Some(store.clone()), &[ALPN_GRPC])?,
    )?;
    tracing::info!(identity = %settings.identity, pod = %settings.pod_name, control = %settings.control_addr, "starting");
    tokio::spawn(
        Identity::new(
            identity_channel,
            store.clone(),
            settings.identity_token_file.clone(),
            metrics.clone(),
        )
        .run(),
    );

    // Listeners open only once a certificate is held: until then mesh traffic could not
    // be served, and a refused connection is a clearer failure than a stalled one.
    let mut ready = tokio::time::interval(std::time::Duration::from_millis(50));
    let mut terminate = terminate_signal()?;
    loop {
        tokio::select! {
            _ = ready.tick() => if store.is_ready() { break },
            _ = terminate.recv() => {
                tracing::info!("terminated before the first certificate arrived");
                return Ok(());
            }
            _ = drain.signaled() => return Ok(()),
        }
    }

    if settings.pod_name.is_empty() {
        // The control plane looks inbound policy up by pod; without a name it cannot answer.
        tracing::warn!("WEFT_POD_NAME is not set: no inbound policy can be fetched, so inbound connections will be refused");
    }
    let policy_watch = PolicyWatch::new(
        discovery_channel.clone(),
        settings.identity.namespace(),
        &settings.pod_name,
        settings.identity.trust_domain(),
        metrics.clone(),
    );
    let authz = Authz::new(
        policy_watch.clone(),
        metrics.clone(),
        settings.discovery_timeout,
    );
    let discovery = Discovery::new(
        discovery_channel,
        &settings.identity,
        settings.discovery_timeout,
        metrics.clone(),
    );
    admin.config.attach(discovery.clone(), policy_watch);
    let opaque_tls = TlsConnector::from(client_config(
        &anchors,
        Some(store.clone()),
        &[ALPN_OPAQUE],
    )?);
    let h2_tls = TlsConnector::from(client_config(&anchors, Some(store.clone()), &[ALPN_H2])?);
    let http = Arc::new(HttpContext {
        clients: Clients::new(h2_tls.clone(), settings.connect_timeout),
        metrics: metrics.clone(),
        opaque_tls: opaque_tls.clone(),
        connect_timeout: settings.connect_timeout,
    });
    let outbound = Arc::new(Outbound {
        discovery,
        mesh_tls: opaque_tls,
        metrics: metrics.clone(),
        connect_timeout: settings.connect_timeout,
        detect_timeout: settings.inbound_detect_timeout,
        http,
    });
    let inbound = Arc::new(Inbound {
        // The client proxy chooses: one opaque TCP stream, or multiplexed HTTP/2.
        tls: TlsAcceptor::from(server_config(
            &anchors,
            store.clone(),
            ClientAuth::Required,
            &[ALPN_H2, ALPN_OPAQUE],
        )?),
        server_name: settings.identity.tls_server_name(),
        metrics: metrics.clone(),
        detect_timeout: settings.inbound_detect_timeout,
        connect_timeout: settings.connect_timeout,
        app_clients: Arc::new(Clients::new(h2_tls, settings.connect_timeout)),
        authz,
    });
    let outbound_listener = TcpListener::bind(settings.outbound_addr)
        .await
        .with_context(|| format!("binding outbound {}", settings.outbound_addr))?;
    let inbound_listener = TcpListener::bind(settings.inbound_addr)
        .await
        .with_context(|| format!("binding inbound {}", settings.inbound_addr))?;
    tokio::spawn(outbound.serve(outbound_listener, drain.clone()));
    tokio::spawn(inbound.serve(inbound_listener, drain.clone()));
    admin.listening.store(true, Ordering::Release);
    tracing::info!(outbound = %settings.outbound_addr, inbound = %settings.inbound_addr, admin = %settings.admin_addr, "ready");

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = drain.signaled() => tracing::info!("shutdown requested: draining"),
    }
    drain.start();
    let left = drain.wait_idle(settings.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(
            open_connections = left,
            grace_secs = settings.shutdown_grace.as_secs(),
            "grace period over; closing connections"
        );
    } else {
        tracing::info!("drained");
    }
    Ok(())
}

/// SIGTERM (what Kubernetes sends) and SIGINT (a terminal's Ctrl-C), as one stream.
fn terminate_signal() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

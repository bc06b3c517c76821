//! The proxy's run-time configuration: one typed field per `WEFT_*` environment variable.
//! clap turns the table below into parsing, defaults and `weft-proxy --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use weft_certs::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("WEFT_{0} is required")]
    Missing(&'static str),
    #[error("set exactly one of WEFT_TRUST_ANCHORS (a PEM file) and WEFT_TRUST_ANCHORS_PEM (the PEM text); {0}")]
    TrustAnchors(&'static str),
    #[error("this proxy's identity (WEFT_TRUST_DOMAIN/WEFT_NAMESPACE/WEFT_SERVICE_ACCOUNT) is invalid: {0}")]
    Identity(#[from] weft_certs::Error),
}

/// Everything `weft-proxy` (run mode) reads from its environment.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyConfig {
    /// host:port of the control plane's gRPC server.
    #[arg(long, env = "WEFT_CONTROL_ADDR")]
    pub control_addr: Option<String>,
    /// SPIFFE id the control plane must present.
    #[arg(
        long,
        env = "WEFT_CONTROL_IDENTITY",
        default_value = "spiffe://cluster.local/ns/weft/sa/weft-control"
    )]
    pub control_identity: SpiffeId,
    /// PEM bundle of trust anchors (several at once during rotation).
    #[arg(long, env = "WEFT_TRUST_ANCHORS")]
    pub trust_anchors: Option<PathBuf>,
    /// The trust anchors' PEM text itself (what the injector sets); instead of WEFT_TRUST_ANCHORS.
    #[arg(long, env = "WEFT_TRUST_ANCHORS_PEM", hide_env_values = true)]
    pub trust_anchors_pem: Option<String>,
    /// File holding the token that proves this workload's identity.
    #[arg(long, env = "WEFT_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<PathBuf>,
    /// Namespace of this pod.
    #[arg(long, env = "WEFT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Service account of this pod.
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// Name of this pod: the control plane finds its inbound policy by it.
    #[arg(long, env = "WEFT_POD_NAME", default_value = "")]
    pub pod_name: String,
    /// Trust domain of identities.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Where the app's redirected outbound TCP arrives.
    #[arg(long, env = "WEFT_OUTBOUND_ADDR", default_value = "127.0.0.1:7140")]
    pub outbound_addr: SocketAddr,
    /// Where the pod's redirected inbound TCP arrives.
    #[arg(long, env = "WEFT_INBOUND_ADDR", default_value = "0.0.0.0:7143")]
    pub inbound_addr: SocketAddr,
    /// Admin server: /live, /ready, /metrics, POST /shutdown (loopback only).
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "0.0.0.0:7191")]
    pub admin_addr: SocketAddr,
    /// Seconds to drain open connections after SIGTERM.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// How long the inbound side waits for a client's first bytes before treating the
    /// connection as opaque plaintext (server-speaks-first protocols).
    #[arg(long, env = "WEFT_INBOUND_DETECT_TIMEOUT_MS", default_value_t = 1000)]
    pub inbound_detect_timeout_ms: u64,
    /// How long a new outbound connection waits for the control plane's answer.
    #[arg(long, env = "WEFT_DISCOVERY_TIMEOUT_SECS", default_value_t = 10)]
    pub discovery_timeout_secs: u64,
    /// Timeout for connecting to an endpoint or the local app.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT_MS", default_value_t = 3000)]
    pub connect_timeout_ms: u64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
    /// Runtime threads; 1 (the default) runs the proxy on a single-threaded runtime.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// host:port of an OTLP/gRPC trace collector (plaintext); unset: no tracing.
    #[arg(long, env = "WEFT_TRACE_COLLECTOR")]
    pub trace_collector: Option<String>,
    /// Share of new traces sampled; an incoming sampled/not-sampled decision is honoured.
    #[arg(long, env = "WEFT_TRACE_SAMPLING_RATIO", default_value_t = 0.01, value_parser = crate::trace::parse_ratio)]
    pub trace_sampling_ratio: f64,
    /// Finished spans queued for export; beyond it spans are dropped.
    #[arg(long, env = "WEFT_TRACE_QUEUE", default_value_t = 2048)]
    pub trace_queue: usize,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// The checked form of [`ProxyConfig`]: required fields present, identity valid.
#[derive(Debug, Clone)]
pub struct Settings {
    pub control_addr: String,
    pub control_identity: SpiffeId,
    pub trust_anchors: TrustAnchorsSource,
    pub identity_token_file: PathBuf,
    pub identity: SpiffeId,
    pub pod_name: String,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown_grace: Duration,
    pub inbound_detect_timeout: Duration,
    pub discovery_timeout: Duration,
    pub connect_timeout: Duration,
    pub trace: Option<crate::trace::TraceConfig>,
}

impl ProxyConfig {
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let control_addr = self
            .control_addr
            .clone()
            .ok_or(ConfigError::Missing("CONTROL_ADDR"))?;
        let trust_anchors = match (&self.trust_anchors, &self.trust_anchors_pem) {
            (Some(path), None) => TrustAnchorsSource::File(path.clone()),
            (None, Some(pem)) => TrustAnchorsSource::Pem(pem.clone()),
            (None, None) => return Err(ConfigError::TrustAnchors("neither is set")),
            (Some(_), Some(_)) => return Err(ConfigError::TrustAnchors("both are set")),
        };
        let identity_token_file = self
            .identity_token_file
            .clone()
            .ok_or(ConfigError::Missing("IDENTITY_TOKEN_FILE"))?;
        let namespace = self
            .namespace
            .as_deref()
            .ok_or(ConfigError::Missing("NAMESPACE"))?;
        let identity = SpiffeId::new(&self.trust_domain, namespace, &self.service_account)?;
        Ok(Settings {
            control_addr,
            control_identity: self.control_identity.clone(),
            trust_anchors,
            identity_token_file,
            identity,
            pod_name: self.pod_name.clone(),
            outbound_addr: self.outbound_addr,
            inbound_addr: self.inbound_addr,
            admin_addr: self.admin_addr,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            inbound_detect_timeout: Duration::from_millis(self.inbound_detect_timeout_ms),
            discovery_timeout: Duration::from_secs(self.discovery_timeout_secs),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            trace: self
                .trace_collector
                .clone()
                .filter(|c| !c.is_empty())
                .map(|collector| crate::trace::TraceConfig {
                    collector,
                    sampling_ratio: self.trace_sampling_ratio,
                    queue: self.trace_queue,
                }),
        })
    }
}

/// Where the trust anchors come from: a file, or inline PEM text (`WEFT_TRUST_ANCHORS_PEM`,
/// because the injector cannot mount a ConfigMap from the control plane's namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustAnchorsSource {
    File(PathBuf),
    Pem(String),
}

impl TrustAnchorsSource {
    /// The PEM bytes.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            TrustAnchorsSource::File(path) => std::fs::read(path),
            TrustAnchorsSource::Pem(pem) => Ok(pem.as_bytes().to_vec()),
        }
    }

    /// For error messages.
    pub fn describe(&self) -> String {
        match self {
            TrustAnchorsSource::File(path) => path.display().to_string(),
            TrustAnchorsSource::Pem(_) => "from WEFT_TRUST_ANCHORS_PEM".to_string(),
        }
    }
}

#[cfg(test)]
mod trust_anchor_tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: ProxyConfig,
    }

    fn settings(args: &[&str]) -> Result<Settings, ConfigError> {
        let base = [
            "weft-proxy",
            "--control-addr=127.0.0.1:7150",
            "--identity-token-file=/tmp/token",
            "--namespace=shop",
        ];
        let all: Vec<&str> = base.iter().chain(args).copied().collect();
        Cli::try_parse_from(all).unwrap().config.settings()
    }

    #[test]
    fn exactly_one_trust_anchor_source() {
        let file = settings(&["--trust-anchors=/etc/anchors.pem"]).unwrap();
        assert_eq!(
            file.trust_anchors,
            TrustAnchorsSource::File("/etc/anchors.pem".into())
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        // As an argument the PEM must be attached with `=` (it starts with dashes); the
        // injector sets the environment variable, which has no such problem.
        let flag = format!("--trust-anchors-pem={pem}");
        let inline = settings(&[&flag]).unwrap();
        assert_eq!(inline.trust_anchors.read().unwrap(), pem.as_bytes());

        let neither = settings(&[]).unwrap_err().to_string();
        assert!(neither.contains("WEFT_TRUST_ANCHORS_PEM"), "{neither}");
        assert!(neither.contains("neither is set"), "{neither}");
        let both = settings(&["--trust-anchors=/etc/a.pem", &flag])
            .unwrap_err()
            .to_string();
        assert!(both.contains("both are set"), "{both}");
    }
}

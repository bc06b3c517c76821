//! The proxy injector: decides whether a pod joins the mesh and computes the patch that
//! adds the init step and the proxy. Shared by the admission webhook and `weft inject`.

pub mod admission;
pub mod annotations;
pub mod decision;
pub mod manifest;
pub mod patch;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use annotations::{AnnotationErrors, ProxyOverrides};
pub use decision::{decide, BadInjectValue, Decision, NamespaceMeta, NamespaceView, SkipReason};
pub use patch::{injection_patch, Layout, PatchError};

/// Pod or namespace annotation (or namespace label): `enabled` / `disabled`.
pub const INJECT_ANNOTATION: &str = "weft.io/inject";
/// Set on every pod the injector changed.
pub const INJECTED_ANNOTATION: &str = "weft.io/injected";
pub const PROXY_CONTAINER: &str = "weft-proxy";
pub const INIT_CONTAINER: &str = "weft-init";
pub const PROXY_UID: u16 = 2170;
pub const INBOUND_PORT: u16 = 7143;
pub const OUTBOUND_PORT: u16 = 7140;
pub const ADMIN_PORT: u16 = 7191;
pub const ADMIN_PORT_NAME: &str = "weft-admin";
pub const IDENTITY_VOLUME: &str = "weft-identity-token";
pub const IDENTITY_TOKEN_DIR: &str = "/var/run/secrets/weft.io/identity";
pub const IDENTITY_TOKEN_FILE: &str = "/var/run/secrets/weft.io/identity/token";
pub const IDENTITY_AUDIENCE: &str = "identity.weft.io";
/// The proxy image when `--proxy-image` is not given.
pub const DEFAULT_PROXY_IMAGE: &str =
    concat!("ghcr.io/weft-mesh/weft-proxy:v", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The pod asked for something invalid: the webhook denies it with this message.
    #[error(transparent)]
    Annotations(#[from] AnnotationErrors),
    #[error(transparent)]
    InjectValue(#[from] BadInjectValue),
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error("reading trust anchors {path}: {source}")]
    ReadAnchors {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trust anchors {0} hold no PEM certificate")]
    NoAnchors(PathBuf),
}

impl InjectError {
    /// Whether the pod itself is at fault (deny it) rather than the injector.
    pub fn is_pod_error(&self) -> bool {
        matches!(
            self,
            InjectError::Annotations(_) | InjectError::InjectValue(_)
        )
    }
}

/// What every injected proxy is told about the mesh.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub proxy_image: String,
    pub control_addr: String,
    /// Namespace of the control plane: never injected, and part of its SPIFFE id.
    pub control_namespace: String,
    pub trust_domain: String,
    /// PEM text of the trust anchors, passed inline as `WEFT_TRUST_ANCHORS_PEM` because a
    /// ConfigMap in the control plane's namespace cannot be mounted into other namespaces.
    pub trust_anchors_pem: String,
}

/// The flags shared by `weft-injector` and `weft inject`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Image of the proxy (also runs `weft-proxy init`); must have `weft-proxy` on PATH.
    #[arg(long, env = "WEFT_INJECTOR_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// host:port of the control plane's gRPC server, as proxies reach it.
    #[arg(
        long,
        env = "WEFT_INJECTOR_CONTROL_ADDR",
        default_value = "weft-control.weft.svc.cluster.local:7150"
    )]
    pub control_addr: String,
    /// Namespace of the control plane (never injected; part of its identity).
    #[arg(long, env = "WEFT_INJECTOR_CONTROL_NAMESPACE", default_value = "weft")]
    pub control_namespace: String,
    /// Trust domain of workload identities.
    #[arg(
        long,
        env = "WEFT_INJECTOR_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,
    /// PEM file of the trust anchors, copied into each proxy's WEFT_TRUST_ANCHORS_PEM.
    #[arg(long, env = "WEFT_INJECTOR_TRUST_ANCHORS", value_name = "PEM_FILE")]
    pub trust_anchors: PathBuf,
}

impl ProxyArgs {
    pub fn settings(&self) -> Result<ProxySettings, InjectError> {
        Ok(ProxySettings {
            proxy_image: self.proxy_image.clone(),
            control_addr: self.control_addr.clone(),
            control_namespace: self.control_namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            trust_anchors_pem: read_anchors(&self.trust_anchors)?,
        })
    }
}

/// Reads a trust-anchor bundle, refusing files with no certificate in them (a wrong path
/// would otherwise give every proxy an empty trust store).
pub fn read_anchors(path: &Path) -> Result<String, InjectError> {
    let text = std::fs::read_to_string(path).map_err(|source| InjectError::ReadAnchors {
        path: path.to_path_buf(),
        source,
    })?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(InjectError::NoAnchors(path.to_path_buf()));
    }
    Ok(text)
}

/// What to do with one pod.
#[derive(Debug)]
pub enum Outcome {
    Skip(SkipReason),
    Inject {
        patch: json_patch::Patch,
        layout: Layout,
    },
}

/// Decides and, when injecting, validates the pod's annotations and builds the patch.
/// `native_by_default` is whether the cluster supports native sidecars (≥ 1.29).
pub fn plan(
    pod: &Value,
    namespace: NamespaceView<'_>,
    settings: &ProxySettings,
    native_by_default: bool,
) -> Result<Outcome, InjectError> {
    match decide(pod, namespace, &settings.control_namespace)? {
        Decision::Skip(reason) => Ok(Outcome::Skip(reason)),
        Decision::Inject => {
            let overrides = ProxyOverrides::from_annotations(&annotations::annotations_of(pod))?;
            let layout = Layout::choose(&overrides, native_by_default);
            let patch = injection_patch(pod, settings, &overrides, layout)?;
            Ok(Outcome::Inject { patch, layout })
        }
    }
}

/// Whether a Kubernetes version (`major`, `minor` as the API server's `/version` reports
/// them, e.g. `"1"`, `"29+"`) has native sidecars (restartable init containers, 1.29+).
pub fn supports_native_sidecars(major: &str, minor: &str) -> Option<bool> {
    let digits = |s: &str| -> Option<u32> {
        let d: String = s.trim().chars().take_while(char::is_ascii_digit).collect();
        d.parse().ok()
    };
    let (major, minor) = (digits(major)?, digits(minor)?);
    Some(major > 1 || (major == 1 && minor >= 29))
}

/// Parses `--kubernetes-version` (`1.28`, `v1.30.2`).
pub fn parse_kubernetes_version(text: &str) -> Option<bool> {
    let text = text.trim().trim_start_matches('v');
    let mut parts = text.split('.');
    let major = parts.next()?;
    let minor = parts.next()?;
    supports_native_sidecars(major, minor)
}

#[cfg(test)]
mod tests;

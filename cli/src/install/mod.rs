//! `weft install`: renders every object of a Kubernetes install (CRDs, RBAC, identity,
//! control plane, injector + webhook, dashboards, scrape config) as multi-document YAML on
//! stdout, for `kubectl apply -f -`. Keys are generated in memory and only ever written to
//! stdout, inside the Secrets they belong to.

pub mod pki;
pub mod render;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};

use render::{Crds, FailurePolicy, Material, Settings};

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Namespace of the control plane and injector.
    #[arg(long, default_value = "weft")]
    pub namespace: String,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Image registry: images are <registry>/weft-control, weft-injector, weft-proxy.
    #[arg(long, default_value = "ghcr.io/weft-mesh")]
    pub registry: String,
    /// Image tag.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub version: String,
    /// Use an existing identity instead of generating one: trust-anchors.pem, issuer.pem,
    /// issuer-key.pem (as `weft identity --out` writes them), or ca.crt, tls.crt, tls.key (a
    /// cert-manager Certificate's secret; the key must be PKCS#8).
    #[arg(long)]
    pub identity_dir: Option<PathBuf>,
    /// What the API server does with a pod when the injector cannot be reached.
    #[arg(long, value_enum, default_value_t = FailurePolicy::Fail)]
    pub webhook_failure_policy: FailurePolicy,
    /// Also render a prometheus-operator PodMonitor (needs the monitoring.coreos.com CRDs).
    #[arg(long)]
    pub pod_monitor: bool,
    /// Render only the CustomResourceDefinitions.
    #[arg(long, conflicts_with = "skip_crds")]
    pub crds_only: bool,
    /// Leave the CustomResourceDefinitions out.
    #[arg(long)]
    pub skip_crds: bool,
}

pub fn run(args: &InstallArgs) -> anyhow::Result<()> {
    let yaml = render_yaml(args)?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(yaml.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    Ok(())
}

pub fn settings(args: &InstallArgs) -> anyhow::Result<Settings> {
    if !is_dns_label(&args.namespace) {
        bail!(
            "--namespace {:?} is not a valid namespace name (lowercase letters, digits and '-', at most 63)",
            args.namespace
        );
    }
    // The control plane's own identity must be expressible in this trust domain.
    weft_certs::SpiffeId::new(&args.trust_domain, &args.namespace, render::CONTROL)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    if args.registry.is_empty() || args.version.is_empty() {
        bail!("--registry and --version must not be empty");
    }
    Ok(Settings {
        namespace: args.namespace.clone(),
        trust_domain: args.trust_domain.clone(),
        registry: args.registry.trim_end_matches('/').to_string(),
        version: args.version.clone(),
        failure_policy: args.webhook_failure_policy,
        pod_monitor: args.pod_monitor,
        crds: if args.crds_only {
            Crds::Only
        } else if args.skip_crds {
            Crds::Skip
        } else {
            Crds::Include
        },
    })
}

pub fn render_yaml(args: &InstallArgs) -> anyhow::Result<String> {
    let settings = settings(args)?;
    let identity = match &args.identity_dir {
        Some(dir) => pki::read_identity_dir(dir)
            .with_context(|| format!("--identity-dir {}", dir.display()))?,
        None => pki::generate_identity(&settings.trust_domain)?,
    };
    let webhook = pki::generate_webhook_tls(
        &render::injector_dns_names(&settings.namespace),
        pki::WEBHOOK_CERT_DAYS,
    )?;
    let objects = render::render(&settings, &Material { identity, webhook })
        .context("rendering the chart's CRDs")?;
    Ok(render::to_yaml(&objects)?)
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests;

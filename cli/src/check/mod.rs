//! `weft check`: inspects a Kubernetes install through the API server (KUBECONFIG) and
//! prints a checklist — API server, CRDs, namespace, control plane and injector, identity
//! material, the admission webhook and whether the API server can reach it — with an
//! explanation for every failure. Any failure makes the command exit 1.

mod probe;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use crate::install::pki::{self, CertInfo};
use crate::install::render::{
    CONTROL, CRD_NAMES, IDENTITY_SECRET, INJECTOR, INJECTOR_TLS_SECRET, TRUST_ANCHORS_CONFIGMAP,
    WEBHOOK_CONFIG, WEBHOOK_OPT_OUT_LABEL,
};

/// Certificates closer than this to expiry are reported as a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Namespace weft was installed into.
    #[arg(long, short = 'n', default_value = "weft")]
    pub namespace: String,
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    /// $KUBECONFIG is left to kube's lookup, which also merges a `:`-separated list.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not a check: something the operator should know.
    Note,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub check: String,
    pub status: Status,
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Default)]
struct Report {
    results: Vec<CheckResult>,
}

impl Report {
    fn push(&mut self, check: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.results.push(CheckResult {
            check: check.into(),
            status,
            detail: detail.into(),
            hint: None,
        });
    }

    fn ok(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.push(check, Status::Ok, detail);
    }

    fn fail(
        &mut self,
        check: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(check, Status::Fail, detail);
        self.hint(hint);
    }

    fn warn(
        &mut self,
        check: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(check, Status::Warn, detail);
        self.hint(hint);
    }

    fn hint(&mut self, hint: impl Into<String>) {
        if let Some(last) = self.results.last_mut() {
            let hint = hint.into();
            if !hint.is_empty() {
                last.hint = Some(hint);
            }
        }
    }

    fn failures(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.status == Status::Fail)
            .count()
    }
}

pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(check(args));
    match args.output {
        Output::Text => print!("{}", render_text(&report.results)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report.results)?),
    }
    let failures = report.failures();
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    Ok(())
}

fn render_text(results: &[CheckResult]) -> String {
    let mut out = String::new();
    for r in results {
        let mark = match r.status {
            Status::Ok => "✔",
            Status::Warn => "‼",
            Status::Fail => "✘",
            Status::Note => "ℹ",
        };
        out.push_str(&format!("{mark} {}: {}\n", r.check, r.detail));
        if let Some(hint) = &r.hint {
            for line in hint.lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    out
}

async fn client(args: &CheckArgs) -> anyhow::Result<Client> {
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(15));
    Ok(Client::try_from(config)?)
}

async fn check(args: &CheckArgs) -> Report {
    let mut report = Report::default();
    let ns = args.namespace.as_str();
    let client = match client(args).await {
        Ok(client) => client,
        Err(e) => {
            report.fail(
                "API server reachable",
                format!("no usable kubeconfig: {e:#}"),
                "set KUBECONFIG or pass --kubeconfig",
            );
            return report;
        }
    };
    match client.apiserver_version().await {
        Ok(info) => report.ok(
            "API server reachable",
            format!("Kubernetes {}", info.git_version),
        ),
        Err(e) => {
            report.fail(
                "API server reachable",
                format!("{e}"),
                "nothing else can be checked; is the kubeconfig's cluster up and its credentials valid?",
            );
            return report;
        }
    }

    check_crds(&client, &mut report).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get_opt(ns).await {
        Ok(Some(_)) => report.ok(format!("namespace {ns}"), "exists"),
        Ok(None) => report.fail(
            format!("namespace {ns}"),
            "not found",
            "install weft: weft install | kubectl apply -f - (or pass the namespace you installed into with --namespace)",
        ),
        Err(e) => report.fail(format!("namespace {ns}"), e.to_string(), ""),
    }
    for name in [CONTROL, INJECTOR] {
        check_deployment(&client, ns, name, &mut report).await;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    for name in [CONTROL, INJECTOR] {
        match services.get_opt(name).await {
            Ok(Some(_)) => report.ok(format!("Service {name}"), "exists"),
            Ok(None) => report.fail(
                format!("Service {name}"),
                format!("Service {ns}/{name} not found"),
                "re-apply the install: weft install --skip-crds | kubectl apply -f -",
            ),
            Err(e) => report.fail(format!("Service {name}"), e.to_string(), ""),
        }
    }
    check_identity(&client, ns, &mut report).await;
    check_webhook(&client, &mut report).await;
    report
}

async fn check_crds(client: &Client, report: &mut Report) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in CRD_NAMES {
        let check = format!("CRD {name}");
        match crds.get_opt(name).await {
            Ok(Some(crd)) => {
                let established = crd
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|conditions| {
                        conditions
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    report.ok(check, "present and Established");
                } else {
                    report.fail(
                        check,
                        "present but not Established",
                        format!(
                            "the API server has not accepted it yet: kubectl describe crd {name}"
                        ),
                    );
                }
            }
            Ok(None) => report.fail(
                check,
                "not installed",
                "install the CRDs: weft install --crds-only | kubectl apply -f -",
            ),
            Err(e) => report.fail(check, e.to_string(), ""),
        }
    }
}

async fn check_deployment(client: &Client, ns: &str, name: &str, report: &mut Report) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let check = format!("Deployment {name}");
    match deployments.get_opt(name).await {
        Ok(Some(deployment)) => {
            let status = deployment.status.unwrap_or_default();
            let available = status.available_replicas.unwrap_or(0);
            let wanted = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
            if available >= 1 {
                report.ok(
                    check,
                    format!("{available} of {wanted} replica(s) available"),
                );
            } else {
                let role = if name == CONTROL {
                    "proxies cannot get certificates or routes until it is"
                } else {
                    "pods in namespaces the webhook covers cannot be created until it is (failurePolicy Fail)"
                };
                report.fail(
                    check,
                    format!("exists but not available (0 of {wanted} replicas available)"),
                    format!(
                        "{role}; see kubectl -n {ns} describe deployment {name} and its pods' logs"
                    ),
                );
            }
        }
        Ok(None) => report.fail(
            check,
            format!("Deployment {ns}/{name} not found"),
            "re-apply the install: weft install --skip-crds | kubectl apply -f -",
        ),
        Err(e) => report.fail(check, e.to_string(), ""),
    }
}

/// Judges one certificate's remaining lifetime.
fn expiry(report: &mut Report, what: &str, info: &CertInfo, now: SystemTime) {
    let left = info.seconds_left(now);
    let check = format!("{what} expiry");
    let days = left / 86_400;
    if left <= 0 {
        report.fail(
            check,
            format!("{} expired {} day(s) ago", info.subject, -days),
            "proxies cannot get certificates: rotate it (weft identity --out <dir>, then weft install --identity-dir <dir> | kubectl apply -f -)",
        );
    } else if left < EXPIRY_WARNING.as_secs() as i64 {
        report.warn(
            check,
            format!("{} expires in {days} day(s)", info.subject),
            "rotate it before it expires (weft identity --out <dir>; weft install --identity-dir <dir>)",
        );
    } else {
        report.ok(check, format!("valid for {days} more day(s)"));
    }
}

async fn check_identity(client: &Client, ns: &str, report: &mut Report) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let issuer = match secrets.get_opt(IDENTITY_SECRET).await {
        Ok(Some(secret)) => {
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key)
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
            };
            match (field("issuer.pem"), field("issuer-key.pem")) {
                (Some(cert), Some(key)) => {
                    report.ok(
                        format!("Secret {IDENTITY_SECRET}"),
                        "has issuer.pem and issuer-key.pem",
                    );
                    Some((cert, key))
                }
                _ => {
                    report.fail(
                        format!("Secret {IDENTITY_SECRET}"),
                        "lacks issuer.pem or issuer-key.pem (as text)",
                        "re-apply the install with a valid identity (weft install --identity-dir <dir>)",
                    );
                    None
                }
            }
        }
        Ok(None) => {
            report.fail(
                format!("Secret {IDENTITY_SECRET}"),
                format!("Secret {ns}/{IDENTITY_SECRET} not found"),
                "the control plane cannot start without its issuer: re-apply the install",
            );
            None
        }
        Err(e) => {
            report.fail(format!("Secret {IDENTITY_SECRET}"), e.to_string(), "");
            None
        }
    };
    let anchors = match configmaps.get_opt(TRUST_ANCHORS_CONFIGMAP).await {
        Ok(Some(cm)) => match cm.data.unwrap_or_default().remove("trust-anchors.pem") {
            Some(pem) => match weft_certs::TrustAnchors::from_pem(pem.as_bytes()) {
                Ok(parsed) => {
                    report.ok(
                        format!("ConfigMap {TRUST_ANCHORS_CONFIGMAP}"),
                        format!("{} trust anchor(s)", parsed.len()),
                    );
                    Some(pem)
                }
                Err(e) => {
                    report.fail(
                        format!("ConfigMap {TRUST_ANCHORS_CONFIGMAP}"),
                        format!("trust-anchors.pem does not parse: {e}"),
                        "re-apply the install with a valid identity",
                    );
                    None
                }
            },
            None => {
                report.fail(
                    format!("ConfigMap {TRUST_ANCHORS_CONFIGMAP}"),
                    "has no trust-anchors.pem",
                    "re-apply the install",
                );
                None
            }
        },
        Ok(None) => {
            report.fail(
                format!("ConfigMap {TRUST_ANCHORS_CONFIGMAP}"),
                format!("ConfigMap {ns}/{TRUST_ANCHORS_CONFIGMAP} not found"),
                "proxies and the control plane need the trust anchors: re-apply the install",
            );
            None
        }
        Err(e) => {
            report.fail(
                format!("ConfigMap {TRUST_ANCHORS_CONFIGMAP}"),
                e.to_string(),
                "",
            );
            None
        }
    };
    let (Some((cert, key)), Some(anchors)) = (issuer, anchors) else {
        return;
    };
    let now = SystemTime::now();
    match pki::verify_issuer_chain(&cert, &anchors) {
        Ok(chain) => {
            report.ok(
                "issuer chains to a trust anchor",
                format!("{} → {}", chain.issuer.subject, chain.anchor.subject),
            );
            // The key must belong to the certificate; expiry is judged on its own below.
            if chain.issuer.seconds_left(now) > 0 {
                match weft_certs::Issuer::from_pem(&cert, &key) {
                    Ok(_) => report.ok("issuer key", "matches the issuer certificate"),
                    Err(e) => report.fail(
                        "issuer key",
                        e.to_string(),
                        "the control plane will refuse this issuer: re-apply the install with a matching key",
                    ),
                }
            }
            expiry(report, "issuer certificate", &chain.issuer, now);
            expiry(report, "trust anchor", &chain.anchor, now);
        }
        Err(e) => report.fail(
            "issuer chains to a trust anchor",
            e.to_string(),
            "proxies would reject every certificate the control plane issues: install an issuer signed by one of the trust anchors",
        ),
    }
}

async fn check_webhook(client: &Client, report: &mut Report) {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let check = format!("MutatingWebhookConfiguration {WEBHOOK_CONFIG}");
    let config = match configs.get_opt(WEBHOOK_CONFIG).await {
        Ok(Some(config)) => config,
        Ok(None) => {
            report.fail(
                check,
                "not found",
                "pods are not injected: re-apply the install",
            );
            return;
        }
        Err(e) => {
            report.fail(check, e.to_string(), "");
            return;
        }
    };
    let Some(webhook) = config.webhooks.as_ref().and_then(|w| w.first()) else {
        report.fail(check, "has no webhooks", "re-apply the install");
        return;
    };
    report.ok(check, format!("webhook {}", webhook.name));

    let ca_pem = webhook
        .client_config
        .ca_bundle
        .as_ref()
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .unwrap_or_default();
    match pki::cert_info(&ca_pem, "caBundle") {
        Ok(info) => {
            report.ok("webhook caBundle", info.subject.clone());
            expiry(report, "webhook CA", &info, SystemTime::now());
        }
        Err(e) => report.fail(
            "webhook caBundle",
            if ca_pem.is_empty() {
                "missing".to_string()
            } else {
                e.to_string()
            },
            "the API server cannot verify the injector's certificate: re-apply the install",
        ),
    }

    let client_config = &webhook.client_config;
    if let Some(service_ref) = &client_config.service {
        let svc_ns = service_ref.namespace.as_str();
        let svc_name = service_ref.name.as_str();
        let port = service_ref.port.unwrap_or(443);
        let services: Api<Service> = Api::namespaced(client.clone(), svc_ns);
        match services.get_opt(svc_name).await {
            Ok(Some(service)) => {
                let has_port = service
                    .spec
                    .and_then(|s| s.ports)
                    .unwrap_or_default()
                    .iter()
                    .any(|p| p.port == port);
                if has_port {
                    report.ok(
                        "webhook service",
                        format!("Service {svc_ns}/{svc_name} port {port}"),
                    );
                } else {
                    report.fail(
                        "webhook service",
                        format!("Service {svc_ns}/{svc_name} has no port {port}"),
                        "re-apply the install",
                    );
                }
            }
            Ok(None) => report.fail(
                "webhook service",
                format!("the webhook points at Service {svc_ns}/{svc_name}, which is missing"),
                "the API server cannot call the injector, so pod creation fails in every namespace the webhook covers (failurePolicy Fail): re-apply the install",
            ),
            Err(e) => report.fail("webhook service", e.to_string(), ""),
        }
        if !ca_pem.is_empty() {
            check_serving_cert(client, svc_ns, svc_name, &ca_pem, report).await;
        }
        check_endpoints(client, svc_ns, svc_name, report).await;
    } else if let Some(url) = &client_config.url {
        report.ok("webhook service", format!("URL {url}"));
        match probe::tls_probe(url, &ca_pem, Duration::from_secs(5)) {
            Ok(()) => report.ok(
                "webhook reachable",
                format!("TLS handshake with {url} verified against the caBundle"),
            ),
            Err(e) => report.fail(
                "webhook reachable",
                format!("{url}: {e}"),
                "the API server cannot call the injector: is it running, and does its certificate match the caBundle?",
            ),
        }
    } else {
        report.fail(
            "webhook service",
            "clientConfig has neither service nor url",
            "re-apply the install",
        );
    }
    scope_note(webhook, report);
}

async fn check_serving_cert(
    client: &Client,
    ns: &str,
    service: &str,
    ca_pem: &str,
    report: &mut Report,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    match secrets.get_opt(INJECTOR_TLS_SECRET).await {
        Ok(Some(secret)) => {
            let data = secret.data.unwrap_or_default();
            let cert = data
                .get("tls.crt")
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .unwrap_or_default();
            // The API server dials <service>.<namespace>.svc and checks that name.
            let dialled = format!("{service}.{ns}.svc");
            let names = pki::dns_names(&cert).unwrap_or_default();
            match pki::verify_signed_by(&cert, ca_pem) {
                Ok(()) if !names.contains(&dialled) => report.fail(
                    format!("Secret {INJECTOR_TLS_SECRET}"),
                    format!("serving certificate names {names:?}, not {dialled}"),
                    "the API server will reject the injector's TLS: re-apply the install",
                ),
                Ok(()) => {
                    report.ok(
                        format!("Secret {INJECTOR_TLS_SECRET}"),
                        format!("serving certificate for {dialled} is signed by the webhook's caBundle"),
                    );
                    if let Ok(info) = pki::cert_info(&cert, "serving certificate") {
                        expiry(report, "webhook serving certificate", &info, SystemTime::now());
                    }
                }
                Err(e) => report.fail(
                    format!("Secret {INJECTOR_TLS_SECRET}"),
                    e.to_string(),
                    "the API server will reject the injector's TLS: re-apply the install (it renders both together)",
                ),
            }
        }
        Ok(None) => report.fail(
            format!("Secret {INJECTOR_TLS_SECRET}"),
            format!("Secret {ns}/{INJECTOR_TLS_SECRET} not found"),
            "the injector cannot serve TLS: re-apply the install",
        ),
        Err(e) => report.fail(format!("Secret {INJECTOR_TLS_SECRET}"), e.to_string(), ""),
    }
}

/// Ready addresses behind the webhook Service, as the API server's service resolver
/// would find them.
async fn check_endpoints(client: &Client, ns: &str, service: &str, report: &mut Report) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    match slices.list(&params).await {
        Ok(list) => {
            let ready = ready_addresses(&list.items);
            if ready.is_empty() {
                report.fail(
                    "webhook reachable",
                    format!("Service {ns}/{service} has no ready endpoints"),
                    format!("no injector pod is ready: kubectl -n {ns} get pods -l app.kubernetes.io/name={INJECTOR}"),
                );
            } else {
                report.ok(
                    "webhook reachable",
                    format!("{} ready endpoint(s): {}", ready.len(), ready.join(", ")),
                );
            }
        }
        Err(e) => report.fail("webhook reachable", e.to_string(), ""),
    }
}

fn ready_addresses(slices: &[EndpointSlice]) -> Vec<String> {
    slices
        .iter()
        .flat_map(|slice| slice.endpoints.iter())
        // An unset `ready` means unknown, which consumers are told to treat as ready.
        .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|ep| ep.addresses.iter().cloned())
        .collect()
}

fn scope_note(webhook: &MutatingWebhook, report: &mut Report) {
    let policy = webhook.failure_policy.as_deref().unwrap_or("Fail");
    let excluded: Vec<String> = webhook
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .filter(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
        .flat_map(|e| e.values.clone().unwrap_or_default())
        .collect();
    let opt_out = format!("{WEBHOOK_OPT_OUT_LABEL}=disabled");
    let detail = if policy == "Fail" {
        format!(
            "failurePolicy Fail: the webhook sees every pod created outside the namespaces [{}] (annotations cannot be selected on), so while the injector is unavailable pod creation is blocked in all of them, not only in meshed ones",
            excluded.join(", ")
        )
    } else {
        format!(
            "failurePolicy {policy}: while the injector is unavailable pods are created without a proxy (namespaces excluded: [{}])",
            excluded.join(", ")
        )
    };
    report.push("webhook failure scope", Status::Note, detail);
    report.hint(if policy == "Fail" {
        format!("label a namespace or pod {opt_out} to opt it out, or install with --webhook-failure-policy Ignore")
    } else {
        "meshed pods created during an outage run unmeshed until they are recreated".to_string()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_or_unknown_endpoints_count() {
        let slice = EndpointSlice {
            endpoints: vec![
                endpoint("10.0.0.1", Some(true)),
                endpoint("10.0.0.2", Some(false)),
                endpoint("10.0.0.3", None),
            ],
            ..Default::default()
        };
        assert_eq!(ready_addresses(&[slice]), vec!["10.0.0.1", "10.0.0.3"]);
        assert!(ready_addresses(&[]).is_empty());
    }

    #[test]
    fn expiry_is_ok_warn_or_fail() {
        let now = SystemTime::now();
        let at = |days: i64| CertInfo {
            subject: "CN=x".into(),
            not_before_unix: 0,
            not_after_unix: pki::unix_seconds(now) + days * 86_400,
        };
        let mut report = Report::default();
        expiry(&mut report, "a", &at(90), now);
        expiry(&mut report, "b", &at(10), now);
        expiry(&mut report, "c", &at(-1), now);
        let statuses: Vec<Status> = report.results.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![Status::Ok, Status::Warn, Status::Fail]);
        assert_eq!(report.failures(), 1);
        assert!(report.results[2].detail.contains("expired"));
    }

    #[test]
    fn text_output_marks_each_line_and_indents_hints() {
        let mut report = Report::default();
        report.ok("one", "fine");
        report.fail("two", "broken", "fix it");
        let text = render_text(&report.results);
        assert_eq!(text, "✔ one: fine\n✘ two: broken\n    fix it\n");
    }
}

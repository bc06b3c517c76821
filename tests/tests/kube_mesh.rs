//! The mesh on Kubernetes, end to end against a real kube-apiserver (issue 5, acceptance
//! 2, 3 and 5). Pods are created with `kubectl apply` in an annotated namespace, mutated by
//! the real `weft-injector` webhook, then run by the test playing the kubelet
//! (`weft_e2e::kubelet`): the injected `weft-init` and `weft-proxy` containers run in
//! network namespaces with the env the webhook wrote and TokenRequest tokens, and the
//! control plane runs on the kube source (`--source kube`, TokenReview identity). Traffic
//! then follows `kubectl apply` of TrafficSplits and AuthorizationPolicies, and survives a
//! control-plane restart.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_e2e::kube::KubeFixture;
use weft_e2e::kubelet::{
    api_server_addr, container, run_pod, ApiRelay, KubeletOptions, KubeletPod,
};
use weft_e2e::load::{run_load_blocking, LoadConfig, LoadReport};
use weft_e2e::mesh::control_plane_addr;
use weft_e2e::proc::{Cmd, Proc};
use weft_e2e::webhook::{free_port, start_injector, webhook_config, webhook_pki};
use weft_e2e::{bin, e2e_test, Cluster, Pod, MESH_TOOLS};

const NS: &str = "shop";
const TEST: &str = "kube_mesh";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How fast a `kubectl apply` must reach the proxies (issue 5, acceptance 3).
const APPLY_DEADLINE: Duration = Duration::from_secs(5);
const WEB_URL: &str = "http://10.96.0.10:80/";

/// Namespace (annotated for injection), ServiceAccounts, Services and the app pods as a
/// user would write them: no proxy anywhere.
fn workloads() -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Namespace, metadata: {{name: {NS}, annotations: {{weft.io/inject: enabled}}}}}}\n"
    );
    for sa in ["web-v1", "web-v2", "client", "intruder"] {
        yaml += &format!(
            "- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: {sa}, namespace: {NS}}}}}\n"
        );
    }
    for (name, ip, selector) in [
        ("web", "10.96.0.10", "group: web"),
        ("web-v1", "10.96.0.11", "app: web-v1"),
        ("web-v2", "10.96.0.12", "app: web-v2"),
    ] {
        yaml += &format!(
            "- {{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: {NS}}}, spec: {{clusterIP: {ip}, selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}}}\n"
        );
    }
    yaml
}

fn pod_yaml(name: &str, service_account: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{{labels}}}}}\nspec:\n  serviceAccountName: {service_account}\n  containers:\n  - {{name: app, image: registry.test/httpapp:1, ports: [{{containerPort: 8080}}]}}\n"
    )
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{name: web-split, namespace: {NS}}}\nspec:\n  service: web\n  backends: [{{service: web-v1, weight: {v1}}}, {{service: web-v2, weight: {v2}}}]\n"
    )
}

fn deny_client() -> String {
    format!(
        "apiVersion: policy.weft.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-client, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{group: web}}}}\n  action: DENY\n  rules: [{{from: [{{serviceAccounts: [\"{NS}/client\"]}}]}}]\n"
    )
}

fn kubectl_ok(kube: &KubeFixture, args: &[&str]) -> Result<String> {
    let out = kube.kubectl(args)?;
    ensure!(out.success, "kubectl {}: {}", args.join(" "), out.stderr);
    Ok(out.stdout)
}

/// `weft-control --source kube` in the node namespace, where the pods reach it.
fn start_control_plane(cluster: &Cluster, kube: &KubeFixture) -> Result<Proc> {
    let identity = cluster.identity()?;
    let cmd = Cmd::new(bin("weft-control")?)
        .args(["--source", "kube", "--kubeconfig"])
        .arg(kube.kubeconfig())
        .arg("--identity")
        .arg(&identity.dir)
        .arg("--listen")
        .arg(control_plane_addr().to_string())
        .env("WEFT_LOG", "info");
    Ok(cluster.node().spawn(cmd)?)
}

/// The webhook's work, read back from the API server: `weft-init` (iptables, NET_ADMIN and
/// NET_RAW only) first, then the proxy as a native sidecar with the projected token.
fn check_injected(pod: &Value) -> Result<()> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .context("no init containers")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    ensure!(
        init.first() == Some(&"weft-init") && init.get(1) == Some(&"weft-proxy"),
        "{name}: init containers {init:?}"
    );
    let init = container(pod, "weft-init").context("weft-init")?;
    let caps = &init["securityContext"]["capabilities"]["add"];
    ensure!(
        caps == &serde_json::json!(["NET_ADMIN", "NET_RAW"]),
        "{name}: weft-init capabilities {caps}"
    );
    let proxy = container(pod, "weft-proxy").context("weft-proxy")?;
    ensure!(
        proxy["restartPolicy"] == "Always",
        "{name}: the proxy is not a native sidecar: {proxy}"
    );
    let token_volume = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten())
        .find_map(|s| s.get("serviceAccountToken"))
        .context("no projected ServiceAccount token volume")?;
    ensure!(
        token_volume["audience"] == "identity.weft.io",
        "{name}: token audience {token_volume}"
    );
    Ok(())
}

fn get(pod: &Pod, url: &str, count: u64) -> Result<LoadReport> {
    let mut config = LoadConfig::get(url, count, 1);
    config.timeout = Duration::from_secs(3);
    Ok(pod.in_netns(|| run_load_blocking(&config))??)
}

/// GETs `url` from `pod` until `accept` holds; returns how long that took.
fn until(
    pod: &Pod,
    within: Duration,
    what: &str,
    accept: impl Fn(&LoadReport) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let report = get(pod, WEB_URL, 1)?;
        if accept(&report) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < within,
            "{what}: not within {within:?}; last GET {WEB_URL}: {report:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_from(pod: &Pod, backend: &str, count: u64) -> Result<()> {
    let report = get(pod, WEB_URL, count)?;
    ensure!(
        report.all_succeeded() && report.served_by_count(backend) == count,
        "expected {count} answers from {backend}: {report:?}"
    );
    Ok(())
}

#[test]
fn injected_pods_get_identity_by_token_review_and_follow_kubectl_apply() {
    if weft_e2e::Prereqs::require(TEST, MESH_TOOLS).is_none() {
        return;
    }
    let Some(kube) = KubeFixture::start(TEST) else {
        return;
    };
    e2e_test(TEST, MESH_TOOLS, |cluster| -> Result<()> {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/crds");
        kubectl_ok(&kube, &["apply", "-f", &crds.to_string_lossy()])?;
        kubectl_ok(
            &kube,
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=30s",
            ],
        )?;

        // The injector, told to hand out the cluster's real trust anchors.
        let identity = cluster.identity()?;
        let dir = cluster.tmp_dir().join("injector");
        std::fs::create_dir_all(&dir)?;
        let pki = webhook_pki();
        let port = free_port();
        let injector = start_injector(&kube, &dir, &pki, port, Some(&identity.trust_anchors), &[])?;
        kube.apply_ok(&webhook_config(port, &pki.ca_pem))?;

        kube.apply_ok(&workloads())?;
        let pods = [
            ("web-v1", "web-v1", "app: web-v1, group: web", 21u8),
            ("web-v2", "web-v2", "app: web-v2, group: web", 22),
            ("client", "client", "app: client", 10),
            // Claims web-v1's service account but will present the intruder's token.
            ("impostor", "web-v1", "app: impostor", 30),
        ];
        for (name, sa, labels, _) in pods {
            kube.apply_ok(&pod_yaml(name, sa, labels))
                .with_context(|| format!("creating pod {name}\n{}", injector.log()))?;
        }
        kube.apply_ok(&split(100, 0))?;

        // Acceptance 2: the spec read back has the init step and the proxy ...
        let _relay = ApiRelay::start(cluster.node(), api_server_addr(&kube)?)?;
        let mut control = start_control_plane(cluster, &kube)?;
        let mut running: Vec<KubeletPod> = Vec::new();
        let mut apps = Vec::new();
        for (name, _, _, octet) in pods {
            let options = if name == "impostor" {
                KubeletOptions {
                    token_of: Some("intruder".into()),
                    ..KubeletOptions::default()
                }
            } else {
                KubeletOptions::default()
            };
            let pod = run_pod(cluster, &kube, NS, name, octet, &options)?;
            check_injected(&pod.spec)?;
            if name.starts_with("web-") {
                apps.push(weft_e2e::httpapp::start_http_server(
                    &pod.pod,
                    name,
                    8080,
                    &[],
                )?);
            }
            running.push(pod);
        }
        // ... and each proxy gets its certificate through a TokenReview of its own token.
        for pod in running.iter_mut().filter(|p| p.name != "impostor") {
            pod.wait_ready(READY_TIMEOUT)?;
        }
        let log = control.logs();
        for sa in ["web-v1", "web-v2", "client"] {
            let id = format!("spiffe://cluster.local/ns/{NS}/sa/{sa}");
            ensure!(
                log.lines()
                    .any(|l| l.contains("certified") && l.contains(&id)),
                "the control plane never certified {id}:\n{log}"
            );
        }
        // A token for another service account is refused: the impostor never gets ready.
        std::thread::sleep(Duration::from_secs(3));
        let impostor = running
            .iter()
            .find(|p| p.name == "impostor")
            .context("impostor")?;
        ensure!(
            impostor.ready_status() != Some(200),
            "a proxy holding another service account's token became ready"
        );
        let log = control.logs();
        ensure!(
            log.lines().any(|l| l.contains("certify refused")
                && l.contains(&format!("spiffe://cluster.local/ns/{NS}/sa/web-v1"))),
            "no refusal logged for the impostor:\n{log}"
        );

        // Acceptance 3: a TrafficSplit shift and an AuthorizationPolicy, within 5 s.
        let client = running
            .iter()
            .find(|p| p.name == "client")
            .context("client")?
            .pod
            .clone();
        until(&client, Duration::from_secs(30), "web-v1 serves", |r| {
            r.status_count(200) == 1 && r.served_by_count("web-v1") == 1
        })?;
        all_from(&client, "web-v1", 20)?;
        kube.apply_ok(&split(0, 100))?;
        let took = until(&client, APPLY_DEADLINE, "split 0/100", |r| {
            r.served_by_count("web-v2") == 1
        })?;
        eprintln!("kubectl apply of the split reached the client proxy in {took:?}");
        all_from(&client, "web-v2", 40)?;

        kube.apply_ok(&deny_client())?;
        let took = until(&client, APPLY_DEADLINE, "deny policy", |r| {
            r.status_count(403) == 1
        })?;
        eprintln!("kubectl apply of the policy reached the server proxy in {took:?}");
        kubectl_ok(
            &kube,
            &["delete", "authorizationpolicy", "deny-client", "-n", NS],
        )?;
        until(&client, APPLY_DEADLINE, "policy deleted", |r| {
            r.status_count(200) == 1
        })?;

        // Acceptance 5: without the control plane the proxies keep serving their last state;
        // a restarted control plane rebuilds its index from the API server (including a change
        // made while it was down) and later changes flow again.
        control.kill()?;
        all_from(&client, "web-v2", 20)?;
        kube.apply_ok(&split(100, 0))?;
        std::thread::sleep(Duration::from_secs(2));
        all_from(&client, "web-v2", 10)?;
        let _control = start_control_plane(cluster, &kube)?;
        let took = until(&client, Duration::from_secs(30), "after restart", |r| {
            r.served_by_count("web-v1") == 1
        })?;
        eprintln!("after the restart the change made during the outage arrived in {took:?}");
        all_from(&client, "web-v1", 20)?;
        kube.apply_ok(&deny_client())?;
        until(&client, APPLY_DEADLINE, "deny policy after restart", |r| {
            r.status_count(403) == 1
        })?;
        drop(apps);
        Ok(())
    });
}

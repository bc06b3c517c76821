//! Rendering checks that need no API server: namespaces, the webhook's certificates,
//! flags, and that the embedded chart files are all there.

use base64::Engine;
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use super::pki;
use super::render::{self, Crds, FailurePolicy, Material, Settings};
use super::InstallArgs;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: InstallArgs,
}

fn args(extra: &[&str]) -> InstallArgs {
    let mut argv = vec!["weft-install"];
    argv.extend_from_slice(extra);
    Wrapper::try_parse_from(argv).unwrap().args
}

fn settings(ns: &str) -> Settings {
    Settings {
        namespace: ns.to_string(),
        trust_domain: "example.org".to_string(),
        registry: "registry.example/weft".to_string(),
        version: "1.2.3".to_string(),
        failure_policy: FailurePolicy::Fail,
        pod_monitor: false,
        crds: Crds::Include,
    }
}

fn material(ns: &str) -> Material {
    Material {
        identity: pki::generate_identity("example.org").unwrap(),
        webhook: pki::generate_webhook_tls(&render::injector_dns_names(ns), 30).unwrap(),
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn b64_text(value: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
];

#[test]
fn namespaced_objects_carry_the_namespace_and_cluster_ones_do_not() {
    let objects = render::render(&settings("mesh"), &material("mesh")).unwrap();
    assert_eq!(objects[0]["kind"], "Namespace");
    assert_eq!(objects[0]["metadata"]["name"], "mesh");
    for object in &objects {
        let kind = object["kind"].as_str().unwrap();
        let namespace = &object["metadata"]["namespace"];
        if CLUSTER_SCOPED.contains(&kind) {
            assert!(
                namespace.is_null(),
                "{kind} must be cluster-scoped: {namespace}"
            );
        } else {
            assert_eq!(namespace, "mesh", "{kind} {}", object["metadata"]["name"]);
        }
    }
    // Every object the control plane needs is rendered once.
    let mut keys: Vec<(String, String)> = objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let count = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), count, "duplicate objects: {keys:?}");
    assert_eq!(count, 20, "{keys:?}");
}

#[test]
fn ca_bundle_is_the_ca_that_signed_the_serving_certificate() {
    let objects = render::render(&settings("mesh"), &material("mesh")).unwrap();
    let webhook = &find(&objects, "MutatingWebhookConfiguration", "weft-injector")["webhooks"][0];
    let ca = b64_text(&webhook["clientConfig"]["caBundle"]);
    let secret = find(&objects, "Secret", "weft-injector-tls");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let cert = b64_text(&secret["data"]["tls.crt"]);
    pki::verify_signed_by(&cert, &ca).unwrap();
    assert_eq!(b64_text(&secret["data"]["ca.crt"]), ca);
    let names = pki::dns_names(&cert).unwrap();
    assert!(
        names.contains(&"weft-injector.mesh.svc".to_string()),
        "{names:?}"
    );
    // The key in the Secret belongs to the certificate.
    let key = b64_text(&secret["data"]["tls.key"]);
    let key = rcgen::KeyPair::from_pem(&key).unwrap();
    let raw = key.public_key_raw();
    let cert_der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
    assert_eq!(parsed.public_key().subject_public_key.data.as_ref(), raw);

    assert_eq!(webhook["clientConfig"]["service"]["namespace"], "mesh");
    assert_eq!(webhook["clientConfig"]["service"]["path"], "/inject");
    assert_eq!(webhook["failurePolicy"], "Fail");
    let excluded = &webhook["namespaceSelector"]["matchExpressions"][0]["values"];
    assert_eq!(
        excluded,
        &serde_json::json!(["kube-system", "kube-public", "kube-node-lease", "mesh"])
    );
}

#[test]
fn identity_secret_and_anchors_hold_a_valid_chain() {
    let objects = render::render(&settings("weft"), &material("weft")).unwrap();
    let secret = find(&objects, "Secret", "weft-identity");
    assert_eq!(secret["type"], "Opaque");
    let identity = pki::IdentityPem {
        trust_anchors_pem: find(&objects, "ConfigMap", "weft-trust-anchors")["data"]
            ["trust-anchors.pem"]
            .as_str()
            .unwrap()
            .to_string(),
        issuer_pem: b64_text(&secret["data"]["issuer.pem"]),
        issuer_key_pem: b64_text(&secret["data"]["issuer-key.pem"]),
    };
    pki::validate_identity(&identity).unwrap();
}

#[test]
fn deployments_run_the_documented_commands() {
    let objects = render::render(&settings("mesh"), &material("mesh")).unwrap();
    let container = |name: &str| {
        find(&objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let control = container("weft-control");
    assert_eq!(control["image"], "registry.example/weft/weft-control:1.2.3");
    assert_eq!(
        control["args"],
        serde_json::json!([
            "--source",
            "kube",
            "--identity",
            "/var/run/weft/identity",
            "--listen",
            "0.0.0.0:7150"
        ])
    );
    assert_eq!(control["env"][0]["value"], "example.org");
    assert_eq!(control["securityContext"]["readOnlyRootFilesystem"], true);
    let injector = container("weft-injector");
    let args: Vec<&str> = injector["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| {
        let i = args.iter().position(|a| *a == name).unwrap();
        args[i + 1]
    };
    assert_eq!(
        flag("--proxy-image"),
        "registry.example/weft/weft-proxy:1.2.3"
    );
    assert_eq!(
        flag("--control-addr"),
        "weft-control.mesh.svc.cluster.local:7150"
    );
    assert_eq!(flag("--control-namespace"), "mesh");
    assert_eq!(flag("--trust-domain"), "example.org");
}

#[test]
fn crd_flags_select_what_is_rendered() {
    let kinds = |extra: &[&str]| -> Vec<String> {
        let yaml = super::render_yaml(&args(extra)).unwrap();
        serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|doc| {
                let value: Value = serde::Deserialize::deserialize(doc).unwrap();
                value["kind"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let only = kinds(&["--crds-only"]);
    assert_eq!(only, vec!["CustomResourceDefinition"; 3]);
    let skip = kinds(&["--skip-crds"]);
    assert_eq!(skip.len(), 17);
    assert!(!skip.iter().any(|k| k == "CustomResourceDefinition"));
    let with_monitor = kinds(&["--pod-monitor", "--webhook-failure-policy", "Ignore"]);
    assert_eq!(
        with_monitor.iter().filter(|k| *k == "PodMonitor").count(),
        1
    );
    assert!(Wrapper::try_parse_from(["x", "--crds-only", "--skip-crds"]).is_err());
}

#[test]
fn failure_policy_flag_reaches_the_webhook() {
    let yaml = super::render_yaml(&args(&[
        "--webhook-failure-policy",
        "Ignore",
        "--namespace",
        "m2",
    ]))
    .unwrap();
    assert!(yaml.contains("failurePolicy: Ignore"), "{yaml}");
    assert!(
        yaml.contains("weft-control.m2.svc.cluster.local:7150"),
        "{yaml}"
    );
}

#[test]
fn bad_flags_are_refused_before_rendering() {
    for bad in [
        &["--namespace", "Has_Upper"][..],
        &["--namespace=-x"],
        &["--trust-domain", "Not A Domain"],
        &["--registry", ""],
    ] {
        assert!(super::render_yaml(&args(bad)).is_err(), "{bad:?}");
    }
}

#[test]
fn every_chart_dashboard_and_crd_is_embedded() {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft");
    for (dir, ext, embedded) in [
        ("crds", "yaml", render::CHART_CRDS),
        ("dashboards", "json", render::CHART_DASHBOARDS),
    ] {
        let mut on_disk: Vec<String> = std::fs::read_dir(chart.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(&format!(".{ext}")))
            .collect();
        on_disk.sort();
        let names: Vec<String> = embedded.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, on_disk);
    }
    let objects = render::render(&settings("weft"), &material("weft")).unwrap();
    let dashboards = find(&objects, "ConfigMap", "weft-grafana-dashboards");
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    for (name, text) in render::CHART_DASHBOARDS {
        assert_eq!(dashboards["data"][*name], *text);
        serde_json::from_str::<Value>(text).unwrap();
    }
    let crd_names: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    let mut expected = render::CRD_NAMES.to_vec();
    expected.sort();
    let mut got = crd_names.clone();
    got.sort();
    assert_eq!(got, expected);
}

#[test]
fn scrape_config_keeps_annotated_pods_admin_port() {
    let objects = render::render(&settings("weft"), &material("weft")).unwrap();
    let cm = find(&objects, "ConfigMap", "weft-prometheus-scrape-config");
    let text = cm["data"]["weft-proxies.yaml"].as_str().unwrap();
    let parsed: Value = serde_yaml_ng::from_str(text).unwrap();
    assert_eq!(parsed, render::scrape_config());
    let relabel = parsed[0]["relabel_configs"].as_array().unwrap();
    assert_eq!(
        relabel[0]["source_labels"][0],
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape"
    );
    assert_eq!(relabel[1]["regex"], "7191");
    let targets: Vec<&str> = relabel
        .iter()
        .filter_map(|r| r["target_label"].as_str())
        .collect();
    for label in ["namespace", "pod", "workload"] {
        assert!(targets.contains(&label), "{targets:?}");
    }
}

//! The proxy injector against a real kube-apiserver: `weft-injector` runs as a process on
//! 127.0.0.1 with a throwaway CA, is registered as a MutatingWebhookConfiguration by URL, and
//! pods applied with kubectl come back from the API server injected (or untouched, or
//! rejected). Also `weft inject` on a Deployment, whose output the API server must accept.
//! Needs `cargo build -p weft-injector -p weft` first.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_e2e::kube::KubeFixture;
use weft_e2e::kubelet::get_pod;
use weft_e2e::webhook::{free_port, start_injector, webhook_config, webhook_pki, Pki};

fn pod_yaml(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> String {
    let mut notes = String::new();
    for (k, v) in annotations {
        notes.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{notes}")
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
{notes}spec:
  initContainers:
  - name: migrate
    image: registry.test/migrate:1
  containers:
  - name: app
    image: registry.test/app:1
    ports:
    - containerPort: 8080
"#
    )
}

fn names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn webhook_injects_pods_through_the_api_server() -> Result<()> {
    let Some(fixture) = KubeFixture::start("kube_inject") else {
        return Ok(());
    };
    let dir = fixture.dir().join("injector");
    std::fs::create_dir_all(&dir)?;
    let pki = webhook_pki();
    let port = free_port();
    let injector = start_injector(&fixture, &dir, &pki, port, None, &[])?;
    let result =
        check_http_edges(&pki, port).and_then(|()| run_webhook_checks(&fixture, &pki, port));
    if result.is_err() {
        eprintln!(
            "----- weft-injector log -----\n{}\n----- kube-apiserver log tail -----\n{}",
            injector.log(),
            fixture.apiserver_log_tail()
        );
    }
    result
}

/// One HTTPS request to the injector (verified against the test CA); status and body.
fn https(pki: &Pki, port: u16, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())?;
    // A server may answer (and close) before reading an oversized body: keep what came back.
    let _ = tls.write_all(body);
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The webhook never answers 500: garbage is a 400, a readable non-Pod review a denial.
fn check_http_edges(pki: &Pki, port: u16) -> Result<()> {
    assert_eq!(https(pki, port, "GET", "/ready", b"")?.0, 200);
    assert_eq!(https(pki, port, "GET", "/nowhere", b"")?.0, 404);
    let (status, body) = https(pki, port, "POST", "/inject", b"{not json")?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"allowed\":false"), "{body}");
    let service = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "uid-svc",
            "kind": {"group": "", "version": "v1", "kind": "Service"},
            "resource": {"group": "", "version": "v1", "resource": "services"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "tester"},
            "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}},
            "oldObject": null
        }
    });
    let (status, body) = https(pki, port, "POST", "/inject", service.to_string().as_bytes())?;
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body)?;
    assert_eq!(review["response"]["uid"], "uid-svc");
    assert_eq!(review["response"]["allowed"], false);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("only handles Pods"),
        "{body}"
    );
    let huge = vec![b' '; 5 * 1024 * 1024];
    let (status, body) = https(pki, port, "POST", "/inject", &huge)?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

fn run_webhook_checks(fixture: &KubeFixture, pki: &Pki, port: u16) -> Result<()> {
    for ns in ["shop", "plain"] {
        fixture.apply_ok(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
        ))?;
    }
    fixture.apply_ok(&webhook_config(port, &pki.ca_pem))?;
    let annotated = fixture.kubectl(&["annotate", "ns", "shop", "weft.io/inject=enabled"])?;
    ensure!(annotated.success, "annotate: {}", annotated.stderr);

    // The API server picks up webhook configurations asynchronously: dry-run a pod until
    // it comes back injected.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = fixture.kubectl_with_stdin(
            &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
            Some(&pod_yaml("shop", "probe", &[])),
        )?;
        if probe.success && probe.stdout.contains("weft-proxy") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the webhook never injected a dry-run pod: {} {}",
            probe.stdout,
            probe.stderr
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Namespace annotation: native sidecar layout (the fixture is v1.33).
    fixture.apply_ok(&pod_yaml("shop", "web", &[]))?;
    let web = get_pod(fixture, "shop", "web")?;
    assert_eq!(
        names(&web, "initContainers"),
        ["weft-init", "weft-proxy", "migrate"]
    );
    assert_eq!(names(&web, "containers"), ["app"]);
    let proxy = &web["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], "registry.test/weft-proxy:e2e");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2170);
    assert_eq!(
        env_value(proxy, "WEFT_TRUST_ANCHORS_PEM").map(|e| &e["value"]),
        Some(&Value::String(pki.ca_pem.clone()))
    );
    assert_eq!(
        env_value(proxy, "WEFT_SERVICE_ACCOUNT").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&Value::String("spec.serviceAccountName".into()))
    );
    let init = &web["spec"]["initContainers"][0];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(web["metadata"]["annotations"]["weft.io/injected"], "true");
    assert_eq!(web["metadata"]["annotations"]["prometheus.io/port"], "7191");
    assert!(names(&web, "volumes").contains(&"weft-identity-token".to_string()));

    // A namespace without the annotation: untouched. With the pod's own annotation: injected.
    fixture.apply_ok(&pod_yaml("plain", "bare", &[]))?;
    let bare = get_pod(fixture, "plain", "bare")?;
    assert_eq!(names(&bare, "initContainers"), ["migrate"]);
    assert_eq!(names(&bare, "containers"), ["app"]);
    assert!(bare["metadata"]["annotations"]
        .get("weft.io/injected")
        .is_none());
    fixture.apply_ok(&pod_yaml(
        "plain",
        "opted-in",
        &[("weft.io/inject", "enabled")],
    ))?;
    let opted_in = get_pod(fixture, "plain", "opted-in")?;
    assert_eq!(
        names(&opted_in, "initContainers"),
        ["weft-init", "weft-proxy", "migrate"]
    );

    // The pod's `disabled` wins over the namespace.
    fixture.apply_ok(&pod_yaml(
        "shop",
        "opted-out",
        &[("weft.io/inject", "disabled")],
    ))?;
    let opted_out = get_pod(fixture, "shop", "opted-out")?;
    assert_eq!(names(&opted_out, "initContainers"), ["migrate"]);
    assert_eq!(names(&opted_out, "containers"), ["app"]);

    // The regular layout on request: proxy first, with the wait hook.
    fixture.apply_ok(&pod_yaml(
        "shop",
        "regular",
        &[
            ("config.weft.io/native-sidecar", "false"),
            ("config.weft.io/skip-inbound-ports", "22"),
        ],
    ))?;
    let regular = get_pod(fixture, "shop", "regular")?;
    assert_eq!(names(&regular, "initContainers"), ["weft-init", "migrate"]);
    assert_eq!(names(&regular, "containers"), ["weft-proxy", "app"]);
    assert_eq!(
        regular["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"],
        serde_json::json!(["weft-proxy", "wait-ready"])
    );
    let init_args = regular["spec"]["initContainers"][0]["args"].to_string();
    assert!(init_args.contains("--skip-inbound-ports=22"), "{init_args}");

    // A bad config annotation: rejected with the message, no pod created.
    let rejected = fixture.apply(&pod_yaml(
        "shop",
        "bad",
        &[("config.weft.io/skip-inbound-ports", "abc")],
    ))?;
    assert!(
        !rejected.success,
        "a pod with skip-inbound-ports: abc was admitted"
    );
    assert!(
        rejected
            .stderr
            .contains("config.weft.io/skip-inbound-ports: \\\"abc\\\" is not a port")
            || rejected
                .stderr
                .contains("config.weft.io/skip-inbound-ports: \"abc\" is not a port"),
        "{}",
        rejected.stderr
    );
    let gone = fixture.kubectl(&["get", "pod", "-n", "shop", "bad"])?;
    assert!(!gone.success, "pod shop/bad exists");

    // The injected spec applied again (as a new pod): no second proxy.
    let mut copy = web.clone();
    copy["metadata"] = serde_json::json!({
        "name": "web-copy",
        "namespace": "shop",
        "annotations": web["metadata"]["annotations"].clone(),
    });
    if let Some(obj) = copy.as_object_mut() {
        obj.remove("status");
    }
    if let Some(annotations) = copy["metadata"]["annotations"].as_object_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    fixture.apply_ok(&serde_json::to_string(&copy)?)?;
    let again = get_pod(fixture, "shop", "web-copy")?;
    assert_eq!(
        names(&again, "initContainers"),
        ["weft-init", "weft-proxy", "migrate"]
    );
    assert_eq!(names(&again, "containers"), ["app"]);
    let token_volumes = names(&again, "volumes")
        .iter()
        .filter(|v| *v == "weft-identity-token")
        .count();
    assert_eq!(token_volumes, 1);
    Ok(())
}

const DEPLOYMENT: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
  namespace: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        config.weft.io/proxy-memory-limit: 128Mi
    spec:
      serviceAccountName: web
      containers:
      - name: app
        image: registry.test/app:1
"#;

#[test]
fn weft_inject_rewrites_a_deployment_the_api_server_accepts() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("weft-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let anchors = dir.join("trust-anchors.pem");
    std::fs::write(&anchors, webhook_pki().ca_pem)?;
    let inject = |native: &str, input: &str| -> Result<std::process::Output> {
        let mut child = Command::new(weft_e2e::bin("weft")?)
            .args(["inject", "--trust-anchors"])
            .arg(&anchors)
            .args([
                "--native-sidecar",
                native,
                "--proxy-image",
                "registry.test/weft-proxy:e2e",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
        Ok(child.wait_with_output()?)
    };
    let out = inject("true", DEPLOYMENT)?;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "weft inject failed: {stderr}");
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
        .collect::<Result<_>>()?;
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["kind"], "ServiceAccount");
    let template = &docs[1]["spec"]["template"];
    assert_eq!(
        names(template, "initContainers"),
        ["weft-init", "weft-proxy"]
    );
    assert_eq!(
        template["spec"]["initContainers"][1]["resources"]["limits"]["memory"],
        "128Mi"
    );
    assert_eq!(template["metadata"]["labels"]["app"], "web");
    assert!(stderr.contains("Deployment web injected"), "{stderr}");

    let regular = inject("false", DEPLOYMENT)?;
    let regular_docs: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(&String::from_utf8(regular.stdout)?)
            .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
    assert_eq!(
        names(&regular_docs[1]["spec"]["template"], "containers"),
        ["weft-proxy", "app"]
    );

    let bad = inject(
        "true",
        &DEPLOYMENT.replace("proxy-memory-limit: 128Mi", "proxy-cpu-limit: lots"),
    )?;
    assert!(!bad.status.success());
    let bad_err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad_err.contains("config.weft.io/proxy-cpu-limit: \"lots\""),
        "{bad_err}"
    );

    // The API server validates the injected template (both layouts).
    let Some(fixture) = KubeFixture::start("kube_inject_cli") else {
        return Ok(());
    };
    fixture.apply_ok("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n")?;
    fixture.apply_ok(&stdout)?;
    let stored = fixture.kubectl(&["get", "deployment", "-n", "shop", "web", "-o", "json"])?;
    ensure!(stored.success, "{}", stored.stderr);
    let stored: Value = serde_json::from_str(&stored.stdout)?;
    assert_eq!(
        names(&stored["spec"]["template"], "initContainers"),
        ["weft-init", "weft-proxy"]
    );
    let mut regular_deployment = regular_docs[1].clone();
    regular_deployment["metadata"]["name"] = Value::String("web-regular".into());
    let regular_yaml = serde_yaml_ng::to_string(&regular_deployment)?;
    fixture.apply_ok(&regular_yaml)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! Whole-injection tests: the patch applied to real-looking pods, the admission handler and
//! `weft inject` on YAML.

use serde_json::{json, Value};

use super::*;

fn settings() -> ProxySettings {
    ProxySettings {
        proxy_image: "registry.test/weft-proxy:dev".into(),
        control_addr: "weft-control.weft.svc.cluster.local:7150".into(),
        control_namespace: "weft".into(),
        trust_domain: "cluster.local".into(),
        trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
    }
}

fn app_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop",
                     "annotations": {"weft.io/inject": "enabled", "prometheus.io/port": "9090"}},
        "spec": {
            "initContainers": [{"name": "migrate", "image": "migrate"}],
            "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "futureField": {"kept": true}
        }
    })
}

fn inject(pod: &Value, native: bool) -> (Value, Layout) {
    let ns = shop(true);
    match plan(pod, NamespaceView::Known(&ns), &settings(), native).unwrap() {
        Outcome::Inject { patch, layout } => {
            let mut out = pod.clone();
            json_patch::patch(&mut out, &patch).unwrap();
            (out, layout)
        }
        Outcome::Skip(reason) => panic!("not injected: {reason}"),
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn env_of(container: &Value) -> std::collections::BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

#[test]
fn native_layout_puts_init_then_proxy_before_the_apps_init_containers() {
    let (pod, layout) = inject(&app_pod(), true);
    assert_eq!(layout, Layout::NativeSidecar);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["weft-init", "weft-proxy", "migrate"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert!(proxy.get("lifecycle").is_none());
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    // Fields this build does not model survive (the patch only adds).
    assert_eq!(pod["spec"]["futureField"]["kept"], true);
}

#[test]
fn regular_layout_puts_the_proxy_first_with_a_wait_hook() {
    let mut original = app_pod();
    original["metadata"]["annotations"]["config.weft.io/native-sidecar"] = json!("false");
    let (pod, layout) = inject(&original, true);
    assert_eq!(layout, Layout::Regular);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["weft-init", "migrate"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["weft-proxy", "app"]);
    let proxy = &pod["spec"]["containers"][0];
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["weft-proxy", "wait-ready"])
    );
    // Old clusters get the regular layout by default, and the annotation can ask for native.
    let (_, layout) = inject(&app_pod(), false);
    assert_eq!(layout, Layout::Regular);
    let mut wants_native = app_pod();
    wants_native["metadata"]["annotations"]["config.weft.io/native-sidecar"] = json!("true");
    assert_eq!(inject(&wants_native, false).1, Layout::NativeSidecar);
}

#[test]
fn proxy_container_is_complete() {
    let (pod, _) = inject(&app_pod(), true);
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["image"], "registry.test/weft-proxy:dev");
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 2170);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"].get("add").is_none());
    let ports: Vec<(i64, &str)> = proxy["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_i64().unwrap(),
                p["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [(7143, "weft-inbound"), (7191, "weft-admin")]);
    assert_eq!(
        proxy["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": 7191})
    );
    assert_eq!(
        proxy["livenessProbe"]["httpGet"],
        json!({"path": "/live", "port": 7191})
    );

    let env = env_of(proxy);
    assert_eq!(
        env["WEFT_CONTROL_ADDR"]["value"],
        "weft-control.weft.svc.cluster.local:7150"
    );
    assert_eq!(
        env["WEFT_CONTROL_IDENTITY"]["value"],
        "spiffe://cluster.local/ns/weft/sa/weft-control"
    );
    assert_eq!(env["WEFT_TRUST_DOMAIN"]["value"], "cluster.local");
    assert_eq!(
        env["WEFT_TRUST_ANCHORS_PEM"]["value"],
        settings().trust_anchors_pem
    );
    assert_eq!(
        env["WEFT_IDENTITY_TOKEN_FILE"]["value"],
        "/var/run/secrets/weft.io/identity/token"
    );
    for (name, field) in [
        ("WEFT_NAMESPACE", "metadata.namespace"),
        ("WEFT_POD_NAME", "metadata.name"),
        ("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        assert_eq!(
            env[name]["valueFrom"]["fieldRef"]["fieldPath"], field,
            "{name}"
        );
    }
    assert!(!env.contains_key("WEFT_LOG"));
    assert!(!env.contains_key("WEFT_TRUST_ANCHORS"));
    assert!(proxy.get("resources").is_none());

    assert_eq!(
        proxy["volumeMounts"],
        json!([{"name": "weft-identity-token", "mountPath": "/var/run/secrets/weft.io/identity", "readOnly": true}])
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        ["data", "weft-identity-token"]
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "identity.weft.io", "expirationSeconds": 3600, "path": "token"})
    );

    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["weft.io/injected"], "true");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    // An existing scrape annotation is the user's choice.
    assert_eq!(annotations["prometheus.io/port"], "9090");
}

#[test]
fn init_container_gets_network_capabilities_only() {
    let (pod, _) = inject(&app_pod(), true);
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["command"], json!(["weft-proxy"]));
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid=2170",
            "--inbound-port=7143",
            "--outbound-port=7140",
            "--admin-port=7191"
        ])
    );
    let sc = &init["securityContext"];
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["runAsNonRoot"], false);
}

#[test]
fn annotations_reach_the_containers() {
    let mut original = app_pod();
    let a = &mut original["metadata"]["annotations"];
    a["config.weft.io/skip-inbound-ports"] = json!("22,8081");
    a["config.weft.io/skip-outbound-ports"] = json!("5432");
    a["config.weft.io/proxy-cpu-request"] = json!("100m");
    a["config.weft.io/proxy-memory-limit"] = json!("128Mi");
    a["config.weft.io/log-level"] = json!("debug");
    a["config.weft.io/default-inbound-policy"] = json!("deny");
    let (pod, _) = inject(&original, true);
    let args = &pod["spec"]["initContainers"][0]["args"];
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--skip-inbound-ports=22,8081"), "{args:?}");
    assert!(args.contains(&"--skip-outbound-ports=5432"), "{args:?}");
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "100m"}, "limits": {"memory": "128Mi"}})
    );
    assert_eq!(env_of(proxy)["WEFT_LOG"]["value"], "debug");
    assert_eq!(
        pod["metadata"]["annotations"]["config.weft.io/default-inbound-policy"],
        "deny"
    );
}

#[test]
fn bare_pods_get_lists_and_annotations_created() {
    let bare = json!({"spec": {"containers": [{"name": "app", "image": "app"}]}});
    let (pod, _) = inject(&bare, true);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["weft-init", "weft-proxy"]
    );
    assert_eq!(names(&pod["spec"]["volumes"]), ["weft-identity-token"]);
    // A projected token needs a named service account.
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    assert_eq!(pod["metadata"]["annotations"]["weft.io/injected"], "true");
    let no_annotations =
        json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"}]}});
    let (pod, _) = inject(&no_annotations, false);
    assert_eq!(names(&pod["spec"]["initContainers"]), ["weft-init"]);
    assert_eq!(names(&pod["spec"]["containers"]), ["weft-proxy", "app"]);
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
}

#[test]
fn an_existing_service_account_is_kept() {
    let mut named = app_pod();
    named["spec"]["serviceAccountName"] = json!("web");
    assert_eq!(inject(&named, true).0["spec"]["serviceAccountName"], "web");
    let mut legacy = app_pod();
    legacy["spec"]["serviceAccount"] = json!("old");
    assert_eq!(inject(&legacy, true).0["spec"]["serviceAccountName"], "old");
}

#[test]
fn reinjecting_an_injected_pod_is_a_no_op() {
    for native in [true, false] {
        let (pod, _) = inject(&app_pod(), native);
        let ns = NamespaceMeta {
            name: "shop".into(),
            ..Default::default()
        };
        match plan(&pod, NamespaceView::Known(&ns), &settings(), native).unwrap() {
            Outcome::Skip(SkipReason::AlreadyInjected) => {}
            other => panic!("second injection: {other:?}"),
        }
    }
}

#[test]
fn bad_annotations_are_errors_not_defaults() {
    let mut pod = app_pod();
    pod["metadata"]["annotations"]["config.weft.io/skip-inbound-ports"] = json!("abc");
    let ns = NamespaceMeta {
        name: "shop".into(),
        ..Default::default()
    };
    let err = plan(&pod, NamespaceView::Known(&ns), &settings(), true).unwrap_err();
    assert!(err.is_pod_error());
    assert!(
        err.to_string()
            .contains("config.weft.io/skip-inbound-ports: \"abc\""),
        "{err}"
    );
    // A pod that is not injected is not judged on its config annotations.
    pod["metadata"]["annotations"]["weft.io/inject"] = json!("disabled");
    assert!(matches!(
        plan(&pod, NamespaceView::Known(&ns), &settings(), true),
        Ok(Outcome::Skip(SkipReason::PodDisabled))
    ));
}

#[test]
fn kubernetes_versions() {
    assert_eq!(supports_native_sidecars("1", "29"), Some(true));
    assert_eq!(supports_native_sidecars("1", "33+"), Some(true));
    assert_eq!(supports_native_sidecars("1", "28"), Some(false));
    assert_eq!(supports_native_sidecars("2", "0"), Some(true));
    assert_eq!(supports_native_sidecars("1", ""), None);
    assert_eq!(parse_kubernetes_version("v1.30.2"), Some(true));
    assert_eq!(parse_kubernetes_version("1.27"), Some(false));
    assert_eq!(parse_kubernetes_version("latest"), None);
}

fn review(object: Value, kind: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "uid-1",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "tester"},
            "object": object,
            "oldObject": null
        }
    }))
    .unwrap()
}

fn run_handle(body: &[u8], ns: Result<NamespaceMeta, String>) -> admission::Reply {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(admission::handle(body, &settings(), true, |_| async { ns }))
}

fn shop(enabled: bool) -> NamespaceMeta {
    let mut ns = NamespaceMeta {
        name: "shop".into(),
        ..Default::default()
    };
    if enabled {
        ns.annotations
            .insert(INJECT_ANNOTATION.into(), "enabled".into());
    }
    ns
}

#[test]
fn admission_review_carries_a_base64_patch_that_applies() {
    use base64::Engine;
    let mut pod = app_pod();
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(INJECT_ANNOTATION);
    let reply = run_handle(&review(pod.clone(), "Pod"), Ok(shop(true)));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = &reply.body["response"];
    assert_eq!(reply.body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(reply.body["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "uid-1");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["weft-init", "weft-proxy", "migrate"]
    );

    // Not enabled anywhere: allowed, untouched.
    let mut plain = app_pod();
    plain["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(INJECT_ANNOTATION);
    let reply = run_handle(&review(plain, "Pod"), Ok(shop(false)));
    assert_eq!(reply.body["response"]["allowed"], true);
    assert!(reply.body["response"].get("patch").is_none());
}

#[test]
fn admission_denies_bad_input_with_a_message() {
    let mut pod = app_pod();
    pod["metadata"]["annotations"]["config.weft.io/proxy-cpu-limit"] = json!("lots");
    let reply = run_handle(&review(pod, "Pod"), Ok(shop(true)));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["response"]["allowed"], false);
    let message = reply.body["response"]["status"]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("config.weft.io/proxy-cpu-limit: \"lots\""),
        "{message}"
    );

    let reply = run_handle(
        &review(json!({"kind": "Service"}), "Service"),
        Ok(shop(true)),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["response"]["uid"], "uid-1");
    assert_eq!(reply.body["response"]["allowed"], false);
    assert!(reply.body["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("only handles Pods"));

    let reply = run_handle(b"{not json", Ok(shop(true)));
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["response"]["allowed"], false);

    let reply = run_handle(br#"{"request": {"uid": "u2", "kind": 5}}"#, Ok(shop(true)));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["response"]["uid"], "u2");
    assert_eq!(reply.body["response"]["allowed"], false);

    // The namespace cannot be read and the pod does not decide: fail closed.
    let mut undecided = app_pod();
    undecided["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(INJECT_ANNOTATION);
    let reply = run_handle(&review(undecided, "Pod"), Err("forbidden".into()));
    assert_eq!(reply.body["response"]["allowed"], false);
    // ...but a pod that says `enabled` needs no namespace: it is not even looked up.
    let looked_up = std::cell::Cell::new(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let reply = rt.block_on(admission::handle(
        &review(app_pod(), "Pod"),
        &settings(),
        true,
        |_| {
            looked_up.set(true);
            async { Err::<NamespaceMeta, String>("forbidden".into()) }
        },
    ));
    assert!(!looked_up.get());
    assert_eq!(reply.body["response"]["allowed"], true);
    assert!(reply.body["response"].get("patch").is_some());
}

#[test]
fn weft_inject_patches_templates_and_passes_the_rest() {
    let input = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: app, image: app}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 0 * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {weft.io/inject: disabled}
        spec:
          restartPolicy: Never
          containers: [{name: job, image: job}]
"#;
    let (out, reports) = manifest::inject_yaml(input, &settings(), true).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0]["spec"]["ports"][0]["port"], 80);
    assert!(docs[0]
        .get("metadata")
        .unwrap()
        .get("annotations")
        .is_none());
    let template = &docs[1]["spec"]["template"];
    assert_eq!(
        names(&template["spec"]["initContainers"]),
        ["weft-init", "weft-proxy"]
    );
    assert_eq!(template["metadata"]["labels"]["app"], "web");
    assert!(docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        .get("initContainers")
        .is_none());
    assert_eq!(reports.len(), 2);
    assert!(reports[0].injected);
    assert!(!reports[1].injected);

    // Injecting the output again changes nothing.
    let (again, _) = manifest::inject_yaml(&out, &settings(), true).unwrap();
    assert_eq!(again, out);

    // `kubectl get -o yaml` output: a List whose items are injected.
    let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: a, image: a}]}}\n- {apiVersion: v1, kind: Service, metadata: {name: s}}\n";
    let (out, reports) = manifest::inject_yaml(list, &settings(), true).unwrap();
    let doc: Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(doc["kind"], "List");
    assert_eq!(
        names(&doc["items"][0]["spec"]["initContainers"]),
        ["weft-init", "weft-proxy"]
    );
    assert_eq!(doc["items"][1]["metadata"]["name"], "s");
    assert_eq!(reports.len(), 1);
    assert!(reports[0].injected);

    let err = manifest::inject_yaml(
        "kind: Pod\nmetadata: {name: p, annotations: {config.weft.io/skip-inbound-ports: abc}}\nspec: {containers: [{name: a}]}\n",
        &settings(),
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("Pod p"), "{err}");
    assert!(err.to_string().contains("skip-inbound-ports"), "{err}");
}

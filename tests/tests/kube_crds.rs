//! weft's CRDs (charts/weft/crds) against a real kube-apiserver: valid objects are accepted,
//! malformed ones are rejected by `kubectl apply` with a schema error. Plus offline checks of
//! the CRD files themselves, which run everywhere.

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;
use weft_e2e::kube::KubeFixture;

const CRD_FILES: &[&str] = &[
    "authorizationpolicies.policy.weft.io.yaml",
    "trafficsplits.split.smi-spec.io.yaml",
    "httproutes.gateway.networking.k8s.io.yaml",
];

fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/crds")
}

fn load_crd(file: &str) -> Value {
    let path = crd_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn get<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    let mut current = value;
    for key in path {
        current = current
            .get(*key)
            .unwrap_or_else(|| panic!("missing {key} (in {})", path.join(".")));
    }
    current
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every schema node below `node` is structural and closed: it has a type (or is an
/// int-or-string), objects list their properties (or are string maps), and nothing keeps
/// unknown fields. Returns the paths of offending nodes.
fn loose_nodes(node: &Value, path: &str, out: &mut Vec<String>) {
    if node.get("x-kubernetes-preserve-unknown-fields").is_some() {
        out.push(format!("{path}: x-kubernetes-preserve-unknown-fields"));
    }
    let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    match node.get("type").and_then(Value::as_str) {
        None if int_or_string => {}
        None => out.push(format!("{path}: no type")),
        Some("object") => {
            let properties = node.get("properties").and_then(Value::as_mapping);
            let additional = node.get("additionalProperties");
            // `metadata` is the one object the API server itself defines.
            if properties.is_none() && additional.is_none() && !path.ends_with(".metadata") {
                out.push(format!("{path}: object without properties"));
            }
            if let Some(properties) = properties {
                for (key, child) in properties {
                    let key = key.as_str().unwrap_or("?");
                    loose_nodes(child, &format!("{path}.{key}"), out);
                }
            }
            if let Some(additional) = additional {
                if additional.as_bool().is_some() {
                    out.push(format!("{path}: additionalProperties must be a schema"));
                } else {
                    loose_nodes(additional, &format!("{path}.*"), out);
                }
            }
        }
        Some("array") => match node.get("items") {
            Some(items) => loose_nodes(items, &format!("{path}[]"), out),
            None => out.push(format!("{path}: array without items")),
        },
        Some(_) => {}
    }
}

fn versions(crd: &Value) -> Vec<&Value> {
    get(crd, &["spec", "versions"])
        .as_sequence()
        .map(|items| items.iter().collect())
        .unwrap_or_default()
}

fn schema(version: &Value) -> &Value {
    get(version, &["schema", "openAPIV3Schema"])
}

#[test]
fn crds_are_strict_structural_schemas_with_status() {
    for file in CRD_FILES {
        let crd = load_crd(file);
        assert_eq!(
            get(&crd, &["apiVersion"]).as_str(),
            Some("apiextensions.k8s.io/v1")
        );
        assert_eq!(
            get(&crd, &["kind"]).as_str(),
            Some("CustomResourceDefinition")
        );
        let name = get(&crd, &["metadata", "name"])
            .as_str()
            .unwrap_or_default();
        let plural = get(&crd, &["spec", "names", "plural"])
            .as_str()
            .unwrap_or_default();
        let group = get(&crd, &["spec", "group"]).as_str().unwrap_or_default();
        assert_eq!(format!("{plural}.{group}.yaml"), *file);
        assert_eq!(name, format!("{plural}.{group}"));
        let storage: Vec<_> = versions(&crd)
            .into_iter()
            .filter(|v| v.get("storage") == Some(&Value::Bool(true)))
            .collect();
        assert_eq!(storage.len(), 1, "{file}: exactly one storage version");
        for version in versions(&crd) {
            assert!(
                version
                    .get("subresources")
                    .and_then(|s| s.get("status"))
                    .is_some(),
                "{file}: status subresource"
            );
            let mut loose = Vec::new();
            loose_nodes(schema(version), "", &mut loose);
            assert!(loose.is_empty(), "{file}: {loose:#?}");
        }
    }
}

#[test]
fn crd_schemas_encode_the_design_contract() {
    let policy = load_crd("authorizationpolicies.policy.weft.io.yaml");
    let version = versions(&policy)[0];
    assert_eq!(get(version, &["name"]).as_str(), Some("v1alpha1"));
    let spec = get(schema(version), &["properties", "spec", "properties"]);
    assert_eq!(
        strings(get(spec, &["action", "enum"])),
        ["ALLOW", "DENY", "AUDIT"]
    );
    assert!(get(spec, &["selector", "properties", "matchLabels"]).is_mapping());
    assert_eq!(
        get(spec, &["ports", "items", "x-kubernetes-int-or-string"]),
        &Value::Bool(true)
    );
    let from = get(
        spec,
        &[
            "rules",
            "items",
            "properties",
            "from",
            "items",
            "properties",
        ],
    );
    for field in [
        "identities",
        "serviceAccounts",
        "namespaces",
        "networks",
        "unauthenticated",
    ] {
        assert!(from.get(field).is_some(), "from.{field}");
    }
    let account_pattern = get(from, &["serviceAccounts", "items", "pattern"])
        .as_str()
        .unwrap_or_default();
    assert!(
        account_pattern.contains('/'),
        "serviceAccounts must be ns/name"
    );
    let network = get(from, &["networks", "items"]);
    assert_eq!(strings(get(network, &["required"])), ["cidr"]);
    assert!(get(network, &["properties", "except"]).is_mapping());
    let to = get(
        spec,
        &["rules", "items", "properties", "to", "items", "properties"],
    );
    assert!(to.get("methods").is_some() && to.get("paths").is_some());
    let conditions = get(
        schema(version),
        &["properties", "status", "properties", "conditions"],
    );
    assert_eq!(
        strings(get(conditions, &["x-kubernetes-list-map-keys"])),
        ["type"]
    );

    let split = load_crd("trafficsplits.split.smi-spec.io.yaml");
    let version = versions(&split)[0];
    assert_eq!(get(version, &["name"]).as_str(), Some("v1alpha2"));
    let spec = get(schema(version), &["properties", "spec"]);
    assert_eq!(strings(get(spec, &["required"])), ["service", "backends"]);
    let weight = get(
        spec,
        &["properties", "backends", "items", "properties", "weight"],
    );
    assert_eq!(get(weight, &["type"]).as_str(), Some("integer"));
    assert_eq!(get(weight, &["minimum"]).as_i64(), Some(0));

    let route = load_crd("httproutes.gateway.networking.k8s.io.yaml");
    let names: Vec<_> = versions(&route)
        .into_iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    assert!(names.contains(&"v1"), "{names:?}");
    for version in versions(&route) {
        let rule = get(
            schema(version),
            &[
                "properties",
                "spec",
                "properties",
                "rules",
                "items",
                "properties",
            ],
        );
        let path_type = get(
            rule,
            &[
                "matches",
                "items",
                "properties",
                "path",
                "properties",
                "type",
                "enum",
            ],
        );
        assert_eq!(
            strings(path_type),
            ["Exact", "PathPrefix", "RegularExpression"]
        );
        let backend = get(rule, &["backendRefs", "items", "properties"]);
        for field in ["name", "namespace", "port", "weight"] {
            assert!(backend.get(field).is_some(), "backendRefs.{field}");
        }
        for field in ["request", "backendRequest"] {
            let pattern = get(rule, &["timeouts", "properties", field, "pattern"]);
            assert!(
                pattern.as_str().is_some_and(|p| p.contains("ms")),
                "{field}"
            );
        }
        let retry = get(rule, &["retry", "properties"]);
        for field in ["codes", "attempts", "backoff"] {
            assert!(retry.get(field).is_some(), "retry.{field}");
        }
    }
}

const VALID_POLICY: &str = r#"
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: internal-api, namespace: shop}
spec:
  selector: {matchLabels: {app: internal}}
  ports: [8080, http]
  action: ALLOW
  rules:
  - from:
    - serviceAccounts: ["shop/api"]
    - identities: ["spiffe://cluster.local/ns/shop/sa/*"]
    - namespaces: [shop]
    - networks: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
    - unauthenticated: true
    to:
    - {methods: ["GET"], paths: ["regex:/api/v1/users/.*"]}
    - {methods: ["POST"], paths: ["/api/v1/orders", "/static/*"]}
"#;

const VALID_SPLIT: &str = r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: web, namespace: shop}
spec:
  service: web
  backends:
  - {service: web-v1, weight: 90}
  - {service: web-v2, weight: 10}
"#;

const VALID_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: web, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "yes"}]
      queryParams: [{type: RegularExpression, name: debug, value: "[01]"}]
      method: GET
    backendRefs:
    - {name: web-v2, port: 80, weight: 1}
    - {name: web-v1, namespace: shop, port: 80, weight: 9}
    timeouts: {request: 10s, backendRequest: 2s500ms}
    retry: {codes: [502, 503], attempts: 2, backoff: 100ms}
"#;

/// (what, manifest, text kubectl's error must contain)
fn malformed_objects() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "unknown action",
            VALID_POLICY.replace("action: ALLOW", "action: MAYBE"),
            "spec.action",
        ),
        (
            "misspelt `from`",
            VALID_POLICY.replace("  - from:", "  - form:"),
            "form",
        ),
        (
            "service account without a namespace",
            VALID_POLICY.replace("\"shop/api\"", "\"noslash\""),
            "serviceAccounts[0]",
        ),
        (
            "port out of range",
            VALID_POLICY.replace("[8080, http]", "[70000]"),
            "ports[0]",
        ),
        (
            "port name that is not a port name",
            VALID_POLICY.replace("[8080, http]", "[8080, HTTP_port]"),
            "ports[1]",
        ),
        (
            "unauthenticated mixed with identities",
            VALID_POLICY.replace(
                "- unauthenticated: true",
                "- {unauthenticated: true, namespaces: [shop]}",
            ),
            "unauthenticated",
        ),
        (
            "negative split weight",
            VALID_SPLIT.replace("weight: 10", "weight: -1"),
            "spec.backends[1].weight",
        ),
        (
            "split without backends",
            VALID_SPLIT.replace("  backends:\n  - {service: web-v1, weight: 90}\n  - {service: web-v2, weight: 10}\n", ""),
            "spec.backends",
        ),
        (
            "unknown path match type",
            VALID_ROUTE.replace("type: PathPrefix", "type: Regex"),
            "spec.rules[0].matches[0].path.type",
        ),
        (
            "duration that is not a Gateway API duration",
            VALID_ROUTE.replace("request: 10s", "request: 10 seconds"),
            "spec.rules[0].timeouts.request",
        ),
        (
            "negative backendRef weight",
            VALID_ROUTE.replace("port: 80, weight: 1}", "port: 80, weight: -1}"),
            "spec.rules[0].backendRefs[0].weight",
        ),
        (
            "relative PathPrefix",
            VALID_ROUTE.replace("value: /api}", "value: api}"),
            "absolute path",
        ),
    ]
}

#[test]
fn malformed_manifests_differ_from_the_valid_ones() {
    // Guards the test below: a `replace` that matched nothing would "reject" a valid object.
    for (what, manifest, _) in malformed_objects() {
        assert!(
            manifest != VALID_POLICY && manifest != VALID_SPLIT && manifest != VALID_ROUTE,
            "{what}: the replacement did not apply"
        );
    }
}

#[test]
fn api_server_accepts_valid_objects_and_rejects_malformed_ones() {
    let Some(kube) = KubeFixture::start("kube_crds") else {
        return;
    };
    let crds = crd_dir();
    let crds = crds.to_string_lossy();
    let applied = kube
        .kubectl(&["apply", "-f", &crds])
        .unwrap_or_else(|e| panic!("kubectl apply of the CRDs: {e}"));
    assert!(
        applied.success,
        "the API server refused the CRDs:\n{}\n{}",
        applied.stderr,
        kube.apiserver_log_tail()
    );
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let names: Vec<String> = CRD_FILES
        .iter()
        .map(|file| format!("crd/{}", file.trim_end_matches(".yaml")))
        .collect();
    wait.extend(names.iter().map(String::as_str));
    let established = kube
        .kubectl(&wait)
        .unwrap_or_else(|e| panic!("kubectl wait: {e}"));
    assert!(
        established.success,
        "CRDs not established: {}",
        established.stderr
    );

    let namespace = kube
        .kubectl(&["create", "namespace", "shop"])
        .unwrap_or_else(|e| panic!("kubectl create namespace: {e}"));
    assert!(namespace.success, "{}", namespace.stderr);

    for valid in [VALID_POLICY, VALID_SPLIT, VALID_ROUTE] {
        if let Err(e) = kube.apply_ok(valid) {
            panic!("a valid object was rejected: {e}");
        }
    }

    // Defaults from the schema are applied by the API server.
    let weight = kube
        .kubectl(&[
            "get",
            "httproute",
            "web",
            "-n",
            "shop",
            "-o",
            "jsonpath={.spec.rules[0].matches[0].headers[0].type}",
        ])
        .unwrap_or_else(|e| panic!("kubectl get httproute: {e}"));
    assert_eq!(weight.stdout, "Exact", "{}", weight.stderr);

    for (what, manifest, expected) in malformed_objects() {
        // A new name per case: a rejected update of an existing object would prove the same,
        // but a create also exercises defaulting before validation.
        let manifest = manifest.replacen("name: ", "name: bad-", 1);
        let result = kube
            .apply(&manifest)
            .unwrap_or_else(|e| panic!("{what}: running kubectl: {e}"));
        assert!(
            !result.success,
            "{what}: the API server accepted a malformed object:\n{manifest}"
        );
        assert!(
            result.stderr.contains(expected),
            "{what}: expected an error naming {expected:?}, kubectl said:\n{}",
            result.stderr
        );
    }

    // The status subresource takes conditions and validates them too.
    let status_patch = r#"{"status":{"conditions":[{"type":"Accepted","status":"False","reason":"UnknownService","message":"backend web-v3 names no Service","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    let patched = kube
        .kubectl(&[
            "patch",
            "trafficsplit",
            "web",
            "-n",
            "shop",
            "--subresource=status",
            "--type=merge",
            "-p",
            status_patch,
        ])
        .unwrap_or_else(|e| panic!("kubectl patch status: {e}"));
    assert!(patched.success, "status patch refused: {}", patched.stderr);
    let reason = kube
        .kubectl(&[
            "get",
            "trafficsplit",
            "web",
            "-n",
            "shop",
            "-o",
            "jsonpath={.status.conditions[0].reason}",
        ])
        .unwrap_or_else(|e| panic!("kubectl get trafficsplit: {e}"));
    assert_eq!(reason.stdout, "UnknownService");
    let bad_status = status_patch.replace("\"False\"", "\"Maybe\"");
    let refused = kube
        .kubectl(&[
            "patch",
            "trafficsplit",
            "web",
            "-n",
            "shop",
            "--subresource=status",
            "--type=merge",
            "-p",
            &bad_status,
        ])
        .unwrap_or_else(|e| panic!("kubectl patch status: {e}"));
    assert!(
        !refused.success,
        "a condition with status Maybe was accepted"
    );
    assert!(
        refused.stderr.contains("Unsupported value: \"Maybe\""),
        "{}",
        refused.stderr
    );
}

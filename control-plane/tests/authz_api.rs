//! `Inbound/Watch` against the real `weft-control` binary on loopback: it requires mTLS,
//! answers only the pod's own identity, streams the effective policy and sends the new one
//! within 2 s of a policy file edit; a broken edit changes nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use weft_api::inbound::inbound_client::InboundClient;
use weft_api::inbound::{Action, DefaultPolicy, InboundPolicy, PortProtocol, Source, WatchRequest};
use weft_certs::SpiffeId;

mod common;

use common::{certified_channels, replace_manifest, sha256_hex, start_control, write_identity};

/// Namespace `shop` (default deny) with pods `postgres-0` (sa postgres) and `api-0` (sa api),
/// each with a bootstrap token `<pod>-token`.
fn pods_yaml() -> String {
    format!(
        "
apiVersion: v1
kind: List
items:
- {{apiVersion: v1, kind: Namespace, metadata: {{name: shop, annotations: {{weft.io/inject: enabled, config.weft.io/default-inbound-policy: deny}}}}}}
- apiVersion: v1
  kind: Pod
  metadata: {{name: postgres-0, namespace: shop, labels: {{app: postgres}}, annotations: {{weft.io/token-sha256: {postgres}, config.weft.io/require-mtls-ports: '5432'}}}}
  spec:
    serviceAccountName: postgres
    containers: [{{name: db, ports: [{{name: pg, containerPort: 5432}}], livenessProbe: {{httpGet: {{path: /healthz, port: 8081}}}}}}]
  status: {{podIP: 198.18.4.2}}
- apiVersion: v1
  kind: Pod
  metadata: {{name: api-0, namespace: shop, labels: {{app: api}}, annotations: {{weft.io/token-sha256: {api}}}}}
  spec: {{serviceAccountName: api}}
  status: {{podIP: 198.18.4.3}}
",
        postgres = sha256_hex(b"postgres-0-token"),
        api = sha256_hex(b"api-0-token"),
    )
}

fn policy_yaml(service_account: &str) -> String {
    format!(
        "apiVersion: policy.weft.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: postgres-from-api, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: postgres}}}}\n  ports: [pg]\n  rules:\n  - from: [{{serviceAccounts: [\"{service_account}\"]}}]\n"
    )
}

/// Replaces a manifest atomically, as editors and config tools do.
fn setup(dir: &Path) {
    write_identity(dir);
    let manifests = dir.join("manifests");
    std::fs::write(manifests.join("pods.yaml"), pods_yaml()).unwrap();
    std::fs::write(manifests.join("policy.yaml"), policy_yaml("shop/api")).unwrap();
}

/// Certifies as `spiffe://cluster.local/ns/shop/sa/<sa>` with `<pod>-token`, waiting for
/// the control plane to listen.
async fn clients(dir: &Path, port: u16, pod: &str, sa: &str) -> common::Channels {
    let identity = SpiffeId::new("cluster.local", "shop", sa).unwrap();
    certified_channels(dir, port, &identity, format!("{pod}-token").as_bytes()).await
}

fn watch(pod: &str, port: u32) -> WatchRequest {
    WatchRequest {
        namespace: "shop".into(),
        pod: pod.into(),
        port,
    }
}

fn allowed_service_accounts(policy: &InboundPolicy) -> Vec<Vec<String>> {
    policy
        .policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| &r.from)
        .map(|s: &Source| s.service_accounts.clone())
        .collect()
}

async fn next(stream: &mut tonic::Streaming<InboundPolicy>, within: Duration) -> InboundPolicy {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("no update in time")
        .expect("stream error")
        .expect("stream ended")
}

#[tokio::test(flavor = "current_thread")]
async fn inbound_watch_streams_policy_and_refuses_other_pods() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let manifests = dir.path().join("manifests");
    let (_control, port) = start_control(dir.path(), &[]);
    let postgres = clients(dir.path(), port, "postgres-0", "postgres").await;

    // No client certificate: refused before anything is looked up.
    let err = InboundClient::new(postgres.plain.clone())
        .watch(watch("postgres-0", 5432))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut client = InboundClient::new(postgres.mtls.clone());
    // Another pod's policy is not postgres' business, even in its own namespace.
    let err = client.watch(watch("api-0", 8080)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = client.watch(watch("postgres-0", 70_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let mut stream = client
        .watch(watch("postgres-0", 5432))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(first.protocol, PortProtocol::Opaque as i32);
    assert!(first.require_mtls);
    assert_eq!(first.default_policy, DefaultPolicy::Deny as i32);
    assert_eq!(first.trust_domain, "cluster.local");
    assert_eq!(first.policies.len(), 1, "{first:?}");
    assert_eq!(first.policies[0].name, "shop/postgres-from-api");
    assert_eq!(first.policies[0].action, Action::Allow as i32);
    assert_eq!(allowed_service_accounts(&first), vec![vec!["shop/api"]]);
    assert!(first.probe_paths.is_empty());

    // The probe port answers with its probe path and no policy (ports: [pg]).
    let mut probe_port = client
        .watch(watch("postgres-0", 8081))
        .await
        .unwrap()
        .into_inner();
    let probe = next(&mut probe_port, Duration::from_secs(5)).await;
    assert_eq!(probe.probe_paths, vec!["/healthz"]);
    assert!(probe.policies.is_empty());
    assert!(!probe.require_mtls);
    assert_eq!(probe.protocol, PortProtocol::Detect as i32);

    // Editing the policy file: the open stream has the new policy within 2 s.
    let edited_at = Instant::now();
    replace_manifest(&manifests, "policy.yaml", &policy_yaml("shop/web"));
    let edited = next(&mut stream, Duration::from_secs(2)).await;
    assert!(edited_at.elapsed() < Duration::from_secs(2));
    assert_eq!(allowed_service_accounts(&edited), vec![vec!["shop/web"]]);

    // A broken edit changes nothing: the last valid version stays, nothing is sent.
    replace_manifest(&manifests, "policy.yaml", &policy_yaml("shop/Web"));
    let quiet = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    assert!(quiet.is_err(), "a broken edit was streamed: {quiet:?}");

    // Deleting the policy: the port falls back to the namespace default alone.
    std::fs::remove_file(manifests.join("policy.yaml")).unwrap();
    let removed = next(&mut stream, Duration::from_secs(2)).await;
    assert!(removed.policies.is_empty(), "{removed:?}");
    assert_eq!(removed.default_policy, DefaultPolicy::Deny as i32);

    // The pod moving to another service account ends the stream: it is no longer postgres'.
    std::fs::write(
        manifests.join("pods.yaml"),
        pods_yaml().replace("serviceAccountName: postgres", "serviceAccountName: db"),
    )
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("no answer within 2 s");
    assert_eq!(
        ended.map(|_| ()).unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "current_thread")]
async fn cluster_default_flag_and_unknown_pods() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let manifests = dir.path().join("manifests");
    // Without the namespace's own default, the flag applies.
    std::fs::write(
        manifests.join("pods.yaml"),
        pods_yaml().replace(", config.weft.io/default-inbound-policy: deny", ""),
    )
    .unwrap();
    let (_control, port) = start_control(
        dir.path(),
        &["--default-inbound-policy", "cluster-authenticated"],
    );
    let api = clients(dir.path(), port, "api-0", "api").await;
    let mut client = InboundClient::new(api.mtls);

    let mut own = client
        .watch(watch("api-0", 8080))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut own, Duration::from_secs(5)).await;
    assert_eq!(
        first.default_policy,
        DefaultPolicy::ClusterAuthenticated as i32
    );
    assert!(first.policies.is_empty());

    // A pod not (yet) in the state, in the caller's namespace: the defaults; then the pod
    // appears with the caller's service account and the answer follows.
    let mut unknown = client
        .watch(watch("api-1", 8080))
        .await
        .unwrap()
        .into_inner();
    let before = next(&mut unknown, Duration::from_secs(5)).await;
    assert_eq!(
        before.default_policy,
        DefaultPolicy::ClusterAuthenticated as i32
    );
    assert!(before.policies.is_empty());
    replace_manifest(
        &manifests,
        "api-1.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api-1\n  namespace: shop\n  annotations: {config.weft.io/default-inbound-policy: deny}\nspec: {serviceAccountName: api}\n",
    );
    let after = next(&mut unknown, Duration::from_secs(2)).await;
    assert_eq!(after.default_policy, DefaultPolicy::Deny as i32);
}

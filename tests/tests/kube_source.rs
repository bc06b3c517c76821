//! `weft-control --source kube` against a real kube-apiserver: objects applied with kubectl
//! reach a Destination stream, TrafficSplits get an `Accepted` status condition, a restart
//! rebuilds the same state, and Certify proves ServiceAccount tokens with TokenReviews.
//! The test plays the kubelet (it writes pod IPs into pod status).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde_json::Value as Json;
use tonic::transport::Channel;
use tonic::Code;
use weft_api::destination::destination_client::DestinationClient;
use weft_api::destination::{OutboundPolicy, WatchRequest};
use weft_api::identity::identity_client::IdentityClient;
use weft_api::identity::{CertifyRequest, CertifyResponse};
use weft_certs::{client_config, generate_identity, SpiffeId, TrustAnchors, WorkloadKey};
use weft_e2e::kube::KubeFixture;
use weft_e2e::kubelet::{report_running, request_token};

const TD: &str = "cluster.local";

/// `weft-control` as a child process; killed on drop. Its stderr goes to a file so a failing
/// test can show it.
struct Control {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Control {
    fn start(dir: &Path, args: &[&str], log_name: &str) -> Control {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join(log_name);
        let child = Command::new(weft_e2e::bin("weft-control").unwrap())
            .args(["--identity", &dir.join("identity").display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("WEFT_LOG", "info,weft_control=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Control { child, log, port }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- weft-control log -----\n{}", self.logs());
        }
    }
}

fn write_identity(dir: &Path) {
    let generated =
        generate_identity(TD, Duration::from_secs(86_400), Duration::from_secs(3_600)).unwrap();
    let id = dir.join("identity");
    std::fs::create_dir_all(&id).unwrap();
    std::fs::write(id.join("trust-anchors.pem"), &generated.trust_anchors_pem).unwrap();
    std::fs::write(id.join("issuer.pem"), &generated.issuer_pem).unwrap();
    std::fs::write(id.join("issuer-key.pem"), &generated.issuer_key_pem).unwrap();
}

fn kubectl(kube: &KubeFixture, args: &[&str]) -> String {
    let result = kube.kubectl(args).unwrap();
    assert!(
        result.success,
        "kubectl {}: {}",
        args.join(" "),
        result.stderr
    );
    result.stdout
}

fn apply(kube: &KubeFixture, yaml: &str) {
    kube.apply_ok(yaml).unwrap();
}

/// A TokenRequest-API token for `sa` in `ns`.
fn token(kube: &KubeFixture, ns: &str, sa: &str, audience: &str) -> Vec<u8> {
    request_token(kube, ns, sa, audience, None)
        .unwrap()
        .into_bytes()
}

fn install_crds(kube: &KubeFixture) {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/crds");
    kubectl(kube, &["apply", "-f", &crds.display().to_string()]);
    kubectl(
        kube,
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
    );
}

struct Client {
    anchors: TrustAnchors,
    addr: String,
}

impl Client {
    fn new(dir: &Path, port: u16) -> Client {
        let anchors =
            TrustAnchors::from_pem(&std::fs::read(dir.join("identity/trust-anchors.pem")).unwrap())
                .unwrap();
        Client {
            anchors,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    fn channel(&self, store: Option<std::sync::Arc<weft_certs::CertStore>>) -> Channel {
        let control_name = ServerName::try_from(
            SpiffeId::parse("spiffe://cluster.local/ns/weft/sa/weft-control")
                .unwrap()
                .tls_server_name(),
        )
        .unwrap();
        weft_proxy::control::channel(
            &self.addr,
            control_name,
            client_config(&self.anchors, store, &[b"h2"]).unwrap(),
        )
        .unwrap()
    }

    /// Certify as `identity` with `token`, waiting up to 30 s for the control plane to listen.
    async fn certify(
        &self,
        identity: &SpiffeId,
        token: &[u8],
    ) -> (WorkloadKey, Result<CertifyResponse, tonic::Status>) {
        let key = WorkloadKey::generate().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let req = CertifyRequest {
                identity: identity.to_string(),
                token: token.to_vec(),
                csr_der: key.csr_der(identity).unwrap(),
            };
            match IdentityClient::new(self.channel(None)).certify(req).await {
                // Not listening yet; an UNAVAILABLE from the TokenReview is an answer.
                Err(s)
                    if s.code() == Code::Unavailable
                        && !s.message().contains("TokenReview")
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                result => return (key, result.map(|r| r.into_inner())),
            }
        }
    }

    /// A Destination client on mTLS as `identity`, certified with `token`.
    async fn destination(&self, identity: &SpiffeId, token: &[u8]) -> DestinationClient<Channel> {
        let (key, cert) = self.certify(identity, token).await;
        let cert = cert.unwrap_or_else(|s| panic!("certify as {identity}: {s:?}"));
        let store = weft_certs::CertStore::new(identity.clone());
        let not_after = std::time::UNIX_EPOCH + Duration::from_secs(cert.not_after_unix as u64);
        store.install(
            key.certified_key(cert.leaf_der, cert.chain_der).unwrap(),
            not_after,
        );
        DestinationClient::new(self.channel(Some(store)))
    }
}

/// (backend, weight, endpoint addresses) of the first route, the way a proxy balances.
fn split_of(policy: &OutboundPolicy) -> Vec<(String, u32, Vec<String>)> {
    policy
        .routes
        .first()
        .map(|route| {
            route
                .backends
                .iter()
                .map(|b| {
                    let mut addresses: Vec<String> =
                        b.endpoints.iter().map(|e| e.address.clone()).collect();
                    addresses.sort();
                    (b.name.clone(), b.weight, addresses)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn expected_split(v1: u32, v2: u32) -> Vec<(String, u32, Vec<String>)> {
    vec![
        ("web-v1.shop".into(), v1, vec!["10.244.1.1:8080".into()]),
        ("web-v2.shop".into(), v2, vec!["10.244.1.2:8080".into()]),
    ]
}

/// Reads the stream until a message satisfies `done`, within `within`; returns it.
async fn wait_for_message(
    stream: &mut tonic::Streaming<OutboundPolicy>,
    within: Duration,
    what: &str,
    done: impl Fn(&OutboundPolicy) -> bool,
) -> OutboundPolicy {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(message))) => {
                if done(&message) {
                    return message;
                }
                last = Some(message);
            }
            Ok(other) => panic!("{what}: stream ended: {other:?}"),
            Err(_) => panic!("{what}: not seen within {within:?}; last message: {last:?}"),
        }
    }
}

fn split_yaml(name: &str, backend2: &str, v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  service: web\n  backends: [{{service: web-v1, weight: {v1}}}, {{service: {backend2}, weight: {v2}}}]\n"
    )
}

const SHOP: &str = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, annotations: {weft.io/inject: enabled}}}
- {apiVersion: v1, kind: ServiceAccount, metadata: {name: web, namespace: shop}}
- {apiVersion: v1, kind: ServiceAccount, metadata: {name: client, namespace: shop}}
- {apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 10.96.10.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: web-v1, namespace: shop}, spec: {clusterIP: 10.96.10.11, selector: {app: web, version: v1}, ports: [{port: 80, targetPort: 8080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: web-v2, namespace: shop}, spec: {clusterIP: 10.96.10.12, selector: {app: web, version: v2}, ports: [{port: 80, targetPort: 8080}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-v1-0, namespace: shop, labels: {app: web, version: v1}, annotations: {weft.io/injected: 'true'}}, spec: {serviceAccountName: web, containers: [{name: app, image: weft/testapp, ports: [{containerPort: 8080}]}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-v2-0, namespace: shop, labels: {app: web, version: v2}}, spec: {serviceAccountName: web, containers: [{name: app, image: weft/testapp, ports: [{containerPort: 8080}]}]}}
";

/// The `Accepted` condition weft wrote on `resource/name` (for HTTPRoutes: in its
/// `status.parents` entry), once it is present and `done` holds.
fn wait_for_condition(
    kube: &KubeFixture,
    resource: &str,
    name: &str,
    done: impl Fn(&Json) -> bool,
) -> (Json, Json) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let object: Json = serde_json::from_str(&kubectl(
            kube,
            &["get", resource, name, "-n", "shop", "-o", "json"],
        ))
        .unwrap();
        let conditions = if resource == "httproute" {
            object["status"]["parents"]
                .as_array()
                .and_then(|p| {
                    p.iter()
                        .find(|p| p["controllerName"] == "weft.io/control-plane")
                })
                .map(|p| p["conditions"].clone())
                .unwrap_or(Json::Null)
        } else {
            object["status"]["conditions"].clone()
        };
        let condition = conditions
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
            .cloned();
        if let Some(condition) = condition {
            if done(&condition) {
                return (object, condition);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{resource} {name}: no matching Accepted condition: {}",
            object["status"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn kube_source_streams_changes_reports_status_and_survives_restart() {
    let Some(kube) = KubeFixture::start("kube_source") else {
        return;
    };
    let dir = kube.dir().join("weft");
    std::fs::create_dir_all(&dir).unwrap();
    write_identity(&dir);
    install_crds(&kube);
    apply(&kube, SHOP);
    report_running(&kube, "shop", "web-v1-0", "10.244.1.1").unwrap();
    report_running(&kube, "shop", "web-v2-0", "10.244.1.2").unwrap();
    apply(&kube, &split_yaml("web-split", "web-v2", 90, 10));

    let kubeconfig = kube.kubeconfig().display().to_string();
    let args = ["--source", "kube", "--kubeconfig", kubeconfig.as_str()];
    let mut control = Control::start(&dir, &args, "control-1.log");
    let client_id = SpiffeId::new(TD, "shop", "client").unwrap();
    let watch = WatchRequest {
        target: "10.96.10.10:80".into(),
        caller_identity: client_id.to_string(),
    };
    let rt = runtime();
    rt.block_on(async {
        let client = Client::new(&dir, control.port);
        let token = token(&kube, "shop", "client", "identity.weft.io");
        let mut destination = client.destination(&client_id, &token).await;
        let mut stream = destination.watch(watch.clone()).await.unwrap().into_inner();
        let first = wait_for_message(&mut stream, Duration::from_secs(15), "initial split", |m| {
            split_of(m) == expected_split(90, 10)
        })
        .await;
        assert!(first.known);
        assert_eq!(first.service, "web.shop");
        // Meshed means injected: web-v1-0 carries the injector's mark, web-v2-0 (in the
        // same annotated namespace, as a pod created before the annotation) does not.
        let identities: Vec<(String, String)> = first.routes[0]
            .backends
            .iter()
            .flat_map(|b| &b.endpoints)
            .map(|e| (e.address.clone(), e.identity.clone()))
            .collect();
        assert!(
            identities.contains(&(
                "10.244.1.1:8080".into(),
                "spiffe://cluster.local/ns/shop/sa/web".into()
            )),
            "{identities:?}"
        );
        assert!(
            identities.contains(&("10.244.1.2:8080".into(), String::new())),
            "{identities:?}"
        );

        // A changed split streams to the open watch.
        let applied = Instant::now();
        apply(&kube, &split_yaml("web-split", "web-v2", 50, 50));
        wait_for_message(&mut stream, Duration::from_secs(5), "changed split", |m| {
            split_of(m) == expected_split(50, 50)
        })
        .await;
        eprintln!("split change reached the stream in {:?}", applied.elapsed());
    });

    // Status: the good split is accepted; one for a Service that does not exist is not.
    let (good, condition) = wait_for_condition(&kube, "trafficsplit", "web-split", |c| {
        c["status"] == "True"
    });
    assert_eq!(condition["reason"], "Accepted");
    assert_eq!(
        condition["observedGeneration"], good["metadata"]["generation"],
        "{condition}"
    );
    apply(&kube, &split_yaml("bad-split", "web-v9", 50, 50));
    let (_, condition) = wait_for_condition(&kube, "trafficsplit", "bad-split", |c| {
        c["status"] == "False"
    });
    assert_eq!(condition["reason"], "UnknownService", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("web-v9")),
        "{condition}"
    );
    assert!(
        control.logs().contains("bad-split"),
        "the refusal is logged:\n{}",
        control.logs()
    );
    // Our own status patches must not make the control plane patch again and again.
    let resource_version = |name: &str| {
        kubectl(
            &kube,
            &[
                "get",
                "trafficsplit",
                name,
                "-n",
                "shop",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )
    };
    let before = resource_version("bad-split");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(before, resource_version("bad-split"), "status patch loop");

    // Restart: the new process lists everything again and serves the same state, then
    // follows changes made after it started.
    control.kill();
    let control = Control::start(&dir, &args, "control-2.log");
    rt.block_on(async {
        let client = Client::new(&dir, control.port);
        let token = token(&kube, "shop", "client", "identity.weft.io");
        let mut destination = client.destination(&client_id, &token).await;
        let mut stream = destination.watch(watch.clone()).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(
            split_of(&first),
            expected_split(50, 50),
            "the first answer after a restart is the whole state: {first:?}"
        );
        apply(&kube, &split_yaml("web-split", "web-v2", 20, 80));
        wait_for_message(
            &mut stream,
            Duration::from_secs(5),
            "split change after restart",
            |m| split_of(m) == expected_split(20, 80),
        )
        .await;

        // A bad edit of an accepted split is refused and the last accepted version stays.
        apply(&kube, &split_yaml("web-split", "web-v9", 20, 80));
        let (_, condition) = wait_for_condition(&kube, "trafficsplit", "web-split", |c| {
            c["status"] == "False"
        });
        assert_eq!(condition["reason"], "UnknownService", "{condition}");
        assert!(
            condition["message"]
                .as_str()
                .is_some_and(|m| m.contains("stays in force")),
            "{condition}"
        );
        let mut fresh = destination.watch(watch.clone()).await.unwrap().into_inner();
        let now = fresh.message().await.unwrap().unwrap();
        assert_eq!(split_of(&now), expected_split(20, 80), "{now:?}");
    });

    // HTTPRoutes report per parent (Gateway API); a regex the API server cannot check is
    // refused by weft. AuthorizationPolicies report in status.conditions.
    apply(&kube, ROUTE_AND_POLICIES);
    let (_, condition) =
        wait_for_condition(&kube, "httproute", "v1-route", |c| c["status"] == "True");
    assert_eq!(condition["reason"], "Accepted", "{condition}");
    let (_, condition) =
        wait_for_condition(&kube, "httproute", "bad-regex", |c| c["status"] == "False");
    assert_eq!(condition["reason"], "Invalid", "{condition}");
    let (_, condition) = wait_for_condition(&kube, "authorizationpolicy", "good-policy", |c| {
        c["status"] == "True"
    });
    assert_eq!(condition["reason"], "Accepted", "{condition}");
    let (_, condition) = wait_for_condition(&kube, "authorizationpolicy", "bad-policy", |c| {
        c["status"] == "False"
    });
    assert_eq!(condition["reason"], "Invalid", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("regex")),
        "{condition}"
    );
    drop(control);
}

const ROUTE_AND_POLICIES: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: v1-route, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: web-v1, port: 80}]
    rules: [{backendRefs: [{name: web-v1, port: 80}]}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: bad-regex, namespace: shop}
  spec:
    parentRefs: [{group: "", kind: Service, name: web-v2, port: 80}]
    rules:
    - matches: [{path: {type: RegularExpression, value: "/(["}}]
      backendRefs: [{name: web-v2, port: 80}]
- apiVersion: policy.weft.io/v1alpha1
  kind: AuthorizationPolicy
  metadata: {name: good-policy, namespace: shop}
  spec:
    selector: {matchLabels: {app: web}}
    action: ALLOW
    rules: [{from: [{namespaces: [shop]}]}]
- apiVersion: policy.weft.io/v1alpha1
  kind: AuthorizationPolicy
  metadata: {name: bad-policy, namespace: shop}
  spec:
    selector: {matchLabels: {app: web}}
    action: DENY
    rules: [{to: [{paths: ["regex:/(["]}]}]
"#;

#[test]
fn token_review_certifies_exactly_the_token_service_account() {
    let Some(kube) = KubeFixture::start("kube_tokenreview") else {
        return;
    };
    let dir = kube.dir().join("weft");
    std::fs::create_dir_all(&dir).unwrap();
    write_identity(&dir);
    // No CRDs installed: the source warns and serves the rest.
    apply(
        &kube,
        "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: ServiceAccount, metadata: {name: web, namespace: shop}}
- {apiVersion: v1, kind: ServiceAccount, metadata: {name: api, namespace: shop}}
",
    );
    let kubeconfig = kube.kubeconfig().display().to_string();
    let control = Control::start(
        &dir,
        &["--source", "kube", "--kubeconfig", kubeconfig.as_str()],
        "control.log",
    );
    let web = SpiffeId::new(TD, "shop", "web").unwrap();
    let web_token = token(&kube, "shop", "web", "identity.weft.io");
    let api_token = token(&kube, "shop", "api", "identity.weft.io");
    let other_audience = token(&kube, "shop", "web", "https://example.invalid");
    runtime().block_on(async {
        let client = Client::new(&dir, control.port);
        let (_, issued) = client.certify(&web, &web_token).await;
        let issued = issued.unwrap_or_else(|s| panic!("certify web: {s:?}"));
        assert!(!issued.leaf_der.is_empty());
        // The certificate names exactly the service account: its URI SAN is the SPIFFE ID.
        let spiffe = web.to_string();
        assert!(
            issued
                .leaf_der
                .windows(spiffe.len())
                .any(|w| w == spiffe.as_bytes()),
            "leaf does not carry {spiffe}"
        );
        let (_, err) = client.certify(&web, &api_token).await;
        let err = err.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let (_, err) = client.certify(&web, &other_audience).await;
        let err = err.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let (_, err) = client.certify(&web, b"not-a-token").await;
        assert_eq!(err.unwrap_err().code(), Code::Unauthenticated);
    });
    let logs = control.logs();
    assert!(logs.contains("CRD not installed"), "{logs}");
    assert!(logs.contains("published cluster state"), "{logs}");
    for secret in [&web_token, &api_token, &other_audience] {
        let secret = String::from_utf8_lossy(secret);
        assert!(!logs.contains(secret.as_ref()), "a token was logged");
    }
    drop(control);

    // An API server that cannot be reached: UNAVAILABLE, so proxies retry.
    let unreachable = dir.join("unreachable.kubeconfig");
    let text = std::fs::read_to_string(kube.kubeconfig()).unwrap();
    std::fs::write(
        &unreachable,
        text.replace(kube.server_url(), "https://127.0.0.1:1"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let manifests = format!("dir:{}", dir.join("manifests").display());
    let unreachable = unreachable.display().to_string();
    let control = Control::start(
        &dir,
        &[
            "--source",
            manifests.as_str(),
            "--token-review",
            "--kubeconfig",
            unreachable.as_str(),
        ],
        "control-unreachable.log",
    );
    runtime().block_on(async {
        let client = Client::new(&dir, control.port);
        let (_, result) = client.certify(&web, &web_token).await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("TokenReview"), "{status:?}");
    });
}

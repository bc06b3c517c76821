//! The control plane's gRPC API as a proxy sees it, against the real `weft-control`
//! binary on loopback (no root needed): Certify refuses a CSR for another identity, an
//! unknown token and a garbage CSR, each with a precise status; Destination requires mTLS
//! and streams changes of the watched directory.

use std::path::Path;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tonic::Code;
use weft_api::identity::identity_client::IdentityClient;
use weft_api::identity::CertifyRequest;
use weft_certs::{client_config, spiffe_id_of_cert, SpiffeId, TrustAnchors, WorkloadKey};

mod common;

use common::{certified_channels, replace_manifest, sha256_hex, start_control, write_identity};

fn write_setup(dir: &Path) {
    write_identity(dir);
    let manifests = dir.join("manifests");
    std::fs::write(
        manifests.join("pods.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api-0\n  namespace: shop\n  annotations:\n    weft.io/inject: enabled\n    weft.io/token-sha256: {}\nspec:\n  serviceAccountName: api\nstatus:\n  podIP: 198.18.0.2\n",
            sha256_hex(b"api-token")
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn certify_refusals_have_precise_statuses() {
    let dir = std::env::temp_dir().join(format!("weft-certify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_setup(&dir);
    let (_control, port) = start_control(&dir, &[]);
    let anchors =
        TrustAnchors::from_pem(&std::fs::read(dir.join("identity/trust-anchors.pem")).unwrap())
            .unwrap();
    let control_id = SpiffeId::parse("spiffe://cluster.local/ns/weft/sa/weft-control").unwrap();
    let channel = weft_proxy::control::channel(
        &format!("127.0.0.1:{port}"),
        ServerName::try_from(control_id.tls_server_name()).unwrap(),
        client_config(&anchors, None, &[b"h2"]).unwrap(),
    )
    .unwrap();
    let mut client = IdentityClient::new(channel);
    let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/admin").unwrap();
    let key = WorkloadKey::generate().unwrap();

    // Wait for the control plane to listen (a valid request succeeds).
    let deadline = Instant::now() + Duration::from_secs(20);
    let ok = loop {
        let req = CertifyRequest {
            identity: api.to_string(),
            token: b"api-token".to_vec(),
            csr_der: key.csr_der(&api).unwrap(),
        };
        match client.certify(req).await {
            Ok(rsp) => break rsp.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("valid certify failed: {s:?}"),
        }
    };
    assert_eq!(spiffe_id_of_cert(&ok.leaf_der).unwrap(), api);
    assert_eq!(ok.chain_der.len(), 1);
    key.certified_key(ok.leaf_der.clone(), ok.chain_der.clone())
        .unwrap();

    // A CSR for another identity, with a valid token.
    let err = client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: b"api-token".to_vec(),
            csr_der: key.csr_der(&other).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Asking for another identity outright.
    let err = client
        .certify(CertifyRequest {
            identity: other.to_string(),
            token: b"api-token".to_vec(),
            csr_der: key.csr_der(&other).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Wrong token.
    let err = client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: b"guessed".to_vec(),
            csr_der: key.csr_der(&api).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // No token.
    let err = client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: vec![],
            csr_der: key.csr_der(&api).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Garbage CSR.
    let err = client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: b"api-token".to_vec(),
            csr_der: b"not a csr".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Oversized CSR: refused by the CSR check, and far larger ones before decoding.
    let err = client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: b"api-token".to_vec(),
            csr_der: vec![0x30; 8_000],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: b"api-token".to_vec(),
            csr_der: vec![0x30; 100_000],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Still serving after all that.
    client
        .certify(CertifyRequest {
            identity: api.to_string(),
            token: b"api-token".to_vec(),
            csr_der: key.csr_der(&api).unwrap(),
        })
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "current_thread")]
async fn destination_requires_mtls_and_streams_changes() {
    use weft_api::destination::destination_client::DestinationClient;
    use weft_api::destination::WatchRequest;

    let dir = std::env::temp_dir().join(format!("weft-destination-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_setup(&dir);
    let (_control, port) = start_control(&dir, &[]);
    let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
    // Certify first (no client certificate yet), then hold both channels.
    let channels = certified_channels(&dir, port, &api, b"api-token").await;
    let watch = |target: &str| WatchRequest {
        target: target.to_string(),
        caller_identity: api.to_string(),
    };

    // Without a client certificate, Destination refuses.
    let err = DestinationClient::new(channels.plain)
        .watch(watch("198.18.0.2:8080"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut client = DestinationClient::new(channels.mtls);

    // Claiming to be someone else is refused; a bad target is refused.
    let mut other = watch("198.18.0.2:8080");
    other.caller_identity = "spiffe://cluster.local/ns/shop/sa/admin".into();
    assert_eq!(
        client.watch(other).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        client.watch(watch("no-port")).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // A meshed pod's IP: known, its identity expected.
    let mut pod = client
        .watch(watch("198.18.0.2:8080"))
        .await
        .unwrap()
        .into_inner();
    let first = pod.message().await.unwrap().unwrap();
    assert!(first.known);
    assert_eq!(first.endpoints.len(), 1);
    assert_eq!(first.endpoints[0].address, "198.18.0.2:8080");
    assert_eq!(first.endpoints[0].identity, api.to_string());

    // A Service that does not exist yet: unknown; then the file appears and the stream says so.
    let mut svc = client
        .watch(watch("198.19.0.10:80"))
        .await
        .unwrap()
        .into_inner();
    let before = svc.message().await.unwrap().unwrap();
    assert!(!before.known && before.endpoints.is_empty());
    std::fs::write(
        dir.join("manifests/service.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\nspec:\n  clusterIP: 198.19.0.10\n  selector: {}\n  ports:\n  - port: 80\n    targetPort: 8080\n",
    )
    .unwrap();
    let after = tokio::time::timeout(Duration::from_secs(10), svc.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(after.known, "{after:?}");
    assert_eq!(after.service, "api.shop");
    // The selector matches no pod yet ({} selects nothing): no endpoints.
    assert!(after.endpoints.is_empty(), "{after:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Certifies as `spiffe://cluster.local/ns/shop/sa/api` (waiting for the control plane to
/// listen) and returns a Destination client on an mTLS channel with that certificate.
async fn destination_client(
    dir: &Path,
    port: u16,
) -> weft_api::destination::destination_client::DestinationClient<tonic::transport::Channel> {
    let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
    let channels = certified_channels(dir, port, &api, b"api-token").await;
    weft_api::destination::destination_client::DestinationClient::new(channels.mtls)
}

const ROUTED_SHOP: &str = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, annotations: {weft.io/inject: enabled}}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-v1-0, namespace: shop, labels: {app: web, version: v1}}, spec: {serviceAccountName: web}, status: {podIP: 198.18.1.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-v2-0, namespace: shop, labels: {app: web, version: v2}}, spec: {serviceAccountName: web}, status: {podIP: 198.18.1.2}}
- {apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 198.19.1.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: web-v1, namespace: shop}, spec: {clusterIP: 198.19.1.11, selector: {version: v1}, ports: [{port: 80, targetPort: 8080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: web-v2, namespace: shop}, spec: {clusterIP: 198.19.1.12, selector: {version: v2}, ports: [{port: 80, targetPort: 8080}]}}
";

fn split_yaml(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{name: web-split, namespace: shop}}\nspec:\n  service: web\n  backends: [{{service: web-v1, weight: {v1}}}, {{service: web-v2, weight: {v2}}}]\n"
    )
}

#[tokio::test(flavor = "current_thread")]
async fn route_edits_reach_an_open_destination_stream() {
    use weft_api::destination::{path_match, WatchRequest};

    let dir = std::env::temp_dir().join(format!("weft-routes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_setup(&dir);
    let manifests = dir.join("manifests");
    std::fs::write(manifests.join("shop.yaml"), ROUTED_SHOP).unwrap();
    std::fs::write(manifests.join("split.yaml"), split_yaml(90, 10)).unwrap();
    let (_control, port) = start_control(&dir, &[]);
    let mut client = destination_client(&dir, port).await;

    let mut stream = client
        .watch(WatchRequest {
            target: "198.19.1.10:80".into(),
            caller_identity: "spiffe://cluster.local/ns/shop/sa/api".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.service, "web.shop");
    assert_eq!(first.routes.len(), 1, "{first:?}");
    let route = &first.routes[0];
    assert_eq!(route.name, "default");
    let split: Vec<_> = route
        .backends
        .iter()
        .map(|b| {
            let addresses: Vec<&str> = b.endpoints.iter().map(|e| e.address.as_str()).collect();
            (b.name.as_str(), b.weight, addresses)
        })
        .collect();
    assert_eq!(
        split,
        vec![
            ("web-v1.shop", 90, vec!["198.18.1.1:8080"]),
            ("web-v2.shop", 10, vec!["198.18.1.2:8080"]),
        ]
    );
    assert_eq!(
        route.backends[0].endpoints[0].identity,
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    // Editing the split: the open stream gets the new weights within 2 s.
    let edited_at = Instant::now();
    replace_manifest(&manifests, "split.yaml", &split_yaml(50, 50));
    let next = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("no update within 2 s")
        .unwrap()
        .unwrap();
    let weights: Vec<u32> = next.routes[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, vec![50, 50], "{next:?}");
    assert!(edited_at.elapsed() < Duration::from_secs(2));

    // An HTTPRoute for the same Service takes over from the split.
    replace_manifest(
        &manifests,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-routes, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api/v2}}]\n    backendRefs: [{name: web-v2}]\n    timeouts: {request: 3s}\n    retry: {attempts: 2}\n  - backendRefs: [{name: web-v1}]\n",
    );
    let routed = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("no update within 2 s")
        .unwrap()
        .unwrap();
    let names: Vec<&str> = routed.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["web-routes", "web-routes"], "{routed:?}");
    let api_v2 = &routed.routes[0];
    assert_eq!(
        api_v2.matches[0].path.as_ref().and_then(|p| p.kind.clone()),
        Some(path_match::Kind::Prefix("/api/v2".into()))
    );
    assert_eq!(api_v2.backends[0].name, "web-v2.shop");
    assert_eq!(api_v2.request_timeout_ms, 3000);
    let retry = api_v2.retry.as_ref().expect("retry policy");
    assert_eq!(retry.max_attempts, 3);
    assert_eq!(retry.codes, vec![502, 503, 504]);
    let budget = retry.budget.as_ref().expect("retry budget");
    assert_eq!(
        (
            budget.ratio,
            budget.min_retries_per_second,
            budget.window_secs
        ),
        (0.2, 10, 10)
    );
    assert_eq!(routed.routes[1].backends[0].name, "web-v1.shop");
    assert_eq!(routed.routes[1].retry, None);
    let _ = std::fs::remove_dir_all(&dir);
}

//! TrafficSplit and HTTPRoute from real manifest files to resolved route tables: the
//! fixture scenario in `fixtures/routes`, invalid objects skipped whole, and the watched
//! directory republishing an edited split.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_control::index::Index;
use weft_control::model::routes::{PathMatch, RouteMatch, StringMatch, ValueMatch};
use weft_control::model::{ClusterState, ResolvedRoute};
use weft_control::source::dir::{DirSource, LoadReport};

const TD: &str = "cluster.local";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/routes")
}

fn load() -> LoadReport {
    DirSource::new(fixtures()).load().unwrap()
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn routes(state: &ClusterState, target: &str) -> Vec<ResolvedRoute> {
    state.resolve(addr(target), TD).routes
}

/// (name, weight, endpoint addresses) of each backend.
fn backends(route: &ResolvedRoute) -> Vec<(&str, u32, Vec<String>)> {
    route
        .backends
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.weight,
                b.endpoints.iter().map(|e| e.addr.to_string()).collect(),
            )
        })
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn invalid_routes_and_splits_are_reported_and_skipped_whole() {
    let report = load();
    let problems: Vec<_> = report
        .problems
        .iter()
        .map(|p| {
            (
                p.file.file_name().and_then(|n| n.to_str()).unwrap_or(""),
                p.object.as_deref().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        problems,
        vec![
            ("invalid.yaml", "HTTPRoute shop/bad-regex"),
            ("invalid.yaml", "HTTPRoute shop/bad-filter"),
            ("invalid.yaml", "HTTPRoute shop/bad-duration"),
            ("invalid.yaml", "TrafficSplit shop/bad-weight"),
        ],
        "{:#?}",
        report.problems
    );
    let messages: Vec<&str> = report.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(
        messages[0].contains("regular expression"),
        "{}",
        messages[0]
    );
    assert!(messages[1].contains("filters"), "{}", messages[1]);
    assert!(messages[2].contains("\"2 seconds\""), "{}", messages[2]);
    assert!(messages[3].contains("weight"), "{}", messages[3]);

    let state = &report.state;
    let names = |keys: Vec<&(String, String)>| -> Vec<String> {
        keys.into_iter()
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect()
    };
    assert_eq!(
        names(state.traffic_splits.keys().collect()),
        strings(&["shop/cart-split", "shop/web-split"])
    );
    assert_eq!(
        names(state.http_routes.keys().collect()),
        strings(&[
            "shop/api-admin",
            "shop/api-routes",
            "shop/ghost-route",
            "shop/ingress",
            "shop/web-routes"
        ])
    );
    // Nothing of the invalid objects reached cart: only its split applies.
    let cart = routes(state, "10.96.1.30:80");
    assert_eq!(cart.len(), 1);
    assert_eq!(cart[0].name, "default");
}

#[test]
fn traffic_split_90_10_resolves_to_weighted_backends() {
    let state = load().state;
    let cart = state.resolve(addr("10.96.1.30:80"), TD);
    assert_eq!(cart.service.as_deref(), Some("cart.shop"));
    assert_eq!(cart.endpoints.len(), 2, "the apex keeps its own endpoints");
    assert_eq!(cart.routes.len(), 1);
    let route = &cart.routes[0];
    assert_eq!(route.name, "default");
    assert!(route.matches.is_empty());
    assert_eq!(
        backends(route),
        vec![
            ("cart-v1.shop", 90, strings(&["10.1.0.31:7000"])),
            ("cart-v2.shop", 10, strings(&["10.1.0.32:7000"])),
        ]
    );
    let identity = route.backends[0].endpoints[0]
        .identity
        .as_ref()
        .map(ToString::to_string);
    assert_eq!(
        identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
}

#[test]
fn http_route_table_is_in_precedence_order() {
    let state = load().state;
    let api = routes(&state, "10.96.1.20:80");
    assert!(api.iter().all(|r| r.name == "api-routes"), "{api:#?}");
    assert_eq!(api.len(), 3);

    // The /api/v2 prefix (second rule) outranks the header match, which outranks "/".
    assert_eq!(
        api[0].matches,
        vec![RouteMatch {
            path: PathMatch::Prefix("/api/v2".into()),
            ..RouteMatch::everything()
        }]
    );
    assert_eq!(
        backends(&api[0]),
        vec![("api-v2.shop", 1, strings(&["10.1.0.22:9000"]))]
    );
    assert_eq!(api[0].request_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        api[0].backend_request_timeout,
        Some(Duration::from_millis(500))
    );
    let retry = api[0].retry.as_ref().expect("retry policy");
    assert_eq!(retry.max_attempts, 3);
    assert_eq!(retry.codes, vec![500, 503]);
    assert_eq!(retry.backoff, Duration::from_millis(50));
    assert!(!retry.non_idempotent);
    assert_eq!(retry.budget.ratio, 0.1);
    assert_eq!(retry.budget.min_retries_per_second, 5);
    assert_eq!(retry.budget.window, Duration::from_secs(10));

    // A backend Service that does not exist: no endpoints (requests to it fail).
    assert_eq!(
        api[1].matches[0].headers,
        vec![ValueMatch {
            name: "x-canary".into(),
            value: StringMatch::Exact("true".into())
        }]
    );
    assert_eq!(backends(&api[1]), vec![("api-v3.shop", 1, vec![])]);

    assert_eq!(api[2].matches, vec![RouteMatch::everything()]);
    assert_eq!(
        backends(&api[2]),
        vec![("api-v1.shop", 1, strings(&["10.1.0.21:9000"]))]
    );
    assert_eq!(api[2].request_timeout, Some(Duration::from_secs(10)));
    assert_eq!(api[2].retry, None);
}

#[test]
fn http_route_wins_over_traffic_split_and_conflicts_are_named() {
    let state = load().state;
    let web = routes(&state, "10.96.1.10:80");
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].name, "web-routes");
    assert_eq!(
        backends(&web[0]),
        vec![
            ("web-v1.shop", 80, strings(&["10.1.0.11:8080"])),
            ("web-v2.shop", 20, strings(&["10.1.0.12:8080"])),
        ]
    );
    // Backend Services are reachable directly, unrouted.
    assert!(routes(&state, "10.96.1.11:80").is_empty());
    // Pod targets are never routed.
    assert!(routes(&state, "10.1.0.11:8080").is_empty());

    let conflicts = state.conflicts();
    let expect = |needles: &[&str]| {
        assert!(
            conflicts
                .iter()
                .any(|c| needles.iter().all(|needle| c.contains(needle))),
            "no conflict mentions {needles:?}: {conflicts:#?}"
        );
    };
    expect(&[
        "HTTPRoute shop/web-routes",
        "TrafficSplit shop/web-split",
        "wins",
    ]);
    expect(&["HTTPRoute shop/api-routes", "shop/api-v3", "does not exist"]);
    expect(&["HTTPRoute shop/api-admin", "no port matching"]);
    expect(&["HTTPRoute shop/ghost-route", "shop/ghost", "does not exist"]);
    assert_eq!(conflicts.len(), 4, "{conflicts:#?}");
}

/// Writes `text` to `path` the way editors and config tools do: a new file renamed into place.
fn replace_file(path: &Path, text: &str) {
    let temp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_split_is_republished() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let index = Index::new();
    let mut rx = index.subscribe();
    let task = tokio::spawn(DirSource::new(dir.path().to_owned()).run(index.clone()));
    let weights = |state: &ClusterState| -> Vec<u32> {
        state
            .resolve(addr("10.96.1.30:80"), TD)
            .routes
            .first()
            .map(|r| r.backends.iter().map(|b| b.weight).collect())
            .unwrap_or_default()
    };
    let first = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| weights(s) == [90, 10]),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(first, "initial state not published");

    let splits = dir.path().join("splits.yaml");
    let text = std::fs::read_to_string(&splits).unwrap();
    replace_file(
        &splits,
        &text
            .replace(
                "{service: cart-v1, weight: 90}",
                "{service: cart-v1, weight: 50}",
            )
            .replace(
                "{service: cart-v2, weight: 10}",
                "{service: cart-v2, weight: 50}",
            ),
    );
    let edited = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| weights(s) == [50, 50]),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(edited, "50/50 not published within 2 s");

    // Deleting the file removes the split: cart is unrouted again.
    std::fs::remove_file(&splits).unwrap();
    let gone = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| s.traffic_splits.is_empty()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(gone, "deletion not published within 2 s");
    assert!(weights(&index.snapshot()).is_empty());
    if task.is_finished() {
        panic!("the source stopped: {:?}", task.await);
    }
    task.abort();
}

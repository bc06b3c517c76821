//! The directory source against real files: the fixture scenario, last-good-state handling,
//! and the watcher publishing changes to the index.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use weft_certs::SpiffeId;
use weft_control::index::Index;
use weft_control::model::ClusterState;
use weft_control::source::dir::{DirSource, LoadReport};
use weft_control::source::{Problem, SourceError};

const TD: &str = "cluster.local";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cluster")
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn problems_for<'a>(report: &'a LoadReport, file: &str) -> Vec<&'a Problem> {
    report
        .problems
        .iter()
        .filter(|p| p.file.file_name().and_then(|n| n.to_str()) == Some(file))
        .collect()
}

/// A scratch copy of the fixture directory that tests may modify.
fn scratch_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn fixture_directory_loads_into_the_model() {
    let mut source = DirSource::new(fixtures());
    let report = source.load().unwrap();
    let state = &report.state;

    assert_eq!(
        state.namespaces.keys().collect::<Vec<_>>(),
        vec!["other", "shop"]
    );
    assert_eq!(
        state.pods.keys().cloned().collect::<Vec<_>>(),
        vec![
            key("shop", "api-1"),
            key("shop", "web-1"),
            key("shop", "web-2")
        ]
    );
    assert_eq!(
        state.services.keys().cloned().collect::<Vec<_>>(),
        vec![key("shop", "web")]
    );

    // Multi-document file, named targetPort resolved per pod, identity from serviceAccountName.
    let web = state.resolve(addr("10.96.0.10:80"), TD);
    assert!(web.known);
    assert_eq!(web.service.as_deref(), Some("web.shop"));
    let endpoints: Vec<_> = web
        .endpoints
        .iter()
        .map(|e| (e.addr, e.identity.clone()))
        .collect();
    let web_id = SpiffeId::new(TD, "shop", "web").unwrap();
    assert_eq!(
        endpoints,
        vec![
            (addr("10.0.0.11:8080"), Some(web_id.clone())),
            (addr("10.0.0.12:8081"), Some(web_id.clone()))
        ]
    );
    assert_eq!(state.identity_for_token(b"web-1-token", TD), Ok(web_id));

    // Non-manifest and dot files were not read (both would be YAML errors).
    assert!(report.problems.iter().all(|p| {
        let name = p
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        name != "notes.txt" && !name.starts_with('.')
    }));
    assert!(problems_for(&report, "00-namespaces.yaml").is_empty());
    assert!(problems_for(&report, "shop.yml").is_empty());
}

#[test]
fn broken_objects_are_reported_and_skipped() {
    let report = DirSource::new(fixtures()).load().unwrap();
    let problems = problems_for(&report, "broken-objects.yaml");
    let objects: Vec<_> = problems.iter().map(|p| p.object.as_deref()).collect();
    assert_eq!(
        objects,
        vec![Some("Pod shop/bad-ip"), Some("Service shop/bad-port"), None],
        "{problems:#?}"
    );
    assert!(
        problems[0].message.contains("status.podIP"),
        "{}",
        problems[0].message
    );
    assert!(
        problems[1].message.contains("port"),
        "{}",
        problems[1].message
    );
    assert!(
        problems[2].message.contains("metadata.name"),
        "{}",
        problems[2].message
    );

    let state = &report.state;
    assert!(!state.pods.contains_key(&key("shop", "bad-ip")));
    assert!(!state.services.contains_key(&key("shop", "bad-port")));
    // Neither half of a bad object leaks in: no pod at the unnamed pod's IP.
    assert!(!state.resolve(addr("10.0.0.40:80"), TD).known);
    // The valid object after the broken ones (and after a TrafficSplit) is there.
    assert!(state.pods.contains_key(&key("shop", "api-1")));
}

#[test]
fn duplicates_keep_the_first_definition() {
    let report = DirSource::new(fixtures()).load().unwrap();
    let problems = problems_for(&report, "zz-duplicates.yaml");
    let objects: Vec<_> = problems.iter().map(|p| p.object.as_deref()).collect();
    assert_eq!(
        objects,
        vec![Some("Pod shop/web-1"), Some("Service shop/web-copy")],
        "{problems:#?}"
    );
    assert!(
        problems[0].message.contains("shop.yml"),
        "{}",
        problems[0].message
    );
    assert!(
        problems[1].message.contains("10.96.0.10"),
        "{}",
        problems[1].message
    );

    let web1 = &report.state.pods[&key("shop", "web-1")];
    assert_eq!(web1.ip, Some("10.0.0.11".parse().unwrap()));
    assert!(!report.state.services.contains_key(&key("shop", "web-copy")));
}

#[test]
fn broken_file_keeps_its_last_good_objects_and_deleted_file_drops_them() {
    let dir = scratch_copy();
    let mut source = DirSource::new(dir.path().to_owned());
    let first = source.load().unwrap();
    assert!(first.state.pods.contains_key(&key("shop", "web-2")));

    let shop = dir.path().join("shop.yml");
    std::fs::write(
        &shop,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [half-written\n",
    )
    .unwrap();
    let broken = source.load().unwrap();
    let problems = problems_for(&broken, "shop.yml");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].message.contains("not valid YAML"),
        "{}",
        problems[0].message
    );
    assert!(
        problems[0].message.contains("last good"),
        "{}",
        problems[0].message
    );
    assert_eq!(broken.state, first.state, "state must be the last good one");

    // Still broken on the next load: still the last good objects.
    assert_eq!(source.load().unwrap().state, first.state);

    std::fs::remove_file(&shop).unwrap();
    let deleted = source.load().unwrap();
    assert!(!deleted.state.services.contains_key(&key("shop", "web")));
    assert!(!deleted.state.pods.contains_key(&key("shop", "web-2")));
    // zz-duplicates.yaml's web-1 and web-copy no longer collide with anything.
    assert_eq!(
        deleted.state.pods[&key("shop", "web-1")].ip,
        Some("10.0.0.99".parse().unwrap())
    );
    assert!(deleted
        .state
        .services
        .contains_key(&key("shop", "web-copy")));
}

#[test]
fn file_broken_from_the_start_contributes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "kind: Pod\nmetadata: {name: [\n").unwrap();
    let report = DirSource::new(dir.path().to_owned()).load().unwrap();
    assert_eq!(report.state, ClusterState::default());
    assert_eq!(report.problems.len(), 1);
    assert!(report.problems[0].message.contains("contributes nothing"));
}

#[test]
fn missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let result = DirSource::new(dir.path().join("absent")).load();
    assert!(
        matches!(result, Err(SourceError::Read { .. })),
        "{result:?}"
    );
}

const POD_TEMPLATE: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, annotations: {weft.io/inject: enabled}}
status: {podIP: POD_ADDRESS}
";

fn pod_yaml(ip: &str) -> String {
    POD_TEMPLATE.replace("POD_ADDRESS", ip)
}

async fn wait_for_pod_ip(rx: &mut tokio::sync::watch::Receiver<Arc<ClusterState>>, ip: &str) {
    let ip = ip.parse().unwrap();
    let found = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|state| state.pods.get(&key("shop", "web-1")).and_then(|p| p.ip) == Some(ip)),
    )
    .await;
    assert!(
        matches!(found, Ok(Ok(_))),
        "pod IP {ip} not published within 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_publishes_rewrites_renames_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pods.yaml");
    std::fs::write(&file, pod_yaml("10.0.0.1")).unwrap();

    let index = Index::new();
    let mut rx = index.subscribe();
    let task = tokio::spawn(DirSource::new(dir.path().to_owned()).run(index.clone()));
    wait_for_pod_ip(&mut rx, "10.0.0.1").await;

    // Rewritten in place.
    std::fs::write(&file, pod_yaml("10.0.0.2")).unwrap();
    wait_for_pod_ip(&mut rx, "10.0.0.2").await;

    // Replaced by rename, as editors and `kubectl cp`-style tools do.
    let temp = dir.path().join(".pods.yaml.tmp");
    std::fs::write(&temp, pod_yaml("10.0.0.3")).unwrap();
    std::fs::rename(&temp, &file).unwrap();
    wait_for_pod_ip(&mut rx, "10.0.0.3").await;

    // Saved broken: the last good state stays published.
    std::fs::write(&file, "kind: Pod\nmetadata: {name: [\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ip = index
        .snapshot()
        .pods
        .get(&key("shop", "web-1"))
        .and_then(|p| p.ip);
    assert_eq!(ip, Some("10.0.0.3".parse().unwrap()));

    // Deleted: the pod goes.
    std::fs::remove_file(&file).unwrap();
    let gone = tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|state| state.pods.is_empty()),
    )
    .await;
    assert!(
        matches!(gone, Ok(Ok(_))),
        "deletion not published within 2 s"
    );

    if task.is_finished() {
        panic!("the source stopped: {:?}", task.await);
    }
    task.abort();
}

#[tokio::test]
async fn run_fails_for_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let result = DirSource::new(dir.path().join("absent"))
        .run(Index::new())
        .await;
    assert!(result.is_err());
}

//! AuthorizationPolicy from real manifest files to effective inbound policies: the seed
//! scenario in `fixtures/authz`, invalid policies reported by object and field and skipped
//! whole, default-policy precedence, probes, and an edit that breaks a policy leaving its
//! last valid version in force.

use std::path::{Path, PathBuf};

use weft_control::model::authz::{PathPattern, PolicyAction};
use weft_control::model::{ClusterState, DefaultInboundPolicy, InboundPolicy, InboundProtocol};
use weft_control::source::dir::{DirSource, LoadReport};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/authz")
}

fn load() -> LoadReport {
    DirSource::new(fixtures()).load().unwrap()
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

fn inbound(state: &ClusterState, pod: &str, port: u16) -> InboundPolicy {
    let (namespace, name) = pod.split_once('/').unwrap();
    state.inbound_policy(
        namespace,
        name,
        port,
        DefaultInboundPolicy::AllUnauthenticated,
    )
}

fn names(policy: &InboundPolicy) -> Vec<String> {
    policy.policies.iter().map(|p| p.qualified_name()).collect()
}

fn problem_list(report: &LoadReport) -> Vec<(String, String)> {
    report
        .problems
        .iter()
        .map(|p| (p.object.clone().unwrap_or_default(), p.message.clone()))
        .collect()
}

#[test]
fn invalid_policies_are_reported_by_object_and_field_and_skipped_whole() {
    let report = load();
    let problems = problem_list(&report);
    let expected = [
        (
            "AuthorizationPolicy shop/bad-regex",
            "spec.rules[0].to[1].paths[1]: invalid regex",
        ),
        (
            "AuthorizationPolicy shop/bad-cidr",
            "spec.rules[0].from[0].networks[0].except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8",
        ),
        (
            "AuthorizationPolicy shop/bad-identity",
            "spec.rules[0].from[0].identities[1]: \"shop/api\" must start with spiffe://",
        ),
        (
            "AuthorizationPolicy shop/allow-probes-typo",
            "spec.rules[0].form: unknown field",
        ),
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    for ((object, message), (want_object, want_message)) in problems.iter().zip(expected) {
        assert_eq!(object, want_object);
        assert!(message.contains(want_message), "{object}: {message}");
    }
    // The Display form users see in the log: file, object, field, reason.
    let shown = report.problems[0].to_string();
    assert!(
        shown.contains("invalid.yaml: AuthorizationPolicy shop/bad-regex: document 1: spec.rules[0].to[1].paths[1]: invalid regex \"/api/(v1\""),
        "{shown}"
    );

    let state = &report.state;
    let loaded: Vec<String> = state
        .authorization_policies
        .values()
        .map(|p| p.qualified_name())
        .collect();
    assert_eq!(
        loaded,
        vec![
            "open/other-app",
            "open/web-from-anyone",
            "shop/audit-admin",
            "shop/deny-legacy",
            "shop/internal-api",
            "shop/postgres-from-api"
        ]
    );
}

#[test]
fn seed_scenario_postgres_only_from_api() {
    let state = load().state;
    let postgres = inbound(&state, "shop/postgres-0", 5432);
    assert!(postgres.pod_known);
    assert_eq!(
        postgres.protocol,
        InboundProtocol::Opaque,
        "5432 is opaque by default"
    );
    assert_eq!(
        postgres.default_policy,
        DefaultInboundPolicy::Deny,
        "namespace default"
    );
    assert!(!postgres.require_mtls);
    // Sorted by name; the selector-less DENY applies to every pod of shop.
    assert_eq!(
        names(&postgres),
        vec!["shop/deny-legacy", "shop/postgres-from-api"]
    );
    let allow = &postgres.policies[1];
    assert_eq!(allow.action, PolicyAction::Allow);
    assert_eq!(allow.rules[0].from[0].service_accounts, vec!["shop/api"]);
    assert!(postgres.probe_paths.is_empty());

    // Another port of the same pod: the port-scoped policy does not apply.
    assert_eq!(
        names(&inbound(&state, "shop/postgres-0", 8080)),
        vec!["shop/deny-legacy"]
    );
}

#[test]
fn named_ports_probes_mtls_and_opaque_ports() {
    let state = load().state;
    let http = inbound(&state, "shop/internal-0", 8080);
    assert_eq!(http.protocol, InboundProtocol::Detect);
    assert!(!http.require_mtls);
    // `ports: [http]` resolves to the pod's container port 8080.
    assert_eq!(names(&http), vec!["shop/deny-legacy", "shop/internal-api"]);
    let rule = &http.policies[1].rules[0];
    assert_eq!(rule.to[0].methods, vec!["GET"]);
    assert_eq!(
        rule.to[0].paths,
        vec![PathPattern::Regex("/api/v1/users/.*".into())]
    );
    // The named-port liveness probe and the numbered readiness probe (query dropped);
    // not the HTTPS probe, the other-host probe or the TCP probe.
    assert_eq!(http.probe_paths, vec!["/healthz", "/ready"]);

    let admin = inbound(&state, "shop/internal-0", 9090);
    assert!(admin.require_mtls, "listed in require-mtls-ports");
    assert_eq!(names(&admin), vec!["shop/audit-admin", "shop/deny-legacy"]);
    assert_eq!(admin.policies[0].action, PolicyAction::Audit);
    assert_eq!(admin.probe_paths, vec!["/admin/started"]);

    let opaque = inbound(&state, "shop/internal-0", 7001);
    assert_eq!(
        opaque.protocol,
        InboundProtocol::Opaque,
        "opaque-ports annotation"
    );
    assert!(opaque.probe_paths.is_empty());
    assert_eq!(
        inbound(&state, "shop/internal-0", 7002).protocol,
        InboundProtocol::Detect
    );
}

#[test]
fn default_policy_precedence_pod_then_namespace_then_flag() {
    let state = load().state;
    // Pod annotation beats the namespace's deny.
    assert_eq!(
        inbound(&state, "shop/api-0", 80).default_policy,
        DefaultInboundPolicy::AllAuthenticated
    );
    // Namespace annotation beats the flag.
    assert_eq!(
        state
            .inbound_policy(
                "shop",
                "postgres-0",
                80,
                DefaultInboundPolicy::AllUnauthenticated
            )
            .default_policy,
        DefaultInboundPolicy::Deny
    );
    // Neither: the flag.
    for flag in DefaultInboundPolicy::ALL {
        let web = state.inbound_policy("open", "web-0", 80, flag);
        assert_eq!(web.default_policy, flag);
        assert!(web.policies.is_empty(), "other-app selects app=other only");
    }
    assert_eq!(
        names(&inbound(&state, "open/web-0", 8080)),
        vec!["open/web-from-anyone"]
    );
}

#[test]
fn unknown_pods_get_what_does_not_depend_on_the_pod() {
    let state = load().state;
    let unknown = inbound(&state, "shop/new-0", 5432);
    assert!(!unknown.pod_known);
    assert_eq!(unknown.default_policy, DefaultInboundPolicy::Deny);
    assert_eq!(unknown.protocol, InboundProtocol::Opaque);
    // Only the selector-less policy can be known to select it.
    assert_eq!(names(&unknown), vec!["shop/deny-legacy"]);
    assert!(unknown.probe_paths.is_empty());

    let nowhere = state.inbound_policy(
        "absent",
        "p",
        80,
        DefaultInboundPolicy::ClusterAuthenticated,
    );
    assert!(!nowhere.pod_known);
    assert_eq!(
        nowhere.default_policy,
        DefaultInboundPolicy::ClusterAuthenticated
    );
    assert!(nowhere.policies.is_empty());
}

const POSTGRES_POLICY: &str = "
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: postgres-from-api, namespace: shop}
spec:
  selector: {matchLabels: {app: postgres}}
  ports: [5432]
  rules:
  - from: [{serviceAccounts: [\"SERVICE_ACCOUNT\"]}]
";

fn postgres_policy(service_account: &str) -> String {
    POSTGRES_POLICY.replace("SERVICE_ACCOUNT", service_account)
}

fn postgres_sources(state: &ClusterState) -> Vec<Vec<String>> {
    inbound(state, "shop/postgres-0", 5432)
        .policies
        .iter()
        .filter(|p| p.name == "postgres-from-api")
        .map(|p| p.rules[0].from[0].service_accounts.clone())
        .collect()
}

#[test]
fn a_broken_edit_keeps_the_last_valid_version_of_that_object() {
    let dir = scratch_copy();
    let policies = dir.path().join("policies.yaml");
    let others = std::fs::read_to_string(&policies)
        .unwrap()
        .split("\n---\n")
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n---\n");
    let write = |postgres: &str| {
        std::fs::write(&policies, format!("{postgres}\n---\n{others}")).unwrap();
    };
    let mut source = DirSource::new(dir.path().to_owned());
    assert_eq!(
        postgres_sources(&source.load().unwrap().state),
        vec![vec!["shop/api"]]
    );

    // Broken: reported, and the previous version stays in force.
    write(&postgres_policy("shop/API"));
    let broken = source.load().unwrap();
    let problem = broken
        .problems
        .iter()
        .find(|p| p.object.as_deref() == Some("AuthorizationPolicy shop/postgres-from-api"))
        .expect("the broken policy is reported");
    assert!(
        problem
            .message
            .contains("spec.rules[0].from[0].serviceAccounts[0]"),
        "{}",
        problem.message
    );
    assert!(
        problem.message.contains("keeping its last valid version"),
        "{}",
        problem.message
    );
    assert_eq!(postgres_sources(&broken.state), vec![vec!["shop/api"]]);
    // Every other object is untouched.
    assert_eq!(broken.state.authorization_policies.len(), 6);

    // Still broken on the next load: still the last valid version.
    assert_eq!(
        postgres_sources(&source.load().unwrap().state),
        vec![vec!["shop/api"]]
    );

    // Fixed differently: the new version applies.
    write(&postgres_policy("shop/web"));
    let fixed = source.load().unwrap();
    assert_eq!(postgres_sources(&fixed.state), vec![vec!["shop/web"]]);

    // Deleted while broken: gone, not resurrected later.
    write(&postgres_policy("shop/API"));
    source.load().unwrap();
    std::fs::write(&policies, &others).unwrap();
    let deleted = source.load().unwrap();
    assert!(postgres_sources(&deleted.state).is_empty());
    write(&postgres_policy("shop/API"));
    let again = source.load().unwrap();
    assert!(postgres_sources(&again.state).is_empty());
    let problem = again
        .problems
        .iter()
        .find(|p| p.object.as_deref() == Some("AuthorizationPolicy shop/postgres-from-api"))
        .unwrap();
    assert!(!problem.message.contains("keeping"), "{}", problem.message);
}

#[test]
fn a_pod_with_a_bad_default_annotation_keeps_its_last_valid_version() {
    let dir = scratch_copy();
    let shop = dir.path().join("00-shop.yaml");
    let text = std::fs::read_to_string(&shop).unwrap();
    let mut source = DirSource::new(dir.path().to_owned());
    source.load().unwrap();

    let broken_text = text.replace(
        "{config.weft.io/default-inbound-policy: all-authenticated}",
        "{config.weft.io/default-inbound-policy: allow-everything}",
    );
    assert_ne!(broken_text, text);
    std::fs::write(&shop, broken_text).unwrap();
    let report = source.load().unwrap();
    let problem = report
        .problems
        .iter()
        .find(|p| p.object.as_deref() == Some("Pod shop/api-0"))
        .expect("reported");
    assert!(
        problem
            .message
            .contains("metadata.annotations[config.weft.io/default-inbound-policy]"),
        "{}",
        problem.message
    );
    assert_eq!(
        inbound(&report.state, "shop/api-0", 80).default_policy,
        DefaultInboundPolicy::AllAuthenticated
    );
}

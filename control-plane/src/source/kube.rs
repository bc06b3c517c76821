//! The in-cluster source: watches the Kubernetes API (Namespaces, Pods, Services and weft's
//! three CRDs), turns every object into the model through the same manifest reader as the
//! directory source (so the two cannot drift), publishes whole states to the index, and
//! reports on each TrafficSplit, HTTPRoute and AuthorizationPolicy whether it is in force
//! (an `Accepted` condition in its status).
//!
//! Endpoints come from Pods matched by Service selectors, as with the directory source;
//! EndpointSlices are not read. Unlike a directory, where `weft.io/inject` says which pods
//! run a proxy, a pod here is meshed only when the injector marked it `weft.io/injected`.
//!
//! RBAC: get/list/watch on namespaces, pods, services and the three CRDs; patch on their
//! `/status` subresources.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ::kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use ::kube::runtime::watcher;
use ::kube::runtime::WatchStreamExt;
use ::kube::{Api, Client};
use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::manifest::{is_mesh_parent, read_object, Object, ParsedFile};
use crate::index::Index;
use crate::model::{ClusterState, INJECT_ANNOTATION};

/// Quiet time after the last event before rebuilding: a rollout or `kubectl apply -f dir`
/// arrives as a burst, and one publish per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// A cluster that never stops changing is still republished this often.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// Written to HTTPRoute `status.parents[].controllerName`.
pub const CONTROLLER_NAME: &str = "weft.io/control-plane";
/// Set by the injector on every pod it gave a proxy.
const INJECTED_ANNOTATION: &str = "weft.io/injected";
/// A status patch that takes longer is given up (and retried on the next rebuild).
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures that stop the source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("all watchers stopped")]
    WatchersStopped,
}

/// The kinds watched, in the order their objects are read (core kinds first, so that the
/// CRD objects can be checked against the Services).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespace,
    Pod,
    Service,
    TrafficSplit,
    HttpRoute,
    AuthorizationPolicy,
}

const KINDS: [Kind; 6] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::TrafficSplit,
    Kind::HttpRoute,
    Kind::AuthorizationPolicy,
];

impl Kind {
    fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Kind::Namespace => ("", "v1", "Namespace", "namespaces"),
            Kind::Pod => ("", "v1", "Pod", "pods"),
            Kind::Service => ("", "v1", "Service", "services"),
            Kind::TrafficSplit => (
                "split.smi-spec.io",
                "v1alpha2",
                "TrafficSplit",
                "trafficsplits",
            ),
            Kind::HttpRoute => ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
            Kind::AuthorizationPolicy => (
                "policy.weft.io",
                "v1alpha1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    fn is_crd(self) -> bool {
        matches!(
            self,
            Kind::TrafficSplit | Kind::HttpRoute | Kind::AuthorizationPolicy
        )
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::HttpRoute => "HTTPRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

type Key = (String, String);

fn key_of(object: &DynamicObject) -> Key {
    (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// One kind's objects as last listed and watched.
#[derive(Debug, Default)]
struct KindStore {
    /// Has had a complete list (or its CRD is known to be missing).
    ready: bool,
    /// The CRD is not installed; warned once.
    missing: bool,
    objects: BTreeMap<Key, DynamicObject>,
    /// Objects of a re-list in progress; swapped in whole at `InitDone`, so that a restarted
    /// watch never shows a half-listed kind.
    relisting: Option<BTreeMap<Key, DynamicObject>>,
}

/// The `Accepted` verdict on one CRD object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What the source did with one object, for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatusWanted {
    kind: Kind,
    key: Key,
    generation: Option<i64>,
    verdict: Verdict,
}

/// A status written: (generation, verdict, the object's resourceVersion when patched).
type Written = (Option<i64>, Verdict, Option<String>);

/// Watches the API server and publishes to the index. Create with [`KubeSource::new`], then
/// [`run`](KubeSource::run) it.
pub struct KubeSource {
    client: Client,
    stores: BTreeMap<Kind, KindStore>,
    /// Each CRD object's last accepted version, kept in force while a newer version is
    /// refused (a broken edit must not open up what a policy protected).
    last_accepted: BTreeMap<(Kind, Key), Object>,
    /// The status last written per object with the object's resourceVersion at the time,
    /// so that a patch whose watch event has not come back yet is not sent again (while a
    /// later change by someone else is still corrected).
    written: BTreeMap<(Kind, Key), Written>,
    /// The problem last logged per object, so that each is logged once while it lasts.
    reported: BTreeMap<(Kind, Key), String>,
    /// Conflicts between objects (two splits of one Service, a route to a missing port)
    /// already logged, as the directory source does.
    logged_conflicts: BTreeSet<String>,
    write_status: bool,
    /// Kinds whose `/status` RBAC refused a patch: not tried again (a refusal would repeat
    /// on every rebuild, one API call and one warning per object each time).
    status_forbidden: BTreeSet<Kind>,
}

impl KubeSource {
    /// `write_status`: patch `status.conditions` of the CRD objects (needs RBAC on `/status`).
    pub fn new(client: Client, write_status: bool) -> Self {
        Self {
            client,
            stores: KINDS.iter().map(|k| (*k, KindStore::default())).collect(),
            last_accepted: BTreeMap::new(),
            written: BTreeMap::new(),
            reported: BTreeMap::new(),
            logged_conflicts: BTreeSet::new(),
            write_status,
            status_forbidden: BTreeSet::new(),
        }
    }

    /// Watches until every watcher has stopped (they retry with backoff, so in practice
    /// never). Nothing is published before every kind has been listed once.
    pub async fn run(mut self, index: std::sync::Arc<Index>) -> Result<(), KubeSourceError> {
        let (tx, mut events) = mpsc::channel(1024);
        for kind in KINDS {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &kind.resource());
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream = watcher(api, watcher::Config::default()).default_backoff();
                futures_util::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    if tx.send((kind, event)).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut waiting_logged = false;
        loop {
            let Some((kind, event)) = events.recv().await else {
                return Err(KubeSourceError::WatchersStopped);
            };
            self.apply(kind, event);
            let deadline = Instant::now() + MAX_DELAY;
            loop {
                let quiet_until = (Instant::now() + DEBOUNCE).min(deadline);
                match tokio::time::timeout_at(quiet_until, events.recv()).await {
                    Ok(Some((kind, event))) => {
                        self.apply(kind, event);
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    Err(_) => break,
                    Ok(None) => return Err(KubeSourceError::WatchersStopped),
                }
            }
            let waiting: Vec<&str> = self
                .stores
                .iter()
                .filter(|(_, store)| !store.ready)
                .map(|(kind, _)| kind.name())
                .collect();
            if !waiting.is_empty() {
                if !waiting_logged {
                    tracing::info!(
                        ?waiting,
                        "waiting for the first list of every kind before publishing"
                    );
                    waiting_logged = true;
                }
                continue;
            }
            let (state, statuses) = self.build();
            for conflict in super::new_conflicts(&state, &mut self.logged_conflicts) {
                tracing::warn!("{conflict}");
            }
            let counts = (
                state.namespaces.len(),
                state.pods.len(),
                state.services.len(),
                state.traffic_splits.len(),
                state.http_routes.len(),
                state.authorization_policies.len(),
            );
            if index.publish(state) {
                let (
                    namespaces,
                    pods,
                    services,
                    traffic_splits,
                    http_routes,
                    authorization_policies,
                ) = counts;
                tracing::info!(
                    namespaces,
                    pods,
                    services,
                    traffic_splits,
                    http_routes,
                    authorization_policies,
                    "published cluster state"
                );
            }
            if self.write_status {
                self.write_statuses(statuses).await;
            }
        }
    }

    fn apply(&mut self, kind: Kind, event: Result<watcher::Event<DynamicObject>, watcher::Error>) {
        let Some(store) = self.stores.get_mut(&kind) else {
            return;
        };
        match event {
            Ok(watcher::Event::Init) => store.relisting = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(object)) => {
                store
                    .relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key_of(&object), object);
            }
            Ok(watcher::Event::InitDone) => {
                store.objects = store.relisting.take().unwrap_or_default();
                if store.missing {
                    tracing::info!(kind = kind.name(), "the CRD is installed now; watching it");
                }
                store.missing = false;
                store.ready = true;
            }
            Ok(watcher::Event::Apply(object)) => {
                store.objects.insert(key_of(&object), object);
            }
            Ok(watcher::Event::Delete(object)) => {
                store.objects.remove(&key_of(&object));
            }
            Err(e) => {
                if kind.is_crd() && is_not_found(&e) {
                    // Without the CRD there are no such objects: the rest of the cluster is
                    // served, and the watcher keeps retrying until the CRD shows up.
                    if !store.missing {
                        tracing::warn!(
                            kind = kind.name(),
                            resource = %kind.resource().plural,
                            "CRD not installed; serving without {} objects until it is",
                            kind.name()
                        );
                    }
                    store.missing = true;
                    store.ready = true;
                    store.objects.clear();
                } else {
                    // The watcher backs off and re-lists; the last state stays in force.
                    tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                }
            }
        }
    }

    /// One state from every store, and the status each CRD object should show.
    fn build(&mut self) -> (ClusterState, Vec<StatusWanted>) {
        let mut state = ClusterState::default();
        let mut statuses = Vec::new();
        let mut seen = BTreeSet::new();
        for kind in KINDS {
            let Some(store) = self.stores.get(&kind) else {
                continue;
            };
            for (key, object) in &store.objects {
                let read = read_dynamic(kind, object);
                if !kind.is_crd() {
                    match read {
                        Ok(read) => {
                            let read = meshed_by_injection(read);
                            without_ip_once_terminated(read, object).insert_into(&mut state)
                        }
                        Err(message) => {
                            seen.insert((kind, key.clone()));
                            if self.reported.get(&(kind, key.clone())) != Some(&message) {
                                tracing::warn!(
                                    kind = kind.name(),
                                    namespace = %key.0,
                                    name = %key.1,
                                    "skipped: {message}"
                                );
                                self.reported.insert((kind, key.clone()), message);
                            }
                        }
                    }
                    continue;
                }
                seen.insert((kind, key.clone()));
                let verdict = match read {
                    Ok(parsed) => match unknown_services(&state, &parsed) {
                        None => {
                            self.last_accepted
                                .insert((kind, key.clone()), parsed.clone());
                            parsed.insert_into(&mut state);
                            Verdict {
                                accepted: true,
                                reason: "Accepted",
                                message: format!("{} is in force", kind.name()),
                            }
                        }
                        Some(missing) => Verdict {
                            accepted: false,
                            reason: "UnknownService",
                            message: format!("no Service {missing} in namespace {}", key.0),
                        },
                    },
                    Err(message) => Verdict {
                        accepted: false,
                        reason: "Invalid",
                        message,
                    },
                };
                let mut verdict = verdict;
                if !verdict.accepted {
                    if let Some(previous) = self.last_accepted.get(&(kind, key.clone())) {
                        previous.clone().insert_into(&mut state);
                        verdict
                            .message
                            .push_str("; the last accepted version stays in force");
                    }
                    // Once per verdict, not on every rebuild (pods churn).
                    if self.reported.get(&(kind, key.clone())) != Some(&verdict.message) {
                        tracing::warn!(
                            kind = kind.name(),
                            namespace = %key.0,
                            name = %key.1,
                            reason = verdict.reason,
                            "not accepted: {}",
                            verdict.message
                        );
                        self.reported
                            .insert((kind, key.clone()), verdict.message.clone());
                    }
                } else if self.reported.remove(&(kind, key.clone())).is_some() {
                    tracing::info!(
                        kind = kind.name(),
                        namespace = %key.0,
                        name = %key.1,
                        "accepted now"
                    );
                }
                statuses.push(StatusWanted {
                    kind,
                    key: key.clone(),
                    generation: object.metadata.generation,
                    verdict,
                });
            }
        }
        // Deleted objects take their last accepted version and their status memo with them.
        self.last_accepted.retain(|k, _| seen.contains(k));
        self.written.retain(|k, _| seen.contains(k));
        self.reported.retain(|k, _| seen.contains(k));
        (state, statuses)
    }

    async fn write_statuses(&mut self, statuses: Vec<StatusWanted>) {
        for wanted in statuses {
            if self.status_forbidden.contains(&wanted.kind) {
                continue;
            }
            let Some(object) = self
                .stores
                .get(&wanted.kind)
                .and_then(|s| s.objects.get(&wanted.key))
            else {
                continue;
            };
            let memo_key = (wanted.kind, wanted.key.clone());
            let memo = (
                wanted.generation,
                wanted.verdict.clone(),
                object.metadata.resource_version.clone(),
            );
            if self.written.get(&memo_key) == Some(&memo) {
                continue;
            }
            let Some(patch) = status_patch(wanted.kind, object, wanted.generation, &wanted.verdict)
            else {
                // Already showing this verdict.
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &wanted.key.0, &wanted.kind.resource());
            let params = PatchParams::default();
            let patched = tokio::time::timeout(
                PATCH_TIMEOUT,
                api.patch_status(&wanted.key.1, &params, &Patch::Merge(&patch)),
            )
            .await;
            match patched {
                Ok(Ok(_)) => {
                    self.written.insert(memo_key, memo);
                }
                Ok(Err(::kube::Error::Api(status))) if status.code == 403 => {
                    tracing::warn!(
                        kind = wanted.kind.name(),
                        error = %status,
                        "not allowed to patch {}/status; {} status conditions are not written until a restart (grant it, or run with --no-status)",
                        wanted.kind.resource().plural,
                        wanted.kind.name()
                    );
                    self.status_forbidden.insert(wanted.kind);
                }
                Ok(Err(e)) => tracing::warn!(
                    kind = wanted.kind.name(),
                    namespace = %wanted.key.0,
                    name = %wanted.key.1,
                    error = %e,
                    "writing status failed; retrying on the next change"
                ),
                Err(_) => tracing::warn!(
                    kind = wanted.kind.name(),
                    namespace = %wanted.key.0,
                    name = %wanted.key.1,
                    "writing status timed out; retrying on the next change"
                ),
            }
        }
    }
}

/// Reads one API object with the manifest reader. List responses leave out `apiVersion` and
/// `kind` of their items, so they are set from what was watched.
fn read_dynamic(kind: Kind, object: &DynamicObject) -> Result<Object, String> {
    let mut document = match serde_json::to_value(object) {
        Ok(document) => document,
        Err(e) => return Err(format!("cannot be serialized: {e}")),
    };
    let resource = kind.resource();
    if let Some(map) = document.as_object_mut() {
        map.insert("apiVersion".to_owned(), Json::String(resource.api_version));
        map.insert("kind".to_owned(), Json::String(resource.kind));
        if let Some(metadata) = map.get_mut("metadata").and_then(Json::as_object_mut) {
            // Large and never read.
            metadata.remove("managedFields");
        }
    }
    let document: serde_yaml_ng::Value = match serde_yaml_ng::to_value(&document) {
        Ok(document) => document,
        Err(e) => return Err(format!("cannot be converted: {e}")),
    };
    let mut parsed = ParsedFile::default();
    read_object(document, "object", &mut parsed);
    if let Some(object) = parsed.objects.into_iter().next() {
        return Ok(object);
    }
    Err(parsed
        .problems
        .into_iter()
        .map(|p| p.message.trim_start_matches("object: ").to_owned())
        .next()
        .unwrap_or_else(|| "not readable".to_owned()))
}

/// In a cluster a pod is meshed when the injector gave it a proxy, not when it or its
/// namespace asks for one: pods created before their namespace was annotated, host-network
/// pods and pods the injector skipped have no proxy, and mesh TLS sent to them would fail.
/// The model decides by `weft.io/inject`, so that is set here from the injector's mark.
fn meshed_by_injection(object: Object) -> Object {
    match object {
        Object::Pod(mut pod) => {
            let injected =
                pod.annotations.get(INJECTED_ANNOTATION).map(String::as_str) == Some("true");
            let value = if injected { "enabled" } else { "disabled" };
            pod.annotations
                .insert(INJECT_ANNOTATION.to_owned(), value.to_owned());
            Object::Pod(pod)
        }
        other => other,
    }
}

/// A pod that has finished (phase `Succeeded` or `Failed`, e.g. a completed Job kept for
/// its logs) still shows its old `status.podIP`, which the network hands to new pods: it
/// must not claim that address (and with it the new pod's traffic and identity).
fn without_ip_once_terminated(object: Object, raw: &DynamicObject) -> Object {
    let phase = raw
        .data
        .get("status")
        .and_then(|s| s.get("phase"))
        .and_then(Json::as_str);
    match object {
        Object::Pod(mut pod) if matches!(phase, Some("Succeeded" | "Failed")) => {
            pod.ip = None;
            Object::Pod(pod)
        }
        other => other,
    }
}

/// The first Service `object` refers to that `state` lacks, as `name` (same namespace) or
/// `namespace/name`.
fn unknown_services(state: &ClusterState, object: &Object) -> Option<String> {
    let has = |ns: &str, name: &str| {
        state
            .services
            .contains_key(&(ns.to_owned(), name.to_owned()))
    };
    match object {
        Object::TrafficSplit(split) => std::iter::once(&split.service)
            .chain(split.backends.iter().map(|b| &b.service))
            .find(|name| !has(&split.namespace, name))
            .cloned(),
        Object::HttpRoute(route) => {
            if let Some(parent) = route
                .parents
                .iter()
                .find(|p| !has(&route.namespace, &p.name))
            {
                return Some(parent.name.clone());
            }
            route
                .rules
                .iter()
                .flat_map(|rule| &rule.backend_refs)
                .find(|b| !has(&b.namespace, &b.name))
                .map(|b| {
                    if b.namespace == route.namespace {
                        b.name.clone()
                    } else {
                        format!("{}/{}", b.namespace, b.name)
                    }
                })
        }
        _ => None,
    }
}

fn condition_matches(observed: Option<&Json>, generation: Option<i64>, verdict: &Verdict) -> bool {
    let Some(observed) = observed else {
        return false;
    };
    observed.get("status").and_then(Json::as_str) == Some(status_word(verdict.accepted))
        && observed.get("reason").and_then(Json::as_str) == Some(verdict.reason)
        && observed.get("message").and_then(Json::as_str) == Some(verdict.message.as_str())
        && observed.get("observedGeneration").and_then(Json::as_i64) == generation
}

fn status_word(accepted: bool) -> &'static str {
    if accepted {
        "True"
    } else {
        "False"
    }
}

fn accepted_condition(conditions: Option<&Json>) -> Option<&Json> {
    conditions?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Json::as_str) == Some("Accepted"))
}

fn condition(previous: Option<&Json>, generation: Option<i64>, verdict: &Verdict) -> Json {
    // The transition time moves only when the status does.
    let since = previous
        .filter(|p| p.get("status").and_then(Json::as_str) == Some(status_word(verdict.accepted)))
        .and_then(|p| p.get("lastTransitionTime").cloned())
        .unwrap_or_else(now);
    let mut condition = json!({
        "type": "Accepted",
        "status": status_word(verdict.accepted),
        "reason": verdict.reason,
        "message": verdict.message,
        "lastTransitionTime": since,
    });
    if let (Some(generation), Some(map)) = (generation, condition.as_object_mut()) {
        map.insert("observedGeneration".to_owned(), json!(generation));
    }
    condition
}

fn now() -> Json {
    let seconds = k8s_openapi::jiff::Timestamp::now().as_second();
    let stamp = k8s_openapi::jiff::Timestamp::from_second(seconds)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    Json::String(stamp.to_string())
}

/// The merge patch that makes `object`'s status show `verdict`, or `None` when it already
/// does. TrafficSplit and AuthorizationPolicy carry `status.conditions`; HTTPRoute carries
/// one `status.parents` entry per Service parentRef (Gateway API), other controllers'
/// entries kept.
fn status_patch(
    kind: Kind,
    object: &DynamicObject,
    generation: Option<i64>,
    verdict: &Verdict,
) -> Option<Json> {
    let status = object.data.get("status");
    if kind != Kind::HttpRoute {
        let observed = accepted_condition(status.and_then(|s| s.get("conditions")));
        if condition_matches(observed, generation, verdict) {
            return None;
        }
        let mut body = json!({"conditions": [condition(observed, generation, verdict)]});
        if let (Some(generation), Some(map)) = (generation, body.as_object_mut()) {
            map.insert("observedGeneration".to_owned(), json!(generation));
        }
        return Some(json!({ "status": body }));
    }
    // Gateway parents belong to their gateway controller: an entry from us there would
    // claim a route we do not serve. A route with no Service parent gets no entry at all.
    let route_namespace = object.metadata.namespace.as_deref().unwrap_or_default();
    let text = |r: &Json, key: &str| r.get(key).and_then(Json::as_str).map(str::to_owned);
    let parent_refs: Vec<Json> = object
        .data
        .get("spec")
        .and_then(|s| s.get("parentRefs"))
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|r| {
            is_mesh_parent(
                text(r, "kind").as_deref(),
                text(r, "group").as_deref(),
                text(r, "namespace").as_deref(),
                route_namespace,
            )
        })
        .cloned()
        .collect();
    let observed: Vec<Json> = status
        .and_then(|s| s.get("parents"))
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    let (ours, others): (Vec<Json>, Vec<Json>) = observed
        .into_iter()
        .partition(|p| p.get("controllerName").and_then(Json::as_str) == Some(CONTROLLER_NAME));
    let up_to_date = ours.len() == parent_refs.len()
        && ours.iter().zip(&parent_refs).all(|(entry, wanted)| {
            entry.get("parentRef").and_then(|r| r.get("name")) == wanted.get("name")
                && condition_matches(
                    accepted_condition(entry.get("conditions")),
                    generation,
                    verdict,
                )
        });
    if up_to_date {
        return None;
    }
    let mut parents = others;
    for (i, parent_ref) in parent_refs.into_iter().enumerate() {
        let previous = ours
            .get(i)
            .and_then(|e| accepted_condition(e.get("conditions")));
        parents.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": [condition(previous, generation, verdict)],
        }));
    }
    Some(json!({"status": {"parents": parents}}))
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(::kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(status))
        | watcher::Error::WatchFailed(::kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object as a list response carries it: without apiVersion and kind.
    fn dynamic(value: Json) -> DynamicObject {
        let mut object: DynamicObject = serde_json::from_value(value).unwrap();
        object.types = None;
        object
    }

    fn split(backend: &str) -> DynamicObject {
        dynamic(json!({
            "metadata": {"name": "web", "namespace": "shop", "generation": 3},
            "spec": {"service": "web", "backends": [
                {"service": "web-v1", "weight": 90}, {"service": backend, "weight": 10}]}
        }))
    }

    fn service(name: &str) -> DynamicObject {
        dynamic(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}
        }))
    }

    #[test]
    fn api_objects_without_kind_are_read_as_the_watched_kind() {
        let read = read_dynamic(Kind::TrafficSplit, &split("web-v2")).unwrap();
        let Object::TrafficSplit(split) = read else {
            panic!("{read:?}")
        };
        assert_eq!(split.backends.len(), 2);
    }

    fn source_with(objects: Vec<(Kind, DynamicObject)>) -> (ClusterState, Vec<StatusWanted>) {
        // A client is needed to build a source but not to build a state.
        let config = ::kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let mut source = KubeSource::new(client, false);
        for (kind, object) in objects {
            let store = source.stores.get_mut(&kind).unwrap();
            store.objects.insert(key_of(&object), object);
        }
        source.build()
    }

    #[tokio::test]
    async fn splits_for_unknown_services_are_not_accepted() {
        let services = || {
            ["web", "web-v1", "web-v2"]
                .map(|n| (Kind::Service, service(n)))
                .to_vec()
        };
        let mut objects = services();
        objects.push((Kind::TrafficSplit, split("web-v2")));
        let (state, statuses) = source_with(objects);
        assert_eq!(state.traffic_splits.len(), 1);
        assert!(statuses[0].verdict.accepted, "{statuses:?}");

        let mut objects = services();
        objects.push((Kind::TrafficSplit, split("web-v9")));
        let (state, statuses) = source_with(objects);
        assert!(state.traffic_splits.is_empty());
        assert_eq!(statuses[0].verdict.reason, "UnknownService");
        assert!(statuses[0].verdict.message.contains("web-v9"));
    }

    #[tokio::test]
    async fn only_pods_the_injector_marked_are_meshed() {
        let namespace = dynamic(json!({
            "metadata": {"name": "shop", "annotations": {"weft.io/inject": "enabled"}}
        }));
        let pod = |name: &str, annotations: Json| {
            dynamic(json!({
                "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
                "spec": {"containers": [{"name": "app"}]},
                "status": {"podIP": "10.0.0.1"}
            }))
        };
        let (state, _) = source_with(vec![
            (Kind::Namespace, namespace),
            (
                Kind::Pod,
                pod("injected", json!({"weft.io/injected": "true"})),
            ),
            // Asked for the mesh (here and through its namespace) but has no proxy.
            (
                Kind::Pod,
                pod("predates", json!({"weft.io/inject": "enabled"})),
            ),
        ]);
        let meshed = |name: &str| {
            let pod = &state.pods[&("shop".to_owned(), name.to_owned())];
            state.is_meshed(pod)
        };
        assert!(meshed("injected"));
        assert!(!meshed("predates"));
    }

    #[tokio::test]
    async fn finished_pods_give_up_their_ip() {
        let pod = |name: &str, phase: &str| {
            dynamic(json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"containers": [{"name": "app"}]},
                "status": {"podIP": "10.0.0.1", "phase": phase}
            }))
        };
        let (state, _) = source_with(vec![
            (Kind::Pod, pod("job-done", "Succeeded")),
            (Kind::Pod, pod("job-failed", "Failed")),
            (Kind::Pod, pod("web", "Running")),
        ]);
        let ip = |name: &str| state.pods[&("shop".to_owned(), name.to_owned())].ip;
        assert_eq!(ip("job-done"), None);
        assert_eq!(ip("job-failed"), None);
        assert_eq!(ip("web"), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn http_route_status_covers_service_parents_only() {
        let verdict = Verdict {
            accepted: true,
            reason: "Accepted",
            message: "HTTPRoute is in force".to_owned(),
        };
        let route = |parents: Json| {
            dynamic(json!({
                "metadata": {"name": "r", "namespace": "shop", "generation": 1},
                "spec": {"parentRefs": parents},
                "status": {"parents": [{
                    "parentRef": {"name": "gw"},
                    "controllerName": "example.com/gateway",
                    "conditions": [],
                }]}
            }))
        };
        // A Gateway-only route (kind defaults to Gateway) is another controller's business.
        let gateway_only = route(json!([{"name": "gw"}]));
        assert_eq!(
            status_patch(Kind::HttpRoute, &gateway_only, Some(1), &verdict),
            None
        );
        let mixed = route(json!([
            {"name": "gw"},
            {"kind": "Service", "group": "", "name": "web"},
            {"kind": "Service", "group": "", "name": "other", "namespace": "elsewhere"},
        ]));
        let patch = status_patch(Kind::HttpRoute, &mixed, Some(1), &verdict).unwrap();
        let parents = patch["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "{parents:?}");
        assert_eq!(parents[0]["controllerName"], "example.com/gateway");
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[1]["parentRef"]["name"], "web");
    }

    #[test]
    fn status_patch_is_skipped_once_the_status_shows_the_verdict() {
        let verdict = Verdict {
            accepted: false,
            reason: "UnknownService",
            message: "no Service x in namespace shop".to_owned(),
        };
        let mut object = split("x");
        let patch = status_patch(Kind::TrafficSplit, &object, Some(3), &verdict).unwrap();
        let condition = &patch["status"]["conditions"][0];
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["observedGeneration"], 3);
        object.data["status"] = patch["status"].clone();
        assert_eq!(
            status_patch(Kind::TrafficSplit, &object, Some(3), &verdict),
            None
        );
        assert!(status_patch(Kind::TrafficSplit, &object, Some(4), &verdict).is_some());
    }
}

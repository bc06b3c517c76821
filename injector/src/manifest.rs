//! `weft inject`: multi-document YAML in, the same documents out with every pod (template)
//! injected. Workload kinds get their pod template patched (also as items of a `List`, as
//! `kubectl get -o yaml` prints them); every other document passes through. Namespace annotations are unknown offline, so each pod is injected unless it
//! says `weft.io/inject: disabled` (or is in an excluded namespace, or is host-network).

use serde::Deserialize;
use serde_json::Value;

use crate::{plan, InjectError, NamespaceView, Outcome, ProxySettings};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not YAML: {source}")]
    Parse {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {index}: cannot be represented as JSON: {source}")]
    Json {
        index: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{object}: {source}")]
    Inject {
        object: String,
        #[source]
        source: InjectError,
    },
    #[error("{object}: applying the patch: {source}")]
    Apply {
        object: String,
        #[source]
        source: json_patch::PatchError,
    },
    #[error("writing YAML: {0}")]
    Write(#[source] serde_yaml_ng::Error),
}

/// Where a kind keeps its pod template (`""` for a Pod itself).
pub fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// What happened to each document, for `weft inject`'s report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub object: String,
    pub injected: bool,
    pub detail: String,
}

/// Injects every pod (template) in `input` and returns the resulting YAML.
pub fn inject_yaml(
    input: &str,
    settings: &ProxySettings,
    native_sidecar: bool,
) -> Result<(String, Vec<Report>), ManifestError> {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let yaml = serde_yaml_ng::Value::deserialize(document)
            .map_err(|source| ManifestError::Parse { index, source })?;
        if yaml.is_null() {
            continue;
        }
        let mut json: Value =
            serde_json::to_value(&yaml).map_err(|source| ManifestError::Json { index, source })?;
        // `kubectl get -o yaml` wraps what it prints in a List: inject its items.
        let is_list = json.get("kind").and_then(Value::as_str) == Some("List");
        let objects: Vec<&mut Value> = match json.get_mut("items").and_then(Value::as_array_mut) {
            Some(items) if is_list => items.iter_mut().collect(),
            _ => vec![&mut json],
        };
        for object in objects {
            if let Some(report) = inject_object(object, settings, native_sidecar)? {
                reports.push(report);
            }
        }
        out.push(serde_yaml_ng::to_string(&json).map_err(ManifestError::Write)?);
    }
    Ok((out.join("---\n"), reports))
}

/// Injects one object in place; `None` for kinds without a pod template.
pub fn inject_object(
    object: &mut Value,
    settings: &ProxySettings,
    native_sidecar: bool,
) -> Result<Option<Report>, ManifestError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(pointer) = template_pointer(&kind) else {
        return Ok(None);
    };
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    let label = format!("{kind} {name}");
    let Some(template) = object.pointer_mut(pointer) else {
        return Ok(Some(Report {
            object: label,
            injected: false,
            detail: "no pod template".into(),
        }));
    };
    let view = NamespaceView::Offline {
        name: namespace.as_deref(),
    };
    let outcome =
        plan(template, view, settings, native_sidecar).map_err(|source| ManifestError::Inject {
            object: label.clone(),
            source,
        })?;
    match outcome {
        Outcome::Skip(reason) => Ok(Some(Report {
            object: label,
            injected: false,
            detail: reason.to_string(),
        })),
        Outcome::Inject { patch, layout } => {
            json_patch::patch(template, &patch).map_err(|source| ManifestError::Apply {
                object: label.clone(),
                source,
            })?;
            Ok(Some(Report {
                object: label,
                injected: true,
                detail: format!("{layout:?}"),
            }))
        }
    }
}

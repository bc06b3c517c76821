//! AdmissionReview v1 in, AdmissionReview v1 out: the webhook's request handling without
//! the HTTP server, so it can be tested directly. Every failure becomes an `allowed: false`
//! review with a message (HTTP 200), or HTTP 400 when not even the request's uid can be
//! read; nothing here panics or answers 500.

use std::future::Future;

use base64::Engine;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use serde_json::Value;

use crate::{plan, NamespaceMeta, NamespaceView, Outcome, ProxySettings, INJECT_ANNOTATION};

/// The answer to one POST /inject.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// For the log: what the injector did.
    pub summary: String,
}

fn review_json(response: AdmissionResponse, patch: Option<&json_patch::Patch>) -> Value {
    let mut body = serde_json::to_value(response.into_review()).unwrap_or_else(|e| {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": "", "allowed": false, "status": {"message": e.to_string()}},
        })
    });
    // kube's helper takes json-patch 4 while this workspace uses 5, so the two patch fields
    // are set here; the API server expects the patch base64-encoded.
    if let (Some(patch), Some(response)) = (patch, body.get_mut("response")) {
        let bytes = serde_json::to_vec(patch).unwrap_or_default();
        response["patch"] = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        response["patchType"] = Value::String("JSONPatch".into());
    }
    body
}

/// A denial for a request whose uid is known but whose body could not be read as a review.
fn deny_uid(uid: &str, message: String) -> Reply {
    let mut response = AdmissionResponse::invalid(&message);
    response.uid = uid.to_string();
    Reply {
        status: 200,
        body: review_json(response, None),
        summary: format!("denied: {message}"),
    }
}

fn bad_request(message: String) -> Reply {
    Reply {
        status: 400,
        body: review_json(AdmissionResponse::invalid(&message), None),
        summary: format!("bad request: {message}"),
    }
}

/// Handles one AdmissionReview body. `lookup` fetches the pod's Namespace (the webhook
/// asks the API server); it is only called when the pod's own `weft.io/inject` does not
/// decide, so that such pods neither wait for nor depend on the API server.
pub async fn handle<F, Fut>(
    body: &[u8],
    settings: &ProxySettings,
    native_by_default: bool,
    lookup: F,
) -> Reply
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<NamespaceMeta, String>>,
{
    let raw: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("the body is not JSON: {e}")),
    };
    let Some(uid) = raw.pointer("/request/uid").and_then(Value::as_str) else {
        return bad_request("the body is not an AdmissionReview: no request.uid".into());
    };
    let uid = uid.to_string();
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw) {
        Ok(r) => r,
        Err(e) => return deny_uid(&uid, format!("unreadable AdmissionReview: {e}")),
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return deny_uid(&uid, "the AdmissionReview has no request".into()),
    };
    let base = AdmissionResponse::from(&request);
    let deny = |message: String| Reply {
        status: 200,
        body: review_json(AdmissionResponse::from(&request).deny(&message), None),
        summary: format!("denied: {message}"),
    };
    if !request.kind.group.is_empty() || request.kind.kind != "Pod" {
        return deny(format!(
            "weft-injector only handles Pods, not {}/{} {}",
            request.kind.group, request.kind.version, request.kind.kind
        ));
    }
    let allow = |summary: String| Reply {
        status: 200,
        body: review_json(AdmissionResponse::from(&request), None),
        summary,
    };
    if request.operation != Operation::Create {
        // A pod's containers cannot change after creation: nothing to inject.
        return allow(format!("allowed: {:?} is not CREATE", request.operation));
    }
    let Some(object) = &request.object else {
        return deny("the request carries no Pod".into());
    };
    let pod = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return deny(format!("unreadable Pod: {e}")),
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_default();
    let pod_name = object
        .metadata
        .name
        .clone()
        .or_else(|| {
            object
                .metadata
                .generate_name
                .as_ref()
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    let pod_decides = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .is_some();
    let ns_meta = if pod_decides {
        NamespaceMeta {
            name: namespace.clone(),
            ..Default::default()
        }
    } else {
        match lookup(namespace.clone()).await {
            Ok(meta) => meta,
            // Fail closed rather than start an unmeshed pod in a namespace that may
            // require the mesh.
            Err(e) => {
                return deny(format!(
                    "weft-injector could not read namespace {namespace}: {e}"
                ))
            }
        }
    };
    match plan(
        &pod,
        NamespaceView::Known(&ns_meta),
        settings,
        native_by_default,
    ) {
        Ok(Outcome::Skip(reason)) => {
            allow(format!("{namespace}/{pod_name}: not injected: {reason}"))
        }
        Ok(Outcome::Inject { patch, layout }) => Reply {
            status: 200,
            body: review_json(base, Some(&patch)),
            summary: format!("{namespace}/{pod_name}: injected ({layout:?})"),
        },
        Err(e) if e.is_pod_error() => deny(format!("{namespace}/{pod_name}: {e}")),
        Err(e) => deny(format!(
            "weft-injector failed on {namespace}/{pod_name}: {e}"
        )),
    }
}

//! `weft.destination.v1.Destination/Watch`: resolves the target against the index and
//! streams the full answer again whenever it changes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use weft_api::destination::destination_server::Destination as DestinationApi;
use weft_api::destination::{
    path_match, value_match, Endpoint, HttpRoute, OutboundPolicy, PathMatch, ProtocolHint,
    RetryBudget, RetryPolicy, RouteMatch, ValueMatch, WatchRequest, WeightedBackend,
};

use crate::index::Index;
use crate::model::routes::{self, StringMatch};
use crate::model::{Destination, EndpointInfo, ResolvedRetry, ResolvedRoute};

pub struct DestinationService {
    pub index: Arc<Index>,
    pub trust_domain: String,
}

type PolicyStream = Pin<Box<dyn Stream<Item = Result<OutboundPolicy, Status>> + Send>>;

#[tonic::async_trait]
impl DestinationApi for DestinationService {
    type WatchStream = PolicyStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let caller = super::caller_identity(&request, "Destination")?;
        let req = request.into_inner();
        if !req.caller_identity.is_empty() && req.caller_identity != caller.to_string() {
            return Err(Status::permission_denied(format!(
                "caller_identity {} does not match the client certificate's {caller}",
                req.caller_identity
            )));
        }
        let target: SocketAddr = req.target.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "target {:?} is not ip:port (authority targets are not supported yet)",
                req.target
            ))
        })?;
        tracing::debug!(%caller, %target, "destination watch");
        let trust_domain = self.trust_domain.clone();
        let stream = super::watch(
            &self.index,
            move |state| Ok(state.resolve(target, &trust_domain)),
            to_proto,
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

fn to_proto(dest: &Destination) -> OutboundPolicy {
    OutboundPolicy {
        known: dest.known,
        protocol: if dest.opaque {
            ProtocolHint::Opaque
        } else {
            ProtocolHint::Unknown
        } as i32,
        service: dest.service.clone().unwrap_or_default(),
        endpoints: dest.endpoints.iter().map(endpoint_to_proto).collect(),
        routes: dest.routes.iter().map(route_to_proto).collect(),
    }
}

fn endpoint_to_proto(ep: &EndpointInfo) -> Endpoint {
    Endpoint {
        address: ep.addr.to_string(),
        identity: ep
            .identity
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default(),
        labels: ep
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Whole milliseconds; a duration beyond the field's range (~49 days) saturates rather
/// than wrapping into a short one.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

fn route_to_proto(route: &ResolvedRoute) -> HttpRoute {
    HttpRoute {
        name: route.name.clone(),
        matches: route.matches.iter().map(match_to_proto).collect(),
        backends: route
            .backends
            .iter()
            .map(|backend| WeightedBackend {
                name: backend.name.clone(),
                weight: backend.weight,
                endpoints: backend.endpoints.iter().map(endpoint_to_proto).collect(),
            })
            .collect(),
        request_timeout_ms: route.request_timeout.map(millis).unwrap_or(0),
        backend_request_timeout_ms: route.backend_request_timeout.map(millis).unwrap_or(0),
        retry: route.retry.as_ref().map(retry_to_proto),
    }
}

fn match_to_proto(route_match: &routes::RouteMatch) -> RouteMatch {
    let kind = match &route_match.path {
        routes::PathMatch::Exact(path) => path_match::Kind::Exact(path.clone()),
        routes::PathMatch::Prefix(path) => path_match::Kind::Prefix(path.clone()),
        routes::PathMatch::Regex(pattern) => path_match::Kind::Regex(pattern.clone()),
    };
    let values = |matches: &[routes::ValueMatch]| {
        matches
            .iter()
            .map(|m| ValueMatch {
                name: m.name.clone(),
                value: Some(match &m.value {
                    StringMatch::Exact(value) => value_match::Value::Exact(value.clone()),
                    StringMatch::Regex(pattern) => value_match::Value::Regex(pattern.clone()),
                }),
            })
            .collect()
    };
    RouteMatch {
        path: Some(PathMatch { kind: Some(kind) }),
        headers: values(&route_match.headers),
        query_params: values(&route_match.query_params),
        method: route_match.method.clone().unwrap_or_default(),
    }
}

fn retry_to_proto(retry: &ResolvedRetry) -> RetryPolicy {
    RetryPolicy {
        max_attempts: retry.max_attempts,
        codes: retry.codes.iter().copied().map(u32::from).collect(),
        backoff_ms: millis(retry.backoff),
        non_idempotent: retry.non_idempotent,
        budget: Some(RetryBudget {
            ratio: retry.budget.ratio,
            min_retries_per_second: retry.budget.min_retries_per_second,
            window_secs: u32::try_from(retry.budget.window.as_secs()).unwrap_or(u32::MAX),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::routes::{RetryBudget as ModelBudget, ValueMatch as ModelValueMatch};
    use crate::model::ResolvedBackend;

    #[test]
    fn routes_translate_field_by_field() {
        let endpoint = EndpointInfo {
            addr: "10.0.1.1:8080".parse().unwrap(),
            identity: None,
            labels: BTreeMap::from([("pod".to_owned(), "web-v1-a".to_owned())]),
        };
        let route = ResolvedRoute {
            name: "web-routes".into(),
            matches: vec![routes::RouteMatch {
                path: routes::PathMatch::Prefix("/api/v2".into()),
                headers: vec![ModelValueMatch {
                    name: "x-canary".into(),
                    value: StringMatch::Exact("yes".into()),
                }],
                query_params: vec![ModelValueMatch {
                    name: "v".into(),
                    value: StringMatch::Regex("[0-9]+".into()),
                }],
                method: Some("GET".into()),
            }],
            backends: vec![ResolvedBackend {
                name: "api-v2.shop".into(),
                weight: 7,
                endpoints: vec![endpoint.clone()],
            }],
            request_timeout: Some(Duration::from_secs(2)),
            backend_request_timeout: Some(Duration::from_secs(60 * 24 * 3600)),
            retry: Some(ResolvedRetry {
                max_attempts: 3,
                codes: vec![502, 503],
                backoff: Duration::from_millis(25),
                non_idempotent: true,
                budget: ModelBudget {
                    ratio: 0.2,
                    min_retries_per_second: 10,
                    window: Duration::from_secs(10),
                },
            }),
        };
        let unrouted = ResolvedRoute {
            name: "default".into(),
            matches: vec![],
            backends: vec![],
            request_timeout: None,
            backend_request_timeout: None,
            retry: None,
        };
        let policy = to_proto(&Destination {
            known: true,
            service: Some("web.shop".into()),
            opaque: false,
            endpoints: vec![endpoint],
            routes: vec![route, unrouted],
        });
        assert_eq!(policy.routes.len(), 2);
        let proto = &policy.routes[0];
        assert_eq!(proto.name, "web-routes");
        assert_eq!(
            proto.matches,
            vec![RouteMatch {
                path: Some(PathMatch {
                    kind: Some(path_match::Kind::Prefix("/api/v2".into()))
                }),
                headers: vec![ValueMatch {
                    name: "x-canary".into(),
                    value: Some(value_match::Value::Exact("yes".into())),
                }],
                query_params: vec![ValueMatch {
                    name: "v".into(),
                    value: Some(value_match::Value::Regex("[0-9]+".into())),
                }],
                method: "GET".into(),
            }]
        );
        assert_eq!(proto.backends.len(), 1);
        assert_eq!(proto.backends[0].name, "api-v2.shop");
        assert_eq!(proto.backends[0].weight, 7);
        assert_eq!(proto.backends[0].endpoints[0].address, "10.0.1.1:8080");
        assert_eq!(proto.backends[0].endpoints[0].identity, "");
        assert_eq!(proto.request_timeout_ms, 2000);
        // 60 days do not fit in u32 milliseconds: saturated, never wrapped.
        assert_eq!(proto.backend_request_timeout_ms, u32::MAX);
        assert_eq!(
            proto.retry,
            Some(RetryPolicy {
                max_attempts: 3,
                codes: vec![502, 503],
                backoff_ms: 25,
                non_idempotent: true,
                budget: Some(RetryBudget {
                    ratio: 0.2,
                    min_retries_per_second: 10,
                    window_secs: 10,
                }),
            })
        );
        let default = &policy.routes[1];
        assert!(default.matches.is_empty() && default.backends.is_empty());
        assert_eq!(default.request_timeout_ms, 0);
        assert_eq!(default.retry, None);
    }
}

//! Inbound HTTP: requests arriving over the mesh HTTP/2 hop are restored to what the client
//! app sent (HTTP/1.1 or HTTP/2) and forwarded to the app on `127.0.0.1:<port>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::{boxed, error_response, Body, Observed};
use super::client::Clients;
use super::headers;
use crate::metrics::{Direction, Metrics, Name, RouteLabels, TlsState};

pub struct InboundHttp {
    /// Where the app listens.
    pub app: SocketAddr,
    app_authority: http::uri::Authority,
    pub clients: Arc<Clients>,
    pub metrics: Arc<Metrics>,
    pub labels: RouteLabels,
}

impl InboundHttp {
    pub fn new(app: SocketAddr, clients: Arc<Clients>, metrics: Arc<Metrics>) -> Self {
        // A socket address always parses as an authority.
        let app_authority = http::uri::Authority::try_from(app.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"));
        let labels = RouteLabels {
            direction: Direction::Inbound,
            route: Name::new("default"),
            dst_service: Name::new(""),
            dst_backend: Name::new(""),
            tls: TlsState::Mutual,
        };
        InboundHttp {
            app,
            app_authority,
            clients,
            metrics,
            labels,
        }
    }

    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        Ok(self.handle(req).await)
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let metrics = self.metrics.http_request(self.labels.clone());
        let rsp = match headers::from_mesh(&mut req, self.app_authority.clone()) {
            Err(_) => error_response(StatusCode::BAD_REQUEST, "request has no authority"),
            Ok(_) => match self.clients.send(self.app, None, req.map(boxed)).await {
                Ok(rsp) => rsp.map(boxed),
                Err(e) => {
                    tracing::info!(app = %self.app, error = %e, "forwarding to the app failed");
                    error_response(StatusCode::BAD_GATEWAY, "the app is not answering")
                }
            },
        };
        let (mut parts, body) = rsp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        metrics.response_headers();
        let observed = Observed::new(body, metrics, parts.status, &parts.headers);
        Response::from_parts(parts, boxed(observed))
    }
}

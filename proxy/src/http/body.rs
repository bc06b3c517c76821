//! Bodies on the HTTP path: one boxed type for everything the proxy sends, a wrapper that
//! records a response's metrics when its body ends (the gRPC status lives in trailers),
//! and the proxy's own short error responses.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics::{GrpcStatus, HttpRequestMetrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy forwards or makes.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> Body {
    boxed(http_body_util::Empty::<Bytes>::new())
}

pub fn full(bytes: Bytes) -> Body {
    boxed(Full::new(bytes))
}

/// A response made by the proxy itself; `x-weft-error` says why, so an operator can tell
/// it from the app's own.
pub fn error_response(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut rsp = Response::new(full(Bytes::from_static(reason.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert("x-weft-error", http::HeaderValue::from_static(reason));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    rsp
}

/// Named once: a `&str` key would be parsed into a header name on every lookup.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

pub fn grpc_status_of(headers: &HeaderMap) -> Option<u16> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// A request body that remembers whether reading it failed, so a failed upstream call can
/// be blamed on the client (400) rather than the server (502).
pub struct Watched {
    inner: Body,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watched {
    pub fn new(inner: Body) -> (Self, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (
            Watched {
                inner,
                failed: failed.clone(),
            },
            failed,
        )
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Passes a response body through and records the response once: at its end (with the
/// gRPC status from trailers or headers) or when it is dropped early.
pub struct Observed {
    inner: Body,
    record: Option<Record>,
}

struct Record {
    metrics: HttpRequestMetrics,
    status: u16,
    grpc: Option<u16>,
}

impl Observed {
    pub fn new(
        inner: Body,
        metrics: HttpRequestMetrics,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Self {
        let record = Record {
            metrics,
            status: status.as_u16(),
            grpc: grpc_status_of(headers),
        };
        Observed {
            inner,
            record: Some(record),
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.record.take() {
            r.metrics.response_end(r.status, GrpcStatus(r.grpc));
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let (Some(code), Some(r)) = (grpc_status_of(trailers), self.record.as_mut())
                    {
                        r.grpc = Some(code);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        if self.inner.is_end_stream() {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Direction, Metrics, Name, RouteLabels, TlsState};

    fn labels() -> RouteLabels {
        RouteLabels {
            direction: Direction::Outbound,
            route: Name::new("default"),
            dst_service: Name::new("web.shop"),
            dst_backend: Name::new("web.shop"),
            client_id: Name::new(""),
            tls: TlsState::Mutual,
        }
    }

    #[tokio::test]
    async fn records_grpc_status_from_trailers_once() {
        let metrics = Metrics::new();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ]));
        let observed = Observed::new(
            boxed(body),
            metrics.http_request(labels()),
            StatusCode::OK,
            &HeaderMap::new(),
        );
        let collected = observed.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "7");
        let text = metrics.encode();
        assert!(text.contains(r#"weft_http_responses_total{status_code="200",grpc_status="7",direction="outbound",route="default""#), "{text}");
    }

    #[tokio::test]
    async fn records_plain_response_when_dropped_early() {
        let metrics = Metrics::new();
        let observed = Observed::new(
            full(Bytes::from_static(b"abc")),
            metrics.http_request(labels()),
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
        );
        drop(observed);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"weft_http_responses_total{status_code="502",grpc_status="",direction="outbound""#
            ),
            "{text}"
        );
        assert!(text.contains(r#"weft_http_requests_total{direction="outbound",route="default",dst_service="web.shop",dst_backend="web.shop",client_id="",tls="true"} 1"#), "{text}");
    }
}

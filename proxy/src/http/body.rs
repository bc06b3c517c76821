//! Bodies on the HTTP path: one boxed type for everything the proxy sends, a wrapper that
//! reports a response body's trailers and end (to its metrics and its trace span: the gRPC
//! status lives in trailers), and the proxy's own short error responses.

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

/// What a response body reports to once it is over: trailers as they pass, then its end.
/// Metrics (`Record`) and tracing (`trace::ActiveSpan`) are the two.
pub trait EndOfBody: Unpin {
    /// Trailers passing through (a gRPC status lives there).
    fn trailers(&mut self, trailers: &HeaderMap);
    /// The body ended, failed (`failed`), or was dropped before its end. Called once.
    fn end(self, failed: bool);
}

/// Passes a response body through and tells `H` about its trailers and its end.
pub struct OnEnd<H: EndOfBody> {
    inner: Body,
    hook: Option<H>,
}

impl<H: EndOfBody> OnEnd<H> {
    pub fn new(inner: Body, hook: H) -> Self {
        OnEnd {
            inner,
            hook: Some(hook),
        }
    }

    fn finish(&mut self, failed: bool) {
        if let Some(hook) = self.hook.take() {
            hook.end(failed);
        }
    }
}

impl<H: EndOfBody> Drop for OnEnd<H> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<H: EndOfBody> HttpBody for OnEnd<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(hook)) = (frame.trailers_ref(), self.hook.as_mut()) {
                    hook.trailers(trailers);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Ready(None) => self.finish(false),
            Poll::Pending => {}
        }
        if self.inner.is_end_stream() {
            self.finish(false);
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

/// A response as its metrics record it: once, at the end of its body (with the gRPC
/// status from trailers or headers) or when the body is dropped early.
pub struct Record {
    metrics: HttpRequestMetrics,
    status: u16,
    grpc: Option<u16>,
}

impl EndOfBody for Record {
    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(code) = grpc_status_of(trailers) {
            self.grpc = Some(code);
        }
    }

    fn end(self, _failed: bool) {
        self.metrics
            .response_end(self.status, GrpcStatus(self.grpc));
    }
}

/// `inner`, recorded in `metrics` when it ends.
pub fn observed(
    inner: Body,
    metrics: HttpRequestMetrics,
    status: StatusCode,
    headers: &HeaderMap,
) -> OnEnd<Record> {
    let record = Record {
        metrics,
        status: status.as_u16(),
        grpc: grpc_status_of(headers),
    };
    OnEnd::new(inner, record)
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
        let observed = observed(
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
        let observed = observed(
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

//! An OTLP/gRPC trace receiver for tests: the collector's `TraceService`, generated from the
//! official OpenTelemetry protos (the `opentelemetry-proto` crate), served by tonic on a
//! listener the test chose (e.g. in the node namespace, where pods reach it). It answers
//! every export with success and keeps every span with its resource's attributes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, Span};

use crate::error::{HarnessError, IoContext, Result};
use crate::wait::wait_for;

/// One received span and the attributes of the resource (process) that sent it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub resource: BTreeMap<String, String>,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    /// Empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }

    pub fn is_client(&self) -> bool {
        self.span.kind == span::SpanKind::Client as i32
    }

    pub fn is_server(&self) -> bool {
        self.span.kind == span::SpanKind::Server as i32
    }

    /// A string or integer attribute, as text.
    pub fn attr(&self, key: &str) -> Option<String> {
        attributes(&self.span.attributes).remove(key)
    }
}

fn text(value: &Option<AnyValue>) -> Option<String> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), text(&kv.value)?)))
        .collect()
}

#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<u64>>,
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    received.push(ReceivedSpan {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        if let Ok(mut n) = self.requests.lock() {
            *n += 1;
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver; dropping it stops the server.
pub struct OtlpReceiver {
    addr: SocketAddr,
    recorder: Recorder,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Serves on `listener` (already bound, e.g. by `Netns::bind`) from a thread of its own.
    pub fn start(listener: std::net::TcpListener) -> Result<OtlpReceiver> {
        let addr = listener
            .local_addr()
            .context(|| "reading the receiver's address".to_string())?;
        listener
            .set_nonblocking(true)
            .context(|| "making the receiver's listener non-blocking".to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context(|| "building the receiver's runtime".to_string())?;
        let recorder = Recorder::default();
        let service = TraceServiceServer::new(recorder.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("otlp receiver: {e}");
                        return;
                    }
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let served = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = rx.await;
                    })
                    .await;
                if let Err(e) = served {
                    eprintln!("otlp receiver: {e}");
                }
            })
        });
        Ok(OtlpReceiver {
            addr,
            recorder,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.recorder
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// How many export calls arrived.
    pub fn export_calls(&self) -> u64 {
        self.recorder.requests.lock().map(|n| *n).unwrap_or(0)
    }

    /// Waits until the received spans satisfy `done`, and returns them.
    pub fn wait_for_spans(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>> {
        wait_for(what, timeout, || done(&self.spans())).map_err(|e| match e {
            HarnessError::Timeout { what, timeout } => HarnessError::Timeout {
                what: format!("{what}; received: {:#?}", self.spans()),
                timeout,
            },
            other => other,
        })?;
        Ok(self.spans())
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Jaeger's version that `scripts/otel-fixture build` builds.
pub const JAEGER_VERSION: &str = "v1.62.0";
const JAEGER_OTLP_PORT: u16 = 4317;
const JAEGER_QUERY_PORT: u16 = 16686;
const JAEGER_ADMIN_PORT: u16 = 14269;
const JAEGER_START: Duration = Duration::from_secs(30);

/// Where `scripts/otel-fixture build` puts Jaeger all-in-one (`WEFT_JAEGER` overrides).
pub fn jaeger_path() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("WEFT_JAEGER") {
        return path.into();
    }
    let tools = std::env::var_os("WEFT_TOOLS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/weft/tools")
        });
    tools
        .join(format!("jaeger-{JAEGER_VERSION}"))
        .join("bin/jaeger-all-in-one")
}

/// A real collector: Jaeger all-in-one (OTLP/gRPC receiver, in-memory storage) in a
/// namespace, read back through its query API.
pub struct Jaeger {
    _proc: crate::Proc,
    ip: std::net::Ipv4Addr,
    netns: crate::Netns,
}

impl Jaeger {
    /// Starts Jaeger on `ip` in `netns` and waits until it is healthy. `None` when it is not
    /// built: prints `SKIPPED: ...`, or panics under `CI=true`.
    pub fn start(
        test: &str,
        netns: &crate::Netns,
        ip: std::net::Ipv4Addr,
    ) -> Result<Option<Jaeger>> {
        let path = jaeger_path();
        if !path.is_file() {
            let missing = [format!(
                "{} (build it with: scripts/otel-fixture build)",
                path.display()
            )];
            match crate::prereqs::verdict(test, &missing, crate::prereqs::ci_enabled()) {
                crate::prereqs::Verdict::Run => {}
                crate::prereqs::Verdict::Skip(message) => {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "{message}");
                    return Ok(None);
                }
                crate::prereqs::Verdict::Fail(message) => panic!("{message}"),
            }
        }
        let cmd = crate::Cmd::new(&path)
            .arg(format!(
                "--collector.otlp.grpc.host-port={ip}:{JAEGER_OTLP_PORT}"
            ))
            .arg(format!(
                "--query.http-server.host-port={ip}:{JAEGER_QUERY_PORT}"
            ))
            .arg(format!("--admin.http.host-port={ip}:{JAEGER_ADMIN_PORT}"))
            .env("SPAN_STORAGE_TYPE", "memory")
            .env("COLLECTOR_OTLP_ENABLED", "true");
        let mut proc = netns.spawn(cmd)?;
        let health = format!("http://{ip}:{JAEGER_ADMIN_PORT}/");
        crate::wait::wait_until("Jaeger to be healthy", JAEGER_START, || {
            if let Some(status) = proc.try_wait()? {
                return Err(HarnessError::CommandFailed {
                    command: proc.label().to_string(),
                    status: format!("exited early with {status}"),
                    stderr: proc.logs(),
                });
            }
            Ok(netns.http_get(&health).is_ok_and(|r| r.status == 200))
        })?;
        Ok(Some(Jaeger {
            _proc: proc,
            ip,
            netns: netns.clone(),
        }))
    }

    /// The OTLP/gRPC receiver's `host:port`.
    pub fn otlp_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, JAEGER_OTLP_PORT))
    }

    /// The spans Jaeger holds for `trace_id` (32 hex digits), in the receiver's form.
    pub fn trace(&self, trace_id: &str) -> Result<Vec<ReceivedSpan>> {
        let url = format!(
            "http://{}:{JAEGER_QUERY_PORT}/api/traces/{trace_id}",
            self.ip
        );
        let rsp = self.netns.http_get(&url)?;
        if rsp.status == 404 {
            return Ok(Vec::new());
        }
        if rsp.status != 200 {
            return Err(HarnessError::invalid(
                "Jaeger query response",
                format!("status {}: {}", rsp.status, rsp.body_text()),
            ));
        }
        let doc: serde_json::Value = serde_json::from_slice(&rsp.body)
            .map_err(|e| HarnessError::invalid("Jaeger query JSON", e.to_string()))?;
        Ok(jaeger_spans(&doc))
    }
}

fn unhex(s: &str, width: usize) -> Vec<u8> {
    let padded = format!("{s:0>width$}", width = width * 2);
    hex::decode(padded).unwrap_or_default()
}

fn jaeger_tags(tags: &serde_json::Value) -> Vec<KeyValue> {
    tags.as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let key = t["key"].as_str()?.to_string();
            let value = match &t["value"] {
                serde_json::Value::String(s) => any_value::Value::StringValue(s.clone()),
                serde_json::Value::Bool(b) => any_value::Value::BoolValue(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => any_value::Value::IntValue(i),
                    None => any_value::Value::DoubleValue(n.as_f64()?),
                },
                other => any_value::Value::StringValue(other.to_string()),
            };
            Some(KeyValue {
                key,
                value: Some(AnyValue { value: Some(value) }),
                ..Default::default()
            })
        })
        .collect()
}

/// Jaeger's JSON (`{"data":[{"spans":[..],"processes":{..}}]}`) as OTLP spans: ids, the
/// CHILD_OF parent, `span.kind`, tags as attributes, times (microseconds there) in nanos,
/// and the process's tags (plus `service.name`) as the resource.
fn jaeger_spans(doc: &serde_json::Value) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for trace in doc["data"].as_array().into_iter().flatten() {
        for s in trace["spans"].as_array().into_iter().flatten() {
            let process = &trace["processes"][s["processID"].as_str().unwrap_or_default()];
            let mut resource = attributes(&jaeger_tags(&process["tags"]));
            if let Some(name) = process["serviceName"].as_str() {
                resource.insert("service.name".into(), name.into());
            }
            let tags = jaeger_tags(&s["tags"]);
            let tag = |key: &str| attributes(&tags).remove(key);
            let parent = s["references"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["refType"] == "CHILD_OF")
                .and_then(|r| r["spanID"].as_str())
                .map(|id| unhex(id, 8))
                .unwrap_or_default();
            let kind = match tag("span.kind").as_deref() {
                Some("client") => span::SpanKind::Client,
                Some("server") => span::SpanKind::Server,
                _ => span::SpanKind::Unspecified,
            };
            let start_us = s["startTime"].as_u64().unwrap_or_default();
            let duration_us = s["duration"].as_u64().unwrap_or_default();
            let status =
                tag("otel.status_code").map(|code| opentelemetry_proto::tonic::trace::v1::Status {
                    message: tag("otel.status_description").unwrap_or_default(),
                    code: if code == "ERROR" { 2 } else { 1 },
                });
            out.push(ReceivedSpan {
                resource,
                span: Span {
                    trace_id: unhex(s["traceID"].as_str().unwrap_or_default(), 16),
                    span_id: unhex(s["spanID"].as_str().unwrap_or_default(), 8),
                    parent_span_id: parent,
                    name: s["operationName"].as_str().unwrap_or_default().to_string(),
                    kind: kind as i32,
                    start_time_unix_nano: start_us * 1000,
                    end_time_unix_nano: (start_us + duration_us) * 1000,
                    trace_state: tag("w3c.tracestate").unwrap_or_default(),
                    attributes: tags,
                    status,
                    ..Default::default()
                },
            });
        }
    }
    out
}

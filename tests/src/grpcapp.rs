//! The gRPC test service behind `weft-httpapp grpc-server` (unary `Echo`, bidirectional
//! `Chat`, each able to end with a status the caller picks and trailer metadata), and the
//! client calls the tests make through the mesh.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::error::{HarnessError, Result};
use crate::httpapp::current_thread_runtime;

pub mod pb {
    //! `weft.e2e.v1`: the test service's messages, client and server.
    tonic::include_proto!("weft.e2e.v1");
}

use pb::test_service_client::TestServiceClient;
use pb::test_service_server::{TestService, TestServiceServer};
use pb::{ChatMessage, EchoReply, EchoRequest};

/// Metadata the server sends with every reply (headers) and final status (trailers).
pub const SERVED_BY: &str = "x-served-by";
/// Trailer on a failed `Echo`.
pub const ECHO_TRAILER: &str = "x-echo-trailer";
pub const ECHO_TRAILER_VALUE: &str = "echo-trailer-value";
/// Trailer on the end of every `Chat`: how many messages the server echoed.
pub const CHAT_COUNT: &str = "x-chat-count";

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TestServiceImpl {
    name: String,
}

impl TestServiceImpl {
    pub fn new(name: &str) -> TestServiceImpl {
        TestServiceImpl {
            name: name.to_string(),
        }
    }

    fn metadata(&self) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Ok(value) = MetadataValue::try_from(self.name.as_str()) {
            metadata.insert(SERVED_BY, value);
        }
        metadata
    }
}

type ChatStream = Pin<Box<dyn Stream<Item = std::result::Result<ChatMessage, Status>> + Send>>;

#[tonic::async_trait]
impl TestService for TestServiceImpl {
    async fn echo(
        &self,
        request: Request<EchoRequest>,
    ) -> std::result::Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        if request.status_code != 0 {
            let mut metadata = self.metadata();
            metadata.insert(ECHO_TRAILER, MetadataValue::from_static(ECHO_TRAILER_VALUE));
            return Err(Status::with_metadata(
                code_from(request.status_code),
                request.status_message,
                metadata,
            ));
        }
        let mut response = Response::new(EchoReply {
            message: request.message,
            served_by: self.name.clone(),
        });
        *response.metadata_mut() = self.metadata();
        Ok(response)
    }

    type ChatStream = ChatStream;

    async fn chat(
        &self,
        request: Request<Streaming<ChatMessage>>,
    ) -> std::result::Result<Response<ChatStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let service = self.clone();
        tokio::spawn(async move {
            let mut echoed: u64 = 0;
            loop {
                let end_code = match inbound.message().await {
                    Ok(Some(message)) => {
                        echoed += 1;
                        let reply = ChatMessage {
                            text: message.text,
                            served_by: service.name.clone(),
                            end_status_code: 0,
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                        if message.end_status_code == 0 {
                            continue;
                        }
                        message.end_status_code
                    }
                    Ok(None) => 0,
                    // The client went away: there is nobody to tell.
                    Err(_) => return,
                };
                // A status yielded by the stream becomes the trailers (grpc-status included,
                // even for OK), after the messages.
                let mut metadata = service.metadata();
                if let Ok(value) = MetadataValue::try_from(echoed.to_string().as_str()) {
                    metadata.insert(CHAT_COUNT, value);
                }
                let status = Status::with_metadata(code_from(end_code), "chat ended", metadata);
                let _ = tx.send(Err(status)).await;
                return;
            }
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as ChatStream);
        *response.metadata_mut() = self.metadata();
        Ok(response)
    }
}

fn code_from(code: u32) -> Code {
    Code::from(i32::try_from(code).unwrap_or(i32::MAX))
}

/// Serves the test service on `listener` until the task is dropped.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    name: &str,
) -> std::result::Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(TestServiceServer::new(TestServiceImpl::new(name)))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
}

/// How a unary `Echo` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoOutcome {
    pub code: Code,
    /// The reply's message, or the status message on failure.
    pub message: String,
    /// From the reply body (empty on failure).
    pub served_by: String,
    /// Response headers on success; the status's metadata (trailers) on failure.
    pub metadata: BTreeMap<String, String>,
}

/// How a `Chat` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatOutcome {
    pub replies: Vec<ChatMessage>,
    pub code: Code,
    pub status_message: String,
    /// The final trailers (without grpc-status and grpc-message).
    pub trailers: BTreeMap<String, String>,
}

/// A channel to `http://<addr>` (h2c), made from the calling thread's runtime.
pub async fn connect(addr: SocketAddr) -> Result<TestServiceClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| HarnessError::invalid("gRPC endpoint", e.to_string()))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| HarnessError::invalid("gRPC connect", format!("{addr}: {e:?}")))?;
    Ok(TestServiceClient::new(channel))
}

/// One unary `Echo`; a non-zero `status_code` asks the server to fail with it.
pub async fn echo(
    client: &mut TestServiceClient<Channel>,
    message: &str,
    status_code: u32,
    status_message: &str,
) -> EchoOutcome {
    let request = EchoRequest {
        message: message.to_string(),
        status_code,
        status_message: status_message.to_string(),
    };
    match client.echo(request).await {
        Ok(response) => {
            let metadata = metadata_map(response.metadata());
            let reply = response.into_inner();
            EchoOutcome {
                code: Code::Ok,
                message: reply.message,
                served_by: reply.served_by,
                metadata,
            }
        }
        Err(status) => EchoOutcome {
            code: status.code(),
            message: status.message().to_string(),
            served_by: String::new(),
            metadata: metadata_map(status.metadata()),
        },
    }
}

/// A `Chat` that sends each text and waits for its echo before the next (so both directions
/// stay open at once). With `end_status_code` 0 the client half-closes after the last text
/// and the server ends with OK; otherwise the last text asks the server to end with it.
pub async fn chat(
    client: &mut TestServiceClient<Channel>,
    texts: &[&str],
    end_status_code: u32,
) -> Result<ChatOutcome> {
    let invalid = |detail: String| HarnessError::invalid("gRPC chat", detail);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let response = client
        .chat(ReceiverStream::new(rx))
        .await
        .map_err(|status| invalid(format!("call refused: {status:?}")))?;
    let mut inbound = response.into_inner();
    let mut replies = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let last = i + 1 == texts.len();
        let message = ChatMessage {
            text: text.to_string(),
            served_by: String::new(),
            end_status_code: if last { end_status_code } else { 0 },
        };
        tx.send(message)
            .await
            .map_err(|_| invalid(format!("the request stream closed before message {i}")))?;
        match inbound.message().await {
            Ok(Some(reply)) => replies.push(reply),
            Ok(None) => return Err(invalid(format!("stream ended before echo {i}"))),
            Err(status) => {
                return Err(invalid(format!("failed before echo {i}: {status:?}")));
            }
        }
    }
    drop(tx);
    match inbound.message().await {
        Ok(Some(extra)) => Err(invalid(format!("unexpected extra message {extra:?}"))),
        Ok(None) => {
            let trailers = inbound
                .trailers()
                .await
                .map_err(|status| invalid(format!("reading trailers: {status:?}")))?
                .map(|t| metadata_map(&t))
                .unwrap_or_default();
            Ok(ChatOutcome {
                replies,
                code: Code::Ok,
                status_message: String::new(),
                trailers,
            })
        }
        Err(status) => Ok(ChatOutcome {
            replies,
            code: status.code(),
            status_message: status.message().to_string(),
            trailers: metadata_map(status.metadata()),
        }),
    }
}

fn metadata_map(metadata: &MetadataMap) -> BTreeMap<String, String> {
    metadata
        .clone()
        .into_headers()
        .iter()
        .filter(|(name, _)| !name.as_str().starts_with("grpc-"))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// Unary calls `(message, status_code)` over one channel, all in flight at once (HTTP/2
/// multiplexing), on a fresh current-thread runtime: call it inside `pod.in_netns(..)`.
pub fn echo_blocking(addr: SocketAddr, calls: &[(&str, u32)]) -> Result<Vec<EchoOutcome>> {
    current_thread_runtime()?.block_on(async {
        let client = connect(addr).await?;
        let calls = calls.iter().map(|(message, status_code)| {
            let mut client = client.clone();
            async move { echo(&mut client, message, *status_code, "requested failure").await }
        });
        Ok(futures_util::future::join_all(calls).await)
    })
}

/// [`chat`] on a fresh current-thread runtime: call it inside `pod.in_netns(..)`.
pub fn chat_blocking(
    addr: SocketAddr,
    texts: &[&str],
    end_status_code: u32,
) -> Result<ChatOutcome> {
    current_thread_runtime()?.block_on(async {
        let mut client = connect(addr).await?;
        chat(&mut client, texts, end_status_code).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_server(name: &'static str) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let runtime = current_thread_runtime().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve_grpc(listener, name).await.unwrap();
            });
        });
        (addr, handle)
    }

    #[test]
    fn unary_echo_and_requested_failures_carry_metadata() {
        let (addr, _server) = local_server("grpc-a");
        let outcomes = echo_blocking(addr, &[("hello", 0), ("missing", 5), ("again", 0)]).unwrap();
        assert_eq!(outcomes[0].code, Code::Ok);
        assert_eq!(outcomes[0].message, "hello");
        assert_eq!(outcomes[0].served_by, "grpc-a");
        assert_eq!(
            outcomes[0].metadata.get(SERVED_BY).map(String::as_str),
            Some("grpc-a")
        );
        assert_eq!(outcomes[1].code, Code::NotFound);
        assert_eq!(outcomes[1].message, "requested failure");
        assert_eq!(
            outcomes[1].metadata.get(ECHO_TRAILER).map(String::as_str),
            Some(ECHO_TRAILER_VALUE)
        );
        assert_eq!(outcomes[2].message, "again");
    }

    #[test]
    fn chat_ends_with_trailers_after_the_messages() {
        let (addr, _server) = local_server("grpc-b");
        let ok = chat_blocking(addr, &["one", "two", "three"], 0).unwrap();
        assert_eq!(ok.code, Code::Ok);
        let texts: Vec<&str> = ok.replies.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert!(ok.replies.iter().all(|r| r.served_by == "grpc-b"));
        assert_eq!(ok.trailers.get(CHAT_COUNT).map(String::as_str), Some("3"));
        assert_eq!(
            ok.trailers.get(SERVED_BY).map(String::as_str),
            Some("grpc-b")
        );

        let aborted = chat_blocking(addr, &["a", "b"], 10).unwrap();
        assert_eq!(aborted.code, Code::Aborted);
        assert_eq!(aborted.status_message, "chat ended");
        assert_eq!(aborted.replies.len(), 2);
        assert_eq!(
            aborted.trailers.get(CHAT_COUNT).map(String::as_str),
            Some("2")
        );
    }
}

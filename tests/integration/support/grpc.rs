//! A real gRPC service and client (tonic), written by hand the way tonic's
//! generated code is: prost messages with a derive, a service that routes by
//! path to `tonic::server::Grpc`, and a client over `tonic::client::Grpc`
//! with `ProstCodec`. No protoc, no build script.
//!
//! The service, `portico.test.Echo`, has one method of each kind:
//! `Unary`, `Sum` (client streaming), `Count` (server streaming) and `Chat`
//! (bidirectional). `Msg` fields steer it: `delay_ms` delays the answer,
//! `fail` ends the call with `NOT_FOUND`, that message and the trailing
//! metadata `x-error-detail: see-trailers`; `wait` makes `Count` stop after
//! its first message until the test calls [`GrpcServer::release`].
//!
//! ```ignore
//! let server = grpc::start().await;               // tonic server on 127.0.0.1:0
//! let mut client = grpc::connect(gw.addr()).await; // tonic Channel, h2c
//! let reply = client.unary(Msg::text("hi")).await?;
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{self, Stream};
use http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message type of the test service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(int64, tag = "2")]
    pub number: i64,
    /// The server waits this long before answering (each message, for streams).
    #[prost(uint64, tag = "3")]
    pub delay_ms: u64,
    /// When set, the call ends with `NOT_FOUND` and this message.
    #[prost(string, tag = "4")]
    pub fail: String,
    /// `Count`: wait for [`GrpcServer::release`] after the first message.
    #[prost(bool, tag = "5")]
    pub wait: bool,
}

impl Msg {
    pub fn text(text: &str) -> Msg {
        Msg {
            text: text.to_string(),
            ..Msg::default()
        }
    }

    pub fn number(number: i64) -> Msg {
        Msg {
            number,
            ..Msg::default()
        }
    }
}

pub const SERVICE: &str = "portico.test.Echo";
/// How long `Count` waits for [`GrpcServer::release`] before giving up
/// with `ABORTED`.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(10);

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

// ------------------------------------------------------------------ server

#[derive(Default)]
struct State {
    calls: AtomicUsize,
    /// Messages `Count` has sent so far.
    sent: AtomicUsize,
    gate: tokio::sync::Notify,
}

/// A tonic server on loopback; stops when dropped.
pub struct GrpcServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    /// Calls that reached the service (any method).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Messages `Count` has sent so far (over all its calls).
    pub fn sent(&self) -> usize {
        self.state.sent.load(Ordering::SeqCst)
    }

    /// Lets a waiting `Count` go on.
    pub fn release(&self) {
        self.state.gate.notify_one();
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// Starts the `portico.test.Echo` service with tonic's own server
/// (`tonic::transport::Server`, HTTP/2 only) on 127.0.0.1:0.
pub async fn start() -> GrpcServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(State::default());
    let svc = EchoServer {
        state: state.clone(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                svc,
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .expect("tonic server");
    });
    GrpcServer {
        addr,
        state,
        shutdown: Some(tx),
        task,
    }
}

/// The service: routes by path to one handler per method, as tonic's
/// generated `*Server` types do.
#[derive(Clone)]
struct EchoServer {
    state: Arc<State>,
}

/// One method handler as a tower service (tonic's `UnaryService`,
/// `ClientStreamingService`, ... are implemented for any such service).
struct Method<F>(F);

impl<F, Req, Fut, Res> tower_service::Service<Request<Req>> for Method<F>
where
    F: FnMut(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Res>, Status>>,
{
    type Response = Response<Res>;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Req>) -> Fut {
        (self.0)(req)
    }
}

fn failure(message: &str) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("x-error-detail", MetadataValue::from_static("see-trailers"));
    Status::with_metadata(Code::NotFound, message, md)
}

async fn delay(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// `Unary`: echoes `text` and `number`; copies the request metadata
/// `x-custom` into the response metadata `x-echo-custom`.
async fn unary(req: Request<Msg>) -> Result<Response<Msg>, Status> {
    let custom = req.metadata().get("x-custom").cloned();
    let m = req.into_inner();
    delay(m.delay_ms).await;
    if !m.fail.is_empty() {
        return Err(failure(&m.fail));
    }
    let mut resp = Response::new(Msg {
        text: m.text,
        number: m.number,
        ..Msg::default()
    });
    if let Some(v) = custom {
        resp.metadata_mut().insert("x-echo-custom", v);
    }
    Ok(resp)
}

/// `Sum`: the sum of the `number`s received, and their count in `text`.
async fn sum(req: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
    let mut s = req.into_inner();
    let (mut total, mut n) = (0, 0);
    while let Some(m) = s.message().await? {
        total += m.number;
        n += 1;
    }
    Ok(Response::new(Msg {
        text: n.to_string(),
        number: total,
        ..Msg::default()
    }))
}

/// `Count`: `number` messages (1, 2, ...), `delay_ms` apart; with `wait`,
/// pauses after the first until released; with `fail`, ends with that error.
async fn count(state: Arc<State>, req: Request<Msg>) -> Result<Response<MsgStream>, Status> {
    let m = req.into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 1..=m.number {
            if i > 1 {
                delay(m.delay_ms).await;
            }
            if tx.send(Ok(Msg::number(i))).await.is_err() {
                return;
            }
            state.sent.fetch_add(1, Ordering::SeqCst);
            if i == 1 && m.wait {
                let released = tokio::time::timeout(GATE_TIMEOUT, state.gate.notified()).await;
                if released.is_err() {
                    let _ = tx.send(Err(Status::aborted("never released"))).await;
                    return;
                }
            }
        }
        if !m.fail.is_empty() {
            let _ = tx.send(Err(failure(&m.fail))).await;
        }
    });
    Ok(Response::new(receiver_stream(rx)))
}

/// `Chat`: answers each message at once with `pong:TEXT` and its sequence
/// number, until the client ends its side.
async fn chat(req: Request<Streaming<Msg>>) -> Result<Response<MsgStream>, Status> {
    let mut s = req.into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let reply = match s.message().await {
                Ok(Some(m)) => {
                    n += 1;
                    Ok(Msg {
                        text: format!("pong:{}", m.text),
                        number: n,
                        ..Msg::default()
                    })
                }
                Ok(None) => return,
                Err(e) => Err(e),
            };
            if tx.send(reply).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(receiver_stream(rx)))
}

fn receiver_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> Pin<Box<dyn Stream<Item = T> + Send>> {
    Box::pin(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

impl<B> tower_service::Service<http::Request<B>> for EchoServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        let method = req
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or("")
            .to_string();
        Box::pin(async move {
            if matches!(method.as_str(), "Unary" | "Sum" | "Count" | "Chat") {
                state.calls.fetch_add(1, Ordering::SeqCst);
            }
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
            let resp = match method.as_str() {
                "Unary" => grpc.unary(Method(unary), req).await,
                "Sum" => grpc.client_streaming(Method(sum), req).await,
                "Count" => {
                    let count = move |r| count(state.clone(), r);
                    grpc.server_streaming(Method(count), req).await
                }
                "Chat" => grpc.streaming(Method(chat), req).await,
                _ => Status::unimplemented("unknown method").into_http(),
            };
            Ok(resp)
        })
    }
}

// ------------------------------------------------------------------ client

/// A client of `portico.test.Echo` over any tonic transport.
pub struct EchoClient<T> {
    inner: tonic::client::Grpc<T>,
}

/// A tonic `Channel` to `addr` (HTTP/2 with prior knowledge), as gRPC
/// clients connect to a gateway.
pub async fn connect(addr: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect a tonic channel");
    EchoClient {
        inner: tonic::client::Grpc::new(channel),
    }
}

/// The same client over a bare HTTP/2 connection (hyper-util's client,
/// prior knowledge) instead of a `Channel`. A `Channel` enforces a
/// request's `grpc-timeout` itself (answering `CANCELLED` when it passes);
/// this transport does not, so whatever status arrives came from the
/// other end.
pub type BareTransport = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

pub fn connect_bare(addr: SocketAddr) -> EchoClient<BareTransport> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{addr}").parse().unwrap();
    EchoClient {
        inner: tonic::client::Grpc::with_origin(client, origin),
    }
}

impl<T> EchoClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    async fn ready(&mut self) -> Result<(), Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("service not ready: {}", e.into())))
    }

    fn path(method: &str) -> PathAndQuery {
        PathAndQuery::try_from(format!("/{SERVICE}/{method}")).unwrap()
    }

    pub async fn unary(
        &mut self,
        req: impl tonic::IntoRequest<Msg>,
    ) -> Result<Response<Msg>, Status> {
        self.unary_at("Unary", req).await
    }

    /// A unary call of any method name of the service (for unknown ones).
    pub async fn unary_at(
        &mut self,
        method: &str,
        req: impl tonic::IntoRequest<Msg>,
    ) -> Result<Response<Msg>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<Msg, Msg>::default();
        self.inner
            .unary(req.into_request(), Self::path(method), codec)
            .await
    }

    pub async fn sum(
        &mut self,
        req: impl tonic::IntoStreamingRequest<Message = Msg>,
    ) -> Result<Response<Msg>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<Msg, Msg>::default();
        self.inner
            .client_streaming(req.into_streaming_request(), Self::path("Sum"), codec)
            .await
    }

    pub async fn count(
        &mut self,
        req: impl tonic::IntoRequest<Msg>,
    ) -> Result<Response<Streaming<Msg>>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<Msg, Msg>::default();
        self.inner
            .server_streaming(req.into_request(), Self::path("Count"), codec)
            .await
    }

    pub async fn chat(
        &mut self,
        req: impl tonic::IntoStreamingRequest<Message = Msg>,
    ) -> Result<Response<Streaming<Msg>>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<Msg, Msg>::default();
        self.inner
            .streaming(req.into_streaming_request(), Self::path("Chat"), codec)
            .await
    }
}

/// A request stream the test feeds one message at a time (for `Sum` and
/// `Chat`); dropping the sender ends the client's side.
pub fn request_stream() -> (
    tokio::sync::mpsc::Sender<Msg>,
    Pin<Box<dyn Stream<Item = Msg> + Send>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    (tx, receiver_stream(rx))
}

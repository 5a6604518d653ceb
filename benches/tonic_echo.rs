//! Transport ceilings for `benches/compare.sh`: how fast one tonic bidi stream and one raw
//! loopback TCP stream move bytes on this machine, in the same run as the broker benchmarks.
//!
//! - tonic: an in-process server on 127.0.0.1:0 with the broker's HTTP/2 settings (stream window
//!   8 MiB, connection window 32 MiB, `tcp_nodelay`) answers each `ProduceRequest` on one
//!   `ProduceStream`-shaped bidi stream with a small `ProduceResponse` and does nothing else. The
//!   client keeps 8 requests in flight (the producer's default), each carrying one encoded batch of
//!   256 records of 1 KiB or 100 B, or 1024 of 1 KiB (the batch codec the producer uses), and
//!   counts the acks.
//! - TCP: a plain tokio `TcpStream`, 1 MiB writes, a reader that discards.
//!
//! Run: `cargo run --release --example tonic_echo -- [SECS]` (default 5 s per shape). Prints one
//! JSON line on stdout: `{"tcp": {"mb_per_sec"}, "tonic": [{"record_size", "records_per_msg",
//! "msg_bytes", "msgs_per_sec", "records_per_sec", "mb_per_sec"}, ...]}`; MB = 10^6 bytes of record
//! values, as in `syncline bench`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1::{ProduceRequest, ProduceResponse};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The broker's HTTP/2 windows (broker/src/server/mod.rs) and the client's.
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// The producer's default `in_flight_max`.
const IN_FLIGHT: usize = 8;
/// (record size, records per message): the brief's 256-record batches, and a 1 MiB batch (the
/// `syncline bench` default `--batch-bytes`).
const SHAPES: [(usize, usize); 3] = [(1024, 256), (100, 256), (1024, 1024)];
const PATH: &str = "/echo.Echo/Produce";
const TCP_WRITE_BYTES: usize = 1024 * 1024;

type ResponseStream = std::pin::Pin<Box<dyn Stream<Item = Result<ProduceResponse, Status>> + Send>>;

/// A one-method gRPC service: every request on the stream gets a small response.
#[derive(Clone)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "echo.Echo";
}

struct EchoStream;

impl tonic::server::StreamingService<ProduceRequest> for EchoStream {
    type Response = ProduceResponse;
    type ResponseStream = ResponseStream;
    type Future = tonic::codegen::BoxFuture<Response<ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<ProduceRequest>>) -> Self::Future {
        let responses = request.into_inner().map(|request| {
            request.map(|request| ProduceResponse {
                correlation_id: request.correlation_id,
                partition: request.partition,
                base_offset: 0,
                last_offset: request.batch.len() as u64,
                error: None,
            })
        });
        Box::pin(async move { Ok(Response::new(Box::pin(responses) as ResponseStream)) })
    }
}

impl tonic::codegen::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            let codec = ProstCodec::<ProduceResponse, ProduceRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(64 << 20), Some(64 << 20));
            Ok(grpc.streaming(EchoStream, request).await)
        })
    }
}

/// One encoded batch of `records` values of `size` bytes, as a producer sends it.
fn batch(records: usize, size: usize) -> anyhow::Result<Bytes> {
    let mut builder = BatchBuilder::with_capacity(records * (size + 32) + 64);
    let value = vec![0x42u8; size];
    for _ in 0..records {
        builder.push(1_700_000_000_000, None, Some(&value), &[]);
    }
    Ok(builder.finish()?)
}

struct Shape {
    record_size: usize,
    records_per_msg: usize,
    msg_bytes: usize,
    msgs_per_sec: f64,
}

async fn tonic_shape(
    addr: std::net::SocketAddr,
    (record_size, records_per_msg): (usize, usize),
    secs: f64,
) -> anyhow::Result<Shape> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("channel not ready")?;
    let payload = batch(records_per_msg, record_size)?;
    let msg_bytes = payload.len();
    let (tx, rx) = mpsc::channel::<ProduceRequest>(IN_FLIGHT);
    let codec = ProstCodec::<ProduceRequest, ProduceResponse>::default();
    let call = grpc.streaming(
        Request::new(ReceiverStream::new(rx)),
        http::uri::PathAndQuery::from_static(PATH),
        codec,
    );
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let sender = {
        let slots = slots.clone();
        tokio::spawn(async move {
            let mut id = 0u64;
            while Instant::now() < deadline {
                let Ok(slot) = slots.acquire().await else {
                    break;
                };
                slot.forget();
                id += 1;
                let request = ProduceRequest {
                    correlation_id: id,
                    topic: "echo".into(),
                    partition: 0,
                    acks: 2,
                    batch: payload.clone(),
                    ..ProduceRequest::default()
                };
                if tx.send(request).await.is_err() {
                    break;
                }
            }
        })
    };
    let start = Instant::now();
    let mut responses = call.await?.into_inner();
    let mut elapsed = Duration::ZERO;
    while let Some(response) = responses.next().await {
        response?;
        acked.fetch_add(1, Ordering::Relaxed);
        slots.add_permits(1);
        elapsed = start.elapsed();
    }
    sender.await?;
    Ok(Shape {
        record_size,
        records_per_msg,
        msg_bytes,
        msgs_per_sec: acked.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

async fn tcp_ceiling(secs: f64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let mut buf = vec![0u8; TCP_WRITE_BYTES];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<u64, std::io::Error>(total);
            }
            total += n as u64;
        }
    });
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let chunk = vec![0x42u8; TCP_WRITE_BYTES];
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        stream.write_all(&chunk).await?;
    }
    stream.shutdown().await?;
    drop(stream);
    let total = reader.await??;
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e6)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: f64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().context("usage: tonic_echo [SECS per shape]")?,
        None => 5.0,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .tcp_nodelay(true)
        .add_service(Echo)
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let tcp = tcp_ceiling(secs.min(3.0)).await?;
    let mut shapes = Vec::new();
    for shape in SHAPES {
        shapes.push(tonic_shape(addr, shape, secs).await?);
    }
    server.abort();

    let tonic: Vec<serde_json::Value> = shapes
        .iter()
        .map(|shape| {
            let records_per_sec = shape.msgs_per_sec * shape.records_per_msg as f64;
            serde_json::json!({
                "record_size": shape.record_size,
                "records_per_msg": shape.records_per_msg,
                "msg_bytes": shape.msg_bytes,
                "msgs_per_sec": shape.msgs_per_sec,
                "records_per_sec": records_per_sec,
                "mb_per_sec": records_per_sec * shape.record_size as f64 / 1e6,
                "wire_mb_per_sec": shape.msgs_per_sec * shape.msg_bytes as f64 / 1e6,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({ "tcp": { "mb_per_sec": tcp }, "tonic": tonic })
    );
    Ok(())
}

//! The calls that carry batches, framed by hand (`syncline_proto::wire`), so that a batch is
//! not copied in user space on its way between the socket and the producer or consumer.
//!
//! - `ProduceStream` ([`open_produce_stream`]): tonic's generated client encodes each request,
//!   batch included, into the request body's buffer: a `memmove` of every byte produced (~8%
//!   of a 1 KiB producer's CPU, under prost's `BytesAdapter::append_to`). Here each request
//!   becomes two DATA frames: its prefix and fields, then the batch `Bytes` itself, which h2
//!   writes from where it is (small batches are joined into one frame instead: one frame costs
//!   less than the copy then). The responses are small and are read with the same framing.
//! - `Fetch` ([`fetch`]): tonic's decoder copies the response (the batches) into one buffer
//!   before decoding; here the response is decoded from the frames it arrived in, the batches
//!   a slice of them when they lie in one (the client accepts 2 MiB frames, and the broker
//!   sends the batches as a frame of their own).
//!
//! Everything else is what tonic's client does: the same paths and headers, the channel's
//! credentials (the interceptor still adds the token), a trailers-only status, and a missing
//! final status treated as tonic does.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use syncline_proto::v1::{FetchRequest, FetchResponse, ProduceRequest, ProduceResponse};
use syncline_proto::wire::{self, MessageReader, PRODUCE_BATCH_FIELD};
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::{Code, Status};

use crate::routing::Raw;

const PRODUCE_STREAM: &str = "/syncline.v1.Broker/ProduceStream";
const FETCH: &str = "/syncline.v1.Broker/Fetch";

/// Batches up to this size travel in the same DATA frame as their request's fields (copied
/// there); larger ones in a frame of their own.
const JOIN_BYTES_MAX: usize = 4096;

/// Opens `ProduceStream` on `raw`; `requests` are sent as they come, until the sender is
/// dropped.
pub(crate) async fn open_produce_stream(
    raw: Raw,
    requests: mpsc::UnboundedReceiver<ProduceRequest>,
    message_bytes_max: usize,
) -> Result<Responses<ProduceResponse>, Status> {
    let body = Body::new(Requests {
        requests,
        payload: None,
    });
    open(raw, PRODUCE_STREAM, body, message_bytes_max).await
}

/// One `Fetch` on `raw`.
pub(crate) async fn fetch(
    raw: Raw,
    request: &FetchRequest,
    message_bytes_max: usize,
) -> Result<tonic::Response<FetchResponse>, Status> {
    let body = Body::new(wire::Frames::new([wire::encode(request)], None));
    let mut responses = open(raw, FETCH, body, message_bytes_max).await?;
    let Some(response) = responses.message().await? else {
        return Err(Status::internal("Missing response message."));
    };
    // The final status follows the message (a unary call has one).
    if responses.message().await?.is_some() {
        return Err(Status::internal("a Fetch answered more than one message"));
    }
    Ok(tonic::Response::new(response))
}

/// Starts the call `path` on `raw` with `body` and reads its response headers.
async fn open<M>(
    mut raw: Raw,
    path: &'static str,
    body: Body,
    message_bytes_max: usize,
) -> Result<Responses<M>, Status> {
    std::future::poll_fn(|cx| raw.poll_ready(cx))
        .await
        .map_err(|error| Status::unknown(format!("Service was not ready: {error}")))?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .version(http::Version::HTTP_2)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(body)
        .map_err(|error| Status::internal(format!("could not build the request: {error}")))?;
    let response = raw
        .call(request)
        .await
        .map_err(|error| Status::from_error(Box::new(error)))?;
    let http_status = response.status();
    // A trailers-only response: the call failed before any message (or ended at once).
    let ended = match Status::from_header_map(response.headers()) {
        Some(status) if status.code() != Code::Ok => return Err(status),
        Some(_) => true,
        None => false,
    };
    Ok(Responses {
        body: Body::new(response.into_body()),
        reader: MessageReader::new(message_bytes_max),
        http_status,
        ended,
        _message: std::marker::PhantomData,
    })
}

/// The request body: each request as its fields and then its batch.
struct Requests {
    requests: mpsc::UnboundedReceiver<ProduceRequest>,
    /// The batch of the request whose fields went out last.
    payload: Option<Bytes>,
}

impl HttpBody for Requests {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(payload) = this.payload.take() {
            return Poll::Ready(Some(Ok(Frame::data(payload))));
        }
        let Some(mut request) = ready!(this.requests.poll_recv(cx)) else {
            return Poll::Ready(None);
        };
        let batch = std::mem::take(&mut request.batch);
        let [head, payload] = wire::encode_with_payload(&request, PRODUCE_BATCH_FIELD, batch);
        if payload.len() <= JOIN_BYTES_MAX {
            let mut joined = BytesMut::with_capacity(head.len() + payload.len());
            joined.extend_from_slice(&head);
            joined.extend_from_slice(&payload);
            return Poll::Ready(Some(Ok(Frame::data(joined.freeze()))));
        }
        this.payload = Some(payload);
        Poll::Ready(Some(Ok(Frame::data(head))))
    }
}

/// The responses of a call.
pub(crate) struct Responses<M> {
    body: Body,
    reader: MessageReader,
    http_status: http::StatusCode,
    /// The final status was read (OK).
    ended: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> Responses<M> {
    /// The next response; `None` when the broker ended the call with OK.
    pub(crate) async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(message) = self
                .reader
                .next_message()
                .map_err(|error| Status::internal(format!("a response: {error}")))?
            {
                return M::decode(message).map(Some).map_err(|error| {
                    Status::internal(format!("a response does not decode: {error}"))
                });
            }
            if self.ended {
                return Ok(None);
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.reader.push(data),
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            self.ended = true;
                            match Status::from_header_map(trailers) {
                                Some(status) if status.code() == Code::Ok => {}
                                Some(status) => return Err(status),
                                None => return Err(missing_status(self.http_status)),
                            }
                        }
                    }
                },
                Some(Err(status)) => return Err(status),
                None => return Err(missing_status(self.http_status)),
            }
        }
    }
}

/// The status of a response that ended without `grpc-status`, from its HTTP status (gRPC's
/// mapping, as tonic applies it).
fn missing_status(http_status: http::StatusCode) -> Status {
    let code = match http_status {
        http::StatusCode::OK => {
            return Status::unknown(
                "protocol error: missing grpc-status trailer, stream was terminated without a final status",
            )
        }
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!("the call ended with HTTP status {http_status} and no gRPC status"),
    )
}

//! The calls that carry batches, served without tonic's copies: `ProduceStream` and `Fetch`.
//!
//! tonic's `Streaming` appends every HTTP/2 DATA frame of a request to one buffer and decodes
//! from there: each batch was copied once more in user space after the kernel's receive copy
//! (~10% of the broker's CPU with 1 KiB records, `memmove` and `realloc` under
//! `StreamingInner::poll_frame`); and its encoder copies every response, a Fetch's batches
//! included, into the response body's buffer. [`WireCalls`] wraps the generated Broker server
//! and frames these two calls itself.
//!
//! `ProduceStream`:
//! - the request body's frames go through [`MessageReader`](syncline_proto::wire), which hands
//!   out each message as the slices of the frames it came in, and prost decodes the batch as a
//!   slice of its frame: the log appends the bytes the kernel received into. The client sends
//!   each batch as a frame of its own and the server advertises [`MAX_FRAME_BYTES`], so a batch
//!   of the producer's default size arrives in one frame; larger ones, or ones cut by flow
//!   control, are copied once, as tonic does;
//! - the requests then take the very path tonic's would (`produce_stream_responses`: ACLs,
//!   quotas, limits, acknowledgements), and the responses are framed with
//!   [`wire::encode`](syncline_proto::wire::encode), a stream error or the end as trailers.
//!
//! `Fetch`: the request is read whole and handed to the service's own `fetch` (the same
//! handler, with the request's metadata and extensions: principal, connection); the response
//! is framed with [`encode_with_payload`](syncline_proto::wire::encode_with_payload), so its
//! batches (slices of the segments' mappings) go to h2 as a DATA frame of their own, and its
//! extensions (the response budget's permit) stay on the response.
//!
//! What tonic's server did besides, and what stands in for it here: the message size limit
//! (the same limit, refused with the same status before the message is buffered); compression
//! (never negotiated by the broker: a compressed message is INVALID_ARGUMENT); a client that
//! cancels (the stream ends, as in tonic). Every other call goes to the wrapped server.
//!
//! It may call the Broker service (`super::service`) and nothing else.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use http_body::{Body as HttpBody, Frame};
use prost::Message as _;
use syncline_proto::v1;
use syncline_proto::wire::{self, FrameError, MessageReader};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use syncline_proto::v1::broker_server::Broker;

use super::auth::Principal;
use super::service::{BrokerService, ResponseStream};

/// The calls this module serves.
pub const PRODUCE_STREAM_PATH: &str = "/syncline.v1.Broker/ProduceStream";
pub const FETCH_PATH: &str = "/syncline.v1.Broker/Fetch";

/// The largest HTTP/2 frame the broker accepts (`SETTINGS_MAX_FRAME_SIZE`; the default is
/// 16 KiB). Room for a 2 MiB batch and its request fields in one frame; a frame's buffer is
/// taken when its header arrives, so this also bounds what one frame header makes the broker
/// allocate.
pub const MAX_FRAME_BYTES: u32 = 2 * 1024 * 1024 + 64 * 1024;

/// Responses coalesced into one DATA frame at most (they are ~20 bytes each).
const RESPONSE_CHUNK_BYTES: usize = 16 * 1024;

/// The Broker server with `ProduceStream` and `Fetch` answered here; see the module doc.
#[derive(Debug, Clone)]
pub struct WireCalls<S> {
    inner: S,
    service: BrokerService,
    /// The largest request message (the Broker server's decoding limit).
    message_bytes_max: usize,
}

impl<S> WireCalls<S> {
    /// Wraps `inner`, the generated server of `service`.
    pub fn new(inner: S, service: BrokerService, message_bytes_max: usize) -> Self {
        WireCalls {
            inner,
            service,
            message_bytes_max,
        }
    }
}

impl<S: NamedService> NamedService for WireCalls<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for WireCalls<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match request.uri().path() {
            PRODUCE_STREAM_PATH => self.produce_stream(request),
            FETCH_PATH => {
                let service = self.service.clone();
                let message_bytes_max = self.message_bytes_max;
                Box::pin(async move { Ok(fetch(service, request, message_bytes_max).await) })
            }
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

impl<S> WireCalls<S> {
    fn produce_stream<E: Send + 'static>(
        &mut self,
        request: http::Request<Body>,
    ) -> BoxFuture<http::Response<Body>, E> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let principal = parts.extensions.get::<Principal>().cloned();
        let requests = Requests {
            body,
            reader: MessageReader::new(self.message_bytes_max),
            done: false,
        };
        let responses = self.service.produce_stream_responses(principal, requests);
        crate::metrics::observe_request("ProduceStream", started, tonic::Code::Ok);
        let response = http::Response::builder()
            .status(http::StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Body::new(Responses {
                stream: responses,
                done: false,
            }));
        Box::pin(async move {
            Ok(response.unwrap_or_else(|error| {
                // Unreachable: the status and header above are valid constants.
                Status::internal(format!("could not build the response: {error}")).into_http()
            }))
        })
    }
}

/// One `Fetch`: the request read whole, the service's own handler, the response framed with
/// its batches as a frame of their own.
async fn fetch(
    service: BrokerService,
    request: http::Request<Body>,
    message_bytes_max: usize,
) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let message = match read_request::<v1::FetchRequest>(body, message_bytes_max).await {
        Ok(message) => message,
        Err(status) => return status.into_http(),
    };
    let request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    let (metadata, mut message, extensions) = match Broker::fetch(&service, request).await {
        Ok(response) => response.into_parts(),
        Err(status) => return status.into_http(),
    };
    let batches = std::mem::take(&mut message.batches);
    let [head, batches] = wire::encode_with_payload(&message, wire::FETCH_BATCHES_FIELD, batches);
    let mut response = http::Response::new(Body::new(wire::Frames::new(
        [head, batches],
        Some(trailers(&Status::ok(""))),
    )));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    *response.extensions_mut() = extensions;
    response
}

/// The one message of a unary request's body.
async fn read_request<M: prost::Message + Default>(
    mut body: Body,
    message_bytes_max: usize,
) -> Result<M, Status> {
    let mut reader = MessageReader::new(message_bytes_max);
    let mut message = None;
    loop {
        if let Some(next) = reader.next_message().map_err(frame_status)? {
            if message.is_some() {
                return Err(Status::invalid_argument(
                    "a unary request carried more than one message",
                ));
            }
            message = Some(M::decode(next).map_err(|error| {
                Status::invalid_argument(format!(
                    "the request is not a valid protobuf message: {error}"
                ))
            })?);
            continue;
        }
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    reader.push(data);
                }
            }
            Some(Err(status)) => return Err(status),
            None => break,
        }
    }
    reader.finish().map_err(frame_status)?;
    message.ok_or_else(|| Status::invalid_argument("the request carried no message"))
}

/// The requests of one `ProduceStream`, decoded from its body without copying batches.
struct Requests {
    body: Body,
    reader: MessageReader,
    /// An error was returned, or the body ended.
    done: bool,
}

impl Stream for Requests {
    type Item = Result<v1::ProduceRequest, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.reader.next_message() {
                Ok(Some(message)) => {
                    let request = v1::ProduceRequest::decode(message).map_err(|error| {
                        this.done = true;
                        Status::invalid_argument(format!(
                            "the request is not a valid protobuf message: {error}"
                        ))
                    });
                    return Poll::Ready(Some(request));
                }
                Ok(None) => {}
                Err(error) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(frame_status(error))));
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers from a client carry nothing the broker reads.
                    if let Ok(data) = frame.into_data() {
                        this.reader.push(data);
                    }
                }
                Some(Err(status)) => {
                    this.done = true;
                    // The client went away (as tonic: the stream just ends).
                    if status.code() == tonic::Code::Cancelled {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(status)));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(this.reader.finish().err().map(|e| Err(frame_status(e))));
                }
            }
        }
    }
}

/// The status of a broken framing. An oversized message gets tonic's status, word for word, so
/// that the produce path names the limit as it does for tonic's decoder
/// (`decode_limit_to_resource_exhausted`).
fn frame_status(error: FrameError) -> Status {
    match error {
        FrameError::TooLarge { found, limit } => Status::out_of_range(format!(
            "Error, decoded message length too large: found {found} bytes, the limit is: {limit} bytes"
        )),
        FrameError::Compressed(_) | FrameError::Truncated(_) => {
            Status::invalid_argument(format!("the request stream is not valid gRPC: {error}"))
        }
    }
}

/// The response body: the responses framed (several per DATA frame when they are ready
/// together), then the stream's status as trailers.
struct Responses {
    stream: ResponseStream<v1::ProduceResponse>,
    done: bool,
}

impl HttpBody for Responses {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut chunk = BytesMut::new();
        let end = loop {
            match self.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(response))) => {
                    chunk.put(wire::encode(&response));
                    if chunk.len() >= RESPONSE_CHUNK_BYTES {
                        break None;
                    }
                }
                Poll::Ready(Some(Err(status))) => break Some(status),
                Poll::Ready(None) => break Some(Status::ok("")),
                Poll::Pending if chunk.is_empty() => return Poll::Pending,
                Poll::Pending => break None,
            }
        };
        match end {
            // The trailers follow on the next poll.
            Some(status) if !chunk.is_empty() => {
                self.stream = Box::pin(futures_util::stream::once(async move { Err(status) }));
                Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
            }
            Some(status) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
            None => Poll::Ready(Some(Ok(Frame::data(chunk.freeze())))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// `grpc-status` and `grpc-message` (and details) of `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        headers.clear();
        headers.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    headers
}

//! `ProduceStream` served without tonic's decode copy.
//!
//! tonic's `Streaming` appends every HTTP/2 DATA frame of a request to one buffer and decodes
//! from there: each batch was copied once more in user space after the kernel's receive copy
//! (~10% of the broker's CPU with 1 KiB records, `memmove` and `realloc` under
//! `StreamingInner::poll_frame`). [`ProduceWire`] wraps the generated Broker server and answers
//! `ProduceStream` itself:
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

use super::auth::Principal;
use super::service::{BrokerService, ResponseStream};

/// The call this module serves.
pub const PRODUCE_STREAM_PATH: &str = "/syncline.v1.Broker/ProduceStream";

/// The largest HTTP/2 frame the broker accepts (`SETTINGS_MAX_FRAME_SIZE`; the default is
/// 16 KiB). Room for a 2 MiB batch and its request fields in one frame; a frame's buffer is
/// taken when its header arrives, so this also bounds what one frame header makes the broker
/// allocate.
pub const MAX_FRAME_BYTES: u32 = 2 * 1024 * 1024 + 64 * 1024;

/// Responses coalesced into one DATA frame at most (they are ~20 bytes each).
const RESPONSE_CHUNK_BYTES: usize = 16 * 1024;

/// The Broker server with `ProduceStream` answered here; see the module doc.
#[derive(Debug, Clone)]
pub struct ProduceWire<S> {
    inner: S,
    service: BrokerService,
    /// The largest request message (the Broker server's decoding limit).
    message_bytes_max: usize,
}

impl<S> ProduceWire<S> {
    /// Wraps `inner`, the generated server of `service`.
    pub fn new(inner: S, service: BrokerService, message_bytes_max: usize) -> Self {
        ProduceWire {
            inner,
            service,
            message_bytes_max,
        }
    }
}

impl<S: NamedService> NamedService for ProduceWire<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for ProduceWire<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != PRODUCE_STREAM_PATH {
            return Box::pin(self.inner.call(request));
        }
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

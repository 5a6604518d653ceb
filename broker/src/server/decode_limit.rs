//! Answers a unary request over tonic's decode limit with RESOURCE_EXHAUSTED.
//!
//! tonic rejects such a request before the handler runs, with OUT_OF_RANGE: the code the broker
//! uses for "offset outside the log". [`DecodeLimit`] wraps the Broker service and rewrites that
//! one status (a trailers-only response: the status is in the headers) with
//! [`super::status::decode_limit_to_resource_exhausted`]. Streams see the same status in their
//! handler (ProduceStream maps it there with the same function).

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::Status;

use super::status::decode_limit_to_resource_exhausted;

/// The wrapped service, with the batch limit to name in the rewritten status.
#[derive(Debug, Clone)]
pub struct DecodeLimit<S> {
    inner: S,
    max_batch_bytes: u32,
}

impl<S> DecodeLimit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, max_batch_bytes: u32) -> Self {
        DecodeLimit {
            inner,
            max_batch_bytes,
        }
    }
}

impl<S: NamedService> NamedService for DecodeLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for DecodeLimit<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let response = self.inner.call(request);
        let max_batch_bytes = self.max_batch_bytes;
        Box::pin(async move {
            let mut response = response.await?;
            rewrite(response.headers_mut(), max_batch_bytes);
            Ok(response)
        })
    }
}

/// Rewrites a decode-limit status in `headers`; leaves every other response alone.
fn rewrite(headers: &mut http::HeaderMap, max_batch_bytes: u32) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() != tonic::Code::OutOfRange {
        return;
    }
    let rewritten = decode_limit_to_resource_exhausted(status.clone(), max_batch_bytes);
    if rewritten.code() == status.code() {
        return;
    }
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if let Err(error) = rewritten.add_header(headers) {
        tracing::warn!(%error, "could not rewrite a decode-limit status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_decode_limit_headers_should_rewrite_and_leave_others() {
        let mut headers = http::HeaderMap::new();
        Status::out_of_range(
            "Error, decoded message length too large: found 30 bytes, the limit is: 20 bytes",
        )
        .add_header(&mut headers)
        .unwrap();
        rewrite(&mut headers, 10);
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("limit of 20 bytes"), "{status:?}");

        let mut headers = http::HeaderMap::new();
        Status::out_of_range("offset 9 is outside the log [0, 3)")
            .add_header(&mut headers)
            .unwrap();
        rewrite(&mut headers, 10);
        assert_eq!(
            Status::from_header_map(&headers).unwrap().code(),
            tonic::Code::OutOfRange
        );
    }
}

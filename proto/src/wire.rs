//! gRPC message framing for the produce path, without copying batches.
//!
//! tonic's codec copies every message into a contiguous buffer on both ends: the client's
//! encoder writes the whole `ProduceRequest` (its batch included) into the request body's
//! buffer, and the server's `Streaming` appends every HTTP/2 DATA frame to its decode buffer
//! before decoding. For 1 KiB records those two `memmove`s were ~8% of the client's and ~10% of
//! the broker's CPU (perf, BENCHMARKS.md "Ahead of Iggy"). `ProduceStream` therefore frames its
//! messages with this module instead, on both sides (client: `producer::connection`; broker:
//! `server::wire_calls`; `Fetch` likewise, the other way):
//! - [`encode_with_payload`] returns a message as two `Bytes`: the prefix and every field but
//!   the payload, then the payload itself (the batch, as the producer built it). HTTP/2 sends the
//!   second as DATA frames that point into it.
//! - [`MessageReader`] collects the DATA frames of a stream and hands out whole messages as
//!   [`Chunks`]: the slices of the frames they arrived in. prost reads a `bytes` field with
//!   `copy_to_bytes`, which is a slice of a frame when the field lies in one, and a copy only
//!   when it spans frames. The client sends the batch as a DATA frame of its own and the broker
//!   advertises a large `SETTINGS_MAX_FRAME_SIZE`, so a batch normally arrives in one frame:
//!   the batch the log appends is the memory the kernel received into.
//!
//! # Byte map of one message (gRPC over HTTP/2, "Length-Prefixed-Message")
//!
//! ```text
//! offset size field
//!   0     1   compressed flag   0 (compression is not negotiated; 1 is refused)
//!   1     4   length            u32 big-endian, of the protobuf message that follows
//!   5     ..  protobuf message  fields in any order: encode_with_payload writes the payload
//!                               field last, which protobuf allows (a decoder reads fields in
//!                               any order)
//! ```
//!
//! # Limits
//! [`MessageReader`] refuses a length over its `max_len` as soon as the prefix arrives, before
//! buffering the message, and holds at most one message plus the frames that follow it (HTTP/2
//! flow control bounds those).

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes of the length prefix before each message.
pub const PREFIX_LEN: usize = 5;

/// The field number of `ProduceRequest.batch` (pinned by a test against prost's encoding).
pub const PRODUCE_BATCH_FIELD: u32 = 5;
/// The field number of `FetchResponse.batches` (pinned likewise).
pub const FETCH_BATCHES_FIELD: u32 = 2;

/// A stream's framing is broken (the message is not read; the stream cannot go on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A message announced a length over the reader's limit.
    #[error("a message of {found} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        found: usize,
        /// The reader's limit.
        limit: usize,
    },
    /// The compressed flag was set (or not 0 or 1); compression is never negotiated.
    #[error("compressed messages are not supported (compressed flag {0})")]
    Compressed(u8),
    /// The stream ended inside a message.
    #[error("the stream ended inside a message ({0} bytes of it were received)")]
    Truncated(usize),
}

/// Encodes `message` as one length-prefixed gRPC message whose field `field` (a `bytes` field,
/// left empty in `message`) holds `payload`, without copying `payload`: the first part is the
/// prefix and the other fields, the second the payload. An empty payload is left out, as
/// protobuf encodes an empty `bytes` field.
pub fn encode_with_payload<M: Message>(message: &M, field: u32, payload: Bytes) -> [Bytes; 2] {
    let fields_len = message.encoded_len();
    let payload_len = payload.len();
    let tail_len = if payload_len == 0 {
        0
    } else {
        let key = u64::from(field) << 3 | 2; // wire type 2: length-delimited
        prost::encoding::encoded_len_varint(key)
            + prost::encoding::encoded_len_varint(payload_len as u64)
            + payload_len
    };
    let mut head = BytesMut::with_capacity(PREFIX_LEN + fields_len + 20);
    head.put_u8(0);
    // A message over 4 GiB cannot be sent; the callers' limits are far below.
    head.put_u32((fields_len + tail_len) as u32);
    // Cannot fail: `head` grows as needed.
    let _ = message.encode(&mut head);
    if payload_len > 0 {
        prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(payload_len as u64, &mut head);
    }
    [head.freeze(), payload]
}

/// Encodes `message` as one length-prefixed gRPC message in one buffer (for small messages:
/// responses).
pub fn encode<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the capacity is reserved.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Collects a stream's DATA frames and splits them into messages; see the module doc.
#[derive(Debug)]
pub struct MessageReader {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    buffered: usize,
    /// The length of the message whose prefix was read (and consumed), if any.
    pending: Option<usize>,
    max_len: usize,
}

impl MessageReader {
    /// A reader that refuses messages over `max_len` bytes.
    pub fn new(max_len: usize) -> MessageReader {
        MessageReader {
            chunks: VecDeque::new(),
            buffered: 0,
            pending: None,
            max_len,
        }
    }

    /// Adds the next DATA frame of the stream.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// The next whole message (its protobuf bytes, without the prefix, as slices of the frames
    /// it arrived in), or `None` until more frames arrive.
    pub fn next_message(&mut self) -> Result<Option<Chunks>, FrameError> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                if self.buffered < PREFIX_LEN {
                    return Ok(None);
                }
                let mut prefix = [0u8; PREFIX_LEN];
                self.copy_out(&mut prefix);
                let flag = prefix[0];
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if flag != 0 {
                    return Err(FrameError::Compressed(flag));
                }
                if len > self.max_len {
                    return Err(FrameError::TooLarge {
                        found: len,
                        limit: self.max_len,
                    });
                }
                self.pending = Some(len);
                len
            }
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.pending = None;
        self.buffered -= len;
        let mut parts = VecDeque::new();
        let mut wanted = len;
        while wanted > 0 {
            let Some(chunk) = self.chunks.front_mut() else {
                break; // unreachable: `buffered` counted these bytes
            };
            if chunk.len() <= wanted {
                wanted -= chunk.len();
                parts.extend(self.chunks.pop_front());
            } else {
                parts.push_back(chunk.split_to(wanted));
                wanted = 0;
            }
        }
        Ok(Some(Chunks {
            parts,
            remaining: len,
        }))
    }

    /// At the end of the stream: an error when part of a message is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        match (self.pending, self.buffered) {
            (None, 0) => Ok(()),
            (Some(_), received) | (None, received) => Err(FrameError::Truncated(received)),
        }
    }

    /// Consumes `out.len()` bytes (the caller checked they are buffered) into `out`.
    fn copy_out(&mut self, out: &mut [u8]) {
        let mut filled = 0;
        while filled < out.len() {
            let Some(chunk) = self.chunks.front_mut() else {
                break;
            };
            let take = chunk.len().min(out.len() - filled);
            out[filled..filled + take].copy_from_slice(&chunk[..take]);
            chunk.advance(take);
            filled += take;
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
        }
        self.buffered -= filled;
    }
}

/// An HTTP/2 body of the given DATA frames, then (if given) trailers: a unary call's request
/// or response framed by hand.
#[derive(Debug)]
pub struct Frames {
    frames: VecDeque<Bytes>,
    trailers: Option<tonic::codegen::http::HeaderMap>,
}

impl Frames {
    /// A body of `frames` (empty ones are left out), then `trailers`.
    pub fn new(
        frames: impl IntoIterator<Item = Bytes>,
        trailers: Option<tonic::codegen::http::HeaderMap>,
    ) -> Frames {
        Frames {
            frames: frames.into_iter().filter(|f| !f.is_empty()).collect(),
            trailers,
        }
    }
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let next = match self.frames.pop_front() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => self.trailers.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(next.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.trailers.is_none()
    }
}

/// One message as the slices of the frames it arrived in: a [`Buf`] whose `copy_to_bytes` is a
/// slice (no copy) when the bytes lie in one frame, which is how prost reads `bytes` fields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunks {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |part| &part[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of the message");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(part) = self.parts.front_mut() else {
                break;
            };
            if part.len() <= cnt {
                cnt -= part.len();
                self.parts.pop_front();
            } else {
                part.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(
            len <= self.remaining,
            "copy_to_bytes past the end of the message"
        );
        match self.parts.front_mut() {
            Some(part) if part.len() >= len => {
                let bytes = part.split_to(len);
                if part.is_empty() {
                    self.parts.pop_front();
                }
                self.remaining -= len;
                bytes
            }
            _ => {
                let mut bytes = BytesMut::with_capacity(len);
                bytes.put((&mut *self).take(len));
                bytes.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::v1;

    fn request(batch: &[u8], correlation_id: u64) -> v1::ProduceRequest {
        v1::ProduceRequest {
            correlation_id,
            topic: "orders".into(),
            partition: 3,
            acks: v1::Acks::Durable as i32,
            batch: Bytes::copy_from_slice(batch),
            ..Default::default()
        }
    }

    /// The framed message split in two parts, the batch part being the very same memory.
    fn framed(request: &v1::ProduceRequest) -> [Bytes; 2] {
        let mut fields = request.clone();
        let batch = std::mem::take(&mut fields.batch);
        encode_with_payload(&fields, PRODUCE_BATCH_FIELD, batch)
    }

    #[test]
    fn encode_with_payload_should_equal_prost_and_not_copy_the_payload() {
        for batch in [&b""[..], b"x", &[7u8; 300][..], &[1u8; 70_000][..]] {
            let request = request(batch, 42);
            let [head, payload] = framed(&request);
            let mut joined = head.to_vec();
            joined.extend_from_slice(&payload);
            assert_eq!(joined[0], 0);
            let len = u32::from_be_bytes(joined[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, joined.len() - PREFIX_LEN);
            // The same message prost decodes, and the same length prost encodes.
            let decoded = v1::ProduceRequest::decode(&joined[PREFIX_LEN..]).unwrap();
            assert_eq!(decoded, request);
            assert_eq!(len, request.encoded_len());
            assert_eq!(payload.as_ptr(), request.batch.as_ptr());
        }
    }

    #[test]
    fn fetch_batches_field_should_match_prost() {
        let response = v1::FetchResponse {
            partition: 2,
            batches: Bytes::from(vec![3u8; 5000]),
            next_offset: 77,
            high_watermark: 80,
            ..Default::default()
        };
        let mut fields = response.clone();
        let batches = std::mem::take(&mut fields.batches);
        let [head, payload] = encode_with_payload(&fields, FETCH_BATCHES_FIELD, batches);
        let mut reader = MessageReader::new(1 << 20);
        reader.push(head);
        reader.push(payload.clone());
        let decoded = v1::FetchResponse::decode(reader.next_message().unwrap().unwrap()).unwrap();
        assert_eq!(decoded, response);
        assert_eq!(decoded.batches.as_ptr(), payload.as_ptr());
    }

    #[test]
    fn a_message_inside_one_chunk_should_be_a_slice_of_it() {
        let request = request(&[9u8; 4096], 1);
        let [head, payload] = framed(&request);
        let mut frame = head.to_vec();
        frame.extend_from_slice(&payload);
        let frame = Bytes::from(frame);
        let mut reader = MessageReader::new(1 << 20);
        reader.push(frame.clone());
        let message = reader.next_message().unwrap().unwrap();
        assert_eq!(message.chunk().as_ptr(), frame[PREFIX_LEN..].as_ptr());
        assert_eq!(message.remaining(), frame.len() - PREFIX_LEN);
        // prost decodes `bytes` fields as slices of the buffer.
        let decoded = v1::ProduceRequest::decode(message).unwrap();
        let offset = decoded.batch.as_ptr() as usize - frame.as_ptr() as usize;
        assert!(offset < frame.len());
        assert_eq!(decoded, request);
        assert_eq!(reader.next_message().unwrap(), None);
        reader.finish().unwrap();
    }

    #[test]
    fn a_batch_in_its_own_frame_should_be_decoded_without_a_copy() {
        let request = request(&[5u8; 10_000], 7);
        let [head, payload] = framed(&request);
        let mut reader = MessageReader::new(1 << 20);
        reader.push(head);
        assert_eq!(reader.next_message().unwrap(), None);
        reader.push(payload.clone());
        let decoded = v1::ProduceRequest::decode(reader.next_message().unwrap().unwrap()).unwrap();
        assert_eq!(decoded.batch.as_ptr(), payload.as_ptr());
        assert_eq!(decoded, request);
    }

    #[test]
    fn copy_to_bytes_across_parts_should_join_them() {
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 6, b'a', b'b']));
        reader.push(Bytes::from_static(b"cd"));
        reader.push(Bytes::from_static(b"efXY"));
        let mut message = reader.next_message().unwrap().unwrap();
        assert_eq!(message.remaining(), 6);
        assert_eq!(message.copy_to_bytes(1), Bytes::from_static(b"a"));
        assert_eq!(message.copy_to_bytes(4), Bytes::from_static(b"bcde"));
        assert_eq!(message.remaining(), 1);
        message.advance(1);
        assert_eq!(message.remaining(), 0);
        assert_eq!(reader.buffered, 2);
    }

    #[test]
    fn an_oversized_message_should_be_refused_at_its_prefix() {
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 101]));
        assert_eq!(
            reader.next_message(),
            Err(FrameError::TooLarge {
                found: 101,
                limit: 100
            })
        );
    }

    #[test]
    fn a_compressed_message_should_be_refused() {
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(reader.next_message(), Err(FrameError::Compressed(1)));
    }

    #[test]
    fn a_stream_ending_inside_a_message_should_be_truncated() {
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 3, 1]));
        assert_eq!(reader.next_message(), Ok(None));
        assert_eq!(reader.finish(), Err(FrameError::Truncated(1)));
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0]));
        assert_eq!(reader.finish(), Err(FrameError::Truncated(2)));
    }

    #[test]
    fn an_empty_message_should_be_read() {
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 0]));
        assert_eq!(reader.next_message().unwrap().unwrap().remaining(), 0);
        reader.finish().unwrap();
    }

    proptest! {
        /// Model: whatever the chunking, the reader yields exactly the messages written, in
        /// order, and nothing is left.
        #[test]
        fn any_chunking_should_yield_the_messages_in_order(
            batches in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..8),
            cuts in proptest::collection::vec(1usize..5000, 0..40),
        ) {
            let requests: Vec<_> = batches
                .iter()
                .enumerate()
                .map(|(i, b)| request(b, i as u64))
                .collect();
            let mut stream = Vec::new();
            for request in &requests {
                for part in framed(request) {
                    stream.extend_from_slice(&part);
                }
            }
            let mut reader = MessageReader::new(1 << 20);
            let mut decoded = Vec::new();
            let mut rest = &stream[..];
            let mut cuts = cuts.into_iter();
            while !rest.is_empty() {
                let take = cuts.next().unwrap_or(rest.len()).min(rest.len());
                reader.push(Bytes::copy_from_slice(&rest[..take]));
                rest = &rest[take..];
                while let Some(message) = reader.next_message().unwrap() {
                    decoded.push(v1::ProduceRequest::decode(message).unwrap());
                }
            }
            prop_assert_eq!(decoded, requests);
            prop_assert_eq!(reader.finish(), Ok(()));
        }
    }
}

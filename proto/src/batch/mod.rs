//! The record batch: Syncline's unit of produce, storage, replication and fetch.
//!
//! A producer encodes records into one batch with [`BatchBuilder`]; the broker checks it with
//! [`verify`] (and [`Batch::validate_records`] where it needs the records to be well formed),
//! stamps its base offset, and stores it byte for byte; consumers split a fetch response with
//! [`Batches`] and read records with [`Batch::records`] without copying keys or values.
//!
//! # Wire format
//!
//! **This is wire and disk format, pinned by the golden vectors in the tests of this module**
//! (`GOLDEN_HEX`, an annotated producer batch, and `GOLDEN_STAMPED_HEX`, the same batch stamped by
//! the broker; clients in other languages can test their encoders against them). Never change the
//! meaning of an existing byte. A new layout gets a new `version`; readers reject versions they
//! do not know ([`BatchError::UnsupportedVersion`]).
//!
//! All fixed-width integers are little-endian. A batch is a 64-byte header followed by
//! `record_count` records:
//!
//! ```text
//! offset size field              type  notes
//!   0     8   base_offset        u64   stamped by the broker (producers write 0)
//!   8     4   length             u32   whole batch in bytes, header included
//!  12     4   leader_epoch       u32   stamped by the broker (reserved for replication; 0 now)
//!  16     4   crc                u32   CRC-32C (Castagnoli) over bytes [20, length)
//!  ---------------------------------- CRC-covered from here on -----------------------------
//!  20     1   version            u8    FORMAT_VERSION = 1
//!  21     1   reserved           u8    0
//!  22     2   attributes         u16   bits 0-2 compression (only 0 = none), bit 4 control
//!                                      (broker-written batches only: the broker refuses it
//!                                      from producers), every other bit 0
//!  24     4   last_offset_delta  u32   offset of the last record slot relative to base_offset;
//!                                      >= record_count - 1 (larger after compaction)
//!  28     4   record_count       u32   >= 1
//!  32     8   first_timestamp    i64   ms since the Unix epoch; the first record's timestamp
//!  40     8   max_timestamp      i64   largest record timestamp
//!  48     8   producer_id        i64   -1 = none
//!  56     2   producer_epoch     i16   -1 = none
//!  58     2   reserved           u16   0
//!  60     4   base_sequence      i32   -1 = none
//!  64     ..  records
//! ```
//!
//! Each record (Kafka record v2 style; `varint` = unsigned LEB128, `zigzag` = zigzag-encoded
//! LEB128, at most 5 bytes for 32-bit and 10 bytes for 64-bit values):
//!
//! ```text
//! length               varint u32  bytes of the record after this field
//! attributes           u8          0
//! timestamp_delta      zigzag i64  timestamp - first_timestamp (wrapping)
//! offset_delta         varint u32  offset - base_offset; strictly increasing within the batch,
//!                                  <= last_offset_delta
//! key_length           zigzag i32  -1 = no key
//! key                  key_length bytes
//! value_length         zigzag i32  -1 = no value (a tombstone)
//! value                value_length bytes
//! header_count         varint u32  <= MAX_HEADERS_PER_RECORD
//! header_count times:
//!   header_key_length    varint u32
//!   header_key           UTF-8 bytes
//!   header_value_length  varint u32
//!   header_value         bytes
//! ```
//!
//! # Stamped fields and what the CRC covers
//!
//! The broker assigns `base_offset` and `leader_epoch` (0 until replication) when it appends a batch, and
//! `length` frames it. These three sit in the first 16 bytes, *before* the CRC field, so the broker
//! can stamp them (in place with [`stamp_base_offset`], or by writing a fresh
//! [`stamped_prefix`] followed by the producer's bytes from offset 16 with `writev`) without
//! recomputing the CRC. The CRC covers `[CRC_START, length)`: everything from `version` to the end
//! of the last record. The price is that a flipped bit in the stamped prefix is *not* caught by the
//! CRC; the broker checks those fields separately (offsets contiguous from batch to batch, length
//! equal to the framed size and within the maximum). [`verify`] checks `length` against the buffer.
//!
//! # Limits
//!
//! Every length read from input is bounded before it is used:
//! - `length` is in `[HEADER_LEN, BATCH_LEN_MAX]` (64 MiB), and must equal the buffer's length.
//! - `record_count` is in `[1, (length - HEADER_LEN) / 7]`: the smallest record takes 7 bytes.
//! - `base_offset + last_offset_delta + 1` fits in a `u64`, so every offset in the batch and the
//!   next offset after it are representable.
//! - A record's `length` fits in what is left of the batch; key, value and header lengths fit in
//!   what is left of the record; a record's fields use exactly its `length` bytes; no bytes
//!   follow the last record.
//! - `header_count` <= [`MAX_HEADERS_PER_RECORD`].
//! - A varint longer than its type allows is an error, as is any length below -1.
//!
//! # Errors and panics
//!
//! Decoding never panics on any input; every failed check is a typed [`BatchError`]. A batch
//! whose CRC verifies can still hold malformed records (a buggy or hostile producer); the broker
//! calls [`Batch::validate_records`] before accepting one, and [`Records`] reports the same
//! errors one record at a time.

use std::iter::FusedIterator;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// Size of the fixed batch header. Records start here.
pub const HEADER_LEN: usize = 64;
/// The only layout this codec reads and writes. Bumped for any change to existing bytes.
pub const FORMAT_VERSION: u8 = 1;
/// First byte the CRC covers: the byte right after the CRC field. The CRC covers
/// `[CRC_START, length)`.
pub const CRC_START: usize = 20;
/// Length of the fields the broker stamps: `base_offset`, `length`, `leader_epoch`.
pub const STAMPED_PREFIX_LEN: usize = 16;
/// Absolute bound on any batch length the codec accepts or produces: 64 MiB, far above any sane
/// produce request, small enough that a corrupt length cannot make a reader allocate or skip
/// gigabytes. The broker applies its own, usually smaller, configured maximum.
pub const BATCH_LEN_MAX: u32 = 64 * 1024 * 1024;
/// Maximum number of headers on one record: bounds the work and memory one record can demand.
pub const MAX_HEADERS_PER_RECORD: u32 = 1024;
/// `producer_id` of a batch from a non-idempotent producer.
pub const NO_PRODUCER_ID: i64 = -1;
/// `producer_epoch` of a batch from a non-idempotent producer.
pub const NO_PRODUCER_EPOCH: i16 = -1;
/// `base_sequence` of a batch from a non-idempotent producer.
pub const NO_SEQUENCE: i32 = -1;
/// Attribute bits 0-2: the compression codec. Only 0 (none) is supported.
pub const ATTR_COMPRESSION_MASK: u16 = 0x7;
/// Attribute bit 4: the batch holds control records (transaction markers), not user data.
pub const ATTR_CONTROL: u16 = 0x10;

/// Attribute bits this version knows; any other set bit is rejected.
const ATTR_KNOWN: u16 = ATTR_COMPRESSION_MASK | ATTR_CONTROL;
/// Attribute bits only the broker may set on the batches it writes itself: a client batch with
/// one of them set is refused. A control batch is skipped by consumers and table replicas but
/// read by `Get`/`History`, so a client-written one would make replicas diverge.
pub const ATTR_BROKER_RESERVED: u16 = ATTR_CONTROL;

/// The smallest possible record, length prefix included: length (1) + attributes (1) +
/// timestamp_delta (1) + offset_delta (1) + key_length -1 (1) + value_length -1 (1) +
/// header_count (1). Bounds `record_count` by the batch length.
const RECORD_LEN_MIN: usize = 7;

// Byte positions of the header fields (see the module doc).
const POS_BASE_OFFSET: usize = 0;
const POS_LENGTH: usize = 8;
const POS_LEADER_EPOCH: usize = 12;
const POS_CRC: usize = 16;
const POS_VERSION: usize = 20;
const POS_RESERVED_1: usize = 21;
const POS_ATTRIBUTES: usize = 22;
const POS_LAST_OFFSET_DELTA: usize = 24;
const POS_RECORD_COUNT: usize = 28;
const POS_FIRST_TIMESTAMP: usize = 32;
const POS_MAX_TIMESTAMP: usize = 40;
const POS_PRODUCER_ID: usize = 48;
const POS_PRODUCER_EPOCH: usize = 56;
const POS_RESERVED_2: usize = 58;
const POS_BASE_SEQUENCE: usize = 60;

/// Why a batch or a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The buffer is shorter than what it must hold (a header, or the batch its header frames).
    #[error("buffer of {len} bytes is too short: need {needed} bytes")]
    TooShort {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },

    /// The `version` byte is not [`FORMAT_VERSION`].
    #[error("unsupported batch format version {0} (this codec reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u8),

    /// The `length` field is outside `[HEADER_LEN, BATCH_LEN_MAX]`.
    #[error("batch length {length} is outside [{HEADER_LEN}, {BATCH_LEN_MAX}]")]
    BadLength {
        /// The stored length.
        length: u32,
    },

    /// The `length` field does not match the size of the buffer holding the batch.
    #[error("batch length field says {length} bytes but the batch is {actual} bytes")]
    LengthMismatch {
        /// The stored length.
        length: u32,
        /// The buffer's length.
        actual: usize,
    },

    /// The stored CRC does not match the bytes: the batch is corrupt.
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },

    /// `record_count` is 0 or more than `length` can hold.
    #[error("record count {record_count} is outside [1, {max}] for a batch of {length} bytes")]
    BadRecordCount {
        /// The stored record count.
        record_count: u32,
        /// The stored batch length.
        length: u32,
        /// The most records a batch of `length` bytes can hold.
        max: u32,
    },

    /// `last_offset_delta` is below `record_count - 1`: the records cannot have distinct offsets.
    #[error("last offset delta {last_offset_delta} is too small for {record_count} records")]
    BadLastOffsetDelta {
        /// The stored last offset delta.
        last_offset_delta: u32,
        /// The stored record count.
        record_count: u32,
    },

    /// `base_offset + last_offset_delta + 1` does not fit in a `u64`.
    #[error("base offset {base_offset} plus last offset delta {last_offset_delta} overflows")]
    OffsetOverflow {
        /// The stored base offset.
        base_offset: u64,
        /// The stored last offset delta.
        last_offset_delta: u32,
    },

    /// The compression bits name a codec this version does not support (only 0 = none).
    #[error("unsupported compression codec {0}")]
    UnsupportedCompression(u16),

    /// An attribute bit this version does not know is set.
    #[error("unknown batch attribute bits in {0:#06x}")]
    BadAttributes(u16),

    /// A reserved header field is not zero.
    #[error("reserved header field at byte {position} is {value}, must be 0")]
    Reserved {
        /// Byte position of the field in the header.
        position: usize,
        /// Its value.
        value: u16,
    },

    /// A record breaks the record layout.
    #[error("malformed record {index}: {reason}")]
    MalformedRecord {
        /// Index of the record in its batch, from 0.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },

    /// The records end before `record_count` records were read.
    #[error("batch header says {expected} records but the batch holds {actual}")]
    RecordCountMismatch {
        /// The stored record count.
        expected: u32,
        /// Records actually present.
        actual: u32,
    },

    /// Bytes follow the last of the `record_count` records.
    #[error("{bytes} trailing bytes after the last of {record_count} records")]
    TrailingBytes {
        /// The stored record count.
        record_count: u32,
        /// Bytes left over.
        bytes: usize,
    },

    /// [`BatchBuilder::finish`] was called without a record.
    #[error("a batch needs at least one record")]
    Empty,

    /// The batch would exceed [`BATCH_LEN_MAX`].
    #[error("batch of {length} bytes would exceed the maximum of {max} bytes")]
    TooLarge {
        /// The length the batch would have.
        length: usize,
        /// The maximum, [`BATCH_LEN_MAX`].
        max: u32,
    },

    /// [`BatchBuilder::push_at`] got an offset delta not above the previous record's.
    #[error("offset delta {offset_delta} is not above the previous record's {previous}")]
    OffsetDeltaNotIncreasing {
        /// The previous record's offset delta.
        previous: u32,
        /// The rejected offset delta.
        offset_delta: u32,
    },

    /// [`BatchBuilder::push`] after a record at offset delta `u32::MAX`: no next delta exists.
    #[error("no offset delta after {previous}")]
    OffsetDeltaOverflow {
        /// The previous record's offset delta.
        previous: u32,
    },

    /// A record pushed to a [`BatchBuilder`] has more than [`MAX_HEADERS_PER_RECORD`] headers.
    #[error("record has {count} headers, more than the maximum of {max}")]
    TooManyHeaders {
        /// Headers on the record.
        count: usize,
        /// The maximum, [`MAX_HEADERS_PER_RECORD`].
        max: u32,
    },

    /// [`BatchBuilder::last_offset_delta`] is below the last record's offset delta.
    #[error("last offset delta {last_offset_delta} is below the last record's offset delta {record_offset_delta}")]
    LastOffsetDeltaTooSmall {
        /// The requested last offset delta.
        last_offset_delta: u32,
        /// The offset delta of the last pushed record.
        record_offset_delta: u32,
    },
}

/// The reasons of [`BatchError::MalformedRecord`].
mod reason {
    pub const RECORD_LENGTH_PAST_BATCH: &str = "record length extends past the end of the batch";
    pub const FIELD_PAST_RECORD: &str = "field extends past the end of the record";
    pub const VARINT_TOO_LONG: &str = "varint is longer than its type allows";
    pub const ATTRIBUTES: &str = "record attributes must be 0";
    pub const OFFSET_NOT_INCREASING: &str = "offset delta is not above the previous record's";
    pub const OFFSET_PAST_LAST: &str = "offset delta is above the batch's last_offset_delta";
    pub const OFFSET_OVERFLOW: &str = "record offset overflows u64";
    pub const NEGATIVE_LENGTH: &str = "key or value length is below -1";
    pub const TOO_MANY_HEADERS: &str = "header count exceeds MAX_HEADERS_PER_RECORD";
    pub const HEADER_KEY_UTF8: &str = "header key is not valid UTF-8";
    pub const LENGTH_MISMATCH: &str = "record fields do not fill the record's length";
}

/// The fixed 64-byte header of a batch, field for field (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the record slot at delta 0. Stamped by the broker.
    pub base_offset: u64,
    /// The whole batch in bytes, header included.
    pub length: u32,
    /// Leader epoch of the broker that appended the batch. Stamped; 0 until replication.
    pub leader_epoch: u32,
    /// CRC-32C of bytes `[CRC_START, length)`.
    pub crc: u32,
    /// Layout version, [`FORMAT_VERSION`].
    pub version: u8,
    /// Compression and control bits.
    pub attributes: u16,
    /// Offset of the last record slot relative to `base_offset`.
    pub last_offset_delta: u32,
    /// Number of records in the batch.
    pub record_count: u32,
    /// Timestamp of the first record, milliseconds since the Unix epoch.
    pub first_timestamp: i64,
    /// Largest record timestamp, milliseconds since the Unix epoch.
    pub max_timestamp: i64,
    /// Idempotent producer id, or [`NO_PRODUCER_ID`].
    pub producer_id: i64,
    /// Idempotent producer epoch, or [`NO_PRODUCER_EPOCH`].
    pub producer_epoch: i16,
    /// Sequence number of the first record, or [`NO_SEQUENCE`].
    pub base_sequence: i32,
}

fn read_u16(h: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([h[at], h[at + 1]])
}

fn read_u32(h: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn read_u64(h: &[u8; HEADER_LEN], at: usize) -> u64 {
    u64::from_le_bytes([
        h[at],
        h[at + 1],
        h[at + 2],
        h[at + 3],
        h[at + 4],
        h[at + 5],
        h[at + 6],
        h[at + 7],
    ])
}

fn write_at<const N: usize>(out: &mut [u8; HEADER_LEN], at: usize, bytes: [u8; N]) {
    out[at..at + N].copy_from_slice(&bytes);
}

impl BatchHeader {
    /// Parses and checks the first [`HEADER_LEN`] bytes of `buf`; `buf` may be longer (the rest
    /// of a segment or of a fetch response).
    ///
    /// Checks that `buf` holds a header, the version, `HEADER_LEN <= length <= BATCH_LEN_MAX`,
    /// that the reserved fields and unknown attribute bits are zero, that compression is none,
    /// `1 <= record_count <= (length - HEADER_LEN) / 7`, `last_offset_delta >= record_count - 1`
    /// and that `base_offset + last_offset_delta + 1` fits in a `u64`. Does not check the CRC
    /// or that `buf` holds `length` bytes: that is [`verify`].
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(BatchError::TooShort {
                len: buf.len(),
                needed: HEADER_LEN,
            });
        };
        let version = h[POS_VERSION];
        if version != FORMAT_VERSION {
            return Err(BatchError::UnsupportedVersion(version));
        }
        let length = read_u32(h, POS_LENGTH);
        if (length as usize) < HEADER_LEN || length > BATCH_LEN_MAX {
            return Err(BatchError::BadLength { length });
        }
        if h[POS_RESERVED_1] != 0 {
            return Err(BatchError::Reserved {
                position: POS_RESERVED_1,
                value: u16::from(h[POS_RESERVED_1]),
            });
        }
        let reserved_2 = read_u16(h, POS_RESERVED_2);
        if reserved_2 != 0 {
            return Err(BatchError::Reserved {
                position: POS_RESERVED_2,
                value: reserved_2,
            });
        }
        let attributes = read_u16(h, POS_ATTRIBUTES);
        let compression = attributes & ATTR_COMPRESSION_MASK;
        if compression != 0 {
            return Err(BatchError::UnsupportedCompression(compression));
        }
        if attributes & !ATTR_KNOWN != 0 {
            return Err(BatchError::BadAttributes(attributes));
        }
        let record_count = read_u32(h, POS_RECORD_COUNT);
        // `length` <= 64 MiB, so the quotient fits in a u32.
        let record_count_max = ((length as usize - HEADER_LEN) / RECORD_LEN_MIN) as u32;
        if record_count == 0 || record_count > record_count_max {
            return Err(BatchError::BadRecordCount {
                record_count,
                length,
                max: record_count_max,
            });
        }
        let last_offset_delta = read_u32(h, POS_LAST_OFFSET_DELTA);
        if last_offset_delta < record_count - 1 {
            return Err(BatchError::BadLastOffsetDelta {
                last_offset_delta,
                record_count,
            });
        }
        let base_offset = read_u64(h, POS_BASE_OFFSET);
        if base_offset
            .checked_add(u64::from(last_offset_delta) + 1)
            .is_none()
        {
            return Err(BatchError::OffsetOverflow {
                base_offset,
                last_offset_delta,
            });
        }
        Ok(BatchHeader {
            base_offset,
            length,
            leader_epoch: read_u32(h, POS_LEADER_EPOCH),
            crc: read_u32(h, POS_CRC),
            version,
            attributes,
            last_offset_delta,
            record_count,
            first_timestamp: read_u64(h, POS_FIRST_TIMESTAMP) as i64,
            max_timestamp: read_u64(h, POS_MAX_TIMESTAMP) as i64,
            producer_id: read_u64(h, POS_PRODUCER_ID) as i64,
            producer_epoch: read_u16(h, POS_PRODUCER_EPOCH) as i16,
            base_sequence: read_u32(h, POS_BASE_SEQUENCE) as i32,
        })
    }

    /// Offset of the last record slot: `base_offset + last_offset_delta`. Saturates on a
    /// hand-built header; a parsed header never overflows.
    pub fn last_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.last_offset_delta))
    }

    /// The offset after this batch: `last_offset() + 1`. Saturates like [`Self::last_offset`].
    pub fn next_offset(&self) -> u64 {
        self.last_offset().saturating_add(1)
    }

    /// Whether the batch holds control records rather than user data.
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// Writes every field as it is (the CRC included, reserved fields as zero).
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        write_at(out, POS_BASE_OFFSET, self.base_offset.to_le_bytes());
        write_at(out, POS_LENGTH, self.length.to_le_bytes());
        write_at(out, POS_LEADER_EPOCH, self.leader_epoch.to_le_bytes());
        write_at(out, POS_CRC, self.crc.to_le_bytes());
        out[POS_VERSION] = self.version;
        out[POS_RESERVED_1] = 0;
        write_at(out, POS_ATTRIBUTES, self.attributes.to_le_bytes());
        write_at(
            out,
            POS_LAST_OFFSET_DELTA,
            self.last_offset_delta.to_le_bytes(),
        );
        write_at(out, POS_RECORD_COUNT, self.record_count.to_le_bytes());
        write_at(out, POS_FIRST_TIMESTAMP, self.first_timestamp.to_le_bytes());
        write_at(out, POS_MAX_TIMESTAMP, self.max_timestamp.to_le_bytes());
        write_at(out, POS_PRODUCER_ID, self.producer_id.to_le_bytes());
        write_at(out, POS_PRODUCER_EPOCH, self.producer_epoch.to_le_bytes());
        write_at(out, POS_RESERVED_2, 0u16.to_le_bytes());
        write_at(out, POS_BASE_SEQUENCE, self.base_sequence.to_le_bytes());
    }
}

/// CRC-32C over `batch[CRC_START..]`; `batch` is exactly one batch. A buffer shorter than
/// [`CRC_START`] gets the CRC of no bytes.
///
/// Computed with `crc-fast` (carry-less multiplication, AVX-512 where the CPU has it, chosen at
/// run time), 1.6x the `crc32c` crate's rate on batches out of cache on the benchmark machine:
/// the batch CRC was the producer's largest cost after the socket copy (~14% of a 1 KiB
/// producer's CPU) and every batch is checked again by the broker. Same polynomial, same
/// values: the golden vectors of the tests pin them.
pub fn compute_crc(batch: &[u8]) -> u32 {
    // CRC-32/ISCSI is CRC-32C; its value fits in 32 bits.
    crc_fast::checksum(
        crc_fast::CrcAlgorithm::Crc32Iscsi,
        batch.get(CRC_START..).unwrap_or_default(),
    ) as u32
}

/// Checks one whole batch: parses the header ([`BatchHeader::parse`]), checks that
/// `batch.len() == length`, then the CRC. One CRC pass, no record decoding. The broker calls
/// this on append and on recovery; the stamped prefix is not covered (see the module doc).
pub fn verify(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    verify_framed(batch, header)
}

/// The length and CRC checks of [`verify`], for a header already parsed from `batch`.
fn verify_framed(batch: &[u8], header: BatchHeader) -> Result<BatchHeader, BatchError> {
    if batch.len() != header.length as usize {
        return Err(BatchError::LengthMismatch {
            length: header.length,
            actual: batch.len(),
        });
    }
    let computed = compute_crc(batch);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// The 16 bytes `[0, STAMPED_PREFIX_LEN)` with the given stamped values. Writing this followed by
/// a producer's batch from byte 16 on (e.g. with `writev`) stores the stamped batch without
/// copying it; the CRC stays valid because it does not cover these bytes.
pub fn stamped_prefix(
    base_offset: u64,
    length: u32,
    leader_epoch: u32,
) -> [u8; STAMPED_PREFIX_LEN] {
    let mut prefix = [0u8; STAMPED_PREFIX_LEN];
    prefix[POS_BASE_OFFSET..POS_LENGTH].copy_from_slice(&base_offset.to_le_bytes());
    prefix[POS_LENGTH..POS_LEADER_EPOCH].copy_from_slice(&length.to_le_bytes());
    prefix[POS_LEADER_EPOCH..POS_CRC].copy_from_slice(&leader_epoch.to_le_bytes());
    prefix
}

/// Overwrites `base_offset` in place. The CRC stays valid (it does not cover the field).
///
/// # Panics
///
/// If `batch` is shorter than 8 bytes; a verified batch is at least [`HEADER_LEN`] bytes.
pub fn stamp_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[POS_BASE_OFFSET..POS_LENGTH].copy_from_slice(&base_offset.to_le_bytes());
}

/// A verified batch over [`Bytes`]: the header parsed, the length and CRC checked. Records are
/// decoded lazily by [`Batch::records`], as slices of the same buffer.
#[derive(Debug, Clone)]
pub struct Batch {
    bytes: Bytes,
    header: BatchHeader,
}

impl Batch {
    /// Verifies `bytes` as exactly one batch ([`verify`]). Does not decode the records; see
    /// [`Batch::validate_records`].
    pub fn parse(bytes: Bytes) -> Result<Batch, BatchError> {
        let header = verify(&bytes)?;
        Ok(Batch { bytes, header })
    }

    /// The parsed header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes, exactly `header().length` of them.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The batch's bytes, exactly `header().length` of them.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Iterates over the records. Keys, values and header values are slices of this batch's
    /// buffer (no copy). Yields an error and then ends at the first record that breaks the
    /// layout, if the records end before `record_count`, or if bytes follow the last record.
    pub fn records(&self) -> Records {
        Records {
            bytes: self.bytes.clone(),
            walk: RecordWalk::new(self.header),
        }
    }

    /// Walks every record and checks the record layout (see the module doc) without allocating:
    /// the same checks as iterating [`Batch::records`] to the end.
    pub fn validate_records(&self) -> Result<(), BatchError> {
        let mut walk = RecordWalk::new(self.header);
        while let Some(result) = walk.advance(&self.bytes, |_, _| {}) {
            result?;
        }
        Ok(())
    }
}

/// A decoded record. `key`, `value` and header values share the batch's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset: `base_offset + offset_delta`.
    pub offset: u64,
    /// Absolute timestamp, milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers in wire order; keys may repeat.
    pub headers: Vec<Header>,
}

/// A record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header key.
    pub key: String,
    /// The header value, a slice of the batch's buffer.
    pub value: Bytes,
}

/// Iterator over the records of a [`Batch`]; see [`Batch::records`].
#[derive(Debug, Clone)]
pub struct Records {
    bytes: Bytes,
    walk: RecordWalk,
}

/// Where a walk over a batch's records stands; kept apart from the buffer so a decoder can
/// borrow both.
#[derive(Debug, Clone)]
struct RecordWalk {
    header: BatchHeader,
    /// Where the next record starts.
    position: usize,
    /// Index of the next record.
    index: u32,
    previous_offset_delta: Option<u32>,
    /// Set after the end or the first error.
    done: bool,
}

/// Where the fields of one record lie in the batch buffer.
struct RawRecord {
    offset: u64,
    timestamp: i64,
    key: Option<Range<usize>>,
    value: Option<Range<usize>>,
}

impl RecordWalk {
    fn new(header: BatchHeader) -> Self {
        RecordWalk {
            header,
            position: HEADER_LEN,
            index: 0,
            previous_offset_delta: None,
            done: false,
        }
    }

    /// Decodes the next record of `data` (the whole batch), calling `on_header` for each of its
    /// headers, and moves past it. `None` after the last record or the first error.
    fn advance<F>(&mut self, data: &[u8], on_header: F) -> Option<Result<RawRecord, BatchError>>
    where
        F: FnMut(&str, Range<usize>),
    {
        if self.done {
            return None;
        }
        let end = data.len();
        if self.index == self.header.record_count {
            self.done = true;
            if self.position != end {
                return Some(Err(BatchError::TrailingBytes {
                    record_count: self.header.record_count,
                    bytes: end.saturating_sub(self.position),
                }));
            }
            return None;
        }
        if self.position >= end {
            self.done = true;
            return Some(Err(BatchError::RecordCountMismatch {
                expected: self.header.record_count,
                actual: self.index,
            }));
        }
        match read_record(
            data,
            self.position,
            &self.header,
            self.previous_offset_delta,
            on_header,
        ) {
            Ok((raw, offset_delta, record_end)) => {
                self.position = record_end;
                self.previous_offset_delta = Some(offset_delta);
                self.index += 1;
                Some(Ok(raw))
            }
            Err(reason) => {
                self.done = true;
                Some(Err(BatchError::MalformedRecord {
                    index: self.index,
                    reason,
                }))
            }
        }
    }
}

impl Iterator for Records {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = &self.bytes;
        let mut headers = Vec::new();
        let raw = self.walk.advance(bytes, |key, value| {
            headers.push(Header {
                key: key.to_owned(),
                value: bytes.slice(value),
            });
        })?;
        Some(raw.map(|raw| Record {
            offset: raw.offset,
            timestamp: raw.timestamp,
            key: raw.key.map(|range| bytes.slice(range)),
            value: raw.value.map(|range| bytes.slice(range)),
            headers,
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.walk.done {
            return (0, Some(0));
        }
        // Up to the remaining records, plus one possible error.
        let remaining = self
            .walk
            .header
            .record_count
            .saturating_sub(self.walk.index) as usize;
        (0, Some(remaining + 1))
    }
}

impl FusedIterator for Records {}

/// Reads the record starting at `start`. Returns where its fields lie, its offset delta and where
/// it ends, or the reason it is malformed.
fn read_record<F>(
    data: &[u8],
    start: usize,
    header: &BatchHeader,
    previous_offset_delta: Option<u32>,
    mut on_header: F,
) -> Result<(RawRecord, u32, usize), &'static str>
where
    F: FnMut(&str, Range<usize>),
{
    let mut batch = Cursor {
        data,
        position: start,
        end: data.len(),
    };
    let record_len = batch.uvarint32().map_err(|reason| match reason {
        reason::FIELD_PAST_RECORD => reason::RECORD_LENGTH_PAST_BATCH,
        other => other,
    })? as usize;
    if record_len > batch.remaining() {
        return Err(reason::RECORD_LENGTH_PAST_BATCH);
    }
    let record_end = batch.position + record_len;
    let mut record = Cursor {
        data,
        position: batch.position,
        end: record_end,
    };

    if record.u8()? != 0 {
        return Err(reason::ATTRIBUTES);
    }
    let timestamp_delta = unzigzag64(record.uvarint64()?);
    let offset_delta = record.uvarint32()?;
    if previous_offset_delta.is_some_and(|previous| offset_delta <= previous) {
        return Err(reason::OFFSET_NOT_INCREASING);
    }
    if offset_delta > header.last_offset_delta {
        return Err(reason::OFFSET_PAST_LAST);
    }
    let key = record.optional_bytes()?;
    let value = record.optional_bytes()?;
    let header_count = record.uvarint32()?;
    if header_count > MAX_HEADERS_PER_RECORD {
        return Err(reason::TOO_MANY_HEADERS);
    }
    for _ in 0..header_count {
        let key_len = record.uvarint32()? as usize;
        let key_range = record.take(key_len)?;
        let key_bytes = data.get(key_range).ok_or(reason::FIELD_PAST_RECORD)?;
        let key = std::str::from_utf8(key_bytes).map_err(|_| reason::HEADER_KEY_UTF8)?;
        let value_len = record.uvarint32()? as usize;
        let value_range = record.take(value_len)?;
        on_header(key, value_range);
    }
    if record.position != record_end {
        return Err(reason::LENGTH_MISMATCH);
    }

    let offset = header
        .base_offset
        .checked_add(u64::from(offset_delta))
        .ok_or(reason::OFFSET_OVERFLOW)?;
    // Deltas wrap, so every pair of i64 timestamps round-trips (see `BatchBuilder::push`).
    let timestamp = header.first_timestamp.wrapping_add(timestamp_delta);
    Ok((
        RawRecord {
            offset,
            timestamp,
            key,
            value,
        },
        offset_delta,
        record_end,
    ))
}

/// A bounded reader over `data[position..end]`. Errors are [`BatchError::MalformedRecord`]
/// reasons.
struct Cursor<'a> {
    data: &'a [u8],
    position: usize,
    end: usize,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.end.saturating_sub(self.position)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        if self.position >= self.end {
            return Err(reason::FIELD_PAST_RECORD);
        }
        let byte = *self
            .data
            .get(self.position)
            .ok_or(reason::FIELD_PAST_RECORD)?;
        self.position += 1;
        Ok(byte)
    }

    /// Unsigned LEB128, at most 5 bytes, and the 5th may only carry the top 4 bits.
    fn uvarint32(&mut self) -> Result<u32, &'static str> {
        let mut value = 0u32;
        for shift in [0, 7, 14, 21] {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        let byte = self.u8()?;
        if byte > 0x0f {
            return Err(reason::VARINT_TOO_LONG);
        }
        Ok(value | (u32::from(byte) << 28))
    }

    /// Unsigned LEB128, at most 10 bytes, and the 10th may only carry the top bit.
    fn uvarint64(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..63).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        let byte = self.u8()?;
        if byte > 0x01 {
            return Err(reason::VARINT_TOO_LONG);
        }
        Ok(value | (u64::from(byte) << 63))
    }

    /// The next `len` bytes, as a range of `data`.
    fn take(&mut self, len: usize) -> Result<Range<usize>, &'static str> {
        if len > self.remaining() {
            return Err(reason::FIELD_PAST_RECORD);
        }
        let start = self.position;
        self.position += len;
        Ok(start..self.position)
    }

    /// A zigzag i32 length (-1 = absent) followed by that many bytes.
    fn optional_bytes(&mut self) -> Result<Option<Range<usize>>, &'static str> {
        match unzigzag32(self.uvarint32()?) {
            -1 => Ok(None),
            len if len < 0 => Err(reason::NEGATIVE_LENGTH),
            len => self.take(len as usize).map(Some),
        }
    }
}

fn zigzag32(value: i32) -> u32 {
    ((value << 1) ^ (value >> 31)) as u32
}

fn unzigzag32(value: u32) -> i32 {
    ((value >> 1) as i32) ^ -((value & 1) as i32)
}

fn zigzag64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag64(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Bytes of the unsigned LEB128 encoding of `value`: 1 to 10.
fn uvarint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Bytes of an optional key or value: its zigzag length (-1 when absent) and its bytes.
/// Saturates for absurd lengths; the caller rejects anything above `BATCH_LEN_MAX`.
fn optional_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => 1,
        Some(bytes) => {
            let zigzag = (bytes.len() as u64).saturating_mul(2);
            uvarint_len(zigzag).saturating_add(bytes.len())
        }
    }
}

fn put_uvarint(out: &mut BytesMut, mut value: u64) {
    let mut scratch = [0u8; 10];
    let mut len = 0;
    while value >= 0x80 {
        scratch[len] = (value as u8) | 0x80;
        value >>= 7;
        len += 1;
    }
    scratch[len] = value as u8;
    out.put_slice(&scratch[..=len]);
}

/// Writes an optional key or value. The caller has bounded `bytes.len()` by `BATCH_LEN_MAX`,
/// so it fits in an `i32`.
fn put_optional_bytes(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_uvarint(out, u64::from(zigzag32(-1))),
        Some(bytes) => {
            put_uvarint(out, u64::from(zigzag32(bytes.len() as i32)));
            out.put_slice(bytes);
        }
    }
}

/// Splits a buffer of concatenated batches (a fetch response, a segment slice) into verified
/// batches, without copying. Yields an error and then ends at the first batch that fails
/// [`verify`]; a batch cut short by the end of the buffer is [`BatchError::TooShort`], so a
/// reader that expects a partial last batch (a byte-limited fetch) can tell it apart from
/// corruption. Records are not decoded.
#[derive(Debug, Clone)]
pub struct Batches {
    bytes: Bytes,
    position: usize,
    done: bool,
}

impl Batches {
    /// Iterates over the batches in `bytes`.
    pub fn new(bytes: Bytes) -> Self {
        Batches {
            bytes,
            position: 0,
            done: false,
        }
    }

    /// Byte position of the next batch: after iteration ends, the length of the verified prefix.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.position >= self.bytes.len() {
            self.done = true;
            return None;
        }
        let rest = self.bytes.get(self.position..).unwrap_or_default();
        let header = match BatchHeader::parse(rest) {
            Ok(header) => header,
            Err(error) => {
                self.done = true;
                return Some(Err(error));
            }
        };
        let length = header.length as usize;
        if rest.len() < length {
            self.done = true;
            return Some(Err(BatchError::TooShort {
                len: rest.len(),
                needed: length,
            }));
        }
        let bytes = self.bytes.slice(self.position..self.position + length);
        match verify_framed(&bytes, header) {
            Ok(header) => {
                self.position += length;
                Some(Ok(Batch { bytes, header }))
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}

impl FusedIterator for Batches {}

/// Encodes one batch into one growing buffer.
///
/// The batch has base offset 0 and leader epoch 0 (the broker stamps both), no producer
/// (`NO_*`) unless [`BatchBuilder::producer`] says otherwise, and `last_offset_delta` equal to
/// the last record's offset delta unless [`BatchBuilder::last_offset_delta`] says otherwise.
/// `first_timestamp` is the first pushed record's timestamp and `max_timestamp` the largest.
///
/// [`BatchBuilder::push`] cannot fail on the spot: its errors (a batch over [`BATCH_LEN_MAX`],
/// too many headers) are kept, later pushes are ignored, and [`BatchBuilder::finish`] returns the
/// error, so no record is dropped silently. [`BatchBuilder::push_at`] returns errors at once and
/// leaves the builder as it was.
#[derive(Debug)]
pub struct BatchBuilder {
    /// Header space (filled by `finish`) followed by the encoded records.
    buf: BytesMut,
    attributes: u16,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    record_count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    last_record_offset_delta: Option<u32>,
    last_offset_delta: Option<u32>,
    deferred_error: Option<BatchError>,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty builder with room for the header only.
    pub fn new() -> Self {
        Self::with_capacity(HEADER_LEN)
    }

    /// An empty builder whose buffer holds `bytes` (header included) before it grows. Size it
    /// for the whole batch to encode without reallocating.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = BytesMut::with_capacity(bytes.max(HEADER_LEN));
        buf.put_bytes(0, HEADER_LEN);
        BatchBuilder {
            buf,
            attributes: 0,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            base_sequence: NO_SEQUENCE,
            record_count: 0,
            first_timestamp: 0,
            max_timestamp: 0,
            last_record_offset_delta: None,
            last_offset_delta: None,
            deferred_error: None,
        }
    }

    /// Sets the idempotent-producer fields.
    #[must_use]
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Marks the batch as a control batch.
    #[must_use]
    pub fn control(mut self) -> Self {
        self.attributes |= ATTR_CONTROL;
        self
    }

    /// Sets `last_offset_delta` explicitly, before or after pushing records; compaction keeps the
    /// original batch's value so the next offset is unchanged. [`BatchBuilder::finish`] fails
    /// with [`BatchError::LastOffsetDeltaTooSmall`] if it is below the last record's delta.
    #[must_use]
    pub fn last_offset_delta(mut self, delta: u32) -> Self {
        self.last_offset_delta = Some(delta);
        self
    }

    /// Appends a record at the next offset delta: the previous record's plus one, 0 for the
    /// first. Timestamps may go backwards; the delta to `first_timestamp` wraps, so any `i64`
    /// round-trips. Does not allocate beyond growing the buffer. Errors are reported by
    /// [`BatchBuilder::finish`] (see the type's doc).
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) {
        if self.deferred_error.is_some() {
            return;
        }
        let offset_delta = match self.last_record_offset_delta {
            None => 0,
            Some(previous) => match previous.checked_add(1) {
                Some(delta) => delta,
                None => {
                    self.deferred_error = Some(BatchError::OffsetDeltaOverflow { previous });
                    return;
                }
            },
        };
        if let Err(error) = self.append(offset_delta, timestamp, key, value, headers) {
            self.deferred_error = Some(error);
        }
    }

    /// Appends a record at an explicit offset delta, leaving gaps (compaction). Fails, leaving
    /// the builder unchanged, if `offset_delta` is not above the previous record's, if the
    /// record has too many headers, or if it would take the batch over [`BATCH_LEN_MAX`]; fails
    /// with the kept error of an earlier [`BatchBuilder::push`].
    pub fn push_at(
        &mut self,
        offset_delta: u32,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(), BatchError> {
        if let Some(error) = &self.deferred_error {
            return Err(error.clone());
        }
        if let Some(previous) = self.last_record_offset_delta {
            if offset_delta <= previous {
                return Err(BatchError::OffsetDeltaNotIncreasing {
                    previous,
                    offset_delta,
                });
            }
        }
        self.append(offset_delta, timestamp, key, value, headers)
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Bytes the batch has so far, header included: its length if finished now.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Writes the header, the length and the CRC, and returns the batch. Fails with
    /// [`BatchError::Empty`] without records, with [`BatchError::LastOffsetDeltaTooSmall`], or
    /// with an error kept from [`BatchBuilder::push`].
    pub fn finish(mut self) -> Result<Bytes, BatchError> {
        if let Some(error) = self.deferred_error {
            return Err(error);
        }
        let Some(last_record_offset_delta) = self.last_record_offset_delta else {
            return Err(BatchError::Empty);
        };
        let last_offset_delta = match self.last_offset_delta {
            None => last_record_offset_delta,
            Some(delta) if delta < last_record_offset_delta => {
                return Err(BatchError::LastOffsetDeltaTooSmall {
                    last_offset_delta: delta,
                    record_offset_delta: last_record_offset_delta,
                });
            }
            Some(delta) => delta,
        };
        let length = match u32::try_from(self.buf.len()) {
            Ok(length) if length <= BATCH_LEN_MAX => length,
            _ => {
                return Err(BatchError::TooLarge {
                    length: self.buf.len(),
                    max: BATCH_LEN_MAX,
                })
            }
        };
        let header = BatchHeader {
            base_offset: 0,
            length,
            leader_epoch: 0,
            crc: 0,
            version: FORMAT_VERSION,
            attributes: self.attributes,
            last_offset_delta,
            record_count: self.record_count,
            first_timestamp: self.first_timestamp,
            max_timestamp: self.max_timestamp,
            producer_id: self.producer_id,
            producer_epoch: self.producer_epoch,
            base_sequence: self.base_sequence,
        };
        let mut encoded = [0u8; HEADER_LEN];
        header.encode(&mut encoded);
        // The buffer starts with HEADER_LEN bytes reserved by `with_capacity`.
        self.buf[..HEADER_LEN].copy_from_slice(&encoded);
        let crc = compute_crc(&self.buf);
        self.buf[POS_CRC..CRC_START].copy_from_slice(&crc.to_le_bytes());
        Ok(self.buf.freeze())
    }

    /// Encodes one record at `offset_delta` (already checked to be increasing). Writes nothing
    /// on error.
    fn append(
        &mut self,
        offset_delta: u32,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(), BatchError> {
        if headers.len() > MAX_HEADERS_PER_RECORD as usize {
            return Err(BatchError::TooManyHeaders {
                count: headers.len(),
                max: MAX_HEADERS_PER_RECORD,
            });
        }
        let first_timestamp = if self.record_count == 0 {
            timestamp
        } else {
            self.first_timestamp
        };
        let timestamp_delta = zigzag64(timestamp.wrapping_sub(first_timestamp));

        // Size the record first so its length prefix is written straight into the buffer; sums
        // saturate so absurd inputs end in `TooLarge` instead of overflowing.
        let mut body_len = 1 // attributes
            + uvarint_len(timestamp_delta)
            + uvarint_len(u64::from(offset_delta));
        body_len = body_len
            .saturating_add(optional_len(key))
            .saturating_add(optional_len(value))
            .saturating_add(uvarint_len(headers.len() as u64));
        for (header_key, header_value) in headers {
            body_len = body_len
                .saturating_add(uvarint_len(header_key.len() as u64))
                .saturating_add(header_key.len())
                .saturating_add(uvarint_len(header_value.len() as u64))
                .saturating_add(header_value.len());
        }
        let record_len = uvarint_len(body_len as u64).saturating_add(body_len);
        let batch_len = self.buf.len().saturating_add(record_len);
        if batch_len > BATCH_LEN_MAX as usize {
            return Err(BatchError::TooLarge {
                length: batch_len,
                max: BATCH_LEN_MAX,
            });
        }
        // From here every length is at most BATCH_LEN_MAX, so it fits in a u32 and an i32.

        self.buf.reserve(record_len);
        put_uvarint(&mut self.buf, body_len as u64);
        self.buf.put_u8(0); // attributes
        put_uvarint(&mut self.buf, timestamp_delta);
        put_uvarint(&mut self.buf, u64::from(offset_delta));
        put_optional_bytes(&mut self.buf, key);
        put_optional_bytes(&mut self.buf, value);
        put_uvarint(&mut self.buf, headers.len() as u64);
        for (header_key, header_value) in headers {
            put_uvarint(&mut self.buf, header_key.len() as u64);
            self.buf.put_slice(header_key.as_bytes());
            put_uvarint(&mut self.buf, header_value.len() as u64);
            self.buf.put_slice(header_value);
        }
        debug_assert_eq!(self.buf.len(), batch_len, "record size computed wrong");

        if self.record_count == 0 {
            self.first_timestamp = timestamp;
            self.max_timestamp = timestamp;
        } else {
            self.max_timestamp = self.max_timestamp.max(timestamp);
        }
        self.record_count += 1;
        self.last_record_offset_delta = Some(offset_delta);
        Ok(())
    }
}

// Pins the batch wire format (golden vectors), the round trip of every record shape, that no input
// makes the decoder panic, what the CRC does and does not cover, and each error.
#[cfg(test)]
mod tests;

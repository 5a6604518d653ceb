// Pins the batch wire format (golden vectors), the round trip of every record shape, that no input
// makes the decoder panic, what the CRC does and does not cover, and each error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

/// 2023-11-14T22:13:20Z: a realistic timestamp, fixed so the golden vectors never move.
const GOLDEN_TIMESTAMP_MS: i64 = 1_700_000_000_000;

/// The unstamped golden batch: producer 7, epoch 1, sequence 0; record 0 has key, value and one
/// header; record 1, 250 ms later, is a tombstone for the same key.
/// Hand-checked against the layout (and the CRC against an independent CRC-32C):
/// ```text
/// 0000000000000000 base_offset 0        6d000000 length 109     00000000 leader_epoch 0
/// 30e428bb crc 0xbb28e430              01 version  00 reserved  0000 attributes
/// 01000000 last_offset_delta 1          02000000 record_count 2
/// 0068e5cf8b010000 first_timestamp      fa68e5cf8b010000 max_timestamp (+250)
/// 0700000000000000 producer_id 7        0100 producer_epoch 1    0000 reserved
/// 00000000 base_sequence 0
/// record 0: 1e length 30, 00 attributes, 00 timestamp_delta, 00 offset_delta,
///   0c key_length 6, "user-1", 0a value_length 5, "hello", 01 header_count,
///   08 "trace-id", 03 "abc"
/// record 1: 0d length 13, 00 attributes, f403 timestamp_delta 250 (zigzag 500),
///   01 offset_delta, 0c "user-1", 01 value_length -1 (tombstone), 00 header_count
/// ```
const GOLDEN_HEX: &str = concat!(
    "0000000000000000",
    "6d000000",
    "00000000",
    "30e428bb",
    "01",
    "00",
    "0000",
    "01000000",
    "02000000",
    "0068e5cf8b010000",
    "fa68e5cf8b010000",
    "0700000000000000",
    "0100",
    "0000",
    "00000000",
    "1e",
    "00",
    "00",
    "00",
    "0c",
    "757365722d31",
    "0a",
    "68656c6c6f",
    "01",
    "08",
    "74726163652d6964",
    "03",
    "616263",
    "0d",
    "00",
    "f403",
    "01",
    "0c",
    "757365722d31",
    "01",
    "00",
);

/// [`GOLDEN_HEX`] after the broker stamped base offset 1000 (leader epoch 0). Only bytes
/// [0, 8) differ; the CRC is the same.
const GOLDEN_STAMPED_HEX: &str = concat!(
    "e803000000000000",
    "6d000000",
    "00000000",
    "30e428bb",
    "01",
    "00",
    "0000",
    "01000000",
    "02000000",
    "0068e5cf8b010000",
    "fa68e5cf8b010000",
    "0700000000000000",
    "0100",
    "0000",
    "00000000",
    "1e",
    "00",
    "00",
    "00",
    "0c",
    "757365722d31",
    "0a",
    "68656c6c6f",
    "01",
    "08",
    "74726163652d6964",
    "03",
    "616263",
    "0d",
    "00",
    "f403",
    "01",
    "0c",
    "757365722d31",
    "01",
    "00",
);

fn golden_batch() -> Bytes {
    let mut builder = BatchBuilder::new().producer(7, 1, 0);
    builder.push(
        GOLDEN_TIMESTAMP_MS,
        Some(b"user-1"),
        Some(b"hello"),
        &[("trace-id", b"abc")],
    );
    builder.push(GOLDEN_TIMESTAMP_MS + 250, Some(b"user-1"), None, &[]);
    builder.finish().unwrap()
}

/// Rewrites the CRC of a (tampered) batch so a test reaches the check after it.
fn reseal(batch: &mut [u8]) {
    let crc = compute_crc(batch);
    batch[POS_CRC..CRC_START].copy_from_slice(&crc.to_le_bytes());
}

/// A batch around hand-written record bytes, with a correct length and CRC.
fn seal(records: &[u8], record_count: u32, last_offset_delta: u32) -> Bytes {
    let header = BatchHeader {
        base_offset: 0,
        length: (HEADER_LEN + records.len()) as u32,
        leader_epoch: 0,
        crc: 0,
        version: FORMAT_VERSION,
        attributes: 0,
        last_offset_delta,
        record_count,
        first_timestamp: 0,
        max_timestamp: 0,
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        base_sequence: NO_SEQUENCE,
    };
    let mut encoded = [0u8; HEADER_LEN];
    header.encode(&mut encoded);
    let mut batch = encoded.to_vec();
    batch.extend_from_slice(records);
    reseal(&mut batch);
    Bytes::from(batch)
}

/// A record: its one-byte length prefix (bodies here are under 128 bytes) and `body`.
fn record(body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 0x80);
    let mut out = vec![body.len() as u8];
    out.extend_from_slice(body);
    out
}

/// The smallest valid record body: attributes 0, timestamp delta 0, offset delta 0, no key
/// (zigzag -1 = 1), no value, no headers.
const MINIMAL_BODY: [u8; 6] = [0, 0, 0, 1, 1, 0];

/// A built batch with `count` records, each with a key and a value.
fn batch_of(count: u32) -> Bytes {
    let mut builder = BatchBuilder::new();
    for i in 0..count {
        builder.push(
            GOLDEN_TIMESTAMP_MS + i64::from(i),
            Some(b"key"),
            Some(b"value"),
            &[],
        );
    }
    builder.finish().unwrap()
}

fn with_header_field(batch: &Bytes, position: usize, bytes: &[u8]) -> Vec<u8> {
    let mut tampered = batch.to_vec();
    tampered[position..position + bytes.len()].copy_from_slice(bytes);
    reseal(&mut tampered);
    tampered
}

fn malformed(batch: &Bytes) -> BatchError {
    let batch = Batch::parse(batch.clone()).unwrap();
    let error = batch.validate_records().unwrap_err();
    // The iterator reports the same error as its last item.
    let last = batch.records().last().unwrap();
    assert_eq!(last, Err(error.clone()));
    error
}

// ---- golden vectors ----

#[test]
fn golden_batch_should_encode_to_pinned_bytes() {
    assert_eq!(hex::encode(golden_batch()), GOLDEN_HEX);
}

#[test]
fn golden_bytes_should_decode_to_known_fields() {
    let batch = Batch::parse(Bytes::from(hex::decode(GOLDEN_HEX).unwrap())).unwrap();
    let header = *batch.header();
    assert_eq!(
        header,
        BatchHeader {
            base_offset: 0,
            length: GOLDEN_HEX.len() as u32 / 2,
            leader_epoch: 0,
            crc: header.crc,
            version: 1,
            attributes: 0,
            last_offset_delta: 1,
            record_count: 2,
            first_timestamp: GOLDEN_TIMESTAMP_MS,
            max_timestamp: GOLDEN_TIMESTAMP_MS + 250,
            producer_id: 7,
            producer_epoch: 1,
            base_sequence: 0,
        }
    );
    assert_eq!(header.crc, compute_crc(batch.as_bytes()));
    assert!(!header.is_control());
    assert_eq!(header.next_offset(), 2);
    let records: Vec<Record> = batch.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        records,
        vec![
            Record {
                offset: 0,
                timestamp: GOLDEN_TIMESTAMP_MS,
                key: Some(Bytes::from_static(b"user-1")),
                value: Some(Bytes::from_static(b"hello")),
                headers: vec![Header {
                    key: "trace-id".to_owned(),
                    value: Bytes::from_static(b"abc"),
                }],
            },
            Record {
                offset: 1,
                timestamp: GOLDEN_TIMESTAMP_MS + 250,
                key: Some(Bytes::from_static(b"user-1")),
                value: None,
                headers: vec![],
            },
        ]
    );
}

#[test]
fn golden_stamped_batch_should_match_pinned_bytes_and_keep_its_crc() {
    let unstamped = golden_batch();
    let mut stamped = unstamped.to_vec();
    stamp_base_offset(&mut stamped, 1000);
    assert_eq!(hex::encode(&stamped), GOLDEN_STAMPED_HEX);

    // The writev path produces the same bytes.
    let mut via_prefix = stamped_prefix(1000, unstamped.len() as u32, 0).to_vec();
    via_prefix.extend_from_slice(&unstamped[STAMPED_PREFIX_LEN..]);
    assert_eq!(via_prefix, stamped);

    let pinned = Bytes::from(hex::decode(GOLDEN_STAMPED_HEX).unwrap());
    let batch = Batch::parse(pinned).unwrap();
    assert_eq!(batch.header().base_offset, 1000);
    assert_eq!(batch.header().crc, verify(&unstamped).unwrap().crc);
    assert_eq!(batch.header().last_offset(), 1001);
    assert_eq!(batch.header().next_offset(), 1002);
    let offsets: Vec<u64> = batch.records().map(|r| r.unwrap().offset).collect();
    assert_eq!(offsets, vec![1000, 1001]);
}

// ---- builder and decoder behaviour ----

#[test]
fn given_keys_and_values_when_decoded_should_slice_the_batch_without_copying() {
    let batch = Batch::parse(golden_batch()).unwrap();
    let range = batch.as_bytes().as_ptr_range();
    let record = batch.records().next().unwrap().unwrap();
    for bytes in [
        record.key.unwrap(),
        record.value.unwrap(),
        record.headers[0].value.clone(),
    ] {
        assert!(range.contains(&bytes.as_ptr()));
    }
}

#[test]
fn given_gaps_and_explicit_last_offset_delta_when_finished_should_keep_both() {
    let mut builder = BatchBuilder::with_capacity(1024).control();
    builder.push_at(3, 10, None, Some(b"a"), &[]).unwrap();
    builder.push_at(9, 5, None, Some(b"b"), &[]).unwrap();
    let bytes = builder.last_offset_delta(20).finish().unwrap();
    let batch = Batch::parse(bytes).unwrap();
    let header = batch.header();
    assert!(header.is_control());
    assert_eq!(header.attributes, ATTR_CONTROL);
    assert_eq!(header.last_offset_delta, 20);
    assert_eq!(header.next_offset(), 21);
    assert_eq!((header.first_timestamp, header.max_timestamp), (10, 10));
    let records: Vec<Record> = batch.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        records
            .iter()
            .map(|r| (r.offset, r.timestamp))
            .collect::<Vec<_>>(),
        vec![(3, 10), (9, 5)]
    );
}

#[test]
fn given_a_builder_when_records_are_pushed_should_report_count_and_length() {
    let mut builder = BatchBuilder::default();
    assert!(builder.is_empty());
    assert_eq!(builder.encoded_len(), HEADER_LEN);
    builder.push(0, None, None, &[]);
    assert_eq!(builder.record_count(), 1);
    assert!(!builder.is_empty());
    assert_eq!(builder.encoded_len(), HEADER_LEN + RECORD_LEN_MIN);
    let bytes = builder.finish().unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + RECORD_LEN_MIN);
    assert_eq!(verify(&bytes).unwrap().producer_id, NO_PRODUCER_ID);
}

#[test]
fn varint_helpers_should_agree_with_each_other_at_every_width_boundary() {
    for value in [
        0u64,
        1,
        127,
        128,
        16_383,
        16_384,
        u64::from(u32::MAX),
        u64::MAX,
    ] {
        let mut out = BytesMut::new();
        put_uvarint(&mut out, value);
        assert_eq!(out.len(), uvarint_len(value), "value {value}");
        let mut cursor = Cursor {
            data: &out,
            position: 0,
            end: out.len(),
        };
        assert_eq!(cursor.uvarint64(), Ok(value));
    }
    for value in [0, 1, -1, i32::MIN, i32::MAX] {
        assert_eq!(unzigzag32(zigzag32(value)), value);
    }
    for value in [0, 1, -1, i64::MIN, i64::MAX] {
        assert_eq!(unzigzag64(zigzag64(value)), value);
    }
}

// ---- header errors ----

#[test]
fn given_fewer_than_64_bytes_when_parsed_should_be_too_short() {
    let batch = batch_of(1);
    assert_eq!(
        BatchHeader::parse(&batch[..HEADER_LEN - 1]),
        Err(BatchError::TooShort {
            len: HEADER_LEN - 1,
            needed: HEADER_LEN
        })
    );
    assert!(matches!(
        verify(&[]),
        Err(BatchError::TooShort { len: 0, .. })
    ));
}

#[test]
fn given_unknown_version_when_verified_should_be_unsupported_version() {
    let tampered = with_header_field(&batch_of(1), POS_VERSION, &[2]);
    assert_eq!(verify(&tampered), Err(BatchError::UnsupportedVersion(2)));
}

#[test]
fn given_length_outside_bounds_when_parsed_should_be_bad_length() {
    let batch = batch_of(1);
    for length in [0, HEADER_LEN as u32 - 1, BATCH_LEN_MAX + 1, u32::MAX] {
        let tampered = with_header_field(&batch, POS_LENGTH, &length.to_le_bytes());
        assert_eq!(verify(&tampered), Err(BatchError::BadLength { length }));
    }
}

#[test]
fn given_buffer_longer_or_shorter_than_length_when_verified_should_be_length_mismatch() {
    let batch = batch_of(2);
    let length = batch.len() as u32;
    let mut longer = batch.to_vec();
    longer.push(0);
    assert_eq!(
        verify(&longer),
        Err(BatchError::LengthMismatch {
            length,
            actual: batch.len() + 1
        })
    );
    assert_eq!(
        verify(&batch[..batch.len() - 1]),
        Err(BatchError::LengthMismatch {
            length,
            actual: batch.len() - 1
        })
    );
    // `parse` alone does not look past the header.
    assert!(BatchHeader::parse(&longer).is_ok());
}

#[test]
fn given_corrupt_record_byte_when_verified_should_be_crc_mismatch() {
    let mut corrupt = batch_of(1).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x01;
    let stored = BatchHeader::parse(&corrupt).unwrap().crc;
    assert_eq!(
        verify(&corrupt),
        Err(BatchError::CrcMismatch {
            stored,
            computed: compute_crc(&corrupt)
        })
    );
}

#[test]
fn given_record_count_zero_or_impossible_when_parsed_should_be_bad_record_count() {
    let batch = batch_of(1);
    let length = batch.len() as u32;
    let max = (length - HEADER_LEN as u32) / RECORD_LEN_MIN as u32;
    for record_count in [0, max + 1, u32::MAX] {
        let tampered = with_header_field(&batch, POS_RECORD_COUNT, &record_count.to_le_bytes());
        assert_eq!(
            verify(&tampered),
            Err(BatchError::BadRecordCount {
                record_count,
                length,
                max
            })
        );
    }
}

#[test]
fn given_last_offset_delta_below_record_count_when_parsed_should_be_rejected() {
    let tampered = with_header_field(&batch_of(3), POS_LAST_OFFSET_DELTA, &1u32.to_le_bytes());
    assert_eq!(
        verify(&tampered),
        Err(BatchError::BadLastOffsetDelta {
            last_offset_delta: 1,
            record_count: 3
        })
    );
}

#[test]
fn given_base_offset_near_u64_max_when_parsed_should_be_offset_overflow() {
    let mut batch = batch_of(2).to_vec();
    stamp_base_offset(&mut batch, u64::MAX - 1);
    assert_eq!(
        verify(&batch),
        Err(BatchError::OffsetOverflow {
            base_offset: u64::MAX - 1,
            last_offset_delta: 1
        })
    );
    // The largest base offset whose next offset still fits is accepted.
    stamp_base_offset(&mut batch, u64::MAX - 2);
    assert_eq!(verify(&batch).unwrap().next_offset(), u64::MAX);
}

#[test]
fn given_compression_bits_when_parsed_should_be_unsupported_compression() {
    for attributes in [1u16, 3, 7, 7 | ATTR_CONTROL] {
        let tampered = with_header_field(&batch_of(1), POS_ATTRIBUTES, &attributes.to_le_bytes());
        assert_eq!(
            verify(&tampered),
            Err(BatchError::UnsupportedCompression(
                attributes & ATTR_COMPRESSION_MASK
            ))
        );
    }
}

#[test]
fn given_unknown_attribute_bits_when_parsed_should_be_bad_attributes() {
    for attributes in [0x8u16, 0x20, 0x8000, ATTR_CONTROL | 0x100] {
        let tampered = with_header_field(&batch_of(1), POS_ATTRIBUTES, &attributes.to_le_bytes());
        assert_eq!(
            verify(&tampered),
            Err(BatchError::BadAttributes(attributes))
        );
    }
}

#[test]
fn given_nonzero_reserved_field_when_parsed_should_be_reserved() {
    let batch = batch_of(1);
    let tampered = with_header_field(&batch, POS_RESERVED_1, &[9]);
    assert_eq!(
        verify(&tampered),
        Err(BatchError::Reserved {
            position: POS_RESERVED_1,
            value: 9
        })
    );
    let tampered = with_header_field(&batch, POS_RESERVED_2, &0x0100u16.to_le_bytes());
    assert_eq!(
        verify(&tampered),
        Err(BatchError::Reserved {
            position: POS_RESERVED_2,
            value: 0x0100
        })
    );
}

// ---- record errors ----

#[test]
fn given_hand_written_minimal_record_when_decoded_should_be_valid() {
    // Guards the helpers the malformed-record tests below build on.
    let batch = Batch::parse(seal(&record(&MINIMAL_BODY), 1, 0)).unwrap();
    batch.validate_records().unwrap();
    let records: Vec<Record> = batch.records().collect::<Result<_, _>>().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].key.clone(), records[0].value.clone()),
        (None, None)
    );
}

#[test]
fn given_fewer_records_than_record_count_when_walked_should_be_record_count_mismatch() {
    // One record padded with a 10-byte value, so the header's count of 2 passes the length
    // bound, but only one record is there.
    let body = [0, 0, 0, 1, 20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0];
    let error = malformed(&seal(&record(&body), 2, 1));
    assert_eq!(
        error,
        BatchError::RecordCountMismatch {
            expected: 2,
            actual: 1
        }
    );
}

#[test]
fn given_bytes_after_the_last_record_when_walked_should_be_trailing_bytes() {
    let mut records = record(&MINIMAL_BODY);
    records.extend_from_slice(&[0xaa, 0xbb, 0xcc]);
    let error = malformed(&seal(&records, 1, 0));
    assert_eq!(
        error,
        BatchError::TrailingBytes {
            record_count: 1,
            bytes: 3
        }
    );
}

fn assert_malformed(records: &[u8], record_count: u32, index: u32, reason: &'static str) {
    let error = malformed(&seal(records, record_count, record_count - 1));
    assert_eq!(error, BatchError::MalformedRecord { index, reason });
}

#[test]
fn given_varint_longer_than_its_type_when_decoded_should_be_malformed() {
    // offset_delta as a 5-byte varint whose last byte carries more than 4 bits.
    let body = [0, 0, 0xff, 0xff, 0xff, 0xff, 0x1f, 1, 1, 0];
    assert_malformed(&record(&body), 1, 0, reason::VARINT_TOO_LONG);
    // timestamp_delta as a 10-byte varint whose last byte carries more than 1 bit.
    let mut body = vec![0];
    body.extend_from_slice(&[0xff; 9]);
    body.extend_from_slice(&[0x02, 0, 1, 1, 0]);
    assert_malformed(&record(&body), 1, 0, reason::VARINT_TOO_LONG);
    // The same widths at their maximum are fine: offset delta u32::MAX.
    let body = [0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 1, 0];
    let batch = Batch::parse(seal(&record(&body), 1, u32::MAX)).unwrap();
    assert_eq!(
        batch.records().next().unwrap().unwrap().offset,
        u64::from(u32::MAX)
    );
}

#[test]
fn given_header_count_over_the_limit_when_decoded_should_be_malformed() {
    // 1025 as a varint is 0x81 0x08.
    let body = [0, 0, 0, 1, 1, 0x81, 0x08];
    assert_malformed(&record(&body), 1, 0, reason::TOO_MANY_HEADERS);
}

#[test]
fn given_non_utf8_header_key_when_decoded_should_be_malformed() {
    let body = [0, 0, 0, 1, 1, 1, 1, 0xff, 0];
    assert_malformed(&record(&body), 1, 0, reason::HEADER_KEY_UTF8);
}

#[test]
fn given_key_longer_than_its_record_when_decoded_should_be_malformed() {
    // Key length 10 (zigzag 20) in a record with 3 bytes left.
    let mut records = record(&[0, 0, 0, 20, 1, 0, 0]);
    records.extend_from_slice(&record(&MINIMAL_BODY)); // bytes the key must not reach
    assert_malformed(&records, 1, 0, reason::FIELD_PAST_RECORD);
}

#[test]
fn given_length_below_minus_one_when_decoded_should_be_malformed() {
    // Value length -2 (zigzag 3).
    let body = [0, 0, 0, 1, 3, 0];
    assert_malformed(&record(&body), 1, 0, reason::NEGATIVE_LENGTH);
}

#[test]
fn given_nonzero_record_attributes_when_decoded_should_be_malformed() {
    let body = [1, 0, 0, 1, 1, 0];
    assert_malformed(&record(&body), 1, 0, reason::ATTRIBUTES);
}

#[test]
fn given_record_length_longer_than_its_fields_when_decoded_should_be_malformed() {
    let body = [0, 0, 0, 1, 1, 0, 0xee];
    assert_malformed(&record(&body), 1, 0, reason::LENGTH_MISMATCH);
}

#[test]
fn given_record_length_past_the_batch_when_decoded_should_be_malformed() {
    let mut records = vec![100];
    records.extend_from_slice(&MINIMAL_BODY);
    assert_malformed(&records, 1, 0, reason::RECORD_LENGTH_PAST_BATCH);
    // A length varint cut by the end of the batch (after a record padded with a 10-byte
    // value, so the header's count of 2 passes the length bound).
    let mut records = record(&[0, 0, 0, 1, 20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]);
    records.extend_from_slice(&[0x80, 0x80]);
    assert_malformed(&records, 2, 1, reason::RECORD_LENGTH_PAST_BATCH);
}

#[test]
fn given_repeated_offset_delta_when_decoded_should_be_malformed() {
    let mut records = record(&MINIMAL_BODY);
    records.extend_from_slice(&record(&MINIMAL_BODY));
    assert_malformed(&records, 2, 1, reason::OFFSET_NOT_INCREASING);
}

#[test]
fn given_offset_delta_past_last_offset_delta_when_decoded_should_be_malformed() {
    let body = [0, 0, 5, 1, 1, 0];
    assert_malformed(&record(&body), 1, 0, reason::OFFSET_PAST_LAST);
}

// ---- builder errors ----

#[test]
fn given_no_record_when_finished_should_be_empty() {
    assert_eq!(BatchBuilder::new().finish(), Err(BatchError::Empty));
}

#[test]
fn given_offset_delta_not_increasing_when_pushed_at_should_fail_and_change_nothing() {
    let mut builder = BatchBuilder::new();
    builder.push_at(5, 0, None, None, &[]).unwrap();
    let len = builder.encoded_len();
    for offset_delta in [5, 4, 0] {
        assert_eq!(
            builder.push_at(offset_delta, 0, None, None, &[]),
            Err(BatchError::OffsetDeltaNotIncreasing {
                previous: 5,
                offset_delta
            })
        );
    }
    assert_eq!((builder.record_count(), builder.encoded_len()), (1, len));
    // Still usable: `push` continues from the last delta.
    builder.push(0, None, None, &[]);
    let batch = Batch::parse(builder.finish().unwrap()).unwrap();
    let offsets: Vec<u64> = batch.records().map(|r| r.unwrap().offset).collect();
    assert_eq!(offsets, vec![5, 6]);
}

#[test]
fn given_push_after_offset_delta_u32_max_when_finished_should_be_offset_delta_overflow() {
    let mut builder = BatchBuilder::new();
    builder.push_at(u32::MAX, 0, None, None, &[]).unwrap();
    builder.push(0, None, None, &[]);
    assert_eq!(
        builder.push_at(1, 0, None, None, &[]),
        Err(BatchError::OffsetDeltaOverflow { previous: u32::MAX })
    );
    assert_eq!(
        builder.finish(),
        Err(BatchError::OffsetDeltaOverflow { previous: u32::MAX })
    );
}

#[test]
fn given_record_over_the_batch_limit_when_pushed_should_be_too_large_at_finish() {
    let value = vec![0u8; BATCH_LEN_MAX as usize];
    let mut builder = BatchBuilder::new();
    builder.push(0, None, Some(b"fits"), &[]);
    builder.push(0, None, Some(&value), &[]);
    // Nothing was written for the rejected record, and later pushes are ignored.
    assert_eq!(builder.record_count(), 1);
    builder.push(0, None, Some(b"ignored"), &[]);
    assert_eq!(builder.record_count(), 1);
    assert!(matches!(
        builder.finish(),
        Err(BatchError::TooLarge { length, max: BATCH_LEN_MAX })
            if length > BATCH_LEN_MAX as usize
    ));
}

#[test]
fn given_more_headers_than_the_limit_when_pushed_should_be_too_many_headers() {
    let headers = vec![("k", &b""[..]); MAX_HEADERS_PER_RECORD as usize + 1];
    let mut builder = BatchBuilder::new();
    assert_eq!(
        builder.push_at(0, 0, None, None, &headers),
        Err(BatchError::TooManyHeaders {
            count: headers.len(),
            max: MAX_HEADERS_PER_RECORD
        })
    );
    assert!(builder.is_empty());
    // Exactly the limit is accepted and decodes.
    builder
        .push_at(
            0,
            0,
            None,
            None,
            &headers[..MAX_HEADERS_PER_RECORD as usize],
        )
        .unwrap();
    let batch = Batch::parse(builder.finish().unwrap()).unwrap();
    let record = batch.records().next().unwrap().unwrap();
    assert_eq!(record.headers.len(), MAX_HEADERS_PER_RECORD as usize);

    let mut builder = BatchBuilder::new();
    builder.push(0, None, None, &headers);
    assert!(matches!(
        builder.finish(),
        Err(BatchError::TooManyHeaders { .. })
    ));
}

#[test]
fn given_last_offset_delta_below_last_record_when_finished_should_fail() {
    let mut builder = BatchBuilder::new();
    builder.push_at(4, 0, None, None, &[]).unwrap();
    assert_eq!(
        builder.last_offset_delta(3).finish(),
        Err(BatchError::LastOffsetDeltaTooSmall {
            last_offset_delta: 3,
            record_offset_delta: 4
        })
    );
}

// ---- Batches ----

#[test]
fn given_concatenated_batches_with_a_truncated_tail_should_yield_each_then_too_short() {
    let first = batch_of(1);
    let mut second = batch_of(3).to_vec();
    stamp_base_offset(&mut second, 1);
    let third = batch_of(2);
    let mut buffer = first.to_vec();
    buffer.extend_from_slice(&second);
    buffer.extend_from_slice(&third[..third.len() - 1]);
    let mut batches = Batches::new(Bytes::from(buffer));

    let batch = batches.next().unwrap().unwrap();
    assert_eq!(batch.as_bytes(), &first);
    let batch = batches.next().unwrap().unwrap();
    assert_eq!(batch.header().base_offset, 1);
    assert_eq!(batch.clone().into_bytes(), Bytes::from(second.clone()));
    assert_eq!(batch.records().count(), 3);
    assert_eq!(
        batches.next().unwrap().unwrap_err(),
        BatchError::TooShort {
            len: third.len() - 1,
            needed: third.len()
        }
    );
    assert!(batches.next().is_none());
    assert_eq!(batches.position(), first.len() + second.len());
}

#[test]
fn given_tail_shorter_than_a_header_should_yield_too_short() {
    let first = batch_of(1);
    let mut buffer = first.to_vec();
    buffer.extend_from_slice(&[0; 10]);
    let results: Vec<_> = Batches::new(Bytes::from(buffer)).collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    assert!(matches!(
        results[1],
        Err(BatchError::TooShort {
            len: 10,
            needed: HEADER_LEN
        })
    ));
}

#[test]
fn given_corrupt_batch_in_the_middle_should_stop_there() {
    let first = batch_of(1);
    let mut second = batch_of(1).to_vec();
    let last = second.len() - 1;
    second[last] ^= 0x80;
    let mut buffer = first.to_vec();
    buffer.extend_from_slice(&second);
    buffer.extend_from_slice(&batch_of(1));
    let mut batches = Batches::new(Bytes::from(buffer));
    assert!(batches.next().unwrap().is_ok());
    assert!(matches!(
        batches.next(),
        Some(Err(BatchError::CrcMismatch { .. }))
    ));
    assert!(batches.next().is_none());
    assert_eq!(batches.position(), first.len());
    assert!(Batches::new(Bytes::new()).next().is_none());
}

// ---- properties ----

#[derive(Debug, Clone)]
struct TestRecord {
    /// Offset slots skipped before this record when pushed with `push_at`.
    gap: u32,
    timestamp: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

fn test_record() -> impl Strategy<Value = TestRecord> {
    (
        0u32..3,
        // Extremes (deltas wrap) and realistic times on both sides of the first record.
        prop_oneof![
            any::<i64>(),
            GOLDEN_TIMESTAMP_MS - 5_000..GOLDEN_TIMESTAMP_MS + 5_000
        ],
        option::of(vec(any::<u8>(), 0..40)),
        option::of(vec(any::<u8>(), 0..300)),
        vec(("\\PC{0,10}", vec(any::<u8>(), 0..20)), 0..4),
    )
        .prop_map(|(gap, timestamp, key, value, headers)| TestRecord {
            gap,
            timestamp,
            key,
            value,
            headers,
        })
}

/// Pushes `records` (with `push`, or with `push_at` leaving their gaps); returns each
/// record's offset delta.
fn push_all(builder: &mut BatchBuilder, records: &[TestRecord], use_gaps: bool) -> Vec<u32> {
    let mut deltas: Vec<u32> = Vec::new();
    for record in records {
        let headers: Vec<(&str, &[u8])> = record
            .headers
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()))
            .collect();
        let (timestamp, key, value) = (
            record.timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
        );
        if use_gaps {
            let delta = deltas
                .last()
                .map_or(record.gap, |last| last + 1 + record.gap);
            builder
                .push_at(delta, timestamp, key, value, &headers)
                .unwrap();
            deltas.push(delta);
        } else {
            builder.push(timestamp, key, value, &headers);
            deltas.push(deltas.len() as u32);
        }
    }
    deltas
}

fn build(records: &[TestRecord], use_gaps: bool) -> Bytes {
    let mut builder = BatchBuilder::new();
    push_all(&mut builder, records, use_gaps);
    builder.finish().unwrap()
}

proptest! {
    #[test]
    fn any_records_should_round_trip_through_builder_and_decoder(
        records in vec(test_record(), 1..30),
        use_gaps in any::<bool>(),
        extra_slots in 0u32..4,
        base_offset in 0u64..(1 << 62),
        producer in (any::<i64>(), any::<i16>(), any::<i32>()),
        control in any::<bool>(),
    ) {
        let mut builder = BatchBuilder::new().producer(producer.0, producer.1, producer.2);
        if control {
            builder = builder.control();
        }
        let deltas = push_all(&mut builder, &records, use_gaps);
        let last_delta = *deltas.last().unwrap();
        let encoded_len = builder.encoded_len();
        prop_assert_eq!(builder.record_count() as usize, records.len());
        let builder = builder.last_offset_delta(last_delta + extra_slots);
        let mut bytes = builder.finish().unwrap().to_vec();
        prop_assert_eq!(bytes.len(), encoded_len);
        stamp_base_offset(&mut bytes, base_offset);

        let batch = Batch::parse(Bytes::from(bytes)).unwrap();
        let header = *batch.header();
        prop_assert_eq!(header.base_offset, base_offset);
        prop_assert_eq!(header.length as usize, encoded_len);
        prop_assert_eq!(header.record_count as usize, records.len());
        prop_assert_eq!(header.last_offset_delta, last_delta + extra_slots);
        prop_assert_eq!(header.next_offset(), base_offset + u64::from(last_delta + extra_slots) + 1);
        prop_assert_eq!(header.first_timestamp, records[0].timestamp);
        prop_assert_eq!(header.max_timestamp, records.iter().map(|r| r.timestamp).max().unwrap());
        prop_assert_eq!((header.producer_id, header.producer_epoch, header.base_sequence), producer);
        prop_assert_eq!(header.is_control(), control);
        prop_assert_eq!(batch.validate_records(), Ok(()));

        let expected: Vec<Record> = records
            .iter()
            .zip(&deltas)
            .map(|(record, delta)| Record {
                offset: base_offset + u64::from(*delta),
                timestamp: record.timestamp,
                key: record.key.clone().map(Bytes::from),
                value: record.value.clone().map(Bytes::from),
                headers: record
                    .headers
                    .iter()
                    .map(|(key, value)| Header { key: key.clone(), value: Bytes::from(value.clone()) })
                    .collect(),
            })
            .collect();
        let decoded: Vec<Record> = batch.records().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn arbitrary_bytes_should_never_panic_the_decoder(bytes in vec(any::<u8>(), 0..600)) {
        let _ = BatchHeader::parse(&bytes);
        let _ = verify(&bytes);
        let _ = compute_crc(&bytes);
        if let Ok(batch) = Batch::parse(Bytes::from(bytes.clone())) {
            let _ = batch.validate_records();
            batch.records().for_each(drop);
        }
        for batch in Batches::new(Bytes::from(bytes)).flatten() {
            batch.records().for_each(drop);
        }
    }

    /// Mutations are resealed with a fresh CRC so they reach the record decoder, which must
    /// neither panic nor disagree with `validate_records`.
    #[test]
    fn mutated_and_resealed_batches_should_decode_or_fail_cleanly(
        records in vec(test_record(), 1..6),
        use_gaps in any::<bool>(),
        mutations in vec((any::<Index>(), any::<u8>()), 1..8),
        new_len in proptest::option::of(any::<Index>()),
    ) {
        let bytes = build(&records, use_gaps);
        let mut bytes = bytes.to_vec();
        if let Some(index) = new_len {
            // Cut or pad the records, keeping the header consistent.
            let len = HEADER_LEN + index.index(bytes.len() + 16 - HEADER_LEN);
            bytes.resize(len, 0);
            bytes[POS_LENGTH..POS_LEADER_EPOCH].copy_from_slice(&(len as u32).to_le_bytes());
        }
        for (index, byte) in mutations {
            let position = CRC_START + index.index(bytes.len() - CRC_START);
            bytes[position] = byte;
        }
        reseal(&mut bytes);
        let concatenated = [bytes.clone(), bytes.clone()].concat();
        if let Ok(batch) = Batch::parse(Bytes::from(bytes)) {
            let decoded: Vec<_> = batch.records().collect();
            match batch.validate_records() {
                Ok(()) => {
                    prop_assert!(decoded.iter().all(Result::is_ok));
                    prop_assert_eq!(decoded.len(), batch.header().record_count as usize);
                }
                Err(error) => prop_assert_eq!(decoded.last(), Some(&Err(error))),
            }
        }
        for batch in Batches::new(Bytes::from(concatenated)).flatten() {
            batch.records().for_each(drop);
        }
    }

    #[test]
    fn any_bit_flip_in_crc_field_or_covered_bytes_should_fail_verify(
        records in vec(test_record(), 1..6),
        bit in any::<Index>(),
    ) {
        let bytes = build(&records, false);
        let mut flipped = bytes.to_vec();
        let first_bit = POS_CRC * 8;
        let bit = first_bit + bit.index(flipped.len() * 8 - first_bit);
        flipped[bit / 8] ^= 1 << (bit % 8);
        let result = verify(&flipped);
        prop_assert!(result.is_err());
        if bit / 8 < CRC_START || bit / 8 >= HEADER_LEN {
            // Nothing else looks at the CRC field or the records: the CRC must catch it.
            prop_assert!(matches!(result, Err(BatchError::CrcMismatch { .. })), "{:?}", result);
        }
    }

    /// The stamped prefix is outside the CRC by design (the broker rewrites it); the broker
    /// checks those fields itself. `verify` still catches a wrong `length` by its header and framing
    /// checks.
    #[test]
    fn bit_flip_in_stamped_prefix_should_not_be_caught_by_the_crc(
        records in vec(test_record(), 1..6),
        bit in 0..STAMPED_PREFIX_LEN * 8,
    ) {
        let bytes = build(&records, false);
        let original = verify(&bytes).unwrap();
        let mut flipped = bytes.to_vec();
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(compute_crc(&flipped), original.crc);
        let result = verify(&flipped);
        if (POS_LENGTH..POS_LEADER_EPOCH).contains(&(bit / 8)) {
            // Caught by the header and framing checks, never by the CRC.
            prop_assert!(result.is_err());
            prop_assert!(!matches!(result, Err(BatchError::CrcMismatch { .. })), "{:?}", result);
        } else {
            let header = result.unwrap();
            prop_assert_ne!(header, original);
            prop_assert_eq!(header.crc, original.crc);
        }
    }
}

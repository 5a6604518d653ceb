//! Hostile or broken requests get a clean status through the real broker binary, and change
//! nothing: batches with attribute bits the broker reserves for itself, zero where a setting
//! must be positive, messages over the size limit, garbage protobuf, and the standard
//! `google.rpc.Status` form of CAS conflict details.

mod common;

use bytes::Bytes;
use common::BrokerProcess;
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

async fn create(client: &mut BrokerClient<Channel>, name: &str, cleanup: v1::CleanupPolicy) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                cleanup_policy: cleanup as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// The partition's next offset to assign.
async fn end_offset(client: &mut BrokerClient<Channel>, topic: &str) -> u64 {
    let described = client
        .describe_topic(v1::DescribeTopicRequest { name: topic.into() })
        .await
        .unwrap()
        .into_inner();
    described.topic.unwrap().partitions[0].log_end_offset
}

/// A keyed one-record batch with the control attribute (bit 4) set, as a hostile client
/// could encode it.
fn control_batch() -> Bytes {
    let mut builder = BatchBuilder::new().control();
    builder.push(1, Some(b"k"), Some(b"v"), &[]);
    builder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_batch_with_control_attribute_when_produced_should_be_invalid_argument_and_append_nothing(
) {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    for (topic, cleanup) in [
        ("stream", v1::CleanupPolicy::Delete),
        ("table", v1::CleanupPolicy::Compact),
    ] {
        create(&mut client, topic, cleanup).await;
        let produce = v1::ProduceRequest {
            topic: topic.into(),
            batch: control_batch(),
            ..Default::default()
        };
        assert_invalid_argument(client.produce(produce).await, "reserved");

        // The same through ProduceStream: that request fails, the stream goes on.
        let requests = tokio_stream::iter([v1::ProduceRequest {
            correlation_id: 7,
            topic: topic.into(),
            batch: control_batch(),
            ..Default::default()
        }]);
        let mut responses = client.produce_stream(requests).await.unwrap().into_inner();
        let response = responses.next().await.unwrap().unwrap();
        assert_eq!(response.correlation_id, 7);
        let error = response.error.expect("the control batch was acknowledged");
        assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");

        assert_eq!(end_offset(&mut client, topic).await, 0, "{topic}: appended");
        if topic == "table" {
            let missing = client
                .get(v1::GetRequest {
                    topic: topic.into(),
                    key: Bytes::from_static(b"k"),
                })
                .await
                .unwrap_err();
            assert_eq!(missing.code(), Code::NotFound);
        }
    }
}

#[test]
fn given_zero_partitions_when_cli_creates_topic_should_fail_naming_the_setting_and_create_nothing()
{
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let syncline = |args: &[&str]| {
        std::process::Command::new(common::binary("syncline"))
            .args(["--broker", &broker.addr])
            .args(args)
            .output()
            .expect("run syncline")
    };
    let refused = syncline(&["topic", "create", "t", "--partitions", "0"]);
    assert!(!refused.status.success(), "--partitions 0 was accepted");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("partitions") && stderr.contains("0 is outside [1, "),
        "{stderr}"
    );
    let listed = syncline(&["topic", "list"]);
    assert!(listed.status.success());
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "");
    // Without the flag the broker's default applies.
    assert!(syncline(&["topic", "create", "t"]).status.success());
}

#[track_caller]
fn assert_invalid_argument<T>(result: Result<T, tonic::Status>, needle: &str) {
    let Err(status) = result else {
        panic!("accepted; expected INVALID_ARGUMENT with `{needle}`");
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(needle),
        "`{needle}` not in {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_explicit_zero_in_a_size_or_count_field_should_be_invalid_argument_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "stream", v1::CleanupPolicy::Delete).await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    let max_bytes = "`max_bytes` 0 is outside [1, ";
    let fetch = v1::FetchRequest {
        topic: "stream".into(),
        max_bytes: Some(0),
        ..Default::default()
    };
    assert_invalid_argument(client.fetch(fetch).await, max_bytes);
    let subscribe = v1::SubscribeRequest {
        max_bytes: Some(0),
        topic: "stream".into(),
        ..Default::default()
    };
    assert_invalid_argument(client.subscribe(subscribe).await, max_bytes);
    let snapshot = v1::SnapshotRequest {
        topic: "table".into(),
        partition: 0,
        max_bytes: Some(0),
    };
    assert_invalid_argument(client.snapshot(snapshot).await, max_bytes);
    let history = v1::HistoryRequest {
        topic: "table".into(),
        key: Bytes::from_static(b"k"),
        limit: Some(0),
    };
    assert_invalid_argument(
        client.history(history).await,
        "`limit` 0 is outside [1, 10000]",
    );
    let join = v1::JoinGroupRequest {
        group: "g".into(),
        topics: vec!["stream".into()],
        session_timeout_ms: Some(0),
        ..Default::default()
    };
    assert_invalid_argument(
        client.join_group(join).await,
        "`session_timeout_ms` 0 is outside [1000, 300000]",
    );
    // Unset still means the default.
    client
        .fetch(v1::FetchRequest {
            topic: "stream".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// `google.rpc.Status` and `google.protobuf.Any`, declared here from their public .proto files
/// so that the test reads the details the way independent tooling does.
mod google_rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_cas_conflict_should_carry_a_standard_google_rpc_status_with_the_conflict_as_any() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    let put = |condition: v1::condition::Expect| v1::ProduceRequest {
        topic: "table".into(),
        records: vec![v1::Record {
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"v")),
            ..Default::default()
        }],
        conditions: vec![v1::Condition {
            key: Bytes::from_static(b"k"),
            expect: Some(condition),
        }],
        ..Default::default()
    };
    client
        .produce(put(v1::condition::Expect::Absent(true)))
        .await
        .unwrap();
    let conflict = client
        .produce(put(v1::condition::Expect::Absent(true)))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition, "{conflict:?}");
    let status = google_rpc::Status::decode(conflict.details()).expect("a google.rpc.Status");
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert_eq!(status.message, conflict.message());
    assert_eq!(status.details.len(), 1, "{status:?}");
    assert_eq!(
        status.details[0].type_url,
        "type.googleapis.com/syncline.v1.CasConflict"
    );
    let detail = v1::CasConflict::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(
        detail.current,
        vec![v1::KeyVersion {
            key: Bytes::from_static(b"k"),
            version: 0,
            absent: false,
        }]
    );
}

/// A codec that sends the request bytes as they are (no protobuf encoding) and returns the
/// response bytes undecoded: a hostile client's view of the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct RawCoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl tonic::codec::Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = bytes::Buf::copy_to_bytes(buf, bytes::Buf::remaining(buf));
        Ok(Some(bytes.to_vec()))
    }
}

/// A gRPC client of `broker` that sends bytes as they are (with [`RawCodec`]).
async fn raw_grpc(broker: &BrokerProcess) -> tonic::client::Grpc<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}

/// Sends `body` as the request message of the unary `method` of syncline.v1.Broker.
async fn raw_unary(broker: &BrokerProcess, method: &str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = raw_grpc(broker).await;
    let path = format!("/syncline.v1.Broker/{method}");
    grpc.unary(
        tonic::Request::new(body),
        path.parse::<tonic::codegen::http::uri::PathAndQuery>()
            .unwrap(),
        RawCodec,
    )
    .await
    .expect_err("the broker accepted a malformed request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_garbage_or_invalid_utf8_request_should_be_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    // Not protobuf at all: a field key whose varint never ends.
    let garbage = raw_unary(&broker, "CreateTopic", vec![0xff; 16]).await;
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    assert!(
        garbage.message().contains("not a valid protobuf message"),
        "{garbage:?}"
    );
    // CreateTopicRequest.name (field 1, a string) holding the bytes ff fe: not UTF-8.
    let not_utf8 = raw_unary(&broker, "CreateTopic", vec![0x0a, 0x02, 0xff, 0xfe]).await;
    assert_eq!(not_utf8.code(), Code::InvalidArgument, "{not_utf8:?}");
    let produce = raw_unary(&broker, "Produce", vec![0x12, 0x01, 0x80]).await;
    assert_eq!(produce.code(), Code::InvalidArgument, "{produce:?}");
    // On ProduceStream the undecodable message ends the stream with the same status.
    let mut grpc = raw_grpc(&broker).await;
    let path = "/syncline.v1.Broker/ProduceStream"
        .parse::<tonic::codegen::http::uri::PathAndQuery>()
        .unwrap();
    let requests = tokio_stream::iter([vec![0xffu8; 16]]);
    let stream = grpc
        .streaming(tonic::Request::new(requests), path, RawCodec)
        .await;
    let status = match stream {
        Err(status) => status,
        Ok(response) => {
            let mut responses = response.into_inner();
            responses
                .next()
                .await
                .expect("the stream ended without a status")
                .expect_err("a garbage message was answered")
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let mut client = broker.client().await;
    let topics = client
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(topics.topics.is_empty(), "{topics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_20_mib_produce_over_the_message_limit_should_be_resource_exhausted_naming_the_limit()
{
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "stream", v1::CleanupPolicy::Delete).await;
    // 20 MiB: over the broker's gRPC message limit (2 x max_batch_bytes 8 MiB + 1 MiB).
    let oversized = || v1::ProduceRequest {
        topic: "stream".into(),
        batch: Bytes::from(vec![0u8; 20 << 20]),
        ..Default::default()
    };
    let refused = client.produce(oversized()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("exceeds the broker's limit of")
            && refused.message().contains("max_batch_bytes (8388608)"),
        "{refused:?}"
    );

    let requests = tokio_stream::iter([oversized()]);
    let mut responses = client.produce_stream(requests).await.unwrap().into_inner();
    let refused = responses.next().await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_batch_bytes"), "{refused:?}");
    assert_eq!(end_offset(&mut client, "stream").await, 0);

    // The broker's own OUT_OF_RANGE (an offset outside the log) is unchanged.
    let range = client
        .fetch(v1::FetchRequest {
            topic: "stream".into(),
            offset: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(range.code(), Code::OutOfRange, "{range:?}");
}

/// Sends `body` as the whole HTTP/2 body of a ProduceStream call, not even framed by gRPC, and
/// returns the call's final status.
async fn raw_produce_stream(broker: &BrokerProcess, body: &'static [u8]) -> tonic::Status {
    use tonic::codegen::{http, Service};
    let mut channel = tonic::transport::Endpoint::from_shared(broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri("/syncline.v1.Broker/ProduceStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(axum::body::Body::from(body)))
        .unwrap();
    let response = channel.call(request).await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    loop {
        let frame = std::future::poll_fn(|cx| {
            http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
        })
        .await;
        match frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    return tonic::Status::from_header_map(trailers).expect("no grpc-status");
                }
            }
            Some(Err(status)) => return status,
            None => panic!("the stream ended without a status"),
        }
    }
}

/// The broker frames ProduceStream itself (`server::produce_wire`): a compressed message (never
/// negotiated) and a stream that ends inside a message are refused with INVALID_ARGUMENT, and
/// a clean end is OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_broken_grpc_framing_on_produce_stream_should_be_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    // Compressed flag 1, one byte of message.
    let compressed = raw_produce_stream(&broker, &[1, 0, 0, 0, 1, 0]).await;
    assert_eq!(compressed.code(), Code::InvalidArgument, "{compressed:?}");
    assert!(
        compressed.message().contains("compressed"),
        "{compressed:?}"
    );
    // A 10-byte message of which 2 bytes arrive before the end of the stream.
    let truncated = raw_produce_stream(&broker, &[0, 0, 0, 0, 10, 8, 1]).await;
    assert_eq!(truncated.code(), Code::InvalidArgument, "{truncated:?}");
    assert!(
        truncated.message().contains("ended inside a message"),
        "{truncated:?}"
    );
    // Half a prefix.
    let prefix = raw_produce_stream(&broker, &[0, 0]).await;
    assert_eq!(prefix.code(), Code::InvalidArgument, "{prefix:?}");
    // No message at all: the call ends with OK.
    let empty = raw_produce_stream(&broker, &[]).await;
    assert_eq!(empty.code(), Code::Ok, "{empty:?}");
    // The broker still serves.
    let mut client = broker.client().await;
    create(&mut client, "after", v1::CleanupPolicy::Delete).await;
    assert_eq!(end_offset(&mut client, "after").await, 0);
}

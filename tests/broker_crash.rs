//! Pins the durability contract of the broker process: every record acknowledged with
//! `ACKS_DURABLE` is readable, unchanged and at its acknowledged offset after the broker is
//! SIGKILLed in the middle of a stream of produces and restarted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::BrokerProcess;
use syncline_proto::batch::{BatchBuilder, Batches};
use syncline_proto::v1;
use tokio_stream::StreamExt;

fn batch_value(sequence: u64) -> Vec<u8> {
    format!("record-{sequence}-").repeat(20).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_broker_killed_mid_stream_when_restarted_should_keep_every_durable_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new(); // offset -> sequence
    let mut sequence = 0u64;
    for round in 0..3 {
        let broker = BrokerProcess::start(dir.path());
        let mut client = broker.client().await;
        if round == 0 {
            client
                .create_topic(v1::CreateTopicRequest {
                    name: "durable".into(),
                    config: Some(v1::TopicConfig {
                        partitions: Some(1),
                        segment_bytes: Some(256 * 1024),
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
        }
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut responses = client
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Keep many produces in flight; the broker is killed while they stream.
        let first = sequence;
        let producer = tokio::spawn(async move {
            let mut sequence = first;
            loop {
                let mut builder = BatchBuilder::new();
                builder.push(1_700_000_000_000, None, Some(&batch_value(sequence)), &[]);
                let request = v1::ProduceRequest {
                    correlation_id: sequence,
                    topic: "durable".into(),
                    partition: 0,
                    acks: v1::Acks::Durable as i32,
                    batch: builder.finish().unwrap(),
                    ..Default::default()
                };
                if tx.send(request).await.is_err() {
                    return sequence;
                }
                sequence += 1;
            }
        });
        let target = 300 + round * 200;
        let mut acks_this_round = 0;
        while let Ok(Some(Ok(response))) =
            tokio::time::timeout(Duration::from_secs(10), responses.next()).await
        {
            assert!(response.error.is_none(), "{:?}", response.error);
            acknowledged.insert(response.base_offset, response.correlation_id);
            acks_this_round += 1;
            if acks_this_round == target {
                broker.kill9();
                break;
            }
        }
        // Acks already on the wire before the kill count as well.
        while let Ok(Some(Ok(response))) =
            tokio::time::timeout(Duration::from_secs(2), responses.next()).await
        {
            if response.error.is_none() {
                acknowledged.insert(response.base_offset, response.correlation_id);
            }
        }
        sequence = producer.await.unwrap() + 1_000_000;
        assert!(
            acks_this_round >= target,
            "round {round}: only {acks_this_round} acks"
        );

        let broker = BrokerProcess::start(dir.path());
        let mut client = broker.client().await;
        let mut stored: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut offset = 0;
        loop {
            let response = client
                .fetch(v1::FetchRequest {
                    topic: "durable".into(),
                    partition: 0,
                    offset,
                    max_bytes: Some(1024 * 1024),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if response.batches.is_empty() {
                break;
            }
            for batch in Batches::new(response.batches) {
                for record in batch.unwrap().records() {
                    let record = record.unwrap();
                    stored.insert(record.offset, record.value.unwrap());
                }
            }
            offset = response.next_offset;
        }
        for (offset, sequence) in &acknowledged {
            let value = stored.get(offset).unwrap_or_else(|| {
                panic!("round {round}: acknowledged offset {offset} is missing")
            });
            assert_eq!(
                &value[..],
                &batch_value(*sequence)[..],
                "round {round}: offset {offset}"
            );
        }
        assert!(broker.stop());
    }
    assert!(acknowledged.len() >= 900);
}

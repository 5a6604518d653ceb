//! Unit tests of the producer's configuration and sequencing (`super`).

use super::*;

#[test]
fn default_config_should_be_valid_and_durable() {
    let config = ProducerConfig::default();
    config.validate().unwrap();
    assert_eq!(config.acks, Acks::Durable);
    assert_eq!(config.delivery_timeout, Duration::from_secs(30));
}

#[test]
fn given_out_of_bounds_config_should_name_the_key() {
    let cases: [(ProducerConfig, &str); 5] = [
        (
            ProducerConfig {
                batch_bytes_max: 10,
                ..Default::default()
            },
            "batch_bytes_max",
        ),
        (
            ProducerConfig {
                in_flight_max: 0,
                ..Default::default()
            },
            "in_flight_max",
        ),
        (
            ProducerConfig {
                buffer_bytes_max: 1000,
                ..Default::default()
            },
            "buffer_bytes_max",
        ),
        (
            ProducerConfig {
                delivery_timeout: Duration::from_millis(1),
                linger: Duration::from_millis(2),
                ..Default::default()
            },
            "delivery_timeout",
        ),
        (
            ProducerConfig {
                retry_backoff: Duration::from_secs(5),
                ..Default::default()
            },
            "retry_backoff",
        ),
    ];
    for (config, expected) in cases {
        let error = config.validate().unwrap_err();
        assert!(
            matches!(error, Error::InvalidConfig { key, .. } if key == expected),
            "{expected}: {error:?}"
        );
    }
}

#[tokio::test]
async fn tracker_should_wait_for_tickets_up_to_the_mark_only() {
    let tracker = Arc::new(Tracker::default());
    assert_eq!(tracker.last_issued(), None);
    let first = tracker.issue();
    let second = tracker.issue();
    let mark = tracker.last_issued().unwrap();
    let later = tracker.issue();
    let waiting = {
        let tracker = tracker.clone();
        tokio::spawn(async move { tracker.wait_through(mark).await })
    };
    drop(second);
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    drop(first);
    // `later` is past the mark: it must not hold the flush.
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    drop(later);
}

#[test]
fn acknowledgement_should_match_partition_and_record_count() {
    let response = |partition, base_offset, last_offset| v1::ProduceResponse {
        correlation_id: 1,
        partition,
        base_offset,
        last_offset,
        error: None,
    };
    assert_eq!(acknowledged("t", 2, 3, &response(2, 10, 12)).unwrap(), 10);
    for bad in [
        response(1, 10, 12),
        response(2, 10, 11),
        response(2, 12, 10),
    ] {
        assert!(matches!(
            acknowledged("t", 2, 3, &bad),
            Err(Error::Protocol(_))
        ));
    }
}

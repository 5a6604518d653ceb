//! Reads a topic from the beginning and prints each record; stops after 2 s without records.
//!
//! ```sh
//! cargo run -p syncline-client --example consumer -- 127.0.0.1:7450 orders
//! ```
//!
//! Arguments: broker address (default 127.0.0.1:7450), topic (default `example`).

use std::time::Duration;

use syncline_client::{Client, ConsumerConfig, OffsetReset, StartOffset};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "127.0.0.1:7450".to_owned());
    let topic = args.next().unwrap_or_else(|| "example".to_owned());

    let client = Client::connect(&broker).await?;
    let config = ConsumerConfig {
        start: StartOffset::Earliest,
        // If retention deletes records while we read, go on from what is left.
        offset_reset: OffsetReset::Earliest,
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer(&topic, config).await?;
    println!("reading partitions {:?}", consumer.assignment());
    while let Ok(Some(record)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await
    {
        let record = record?;
        let key = record.key.as_deref().map(String::from_utf8_lossy);
        let value = record.value.as_deref().map(String::from_utf8_lossy);
        println!(
            "partition {} offset {} key {:?} value {:?} headers {}",
            record.partition,
            record.offset,
            key,
            value,
            record.headers.len()
        );
    }
    for &partition in consumer.assignment() {
        println!(
            "partition {partition}: next offset {:?}",
            consumer.position(partition)
        );
    }
    Ok(())
}

//! Produces keyed records to a topic and prints where each landed.
//!
//! ```sh
//! syncline-broker --data-dir /tmp/syncline --listen 127.0.0.1:7450 &
//! cargo run -p syncline-client --example producer -- 127.0.0.1:7450 orders 100
//! ```
//!
//! Arguments: broker address (default 127.0.0.1:7450), topic (default `example`, created with
//! 3 partitions if missing), number of records (default 10).

use syncline_client::{Client, Code, ProducerConfig, TopicConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "127.0.0.1:7450".to_owned());
    let topic = args.next().unwrap_or_else(|| "example".to_owned());
    let count: u32 = args.next().map_or(Ok(10), |n| n.parse())?;

    let client = Client::connect(&broker).await?;
    match client
        .create_topic(&topic, TopicConfig::with_partitions(3))
        .await
    {
        Ok(_) => println!("created topic {topic}"),
        Err(error) if error.code() == Some(Code::AlreadyExists) => {}
        Err(error) => return Err(error.into()),
    }

    let producer = client.producer(&topic, ProducerConfig::default()).await?;
    // Enqueue everything first so the records share batches, then await the acknowledgements.
    let mut deliveries = Vec::new();
    for i in 0..count {
        let key = format!("customer-{}", i % 5);
        let value = format!("order {i}");
        let delivery = producer
            .enqueue(
                Some(key.as_bytes()),
                Some(value.as_bytes()),
                &[("source", b"example")],
            )
            .await?;
        deliveries.push((key, delivery));
    }
    for (key, delivery) in deliveries {
        let delivery = delivery.await?;
        println!(
            "{key} -> partition {} offset {}",
            delivery.partition, delivery.offset
        );
    }
    producer.close().await;
    Ok(())
}

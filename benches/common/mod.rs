//! Shared by the benchmarks that talk to a broker: an in-process broker (the same code as the
//! `syncline-broker` binary) on ephemeral loopback ports, with a connected gRPC client.

use syncline_broker::config::Config;
use syncline_broker::server::Broker;
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

/// A runtime, a client of a broker served on it, and the broker's data dir (deleted on drop).
pub struct Setup {
    pub runtime: tokio::runtime::Runtime,
    pub client: BrokerClient<Channel>,
    pub _dir: tempfile::TempDir,
}

/// Starts a broker over a fresh temp dir (same disk as the project, not a tmpfs).
#[allow(dead_code)] // Benches that need broker settings use `setup_with` only.
pub fn setup(prefix: &str) -> Setup {
    setup_with(prefix, |_| {})
}

/// Like [`setup`], with broker settings changed by `configure` (the data dir and the listen
/// addresses are set before it runs; leave them alone).
pub fn setup_with(prefix: &str, configure: impl FnOnce(&mut Config)) -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen_explicit: true,
        ..Config::default()
    };
    configure(&mut config);
    let client = runtime.block_on(async {
        let broker = Broker::start(config).await.expect("broker");
        let url = format!("http://{}", broker.local_addr());
        tokio::spawn(broker.serve(std::future::pending()));
        BrokerClient::connect(url)
            .await
            .expect("connect")
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    });
    Setup {
        runtime,
        client,
        _dir: dir,
    }
}

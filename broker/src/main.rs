//! `syncline-broker`: the broker binary.

use clap::Parser;
use syncline_broker::config::{Config, Flags};
use syncline_broker::server::Broker;
use tracing_subscriber::EnvFilter;

/// glibc's allocator, told to keep batch-sized buffers. The HTTP/2 read buffer of a produce
/// stream is regrown for every batch (1 MiB by default), above glibc's default mmap threshold:
/// each was a fresh mapping, faulted in and zeroed page by page, then unmapped (page faults,
/// `clear_page` and `munmap` were ~7% of the broker's CPU with 1 KiB records). Served from the
/// heap instead, and the heap not trimmed below 256 MiB of free space, freed buffers are
/// reused. (mimalloc saved as much CPU but tripled the p99 of produce latency at a steady rate:
/// BENCHMARKS.md "Ahead of Iggy".)
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a SIGTERM that arrives right after `listening on` (as soon as a
/// supervisor or test sees the broker ready) must stop it cleanly, not kill it by the default
/// action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let installed = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        match installed {
            (Ok(mut interrupt), Ok(mut terminate)) => tokio::select! {
                _ = interrupt.recv() => tracing::info!("received SIGINT"),
                _ = terminate.recv() => tracing::info!("received SIGTERM"),
            },
            (interrupt, terminate) => {
                let error = interrupt.err().or(terminate.err());
                tracing::warn!(
                    ?error,
                    "cannot listen for SIGINT/SIGTERM; stop the broker with SIGKILL"
                );
                std::future::pending::<()>().await;
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let flags = Flags::parse();
    let config = match Config::load(flags) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // Partitions hold a descriptor each; the registry checks they fit when it opens them.
    syncline_broker::descriptors::raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        tracing::info!(data_dir = %config.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "starting syncline-broker");
        // Before anything can log `listening on`.
        let signal = shutdown_signal();
        let broker = Broker::start(config).await?;
        broker.serve(signal).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Once, as the same `error:` line a bad setting gets (the log goes to stderr too,
            // so a log line as well would print it twice).
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `ztunnel` binary: parses its configuration, sets up logging, and runs [`trellis_ztunnel::app::run`].

use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

fn main() -> anyhow::Result<()> {
    // One malloc arena per worker thread would keep megabytes of idle heap resident; the data
    // path allocates little, so two arenas are plenty. The tunnels allocate and free 16-256 KiB
    // buffers all the time: with glibc's defaults each free hands the pages back to the kernel
    // (trim, munmap) and the next allocation faults them in again, tens of thousands of page
    // faults a second under load. Keep up to a few MiB of freed heap, and take buffers below
    // 1 MiB from the heap rather than from mmap.
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let initial = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let log: trellis_ztunnel::app::LogControl = Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    let config = trellis_ztunnel::config::Config::parse();
    tracing::info!(?config, "ztunnel starting");
    // Every socket costs a descriptor: take all the kernel allows before listening.
    match trellis_identity::limits::raise_nofile_limit() {
        Ok(nofile) => tracing::info!(nofile, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
    // The control tasks and the QUIC server run here; the TCP data plane runs on
    // `--worker-threads` shards of its own (trellis_ztunnel::shard).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(trellis_ztunnel::app::run(config, log))
}

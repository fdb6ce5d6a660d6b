//! The data plane runs as shards: `--worker-threads` threads, each with a single-threaded tokio
//! runtime and its own listening sockets on the capture and HBONE ports (`SO_REUSEPORT`, so the
//! kernel spreads new connections over them), and its own HBONE connection pool. A connection
//! is accepted, tunnelled and finished on one thread: the task reading the client's socket and
//! the task driving the pooled HTTP/2 connection it rides wake each other without crossing
//! threads. On a multi-threaded work-stealing runtime every such wake-up was a cross-thread
//! notification (an `eventfd` write, a futex, a context switch); measured on the data-plane
//! bench, sharding carries more 1 KiB round trips per second for less CPU (bench/README.md,
//! "The HTTP/2 speed-up"). Everything else (config, certificates, policy state, metrics,
//! ejections, the drain) is shared, as before.
//!
//! The control tasks (config stream, certificates, capture, admin) and the QUIC server run on
//! the main runtime, outside any shard.

use std::cell::Cell;
use std::net::SocketAddr;

use anyhow::Context;

/// Most shards: more threads than this buy nothing on any node we run on.
pub const MAX: usize = 64;

thread_local! {
    /// 0 outside the shards; 1..=MAX on a shard's thread.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// The slot of the current thread: 0 on the main runtime, `i + 1` on shard `i`. Anything
/// kept per shard (the connection pools) is indexed by it.
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// Binds `count` TCP listeners to `addr` with `SO_REUSEPORT`, one per shard. A port held by
/// another process fails here, as a plain bind would.
pub fn bind_all(addr: SocketAddr, count: usize, what: &str) -> anyhow::Result<Vec<std::net::TcpListener>> {
    (0..count)
        .map(|_| {
            use socket2::{Domain, Socket, Type};
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(std::net::TcpListener::from(socket))
        })
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

/// Starts shard `index` on a thread of its own: a single-threaded runtime running `serve`. The
/// process exits if the runtime cannot be built or `serve` fails: a shard gone would silently
/// refuse a share of the node's connections.
pub fn spawn<F, Fut>(index: usize, serve: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    std::thread::Builder::new()
        .name(format!("shard-{index}"))
        .spawn(move || {
            SLOT.with(|s| s.set(index + 1));
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the shard's runtime")
                .and_then(|runtime| runtime.block_on(serve()));
            if let Err(e) = outcome {
                tracing::error!(
                    shard = index,
                    error = format!("{e:#}"),
                    "data-plane shard failed; exiting"
                );
                std::process::exit(1);
            }
        })
        .context("starting a data-plane shard thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_listens_on_the_same_port_and_another_process_cannot_take_it() {
        let first = bind_all("127.0.0.1:0".parse().unwrap(), 1, "test").unwrap();
        let addr = first[0].local_addr().unwrap();
        drop(first);
        let all = bind_all(addr, 3, "test").unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|l| l.local_addr().unwrap() == addr));

        // A plain bind (no SO_REUSEPORT) of the same port fails, and so does our own bind
        // while a plain socket holds a port.
        assert!(std::net::TcpListener::bind(addr).is_err());
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_all(plain.local_addr().unwrap(), 2, "HBONE").unwrap_err();
        assert!(format!("{err:#}").contains("binding the HBONE listener"), "{err:#}");
    }

    #[test]
    fn a_shard_thread_has_its_own_slot() {
        assert_eq!(slot(), 0);
        let (tx, rx) = std::sync::mpsc::channel();
        spawn(4, move || async move {
            tx.send(slot()).unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap(), 5);
    }
}

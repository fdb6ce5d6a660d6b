//! netbench: the data-plane benchmark's load tool, one server and four clients over plain TCP.
//!
//! The server picks the mode from the first byte of each connection:
//! - `T` throughput: read and discard until EOF, answer the byte count (8 bytes, big-endian), close;
//! - `L` latency and ping-pong: read 1024 bytes, write 1024 bytes back, until EOF;
//! - `C` connection rate: the request is 64 bytes in all (the `C` included), the answer 64 bytes,
//!   then the server closes (so the server, not the client, holds the TIME_WAIT).
//!
//! Each client prints one JSON object on stdout. Blocking sockets and threads throughout: it adds
//! as little as possible to what is measured.
//!
//! `relay` is the yardstick for a proxy: it forwards every connection it accepts to `--to` with
//! `splice(2)` through a pipe, so the bytes never enter user space and nothing is encrypted. Two
//! relays in a row cost what any two-hop proxy must cost at least (three TCP connections instead
//! of one), and nothing more.
//!
//! ```sh
//! netbench server --listen 0.0.0.0:9000
//! netbench throughput --to 10.1.2.10:9000 --seconds 10
//! netbench latency --to 10.1.2.10:9000 --count 20000 --warmup 1000
//! netbench connrate --to 10.1.2.10:9000 --seconds 10 --workers 4
//! netbench pingpong --to 10.1.2.10:9000 --seconds 10 --connections 16
//! netbench relay --listen 10.1.0.11:15101 --to 10.1.0.12:15102
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use trellis_bench::percentile;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The throughput client's write size.
const WRITE_SIZE: usize = 128 * 1024;
/// One latency or ping-pong round's request and response size.
const ROUND_SIZE: usize = 1024;
/// The connection-rate request and response size.
const CONN_SIZE: usize = 64;
/// How long a client waits to connect, and for any one read, before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for a connection's first byte.
const MODE_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads accepting connections; each serves `C` connections itself.
const ACCEPTORS: usize = 4;

#[derive(Debug, Parser)]
#[command(name = "netbench", about = "TCP load for the data-plane benchmark")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Serve every mode on one port.
    Server {
        #[arg(long, default_value = "0.0.0.0:9000")]
        listen: SocketAddr,
    },
    /// One connection, 128 KiB writes for --seconds; prints {"bytes","seconds","gbps"}.
    Throughput {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// One connection, 1 KiB request/response rounds; prints {"count","p50_us","p99_us","mean_us"}.
    Latency {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
    },
    /// Workers each looping connect, 64 B request, 64 B response, close; prints
    /// {"connections","seconds","per_second","errors"}.
    Connrate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// Connections each looping 1 KiB request, 1 KiB response for --seconds, side by side; prints
    /// {"connections","seconds","round_trips","per_second","errors","p50_us","p99_us","fewest","most"}
    /// (round-trip times over all connections; the fewest and most rounds one connection did).
    Pingpong {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// Forward every accepted connection to --to, zero-copy (splice), one thread per direction.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Server { listen } => serve(listen),
        Mode::Throughput { to, seconds } => throughput(to, Duration::from_secs(seconds)),
        Mode::Latency { to, count, warmup } => latency(to, count, warmup),
        Mode::Connrate { to, seconds, workers } => connrate(to, Duration::from_secs(seconds), workers),
        Mode::Pingpong {
            to,
            seconds,
            connections,
        } => pingpong(to, Duration::from_secs(seconds), connections),
        Mode::Relay { listen, to } => relay(listen, to),
    }
}

fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    for _ in 1..ACCEPTORS {
        let listener = listener.try_clone().context("sharing the listener")?;
        std::thread::spawn(move || accept_loop(listener));
    }
    accept_loop(listener)
}

/// Accepts for ever; `C` connections are served here (they are short), the others on a thread.
fn accept_loop(listener: TcpListener) -> ! {
    loop {
        let (mut tcp, _) = match listener.accept() {
            Ok(c) => c,
            // Out of file descriptors, a connection reset while queued: keep serving.
            Err(e) => {
                eprintln!("netbench server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut mode = [0u8; 1];
        let first = tcp
            .set_nodelay(true)
            .and_then(|()| tcp.set_read_timeout(Some(MODE_TIMEOUT)))
            .and_then(|()| tcp.read_exact(&mut mode));
        if first.is_err() {
            continue; // a readiness probe, or a client that went away
        }
        let _ = tcp.set_read_timeout(None);
        match mode[0] {
            b'C' => {
                let _ = serve_connrate(tcp);
            }
            b'T' => {
                std::thread::spawn(move || serve_throughput(tcp));
            }
            b'L' => {
                std::thread::spawn(move || serve_latency(tcp));
            }
            other => eprintln!("netbench server: unknown mode byte {other:#04x}"),
        }
    }
}

fn serve_throughput(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    tcp.write_all(&total.to_be_bytes())
}

fn serve_latency(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; ROUND_SIZE];
    loop {
        match tcp.read_exact(&mut buf) {
            Ok(()) => tcp.write_all(&buf)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn serve_connrate(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; CONN_SIZE];
    tcp.set_read_timeout(Some(MODE_TIMEOUT))?;
    tcp.read_exact(&mut buf[1..])?;
    tcp.write_all(&buf)?;
    tcp.shutdown(Shutdown::Both)
}

/// A client connection: TCP_NODELAY, and reads that give up after [`IO_TIMEOUT`].
fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connecting to {to}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(tcp)
}

fn throughput(to: SocketAddr, run: Duration) -> anyhow::Result<()> {
    let mut tcp = connect(to)?;
    let chunk = vec![0x5a_u8; WRITE_SIZE];
    let started = Instant::now();
    tcp.write_all(b"T").context("sending the mode")?;
    while started.elapsed() < run {
        tcp.write_all(&chunk).with_context(|| format!("sending to {to}"))?;
    }
    tcp.shutdown(Shutdown::Write).context("closing the sending side")?;
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count)
        .with_context(|| format!("reading the byte count from {to}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = u64::from_be_bytes(count);
    let gbps = bytes as f64 * 8.0 / seconds / 1e9;
    println!(r#"{{"bytes":{bytes},"seconds":{seconds:.3},"gbps":{gbps:.3}}}"#);
    Ok(())
}

fn latency(to: SocketAddr, count: usize, warmup: usize) -> anyhow::Result<()> {
    anyhow::ensure!(count > 0, "--count must be at least 1");
    let mut tcp = connect(to)?;
    tcp.write_all(b"L").context("sending the mode")?;
    let request = [0xa5_u8; ROUND_SIZE];
    let mut response = [0u8; ROUND_SIZE];
    let mut rounds = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t0 = Instant::now();
        tcp.write_all(&request)
            .with_context(|| format!("round {i}: sending to {to}"))?;
        tcp.read_exact(&mut response)
            .with_context(|| format!("round {i}: reading from {to}"))?;
        if i >= warmup {
            rounds.push(t0.elapsed());
        }
    }
    rounds.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = rounds.iter().map(|d| us(*d)).sum::<f64>() / rounds.len() as f64;
    println!(
        r#"{{"count":{count},"p50_us":{:.1},"p99_us":{:.1},"mean_us":{mean:.1}}}"#,
        us(percentile(&rounds, 0.50)),
        us(percentile(&rounds, 0.99)),
    );
    Ok(())
}

fn connrate(to: SocketAddr, run: Duration, workers: usize) -> anyhow::Result<()> {
    anyhow::ensure!(workers > 0, "--workers must be at least 1");
    let done = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut request = [0u8; CONN_SIZE];
                request[0] = b'C';
                while started.elapsed() < run {
                    match one_connection(to, &request) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                            // Do not spin on a refusing peer.
                            std::thread::sleep(Duration::from_millis(1));
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let connections = done.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    if let Ok(Some(e)) = first_error.lock().as_deref() {
        eprintln!("netbench connrate: {errors} errors, the first: {e}");
    }
    println!(
        r#"{{"connections":{connections},"seconds":{seconds:.3},"per_second":{:.1},"errors":{errors}}}"#,
        connections as f64 / seconds
    );
    Ok(())
}

/// Connect, send the 64-byte request, read the 64-byte answer, wait for the server's close.
fn one_connection(to: SocketAddr, request: &[u8; CONN_SIZE]) -> anyhow::Result<()> {
    let mut tcp = connect(to)?;
    tcp.write_all(request).context("sending the request")?;
    let mut response = [0u8; CONN_SIZE + 1];
    tcp.read_exact(&mut response[..CONN_SIZE])
        .context("reading the response")?;
    // Waiting for the server's FIN leaves the TIME_WAIT with the server, not with the client,
    // whose ephemeral ports would otherwise run out within seconds.
    let extra = tcp.read(&mut response[CONN_SIZE..]).context("waiting for the close")?;
    anyhow::ensure!(extra == 0, "the server sent more than {CONN_SIZE} bytes");
    Ok(())
}

fn pingpong(to: SocketAddr, run: Duration, connections: usize) -> anyhow::Result<()> {
    anyhow::ensure!(connections > 0, "--connections must be at least 1");
    let round_trips = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let started = Instant::now();
    let per_connection: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..connections)
            .map(|_| {
                s.spawn(|| {
                    let mut rounds = Vec::new();
                    // A connection that fails is counted and opened again, until the run ends.
                    while started.elapsed() < run {
                        if let Err(e) = rounds_until(to, started + run, &round_trips, &mut rounds) {
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                            errors.fetch_add(1, Ordering::Relaxed);
                            // Do not spin on a refusing peer.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    rounds
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_default()).collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let round_trips = round_trips.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    if let Ok(Some(e)) = first_error.lock().as_deref() {
        eprintln!("netbench pingpong: {errors} errors, the first: {e}");
    }
    // Starvation shows as one connection doing far fewer rounds than the others.
    let fewest = per_connection.iter().map(Vec::len).min().unwrap_or(0);
    let most = per_connection.iter().map(Vec::len).max().unwrap_or(0);
    let mut all: Vec<Duration> = per_connection.into_iter().flatten().collect();
    all.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (p50, p99) = if all.is_empty() {
        (0.0, 0.0)
    } else {
        (us(percentile(&all, 0.50)), us(percentile(&all, 0.99)))
    };
    println!(
        r#"{{"connections":{connections},"seconds":{seconds:.3},"round_trips":{round_trips},"per_second":{:.1},"errors":{errors},"p50_us":{p50:.1},"p99_us":{p99:.1},"fewest":{fewest},"most":{most}}}"#,
        round_trips as f64 / seconds
    );
    Ok(())
}

/// One connection in the `L` mode, doing 1 KiB rounds until `deadline`; each round is added to
/// `round_trips` and its time to `rounds` as it completes, so a connection that fails keeps the
/// rounds it did.
fn rounds_until(
    to: SocketAddr,
    deadline: Instant,
    round_trips: &AtomicU64,
    rounds: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let mut tcp = connect(to)?;
    tcp.write_all(b"L").context("sending the mode")?;
    let request = [0xa5_u8; ROUND_SIZE];
    let mut response = [0u8; ROUND_SIZE];
    while Instant::now() < deadline {
        let t0 = Instant::now();
        tcp.write_all(&request).with_context(|| format!("sending to {to}"))?;
        tcp.read_exact(&mut response)
            .with_context(|| format!("reading from {to}"))?;
        rounds.push(t0.elapsed());
        round_trips.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn relay(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    loop {
        let (client, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("netbench relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let upstream = match TcpStream::connect_timeout(&to, IO_TIMEOUT) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("netbench relay: connecting to {to}: {e}");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        for (from, into) in [(&client, &upstream), (&upstream, &client)] {
            let (from, into) = match (from.try_clone(), into.try_clone()) {
                (Ok(from), Ok(into)) => (from, into),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("netbench relay: {e}");
                    break;
                }
            };
            std::thread::spawn(move || {
                if let Err(e) = splice_all(&from, &into) {
                    eprintln!("netbench relay: {e}");
                }
                let _ = into.shutdown(Shutdown::Write);
            });
        }
    }
}

/// Moves everything `from` sends into `into` through a pipe, until EOF; the bytes stay in the
/// kernel.
fn splice_all(from: &TcpStream, into: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const CHUNK: usize = 1 << 20;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on a pipe we own; a refusal only leaves the default 64 KiB pipe.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    let splice = |from: i32, into: i32, len: usize| {
        // SAFETY: both are open descriptors for the duration of the call; no offsets are used.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                into,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    };
    loop {
        let mut queued = match splice(from.as_raw_fd(), wr.as_raw_fd(), CHUNK) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while queued > 0 {
            match splice(rd.as_raw_fd(), into.as_raw_fd(), queued) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => queued -= n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of loopback sockets: (client, server).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, listener.accept().unwrap().0)
    }

    #[test]
    fn splice_all_delivers_every_byte_in_order_then_the_end() {
        let (mut sender, relay_in) = pair();
        let (relay_out, mut receiver) = pair();
        let relay = std::thread::spawn(move || {
            let result = splice_all(&relay_in, &relay_out);
            relay_out.shutdown(Shutdown::Write).unwrap();
            result
        });
        // More than the pipe holds, so the relay has to go round its loop.
        let sent: Vec<u8> = (0..3 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                sender.write_all(&sent).unwrap();
                sender.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut received = Vec::new();
        receiver.read_to_end(&mut received).unwrap();
        writer.join().unwrap();
        relay.join().unwrap().unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "the relayed bytes differ from the sent ones");
    }
}

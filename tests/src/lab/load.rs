//! New connections from inside a pod, as a client that never reuses one: each is a fresh TCP
//! connect, one HTTP/1.1 GET and its answer, timed. [`Load`] opens them at a fixed rate whatever
//! the answers take (an open loop, so a stalled connection does not hold back the next);
//! [`calls`] and [`calls_for`] make them as fast as they are answered.
//!
//! The sockets are opened by threads that entered the pod's network namespace (`setns`), so no
//! process is started per connection and a connection's time is the network's, not `fork`'s.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one connection may take, connect to last byte, before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection: when it was due (for [`Load`]), when it opened and ended, and the body of its
/// 200 answer or why there was none.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub due: Instant,
    pub start: Instant,
    pub end: Instant,
    pub result: Result<String, String>,
}

impl Outcome {
    /// The version of the demo server that answered (`east` in
    /// `hello from hello-e1 (east) to 10.1.1.10:40000, received 0 bytes`).
    pub fn version(&self) -> Option<&str> {
        self.result.as_deref().ok().and_then(served_version)
    }

    pub fn took(&self) -> Duration {
        self.end.saturating_duration_since(self.start)
    }

    /// Whether the connection was open at some moment between `from` and `to`.
    pub fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.start <= to && self.end >= from
    }
}

/// The version in a demo server's answer: `hello from <name> (<version>) to ...`.
pub fn served_version(body: &str) -> Option<&str> {
    let rest = body.strip_prefix("hello from ")?;
    let (_, rest) = rest.split_once(" (")?;
    rest.split_once(')').map(|(version, _)| version)
}

/// One HTTP/1.1 `GET path` on a fresh TCP connection to `to`, from the calling thread's network
/// namespace: the body of a 200 answer, or why there is none (refused, reset, closed early,
/// another status, nothing within `timeout`).
pub fn http_get(to: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    use std::io::{ErrorKind, Read, Write};
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connecting to {to}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| format!("setting a write timeout: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the request to {to}: {e}"))?;
    let mut answer: Vec<u8> = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(done) = parse_answer(&answer, false) {
            return done;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete answer from {to} within {} ms ({} bytes came)",
                timeout.as_millis(),
                answer.len()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("setting a read timeout: {e}"))?;
        match stream.read(&mut buf) {
            Ok(0) => {
                return parse_answer(&answer, true)
                    .unwrap_or_else(|| Err(format!("{to} closed the connection after {} bytes", answer.len())))
            }
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "reading the answer from {to}: {e} (after {} bytes)",
                    answer.len()
                ))
            }
        }
    }
}

/// The outcome of `answer` once it holds a whole response (by its `content-length`, or up to
/// the end of the connection when `eof`); `None` while more must come.
fn parse_answer(answer: &[u8], eof: bool) -> Option<Result<String, String>> {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return eof.then(|| {
            Err(format!(
                "the connection ended inside the answer's head ({} bytes)",
                answer.len()
            ))
        });
    };
    let status = head.lines().next().unwrap_or_default();
    let length = head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse::<usize>().ok()
        } else {
            None
        }
    });
    let complete = match length {
        Some(n) => body.len() >= n,
        None => eof,
    };
    if !complete {
        return eof.then(|| Err(format!("the connection ended inside the body ({} bytes)", body.len())));
    }
    if status.split_whitespace().nth(1) != Some("200") {
        return Some(Err(format!("answered {status:?}")));
    }
    Some(Ok(body.to_string()))
}

/// Moves the calling thread into network namespace `ns`: the sockets it opens from then on are
/// that namespace's.
pub fn enter_netns(ns: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    // SAFETY: `file` is an open namespace file for the whole call; setns moves only this thread.
    let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if entered != 0 {
        return Err(format!("entering {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// New connections from a pod at a fixed rate, until stopped (or dropped).
///
/// Connection `i` is due at `i / rate` seconds after the start and opens then as long as one of
/// the worker threads is free; there are enough of them for every connection of the last 750 ms
/// to be open at once, so one that waits for a timeout does not delay the ones after it. A
/// connection that opened late shows it in `start - due`.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
}

impl Load {
    /// Starts opening `per_second` connections a second to `to` from network namespace `netns`.
    /// Panics if a worker cannot enter the namespace.
    pub fn start(netns: &str, to: SocketAddr, per_second: u32) -> Load {
        let per_second = per_second.max(1);
        let count = (per_second as usize * 3 / 4).max(8);
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        // A little ahead, so that the workers are in the namespace when the first is due.
        let epoch = Instant::now() + Duration::from_millis(100);
        let mut load = Load {
            stop: stop.clone(),
            workers: Vec::with_capacity(count),
            outcomes: outcomes.clone(),
        };
        for w in 0..count {
            let (ns, stop, next, outcomes, ready) = (
                netns.to_string(),
                stop.clone(),
                next.clone(),
                outcomes.clone(),
                ready_tx.clone(),
            );
            let worker = std::thread::Builder::new()
                .name(format!("load-{w}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let entered = enter_netns(&ns);
                    let ok = entered.is_ok();
                    let _ = ready.send(entered);
                    if !ok {
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let due = epoch + Duration::from_secs_f64(i as f64 / f64::from(per_second));
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            // Pacing: this connection is not due yet.
                            std::thread::sleep(wait);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let start = Instant::now();
                        let result = http_get(to, "/", CALL_TIMEOUT);
                        let end = Instant::now();
                        lock(&outcomes).push(Outcome {
                            due,
                            start,
                            end,
                            result,
                        });
                    }
                })
                .expect("starting a load thread");
            load.workers.push(worker);
        }
        drop(ready_tx);
        for _ in 0..count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("a load thread could not enter {netns}: {e}"),
                Err(_) => panic!("a load thread ended before entering {netns}"),
            }
        }
        load
    }

    /// The connections that ended so far, in the order they opened.
    pub fn outcomes(&self) -> Vec<Outcome> {
        let mut all = lock(&self.outcomes).clone();
        all.sort_by_key(|o| o.start);
        all
    }

    /// How many connections opened at or after `since` have ended.
    pub fn ended_since(&self, since: Instant) -> usize {
        lock(&self.outcomes).iter().filter(|o| o.start >= since).count()
    }

    /// Stops opening connections, waits for the open ones to end, and returns every connection
    /// in the order they opened.
    pub fn stop(mut self) -> Vec<Outcome> {
        self.halt();
        let mut all = std::mem::take(&mut *lock(&self.outcomes));
        all.sort_by_key(|o| o.start);
        all
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `count` connections from network namespace `netns` to `to`, by `workers` threads each
/// opening the next as soon as its last one ended; in the order they opened.
pub fn calls(netns: &str, to: SocketAddr, count: usize, workers: usize) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                if let Err(e) = enter_netns(netns) {
                    panic!("{e}");
                }
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let start = Instant::now();
                    let result = http_get(to, "/", CALL_TIMEOUT);
                    lock(&outcomes).push(Outcome {
                        due: start,
                        start,
                        end: Instant::now(),
                        result,
                    });
                }
            });
        }
    });
    let mut all = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    all.sort_by_key(|o| o.start);
    all
}

/// Connections one after the other from network namespace `netns` to `to` for `window`.
pub fn calls_for(netns: &str, to: SocketAddr, window: Duration) -> Vec<Outcome> {
    crate::in_netns(netns, || {
        let until = Instant::now() + window;
        let mut all = Vec::new();
        while Instant::now() < until {
            let start = Instant::now();
            let result = http_get(to, "/", CALL_TIMEOUT);
            all.push(Outcome {
                due: start,
                start,
                end: Instant::now(),
                result,
            });
        }
        all
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_version_is_read_from_the_demo_answer() {
        let body = "hello from hello-e1 (east) to 10.1.1.10:40000, received 0 bytes\n";
        assert_eq!(served_version(body), Some("east"));
        assert_eq!(served_version("something else"), None);
    }

    #[test]
    fn an_answer_is_complete_by_its_length_or_at_the_end_of_the_connection() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_answer(ok, false), Some(Ok("hello".to_string())));
        assert_eq!(parse_answer(&ok[..ok.len() - 1], false), None);
        assert!(parse_answer(&ok[..ok.len() - 1], true).is_some_and(|r| r.is_err()));
        let unsized_body = b"HTTP/1.1 200 OK\r\n\r\nhello";
        assert_eq!(parse_answer(unsized_body, false), None);
        assert_eq!(parse_answer(unsized_body, true), Some(Ok("hello".to_string())));
        let refused = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert!(parse_answer(refused, false).is_some_and(|r| r.unwrap_err().contains("503")));
        assert_eq!(parse_answer(b"HTTP/1.1 200", false), None);
        assert!(parse_answer(b"", true).is_some_and(|r| r.is_err()));
    }
}

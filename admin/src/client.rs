//! The other side of [`serve_routes`](crate::serve_routes): one HTTP/1.1 GET on a fresh
//! connection, with a deadline, for whoever reads an admin endpoint (`trellis status`, the lab's
//! readiness and metrics probes, the benchmarks, the tests). hyper does the HTTP; this module
//! only connects, bounds the time and the body, and says what went wrong.
//!
//! The socket is opened by the task that calls [`get`] (by the calling thread for
//! [`get_blocking`]), so a thread that entered a network namespace reaches addresses inside it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest response body read, in bytes: a whole model's config dump fits.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a GET has no answer.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("{path:?} is not a request path")]
    BadPath { path: String },
    #[error("GET http://{addr}{path}: {}", reason(.source))]
    Http {
        addr: SocketAddr,
        path: String,
        source: hyper::Error,
    },
    #[error("GET http://{addr}{path}: the body is larger than {MAX_BODY} bytes")]
    TooLarge { addr: SocketAddr, path: String },
    #[error("GET http://{addr}{path}: no answer within {} ms", .after.as_millis())]
    Timeout {
        addr: SocketAddr,
        path: String,
        after: Duration,
    },
    #[error("cannot start an I/O runtime for the request: {0}")]
    Runtime(io::Error),
}

/// GETs `path` from `addr` on a new connection: the status code and the body (invalid UTF-8
/// replaced). Connecting, sending and reading the whole body must fit in `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), GetError> {
    match tokio::time::timeout(timeout, exchange(addr, path)).await {
        Ok(answer) => answer,
        Err(_) => Err(GetError::Timeout {
            addr,
            path: path.to_string(),
            after: timeout,
        }),
    }
}

/// [`get`] for synchronous code: runs on the calling thread with a runtime of its own. Must not
/// be called from inside a tokio runtime (use [`get`] there).
pub fn get_blocking(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), GetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(GetError::Runtime)?;
    runtime.block_on(get(addr, path, timeout))
}

async fn exchange(addr: SocketAddr, path: &str) -> Result<(u16, String), GetError> {
    let http = |source| GetError::Http {
        addr,
        path: path.to_string(),
        source,
    };
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|_| GetError::BadPath { path: path.to_string() })?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| GetError::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    let answer = async move {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                // The only other error `Limited` yields over a hyper body.
                Err(_) => GetError::TooLarge {
                    addr,
                    path: path.to_string(),
                },
            })?;
        // Dropping the sender lets the connection task finish.
        drop(sender);
        Ok((status, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
    };
    // The connection is driven here, not spawned: no runtime-wide task outlives the call.
    let (answer, _closed) = tokio::join!(answer, connection);
    answer
}

/// hyper's message, with the I/O error under it when there is one ("connection reset by peer").
fn reason(e: &hyper::Error) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return format!("{e}: {io}");
        }
        source = s.source();
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use hyper::StatusCode;
    use tokio::net::TcpListener;

    use super::*;

    /// A raw HTTP server on a thread: reads one request, writes `answer`, closes.
    fn raw_server(answer: &'static [u8]) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            // Read the whole request: closing with unread bytes would reset the connection.
            while !request.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let _ = s.write_all(answer);
        });
        addr
    }

    #[tokio::test]
    async fn a_get_reads_the_status_and_body_served_by_serve_routes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let route: crate::Route = Arc::new(|_, path, query| match path {
            "/status" => (StatusCode::OK, "text/plain", format!("ok {query:?}")),
            _ => (StatusCode::NOT_FOUND, "text/plain", "no".into()),
        });
        let server = tokio::spawn(crate::serve_routes(listener, route));
        let timeout = Duration::from_secs(5);
        assert_eq!(
            get(addr, "/status?x=1", timeout).await.unwrap(),
            (200, "ok Some(\"x=1\")".to_string())
        );
        assert_eq!(get(addr, "/nope", timeout).await.unwrap(), (404, "no".to_string()));
        server.abort();
    }

    #[test]
    fn chunked_bodies_are_decoded_and_blocking_callers_get_the_same_answer() {
        let addr = raw_server(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n",
        );
        let answer = get_blocking(addr, "/healthz/ready", Duration::from_secs(5)).unwrap();
        assert_eq!(answer, (503, "hello, world".to_string()));
    }

    #[test]
    fn a_closed_port_is_a_connect_error_naming_the_address() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = get_blocking(addr, "/", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, GetError::Connect { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!("cannot connect to {addr}: ")),
            "{err}"
        );
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let err = get_blocking(addr, "/metrics", Duration::from_millis(200)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("GET http://{addr}/metrics: no answer within 200 ms")
        );
        drop(listener);
    }

    #[test]
    fn an_answer_that_is_not_http_is_an_error() {
        let addr = raw_server(b"SSH-2.0-OpenSSH\r\n\r\n");
        let err = get_blocking(addr, "/", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, GetError::Http { .. }), "{err}");
    }
}

//! `trellis demo`: the lab's demo application (plain HTTP/1.1 over TCP, hyper on tokio).
//!
//! - `server` answers every request with who it is and who called it, so a caller sees which
//!   version served it and the source address it arrived from;
//! - `call` makes one request on a fresh connection and exits 0 only on 200;
//! - `client` calls in a loop and prints one line per call.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The demo application the lab's pods run.
#[derive(Debug, Subcommand)]
pub enum Demo {
    /// Answer every request with 200 and
    /// `hello from <name> (<version>) to <peer-ip>:<peer-port>, received <n> bytes`.
    Server {
        /// The name it answers with (the lab passes the pod's name).
        #[arg(long)]
        name: String,
        /// The version it answers with.
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
    /// Make one request on a fresh TCP connection; print the body and exit 0 on 200, print a
    /// one-line error and exit 1 otherwise.
    Call(CallArgs),
    /// Call in a loop forever, printing `<unix-ms> ok <status> <body>` or
    /// `<unix-ms> error <reason>` per call.
    Client {
        #[command(flatten)]
        call: CallArgs,
        /// Time between the starts of two calls.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
}

/// One call's parameters.
#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// http://<host>[:<port>]/<path>
    #[arg(long)]
    url: String,
    /// POST this many bytes of 'x' instead of a GET.
    #[arg(long)]
    send_bytes: Option<usize>,
    /// Give up on a call after this long (connect, request and response).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// Runs a demo verb to completion (the server and the client run until killed).
pub fn run(verb: Demo) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match verb {
            Demo::Server { name, version, listen } => match TcpListener::bind(listen).await {
                Ok(listener) => {
                    eprintln!("demo server {name} ({version}) listening on {listen}");
                    serve(listener, name, version).await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("trellis demo server: cannot listen on {listen}: {e}");
                    ExitCode::FAILURE
                }
            },
            Demo::Call(args) => match call(&args).await {
                Ok((200, body)) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Ok((status, body)) => {
                    eprintln!("call {}: status {status}: {}", args.url, one_line(&body));
                    ExitCode::FAILURE
                }
                Err(reason) => {
                    eprintln!("call {}: {reason}", args.url);
                    ExitCode::FAILURE
                }
            },
            Demo::Client {
                call: args,
                interval_ms,
            } => {
                let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match call(&args).await {
                        Ok((status, body)) => println!("{} ok {status} {}", unix_ms(), one_line(&body)),
                        Err(reason) => println!("{} error {reason}", unix_ms()),
                    }
                }
            }
        }
    })
}

/// Serves the demo answer on `listener` until the process ends.
pub async fn serve(listener: TcpListener, name: String, version: String) {
    let id = Arc::new((name, version));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = id.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, peer, id.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("{} connection from {peer}: {e}", unix_ms());
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    id: Arc<(String, String)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (name, version) = (&id.0, &id.1);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut body = req.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received += frame.data_ref().map_or(0, |d| d.len()),
            Err(e) => {
                eprintln!("{} {method} {path} from {peer}: reading the body: {e}", unix_ms());
                break;
            }
        }
    }
    let (ip, port) = (peer.ip().to_canonical(), peer.port());
    eprintln!(
        "{} {method} {path} from {ip}:{port}, received {received} bytes",
        unix_ms()
    );
    let text = format!("hello from {name} ({version}) to {ip}:{port}, received {received} bytes\n");
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// One request on a fresh connection: the status and the body, or why there is none.
pub async fn call(args: &CallArgs) -> Result<(u16, String), String> {
    let timeout = Duration::from_millis(args.timeout_ms);
    match tokio::time::timeout(timeout, call_once(args)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {} ms", args.timeout_ms)),
    }
}

async fn call_once(args: &CallArgs) -> Result<(u16, String), String> {
    let uri: http::Uri = args.url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let host = uri.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port)).await.map_err(|e| io_reason(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| hyper_reason(&e))?;
    let driver = tokio::spawn(conn);
    let (method, body) = match args.send_bytes {
        Some(n) => (http::Method::POST, Bytes::from(vec![b'x'; n])),
        None => (http::Method::GET, Bytes::new()),
    };
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| hyper_reason(&e))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| hyper_reason(&e))?;
        Ok((status, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
    }
    .await;
    driver.abort();
    result
}

/// A short reason for an I/O error: `connection refused`, `connection reset`, ...
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        TimedOut => "timed out".into(),
        NetworkUnreachable => "network unreachable".into(),
        HostUnreachable => "host unreachable".into(),
        UnexpectedEof | BrokenPipe => "connection closed".into(),
        _ => e.to_string(),
    }
}

/// A short reason for a hyper error, naming the I/O error under it when there is one.
fn hyper_reason(e: &hyper::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io_reason(io);
        }
        source = s.source();
    }
    // hyper says "canceled" when the connection closed before the request was even sent, and
    // "incomplete message" when it closed mid-response: for the caller both are a close with
    // no response.
    if e.is_incomplete_message() || e.is_canceled() {
        return "connection closed before the response".into();
    }
    e.to_string()
}

fn one_line(body: &str) -> String {
    body.trim().replace(['\r', '\n'], " ")
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: String, send_bytes: Option<usize>) -> CallArgs {
        CallArgs {
            url,
            send_bytes,
            timeout_ms: 5000,
        }
    }

    #[tokio::test]
    async fn the_server_names_itself_the_caller_and_the_bytes_received() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, "hello-v1".into(), "v1".into()));
        let (status, body) = call(&args(format!("http://{addr}/x"), Some(1234))).await.unwrap();
        assert_eq!(status, 200);
        let prefix = "hello from hello-v1 (v1) to 127.0.0.1:";
        assert!(body.starts_with(prefix), "{body}");
        assert!(body.ends_with(", received 1234 bytes\n"), "{body}");
        let (_, body) = call(&args(format!("http://{addr}/"), None)).await.unwrap();
        assert!(body.ends_with(", received 0 bytes\n"), "{body}");
    }

    #[tokio::test]
    async fn a_call_to_a_closed_port_says_connection_refused() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let err = call(&args(format!("http://{addr}/"), None)).await.unwrap_err();
        assert_eq!(err, "connection refused");
    }

    #[tokio::test]
    async fn a_server_that_resets_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let std = s.into_std().unwrap();
            // SO_LINGER 0: close sends a reset.
            socket_linger_zero(&std);
            drop(std);
        });
        let err = call(&args(format!("http://{addr}/"), None)).await.unwrap_err();
        assert!(err.starts_with("connection"), "{err}");
    }

    fn socket_linger_zero(s: &std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut a = args(format!("http://{addr}/"), None);
        a.timeout_ms = 200;
        let err = call(&a).await.unwrap_err();
        assert_eq!(err, "timed out after 200 ms");
        drop(listener);
    }
}

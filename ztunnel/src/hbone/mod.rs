//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams inside TLS 1.3 mutual authentication
//! (DESIGN.md, Data plane). [`pool`] is the client side with connection pooling, [`server`]
//! the 15008 listener, [`copy`] the byte pump both share. [`tunnel`] says what a tunnel is
//! whatever carries it, so that HTTP/3 over QUIC can sit beside [`http2`], the one transport
//! so far.
//!
//! A tunnel connection is dialled to the destination's *node*, which hosts many workloads with
//! different identities. The client names the identity it expects in SNI, as a hash of the
//! SPIFFE ID ([`sni_for`]), so the server knows which workload certificate to present before
//! any HTTP/2 frame arrives; the hash keeps the identity itself out of the cleartext
//! ClientHello.

pub mod copy;
pub mod expiry;
pub mod h3wire;
pub mod http2;
pub mod http3;
pub mod idle;
pub mod nested;
pub mod pool;
pub mod server;
pub mod tunnel;

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use trellis_identity::SpiffeId;

/// The HBONE port (DESIGN.md).
pub const PORT: u16 = 15008;
/// Most concurrent tunnels on one HTTP/2 connection; the pool opens another beyond that, the
/// server refuses the excess with REFUSED_STREAM.
pub const MAX_STREAMS: u32 = 100;
/// Per-stream and per-connection flow-control windows: big enough for one stream to fill a
/// fast link without waiting on WINDOW_UPDATEs.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame either side accepts.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Largest header block accepted: a CONNECT carries a handful of short headers.
pub const MAX_HEADERS: u32 = 16 * 1024;
/// How long a TCP connect (to a node or a pod) may take before the endpoint counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TLS handshake plus the HTTP/2 preface may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/2 connection with no tunnel for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many encrypted bytes rustls may queue before a write waits for the socket (its default
/// is 64 KiB). Room for a whole [`MAX_FRAME`] DATA frame lets one `writev` carry it, so the
/// kernel builds full-size segments instead of one per 16 KiB record batch.
pub const TLS_BUFFER_LIMIT: usize = 2 * MAX_FRAME as usize;

/// The firewall mark on every socket ztunnel opens, so that host-mode capture lets them pass.
pub const SOCKET_MARK: u32 = 0x7472_0001;

/// The SNI that asks a node for the certificate of `id`.
pub fn sni_for(id: &SpiffeId) -> String {
    let digest = Sha256::digest(id.to_string().as_bytes());
    format!("{}.hbone.trellis", hex::encode(&digest[..16]))
}

/// The `forwarded` header value naming the original client.
pub fn forwarded_for(src: SocketAddr) -> String {
    format!("for=\"{src}\"")
}

/// The `baggage` header value describing the source workload (W3C baggage, Istio's keys).
pub fn baggage(cluster: &str, namespace: &str, workload: &str) -> String {
    format!("k8s.cluster.name={cluster},k8s.namespace.name={namespace},k8s.workload.name={workload}")
}

/// The baggage keys that name the source workload, in order of preference: Trellis's own, then
/// the OpenTelemetry semantic conventions' workload kinds that other HBONE peers send (Istio's
/// ztunnel sends `k8s.deployment.name` and its siblings), then the pod's own name.
pub const WORKLOAD_KEYS: [&str; 8] = [
    "k8s.workload.name",
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.cronjob.name",
    "k8s.job.name",
    "k8s.replicaset.name",
    "k8s.pod.name",
];

/// Parses a `baggage` header (W3C Baggage: `key=value;properties`, comma separated, values
/// percent-encoded) into (cluster, namespace, workload), ignoring unknown keys and entries that
/// do not parse. The workload is named by the most preferred of [`WORKLOAD_KEYS`] present.
pub fn parse_baggage(value: &str) -> (String, String, String) {
    let (mut cluster, mut namespace) = (String::new(), String::new());
    let mut workload: Option<(usize, String)> = None;
    for item in value.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        let v = v.split(';').next().unwrap_or_default().trim();
        if v.len() > 253 {
            continue;
        }
        let Ok(v) = percent_encoding::percent_decode_str(v).decode_utf8() else {
            continue;
        };
        match k.trim() {
            "k8s.cluster.name" => cluster = v.into_owned(),
            "k8s.namespace.name" => namespace = v.into_owned(),
            k => {
                if let Some(rank) = WORKLOAD_KEYS.iter().position(|w| *w == k) {
                    if workload.as_ref().is_none_or(|(best, _)| rank < *best) {
                        workload = Some((rank, v.into_owned()));
                    }
                }
            }
        }
    }
    (cluster, namespace, workload.map(|(_, w)| w).unwrap_or_default())
}

/// Reads the original destination of a connection from `peer`, redirected by nftables. The
/// peer's address family is the socket's, which spares a `getsockname` per connection.
pub fn original_dst(tcp: &tokio::net::TcpStream, peer: SocketAddr) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match peer {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// Marks `socket` with [`SOCKET_MARK`]; needs CAP_NET_ADMIN, so failure is only logged once.
pub fn mark(socket: &tokio::net::TcpSocket) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = socket2::SockRef::from(socket).set_mark(SOCKET_MARK) {
        WARNED.call_once(|| tracing::warn!(error = %e, "cannot mark sockets (host-mode capture needs CAP_NET_ADMIN)"));
    }
}

/// Dials `addr` with the mark set and Nagle off, within [`CONNECT_TIMEOUT`].
pub async fn dial(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    mark(&socket);
    socket.set_nodelay(true)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_is_a_stable_dns_name_per_identity() {
        let a = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
        let b = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        assert_eq!(sni_for(&a), sni_for(&a.clone()));
        assert_ne!(sni_for(&a), sni_for(&b));
        assert!(rustls::pki_types::ServerName::try_from(sni_for(&a)).is_ok());
        assert!(
            !sni_for(&a).contains("shop"),
            "the identity stays out of the ClientHello"
        );
    }

    #[test]
    fn baggage_names_the_workload_under_every_standard_key() {
        let istio = "k8s.cluster.name=Kubernetes,k8s.namespace.name=mesh,k8s.deployment.name=cli,service.name=cli,service.version=v1";
        assert_eq!(parse_baggage(istio), ("Kubernetes".into(), "mesh".into(), "cli".into()));
        assert_eq!(parse_baggage("k8s.statefulset.name=db").2, "db");
        assert_eq!(
            parse_baggage("k8s.pod.name=db-0,k8s.statefulset.name=db").2,
            "db",
            "the workload kind wins over the pod"
        );
        assert_eq!(
            parse_baggage("k8s.deployment.name=a,k8s.workload.name=b").2,
            "b",
            "Trellis's own key wins"
        );
        assert_eq!(
            parse_baggage("k8s.deployment.name=we%20b").2,
            "we b",
            "values are percent-decoded"
        );
        assert_eq!(
            parse_baggage("k8s.deployment.name=%ff%fe").2,
            "",
            "not UTF-8 once decoded: ignored"
        );
    }

    #[test]
    fn baggage_round_trips_and_ignores_junk() {
        let value = baggage("east", "shop", "web-1");
        assert_eq!(parse_baggage(&value), ("east".into(), "shop".into(), "web-1".into()));
        assert_eq!(
            parse_baggage("garbage,,=x,k8s.namespace.name=a;prop"),
            (String::new(), "a".into(), String::new())
        );
    }
}

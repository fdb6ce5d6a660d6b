//! What the HBONE tests on loopback share: SPIFFE IDs, a real CA per trust domain, SVIDs
//! issued by it, and an echo server standing in for a workload.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use trellis_identity::{CertManager, CertificateAuthority, IssuancePolicy, ManagerConfig, SpiffeId, TrustDomain};

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A CA of its own, in a temporary directory removed with it.
pub struct Ca {
    _dir: tempfile::TempDir,
    pub ca: Arc<CertificateAuthority>,
}

pub fn ca(td: &str) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        CertificateAuthority::load_or_create(dir.path(), &TrustDomain::new(td).unwrap(), IssuancePolicy::default())
            .unwrap();
    Ca {
        _dir: dir,
        ca: Arc::new(ca),
    }
}

/// A certificate manager holding an SVID of `ca` for each of `ids`.
pub async fn certs_for(ca: &Ca, ids: &[&str]) -> CertManager {
    let certs = CertManager::new(ca.ca.clone(), ManagerConfig::default());
    for s in ids {
        certs.ensure(&id(s));
        certs.wait_for(&id(s), Duration::from_secs(5)).await.expect("SVID");
    }
    certs
}

/// An echo server on loopback (the workload).
pub async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

//! SPIFFE federation in real TLS 1.3 handshakes on loopback: each peer's chain is checked
//! against its own trust domain's bundle, and the verified SPIFFE ID comes out.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_identity::tls::{client_config, provider, server_config};
use trellis_identity::verify::{peer_id, ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CertManager, SpiffeId};

/// A fixed certificate for rustls.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// An SVID of `cluster` for `id`, issued by its real CA.
async fn svid(cluster: &Cluster, id: &SpiffeId) -> Arc<Fixed> {
    let manager = CertManager::new(cluster.ca.clone(), Default::default());
    manager.ensure(id);
    let held = manager.wait_for(id, Duration::from_secs(5)).await.unwrap();
    Arc::new(Fixed(held.certified_key()))
}

/// A leaf signed by `cluster`'s CA key with arbitrary SANs and validity: what a broken or
/// malicious issuer could produce.
fn crafted(cluster: &Cluster, sans: Vec<SanType>, not_before: SystemTime, not_after: SystemTime) -> Arc<Fixed> {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(cluster.dir.path().join("ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_der(&cluster.ca.roots()[0], ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "crafted");
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider().key_provider.load_private_key(der).unwrap();
    Arc::new(Fixed(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signing,
    ))))
}

struct Outcome {
    client: Result<Option<SpiffeId>, String>,
    server: Result<Option<SpiffeId>, String>,
}

/// One handshake over loopback TCP; each side reports the peer ID it verified or its error.
async fn handshake(
    server_cert: Arc<Fixed>,
    server_trusts: BundleSet,
    client_cert: Arc<Fixed>,
    client_trusts: BundleSet,
    client_expects: ExpectedPeer,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_cfg = server_config(server_cert, SpiffeClientVerifier::new(server_trusts, ExpectedPeer::Any)).unwrap();
    let client_cfg = client_config(
        SpiffeServerVerifier::new(client_trusts, client_expects),
        Some(client_cert),
    )
    .unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg))
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer_id(tls.get_ref().1))
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("trellis.invalid").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer_id(tls.get_ref().1))
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    Outcome { client, server }
}

async fn federation() -> (Cluster, Cluster, BundleSet) {
    let east = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let west = Cluster::start("west.trellis.local", Default::default(), allow_all()).await;
    let both = BundleSet::new();
    both.upsert(east.bundle());
    both.upsert(west.bundle());
    (east, west, both)
}

#[tokio::test]
async fn federated_peers_verify_each_other_and_learn_the_peer_id() {
    let (east, west, both) = federation().await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let cart = id("spiffe://west.trellis.local/ns/shop/sa/cart");
    let out = handshake(
        svid(&west, &cart).await,
        both.clone(),
        svid(&east, &web).await,
        both,
        ExpectedPeer::Exact(cart.clone()),
    )
    .await;
    assert_eq!(out.client.unwrap(), Some(cart));
    assert_eq!(out.server.unwrap(), Some(web));
}

#[tokio::test]
async fn a_peer_from_an_unknown_trust_domain_is_refused() {
    let (east, west, _) = federation().await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let cart = id("spiffe://west.trellis.local/ns/shop/sa/cart");
    let out = handshake(
        svid(&west, &cart).await,
        west.bundles(),
        svid(&east, &web).await,
        east.bundles(),
        ExpectedPeer::Any,
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        err.contains("west.trellis.local") && err.contains("not trusted"),
        "{err}"
    );
}

#[tokio::test]
async fn a_chain_checked_against_another_domains_roots_is_refused() {
    // west's bundle filed under east's name must not let west's certificates pass as east.
    let (east, west, _) = federation().await;
    let impostor_bundles = BundleSet::with(trellis_identity::TrustBundle::new(
        east.td.clone(),
        west.ca.roots().to_vec(),
    ));
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let out = handshake(
        svid(&east, &web).await,
        east.bundles(),
        svid(&east, &web).await,
        impostor_bundles,
        ExpectedPeer::Any,
    )
    .await;
    assert!(out.client.unwrap_err().contains("UnknownIssuer"));
}

#[tokio::test]
async fn the_wrong_server_identity_is_refused() {
    let (east, _west, both) = federation().await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let admin = id("spiffe://east.trellis.local/ns/shop/sa/admin");
    let out = handshake(
        svid(&east, &admin).await,
        both.clone(),
        svid(&east, &web).await,
        both,
        ExpectedPeer::Exact(web),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        err.contains("expected spiffe://east.trellis.local/ns/shop/sa/web"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_two_uri_and_non_spiffe_certificates_are_refused() {
    let east = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let web = "spiffe://east.trellis.local/ns/shop/sa/web";
    let cases = [
        (
            "expired",
            crafted(&east, vec![uri(web)], now - 2 * hour, now - hour),
            "Expired",
        ),
        (
            "not yet valid",
            crafted(&east, vec![uri(web)], now + hour, now + 2 * hour),
            "NotValidYet",
        ),
        (
            "two URI SANs",
            crafted(
                &east,
                vec![uri(web), uri("spiffe://east.trellis.local/ns/x/sa/y")],
                now - hour,
                now + hour,
            ),
            "2 URI SANs",
        ),
        (
            "no SPIFFE SAN",
            crafted(
                &east,
                vec![SanType::DnsName("web.shop".try_into().unwrap())],
                now - hour,
                now + hour,
            ),
            "no SPIFFE ID",
        ),
        (
            "non-SPIFFE URI",
            crafted(&east, vec![uri("https://web.shop/")], now - hour, now + hour),
            "not a SPIFFE ID",
        ),
    ];
    let good_client = svid(&east, &id(web)).await;
    for (what, cert, reason) in cases {
        let out = handshake(
            cert.clone(),
            east.bundles(),
            good_client.clone(),
            east.bundles(),
            ExpectedPeer::Any,
        )
        .await;
        let err = out.client.expect_err(what);
        assert!(err.contains(reason), "{what}: {err}");
        // The same certificate as a client certificate is refused by the server.
        let out = handshake(
            good_client.clone(),
            east.bundles(),
            cert,
            east.bundles(),
            ExpectedPeer::Any,
        )
        .await;
        assert!(out.server.is_err(), "{what} as client");
    }
}

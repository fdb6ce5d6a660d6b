//! The certificate chain a TLS peer presents (HBONE on 15008, the CA and config-stream gRPC):
//! what rustls hands Trellis's verifiers, `SpiffeClientVerifier::verify_client_cert` and
//! `SpiffeServerVerifier::verify_server_cert` (the leaf's SPIFFE ID, then the chain against the
//! bundle of its trust domain), and `svid::leaf_info`, which reads the leaf's expiry.
//!
//! Input: chunks of two little-endian length bytes and a DER certificate, the leaf first
//! (`trellis_fuzz::encode_chunks` writes the same layout).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use trellis_fuzz::{Input, TRUST_DOMAIN};
use trellis_identity::svid::leaf_info;
use trellis_identity::verify::{ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CertificateAuthority, IssuancePolicy, TrustBundle, TrustDomain};

/// Verifiers trusting one fresh CA (its directory removed once loaded).
fn verifiers() -> &'static (Arc<SpiffeClientVerifier>, Arc<SpiffeServerVerifier>) {
    static VERIFIERS: OnceLock<(Arc<SpiffeClientVerifier>, Arc<SpiffeServerVerifier>)> = OnceLock::new();
    VERIFIERS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trellis-fuzz-peer-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::new(TRUST_DOMAIN).expect("a valid trust domain");
        let ca = CertificateAuthority::load_or_create(&dir, &td, IssuancePolicy::default());
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ca.expect("a fresh CA");
        let bundles = BundleSet::with(TrustBundle::new(td, ca.roots().to_vec()));
        (
            SpiffeClientVerifier::new(bundles.clone(), ExpectedPeer::Any),
            SpiffeServerVerifier::new(bundles, ExpectedPeer::Any),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let leaf = CertificateDer::from(input.chunk());
    let mut intermediates = Vec::new();
    while !input.is_empty() && intermediates.len() < 8 {
        intermediates.push(CertificateDer::from(input.chunk()));
    }
    let _ = leaf_info(&leaf);
    let (client, server) = verifiers();
    let now = UnixTime::now();
    let _ = client.verify_client_cert(&leaf, &intermediates, now);
    let name = ServerName::try_from("x.hbone.trellis").expect("a DNS name");
    let _ = server.verify_server_cert(&leaf, &intermediates, &name, &[], now);
});

//! The CA side of issuance: a node's `SignRequest` (SPIFFE ID, CSR, TTL) through
//! `SpiffeId::parse`, `csr::validate_csr` and `CertificateAuthority::sign`.
//!
//! Input (see `trellis_fuzz::csr_input`): flags, TTL (8 bytes), the requested ID (one length
//! byte; empty means `spiffe://east.trellis.local/ns/shop/sa/web`), then the CSR. With flag
//! `SIGN_BODY` the CSR bytes are a CertificationRequestInfo that the target signs with a fixed
//! Ed25519 key, so mutations of a request carrying that key get past the signature check and
//! reach the SAN and key checks, and signing.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use trellis_fuzz::{csr_input, signed_csr, Input, CSR_ID, TRUST_DOMAIN};
use trellis_identity::csr::validate_csr;
use trellis_identity::{CertificateAuthority, IssuancePolicy, SpiffeId, TrustDomain};

/// The CA, made once in a temporary directory that is removed as soon as it is loaded.
fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trellis-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::new(TRUST_DOMAIN).expect("a valid trust domain");
        let ca = CertificateAuthority::load_or_create(&dir, &td, IssuancePolicy::default());
        let _ = std::fs::remove_dir_all(&dir);
        ca.expect("a fresh CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let ttl = Duration::from_secs(input.u64());
    let requested = input.short();
    let id = if requested.is_empty() {
        SpiffeId::parse(CSR_ID).expect("a valid ID")
    } else {
        let Ok(text) = std::str::from_utf8(requested) else {
            return;
        };
        match SpiffeId::parse(text) {
            Ok(id) => id,
            Err(_) => return,
        }
    };
    let body = input.rest();
    let csr = if flags & csr_input::SIGN_BODY != 0 {
        signed_csr(body)
    } else {
        body.to_vec()
    };
    let _ = validate_csr(&csr, &id);
    let _ = ca().sign(&csr, &id, ttl);
});

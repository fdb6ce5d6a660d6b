//! SPIFFE trust bundles (JWKS documents) from a federated peer: `TrustBundle::from_json`.
//!
//! Input: the first byte picks the mode. Even: the rest is the bundle document. Odd: the rest
//! is a certificate (DER) that the target publishes with `TrustBundle::to_json`, as trellisd
//! does with its roots, and reads back: fuzzing the certificate and key parsing behind both
//! directions, past the JSON and base64 layers a mutated document seldom gets through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_identity::{TrustBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let td = TrustDomain::new(trellis_fuzz::TRUST_DOMAIN).expect("a valid trust domain");
    if mode & 1 == 0 {
        let _ = TrustBundle::from_json(td, rest);
    } else {
        let published = TrustBundle::new(td.clone(), vec![rest.to_vec().into()]).to_json();
        let _ = TrustBundle::from_json(td, published.as_bytes());
    }
});

//! Checks on certificate signing requests before the CA signs anything.
//!
//! A CSR is accepted only when it is small, well-formed, self-signed by the key it carries, and
//! names exactly one SAN: a URI equal to the SPIFFE ID being requested.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::id::SpiffeId;

/// Largest CSR the CA reads, in bytes (PEM or DER). A P-256 CSR is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why a CSR was refused. Every variant is the caller's fault (gRPC `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is {0} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error("the CSR is empty")]
    Empty,
    #[error("the CSR looks like PEM but does not decode: {0}")]
    Pem(String),
    #[error("the PEM block is {0:?}; expected CERTIFICATE REQUEST")]
    PemTag(String),
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    Parse(String),
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("the CSR has no subject alternative name; it must name {0} as its only URI SAN")]
    NoSan(String),
    #[error("the CSR carries a non-URI SAN ({0}); an SVID has only its SPIFFE ID")]
    NonUriSan(String),
    #[error("the CSR has {0} URI SANs; an SVID has exactly one")]
    ExtraSan(usize),
    #[error("the CSR's URI SAN {0:?} is not a valid SPIFFE ID")]
    NotSpiffe(String),
    #[error("the CSR names {found} but the request is for {requested}")]
    Mismatch { requested: String, found: String },
    #[error("the CSR's key type is not supported ({0}); use ECDSA P-256/P-384, Ed25519 or RSA")]
    UnsupportedKey(String),
}

/// A CSR that passed every check: what the CA needs to sign it.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    /// The requester's SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
}

/// Decodes PEM (`CERTIFICATE REQUEST`) or takes DER as is.
fn to_der(bytes: &[u8]) -> Result<Vec<u8>, CsrError> {
    let trimmed = bytes.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let block = pem::parse(trimmed).map_err(|e| CsrError::Pem(e.to_string()))?;
        if block.tag() != "CERTIFICATE REQUEST" && block.tag() != "NEW CERTIFICATE REQUEST" {
            return Err(CsrError::PemTag(block.tag().to_string()));
        }
        Ok(block.into_contents())
    } else {
        Ok(bytes.to_vec())
    }
}

/// Validates `bytes` (PEM or DER) as a CSR for exactly `expected`.
pub fn validate_csr(bytes: &[u8], expected: &SpiffeId) -> Result<ValidCsr, CsrError> {
    if bytes.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() {
        return Err(CsrError::Empty);
    }
    let der = to_der(bytes)?;
    let csr = match X509CertificationRequest::from_der(&der) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(CsrError::Parse("trailing bytes after the request".into())),
        Err(e) => return Err(CsrError::Parse(e.to_string())),
    };
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    other => return Err(CsrError::NonUriSan(other.to_string())),
                }
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(CsrError::NoSan(expected.to_string())),
        [one] => one,
        many => return Err(CsrError::ExtraSan(many.len())),
    };
    let found = SpiffeId::parse(uri).map_err(|_| CsrError::NotSpiffe(uri.clone()))?;
    if &found != expected {
        return Err(CsrError::Mismatch {
            requested: expected.to_string(),
            found: found.to_string(),
        });
    }

    let spki = &csr.certification_request_info.subject_pki;
    let public_key_der = spki.raw.to_vec();
    rcgen::SubjectPublicKeyInfo::from_der(&public_key_der)
        .map_err(|e| CsrError::UnsupportedKey(format!("{} ({e})", spki.algorithm.algorithm)))?;
    Ok(ValidCsr { public_key_der })
}

/// Builds a PEM CSR for `id` with a fresh ECDSA P-256 key: what a node sends to the CA.
/// Returns the CSR (PEM) and the key (PKCS#8 DER).
pub fn new_csr(id: &SpiffeId) -> Result<(String, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_der()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn csr_with(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_csr_for_the_requested_id_is_accepted() {
        let want = id("spiffe://td/ns/shop/sa/web");
        let (pem, _key) = new_csr(&want).unwrap();
        assert!(validate_csr(pem.as_bytes(), &want).is_ok());
        let der = pem::parse(&pem).unwrap().into_contents();
        assert!(validate_csr(&der, &want).is_ok(), "DER works too");
    }

    #[test]
    fn a_csr_naming_another_identity_is_a_mismatch() {
        let pem = csr_with(vec![uri("spiffe://td/ns/shop/sa/admin")]);
        let err = validate_csr(pem.as_bytes(), &id("spiffe://td/ns/shop/sa/web")).unwrap_err();
        assert!(matches!(err, CsrError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn extra_or_foreign_sans_are_refused() {
        let want = id("spiffe://td/ns/shop/sa/web");
        let two = csr_with(vec![uri(&want.to_string()), uri("spiffe://td/ns/x/sa/y")]);
        assert_eq!(validate_csr(two.as_bytes(), &want).unwrap_err(), CsrError::ExtraSan(2));
        let dns = csr_with(vec![
            uri(&want.to_string()),
            SanType::DnsName("web.shop".try_into().unwrap()),
        ]);
        assert!(matches!(
            validate_csr(dns.as_bytes(), &want),
            Err(CsrError::NonUriSan(_))
        ));
        let https = csr_with(vec![uri("https://td/ns/shop/sa/web")]);
        assert!(matches!(
            validate_csr(https.as_bytes(), &want),
            Err(CsrError::NotSpiffe(_))
        ));
        let none = csr_with(vec![]);
        assert!(matches!(validate_csr(none.as_bytes(), &want), Err(CsrError::NoSan(_))));
    }

    #[test]
    fn garbage_oversized_and_tampered_csrs_are_refused() {
        let want = id("spiffe://td/ns/shop/sa/web");
        assert!(matches!(validate_csr(b"hello", &want), Err(CsrError::Parse(_))));
        assert_eq!(validate_csr(b"", &want).unwrap_err(), CsrError::Empty);
        let big = vec![0u8; MAX_CSR_BYTES + 1];
        assert_eq!(
            validate_csr(&big, &want).unwrap_err(),
            CsrError::TooLarge(MAX_CSR_BYTES + 1)
        );
        let (pem, _) = new_csr(&want).unwrap();
        let mut der = pem::parse(&pem).unwrap().into_contents();
        let last = der.len() - 1;
        der[last] ^= 0x01; // flip a bit of the signature
        assert_eq!(validate_csr(&der, &want).unwrap_err(), CsrError::BadSignature);
        let cert_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            validate_csr(cert_pem.as_bytes(), &want),
            Err(CsrError::PemTag(_))
        ));
    }
}

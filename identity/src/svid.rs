//! X.509-SVIDs: a certificate chain whose leaf carries exactly one SPIFFE ID as its URI SAN,
//! and the private key that goes with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::id::{IdError, SpiffeId};

/// Why a certificate is not a usable X.509-SVID.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("the certificate has no SPIFFE ID (no URI SAN)")]
    NoSpiffeId,
    #[error("the certificate has {0} URI SANs; an SVID has exactly one")]
    SeveralUris(usize),
    #[error("the certificate's URI SAN is not a SPIFFE ID: {0}")]
    BadId(#[from] IdError),
    #[error("the chain is empty")]
    EmptyChain,
}

/// Facts read off a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Parses a DER certificate, insisting on no trailing bytes.
pub fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Parse("trailing bytes after the certificate".into())),
        Err(e) => Err(SvidError::Parse(e.to_string())),
    }
}

/// The SPIFFE ID of a certificate: its one and only URI SAN, which must parse as a SPIFFE ID.
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(SvidError::Parse(e.to_string())),
    };
    match uris.as_slice() {
        [] => Err(SvidError::NoSpiffeId),
        [one] => Ok(SpiffeId::parse(one)?),
        many => Err(SvidError::SeveralUris(many.len())),
    }
}

/// Reads the SPIFFE ID and validity window of a leaf certificate.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let cert = parse_cert(der)?;
    let id = spiffe_id_of(&cert)?;
    let validity = cert.validity();
    Ok(LeafInfo {
        id,
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
    })
}

/// Converts seconds since the epoch (possibly negative) to a `SystemTime`.
pub fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// Seconds since the epoch of a `SystemTime` (negative before 1970).
pub fn to_unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// An X.509-SVID with its private key: what a workload proves its identity with.
#[derive(Debug)]
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER.
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Svid {
    /// Builds an SVID from a chain and its PKCS#8 key, reading the ID and validity off the leaf.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivatePkcs8KeyDer<'static>) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let info = leaf_info(leaf)?;
        Ok(Self {
            id: info.id,
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Whether the SVID is still within its validity window at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The key as rustls wants it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Reads an SVID stored as PEM: the certificate chain (leaf first) and its PKCS#8 `PRIVATE KEY`,
/// in any order, in one file (what [`Svid::to_pem`] writes). The error says what is wrong.
pub fn read_pem_svid(path: &std::path::Path) -> Result<Svid, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_pem_svid(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses what [`read_pem_svid`] reads.
pub fn parse_pem_svid(text: &str) -> Result<Svid, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not PEM: {e}"))?;
    let mut chain = Vec::new();
    let mut key = None;
    for block in blocks {
        match block.tag() {
            "CERTIFICATE" => chain.push(CertificateDer::from(block.into_contents())),
            "PRIVATE KEY" if key.is_none() => key = Some(PrivatePkcs8KeyDer::from(block.into_contents())),
            "PRIVATE KEY" => return Err("more than one PRIVATE KEY block".into()),
            other => {
                return Err(format!(
                    "unexpected PEM block {other:?} (want CERTIFICATE and PRIVATE KEY)"
                ))
            }
        }
    }
    let key = key.ok_or("no PRIVATE KEY block (PKCS#8)")?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Svid::new(chain, key).map_err(|e| e.to_string())
}

impl Svid {
    /// The chain and key as one PEM text, for [`read_pem_svid`].
    pub fn to_pem(&self) -> String {
        let mut blocks: Vec<pem::Pem> = self
            .chain
            .iter()
            .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref().to_vec()))
            .collect();
        blocks.push(pem::Pem::new("PRIVATE KEY", self.key.secret_pkcs8_der().to_vec()));
        pem::encode_many(&blocks)
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

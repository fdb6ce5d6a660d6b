//! Trust bundles: the roots of one trust domain in the SPIFFE bundle format (a JWKS document
//! whose keys have `use: "x509-svid"`), and the [`BundleSet`] that maps every trust domain the
//! mesh trusts to its roots.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::public_key::PublicKey;

use crate::id::TrustDomain;
use crate::svid::parse_cert;

/// Largest bundle document accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// Why a bundle document was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is {0} bytes; the limit is {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    #[error("the bundle is not a JWKS document: {0}")]
    Json(String),
    #[error("key {index}: an x509-svid key needs exactly one x5c certificate, found {found}")]
    X5cCount { index: usize, found: usize },
    #[error("key {index}: x5c is not base64: {why}")]
    X5cBase64 { index: usize, why: String },
    #[error("key {index}: x5c is not a certificate: {why}")]
    X5cCert { index: usize, why: String },
    #[error("key {index}: the JWK parameters do not match the certificate's public key")]
    KeyMismatch { index: usize },
    #[error("the bundle holds no x509-svid key")]
    NoX509Authorities,
}

/// The roots of one trust domain, as a SPIFFE bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// X.509 authorities (roots), DER.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// `spiffe_sequence`: grows each time the bundle changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds: how often consumers should refetch.
    pub refresh_hint_secs: u64,
}

#[derive(Serialize, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    kty: String,
    #[serde(flatten)]
    params: BTreeMap<String, serde_json::Value>,
}

impl TrustBundle {
    /// A bundle with default sequence (1) and refresh hint (5 minutes).
    pub fn new(trust_domain: TrustDomain, roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trust_domain,
            x509_authorities: roots,
            sequence: 1,
            refresh_hint_secs: 300,
        }
    }

    /// Renders the SPIFFE bundle JSON document.
    pub fn to_json(&self) -> String {
        let keys = self.x509_authorities.iter().filter_map(|der| jwk_for(der)).collect();
        let doc = Jwks {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: Some(self.refresh_hint_secs),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// Parses a SPIFFE bundle document for `trust_domain`. Keys with another `use` (such as
    /// `jwt-svid`) are skipped; an `x509-svid` key must carry exactly one valid certificate
    /// whose public key matches the JWK parameters given.
    pub fn from_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(json.len()));
        }
        let doc: Jwks = serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut roots = Vec::new();
        for (index, key) in doc.keys.iter().enumerate() {
            if key.use_.as_deref() != Some("x509-svid") {
                continue;
            }
            let x5c = key.params.get("x5c").and_then(|v| v.as_array());
            let entry = match x5c.map(|a| a.as_slice()) {
                Some([one]) => one.as_str().ok_or(BundleError::X5cBase64 {
                    index,
                    why: "not a string".into(),
                })?,
                other => {
                    return Err(BundleError::X5cCount {
                        index,
                        found: other.map_or(0, |a| a.len()),
                    })
                }
            };
            let der = STANDARD.decode(entry).map_err(|e| BundleError::X5cBase64 {
                index,
                why: e.to_string(),
            })?;
            let cert = parse_cert(&der).map_err(|e| BundleError::X5cCert {
                index,
                why: e.to_string(),
            })?;
            if !jwk_matches(key, &cert) {
                return Err(BundleError::KeyMismatch { index });
            }
            roots.push(CertificateDer::from(der));
        }
        if roots.is_empty() {
            return Err(BundleError::NoX509Authorities);
        }
        Ok(Self {
            trust_domain,
            x509_authorities: roots,
            sequence: doc.spiffe_sequence.unwrap_or(0),
            refresh_hint_secs: doc.spiffe_refresh_hint.unwrap_or(0),
        })
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// OID of Ed25519 public keys (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// The JWK parameters of a certificate's public key: (kty, params). `None` for key types the
/// bundle format cannot express.
fn key_params(cert: &x509_parser::prelude::X509Certificate<'_>) -> Option<(&'static str, BTreeMap<String, String>)> {
    let spki = cert.public_key();
    let mut params = BTreeMap::new();
    let kty = match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            let crv = match data.len() {
                65 => "P-256",
                97 => "P-384",
                133 => "P-521",
                _ => return None, // compressed or unknown curve
            };
            if data[0] != 0x04 {
                return None;
            }
            let n = (data.len() - 1) / 2;
            params.insert("crv".into(), crv.into());
            params.insert("x".into(), URL_SAFE_NO_PAD.encode(&data[1..1 + n]));
            params.insert("y".into(), URL_SAFE_NO_PAD.encode(&data[1 + n..]));
            "EC"
        }
        Ok(PublicKey::RSA(rsa)) => {
            params.insert("n".into(), URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus)));
            params.insert("e".into(), URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent)));
            "RSA"
        }
        _ if spki.algorithm.algorithm.to_id_string() == ED25519_OID => {
            params.insert("crv".into(), "Ed25519".into());
            params.insert("x".into(), URL_SAFE_NO_PAD.encode(&spki.subject_public_key.data));
            "OKP"
        }
        _ => return None,
    };
    Some((kty, params))
}

/// The bundle entry for one root; roots whose key type JWK cannot express are left out (and
/// logged), never written wrongly.
fn jwk_for(der: &CertificateDer<'_>) -> Option<Jwk> {
    let cert = parse_cert(der).ok()?;
    let Some((kty, key)) = key_params(&cert) else {
        tracing::warn!(subject = %cert.subject(), "root left out of the bundle: unsupported key type");
        return None;
    };
    let mut params: BTreeMap<String, serde_json::Value> = key.into_iter().map(|(k, v)| (k, v.into())).collect();
    params.insert("x5c".into(), vec![STANDARD.encode(der.as_ref())].into());
    Some(Jwk {
        use_: Some("x509-svid".into()),
        kty: kty.into(),
        params,
    })
}

/// Whether the JWK's type and key parameters, where present, agree with the certificate.
fn jwk_matches(key: &Jwk, cert: &x509_parser::prelude::X509Certificate<'_>) -> bool {
    let Some((kty, expected)) = key_params(cert) else {
        return false;
    };
    key.kty == kty
        && expected.iter().all(|(name, want)| match key.params.get(name) {
            None => true,
            Some(v) => v.as_str() == Some(want.as_str()),
        })
}

/// Every trust domain the mesh trusts, with its roots. Cloning shares the set, so verifiers
/// built from it see federation updates at once.
#[derive(Debug, Clone)]
pub struct BundleSet {
    inner: Arc<RwLock<HashMap<TrustDomain, TrustBundle>>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for BundleSet {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl BundleSet {
    /// An empty set: trusts nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding one bundle.
    pub fn with(bundle: TrustBundle) -> Self {
        let set = Self::new();
        set.upsert(bundle);
        set
    }

    /// Adds or replaces the bundle of a trust domain.
    pub fn upsert(&self, bundle: TrustBundle) {
        self.write().insert(bundle.trust_domain.clone(), bundle);
        self.changes.send_modify(|v| *v += 1);
    }

    /// A counter that moves whenever a bundle is added, replaced or removed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Forgets a trust domain: its peers are refused from now on.
    pub fn remove(&self, trust_domain: &TrustDomain) -> Option<TrustBundle> {
        let removed = self.write().remove(trust_domain);
        if removed.is_some() {
            self.changes.send_modify(|v| *v += 1);
        }
        removed
    }

    /// The roots of a trust domain, if it is trusted.
    pub fn roots(&self, trust_domain: &TrustDomain) -> Option<Vec<CertificateDer<'static>>> {
        self.read().get(trust_domain).map(|b| b.x509_authorities.clone())
    }

    /// The bundle of a trust domain, if it is trusted.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<TrustBundle> {
        self.read().get(trust_domain).cloned()
    }

    /// Every bundle, ordered by trust domain.
    pub fn all(&self) -> Vec<TrustBundle> {
        let mut all: Vec<_> = self.read().values().cloned().collect();
        all.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
        all
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<TrustDomain, TrustBundle>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TrustDomain, TrustBundle>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("east.trellis.local").unwrap()
    }

    #[test]
    fn a_bundle_round_trips_through_the_spiffe_format() {
        let mut bundle = TrustBundle::new(td(), vec![root(), root()]);
        bundle.sequence = 7;
        let json = bundle.to_json();
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(doc["keys"][0]["use"], "x509-svid");
        assert_eq!(doc["keys"][0]["kty"], "EC");
        assert_eq!(doc["keys"][0]["crv"], "P-256");
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(TrustBundle::from_json(td(), json.as_bytes()).unwrap(), bundle);
    }

    #[test]
    fn ed25519_and_p384_roots_get_their_own_jwk_parameters() {
        for (alg, kty, crv) in [
            (&rcgen::PKCS_ED25519, "OKP", "Ed25519"),
            (&rcgen::PKCS_ECDSA_P384_SHA384, "EC", "P-384"),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let der = params.self_signed(&key).unwrap().der().clone();
            let bundle = TrustBundle::new(td(), vec![der]);
            let doc: serde_json::Value = serde_json::from_str(&bundle.to_json()).unwrap();
            assert_eq!(doc["keys"][0]["kty"], kty);
            assert_eq!(doc["keys"][0]["crv"], crv);
            assert_eq!(
                TrustBundle::from_json(td(), bundle.to_json().as_bytes()).unwrap(),
                bundle
            );
        }
    }

    #[test]
    fn keys_for_other_uses_are_skipped() {
        let bundle = TrustBundle::new(td(), vec![root()]);
        let mut doc: serde_json::Value = serde_json::from_str(&bundle.to_json()).unwrap();
        let jwt =
            serde_json::json!({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"});
        doc["keys"].as_array_mut().unwrap().push(jwt);
        let parsed = TrustBundle::from_json(td(), doc.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.x509_authorities, bundle.x509_authorities);
    }

    #[test]
    fn malformed_bundles_are_refused_with_the_reason() {
        let good: serde_json::Value = serde_json::from_str(&TrustBundle::new(td(), vec![root()]).to_json()).unwrap();
        let with_key = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut doc = good.clone();
            f(&mut doc["keys"][0]);
            doc.to_string()
        };
        let two = with_key(&|k| k["x5c"].as_array_mut().unwrap().push("AAAA".into()));
        assert!(matches!(
            TrustBundle::from_json(td(), two.as_bytes()),
            Err(BundleError::X5cCount { found: 2, .. })
        ));
        let none = with_key(&|k| k["x5c"] = serde_json::json!([]));
        assert!(matches!(
            TrustBundle::from_json(td(), none.as_bytes()),
            Err(BundleError::X5cCount { found: 0, .. })
        ));
        let b64 = with_key(&|k| k["x5c"] = serde_json::json!(["%%%"]));
        assert!(matches!(
            TrustBundle::from_json(td(), b64.as_bytes()),
            Err(BundleError::X5cBase64 { .. })
        ));
        let not_cert = with_key(&|k| k["x5c"] = serde_json::json!(["AAAA"]));
        assert!(matches!(
            TrustBundle::from_json(td(), not_cert.as_bytes()),
            Err(BundleError::X5cCert { .. })
        ));
        let wrong_x = with_key(&|k| k["x"] = "AAAA".into());
        assert!(matches!(
            TrustBundle::from_json(td(), wrong_x.as_bytes()),
            Err(BundleError::KeyMismatch { .. })
        ));
        assert!(matches!(
            TrustBundle::from_json(td(), b"{\"keys\": []}"),
            Err(BundleError::NoX509Authorities)
        ));
        assert!(matches!(
            TrustBundle::from_json(td(), b"[1,2"),
            Err(BundleError::Json(_))
        ));
        let huge = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert!(matches!(
            TrustBundle::from_json(td(), &huge),
            Err(BundleError::TooLarge(_))
        ));
    }

    #[test]
    fn the_set_shares_updates_with_every_clone() {
        let set = BundleSet::new();
        let verifier_view = set.clone();
        let changes = verifier_view.changes();
        set.upsert(TrustBundle::new(td(), vec![root()]));
        assert!(changes.has_changed().unwrap());
        assert!(verifier_view.roots(&td()).is_some());
        set.remove(&td());
        assert!(verifier_view.roots(&td()).is_none());
    }
}

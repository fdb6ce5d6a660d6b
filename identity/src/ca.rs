//! The cluster CA: one signing key per trust domain, kept on disk, that turns validated CSRs
//! into X.509-SVIDs.
//!
//! On-disk layout of a CA directory (the names follow Istio's "plugged-in CA" convention):
//!
//! | file | what |
//! |---|---|
//! | `ca-key.pem` | the CA's private key, PKCS#8, mode 0600 |
//! | `ca-cert.pem` | the CA certificate that signs SVIDs (a root or an intermediate) |
//! | `cert-chain.pem` | optional: intermediates between `ca-cert.pem` and the root |
//! | `root-cert.pem` | the trust anchors of the trust domain (published in the bundle) |
//!
//! An empty directory gets a fresh ECDSA P-256 root. A directory with files is loaded and
//! checked: the key must match the certificate, the certificate must be a valid CA and must
//! chain to a root in `root-cert.pem`; otherwise the CA refuses to start and says why.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::X509Certificate;

use crate::csr::{validate_csr, CsrError};
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{parse_cert, to_system_time};

const KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "ca-cert.pem";
const CHAIN_FILE: &str = "cert-chain.pem";
const ROOT_FILE: &str = "root-cert.pem";

/// How long a root the CA creates itself is valid.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are back-dated by this much (at most a tenth of their TTL, so half-life renewal
/// stays in the future) to absorb small clock differences between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA cannot start or cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: found {1} but not {2}; supply both, or neither to have a root created")]
    Incomplete(PathBuf, &'static str, &'static str),
    #[error("{path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error("the key in {key} does not match the certificate in {cert}; the CA will not start with a mismatched pair")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("cannot issue {id}: this CA serves trust domain {ours}")]
    ForeignTrustDomain { id: String, ours: String },
    #[error("the CA certificate expires at {0:?}; no SVID can be issued under it")]
    CaExpired(SystemTime),
}

/// How long issued SVIDs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuancePolicy {
    /// TTL when the caller asks for none.
    pub default_ttl: Duration,
    /// Longest TTL any caller gets.
    pub max_ttl: Duration,
    /// Shortest TTL any caller gets.
    pub min_ttl: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
            min_ttl: Duration::from_secs(60),
        }
    }
}

impl IssuancePolicy {
    /// The TTL granted for a request of `requested` (zero: the default).
    pub fn grant(&self, requested: Duration) -> Duration {
        let want = if requested.is_zero() {
            self.default_ttl
        } else {
            requested
        };
        want.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }
}

/// A signed SVID chain, as the CA hands it out.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// Leaf first, then intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The cluster CA.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and intermediates above it, appended to every leaf (empty for a root).
    chain_tail: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    policy: IssuancePolicy,
    /// Certificates signed with the CA key since it was loaded.
    signatures: AtomicU64,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, or creates a new ECDSA P-256 root there if the directory holds
    /// no CA files yet.
    pub fn load_or_create(dir: &Path, trust_domain: &TrustDomain, policy: IssuancePolicy) -> Result<Self, CaError> {
        let io = |source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let key = dir.join(KEY_FILE);
        let cert = dir.join(CERT_FILE);
        match (key.exists(), cert.exists()) {
            (false, false) => {
                create_root(dir, trust_domain)?;
                tracing::info!(dir = %dir.display(), trust_domain = %trust_domain, "created a new CA root");
            }
            (true, false) => return Err(CaError::Incomplete(dir.to_path_buf(), KEY_FILE, CERT_FILE)),
            (false, true) => return Err(CaError::Incomplete(dir.to_path_buf(), CERT_FILE, KEY_FILE)),
            (true, true) => {}
        }
        Self::load(dir, trust_domain, policy)
    }

    /// Loads and checks an existing CA directory.
    pub fn load(dir: &Path, trust_domain: &TrustDomain, policy: IssuancePolicy) -> Result<Self, CaError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        check_key_permissions(&key_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadFile {
            path: key_path.clone(),
            why: format!("not a PKCS#8 private key the CA can use: {e}"),
        })?;
        let ca_cert = read_one_cert(&cert_path)?;
        let chain_path = dir.join(CHAIN_FILE);
        let intermediates = if chain_path.exists() {
            read_certs(&chain_path)?
        } else {
            Vec::new()
        };
        let root_path = dir.join(ROOT_FILE);
        let roots = if root_path.exists() {
            read_certs(&root_path)?
        } else {
            vec![ca_cert.clone()]
        };
        if roots.is_empty() {
            return Err(bad(&root_path, "holds no certificate"));
        }

        let parsed = parse_cert(&ca_cert).map_err(|e| bad(&cert_path, &e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        check_is_ca(&parsed).map_err(|why| bad(&cert_path, &why))?;
        if let Some(named) = spiffe_trust_domain(&parsed).filter(|named| named != trust_domain.as_str()) {
            return Err(bad(
                &cert_path,
                &format!("is the CA of trust domain {named}; it cannot issue for {trust_domain}"),
            ));
        }
        if !parsed.validity().is_valid() {
            return Err(bad(&cert_path, "is outside its validity period"));
        }
        let not_after = check_chain(&ca_cert, &intermediates, &roots).map_err(|why| bad(&cert_path, &why))?;

        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| bad(&cert_path, &e.to_string()))?;
        let self_signed = roots.iter().any(|r| r.as_ref() == ca_cert.as_ref());
        let chain_tail = if self_signed {
            Vec::new()
        } else {
            std::iter::once(ca_cert).chain(intermediates).collect()
        };
        Ok(Self {
            trust_domain: trust_domain.clone(),
            issuer,
            chain_tail,
            roots,
            not_after,
            policy,
            signatures: AtomicU64::new(0),
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust anchors that verify every SVID this CA issues.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// How many certificates this CA has signed since it was loaded: each one cost the CA key a
    /// signature, so this is what a refused request must never raise.
    pub fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }

    /// The issuance policy in force.
    pub fn policy(&self) -> &IssuancePolicy {
        &self.policy
    }

    /// Issues an SVID for `id` with a fresh key, right here (offline issuance for hosts that run
    /// without a control plane; see `trellis identity issue`).
    pub fn issue_svid(&self, id: &SpiffeId, requested_ttl: Duration) -> Result<crate::svid::Svid, CaError> {
        let (csr, key) = crate::csr::new_csr(id)?;
        let issued = self.sign(csr.as_bytes(), id, requested_ttl)?;
        crate::svid::Svid::new(issued.chain, rustls_pki_types::PrivatePkcs8KeyDer::from(key)).map_err(|e| {
            CaError::BadFile {
                path: PathBuf::from("(issued SVID)"),
                why: e.to_string(),
            }
        })
    }

    /// Validates `csr` as a request for `id` and signs it for the TTL the policy grants (and
    /// never past the CA's own expiry).
    pub fn sign(&self, csr: &[u8], id: &SpiffeId, requested_ttl: Duration) -> Result<IssuedChain, CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.to_string(),
                ours: self.trust_domain.to_string(),
            });
        }
        let valid = validate_csr(csr, id)?;
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(CaError::CaExpired(self.not_after));
        }
        let ttl = self.policy.grant(requested_ttl);
        let not_after = now.checked_add(ttl).map_or(self.not_after, |t| t.min(self.not_after));

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        // The X.509-SVID standard (section 4.3): a leaf has digitalSignature, and must not have
        // keyCertSign or cRLSign; ECDSA keys neither encipher keys nor agree on them in TLS 1.3.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = (now - BACKDATE.min(ttl / 10)).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;

        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&valid.public_key_der)?;
        self.signatures.fetch_add(1, Ordering::Relaxed);
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let chain = std::iter::once(leaf.der().clone())
            .chain(self.chain_tail.iter().cloned())
            .collect();
        Ok(IssuedChain { chain, not_after })
    }
}

/// A positive 128-bit random serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte, so the DER encoding keeps all 16 bytes
    SerialNumber::from_slice(&bytes)
}

fn bad(path: &Path, why: &str) -> CaError {
    CaError::BadFile {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every `CERTIFICATE` block of a PEM file (root-cert.pem, a chain), checking each parses.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = read(path)?;
    let blocks = pem::parse_many(&text).map_err(|e| bad(path, &format!("not PEM: {e}")))?;
    let mut certs = Vec::new();
    for block in blocks {
        if block.tag() != "CERTIFICATE" {
            return Err(bad(
                path,
                &format!("holds a {:?} block; expected CERTIFICATE", block.tag()),
            ));
        }
        parse_cert(block.contents()).map_err(|e| bad(path, &e.to_string()))?;
        certs.push(CertificateDer::from(block.into_contents()));
    }
    Ok(certs)
}

fn read_one_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let mut certs = read_certs(path)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(bad(
            path,
            &format!("holds {n} certificates; expected exactly one (put intermediates in {CHAIN_FILE})"),
        )),
    }
}

fn check_key_permissions(path: &Path) -> Result<(), CaError> {
    let meta = fs::metadata(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => return Err("is not a CA certificate (basicConstraints CA:TRUE is missing)".into()),
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err("has a key usage without keyCertSign".into());
        }
    }
    Ok(())
}

/// Checks that `ca` chains through `intermediates` (in order) to one of `roots`, with every
/// certificate on the way valid now. Returns the earliest expiry along the chain: no leaf may
/// outlive it.
fn check_chain(
    ca: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
) -> Result<SystemTime, String> {
    let expiry = |c: &X509Certificate<'_>| to_system_time(c.validity().not_after.timestamp());
    let mut child = parse_cert(ca).map_err(|e| e.to_string())?;
    let mut earliest = expiry(&child);
    for (i, der) in intermediates.iter().enumerate() {
        let parent = parse_cert(der).map_err(|e| e.to_string())?;
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|_| format!("is not signed by certificate {} of {CHAIN_FILE}", i + 1))?;
        if !parent.validity().is_valid() {
            return Err(format!(
                "certificate {} of {CHAIN_FILE} is outside its validity period",
                i + 1
            ));
        }
        earliest = earliest.min(expiry(&parent));
        child = parent;
    }
    for root in roots {
        let root = parse_cert(root).map_err(|e| e.to_string())?;
        if child.verify_signature(Some(root.public_key())).is_ok() {
            if !root.validity().is_valid() {
                return Err(format!(
                    "chains to a root in {ROOT_FILE} that is outside its validity period"
                ));
            }
            return Ok(earliest.min(expiry(&root)));
        }
    }
    Err(format!("does not chain to any root in {ROOT_FILE}"))
}

/// Writes `contents` to `path` readable by the owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The trust domain a CA certificate names in a `spiffe://<td>` URI SAN, if it names one (a
/// CA from another PKI may carry none).
fn spiffe_trust_domain(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix("spiffe://")
            .map(|rest| rest.split('/').next().unwrap_or_default().to_string()),
        _ => None,
    })
}

fn create_root(dir: &Path, trust_domain: &TrustDomain) -> Result<(), CaError> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Trellis");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Trellis root CA for {trust_domain}"));
    params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A signing certificate signs certificates (and CRLs), nothing else (X.509-SVID 4.3).
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    write_private(&dir.join(KEY_FILE), key.serialize_pem().as_bytes())?;
    for name in [CERT_FILE, ROOT_FILE] {
        let path = dir.join(name);
        fs::write(&path, cert.pem()).map_err(|source| CaError::Io { path, source })?;
    }
    Ok(())
}

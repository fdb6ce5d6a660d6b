//! rustls verifiers that trust a peer by SPIFFE federation: the peer's chain is checked against
//! the bundle of the peer's *own* trust domain, taken from a [`BundleSet`], and the peer's
//! SPIFFE ID comes out of the handshake.
//!
//! Refused: a trust domain the set does not hold, an expired or not-yet-valid chain, a leaf
//! with no SPIFFE ID or with more than one URI SAN, and (where an identity is expected) any
//! other identity.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{parse_cert, spiffe_id_of};

/// A custom acceptance rule: `Err` carries the reason for the log.
pub type PeerRule = Arc<dyn Fn(&SpiffeId) -> Result<(), String> + Send + Sync>;

/// Which peer identities a verifier accepts once the chain is good.
#[derive(Clone)]
pub enum ExpectedPeer {
    /// Any SPIFFE ID of any trusted trust domain.
    Any,
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in one of these trust domains.
    TrustDomains(Vec<TrustDomain>),
    /// A custom rule; `Err` carries the reason for the log.
    Rule(PeerRule),
}

impl fmt::Debug for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("Any"),
            Self::Exact(id) => write!(f, "Exact({id})"),
            Self::TrustDomains(tds) => write!(f, "TrustDomains({tds:?})"),
            Self::Rule(_) => f.write_str("Rule(..)"),
        }
    }
}

impl ExpectedPeer {
    fn check(&self, id: &SpiffeId) -> Result<(), String> {
        match self {
            Self::Any => Ok(()),
            Self::Exact(want) if want == id => Ok(()),
            Self::Exact(want) => Err(format!("peer is {id}, expected {want}")),
            Self::TrustDomains(tds) if tds.contains(id.trust_domain()) => Ok(()),
            Self::TrustDomains(_) => Err(format!("peer {id} is outside the accepted trust domains")),
            Self::Rule(rule) => rule(id),
        }
    }
}

/// Why a peer's certificate was refused, as it appears in the TLS error.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer certificate has no usable SPIFFE ID: {0}")]
    Identity(String),
    #[error("peer {0} belongs to trust domain {1}, which is not trusted (no bundle)")]
    UnknownTrustDomain(String, String),
    #[error("peer {0} refused: {1}")]
    NotExpected(String, String),
}

/// Carries the human-readable reason through rustls, whose errors print with `Debug`.
struct Refused(String);

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn other(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(e.to_string())))))
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let cert_error = match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// Verifies `end_entity` + `intermediates` against the roots of the leaf's own trust domain
/// and returns the leaf's SPIFFE ID.
pub fn verify_svid_chain(
    bundles: &BundleSet,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    let leaf = parse_cert(end_entity).map_err(|e| other(PeerError::Identity(e.to_string())))?;
    let id = spiffe_id_of(&leaf).map_err(|e| other(PeerError::Identity(e.to_string())))?;
    let roots = bundles.roots(id.trust_domain()).ok_or_else(|| {
        other(PeerError::UnknownTrustDomain(
            id.to_string(),
            id.trust_domain().to_string(),
        ))
    })?;
    let anchors = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect::<Vec<_>>();
    let cert = EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    cert.verify_for_usage(algorithms().all, &anchors, intermediates, now, usage, None, None)
        .map_err(webpki_error)?;
    Ok(id)
}

/// A peer's chain as a finished handshake verified it, kept so that the connection can be
/// checked again when the trust bundles change: a peer whose trust domain left the federation,
/// or whose roots were replaced by ones that did not sign its chain, is no longer trusted on
/// open connections either.
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    chain: Vec<CertificateDer<'static>>,
    at: UnixTime,
    peer_is_server: bool,
}

impl VerifiedChain {
    /// The chain the peer of a finished handshake presented (`peer_is_server` on the client
    /// side), verified now.
    pub fn of(conn: &CommonState, peer_is_server: bool) -> Option<Self> {
        Self::of_chain(conn.peer_certificates()?, peer_is_server)
    }

    /// The same for a chain handed over by other means (QUIC: quinn's `peer_identity`).
    pub fn of_chain(chain: &[CertificateDer<'_>], peer_is_server: bool) -> Option<Self> {
        if chain.is_empty() {
            return None;
        }
        Some(Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            at: UnixTime::now(),
            peer_is_server,
        })
    }

    /// Verifies the chain again against `bundles`, at the time of the handshake: a certificate
    /// that expired since is no reason to close (open tunnels outlive their certificate), only
    /// trust withdrawn is.
    pub fn recheck(&self, bundles: &BundleSet) -> Result<SpiffeId, String> {
        let (leaf, rest) = self.chain.split_first().ok_or("no certificate")?;
        let usage = if self.peer_is_server {
            KeyUsage::server_auth()
        } else {
            KeyUsage::client_auth()
        };
        verify_svid_chain(bundles, leaf, rest, self.at, usage).map_err(|e| e.to_string())
    }
}

/// The SPIFFE ID of the peer of a finished handshake that one of these verifiers accepted.
pub fn peer_id(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of(&parse_cert(leaf).ok()?).ok()
}

/// When the peer's leaf certificate of a finished handshake expires.
pub fn peer_not_after(conn: &CommonState) -> Option<std::time::SystemTime> {
    let leaf = conn.peer_certificates()?.first()?;
    crate::svid::leaf_info(leaf).ok().map(|info| info.not_after)
}

/// Client-side verifier: checks the server's SVID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: BundleSet,
    expected: ExpectedPeer,
}

impl SpiffeServerVerifier {
    /// Trusts servers whose chain verifies under their trust domain's bundle in `bundles` and
    /// whose ID `expected` accepts.
    pub fn new(bundles: BundleSet, expected: ExpectedPeer) -> Arc<Self> {
        Arc::new(Self { bundles, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_svid_chain(&self.bundles, end_entity, intermediates, now, KeyUsage::server_auth())?;
        self.expected
            .check(&id)
            .map_err(|why| other(PeerError::NotExpected(id.to_string(), why)))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server-side verifier: checks the client's SVID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: BundleSet,
    expected: ExpectedPeer,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// Requires a client SVID that verifies under its trust domain's bundle and that
    /// `expected` accepts.
    pub fn new(bundles: BundleSet, expected: ExpectedPeer) -> Arc<Self> {
        Arc::new(Self {
            bundles,
            expected,
            mandatory: true,
        })
    }

    /// Like [`new`](Self::new), but a client may also connect with no certificate at all (the
    /// application then decides, e.g. the CA's Join call). A certificate that *is* presented
    /// must still verify.
    pub fn optional(bundles: BundleSet, expected: ExpectedPeer) -> Arc<Self> {
        Arc::new(Self {
            bundles,
            expected,
            mandatory: false,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = verify_svid_chain(&self.bundles, end_entity, intermediates, now, KeyUsage::client_auth())?;
        self.expected
            .check(&id)
            .map_err(|why| other(PeerError::NotExpected(id.to_string(), why)))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

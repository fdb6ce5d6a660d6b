//! The CA's key material on disk: created owner-only, reloaded, refused when it is wrong, and
//! a user-supplied intermediate whose SVIDs verify against the user's root.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::UnixTime;
use trellis_identity::csr::new_csr;
use trellis_identity::verify::verify_svid_chain;
use trellis_identity::{BundleSet, CertificateAuthority, IssuancePolicy, TrustBundle};

#[test]
fn a_new_ca_writes_its_key_owner_only_and_reloads_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let td = td("east.trellis.local");
    let ca = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
    let key_mode = fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let dir_mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let again = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
    assert_eq!(ca.roots(), again.roots(), "restart keeps the root");
}

#[test]
fn a_ca_of_one_trust_domain_refuses_to_serve_another() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(dir.path(), &td("east.trellis.local"), IssuancePolicy::default()).unwrap();
    let Err(err) = CertificateAuthority::load(dir.path(), &td("west.trellis.local"), IssuancePolicy::default()) else {
        panic!("east's CA must not load as west's");
    };
    assert!(
        err.to_string()
            .contains("is the CA of trust domain east.trellis.local; it cannot issue for west.trellis.local"),
        "{err}"
    );
}

#[test]
fn a_key_readable_by_others_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let td = td("east.trellis.local");
    CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
    let key = dir.path().join("ca-key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn a_key_that_does_not_match_the_certificate_stops_the_ca() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let td = td("east.trellis.local");
    CertificateAuthority::load_or_create(a.path(), &td, IssuancePolicy::default()).unwrap();
    CertificateAuthority::load_or_create(b.path(), &td, IssuancePolicy::default()).unwrap();
    fs::copy(b.path().join("ca-key.pem"), a.path().join("ca-key.pem")).unwrap();
    let err = CertificateAuthority::load_or_create(a.path(), &td, IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("does not match the certificate"), "{err}");
}

#[test]
fn half_a_ca_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let td = td("east.trellis.local");
    CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
    fs::remove_file(dir.path().join("ca-cert.pem")).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");
    fs::write(dir.path().join("ca-cert.pem"), "not pem").unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn write_key(path: &std::path::Path, key: &KeyPair) {
    fs::write(path, key.serialize_pem()).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes a user-supplied PKI into `dir`: a root from `root_params` and, signed by it, an
/// intermediate from `inter_params` that becomes the CA. Returns the root.
fn plug_in(
    dir: &std::path::Path,
    root_params: CertificateParams,
    inter_params: CertificateParams,
) -> rcgen::Certificate {
    let root_key = KeyPair::generate().unwrap();
    let root = root_params.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate().unwrap();
    let inter = inter_params
        .signed_by(&inter_key, &Issuer::from_params(&root_params, &root_key))
        .unwrap();
    write_key(&dir.join("ca-key.pem"), &inter_key);
    fs::write(dir.join("ca-cert.pem"), inter.pem()).unwrap();
    fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    root
}

#[test]
fn a_user_supplied_intermediate_issues_svids_that_verify_under_the_users_root() {
    let dir = tempfile::tempdir().unwrap();
    let td = td("east.trellis.local");
    let root = plug_in(dir.path(), ca_params("corp root"), ca_params("east intermediate"));

    let ca = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
    assert_eq!(ca.roots().len(), 1);
    assert_eq!(ca.roots()[0].as_ref(), root.der().as_ref());

    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let (csr, _key) = new_csr(&web).unwrap();
    let issued = ca.sign(csr.as_bytes(), &web, Duration::ZERO).unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf + intermediate");
    let bundles = BundleSet::with(TrustBundle::new(td.clone(), vec![root.der().clone()]));
    let peer = verify_svid_chain(
        &bundles,
        &issued.chain[0],
        &issued.chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();
    assert_eq!(peer, web);

    // An intermediate that does not chain to the given root is refused.
    let other_root = ca_params("other root")
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap();
    fs::write(dir.path().join("root-cert.pem"), other_root.pem()).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
}

#[test]
fn a_leaf_certificate_is_not_accepted_as_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["leaf.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    write_key(&dir.path().join("ca-key.pem"), &key);
    fs::write(dir.path().join("ca-cert.pem"), leaf.pem()).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), &td("td"), IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("not a CA certificate"), "{err}");
}

#[test]
fn an_expired_root_above_the_intermediate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut root_params = ca_params("corp root");
    root_params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    root_params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    plug_in(dir.path(), root_params, ca_params("east intermediate"));
    let err = CertificateAuthority::load_or_create(dir.path(), &td("td"), IssuancePolicy::default()).unwrap_err();
    assert!(err.to_string().contains("outside its validity period"), "{err}");
}

#[test]
fn leaves_never_outlive_the_intermediate_that_signed_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut inter_params = ca_params("short-lived intermediate");
    let soon = std::time::SystemTime::now() + Duration::from_secs(3600);
    inter_params.not_after = soon.into();
    plug_in(dir.path(), ca_params("corp root"), inter_params);
    let ca = CertificateAuthority::load_or_create(dir.path(), &td("td"), IssuancePolicy::default()).unwrap();
    let web = id("spiffe://td/ns/shop/sa/web");
    let (csr, _key) = new_csr(&web).unwrap();
    let issued = ca.sign(csr.as_bytes(), &web, Duration::from_secs(24 * 3600)).unwrap();
    assert!(issued.not_after <= soon, "asked 24 h under a CA that expires in 1 h");
}

#[test]
fn an_svid_may_sign_only_and_the_ca_certificate_may_sign_certificates_only() {
    use trellis_identity::svid::parse_cert;
    let dir = tempfile::tempdir().unwrap();
    let td = td("east.trellis.local");
    let ca = CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
    let svid = ca
        .issue_svid(&id("spiffe://east.trellis.local/ns/shop/sa/web"), Duration::ZERO)
        .unwrap();
    let leaf = parse_cert(&svid.chain[0]).unwrap();
    let usage = leaf.key_usage().unwrap().expect("a leaf states its key usage");
    assert!(usage.critical, "keyUsage is critical in an X.509-SVID");
    assert!(usage.value.digital_signature());
    assert_eq!(
        usage.value.flags, 1,
        "digitalSignature only (no keyEncipherment, keyAgreement, keyCertSign, cRLSign): {}",
        usage.value
    );
    assert!(!leaf.is_ca());

    let root = parse_cert(&ca.roots()[0]).unwrap();
    let usage = root.key_usage().unwrap().expect("the CA states its key usage");
    assert!(usage.value.key_cert_sign() && usage.value.crl_sign(), "{}", usage.value);
    assert_eq!(
        usage.value.flags,
        (1 << 5) | (1 << 6),
        "keyCertSign and cRLSign only: {}",
        usage.value
    );
}

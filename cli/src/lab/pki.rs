//! The certificates of a federated lab's etcd, which runs as the federation runs it (DESIGN.md,
//! "Federation through etcd"): TLS with client-certificate authentication, the certificate's CN
//! being the etcd user. A CA, etcd's server certificate for its wan address, and one client
//! certificate per etcd user (`root`, `trellis-operator`, `trellis-cluster-<cluster>`). Made in
//! memory; `up` writes them to `<state>/etcd/pki/`.
//!
//! The end-to-end harness makes the same set for its own etcd (tests/src/etcd.rs); it cannot use
//! this binary crate's modules, so the two are kept alike by hand.

use std::net::IpAddr;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// A certificate and its private key, PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Everything etcd and its clients authenticate with.
pub struct EtcdPki {
    /// The CA (its key is kept so more users can be issued later).
    pub ca: Pem,
    /// etcd's own: server authentication for its address, and client authentication, which
    /// etcd's gRPC gateway needs when it dials etcd itself.
    pub server: Pem,
    /// (etcd user, its client certificate with CN = the user), in the order asked for.
    pub clients: Vec<(String, Pem)>,
}

/// Makes a CA, a server certificate for `server_ip` and a client certificate for each of `users`.
pub fn make(server_ip: IpAddr, users: &[String]) -> anyhow::Result<EtcdPki> {
    let ca_key = KeyPair::generate().context("generating the etcd CA's key")?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "trellis lab etcd CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = params.self_signed(&ca_key).context("signing the etcd CA")?;
    let ca = Pem {
        cert: ca_cert.pem(),
        key: ca_key.serialize_pem(),
    };
    let issuer = Issuer::new(params, ca_key);
    let server = leaf(
        &issuer,
        "etcd",
        vec![SanType::IpAddress(server_ip)],
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    )
    .context("etcd's server certificate")?;
    let mut clients = Vec::new();
    for user in users {
        let pem = leaf(&issuer, user, Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth])
            .with_context(|| format!("the client certificate of etcd user {user}"))?;
        clients.push((user.clone(), pem));
    }
    Ok(EtcdPki { ca, server, clients })
}

/// A certificate with CN `cn` signed by `issuer`, with a key of its own.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> anyhow::Result<Pem> {
    let key = KeyPair::generate().context("generating a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.extended_key_usages = usages;
    let cert = params.signed_by(&key, issuer).context("signing")?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;

    fn der(pem: &str) -> Vec<u8> {
        parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    fn cn(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn every_user_gets_a_client_certificate_named_after_it_signed_by_the_ca() {
        let users = ["root".to_string(), "trellis-cluster-east".to_string()];
        let pki = make("10.200.0.2".parse().unwrap(), &users).unwrap();
        let ca_der = der(&pki.ca.cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        let server_der = der(&pki.server.cert);
        let (_, server) = x509_parser::parse_x509_certificate(&server_der).unwrap();
        server.verify_signature(Some(ca.public_key())).unwrap();
        let sans = server
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .clone();
        assert_eq!(sans, [GeneralName::IPAddress(&[10, 200, 0, 2])]);
        let eku = server.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let names: Vec<&str> = pki.clients.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(names, ["root", "trellis-cluster-east"]);
        for (user, pem) in &pki.clients {
            let client_der = der(&pem.cert);
            let (_, client) = x509_parser::parse_x509_certificate(&client_der).unwrap();
            client.verify_signature(Some(ca.public_key())).unwrap();
            assert_eq!(&cn(&client), user);
            let eku = client.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert!(pem.key.contains("PRIVATE KEY"));
        }
    }
}

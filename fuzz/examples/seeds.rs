//! Writes the generated part of the seed corpus (`seeds/csr`, `seeds/bundle`,
//! `seeds/config_update`, `seeds/peer_cert`); `seeds/manifest` and `seeds/hbone_connect` are written by hand.
//! Run from `fuzz/`: `RUSTC_BOOTSTRAP=1 cargo run --example seeds` (deterministic for `csr`,
//! fresh keys for `bundle` and `peer_cert`).

use std::path::{Path, PathBuf};

use prost::Message;
use rcgen::{CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use trellis_api::config::v1 as pb;
use trellis_fuzz::{csr_input, csr_key_pkcs8, encode_chunks, first_inner_tlv, CSR_ID, NODE, TRUST_DOMAIN};
use trellis_identity::{CertificateAuthority, IssuancePolicy, SpiffeId, TrustBundle, TrustDomain};
use trellis_mesh::manifest::parse_file;
use trellis_mesh::model::{build, node_slice, ClusterInfo, Role};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create the seed directory");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

fn csr_for(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).expect("a CSR").der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("an IA5 string"))
}

fn csr_seeds(dir: &Path) {
    let key = KeyPair::try_from(csr_key_pkcs8().as_slice()).expect("the fixed Ed25519 key");
    let good = csr_for(&key, vec![uri(CSR_ID)]);
    let info = first_inner_tlv(&good).expect("a CSR is a SEQUENCE");
    assert_eq!(
        trellis_fuzz::signed_csr(info),
        good,
        "the target re-signs exactly as rcgen signs"
    );
    let signed = csr_input::SIGN_BODY;
    write(dir, "signed-good", &csr_input::encode(signed, 3600, "", info));
    let node = "spiffe://east.trellis.local/trellis/node/node-1";
    let node_csr = csr_for(&key, vec![uri(node)]);
    let node_info = first_inner_tlv(&node_csr).expect("a SEQUENCE");
    write(dir, "signed-node", &csr_input::encode(signed, 0, node, node_info));
    let two = csr_for(
        &key,
        vec![uri(CSR_ID), SanType::DnsName("web.shop".try_into().expect("a name"))],
    );
    write(
        dir,
        "signed-dns-san",
        &csr_input::encode(signed, 60, "", first_inner_tlv(&two).expect("a SEQUENCE")),
    );
    let none = csr_for(&key, vec![]);
    write(
        dir,
        "signed-no-san",
        &csr_input::encode(signed, 60, "", first_inner_tlv(&none).expect("a SEQUENCE")),
    );
    write(dir, "raw-der", &csr_input::encode(0, 86400, "", &good));
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri(CSR_ID)];
    let pem = params.serialize_request(&p256).expect("a CSR").pem().expect("PEM");
    write(
        dir,
        "raw-pem-p256",
        &csr_input::encode(0, u64::MAX, CSR_ID, pem.as_bytes()),
    );
}

fn bundle_seeds(dir: &Path) {
    let td = TrustDomain::new(TRUST_DOMAIN).expect("a trust domain");
    let algs: [(&str, &'static rcgen::SignatureAlgorithm); 3] = [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ];
    let mut roots = Vec::new();
    for (name, alg) in algs {
        let key = KeyPair::generate_for(alg).expect("a key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.subject_alt_names = vec![uri(&format!("spiffe://{TRUST_DOMAIN}"))];
        let cert = params.self_signed(&key).expect("a root");
        let der = cert.der().clone();
        let mut one = vec![1u8];
        one.extend_from_slice(&der);
        write(dir, &format!("cert-{name}"), &one);
        roots.push(der);
    }
    let mut doc = vec![0u8];
    doc.extend_from_slice(TrustBundle::new(td, roots).to_json().as_bytes());
    write(dir, "bundle-three-roots", &doc);
    let mut jwt = vec![0u8];
    jwt.extend_from_slice(
        br#"{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA","kid":"k"}],"spiffe_sequence":2}"#,
    );
    write(dir, "bundle-jwt-only", &jwt);
}

fn config_seeds(dir: &Path) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/manifest/all-kinds.yaml");
    let text = std::fs::read_to_string(&manifest).expect("the manifest seed");
    let inventory = parse_file(&text).expect("the manifest seed parses");
    let cluster = ClusterInfo {
        name: "east".into(),
        trust_domain: TrustDomain::new(TRUST_DOMAIN).expect("a trust domain"),
        network: "east".into(),
        domain: "cluster.local".into(),
    };
    let (model, _) = build(&inventory, &cluster, None);
    let mut encoded = Vec::new();
    for role in [Role::Ztunnel, Role::Waypoint] {
        let slice = node_slice(&model, NODE, role);
        let upserts: Vec<pb::Resource> = slice.values().map(|e| e.resource.clone()).collect();
        assert!(!upserts.is_empty(), "the manifest seed concerns {NODE}");
        let snapshot = pb::ConfigUpdate {
            version: 1,
            snapshot: true,
            upserts: upserts.clone(),
            removals: vec![],
        };
        let extra = vec![
            pb::Resource {
                kind: Some(pb::resource::Kind::RemoteCluster(pb::RemoteCluster {
                    name: "west".into(),
                    trust_domain: "west.trellis.local".into(),
                    network: "west".into(),
                    gateway_address: vec![192, 0, 2, 1],
                    gateway_hbone_port: 15008,
                    healthy: true,
                    ..Default::default()
                })),
            },
            pb::Resource {
                kind: Some(pb::resource::Kind::TrustBundle(pb::TrustBundle {
                    trust_domain: "west.trellis.local".into(),
                    sequence: 1,
                    ..Default::default()
                })),
            },
        ];
        let incremental = pb::ConfigUpdate {
            version: 2,
            snapshot: false,
            upserts: extra,
            removals: slice.keys().take(1).map(|k| k.to_proto()).collect(),
        };
        let again = pb::ConfigUpdate {
            version: 3,
            snapshot: false,
            upserts: upserts.into_iter().take(1).collect(),
            removals: vec![],
        };
        let updates = [snapshot, incremental, again].map(|u| u.encode_to_vec());
        encoded.push(encode_chunks(&updates));
    }
    write(dir, "ztunnel-stream", &encoded[0]);
    write(dir, "waypoint-stream", &encoded[1]);
}

fn peer_cert_seeds(dir: &Path) {
    let ca_dir = std::env::temp_dir().join(format!("trellis-fuzz-seeds-ca-{}", std::process::id()));
    let td = TrustDomain::new(TRUST_DOMAIN).expect("a trust domain");
    let ca = CertificateAuthority::load_or_create(&ca_dir, &td, IssuancePolicy::default());
    let _ = std::fs::remove_dir_all(&ca_dir);
    let ca = ca.expect("a fresh CA");
    let root = ca.roots()[0].to_vec();
    for (name, id) in [
        ("workload", CSR_ID.to_string()),
        ("node", format!("spiffe://{TRUST_DOMAIN}/trellis/node/{NODE}")),
    ] {
        let id = SpiffeId::parse(&id).expect("a SPIFFE ID");
        let svid = ca
            .issue_svid(&id, std::time::Duration::from_secs(3600))
            .expect("an SVID");
        let leaf = svid.chain[0].to_vec();
        write(
            dir,
            &format!("{name}-leaf"),
            &encode_chunks(std::slice::from_ref(&leaf)),
        );
        write(dir, &format!("{name}-leaf-root"), &encode_chunks(&[leaf, root.clone()]));
    }
}

fn main() {
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    csr_seeds(&seeds.join("csr"));
    bundle_seeds(&seeds.join("bundle"));
    config_seeds(&seeds.join("config_update"));
    peer_cert_seeds(&seeds.join("peer_cert"));
    println!("seeds written under {}", seeds.display());
}

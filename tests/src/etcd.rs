//! A real etcd (Debian's `etcd-server`) for a test, on loopback ports of its own, with TLS and
//! client-certificate authentication as the federation runs it: a test CA, a server certificate
//! for 127.0.0.1, and a client certificate per etcd user (its CN is the user). Killed, and its
//! data removed, when the [`Etcd`] drops, pass or fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trellis_federation::sync::EtcdConfig;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// A client certificate and key, PEM.
#[derive(Clone)]
pub struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Etcd {
    pub client_url: String,
    pub ca_pem: String,
    dir: tempfile::TempDir,
    peer_port: u16,
    client_port: u16,
    issuer: Issuer<'static, KeyPair>,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd and waits until it accepts connections on its client port.
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "etcd test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca, ca_key);

        // etcd's gateway dials itself with the server certificate: it needs clientAuth too.
        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::default();
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().expect("ip")),
            SanType::DnsName("localhost".try_into().expect("dns name")),
        ];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let server_cert = server.signed_by(&server_key, &issuer).expect("server certificate");
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("ca.pem");
        std::fs::write(dir.path().join("server.pem"), server_cert.pem()).expect("server.pem");
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).expect("server.key");

        let mut etcd = Etcd {
            client_url: String::new(),
            ca_pem,
            peer_port: crate::free_port(),
            client_port: crate::free_port(),
            dir,
            issuer,
            child: None,
        };
        etcd.client_url = format!("https://127.0.0.1:{}", etcd.client_port);
        etcd.resume();
        etcd
    }

    /// A client certificate for etcd user `user`.
    pub fn credentials(&self, user: &str) -> Credentials {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("client certificate");
        Credentials {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// How a client logs in as `user` (a fresh certificate with that CN).
    pub fn config(&self, user: &str) -> EtcdConfig {
        let creds = self.credentials(user);
        EtcdConfig {
            endpoints: vec![self.client_url.clone()],
            ca_pem: self.ca_pem.clone().into_bytes(),
            cert_pem: creds.cert_pem.into_bytes(),
            key_pem: creds.key_pem.into_bytes(),
        }
    }

    /// Writes etcd's CA and a certificate and key for `user` into `dir`: the files an operator
    /// hands `trellis federation join` (`ca.pem`, `<user>.pem`, `<user>-key.pem`).
    pub fn write_credentials(&self, user: &str, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let creds = self.credentials(user);
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join(format!("{user}.pem")),
            dir.join(format!("{user}-key.pem")),
        );
        std::fs::write(&ca, &self.ca_pem).expect("ca.pem");
        std::fs::write(&cert, creds.cert_pem).expect("certificate");
        std::fs::write(&key, creds.key_pem).expect("key");
        (ca, cert, key)
    }

    /// Provisions etcd as the federation runs it: a user and role per member `(cluster, trust
    /// domain)` (trellis_federation::access), the operator's, root's, and authentication on.
    pub async fn provision(&self, members: &[(&str, &str)]) {
        let mut root = trellis_federation::sync::connect(&self.config("root"))
            .await
            .expect("root client");
        for (cluster, td) in members {
            trellis_federation::access::add_member(&mut root, cluster, td)
                .await
                .unwrap_or_else(|e| panic!("{cluster}'s role: {e}"));
        }
        trellis_federation::access::add_operator(&mut root)
            .await
            .expect("operator's role");
        trellis_federation::access::enable(&mut root)
            .await
            .expect("auth enable");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Kills etcd (SIGKILL, as a crash) and waits until it is gone; its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data (or for the first time), and waits until it
    /// accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let serving_before = std::fs::read_to_string(self.path("etcd.log"))
            .map(|l| l.matches("serving client traffic").count())
            .unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("etcd.log"))
            .expect("etcd.log");
        let child = Command::new("etcd")
            .arg("--name=t0")
            .arg(format!("--data-dir={}", self.path("data").display()))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t0={peer}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--cert-file={}", self.path("server.pem").display()))
            .arg(format!("--key-file={}", self.path("server.key").display()))
            .arg(format!("--trusted-ca-file={}", self.path("ca.pem").display()))
            .arg("--client-cert-auth")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd (Debian's etcd-server; bash deploy/install-deps.sh): {e}"));
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.client_port);
        let log_path = self.path("etcd.log");
        // The log is appended across restarts: wait for one more "serving client traffic".
        let serving = || {
            std::fs::read_to_string(&log_path)
                .map(|l| l.matches("serving client traffic").count())
                .unwrap_or(0)
        };
        let before = serving_before;
        let ready = || std::net::TcpStream::connect(&addr).is_ok() && serving() > before;
        crate::wait_until("etcd serves clients", Duration::from_secs(20), ready);
    }

    /// etcd's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("etcd.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

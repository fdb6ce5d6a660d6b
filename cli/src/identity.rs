//! `trellis identity issue`: offline issuance of an SVID from the cluster CA's files, for a host
//! that runs ztunnel without a control plane (`ztunnel --config-file ... --identity-file ...`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use trellis_identity::ca::{CertificateAuthority, IssuancePolicy};
use trellis_identity::{SpiffeId, TrustDomain};

/// Longest life an offline SVID may be given: nothing renews it.
pub const MAX_HOURS: u64 = 30 * 24;

/// Issues an SVID for `id` under the CA in `ca_dir` and writes chain and key to `out` (mode 600).
pub fn issue(ca_dir: &Path, id: &str, hours: u64, out: &Path) -> anyhow::Result<String> {
    anyhow::ensure!(
        (1..=MAX_HOURS).contains(&hours),
        "--hours {hours}: give 1 to {MAX_HOURS} (an offline SVID is never renewed)"
    );
    let id = SpiffeId::parse(id).with_context(|| format!("--id {id:?} is not a SPIFFE ID"))?;
    let td: TrustDomain = id.trust_domain().clone();
    let ttl = Duration::from_secs(hours * 3600);
    let policy = IssuancePolicy {
        default_ttl: ttl,
        max_ttl: ttl,
        ..IssuancePolicy::default()
    };
    let ca = CertificateAuthority::load(ca_dir, &td, policy)
        .with_context(|| format!("loading the CA of {td} from {}", ca_dir.display()))?;
    let svid = ca.issue_svid(&id, ttl)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    file.write_all(svid.to_pem().as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(format!(
        "wrote {} for {id}, valid until unix time {}",
        out.display(),
        trellis_identity::svid::to_unix(svid.not_after)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_usable_svid_and_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("east.trellis.local").unwrap();
        CertificateAuthority::load_or_create(dir.path(), &td, IssuancePolicy::default()).unwrap();
        let out = dir.path().join("billing.pem");
        let id = "spiffe://east.trellis.local/ns/legacy/sa/billing";
        let said = issue(dir.path(), id, 48, &out).unwrap();
        assert!(said.contains(id), "{said}");
        let svid = trellis_identity::svid::read_pem_svid(&out).unwrap();
        assert_eq!(svid.id.to_string(), id);
        let life = svid.not_after.duration_since(svid.not_before).unwrap();
        assert!(life > Duration::from_secs(47 * 3600), "{life:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);

        let e = issue(dir.path(), "spiffe://west.trellis.local/ns/a/sa/b", 1, &out).unwrap_err();
        assert!(format!("{e:#}").contains("west.trellis.local"), "{e:#}");
        let e = issue(dir.path(), "not an id", 1, &out).unwrap_err();
        assert!(format!("{e:#}").contains("not a SPIFFE ID"), "{e:#}");
        let e = issue(dir.path(), id, 0, &out).unwrap_err();
        assert!(format!("{e:#}").contains("--hours 0"), "{e:#}");
    }
}

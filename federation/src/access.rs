//! Least privilege in etcd (DESIGN.md): with etcd's users and roles, each cluster may write only
//! its own keys and read all of `/trellis/v1/`; `traffic/` is written with the operator's
//! credentials. Clients authenticate by certificate: etcd takes the certificate's CN as the user.

use etcd_client::{Client, GetOptions, Permission, UserAddOptions};

use crate::keys::{self, PREFIX};
use crate::records::{decode, encode, GrantRecord};

/// The etcd user (and certificate CN) of cluster `cluster`, and its role.
pub fn cluster_user(cluster: &str) -> String {
    format!("trellis-cluster-{cluster}")
}

/// The etcd user (and certificate CN) of the operator, who writes `traffic/`.
pub const OPERATOR_USER: &str = "trellis-operator";

/// Creates the user and role of member `cluster` with trust domain `trust_domain`: read
/// everything under the prefix; write `clusters/<cluster>`, `bundles/<trust domain>`,
/// `services/<cluster>/...` and `endpoints/<cluster>/...` only. Run with root's credentials.
///
/// Also writes `grants/<cluster>` (the trust domain the member may use, which no member can
/// write), refusing a trust domain already granted to another cluster.
pub async fn add_member(client: &mut Client, cluster: &str, trust_domain: &str) -> Result<(), String> {
    let grants = client
        .get(format!("{PREFIX}grants/"), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("reading the grants: {e}"))?;
    for kv in grants.kvs() {
        let other = String::from_utf8_lossy(kv.key())
            .trim_start_matches(&format!("{PREFIX}grants/"))
            .to_string();
        let held: Result<GrantRecord, String> = decode(kv.value());
        if other != cluster && held.is_ok_and(|g| g.trust_domain == trust_domain) {
            return Err(format!(
                "trust domain {trust_domain} is granted to cluster {other} already"
            ));
        }
    }
    add_member_user(client, cluster, trust_domain)
        .await
        .map_err(|e| e.to_string())?;
    let grant = encode(&GrantRecord {
        trust_domain: trust_domain.to_string(),
    });
    client
        .put(keys::grant(cluster), grant, None)
        .await
        .map_err(|e| format!("writing {}: {e}", keys::grant(cluster)))?;
    Ok(())
}

async fn add_member_user(client: &mut Client, cluster: &str, trust_domain: &str) -> Result<(), etcd_client::Error> {
    let user = cluster_user(cluster);
    let grants = [
        Permission::read(PREFIX).with_prefix(),
        Permission::read_write(keys::cluster(cluster)),
        Permission::read_write(keys::bundle(trust_domain)),
        Permission::read_write(format!("{PREFIX}services/{cluster}/")).with_prefix(),
        Permission::read_write(format!("{PREFIX}endpoints/{cluster}/")).with_prefix(),
    ];
    add_user(client, &user, &grants).await
}

/// Creates the operator's user: read everything, write `traffic/`.
pub async fn add_operator(client: &mut Client) -> Result<(), etcd_client::Error> {
    let grants = [
        Permission::read(PREFIX).with_prefix(),
        Permission::read_write(format!("{PREFIX}traffic/")).with_prefix(),
    ];
    add_user(client, OPERATOR_USER, &grants).await
}

/// Creates `root` (certificate-only, role root) and turns authentication on. Before this, any
/// client with a valid certificate may do anything.
pub async fn enable(client: &mut Client) -> Result<(), etcd_client::Error> {
    ignore_exists(
        client
            .user_add("root", "", Some(UserAddOptions::new().with_no_pwd()))
            .await,
    )?;
    client.user_grant_role("root", "root").await?;
    client.auth_enable().await?;
    Ok(())
}

async fn add_user(client: &mut Client, user: &str, grants: &[Permission]) -> Result<(), etcd_client::Error> {
    ignore_exists(client.role_add(user).await)?;
    for grant in grants {
        client.role_grant_permission(user, grant.clone()).await?;
    }
    ignore_exists(
        client
            .user_add(user, "", Some(UserAddOptions::new().with_no_pwd()))
            .await,
    )?;
    client.user_grant_role(user, user).await?;
    Ok(())
}

/// Adding what exists already is fine: provisioning runs again after a restart.
fn ignore_exists<T>(result: Result<T, etcd_client::Error>) -> Result<(), etcd_client::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(e),
    }
}

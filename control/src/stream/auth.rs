//! Who may subscribe to the config stream, and as what. Pure: the caller's SPIFFE ID (from the
//! mTLS handshake), its Subscribe message and the current model in, a decision out.
//!
//! - A node identity (`spiffe://<td>/trellis/node/<node>`) subscribes as `ROLE_ZTUNNEL`, for
//!   its own node only.
//! - `ROLE_WAYPOINT` is for a waypoint's own identity only: a workload identity
//!   (`spiffe://<td>/ns/<ns>/sa/<sa>`) that a Waypoint resource of the current model names. A
//!   waypoint's slice holds every policy and route of the cluster, so a node identity asking
//!   for it is refused, as is a workload identity no Waypoint names. The waypoint's slice is
//!   keyed by its identity, never by a node name, so it holds no node's own workloads in full.
//! - Everything else (no certificate, another trust domain, trellisd's own identity) is
//!   unauthenticated; an unknown role is malformed.

use tonic::Status;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_identity::{IdKind, SpiffeId, TrustDomain};
use trellis_mesh::model::{MeshModel, Role};

/// A subscription the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// What the slice is cut for and the resume memory is keyed by: the node's name for a
    /// ztunnel, the waypoint's SPIFFE ID for a waypoint (never a node name: those hold no `/`).
    pub name: String,
    pub role: Role,
}

/// The caller, if it holds an identity of `trust_domain` at all: checked before the stream is
/// read.
pub fn identify<'a>(trust_domain: &TrustDomain, caller: Option<&'a SpiffeId>) -> Result<&'a SpiffeId, Status> {
    match caller {
        Some(id) if id.trust_domain() == trust_domain => Ok(id),
        Some(id) => Err(Status::unauthenticated(format!(
            "{id} is not an identity of {trust_domain}"
        ))),
        None => Err(Status::unauthenticated(
            "the config stream needs mTLS with a valid node or waypoint SVID",
        )),
    }
}

/// Decides whether `caller` may subscribe as `subscribe` says, given the current `model`.
pub fn authorize(
    trust_domain: &TrustDomain,
    caller: Option<&SpiffeId>,
    subscribe: &pb::Subscribe,
    model: &MeshModel,
) -> Result<Subscriber, Status> {
    let caller = identify(trust_domain, caller)?;
    let role = match pb::Role::try_from(subscribe.role) {
        Ok(pb::Role::Ztunnel) => Role::Ztunnel,
        Ok(pb::Role::Waypoint) => Role::Waypoint,
        _ => {
            return Err(Status::invalid_argument(format!(
                "role {} is not ROLE_ZTUNNEL or ROLE_WAYPOINT",
                subscribe.role
            )))
        }
    };
    match (caller.kind(), role) {
        (IdKind::Node(node), Role::Ztunnel) if subscribe.node == node => Ok(Subscriber {
            name: node.to_string(),
            role,
        }),
        (IdKind::Node(node), Role::Ztunnel) => Err(Status::permission_denied(format!(
            "node {node} may not subscribe as {}",
            subscribe.node
        ))),
        (IdKind::Node(node), Role::Waypoint) => Err(Status::permission_denied(format!(
            "node {node} may subscribe as ROLE_ZTUNNEL only; ROLE_WAYPOINT is for a waypoint's own identity"
        ))),
        (IdKind::Workload { .. }, Role::Waypoint) if is_waypoint(model, caller) => Ok(Subscriber {
            name: caller.to_string(),
            role,
        }),
        (IdKind::Workload { .. }, Role::Waypoint) => Err(Status::permission_denied(format!(
            "{caller} is no waypoint's identity: no Waypoint resource names it"
        ))),
        (IdKind::Workload { .. }, Role::Ztunnel) => Err(Status::permission_denied(format!(
            "{caller} is a workload identity; ROLE_ZTUNNEL is for node identities"
        ))),
        _ => Err(Status::unauthenticated(format!(
            "{caller} is neither a node nor a waypoint identity"
        ))),
    }
}

/// Whether a Waypoint resource of `model` has the identity `id`.
pub fn is_waypoint(model: &MeshModel, id: &SpiffeId) -> bool {
    let (IdKind::Workload { namespace, .. }, id) = (id.kind(), id.to_string()) else {
        return false;
    };
    model.namespaces.get(namespace).is_some_and(|ns| {
        ns.waypoints
            .values()
            .any(|e| matches!(&e.resource.kind, Some(Variant::Waypoint(w)) if w.identity == id))
    })
}

/// Whether an accepted subscriber may stay subscribed under `model`: a waypoint whose Waypoint
/// resource is gone loses its stream.
pub fn still_allowed(subscriber: &Subscriber, model: &MeshModel) -> bool {
    match subscriber.role {
        Role::Ztunnel => true,
        Role::Waypoint => SpiffeId::parse(&subscriber.name).is_ok_and(|id| is_waypoint(model, &id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_mesh::manifest::parse_file;
    use trellis_mesh::model::{build, ClusterInfo};

    const TD: &str = "east.trellis.local";

    fn model(with_waypoint: bool) -> MeshModel {
        let mut text = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.io/dataplane-mode: ambient}}\n",
        );
        if with_waypoint {
            text.push_str(
                "---\napiVersion: trellis.io/v1\nkind: Waypoint\nmetadata: {name: shop-wp, namespace: shop}\nspec: {serviceAccount: shop-wp, addresses: [10.1.1.100]}\n",
            );
        }
        let cluster = ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new(TD).unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        };
        build(&parse_file(&text).unwrap(), &cluster, None).0
    }

    fn td() -> TrustDomain {
        TrustDomain::new(TD).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn subscribe(node: &str, role: pb::Role) -> pb::Subscribe {
        pb::Subscribe {
            node: node.into(),
            role: role as i32,
            resume_from: 0,
        }
    }

    const NODE_1: &str = "spiffe://east.trellis.local/trellis/node/node-1";
    const WAYPOINT: &str = "spiffe://east.trellis.local/ns/shop/sa/shop-wp";

    #[test]
    fn a_node_subscribes_as_the_ztunnel_of_its_own_node_only() {
        let m = model(true);
        let ok = authorize(&td(), Some(&id(NODE_1)), &subscribe("node-1", pb::Role::Ztunnel), &m).unwrap();
        assert_eq!(
            ok,
            Subscriber {
                name: "node-1".into(),
                role: Role::Ztunnel
            }
        );
        let other = authorize(&td(), Some(&id(NODE_1)), &subscribe("node-2", pb::Role::Ztunnel), &m);
        assert_eq!(other.unwrap_err().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_node_identity_may_not_take_the_waypoint_role() {
        let m = model(true);
        let err = authorize(&td(), Some(&id(NODE_1)), &subscribe("node-1", pb::Role::Waypoint), &m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("ROLE_WAYPOINT is for a waypoint's own identity"),
            "{err}"
        );
    }

    #[test]
    fn only_the_identity_a_waypoint_resource_names_takes_the_waypoint_role() {
        let with = model(true);
        let ok = authorize(
            &td(),
            Some(&id(WAYPOINT)),
            &subscribe("node-1", pb::Role::Waypoint),
            &with,
        )
        .unwrap();
        assert_eq!(
            ok,
            Subscriber {
                name: WAYPOINT.into(),
                role: Role::Waypoint
            }
        );
        assert!(still_allowed(&ok, &with));
        assert!(
            !still_allowed(&ok, &model(false)),
            "its Waypoint removed: the stream goes"
        );

        let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
        let err = authorize(&td(), Some(&web), &subscribe("node-1", pb::Role::Waypoint), &with).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = authorize(
            &td(),
            Some(&id(WAYPOINT)),
            &subscribe("node-1", pb::Role::Waypoint),
            &model(false),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = authorize(
            &td(),
            Some(&id(WAYPOINT)),
            &subscribe("node-1", pb::Role::Ztunnel),
            &with,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "a waypoint is no ztunnel");
    }

    #[test]
    fn strangers_are_unauthenticated_and_unknown_roles_malformed() {
        let m = model(true);
        let sub = subscribe("node-1", pb::Role::Ztunnel);
        let foreign = id("spiffe://west.trellis.local/trellis/node/node-1");
        for caller in [None, Some(&foreign)] {
            let err = authorize(&td(), caller, &sub, &m).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        let control = SpiffeId::control(&td());
        let err = authorize(&td(), Some(&control), &sub, &m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = authorize(
            &td(),
            Some(&id(NODE_1)),
            &subscribe("node-1", pb::Role::Unspecified),
            &m,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}

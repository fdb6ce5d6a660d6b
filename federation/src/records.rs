//! The values stored under the federation's keys (DESIGN.md "Federation through etcd"), as JSON
//! documents with camelCase fields. Every value read from etcd is untrusted: [`decode`] refuses
//! unknown fields, oversized values, bad names and addresses, with a reason naming the field.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use trellis_identity::id::check_name;
use trellis_identity::{SpiffeId, TrustDomain};

/// The largest value accepted under any key (etcd's own default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The most endpoints one `endpoints/` value may list.
pub const MAX_ENDPOINTS: usize = 10_000;
/// The most ports or hostnames one `services/` value may list.
pub const MAX_PORTS: usize = 64;

/// `clusters/<cluster>`: a member, bound to its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRecord {
    pub name: String,
    pub trust_domain: String,
    /// Clusters on one network reach each other's pods directly; others only through gateways.
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Gateway>,
}

/// Where a cluster's east-west gateway answers HBONE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    pub address: IpAddr,
    /// HBONE over HTTP/2 (TCP).
    pub hbone_port: u16,
    /// HBONE over QUIC (UDP), when the gateway serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_port: Option<u16>,
    /// The gateway's node name: it presents `spiffe://<trust domain>/trellis/node/<node>`.
    #[serde(default = "gateway_node")]
    pub node: String,
}

/// The node name an east-west gateway runs as unless its record says otherwise.
pub const GATEWAY_NODE: &str = "east-west-gateway";

fn gateway_node() -> String {
    GATEWAY_NODE.to_string()
}

impl Gateway {
    /// The identity the gateway must present, in the cluster's `trust_domain`.
    pub fn identity(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, String> {
        SpiffeId::node(trust_domain, &self.node).map_err(|e| format!("gateway node {:?}: {e}", self.node))
    }
}

/// `services/<cluster>/<ns>/<name>`: a service exported with `trellis.io/global=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRecord {
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_protocol: String,
}

/// `endpoints/<cluster>/<ns>/<name>`: a service's healthy endpoints in one cluster, bound to the
/// cluster's lease. A cluster without a gateway lists its pods (reachable from its own network);
/// one with a gateway says only how many stand behind it, per identity, and never their
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsRecord {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointRecord>,
    /// Healthy endpoints behind the cluster's gateway, by the identity they present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub behind_gateway: Vec<GatewayGroup>,
}

/// `count` healthy endpoints presenting `identity`, reached through the cluster's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayGroup {
    pub identity: String,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointRecord {
    pub address: IpAddr,
    /// The workload's SPIFFE ID: verified on the tunnel, so it must be in the cluster's domain.
    pub identity: String,
    pub node: String,
    /// Where the node accepts HBONE tunnels.
    pub node_address: IpAddr,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

/// `grants/<cluster>`: the trust domain root granted the member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantRecord {
    pub trust_domain: String,
}

/// `traffic/<ns>/<name>`: cluster weights for traffic shifting (written by the operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficRecord {
    pub weights: BTreeMap<String, u32>,
}

/// Parses a JSON value of at most [`MAX_VALUE_BYTES`].
pub fn decode<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Result<T, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "the value is {} bytes; the limit is {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    serde_json::from_slice(value).map_err(|e| format!("not a valid value: {e}"))
}

/// The JSON text of a record.
pub fn encode<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).unwrap_or_default()
}

fn name(what: &str, value: &str) -> Result<(), String> {
    check_name(value).map_err(|e| format!("{what} {value:?}: {e}"))
}

impl ClusterRecord {
    /// Checks the fields and that the record names the cluster of its key.
    pub fn check(&self, key_cluster: &str) -> Result<TrustDomain, String> {
        if self.name != key_cluster {
            return Err(format!(
                "names cluster {:?} under the key of cluster {key_cluster:?}",
                self.name
            ));
        }
        name("network", &self.network)?;
        for (what, v) in [("region", &self.region), ("zone", &self.zone)] {
            if !v.is_empty() && (v.len() > 63 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))) {
                return Err(format!("{what} {v:?}: up to 63 of [A-Za-z0-9-_.]"));
            }
        }
        if let Some(g) = &self.gateway {
            if g.hbone_port == 0 || g.quic_port == Some(0) {
                return Err("gateway port 0".into());
            }
            if g.address.is_unspecified() || g.address.is_multicast() {
                return Err(format!("gateway address {} cannot be dialled", g.address));
            }
            name("gateway node", &g.node)?;
        }
        TrustDomain::new(&self.trust_domain).map_err(|e| format!("trust domain {:?}: {e}", self.trust_domain))
    }
}

impl ServiceRecord {
    pub fn check(&self) -> Result<(), String> {
        if self.ports.is_empty() || self.ports.len() > MAX_PORTS || self.hostnames.len() > MAX_PORTS {
            return Err(format!("1 to {MAX_PORTS} ports and at most {MAX_PORTS} hostnames"));
        }
        for p in &self.ports {
            if p.port == 0 || p.target_port == 0 {
                return Err(format!("port {} → {}: ports are 1 to 65535", p.port, p.target_port));
            }
        }
        for h in &self.hostnames {
            if h.is_empty() || h.len() > 253 || !h.split('.').all(|l| check_name(l).is_ok()) {
                return Err(format!("hostname {h:?} is not a DNS name"));
            }
        }
        Ok(())
    }
}

impl EndpointsRecord {
    /// Checks the fields, and that every endpoint's identity is of `trust_domain` (the owning
    /// cluster's): a cluster cannot publish endpoints that claim another domain's identities.
    pub fn check(&self, trust_domain: &TrustDomain) -> Result<(), String> {
        match self.claimed()? {
            Some((claimed, first)) if &claimed != trust_domain => {
                Err(format!("{first}, outside the cluster's trust domain {trust_domain}"))
            }
            _ => Ok(()),
        }
    }

    /// Checks every field but the owner, and returns the one trust domain the identities are
    /// of (with the first of them, for an error), if any: [`Self::check`] in two halves, so a
    /// reader checks a big value once when it arrives and only compares domains after.
    pub fn claimed(&self) -> Result<Option<(TrustDomain, String)>, String> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!(
                "{} endpoints; the limit is {MAX_ENDPOINTS}",
                self.endpoints.len()
            ));
        }
        if !self.endpoints.is_empty() && !self.behind_gateway.is_empty() {
            return Err("both endpoints and behindGateway: a cluster lists its pods or counts them, not both".into());
        }
        if self.behind_gateway.len() > MAX_PORTS {
            return Err(format!("more than {MAX_PORTS} behindGateway identities"));
        }
        let mut claimed: Option<(TrustDomain, String)> = None;
        let mut claim = |what: String, identity: &str| -> Result<(), String> {
            let id = SpiffeId::parse(identity).map_err(|why| format!("{what}: identity: {why}"))?;
            match &claimed {
                None => claimed = Some((id.trust_domain().clone(), format!("{what} claims {id}"))),
                Some((td, _)) if td != id.trust_domain() => {
                    return Err(format!(
                        "{what} claims {id}, and another endpoint an identity of {td}: a cluster publishes only its own trust domain"
                    ))
                }
                Some(_) => {}
            }
            Ok(())
        };
        for e in &self.endpoints {
            claim(format!("endpoint {}", e.address), &e.identity)?;
            name("node", &e.node)?;
            for a in [e.address, e.node_address] {
                if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                    return Err(format!("endpoint {}: address {a} cannot be dialled", e.address));
                }
            }
        }
        for g in &self.behind_gateway {
            claim("behindGateway".into(), &g.identity)?;
            if g.count == 0 || g.count as usize > MAX_ENDPOINTS {
                return Err(format!(
                    "behindGateway {}: count {} is not 1 to {MAX_ENDPOINTS}",
                    g.identity, g.count
                ));
            }
        }
        Ok(claimed)
    }
}

impl TrafficRecord {
    pub fn check(&self) -> Result<(), String> {
        if self.weights.is_empty() || self.weights.len() > 256 {
            return Err("1 to 256 cluster weights".into());
        }
        for (cluster, weight) in &self.weights {
            name("cluster", cluster)?;
            if *weight > 10_000 {
                return Err(format!("weight {weight} for {cluster}: at most 10000"));
            }
        }
        if self.weights.values().all(|w| *w == 0) {
            return Err("every weight is 0: no cluster would get traffic".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterRecord {
        ClusterRecord {
            name: "west".into(),
            trust_domain: "west.trellis.local".into(),
            network: "west".into(),
            region: "eu-1".into(),
            zone: "eu-1a".into(),
            gateway: Some(Gateway {
                address: "10.2.0.20".parse().unwrap(),
                hbone_port: 15008,
                quic_port: Some(15009),
                node: GATEWAY_NODE.into(),
            }),
        }
    }

    #[test]
    fn a_record_round_trips_and_checks() {
        let c = cluster();
        let text = encode(&c);
        assert!(text.contains("\"trustDomain\":\"west.trellis.local\""), "{text}");
        let back: ClusterRecord = decode(text.as_bytes()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.check("west").unwrap().to_string(), "west.trellis.local");
    }

    #[test]
    fn bad_values_are_refused_with_the_field() {
        let e = cluster().check("east").unwrap_err();
        assert!(e.contains("under the key of cluster \"east\""), "{e}");
        let e = decode::<ClusterRecord>(br#"{"name":"w","trustDomain":"w","network":"w","extra":1}"#).unwrap_err();
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = decode::<ClusterRecord>(&vec![b' '; MAX_VALUE_BYTES + 1]).unwrap_err();
        assert!(e.contains("1048577 bytes"), "{e}");
        let td = TrustDomain::new("west.trellis.local").unwrap();
        let foreign = EndpointsRecord {
            endpoints: vec![EndpointRecord {
                address: "10.2.1.10".parse().unwrap(),
                identity: "spiffe://east.trellis.local/ns/demo/sa/hello".into(),
                node: "node-1".into(),
                node_address: "10.2.0.11".parse().unwrap(),
                zone: String::new(),
            }],
            behind_gateway: Vec::new(),
        };
        let e = foreign.check(&td).unwrap_err();
        assert!(
            e.contains("outside the cluster's trust domain west.trellis.local"),
            "{e}"
        );
        let counted = EndpointsRecord {
            endpoints: Vec::new(),
            behind_gateway: vec![GatewayGroup {
                identity: "spiffe://east.trellis.local/ns/demo/sa/hello".into(),
                count: 2,
            }],
        };
        let e = counted.check(&td).unwrap_err();
        assert!(e.contains("behindGateway claims"), "{e}");
        let e = decode::<ClusterRecord>(br#"{"name":"w","trustDomain":"w","network":"w","gateway":{"address":"10.0.0.1","hbonePort":15008,"node":"../x"}}"#)
            .unwrap()
            .check("w")
            .unwrap_err();
        assert!(e.contains("gateway node"), "{e}");
        let zero = TrafficRecord {
            weights: BTreeMap::from([("east".into(), 0)]),
        };
        assert!(zero.check().unwrap_err().contains("every weight is 0"));
    }
}

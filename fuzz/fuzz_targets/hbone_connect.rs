//! The HBONE `CONNECT` a peer sends to 15008, after h2 has parsed its frames: method,
//! `:authority`, `forwarded` and `baggage`, checked as `proxy::inbound` does
//! (`route`, `parse_baggage`), then authorized against the node's policies.
//!
//! Input: `<method>\n<authority>\n<header>:<value>\n...`. What `http` itself refuses (a bad
//! method, header name or value) never reaches ztunnel, so it ends the run.
#![no_main]

use std::sync::{Arc, OnceLock};

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use trellis_api::config::v1 as pb;
use trellis_api::slice::key_of;
use trellis_identity::SpiffeId;
use trellis_ztunnel::hbone::parse_baggage;
use trellis_ztunnel::hbone::server::ConnInfo;
use trellis_ztunnel::policy::{authorize, Source};
use trellis_ztunnel::proxy::inbound::route;
use trellis_ztunnel::state::ProxyState;

const DESTINATION: &str = "spiffe://east.trellis.local/ns/shop/sa/cart";

/// A node with one enrolled workload (10.1.1.5) and an ALLOW policy over it, and two
/// connections to it: one made to the node (Trellis's way) and one made to the workload's own
/// address (a foreign HBONE client's way).
fn node() -> &'static (ProxyState, [ConnInfo; 2]) {
    static NODE: OnceLock<(ProxyState, [ConnInfo; 2])> = OnceLock::new();
    NODE.get_or_init(|| {
        let workload = pb::Resource {
            kind: Some(pb::resource::Kind::Workload(pb::Workload {
                name: "cart-1".into(),
                namespace: "shop".into(),
                service_account: "cart".into(),
                node: trellis_fuzz::NODE.into(),
                cluster: "east".into(),
                addresses: vec![vec![10, 1, 1, 5]],
                enrolled: true,
                identity: DESTINATION.into(),
                labels: [("app".to_string(), "cart".to_string())].into(),
                ..Default::default()
            })),
        };
        let policy = pb::Resource {
            kind: Some(pb::resource::Kind::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: "cart-from-web".into(),
                namespace: "shop".into(),
                action: pb::Action::Allow as i32,
                rules: vec![pb::PolicyRule {
                    principals: vec!["ns/shop/sa/web".into()],
                    ports: vec![8080],
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let slice = [workload, policy]
            .into_iter()
            .map(|r| (key_of(&r).expect("a resource with a kind"), Arc::new(r)))
            .collect();
        let state = ProxyState::from_slice(trellis_fuzz::NODE, 1, &slice);
        assert_eq!(
            state.local.len(),
            1,
            "the fuzzed node has its workload: {:?}",
            state.problems
        );
        let conn = |to_workload| ConnInfo {
            peer_addr: "10.1.2.7:40000".parse().expect("an address"),
            peer_id: SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").expect("an ID"),
            served: SpiffeId::parse(DESTINATION).expect("an ID"),
            to_workload,
            transport: trellis_ztunnel::hbone::tunnel::Protocol::Http2,
        };
        (state, [conn(None), conn(Some([10, 1, 1, 5].into()))])
    })
}

/// Builds the request h2 would hand the server: for `CONNECT`, a URI of the authority alone.
fn request(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|b| *b == b'\n');
    let method = Method::from_bytes(lines.next()?).ok()?;
    let authority = lines.next()?;
    let uri = match Authority::try_from(authority) {
        Ok(authority) => Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.authority = Some(authority);
            parts
        })
        .ok()?,
        Err(_) => Uri::try_from(authority).ok()?,
    };
    let mut request = Request::builder().method(method).uri(uri).body(()).ok()?;
    for line in lines {
        let split = line.iter().position(|b| *b == b':')?;
        let name = HeaderName::from_bytes(&line[..split]).ok()?;
        let value = HeaderValue::from_bytes(&line[split + 1..]).ok()?;
        request.headers_mut().append(name, value);
    }
    Some(request)
}

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else {
        return;
    };
    let (state, conns) = node();
    // As `Inbound::tunnel` reads the request.
    let authority = request.uri().authority().map(|a| a.as_str().to_string());
    let _baggage = request
        .headers()
        .get("baggage")
        .and_then(|v| v.to_str().ok())
        .map(parse_baggage)
        .unwrap_or_default();
    let _forwarded = request
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    for conn in conns {
        let routed = route(request.method(), authority.as_deref(), state, conn);
        if let Ok((workload, addr)) = routed {
            let source = Source {
                principal: Some(&conn.peer_id),
                port: addr.port(),
            };
            let _ = authorize(state.policies(&workload.namespace), &workload.labels, &source);
        }
    }
});

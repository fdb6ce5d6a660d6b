//! Inbound plaintext capture (15006): connections to an enrolled pod of this node that did not
//! come through a tunnel (a client outside the mesh). They are authorized as an
//! unauthenticated source — so an ALLOW policy or a DENY on "no principal" keeps them out —
//! then delivered and counted with `connection_security_policy="none"`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::{reset, Proxy};
use crate::hbone::copy::copy_plain;
use crate::hbone::dial;
use crate::hbone::original_dst;
use crate::metrics::ConnLabels;
use crate::policy::{authorize, Decision, Source};

/// Accepts redirected plaintext connections until the drain starts.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    super::accept_loop(listener, proxy, "inbound plaintext", handle).await
}

async fn handle(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _open = proxy.drain.track();
    let started = Instant::now();
    let Ok(dst) = original_dst(&tcp, peer) else {
        tracing::warn!(%peer, "connection on 15006 without an original destination; refused");
        return reset(tcp);
    };
    let state = proxy.state();
    let Some(workload) = state.enrolled_local(dst.ip()).cloned() else {
        tracing::warn!(%peer, %dst, "plaintext capture for an address that is no enrolled workload here; refused");
        return reset(tcp);
    };
    let labels = ConnLabels {
        reporter: "destination",
        destination_workload: workload.name.clone(),
        destination_workload_namespace: workload.namespace.clone(),
        destination_principal: workload.identity.to_string(),
        destination_cluster: workload.cluster.clone(),
        connection_security_policy: "none".into(),
        ..Default::default()
    };
    let source = Source {
        principal: None,
        port: dst.port(),
    };
    if let Decision::Deny(why) = authorize(state.policies(&workload.namespace), &workload.labels, &source) {
        tracing::warn!(src = %peer, %dst, reason = %why, "plaintext connection denied");
        proxy.metrics.failure(&labels);
        return reset(tcp);
    }
    let upstream = match dial(dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::warn!(src = %peer, %dst, error = %e, "workload unreachable");
            proxy.metrics.failure(&labels);
            return reset(tcp);
        }
    };
    let counters = proxy.metrics.connection(labels, true);
    let (moved, result) = copy_plain(tcp, upstream, &counters).await;
    tracing::info!(
        target: "access",
        reporter = "destination",
        src = %peer,
        dst = %dst,
        dst_workload = %workload.name,
        security = "none",
        request_bytes = moved.upstream,
        response_bytes = moved.downstream,
        duration_ms = started.elapsed().as_millis() as u64,
        result = %super::outcome(&result),
        "connection closed"
    );
}

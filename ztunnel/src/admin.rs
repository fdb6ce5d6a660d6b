//! The three HTTP endpoints beside the data plane: metrics (15020), readiness (15021) and the
//! loopback-only admin (15000: config dump, certificates, log level). They run on the same
//! runtime as the proxy but touch only shared snapshots, never a connection's state.

use std::sync::atomic::{AtomicBool, Ordering};

use hyper::StatusCode;

pub use trellis_admin::{serve_routes as serve, Reply, Route};

/// What readiness waits for.
#[derive(Debug, Default)]
pub struct Readiness {
    pub node_svid: AtomicBool,
    pub config: AtomicBool,
    pub capture: AtomicBool,
    pub draining: AtomicBool,
}

impl Readiness {
    /// `Ok` when ready, else what is missing.
    pub fn check(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.node_svid.load(Ordering::Acquire) {
            missing.push("node SVID");
        }
        if !self.config.load(Ordering::Acquire) {
            missing.push("first config from trellisd");
        }
        if !self.capture.load(Ordering::Acquire) {
            missing.push("capture rules");
        }
        if self.draining.load(Ordering::Acquire) {
            missing.push("not draining");
        }
        match missing.is_empty() {
            true => Ok(()),
            false => Err(format!("waiting for: {}", missing.join(", "))),
        }
    }

    /// The /healthz/ready reply.
    pub fn reply(&self) -> Reply {
        match self.check() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        }
    }
}

/// The value of `key` in a query string.
pub fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let r = Readiness::default();
        r.node_svid.store(true, Ordering::Release);
        let err = r.check().unwrap_err();
        assert!(
            err.contains("first config") && err.contains("capture") && !err.contains("node SVID"),
            "{err}"
        );
        r.config.store(true, Ordering::Release);
        r.capture.store(true, Ordering::Release);
        assert!(r.check().is_ok());
        r.draining.store(true, Ordering::Release);
        assert_eq!(r.reply().0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn query_params_are_found_by_key() {
        assert_eq!(query_param(Some("a=1&level=debug"), "level"), Some("debug"));
        assert_eq!(query_param(Some("level"), "level"), None);
        assert_eq!(query_param(None, "level"), None);
    }
}

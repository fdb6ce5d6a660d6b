//! Certificate expiry on HBONE connections. The rule: an identity opens tunnels only while its
//! certificate is valid, and a tunnel, once open, is not cut when the certificate that opened
//! it expires.
//!
//! - **Server.** A connection admits new tunnels while its client's certificate is valid
//!   ([`admits_tunnels`], on the wall clock, beside a timer on tokio's). At expiry it sends
//!   GOAWAY: no new `CONNECT` is accepted (one that crossed the GOAWAY on the wire is refused
//!   with REFUSED_STREAM, which tells the client it was not processed), and the open tunnels
//!   run to their end. The connection closes when the last one has.
//! - **Client.** A pooled connection takes new tunnels only while the SVID it presented is still
//!   the source's current one and unexpired ([`takes_new_tunnels`]). SVIDs renew at half life,
//!   so new tunnels move to a connection dialled with the renewed SVID long before the server
//!   would refuse them; a connection that heard GOAWAY, or a stream refused unprocessed, sends
//!   the open once more to a fresh connection.
//!
//! Open tunnels have no deadline after expiry. Each was authorized when it opened, with a valid
//! identity and the policy of the time, as a TLS session is checked at its handshake; it
//! carries one TCP connection of a workload and ends with it. A deadline would only move the
//! cut this rule removes (every database or websocket connection dying within a day of 24 h
//! SVIDs) from the expiry to the deadline. What expiry must stop, a lapsed identity opening a
//! *new* tunnel, is stopped on both clocks.

use std::time::{Duration, SystemTime};

/// Whether a connection whose client certificate is valid until `not_after` may open a tunnel
/// at `now`. An unknown expiry admits nothing (fail closed).
pub fn admits_tunnels(not_after: Option<SystemTime>, now: SystemTime) -> bool {
    matches!(not_after, Some(t) if now < t)
}

/// How long after `now` a connection keeps admitting tunnels (see [`admits_tunnels`]): zero if
/// it admits none already.
pub fn admits_for(not_after: Option<SystemTime>, now: SystemTime) -> Duration {
    not_after.map_or(Duration::ZERO, |t| t.duration_since(now).unwrap_or_default())
}

/// What the pool knows about one of its connections when an open looks for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PooledConn {
    /// The connection closed, or the server told it to go away.
    pub gone: bool,
    /// When the SVID the connection presented expires.
    pub presented_until: SystemTime,
    /// The SVID it presented is still the one the source would present now (not renewed since,
    /// nor dropped).
    pub presented_is_current: bool,
}

/// Whether a pooled connection may carry a new tunnel at `now`. One that may not still carries
/// its open tunnels to their end; the pool closes it once it carries none.
pub fn takes_new_tunnels(conn: PooledConn, now: SystemTime) -> bool {
    !conn.gone && conn.presented_is_current && now < conn.presented_until
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + 1_000_000 * S
    }

    #[test]
    fn a_connection_admits_tunnels_until_its_client_certificate_expires() {
        let expiry = Some(t0() + 60 * S);
        assert!(admits_tunnels(expiry, t0()));
        assert!(admits_tunnels(expiry, t0() + 59 * S));
        assert!(!admits_tunnels(expiry, t0() + 60 * S), "expired at not_after exactly");
        assert!(!admits_tunnels(expiry, t0() + 3600 * S));
        assert_eq!(admits_for(expiry, t0() + 20 * S), 40 * S);
        assert_eq!(admits_for(expiry, t0() + 90 * S), Duration::ZERO);
    }

    #[test]
    fn a_client_certificate_of_unknown_expiry_admits_nothing() {
        assert!(!admits_tunnels(None, t0()));
        assert_eq!(admits_for(None, t0()), Duration::ZERO);
    }

    fn pooled() -> PooledConn {
        PooledConn {
            gone: false,
            presented_until: t0() + 60 * S,
            presented_is_current: true,
        }
    }

    #[test]
    fn a_pooled_connection_takes_tunnels_while_its_svid_is_current() {
        assert!(takes_new_tunnels(pooled(), t0()));
        assert!(takes_new_tunnels(pooled(), t0() + 59 * S));
    }

    #[test]
    fn a_renewed_svid_retires_the_connections_that_presented_the_old_one() {
        let renewed = PooledConn {
            presented_is_current: false,
            ..pooled()
        };
        assert!(!takes_new_tunnels(renewed, t0() + 30 * S), "renewed at half life");
    }

    #[test]
    fn an_expired_svid_retires_its_connection_even_if_nothing_replaced_it() {
        assert!(!takes_new_tunnels(pooled(), t0() + 60 * S));
    }

    #[test]
    fn a_connection_told_to_go_away_takes_no_tunnels() {
        let gone = PooledConn { gone: true, ..pooled() };
        assert!(!takes_new_tunnels(gone, t0()));
    }
}

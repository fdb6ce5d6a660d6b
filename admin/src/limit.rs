//! A cap on the distinct label sets of a metric family.
//!
//! Label values often come from outside the process (a peer's identity, a service a client
//! asked for), and every distinct label set is a series kept for the life of the process. A
//! [`LabelSetLimit`] admits the first `limit` distinct sets as they are; after that, a new set
//! is folded into one overflow set (its unbounded labels replaced by [`OVERFLOW`]) and counted
//! as dropped, so a family never holds more than `limit + 1` series however many sets arrive.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

/// The value of every unbounded label in a family's overflow series.
pub const OVERFLOW: &str = "other";

/// Admits at most `limit` distinct label sets; the rest share one overflow set.
pub struct LabelSetLimit<L> {
    admitted: Mutex<HashSet<L>>,
    limit: usize,
    overflow: fn(&L) -> L,
    dropped: Counter,
}

impl<L: Clone + Eq + Hash> LabelSetLimit<L> {
    /// `overflow` maps a refused set to the family's overflow set: it keeps labels whose values
    /// are a small fixed set (a reporter, a decision) and sets every other one to [`OVERFLOW`].
    /// `dropped` counts each observation so redirected.
    pub fn new(limit: usize, overflow: fn(&L) -> L, dropped: Counter) -> Self {
        Self {
            admitted: Mutex::new(HashSet::new()),
            limit,
            overflow,
            dropped,
        }
    }

    /// The label set to record `labels` under: `labels` itself if it was admitted before or
    /// there is room for it, else the overflow set.
    pub fn admit(&self, labels: L) -> L {
        let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if admitted.contains(&labels) {
            return labels;
        }
        if admitted.len() < self.limit {
            admitted.insert(labels.clone());
            return labels;
        }
        drop(admitted);
        self.dropped.inc();
        (self.overflow)(&labels)
    }

    /// Distinct label sets admitted so far (at most the limit).
    pub fn admitted(&self) -> usize {
        self.admitted.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(l: &(&'static str, String)) -> (&'static str, String) {
        (l.0, OVERFLOW.to_string())
    }

    #[test]
    fn sets_beyond_the_limit_share_one_overflow_set_and_are_counted() {
        let dropped = Counter::default();
        let limit = LabelSetLimit::new(3, other, dropped.clone());
        let mut seen = HashSet::new();
        for i in 0..1000 {
            seen.insert(limit.admit(("source", format!("w{i}"))));
        }
        assert_eq!(seen.len(), 4, "three admitted sets and one overflow set");
        assert!(seen.contains(&("source", OVERFLOW.to_string())));
        assert_eq!(dropped.get(), 997);
        assert_eq!(limit.admitted(), 3);
    }

    #[test]
    fn an_admitted_set_keeps_its_own_series_after_the_limit_is_reached() {
        let limit = LabelSetLimit::new(1, other, Counter::default());
        assert_eq!(limit.admit(("source", "a".into())), ("source", "a".into()));
        assert_eq!(limit.admit(("source", "b".into())), ("source", OVERFLOW.into()));
        assert_eq!(limit.admit(("source", "a".into())), ("source", "a".into()));
    }
}

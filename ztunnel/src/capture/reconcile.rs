//! When to install the capture rules and when to check them: a state machine with no I/O (the
//! quinn-proto shape). It is told what happened ([`set_desired`](Reconciler::set_desired),
//! [`applied`](Reconciler::applied), [`read_back`](Reconciler::read_back)) with `now`, and asked
//! what to do next ([`poll_action`](Reconciler::poll_action)) and when to be asked again
//! ([`poll_timeout`](Reconciler::poll_timeout)). [`super::driver`] runs nft for it.
//!
//! The rules:
//! - a new desired table is installed (one transaction) as soon as no nft run is in flight and no
//!   backoff is pending; one nft run at a time;
//! - the rules are **in sync** only once a read back equals the desired table; they stop being in
//!   sync the moment the desired table changes, an install or a read back fails, or a read back
//!   differs. Readiness follows [`in_sync`](Reconciler::in_sync);
//! - an install that fails or times out is retried with exponential backoff and jitter
//!   ([`Reconnect`]); so is a read back that fails, and an install whose read back differs (a
//!   kernel that does not keep what it accepted is not hammered). The backoff resets once in sync;
//! - in sync, the table is read back every `check_every`; drift (a table deleted or edited by
//!   someone else) is reinstalled at once;
//! - nothing is ever removed on failure: the last installed table stays in force.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use trellis_api::stream::Reconnect;

use super::installed::{difference, Snapshot};
use super::rules::Table;

/// The reconciler's clock settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// First retry delay after a failure; doubles with each further failure...
    pub backoff_min: Duration,
    /// ...up to this.
    pub backoff_max: Duration,
    /// How often an in-sync table is read back to catch drift.
    pub check_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            check_every: Duration::from_secs(10),
        }
    }
}

/// What the driver should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Install this script (`nft -f -`), then report with [`Reconciler::applied`].
    Apply(String),
    /// List the table (`nft -j list table ...`), then report with [`Reconciler::read_back`].
    ReadBack,
}

/// How an install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Ok,
    /// nft could not be run, or refused the script (the kernel kept the previous table).
    Failed,
    /// nft did not finish in time and was killed (an nft transaction is atomic: the kernel holds
    /// the previous table or the new one, and the read back will tell which).
    TimedOut,
}

/// What a read back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Table(Snapshot),
    /// No `ip trellis` table at all.
    Absent,
    /// nft failed or timed out: what the kernel holds is unknown.
    Unreadable,
}

/// What a read back meant, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    InSync,
    /// The installed table differs from the desired one (how), and will be reinstalled.
    Differs(String),
    /// Unknown; read again after a backoff.
    Unreadable,
    /// The desired table changed while reading: the result no longer matters.
    Superseded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Nothing,
    Apply,
    ReadBack(Why),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Verifying an install of ours.
    AfterApply,
    /// A routine check of an in-sync table.
    Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Applying { generation: u64 },
    Reading { generation: u64, why: Why },
}

/// Keeps the installed capture rules equal to the desired ones; see the module doc.
#[derive(Debug)]
pub struct Reconciler {
    timing: Timing,
    desired: Option<(Table, Snapshot)>,
    /// Bumped with every change of the desired table, so late results of older runs are told apart.
    generation: u64,
    next: Next,
    busy: Option<Busy>,
    in_sync: bool,
    backoff: Reconnect,
    retry_at: Option<Instant>,
    check_at: Option<Instant>,
    rng: SmallRng,
}

impl Reconciler {
    /// A reconciler with nothing to install yet; `seed` feeds the backoff's jitter.
    pub fn new(timing: Timing, seed: u64) -> Self {
        Self {
            timing,
            desired: None,
            generation: 0,
            next: Next::Nothing,
            busy: None,
            in_sync: false,
            backoff: Reconnect::new(timing.backoff_min, timing.backoff_max),
            retry_at: None,
            check_at: None,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Whether a read back has shown the desired table installed, and nothing has changed since.
    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// The desired table is now `table`. An unchanged table changes nothing.
    pub fn set_desired(&mut self, table: Table) {
        if self.desired.as_ref().is_some_and(|(t, _)| *t == table) {
            return;
        }
        let snapshot = table.snapshot();
        self.desired = Some((table, snapshot));
        self.generation += 1;
        self.in_sync = false;
        self.next = Next::Apply;
        self.check_at = None;
    }

    /// The next nft run to start, if one is due at `now` (at most one is in flight).
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        let (table, _) = self.desired.as_ref()?;
        if self.busy.is_some() {
            return None;
        }
        if self.next == Next::Nothing && self.check_at.is_some_and(|at| at <= now) {
            self.check_at = None;
            self.next = Next::ReadBack(Why::Check);
        }
        if self.next == Next::Nothing || self.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.retry_at = None;
        let generation = self.generation;
        match std::mem::replace(&mut self.next, Next::Nothing) {
            Next::Nothing => None,
            Next::Apply => {
                self.busy = Some(Busy::Applying { generation });
                Some(Action::Apply(table.script()))
            }
            Next::ReadBack(why) => {
                self.busy = Some(Busy::Reading { generation, why });
                Some(Action::ReadBack)
            }
        }
    }

    /// When [`poll_action`](Self::poll_action) will next have something to do, if nothing else
    /// happens first; `None` while an nft run is in flight or nothing is planned.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.busy.is_some() || self.desired.is_none() {
            return None;
        }
        match self.next {
            Next::Nothing => self.check_at,
            _ => self.retry_at,
        }
    }

    /// The install started by the last [`Action::Apply`] ended.
    pub fn applied(&mut self, outcome: Applied, now: Instant) {
        let Some(Busy::Applying { generation }) = self.busy.take() else {
            return;
        };
        match outcome {
            Applied::Ok if generation == self.generation => self.next = Next::ReadBack(Why::AfterApply),
            // A newer desired table is waiting: install it rather than verify this one.
            Applied::Ok => self.next = Next::Apply,
            Applied::Failed | Applied::TimedOut => {
                self.in_sync = false;
                self.next = Next::Apply;
                self.back_off(now);
            }
        }
    }

    /// The read back started by the last [`Action::ReadBack`] ended.
    pub fn read_back(&mut self, observed: Observed, now: Instant) -> Verdict {
        let Some(Busy::Reading { generation, why }) = self.busy.take() else {
            return Verdict::Superseded;
        };
        let Some((_, want)) = self.desired.as_ref().filter(|_| generation == self.generation) else {
            return Verdict::Superseded;
        };
        let installed = match observed {
            Observed::Table(snapshot) => Some(snapshot),
            Observed::Absent => None,
            Observed::Unreadable => {
                self.in_sync = false;
                self.next = Next::ReadBack(why);
                self.back_off(now);
                return Verdict::Unreadable;
            }
        };
        match difference(want, installed.as_ref()) {
            None => {
                self.in_sync = true;
                self.backoff.delivered();
                self.next = Next::Nothing;
                self.check_at = Some(now + self.timing.check_every);
                Verdict::InSync
            }
            Some(why_not) => {
                self.in_sync = false;
                self.next = Next::Apply;
                if why == Why::AfterApply {
                    self.back_off(now);
                }
                Verdict::Differs(why_not)
            }
        }
    }

    fn back_off(&mut self, now: Instant) {
        let jitter: f64 = self.rng.random();
        self.retry_at = Some(self.backoff.broke(now, jitter));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::rules::{desired, Plan, Ports};

    const PORTS: Ports = Ports {
        outbound: 15001,
        inbound_plain: 15006,
        hbone: 15008,
        metrics: 15020,
        readiness: 15021,
    };
    const TIMING: Timing = Timing {
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        check_every: Duration::from_secs(10),
    };

    fn table(pods: &[&str]) -> Table {
        desired(&Plan::Pods(pods.iter().map(|p| p.parse().unwrap()).collect()), PORTS)
    }

    fn installed(pods: &[&str]) -> Observed {
        Observed::Table(table(pods).snapshot())
    }

    /// A reconciler that has installed and verified `pods` at `now`.
    fn synced(pods: &[&str], now: Instant) -> Reconciler {
        let mut r = Reconciler::new(TIMING, 7);
        r.set_desired(table(pods));
        assert!(matches!(r.poll_action(now), Some(Action::Apply(_))));
        r.applied(Applied::Ok, now);
        assert_eq!(r.poll_action(now), Some(Action::ReadBack));
        assert_eq!(r.read_back(installed(pods), now), Verdict::InSync);
        r
    }

    #[test]
    fn nothing_is_done_before_a_desired_table_exists() {
        let now = Instant::now();
        let mut r = Reconciler::new(TIMING, 1);
        assert_eq!(r.poll_action(now), None);
        assert_eq!(r.poll_timeout(), None);
        assert!(!r.in_sync());
    }

    #[test]
    fn a_desired_table_is_installed_then_read_back_before_it_counts_as_in_sync() {
        let now = Instant::now();
        let mut r = Reconciler::new(TIMING, 1);
        r.set_desired(table(&["10.1.1.10"]));
        let Some(Action::Apply(script)) = r.poll_action(now) else {
            panic!("install first");
        };
        assert!(script.contains("10.1.1.10"), "{script}");
        assert_eq!(r.poll_action(now), None, "one nft run at a time");
        r.applied(Applied::Ok, now);
        assert!(!r.in_sync(), "accepted is not yet verified");
        assert_eq!(r.poll_action(now), Some(Action::ReadBack));
        assert_eq!(r.read_back(installed(&["10.1.1.10"]), now), Verdict::InSync);
        assert!(r.in_sync());
        assert_eq!(r.poll_action(now), None);
    }

    #[test]
    fn a_failed_install_is_retried_with_growing_jittered_backoff() {
        let start = Instant::now();
        let mut r = Reconciler::new(TIMING, 42);
        r.set_desired(table(&["10.1.1.10"]));
        let mut now = start;
        for failures in 1..=8u32 {
            assert!(
                matches!(r.poll_action(now), Some(Action::Apply(_))),
                "attempt {failures}"
            );
            r.applied(Applied::Failed, now);
            assert!(!r.in_sync());
            let at = r.poll_timeout().expect("a retry is planned");
            let step = TIMING
                .backoff_min
                .saturating_mul(1 << (failures - 1))
                .min(TIMING.backoff_max);
            let delay = at - now;
            assert!(
                delay >= step / 2 && delay <= step,
                "failure {failures}: {delay:?} not in [{step:?}/2, {step:?}]"
            );
            assert_eq!(
                r.poll_action(at - Duration::from_millis(1)),
                None,
                "not before the backoff"
            );
            now = at;
        }
    }

    #[test]
    fn a_timed_out_install_is_retried_like_a_failed_one() {
        let now = Instant::now();
        let mut r = Reconciler::new(TIMING, 3);
        r.set_desired(table(&["10.1.1.10"]));
        r.poll_action(now);
        r.applied(Applied::TimedOut, now);
        assert!(!r.in_sync());
        let at = r.poll_timeout().unwrap();
        assert!(at > now);
        assert!(matches!(r.poll_action(at), Some(Action::Apply(_))));
        r.applied(Applied::Ok, at);
        assert_eq!(r.poll_action(at), Some(Action::ReadBack));
        assert_eq!(r.read_back(installed(&["10.1.1.10"]), at), Verdict::InSync);
    }

    #[test]
    fn getting_in_sync_resets_the_backoff() {
        let now = Instant::now();
        let mut r = Reconciler::new(TIMING, 5);
        r.set_desired(table(&[]));
        for _ in 0..5 {
            let at = r.poll_timeout().unwrap_or(now);
            r.poll_action(at);
            r.applied(Applied::Failed, at);
        }
        let at = r.poll_timeout().unwrap();
        r.poll_action(at);
        r.applied(Applied::Ok, at);
        r.poll_action(at);
        r.read_back(installed(&[]), at);
        r.set_desired(table(&["10.1.1.10"]));
        r.poll_action(at);
        r.applied(Applied::Failed, at);
        assert!(
            r.poll_timeout().unwrap() - at <= TIMING.backoff_min,
            "back to the first step"
        );
    }

    #[test]
    fn a_change_of_the_desired_table_leaves_sync_at_once() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        r.set_desired(table(&["10.1.1.10", "10.1.1.12"]));
        assert!(!r.in_sync(), "readiness drops before nft even runs");
        let Some(Action::Apply(script)) = r.poll_action(now) else {
            panic!("install the new table");
        };
        assert!(script.contains("10.1.1.12"));
    }

    #[test]
    fn an_unchanged_desired_table_does_nothing() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        r.set_desired(table(&["10.1.1.10"]));
        assert!(r.in_sync());
        assert_eq!(r.poll_action(now), None);
    }

    #[test]
    fn a_table_desired_during_an_install_is_installed_next() {
        let now = Instant::now();
        let mut r = Reconciler::new(TIMING, 1);
        r.set_desired(table(&["10.1.1.10"]));
        r.poll_action(now);
        r.set_desired(table(&["10.1.1.12"]));
        assert_eq!(r.poll_action(now), None, "the first run is still in flight");
        r.applied(Applied::Ok, now);
        let Some(Action::Apply(script)) = r.poll_action(now) else {
            panic!("the newer table, not a read back of the older one");
        };
        assert!(script.contains("10.1.1.12") && !script.contains("10.1.1.10"));
    }

    #[test]
    fn a_read_back_overtaken_by_a_new_desired_table_is_ignored() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        let check = now + TIMING.check_every;
        assert_eq!(r.poll_action(check), Some(Action::ReadBack));
        r.set_desired(table(&["10.1.1.12"]));
        assert_eq!(r.read_back(installed(&["10.1.1.10"]), check), Verdict::Superseded);
        assert!(matches!(r.poll_action(check), Some(Action::Apply(_))));
    }

    #[test]
    fn an_in_sync_table_is_read_back_again_periodically() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        assert_eq!(r.poll_timeout(), Some(now + TIMING.check_every));
        assert_eq!(r.poll_action(now + TIMING.check_every / 2), None);
        assert_eq!(r.poll_action(now + TIMING.check_every), Some(Action::ReadBack));
        assert!(r.in_sync(), "a check in flight does not change readiness");
    }

    #[test]
    fn drift_found_by_a_check_is_reinstalled_at_once() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        let check = now + TIMING.check_every;
        r.poll_action(check);
        let Verdict::Differs(why) = r.read_back(installed(&[]), check) else {
            panic!("a stale set is drift");
        };
        assert!(why.contains("10.1.1.10"), "{why}");
        assert!(!r.in_sync());
        assert!(
            matches!(r.poll_action(check), Some(Action::Apply(_))),
            "no backoff for drift"
        );
    }

    #[test]
    fn a_missing_table_is_reinstalled() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        let check = now + TIMING.check_every;
        r.poll_action(check);
        assert_eq!(
            r.read_back(Observed::Absent, check),
            Verdict::Differs("table ip trellis is missing".into())
        );
        assert!(matches!(r.poll_action(check), Some(Action::Apply(_))));
    }

    #[test]
    fn rules_that_do_not_stick_after_an_install_back_off() {
        let now = Instant::now();
        let mut r = Reconciler::new(TIMING, 9);
        r.set_desired(table(&["10.1.1.10"]));
        r.poll_action(now);
        r.applied(Applied::Ok, now);
        r.poll_action(now);
        assert!(matches!(r.read_back(installed(&[]), now), Verdict::Differs(_)));
        assert_eq!(r.poll_action(now), None, "not at once: backoff");
        let at = r.poll_timeout().unwrap();
        assert!(matches!(r.poll_action(at), Some(Action::Apply(_))));
    }

    #[test]
    fn an_unreadable_table_is_not_in_sync_and_is_read_again_after_a_backoff() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        let check = now + TIMING.check_every;
        r.poll_action(check);
        assert_eq!(r.read_back(Observed::Unreadable, check), Verdict::Unreadable);
        assert!(!r.in_sync(), "unknown is not in sync");
        assert_eq!(r.poll_action(check), None);
        let at = r.poll_timeout().unwrap();
        assert_eq!(r.poll_action(at), Some(Action::ReadBack));
        assert_eq!(r.read_back(installed(&["10.1.1.10"]), at), Verdict::InSync);
        assert!(r.in_sync());
    }

    #[test]
    fn late_results_without_a_run_in_flight_are_ignored() {
        let now = Instant::now();
        let mut r = synced(&["10.1.1.10"], now);
        r.applied(Applied::Failed, now);
        assert!(r.in_sync());
        assert_eq!(r.read_back(Observed::Absent, now), Verdict::Superseded);
        assert!(r.in_sync());
    }
}

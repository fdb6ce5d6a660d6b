//! The thin task around [`Reconciler`]: runs nft (with a timeout, killing it and anything it
//! started when it hangs), feeds the outcomes back, and publishes readiness and the capture
//! metrics.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::installed::{self, Snapshot};
use super::reconcile::{Action, Applied, Observed, Reconciler, Timing, Verdict};
use super::rules::{Table, TABLE};
use crate::admin::Readiness;
use crate::metrics::Metrics;

/// How ztunnel runs nft.
#[derive(Debug, Clone)]
pub struct Nft {
    /// The nft binary (`nft` from `PATH` by default).
    pub path: PathBuf,
    /// How long one run may take before it is killed and counted as failed.
    pub timeout: Duration,
}

/// Why an nft run did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {0} (install nftables, and run ztunnel as root or with CAP_NET_ADMIN): {1}")]
    Spawn(String, std::io::Error),
    #[error("nft refused: {0}")]
    Refused(String),
    #[error("nft did not finish within {0:?} and was killed")]
    TimedOut(Duration),
    #[error("{0}")]
    Unparsable(String),
}

impl Nft {
    /// Installs `script` with one `nft -f -` transaction.
    pub async fn apply(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(script)).await.map(drop)
    }

    /// Lists the `ip trellis` table: `None` if there is none.
    pub async fn read_back(&self) -> Result<Option<Snapshot>, NftError> {
        match self.run(&["-j", "list", "table", "ip", TABLE], None).await {
            Ok(output) => installed::parse(&String::from_utf8_lossy(&output.stdout))
                .map(Some)
                .map_err(NftError::Unparsable),
            Err(NftError::Refused(why)) if why.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Runs nft in a process group of its own; on timeout the whole group is killed, so a wrapper
    /// script hung on a child of its own does not leave it behind.
    async fn run(&self, args: &[&str], input: Option<&str>) -> Result<Output, NftError> {
        let spawn_error = |e| NftError::Spawn(self.path.display().to_string(), e);
        let mut child = tokio::process::Command::new(&self.path)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let pid = child.id();
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let work = async {
            let write = async {
                if let (Some(mut pipe), Some(text)) = (stdin, input) {
                    // nft may exit before reading it all; its status tells what happened.
                    let _ = pipe.write_all(text.as_bytes()).await;
                }
            };
            let (_, out, err, status) = tokio::join!(write, read_all(stdout), read_all(stderr), child.wait());
            status.map(|status| Output {
                status,
                stdout: out,
                stderr: err,
            })
        };
        let finished = tokio::time::timeout(self.timeout, work).await;
        match finished {
            Ok(Ok(output)) if output.status.success() => Ok(output),
            Ok(Ok(output)) => {
                let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
                Err(NftError::Refused(if stderr.is_empty() {
                    format!("exited with {}", output.status)
                } else {
                    stderr
                }))
            }
            Ok(Err(e)) => Err(spawn_error(e)),
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: a plain syscall. The child is not reaped yet, so its process group
                    // id cannot have been reused.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                let _ = child.kill().await;
                Err(NftError::TimedOut(self.timeout))
            }
        }
    }
}

async fn read_all(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut buf).await;
    }
    buf
}

/// The result of one nft run, fed back to the reconciler.
enum Done {
    Applied(Result<(), NftError>),
    ReadBack(Result<Option<Snapshot>, NftError>),
}

/// Keeps the capture rules equal to the latest table in `desired` (`None`: no config yet) until
/// its sender is dropped. Readiness's `capture` flag and `capture_rules_in_sync` follow the
/// reconciler's [`in_sync`](Reconciler::in_sync).
pub async fn run(
    nft: Nft,
    timing: Timing,
    mut desired: watch::Receiver<Option<Table>>,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
) {
    let mut machine = Reconciler::new(timing, rand::random());
    let mut in_flight: Option<Pin<Box<dyn Future<Output = Done> + Send>>> = None;
    let mut open = true;
    let mut fresh = true;
    loop {
        if std::mem::take(&mut fresh) {
            if let Some(table) = desired.borrow_and_update().clone() {
                machine.set_desired(table);
            }
        }
        // The gauge first: whoever sees readiness change sees the gauge already changed.
        let in_sync = machine.in_sync();
        metrics.capture_in_sync.set(i64::from(in_sync));
        ready.capture.store(in_sync, Ordering::Release);
        if !open && in_flight.is_none() {
            return;
        }
        if in_flight.is_none() {
            in_flight = machine.poll_action(Instant::now()).map(|action| start(&nft, action));
        }
        let wake = machine.poll_timeout();
        tokio::select! {
            done = async { in_flight.as_mut().expect("guarded by the condition").await }, if in_flight.is_some() => {
                in_flight = None;
                feed(&mut machine, done, &metrics);
            }
            changed = desired.changed(), if open => {
                open = changed.is_ok();
                fresh = open;
            }
            () = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn start(nft: &Nft, action: Action) -> Pin<Box<dyn Future<Output = Done> + Send>> {
    let nft = nft.clone();
    match action {
        Action::Apply(script) => Box::pin(async move { Done::Applied(nft.apply(&script).await) }),
        Action::ReadBack => Box::pin(async move { Done::ReadBack(nft.read_back().await) }),
    }
}

fn feed(machine: &mut Reconciler, done: Done, metrics: &Metrics) {
    let now = Instant::now();
    let retry_in = |m: &Reconciler| {
        m.poll_timeout()
            .map(|at| at.saturating_duration_since(now).as_millis() as u64)
    };
    match done {
        Done::Applied(Ok(())) => {
            tracing::debug!("capture rules accepted by nft; reading them back");
            machine.applied(Applied::Ok, now);
        }
        Done::Applied(Err(e)) => {
            metrics.capture_apply_failures.inc();
            let outcome = match e {
                NftError::TimedOut(_) => Applied::TimedOut,
                _ => Applied::Failed,
            };
            machine.applied(outcome, now);
            tracing::error!(error = %e, retry_in_ms = retry_in(machine), "capture rules not installed; the previous rules stay in force");
        }
        Done::ReadBack(result) => {
            let was = machine.in_sync();
            let observed = match result {
                Ok(Some(snapshot)) => Observed::Table(snapshot),
                Ok(None) => Observed::Absent,
                Err(e) => {
                    metrics.capture_readback_failures.inc();
                    tracing::warn!(error = %e, "cannot read the capture rules back");
                    Observed::Unreadable
                }
            };
            match machine.read_back(observed, now) {
                Verdict::InSync if !was => tracing::info!("capture rules installed and verified"),
                Verdict::InSync | Verdict::Superseded => {}
                Verdict::Differs(why) => {
                    metrics.capture_drift.inc();
                    tracing::warn!(difference = %why, "installed capture rules differ from the desired ones; reinstalling");
                }
                Verdict::Unreadable => {
                    tracing::warn!(retry_in_ms = retry_in(machine), "capture rules unverified; not ready")
                }
            }
        }
    }
}

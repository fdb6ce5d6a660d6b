//! The lab's processes: started detached inside a network namespace with their output in the
//! state directory, recorded by pid and command line, and stopped only while that command line
//! still matches (a recycled pid is never signalled).

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::state::{Recorded, State};

/// How long `lab down` waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// A process to start in a lab namespace.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The record's name, also the log's: `trellisd-east`, `ztunnel-east-node-1`, `pod-east-demo-client`.
    pub name: String,
    pub netns: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Starts `launch` detached (own session, stdin null, stdout and stderr appended to its log) and
/// records it. `ip netns exec` execs the program, so the pid recorded is the program's.
pub fn start(state: &State, launch: &Launch) -> anyhow::Result<u32> {
    let log_path = state.log(&launch.name);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let err_log = log
        .try_clone()
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &launch.netns])
        .args(&launch.argv)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log);
    scrub_env(&mut cmd);
    cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal and session
    // so it outlives `trellis lab up` and no terminal signal reaches it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "starting {} in {}: ip netns exec {}",
            launch.name,
            launch.netns,
            launch.argv.join(" ")
        )
    })?;
    let pid = child.id();
    wait_exec(pid);
    state.record_process(&Recorded {
        name: launch.name.clone(),
        pid,
        argv: launch.argv.clone(),
    })?;
    Ok(pid)
}

/// The lab's own settings come from flags; the caller's TRELLIS_* must not leak in.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("TRELLIS_")) {
            cmd.env_remove(k);
        }
    }
}

/// Runs `argv` inside network namespace `ns` to completion (stdin closed, the caller's
/// TRELLIS_* variables removed) and returns its stdout; a failure names the command line and
/// carries its stderr.
pub fn run_in_netns(ns: &str, argv: &[String]) -> anyhow::Result<String> {
    let shown = format!("ip netns exec {ns} {}", argv.join(" "));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv).stdin(Stdio::null());
    scrub_env(&mut cmd);
    let out = cmd.output().with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = if stderr.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            stderr.trim().to_string()
        };
        bail!("`{shown}` failed ({}): {said}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits (up to a second) until the just-started `pid` shows its command line: for a moment
/// during exec it is empty, and an empty one never matches a record.
fn wait_exec(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && is_alive(pid) {
        if fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether `pid` runs (a zombie does not).
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is alive and still runs the command line it was started with. The recorded
/// argv must be a suffix of /proc/<pid>/cmdline: that also holds just before `ip netns exec`
/// execs it, and for a script run by its interpreter.
pub fn is_ours(p: &Recorded) -> bool {
    if !is_alive(p.pid) {
        return false;
    }
    let Ok(raw) = fs::read(format!("/proc/{}/cmdline", p.pid)) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    let actual: Vec<&str> = text.strip_suffix('\0').unwrap_or(&text).split('\0').collect();
    actual.len() >= p.argv.len() && actual[actual.len() - p.argv.len()..].iter().eq(p.argv.iter())
}

/// Stops the recorded processes: SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL. A pid
/// whose command line no longer matches is left alone.
pub fn stop_all(processes: &[Recorded]) {
    let ours: Vec<&Recorded> = processes.iter().filter(|p| is_ours(p)).collect();
    for p in &ours {
        signal(p.pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + TERM_GRACE;
    while ours.iter().any(|p| is_alive(p.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in ours.iter().filter(|p| is_ours(p)) {
        eprintln!("{} (pid {}) ignored SIGTERM; sending SIGKILL", p.name, p.pid);
        signal(p.pid, libc::SIGKILL);
    }
}

/// Kills (SIGKILL) every process left inside network namespace `ns`, and waits briefly for them.
pub fn kill_in_netns(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for pid in &pids {
        signal(*pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a positive pid signals that one process; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The last `n` lines of a log, for error messages and `lab status`.
pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_ours_only_while_its_command_line_matches() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let me = |argv: &[&str]| Recorded {
            name: "t".into(),
            pid: child.id(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        };
        wait_exec(child.id());
        assert!(is_ours(&me(&["sleep", "30"])));
        assert!(is_ours(&me(&["30"])), "a suffix matches");
        assert!(!is_ours(&me(&["sleep", "31"])));
        stop_all(&[me(&["sleep", "30"])]);
        let _ = child.wait();
        assert!(!is_alive(child.id()));
    }

    #[test]
    fn the_tail_of_a_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&path, 2), "b\nc");
        assert_eq!(log_tail(&dir.path().join("none"), 2), "");
    }
}

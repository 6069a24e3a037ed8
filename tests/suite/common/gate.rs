//! Commands held at a debug gate: the test starts a cmkfs command with a test hook's
//! environment variable naming a gate file; the command creates `GATE.reached` at the hook's
//! point and waits there (the hook's own limit: 20 s) until the gate file exists, so the test
//! can act at that exact point (change keys, write through a mount) and then let it go on.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a command to reach its gate, and then to end: far past every step, far
/// below a hang.
pub const GATE_GUARD: Duration = Duration::from_secs(60);

/// A command waiting at its gate ([`run_to_gate`]).
pub struct AtGate {
    child: Child,
    gate: PathBuf,
}

/// Starts `cmd` with `var=value` (the hook's setting, which names `gate`), and returns once
/// the command has reached the gate (`GATE.reached` exists). Panics, with the command's
/// stderr, if it ends first or does not get there within [`GATE_GUARD`].
#[track_caller]
pub fn run_to_gate(mut cmd: Command, var: &str, value: impl AsRef<OsStr>, gate: &Path) -> AtGate {
    cmd.env(var, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the gated command");
    let mut reached = gate.as_os_str().to_owned();
    reached.push(".reached");
    let reached = PathBuf::from(reached);
    let end = Instant::now() + GATE_GUARD;
    while !reached.exists() {
        if Instant::now() > end || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the command never reached its gate {var}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    AtGate {
        child,
        gate: gate.to_path_buf(),
    }
}

/// [`run_to_gate`], calls `at_gate` there, lets the command go on and returns its output.
#[track_caller]
pub fn run_across_a_gate(
    cmd: Command,
    var: &str,
    value: impl AsRef<OsStr>,
    gate: &Path,
    at_gate: impl FnOnce(),
) -> Output {
    let held = run_to_gate(cmd, var, value, gate);
    at_gate();
    held.release()
}

impl AtGate {
    /// Opens the gate and waits for the command to end ([`AtGate::wait`]).
    pub fn release(self) -> Output {
        fs::write(&self.gate, b"").unwrap();
        self.wait()
    }

    /// Waits for the command to end (killed past [`GATE_GUARD`]) without opening the gate
    /// (the test opened it, or lets the hook's limit end the wait): its output.
    pub fn wait(mut self) -> Output {
        let end = Instant::now() + GATE_GUARD;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.wait_with_output().unwrap()
    }
}

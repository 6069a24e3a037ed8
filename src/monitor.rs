//! The revocation monitor of a live mount: one thread that re-validates the KEK on a timer
//! and on every push from the vault, cuts the mount off when the keyring becomes
//! Inaccessible (kernel caches invalidated from this thread, never from a request handler),
//! and publishes state: a status file for `cmkfs status`, one JSON line per state change in
//! the event log, and the optional alert hook.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::keyring::{rfc3339, KeyState, Keyring, KeyringStatus, Transition};
use crate::volume::idsync::IdHealth;

/// Longest sleep between wake-ups: bounds how stale the status file's counters get.
const STATUS_REFRESH: Duration = Duration::from_secs(1);
/// An alert hook that runs longer than this is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Facts about the mount that status and events repeat.
#[derive(Clone, Debug, Serialize)]
pub struct MountFacts {
    /// Mountpoint.
    pub mountpoint: PathBuf,
    /// Backing directory.
    pub cipherdir: PathBuf,
    /// Volume id.
    pub volume_id: String,
    /// Daemon pid.
    pub pid: u32,
    /// Whether the vault pushes key changes (else only periodic checks).
    pub push: bool,
}

/// What `cmkfs status` reads: the mount's facts plus the keyring's view.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct StatusFile {
    /// Schema version of this JSON.
    pub schema: u32,
    /// Mountpoint.
    pub mountpoint: PathBuf,
    /// Backing directory.
    pub cipherdir: PathBuf,
    /// Volume id.
    pub volume_id: String,
    /// Daemon pid.
    pub pid: u32,
    /// Push notifications active.
    pub push: bool,
    /// When this file was written (RFC 3339).
    pub updated: String,
    /// How the daemon keeps its keys out of reach (absent in files of older versions).
    #[serde(default)]
    pub memory: Option<MemoryStatus>,
    /// New directories' ids whose fsync failed and that are not durable yet (`null`: none;
    /// absent in files of older versions). While there are any, every rename, link, `fsync`
    /// and `fsyncdir` of the volume fails with `errno`.
    #[serde(default)]
    pub ids_not_durable: Option<IdsNotDurable>,
    /// Keyring state and counters.
    #[serde(flatten)]
    pub keyring: serde_json::Value,
}

/// The daemon's memory protections, as it sees them itself.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MemoryStatus {
    /// Bytes of key material locked in RAM (0 once the keys are erased).
    pub locked_bytes: usize,
    /// Whether the process may be dumped or attached to by same-user processes.
    pub dumpable: bool,
    /// Whether a crash could write a core file (RLIMIT_CORE above 0).
    pub core_dumps: bool,
}

/// [`StatusFile::ids_not_durable`]: what the mount's last flush of new directories' ids
/// left (`crate::volume::idsync::NotDurable`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IdsNotDurable {
    /// How many ids wait to be written again.
    pub count: usize,
    /// The errno renames, links and fsyncs fail with meanwhile (Linux numbering).
    pub errno: i32,
    /// That errno as the system words it.
    pub error: String,
    /// The error of the latest try to write them.
    pub last_error: String,
    /// Since when (RFC 3339).
    pub since: String,
}

impl IdsNotDurable {
    fn from_health(ids: &IdHealth) -> Option<IdsNotDurable> {
        ids.now().map(|n| IdsNotDurable {
            count: n.ids,
            errno: n.errno,
            error: std::io::Error::from_raw_os_error(n.errno).to_string(),
            last_error: n.last_error,
            since: rfc3339(n.since),
        })
    }
}

impl MemoryStatus {
    /// The current values.
    pub fn now() -> MemoryStatus {
        MemoryStatus {
            locked_bytes: crate::crypto::secret::locked_bytes(),
            dumpable: crate::process::dumpable(),
            core_dumps: crate::process::core_limit() > 0,
        }
    }
}

/// One state change, as logged and as given to the alert hook.
#[derive(Clone, Debug, Serialize)]
pub struct StateEvent {
    /// RFC 3339.
    pub time: String,
    /// Always `StateChange`.
    pub event: &'static str,
    /// Mountpoint.
    pub mountpoint: PathBuf,
    /// Volume id.
    pub volume_id: String,
    /// Previous state.
    pub from: String,
    /// New state.
    pub to: String,
    /// Why (Degraded / Inaccessible).
    pub reason: Option<String>,
    /// KEK id.
    pub key_id: String,
}

/// Where the monitor publishes.
pub struct MonitorSinks {
    /// Status file (rewritten when anything changes).
    pub status_path: PathBuf,
    /// Event log (JSON lines, appended).
    pub events_path: PathBuf,
    /// `sh -c` command run per state change with the event JSON on stdin.
    pub on_state_change: Option<String>,
}

/// What wakes the monitor before its next timed check.
enum Wake {
    /// The vault pushed a change.
    Push,
    /// The vault's push channel closed: periodic checks only from now on.
    PushClosed,
    /// Something the status file shows changed (new directories' ids): rewrite it now.
    Status,
    /// The mount ended: exit at once.
    Stop,
}

/// The running monitor thread.
pub struct Monitor {
    thread: std::thread::JoinHandle<()>,
    wake: Sender<Wake>,
}

impl Monitor {
    /// Stops the thread and waits for it: at once, not at its next timed wake-up (a sleeping
    /// monitor used to hold every unmount up to [`STATUS_REFRESH`]).
    pub fn stop(self) {
        let _ = self.wake.send(Wake::Stop);
        let _ = self.thread.join();
    }
}

/// Starts the monitor; it runs until [`Monitor::stop`]. `cut_off` invalidates the kernel's
/// caches; `ids` is the volume's [`IdHealth`], published in the status file (rewritten as soon
/// as it changes). Returns once the first status file is written (or after 10 s).
pub fn spawn(
    keyring: Arc<Keyring>,
    facts: MountFacts,
    sinks: MonitorSinks,
    ids: IdHealth,
    push: Option<Receiver<()>>,
    cut_off: Box<dyn Fn() + Send>,
) -> std::io::Result<Monitor> {
    let (ready_tx, ready_rx) = sync_channel::<()>(1);
    let (wake, wakes) = channel::<Wake>();
    if let Some(push) = push {
        // The vault's channel and the stop request meet in one channel the monitor waits on.
        // This thread ends when the vault drops its end, or with the process.
        let wake = wake.clone();
        std::thread::Builder::new()
            .name("cmkfs-push".into())
            .spawn(move || {
                while push.recv().is_ok() {
                    if wake.send(Wake::Push).is_err() {
                        return;
                    }
                }
                let _ = wake.send(Wake::PushClosed);
            })?;
    }
    {
        // A failing disk shows in `cmkfs status` at once, not at the next refresh.
        let wake = wake.clone();
        ids.on_change(move || {
            let _ = wake.send(Wake::Status);
        });
    }
    let handle = std::thread::Builder::new()
        .name("cmkfs-monitor".into())
        .spawn(move || {
            // This thread writes state files (status, events, DES records) while the FUSE
            // threads run with umask 0 for backing entries: give it a private umask.
            if let Err(e) = crate::process::private_thread_umask() {
                tracing::warn!(error = %e, "cannot give the monitor a private umask");
            }
            let mut last_status = String::new();
            let initial = Transition {
                from: KeyState::Locked,
                to: keyring.state(),
                at: SystemTime::now(),
            };
            // The status file first, and only then is the mount announced ready (below):
            // `cmkfs status` right after `cmkfs mount` finds it. The event's hook (a user
            // command) runs after.
            last_status = write_status(&keyring, &facts, &ids, &sinks, last_status);
            let _ = ready_tx.send(());
            publish_event(&keyring, &facts, &sinks, &initial);
            loop {
                let wait = keyring
                    .next_check()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(STATUS_REFRESH);
                let pushed = match wakes.recv_timeout(wait) {
                    Ok(Wake::Push) => true,
                    Ok(Wake::PushClosed) => {
                        tracing::warn!(
                            "vault push channel closed; falling back to periodic checks"
                        );
                        false
                    }
                    Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                    Ok(Wake::Status) | Err(RecvTimeoutError::Timeout) => false,
                };
                if pushed || SystemTime::now() >= keyring.next_check() {
                    let handle = |t: Option<Transition>| {
                        if let Some(t) = t {
                            if matches!(t.to, KeyState::Inaccessible { .. }) {
                                // Plaintext kept for reuse in the data path's buffers goes
                                // with the keys.
                                crate::volume::bufpool::wipe();
                                cut_off();
                            } else if t.to == KeyState::Accessible {
                                // Keys usable again: the data path may keep its buffers.
                                crate::volume::bufpool::reopen();
                            }
                            publish_event(&keyring, &facts, &sinks, &t);
                        }
                    };
                    // The key check first: a header changed on disk is judged before anything
                    // acts on it. DES auto-rotation (issue 4 item 7) rides on the check, so it
                    // happens within one key-check interval of a new key version, and only
                    // while the volume is accessible; a rotation is validated by a second
                    // check at once.
                    handle(keyring.check());
                    if keyring.state() == KeyState::Accessible {
                        // The embedded vault has no server to apply its rotation policies: a
                        // mount's checks do it (a no-op for remote vaults, whose server does),
                        // so an auto-rotating DES follows a policy's new version at once.
                        match keyring.vault().apply_due_rotations() {
                            Ok(made) => {
                                for k in made {
                                    tracing::info!(kid = %k.kid, "rotation policy made a new key version");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot apply rotation policies"),
                        }
                    }
                    if keyring.state() == KeyState::Accessible
                        && crate::des::auto_rotate_mounted(&facts.cipherdir, keyring.vault())
                    {
                        handle(keyring.check());
                    }
                }
                last_status = write_status(&keyring, &facts, &ids, &sinks, last_status);
            }
        })?;
    // Bounded: a status file that cannot be written (a full disk) must not hold up the mount;
    // the thread logs that itself.
    let _ = ready_rx.recv_timeout(Duration::from_secs(10));
    Ok(Monitor {
        thread: handle,
        wake,
    })
}

fn publish_event(keyring: &Keyring, facts: &MountFacts, sinks: &MonitorSinks, t: &Transition) {
    let ev = StateEvent {
        time: rfc3339(t.at),
        event: "StateChange",
        mountpoint: facts.mountpoint.clone(),
        volume_id: facts.volume_id.clone(),
        from: t.from.name().into(),
        to: t.to.name().into(),
        reason: t.to.reason().map(str::to_string),
        key_id: keyring.key_id(),
    };
    let Ok(line) = serde_json::to_string(&ev) else {
        return;
    };
    match &t.to {
        KeyState::Inaccessible { reason } => {
            tracing::warn!(reason = %reason, "volume is now Inaccessible")
        }
        KeyState::Degraded { reason } => tracing::warn!(reason = %reason, "volume is now Degraded"),
        s => tracing::info!(state = s.name(), "volume state"),
    }
    if let Some(dir) = sinks.events_path.parent() {
        let _ = crate::fsutil::create_private_dir(dir);
    }
    // One write of a whole line with O_APPEND: lines from several mounts never interleave.
    let appended = crate::fsutil::open_private_append(&sinks.events_path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = appended {
        tracing::warn!(error = %e, path = %sinks.events_path.display(), "cannot append to the event log");
    }
    if let Some(cmd) = &sinks.on_state_change {
        run_hook(cmd.clone(), line);
    }
}

/// Runs the alert hook without blocking the monitor; kills it after [`HOOK_TIMEOUT`].
fn run_hook(cmd: String, event: String) {
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return tracing::warn!(error = %e, "cannot run the --on-state-change hook"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(event.as_bytes());
        let _ = stdin.write_all(b"\n");
    }
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if !status.success() => {
                    return tracing::warn!(%status, "the --on-state-change hook failed")
                }
                Ok(Some(_)) => return,
                Ok(None) if start.elapsed() > HOOK_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return tracing::warn!("the --on-state-change hook timed out and was killed");
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => return,
            }
        }
    });
}

/// The status document for the current moment.
pub fn status_doc(keyring: &Keyring, facts: &MountFacts, ids: &IdHealth) -> StatusFile {
    let ks: KeyringStatus = keyring.status();
    StatusFile {
        schema: 1,
        mountpoint: facts.mountpoint.clone(),
        cipherdir: facts.cipherdir.clone(),
        volume_id: facts.volume_id.clone(),
        pid: facts.pid,
        push: facts.push,
        updated: rfc3339(SystemTime::now()),
        memory: Some(MemoryStatus::now()),
        ids_not_durable: IdsNotDurable::from_health(ids),
        keyring: serde_json::to_value(ks).unwrap_or_default(),
    }
}

fn write_status(
    keyring: &Keyring,
    facts: &MountFacts,
    ids: &IdHealth,
    sinks: &MonitorSinks,
    last: String,
) -> String {
    let mut doc = status_doc(keyring, facts, ids);
    // Compare without the timestamp so an idle mount does not rewrite its file every second.
    doc.updated.clear();
    let key = serde_json::to_string(&doc).unwrap_or_default();
    if key == last {
        return last;
    }
    doc.updated = rfc3339(SystemTime::now());
    if let Ok(json) = serde_json::to_vec_pretty(&doc) {
        // Not fsynced: the status file is a live view, rebuilt by the next write.
        if crate::fsutil::replace_private(&sinks.status_path, &json).is_err() {
            tracing::warn!(path = %sinks.status_path.display(), "cannot write the status file");
        }
    }
    key
}

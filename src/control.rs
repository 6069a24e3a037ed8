//! A mount's control socket, `$CMKFS_HOME/run/mount-<hash>.sock` (0600 in the private run
//! directory; a peer must be the daemon's user or root, checked with `SO_PEERCRED`): how
//! commands reach work that only the mount's own process can do while it serves.
//!
//! One request per connection, a JSON line; answers are JSON lines:
//!
//! * `{"op":"reencrypt"}` — runs (or resumes) the volume's re-encryption inside the mount
//!   ([`crate::volume::reencrypt`], online): `{"progress":{..}}` lines, then `{"done":{..}}`
//!   or `{"error":".."}`. When the client goes away the re-encryption stops at its next step
//!   (a crash-safe point) and resumes with the next request.
//! * `{"op":"freeze"}` — closes the write gate: every change through the mount waits (reads
//!   go on; with the writeback cache, the kernel's cached writes are drained first, see
//!   `crate::fs::drain`, and a drain that does not end in time is `{"error":".."}`; a
//!   client that goes away during the drain ends it at once, the mount thawed),
//!   [`FrozenAnswer`] is answered (`{"frozen":true,"exact":true}`, or
//!   `{"frozen":false,"exact":false}` when the drain missed a file), and the gate opens
//!   again when the client sends
//!   `thaw` (any line but `renew`) or goes away, or when no `renew` line came for the
//!   mount's `--freeze-limit` (a lease: a stuck client cannot hold writers forever); then
//!   `{"thawed":"<why>"}`. What a backup of a mounted volume reads meanwhile is one point
//!   in time.
//! * `{"op":"keeprootmtime"}` — for another process that replaces a control file in the
//!   backing root (a Disk Encryption Set rewrap's header, [`crate::des`]): takes the root gate
//!   as the mount's own control-file writes do ([`crate::volume::Volume::keeping_root_mtime`]),
//!   answers `{"rootgate":true}` (`false`: requests kept changing the root; nothing will be put
//!   back), and when the client sends a line or goes away (or after [`ROOT_HOLD_LIMIT`]) puts
//!   the root's mtime back, lets the root's changes go on and answers `"released"`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fs::OnlineHandle;
use crate::home::Home;
use crate::keyring::Keyring;
use crate::unlock::HeaderHandle;
use crate::volume::reencrypt::{Hooks, Progress, Report, Session, Step};

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Run or resume the re-encryption.
    Reencrypt {
        /// Delete `cmkfs.quarantine/` rather than refuse (`--discard-quarantine`).
        #[serde(default)]
        discard_quarantine: bool,
    },
    /// Hold every change back until the connection ends.
    Freeze,
    /// Hold the root's changes back while the client replaces a control file in the backing
    /// root, then put the root's mtime back.
    KeepRootMtime,
}

/// An answer line (but the one that says a freeze is held: [`FrozenAnswer`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    /// How far a re-encryption is.
    Progress(Progress),
    /// The re-encryption finished.
    Done(Report),
    /// Writes go on again, and why: `released` (the client said so or went away), or the
    /// freeze outlived its limit without a `renew` (a backup taken meanwhile is not a
    /// point-in-time view).
    Thawed(String),
    /// The root gate is held (`false`: requests kept changing the root, and the root's
    /// mtime will not be put back).
    RootGate(bool),
    /// The root's mtime is put back and its changes go on.
    Released,
    /// What went wrong.
    Error(String),
}

/// The answer to `freeze` once writes are held back: `{"frozen":true,"exact":true}` when the
/// drain before it reached every file open through the mount (or had none to do),
/// `{"frozen":false,"exact":false}` when it could not reach one (see
/// [`crate::fs::Drained::exact`]): a `write(2)` into that file that returned before the freeze
/// may be missing from a backup, or in it in part.
///
/// Older versions spoke two shapes of it, and the line is kept one that each reads safely:
///
/// * Daemons before `exact` (up to d62fd71) answered `{"frozen":true}` even when their drain
///   missed a file; session 9's daemons answered `{"frozen":<exact>}`. Neither can be told
///   from the other, so an answer without `exact` is never taken as one point in time
///   ([`FrozenAnswer::exact`]): the backup goes on, frozen, and says `point_in_time: false`.
/// * Clients before `exact` took only `"frozen":true` as a freeze (anything else refused the
///   backup, which then, with `--force`, is not one point in time); session 9's clients read
///   `frozen` as `exact`. Hence `frozen` equals `exact`: neither records a backup whose drain
///   missed a file as one point in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenAnswer {
    /// The same as `exact` (what older clients read); every answer of this shape means that
    /// writes are held back.
    pub frozen: bool,
    /// Whether the drain reached every file open through the mount (`None`: an older daemon
    /// that did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<bool>,
}

impl FrozenAnswer {
    /// What the daemon answers after a drain that was `exact` or not.
    pub fn new(exact: bool) -> FrozenAnswer {
        FrozenAnswer {
            frozen: exact,
            exact: Some(exact),
        }
    }

    /// Whether what a backup reads under this freeze is one point in time: only when the
    /// daemon says so in `exact` (older daemons' answers are not).
    pub fn exact(&self) -> bool {
        self.frozen && self.exact == Some(true)
    }

    /// Whether the daemon that answered predates `exact` (it cannot say whether its drain
    /// reached every file).
    pub fn from_older_daemon(&self) -> bool {
        self.exact.is_none()
    }
}

/// The control socket of the mount at `mountpoint`.
pub fn socket_path(home: &Home, mountpoint: &Path) -> PathBuf {
    crate::mount::RunRecord::socket_path(home, mountpoint)
}

/// The line a freezing client sends to hold its freeze for another `--freeze-limit`.
pub const RENEW: &str = "renew";

/// The reason in [`Answer::Thawed`] when a revocation (the KEK cut off) ended the freeze:
/// the client names the revocation and its remedy rather than the freeze's time limit.
pub const THAWED_REVOKED: &str = "the volume's key was revoked";

/// A request line longer than this is refused (requests are a few dozen bytes).
const MAX_REQUEST: u64 = 4096;
/// The longest a backup's freeze waits for the kernel's cached writes to be written back
/// (never longer than the mount's `--freeze-limit`).
const DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// How often a freeze looks for a cut-off that ends it.
const LIFT_POLL: Duration = Duration::from_millis(100);
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a `keeprootmtime` client may hold the root's changes back: replacing a header
/// takes milliseconds; a client that is stuck does not hold the mount's users for longer.
pub const ROOT_HOLD_LIMIT: Duration = Duration::from_secs(10);

/// What the control thread works with.
pub struct Control {
    /// The cmkfs home.
    pub home: Home,
    /// The mount's keyring (its vault connection reaches the KEK).
    pub keyring: Arc<Keyring>,
    /// The header the mount's checks compare with.
    pub handle: HeaderHandle,
    /// The filesystem's side.
    pub online: OnlineHandle,
    /// How long a freeze lasts without a `renew` line (`cmkfs mount --freeze-limit`).
    pub freeze_limit: Duration,
    /// Where the volume is mounted (a freeze drains the kernel's cached writes through it).
    pub mountpoint: PathBuf,
}

/// Binds the socket at `path` (a stale one from a crashed daemon is replaced) and serves it
/// on a thread of its own.
pub fn spawn(path: PathBuf, ctl: Control) -> io::Result<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let ctl = Arc::new(ctl);
    let busy = Arc::new(Mutex::new(()));
    std::thread::Builder::new()
        .name("cmkfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if !peer_allowed(&conn) {
                    let _ = answer(&conn, &Answer::Error("not allowed".into()));
                    continue;
                }
                let (ctl, busy) = (ctl.clone(), busy.clone());
                let _ = std::thread::Builder::new()
                    .name("cmkfs-control-conn".into())
                    .spawn(move || serve(conn, &ctl, &busy));
            }
        })
}

/// Only the daemon's own user and root may use the socket.
fn peer_allowed(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills `cred` (of the size given) for a valid socket.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    r == 0 && (cred.uid == me || cred.uid == 0)
}

fn answer(conn: &UnixStream, a: &Answer) -> io::Result<()> {
    send_line(conn, a)
}

/// `a` as one JSON line.
fn send_line(mut conn: &UnixStream, a: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(a).map_err(io::Error::other)?;
    line.push(b'\n');
    conn.write_all(&line)
}

/// Shuts a connection down when dropped (a panic included): the client then reads the end
/// of the stream, and the watcher thread, which holds a clone of the socket, its end too.
/// Without it a request that died left its client waiting forever (issue 13's "stall").
struct Hangup<'a>(&'a UnixStream);

impl Drop for Hangup<'_> {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

fn serve(conn: UnixStream, ctl: &Control, busy: &Mutex<()>) {
    let _hangup = Hangup(&conn);
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    // A client that sends nothing, or too much, does not hold a thread.
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = String::new();
    if (&mut reader)
        .take(MAX_REQUEST)
        .read_line(&mut line)
        .is_err()
        || !line.ends_with('\n')
    {
        let _ = answer(
            &conn,
            &Answer::Error("no request line (or one too long)".into()),
        );
        return;
    }
    let _ = conn.set_read_timeout(None);
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let _ = answer(&conn, &Answer::Error(format!("bad request: {e}")));
            return;
        }
    };
    // The client going away, or sending any line but `renew`, ends the request. The lines
    // go to `lines` (`None`: the end); the thread ends when the connection does.
    let gone = Arc::new(AtomicBool::new(false));
    let (tx, lines) = std::sync::mpsc::channel::<Option<String>>();
    {
        let gone = gone.clone();
        std::thread::spawn(move || loop {
            let mut l = String::new();
            match (&mut reader).take(MAX_REQUEST).read_line(&mut l) {
                Ok(n) if n > 0 && l.ends_with('\n') => {
                    if l.trim() != RENEW {
                        gone.store(true, Ordering::SeqCst);
                    }
                    if tx.send(Some(l)).is_err() {
                        break;
                    }
                }
                _ => {
                    gone.store(true, Ordering::SeqCst);
                    let _ = tx.send(None);
                    break;
                }
            }
        });
    }
    match req {
        Request::Freeze => {
            let vol = ctl.online.volume().clone();
            let lifts = vol.gates().lifts();
            let (frozen, exact) = match ctl.online.freeze_for_backup(
                &vol,
                &ctl.mountpoint,
                DRAIN_LIMIT.min(ctl.freeze_limit),
                &gone,
            ) {
                Ok((f, drained)) => (f, drained.is_none_or(|d| d.exact)),
                Err(e) => {
                    tracing::warn!(error = %e, "no freeze for the backup");
                    let _ = answer(&conn, &Answer::Error(e.to_string()));
                    return;
                }
            };
            tracing::info!(limit = ?ctl.freeze_limit, exact, "writes frozen for a backup");
            let mut why = "released";
            if send_line(&conn, &FrozenAnswer::new(exact)).is_ok() {
                // A lease: each `renew` line holds the freeze for another `freeze_limit`.
                // A client that is stuck (stopped, hung on something else) does not hold
                // every writer of the mount forever. A cut-off ends it at once: its
                // invalidation writes the kernel's dirty pages back, which must not wait.
                let mut renewed = std::time::Instant::now();
                loop {
                    if vol.gates().lifted_since(lifts) {
                        why = THAWED_REVOKED;
                        break;
                    }
                    match lines.recv_timeout(LIFT_POLL) {
                        Ok(Some(l)) if l.trim() == RENEW => renewed = std::time::Instant::now(),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            if renewed.elapsed() >= ctl.freeze_limit {
                                why =
                                    "the freeze was not renewed within the mount's --freeze-limit";
                                break;
                            }
                        }
                        _ => break,
                    }
                }
            }
            drop(frozen);
            if why == "released" {
                tracing::info!("writes thawed");
            } else {
                tracing::warn!(limit = ?ctl.freeze_limit, "writes thawed: {why}");
            }
            let _ = answer(&conn, &Answer::Thawed(why.into()));
        }
        Request::KeepRootMtime => {
            let vol = ctl.online.volume().clone();
            vol.keeping_root_mtime(|k| {
                if answer(&conn, &Answer::RootGate(k.held())).is_ok() {
                    let _ = lines.recv_timeout(ROOT_HOLD_LIMIT);
                }
            });
            let _ = answer(&conn, &Answer::Released);
        }
        Request::Reencrypt { discard_quarantine } => {
            let running = match busy.try_lock() {
                Ok(g) => g,
                // A run that panicked poisoned it; it is over all the same.
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    let _ = answer(
                        &conn,
                        &Answer::Error("a re-encryption of this volume is already running".into()),
                    );
                    return;
                }
            };
            // A bug in the run must end the request with an answer, never leave the client
            // waiting: the run stops where it was, which is always a state the mount serves.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                reencrypt(&conn, ctl, &gone, discard_quarantine)
            }))
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "online re-encryption failed on a bug");
                finish_interrupted(ctl);
                Err(format!(
                    "internal error ({what}); the re-encryption stopped at a safe point and \
                     resumes with `cmkfs volume reencrypt --online`"
                ))
            });
            let a = match r {
                Ok(report) => Answer::Done(report),
                Err(e) => Answer::Error(e),
            };
            // Free before the client hears the end: a next request it sends at once must
            // not find this one still "running".
            drop(running);
            let _ = answer(&conn, &a);
        }
    }
}

fn reencrypt(
    conn: &UnixStream,
    ctl: &Control,
    gone: &AtomicBool,
    discard_quarantine: bool,
) -> Result<Report, String> {
    let vol = ctl.online.volume().clone();
    let access =
        crate::unlock::ReencryptAccess::new(&ctl.home, ctl.keyring.vault(), ctl.handle.clone())
            .map_err(|e| e.to_string())?;
    let mut progress = |p: &Progress| {
        if answer(conn, &Answer::Progress(p.clone())).is_err() {
            gone.store(true, Ordering::SeqCst);
        }
    };
    // The client going away stops the run after its next batch. Never inside the names
    // phase: the mount looks names up under the new key only, so that phase runs to its end
    // (with every request held back) once started.
    let mut fault = |step| {
        if matches!(step, Step::JournalRetired | Step::NamesDone) && gone.load(Ordering::SeqCst) {
            Err(io::Error::other("the client went away"))
        } else {
            Ok(())
        }
    };
    tracing::info!("online re-encryption requested");
    let r = Session::new(
        &vol,
        &access,
        Some(&ctl.online),
        Hooks {
            progress: Some(&mut progress),
            fault: Some(&mut fault),
        },
    )
    .discard_quarantine(discard_quarantine)
    .run();
    match r {
        Ok(report) => {
            tracing::info!(
                files = report.files,
                bytes = report.bytes,
                "online re-encryption finished"
            );
            Ok(report)
        }
        Err(e) => {
            tracing::warn!(error = %e, "online re-encryption stopped; it resumes with `cmkfs volume reencrypt --online`");
            Err(e.to_string())
        }
    }
}

/// After a run that panicked: a batch may be half written (new ciphertext under a header
/// that still names the old key), which the mount would serve wrongly. What a remount does
/// first is done here: the journal's interrupted step is finished. If that fails too, the
/// daemon stops (a remount recovers the same way) rather than serve a file it cannot read
/// correctly.
fn finish_interrupted(ctl: &Control) {
    use crate::volume::reencrypt::ReencryptError;
    use crate::volume::VolumeError;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let vol = ctl.online.volume().clone();
        let access = crate::unlock::ReencryptAccess::new(
            &ctl.home,
            ctl.keyring.vault(),
            ctl.handle.clone(),
        )?;
        Session::new(&vol, &access, Some(&ctl.online), Hooks::default())
            .recover()
            .map(|_| ())
    }));
    match r {
        Ok(Ok(())) => tracing::info!("the interrupted re-encryption step was finished"),
        // The keys are gone: nothing is served meanwhile, and the next run (or a remount)
        // finishes the step first.
        Ok(Err(
            e @ (ReencryptError::Revoked(_) | ReencryptError::Volume(VolumeError::Inaccessible(_))),
        )) => tracing::warn!(error = %e, "the interrupted re-encryption step waits for access"),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "a bug".to_string(),
            };
            tracing::error!(
                error = %why,
                "the interrupted re-encryption step cannot be finished; the daemon stops so \
                 that no half-converted file is served (mount again: it finishes the step)"
            );
            std::process::abort();
        }
    }
}

/// Sends `req` to the mount at `mountpoint` and returns the connection, for the caller to read
/// the answers of.
pub fn connect(home: &Home, mountpoint: &Path, req: &Request) -> io::Result<UnixStream> {
    let path = socket_path(home, mountpoint);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the mount's control socket {} ({e}); the mount may be from an \
                 older cmkfs: unmount and mount it again",
                path.display()
            ),
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(s)
}

/// Reads one answer line (`None` at the end).
pub fn read_answer(r: &mut impl BufRead) -> io::Result<Option<Answer>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(line.trim())
        .map(Some)
        .map_err(|e| io::Error::other(format!("bad answer from the mount: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// How `cmkfs backup` before `exact` (d62fd71) read a freeze answer: a freeze, and so one
    /// point in time, on `{"frozen":true}` only; anything else refused the backup (or, with
    /// `--force`, made it no point in time).
    fn d62fd71_client_point_in_time(line: &str) -> bool {
        let v: Value = serde_json::from_str(line).unwrap();
        v.get("frozen") == Some(&Value::Bool(true))
    }

    /// How session 9's client (b8a38ae) read it: frozen on any boolean `frozen`, one point in
    /// time when it is `true`.
    fn b8a38ae_client_point_in_time(line: &str) -> bool {
        let v: Value = serde_json::from_str(line).unwrap();
        v.get("frozen").and_then(Value::as_bool) == Some(true)
    }

    fn line(a: FrozenAnswer) -> String {
        serde_json::to_string(&a).unwrap()
    }

    /// A new daemon's answers, read by older clients: a drain that missed a file is one
    /// point in time to neither (the d62fd71 client refuses it as no freeze), an exact one
    /// is to both.
    #[test]
    fn older_clients_never_take_an_inexact_freeze_of_a_new_daemon_as_a_point_in_time() {
        let inexact = line(FrozenAnswer::new(false));
        let exact = line(FrozenAnswer::new(true));
        assert_eq!(
            serde_json::from_str::<Value>(&inexact).unwrap(),
            json!({"frozen": false, "exact": false})
        );
        assert_eq!(
            serde_json::from_str::<Value>(&exact).unwrap(),
            json!({"frozen": true, "exact": true})
        );
        assert!(!d62fd71_client_point_in_time(&inexact));
        assert!(!b8a38ae_client_point_in_time(&inexact));
        assert!(d62fd71_client_point_in_time(&exact));
        assert!(b8a38ae_client_point_in_time(&exact));
    }

    /// Older daemons' answers, read by this client: a freeze held, never one point in time
    /// (d62fd71 answered `{"frozen":true}` after a drain that missed a file; session 9's
    /// `{"frozen":true}` cannot be told from it), and said to come from an older daemon.
    #[test]
    fn an_older_daemons_freeze_answer_is_never_taken_as_exact() {
        for old in [r#"{"frozen":true}"#, r#"{"frozen":false}"#] {
            let a: FrozenAnswer = serde_json::from_str(old).unwrap();
            assert!(!a.exact(), "{old}");
            assert!(a.from_older_daemon(), "{old}");
        }
        let a: FrozenAnswer = serde_json::from_str(r#"{"frozen":true,"exact":true}"#).unwrap();
        assert!(a.exact() && !a.from_older_daemon());
        // Contradictions (no daemon sends them) are not exact either.
        for odd in [
            r#"{"frozen":true,"exact":false}"#,
            r#"{"frozen":false,"exact":true}"#,
        ] {
            let a: FrozenAnswer = serde_json::from_str(odd).unwrap();
            assert!(!a.exact(), "{odd}");
        }
        // An error is no freeze.
        assert!(serde_json::from_str::<FrozenAnswer>(r#"{"error":"x"}"#).is_err());
    }
}

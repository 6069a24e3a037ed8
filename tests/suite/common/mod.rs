//! Harness for the integration tests that mount real cmkfs volumes through FUSE.
//!
//! The tests drive the `cmkfs` binary exactly as a user would (`init`, `mount`, `umount`,
//! `info`) and then use plain `std::fs` calls on the mountpoint. Three promises keep a broken
//! build from wedging CI:
//!
//! 1. **Every child process has a time limit.** [`run_with_timeout`] spawns the command in its
//!    own process group with stdout/stderr going to anonymous temp files (never pipes: a
//!    daemonizing `cmkfs mount` leaves a daemon that may keep inherited pipes open forever, and
//!    nextest would report it as a leak), polls for exit, and kills the whole group on timeout.
//! 2. **Every mount is unmounted, even when the test panics.** [`Mount`] is an RAII guard whose
//!    `Drop` escalates: `cmkfs umount` (with a time limit) → `umount2(MNT_DETACH)` → abort the
//!    FUSE connection through fusectl → SIGTERM/SIGKILL the daemon. [`Env`]'s own `Drop` sweeps
//!    once more for anything still mounted or running under its private temp root before the
//!    temp dir is deleted (deleting through a live mount would delete through the filesystem).
//! 3. **A hung filesystem makes the test fail, not hang.** Each [`Mount`] has a watchdog thread;
//!    if the mount is still live after [`watchdog_limit`] it aborts the FUSE connection, so every
//!    syscall blocked on the daemon returns `ENOTCONN` and the test panics normally.
//!
//! Finding the daemon of a daemonized mount: `cmkfs mount` forks and its parent exits, so we do
//! not own the daemon's pid. Every test uses private temp paths, so the harness scans `/proc`
//! for a `cmkfs` process whose argv contains `mount` and this exact mountpoint path (a scoped
//! `pgrep -f`), plus the pid in the mount's run record under `$CMKFS_HOME/run` when there is
//! one ([`daemon_pids_of`]). The `--foreground` variant keeps the daemon as our own child.
//!
//! `scripts/test.sh` adds a last line of defence for a test process killed outright (nextest's
//! terminate-after, SIGKILL): it gives each run a directory of its own, `$CMKFS_TEST_RUN_DIR`
//! ([`run_dir`]), and on exit aborts and lazily unmounts any FUSE mount left under it (only
//! this run's: a suite running beside it keeps its mounts).

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

pub mod gate;
pub mod own_files;
pub use gate::{run_across_a_gate, run_to_gate, AtGate};
pub use own_files::spawn_own_files;
pub mod sys;
pub mod v1_fixture;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Time limit for one short CLI command (`init` generates an RSA key: well under a second in
/// practice; the limit is a hang guard, not a speed assertion).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for a mount to become visible in `/proc/self/mountinfo`.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit for `cmkfs umount` and for the mount to disappear afterwards.
pub const UMOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// Time limit for the daemon to exit once its mount is gone.
pub const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Mount::unmount`] tries again when the mount is busy.
pub const BUSY_RETRY: Duration = Duration::from_secs(10);
/// RSA key size the tests ask for: the smallest allowed, to keep key generation quick.
pub const KEY_SIZE: &str = "2048";
/// The volume header's file name at the backing dir root (docs/FORMAT.md).
pub const HEADER_NAME: &str = "cmkfs.volume.json";
/// Bytes of the per-file header (file id, version) at the start of every non-empty backing
/// file. Where the data starts is the volume's: [`data_offset`].
pub const FILE_HEADER_LEN: u64 = cmkfs::volume::FILE_HEADER_LEN as u64;
/// AES-XTS data unit size of the volume format.
pub const SECTOR: usize = 4096;

/// The on-disk layout of the volume in `cipher`, from its header (v3 for what `cmkfs init`
/// makes, v2 for `--format 2` and upgraded volumes).
pub fn layout_of(cipher: &Path) -> cmkfs::volume::layout::Layout {
    cmkfs::volume::header::VolumeHeader::read(cipher)
        .expect("the volume header")
        .layout()
        .expect("a volume the data path mounts (v2 or v3)")
}

/// Backing offset of data byte 0 in the volume in `cipher` (v3: 4096, v2: 32).
pub fn data_offset(cipher: &Path) -> u64 {
    layout_of(cipher).data_offset
}

/// Backing length of a non-empty file of `size` plaintext bytes in the volume in `cipher`
/// (the header area, the units padded to whole 16-byte blocks, then `size % 16` filler
/// bytes; docs/FORMAT.md).
pub fn backing_len(cipher: &Path, size: u64) -> u64 {
    layout_of(cipher).backing_len(size)
}

/// How long a [`Mount`] may stay live before its watchdog aborts the FUSE connection.
/// Where [`Env`] puts its temp dirs: `$CMKFS_TEST_RUN_DIR` when set (`scripts/test.sh` makes one
/// per run, so its exit cleanup unmounts only what this run mounted, never the mounts of a
/// suite running beside it), else the system temp dir.
pub fn run_dir() -> PathBuf {
    match std::env::var_os("CMKFS_TEST_RUN_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            assert!(
                d.is_dir(),
                "CMKFS_TEST_RUN_DIR={} is not a directory: create it or unset the variable",
                d.display()
            );
            d
        }
        _ => std::env::temp_dir(),
    }
}

/// A unix socket path has room for 107 bytes (`sun_path`, 108 with its NUL). The longest one a
/// test makes is a mount's control socket, `<home>/run/mount-<16 hex>.sock`, with the home at
/// `<root>/home`: a temp root too deep for it would fail later with an obscure bind error.
fn check_socket_room(root: &Path) {
    const SUN_PATH_MAX: usize = 107;
    let sock = root.join("home/run/mount-0123456789abcdef.sock");
    let len = sock.as_os_str().len();
    assert!(
        len <= SUN_PATH_MAX,
        "test temp dir {} is too deep: a control socket under it takes {len} bytes, more than \
         the {SUN_PATH_MAX} a unix socket path holds; use a shorter TMPDIR or CMKFS_TEST_RUN_DIR",
        root.display()
    );
}

/// `CMKFS_TEST_WATCHDOG_SECS` overrides the default (120 s), which sits below nextest's
/// terminate-after limit (`.config/nextest.toml`) so the watchdog gets to act first.
pub fn watchdog_limit() -> Duration {
    let secs = std::env::var("CMKFS_TEST_WATCHDOG_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// Path of the `cmkfs` binary under test (`CMKFS_TEST_BIN` runs the tests against another
/// build, e.g. an older release, to show which of them it fails).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CMKFS_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cmkfs").into())
    })
}

/// The seed for a test's RNG: `CMKFS_TEST_SEED` if set, else fresh. Always printed, so a
/// failure can be replayed with `CMKFS_TEST_SEED=<seed> cargo test ...`.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("CMKFS_TEST_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("CMKFS_TEST_SEED={v:?} is not a u64")),
        Err(_) => {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).expect("getrandom");
            u64::from_le_bytes(b)
        }
    };
    eprintln!("{test}: seed = {seed} (replay with CMKFS_TEST_SEED={seed})");
    seed
}

// ---------------------------------------------------------------------------------------------
// Running commands with a time limit
// ---------------------------------------------------------------------------------------------

/// What a finished command left behind.
pub struct Output {
    /// The command line, for messages.
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Whether the command exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Panics (with everything the command printed) unless it succeeded.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok(), "expected success:\n{self}");
        self
    }

    /// Panics unless the command failed the way the CLI contract says errors look: a non-zero
    /// exit (not a signal) and exactly one non-empty line on stderr.
    #[track_caller]
    pub fn assert_clear_error(&self) -> &Self {
        assert!(
            !self.ok(),
            "expected a failure, but the command succeeded:\n{self}"
        );
        assert!(
            self.status.code().is_some(),
            "expected a clean non-zero exit, got a signal:\n{self}"
        );
        let text = self.stderr.trim_end();
        assert!(
            !text.trim().is_empty() && !text.contains('\n'),
            "expected exactly one line on stderr:\n{self}"
        );
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  command: {}", self.what)?;
        writeln!(f, "  status:  {}", describe_status(&self.status))?;
        writeln!(f, "  stdout:  {:?}", self.stdout)?;
        write!(f, "  stderr:  {:?}", self.stderr)
    }
}

fn describe_status(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{s:?}"),
    }
}

/// Human-readable command line.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Reads a whole file through `pread`, so an fd shared with a child (whose writes move the
/// shared offset) cannot confuse us.
fn read_all_at(f: &File) -> String {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match f.read_at(&mut chunk, buf.len() as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends `sig` to a whole process group, ignoring errors (it may be gone already).
fn kill_group(pgid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(-(pgid as i32), sig);
    }
}

/// Runs `cmd` to completion with a time limit. stdin is /dev/null; stdout and stderr are
/// captured through unnamed temp files (see the module docs for why not pipes). On timeout the
/// command's whole process group is killed and an `Err` describes what happened.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let what = describe(&cmd);
    let out = tempfile::tempfile().map_err(|e| format!("{what}: temp file: {e}"))?;
    let err = tempfile::tempfile().map_err(|e| format!("{what}: temp file: {e}"))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(err.try_clone().map_err(|e| e.to_string())?)
        // Own process group: a timeout kills the command and anything it forked.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot spawn: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id(), libc::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{what}` did not finish within {timeout:?} and was killed\n  stdout: {:?}\n  stderr: {:?}",
                    read_all_at(&out),
                    read_all_at(&err)
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{what}: wait: {e}")),
        }
    };
    Ok(Output {
        what,
        status,
        stdout: read_all_at(&out),
        stderr: read_all_at(&err),
    })
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// /proc/self/mountinfo, FUSE connections, processes
// ---------------------------------------------------------------------------------------------

/// One line of `/proc/self/mountinfo`, the parts we need.
#[derive(Clone, Debug)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The superblock's device number; for FUSE it names `/sys/fs/fuse/connections/<dev>`.
    pub dev: u64,
}

/// Undoes mountinfo's octal escapes (`\040` for space, etc.).
fn unescape_mountinfo(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsStr::from_bytes(&out).to_owned()
}

/// All mounts visible to this process.
pub fn mounts() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            let (maj, min): (u64, u64) = (maj.parse().ok()?, min.parse().ok()?);
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_mountinfo(f.get(4)?)),
                fstype: right.split(' ').next()?.to_string(),
                // The kernel's internal dev_t encoding (MKDEV), which fusectl uses as the name.
                dev: (maj << 20) | min,
            })
        })
        .collect()
}

/// The mounts stacked exactly at `path`.
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    mounts()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Makes sure fusectl is mounted (systemd does this at boot; minimal VMs and containers may
/// not), so a hung connection can be aborted. Best effort.
fn ensure_fusectl() {
    if mounts().iter().any(|m| m.fstype == "fusectl") || !Path::new(FUSECTL).is_dir() {
        return;
    }
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, dst, ty) = (c("fusectl"), c(FUSECTL), c("fusectl"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    unsafe {
        libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null());
    }
}

/// Aborts FUSE connection `dev`: every request pending on it fails with ENOTCONN and the
/// daemon's reads of /dev/fuse fail, so nothing can stay blocked on it. Best effort; returns
/// whether the abort file was written.
pub fn abort_fuse_connection(dev: u64) -> bool {
    ensure_fusectl();
    let abort = Path::new(FUSECTL).join(dev.to_string()).join("abort");
    fs::OpenOptions::new()
        .write(true)
        .open(&abort)
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok()
}

/// Aborts FUSE connection `dev`, which a mount at `mnt` had, unless another mount holds that
/// number now: a connection's number is freed with its superblock (a detached mount's goes
/// when its daemon lets go) and the next FUSE mount gets it, so a late abort by number would
/// cut off another test's mount. Returns whether the abort was written.
pub fn abort_own_connection(dev: u64, mnt: &Path) -> bool {
    if mounts()
        .iter()
        .any(|m| m.dev == dev && m.mount_point != mnt)
    {
        eprintln!("harness: FUSE connection {dev} now belongs to another mount; not aborting it");
        return false;
    }
    abort_fuse_connection(dev)
}

/// `umount2(path, MNT_DETACH)`: the mount disappears from the namespace at once, whatever
/// state the daemon is in. Best effort.
pub fn detach(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// The argv of process `pid`, or `None` if it is gone (or a zombie, whose cmdline is empty).
fn argv(pid: i32) -> Option<Vec<OsString>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| OsStr::from_bytes(a).to_owned())
            .collect(),
    )
}

/// Whether `pid` is alive (exists and is not a zombie: orphaned daemons are reparented to a
/// pid 1 that may never reap them). Every thread counts: an exiting process's leader shows
/// `Z` while another thread may still hold its descriptors (one waiting for the answer to a
/// FUSE request already sent to a stalled filesystem), and unmounting the filesystem below
/// it then fails with EBUSY (`revocation::a_stalled_backing_store_cannot_hold_off_revocation`
/// under load).
pub fn pid_alive(pid: i32) -> bool {
    // The state follows the parenthesised command name, which may itself contain ')'.
    let live = |stat: &Path| {
        fs::read_to_string(stat).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X')
        })
    };
    if live(Path::new(&format!("/proc/{pid}/stat"))) {
        return true;
    }
    fs::read_dir(format!("/proc/{pid}/task"))
        .is_ok_and(|tasks| tasks.flatten().any(|t| live(&t.path().join("stat"))))
}

/// Pids of live processes (other than us) whose argv satisfies `pred`.
fn pids_where(pred: impl Fn(&[OsString]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && argv(pid).is_some_and(|a| pred(&a)))
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// Pids of `cmkfs mount ... <mnt> ...` daemons (see the module docs).
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    pids_where(|a| {
        let is_cmkfs = a
            .first()
            .and_then(|p| Path::new(p).file_name())
            .is_some_and(|n| n == "cmkfs");
        is_cmkfs && a.iter().any(|x| x == "mount") && a.iter().any(|x| Path::new(x) == mnt)
    })
}

/// Pids of the daemon serving `mnt`: the `/proc` scan of [`daemon_pids`], plus the pid in
/// the run record a live mount leaves under `$CMKFS_HOME/run` (`{"pid", "mountpoint", ...}`),
/// if the implementation writes one. The union keeps working if either source changes.
pub fn daemon_pids_of(home: &Path, mnt: &Path) -> Vec<i32> {
    let mut pids = daemon_pids(mnt);
    for entry in fs::read_dir(home.join("run"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(bytes) = fs::read(entry.path()) else {
            continue;
        };
        let Ok(rec) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let pid = rec["pid"].as_i64().and_then(|p| i32::try_from(p).ok());
        if let (Some(pid), Some(mp)) = (pid, rec["mountpoint"].as_str()) {
            if Path::new(mp) == mnt && pid_alive(pid) && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Terminates `pids`: SIGTERM, a grace period, then SIGKILL for survivors. Best effort.
fn terminate(pids: &[i32]) {
    for &p in pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(p, libc::SIGTERM);
        }
    }
    if !wait_until(Duration::from_secs(3), || {
        pids.iter().all(|&p| !pid_alive(p))
    }) {
        for &p in pids.iter().filter(|&&p| pid_alive(p)) {
            eprintln!("harness: pid {p} survived SIGTERM; sending SIGKILL");
            // SAFETY: as above.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// The JSON a successful command printed (`--json`); panics, with the output, if it failed or
/// printed something else.
#[track_caller]
pub fn json(out: &Output) -> serde_json::Value {
    out.assert_ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

// ---------------------------------------------------------------------------------------------
// Env: one test's private CMKFS_HOME, backing dir and mountpoint
// ---------------------------------------------------------------------------------------------

/// One test's world: a private temp root holding `home/` (`CMKFS_HOME`), `cipher/` (a backing
/// dir, not yet initialised) and `mnt/` (an empty mountpoint). More dirs via [`Env::dir`].
pub struct Env {
    /// Canonical path of the temp root; everything the test creates lives below it.
    pub root: PathBuf,
    pub home: PathBuf,
    pub cipher: PathBuf,
    pub mnt: PathBuf,
    /// Put in front of every `cmkfs mount`'s extra arguments: `$CMKFS_TEST_MOUNT_ARGS`
    /// (split on whitespace; e.g. `--writeback-cache` runs the tests in the non-default
    /// cache mode), or what a test sets ([`Env::in_mode`]).
    pub mount_args: Vec<OsString>,
    // Declared last: dropped after `Drop for Env` has cleaned up the mounts inside it.
    _tmp: tempfile::TempDir,
}

impl Env {
    /// A fresh environment (prefix `cmkfs-test-`) under [`run_dir`]: this run's directory
    /// when `scripts/test.sh` names one, else the system temp dir.
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("cmkfs-test-")
            .tempdir_in(run_dir())
            .expect("create temp dir");
        // Canonical, so paths compare equal to what mountinfo shows.
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        check_socket_room(&root);
        let env = Env {
            home: root.join("home"),
            cipher: root.join("cipher"),
            mnt: root.join("mnt"),
            mount_args: std::env::var("CMKFS_TEST_MOUNT_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(OsString::from)
                .collect(),
            root,
            _tmp: tmp,
        };
        for d in [&env.home, &env.cipher, &env.mnt] {
            fs::create_dir(d).expect("create test dir");
        }
        // As cmkfs keeps its home (it tightens a looser one on first use).
        fs::set_permissions(&env.home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        use_test_passphrase();
        env
    }

    /// This env with its mounts in the given cache mode (`--writeback-cache`, or the
    /// default with `&[]`), whatever `$CMKFS_TEST_MOUNT_ARGS` says.
    pub fn in_mode(mut self, args: &[&str]) -> Env {
        self.mount_args = args.iter().map(OsString::from).collect();
        self
    }

    /// Creates (if needed) and returns the directory `root/name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        fs::create_dir_all(&d).expect("create test dir");
        d
    }

    /// The control socket of the one mount live in this env's home
    /// (`home/run/mount-<hash>.sock`); panics when there is none.
    pub fn control_socket(&self) -> PathBuf {
        fs::read_dir(self.home.join("run"))
            .expect("the home's run directory")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "sock"))
            .expect("the mount has a control socket")
    }

    /// A `Command` for the cmkfs binary with this env's `CMKFS_HOME` (and nothing inherited
    /// that could point it elsewhere).
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("CMKFS_HOME", &self.home)
            .env_remove("XDG_DATA_HOME")
            .current_dir(&self.root);
        passphrase_env(&mut cmd, &self.root);
        cmd
    }

    /// Runs `cmkfs ARGS` with [`CMD_TIMEOUT`]; panics (failing the test) if it hangs.
    #[track_caller]
    pub fn cmkfs<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        run_with_timeout(self.command(args), CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `cmkfs init CIPHER --key-size 2048 EXTRA...`, asserted to succeed.
    #[track_caller]
    pub fn init_with(&self, cipher: &Path, extra: &[&str]) -> Output {
        let mut args: Vec<OsString> = vec!["init".into(), cipher.into()];
        args.extend(["--key-size", KEY_SIZE].iter().map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        let out = self.cmkfs(&args);
        out.assert_ok();
        assert!(
            cipher.join(HEADER_NAME).is_file(),
            "init succeeded but left no {HEADER_NAME} in {}",
            cipher.display()
        );
        out
    }

    /// `cmkfs init CIPHER` with the default key, asserted to succeed.
    #[track_caller]
    pub fn init(&self, cipher: &Path) -> Output {
        self.init_with(cipher, &[])
    }

    /// `cmkfs info CIPHER --json`, parsed.
    #[track_caller]
    pub fn info(&self, cipher: &Path) -> serde_json::Value {
        let out = self.cmkfs(&[OsStr::new("info"), cipher.as_os_str(), OsStr::new("--json")]);
        out.assert_ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("info --json printed invalid JSON ({e}):\n{out}"))
    }

    /// `cmkfs status TARGET --json` (a mountpoint or a backing directory), asserted to succeed.
    #[track_caller]
    pub fn status(&self, target: &Path) -> serde_json::Value {
        let out = self.cmkfs(&[
            OsStr::new("status"),
            target.as_os_str(),
            OsStr::new("--json"),
        ]);
        out.assert_ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
    }

    /// Runs `cmkfs mount CIPHER MNT` (daemonizing) and returns its output without asserting;
    /// for the bad-input tests. If it unexpectedly mounts something, `Drop for Env` cleans up.
    pub fn try_mount(&self, cipher: &Path, mnt: &Path) -> Output {
        let out = self.cmkfs(&[OsStr::new("mount"), cipher.as_os_str(), mnt.as_os_str()]);
        if out.ok() && is_mounted(mnt) {
            // Leave nothing behind for the next assertion's failure path to trip over.
            let _ = Mount::adopt(self, cipher, mnt);
        }
        out
    }

    /// Mounts `cipher` at `mnt` with the daemonizing `cmkfs mount` and waits until the mount
    /// is visible. The returned guard unmounts on drop.
    #[track_caller]
    pub fn mount(&self, cipher: &Path, mnt: &Path) -> Mount {
        self.mount_with(cipher, mnt, &[])
    }

    /// Like [`Env::mount`] with extra `cmkfs mount` arguments (e.g. `--grace-period 2s`).
    #[track_caller]
    pub fn mount_with(&self, cipher: &Path, mnt: &Path, extra: &[&str]) -> Mount {
        let before = mounts_at(mnt).len();
        let mut args: Vec<OsString> = vec!["mount".into(), cipher.into(), mnt.into()];
        args.extend(self.mount_args.iter().cloned());
        args.extend(extra.iter().map(OsString::from));
        let out = self.cmkfs(&args);
        if !out.ok() {
            // The daemon's log is in the temp dir, gone once the test ends: show it now.
            let logs: String = fs::read_dir(self.home.join("run"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
                .collect();
            panic!("mount failed:\n{out}\n  daemon log:\n{logs}");
        }
        // The contract says the command returns once the mount is ready; still poll briefly
        // (without a second assertion on timing) in case the kernel table lags.
        if !wait_until(MOUNT_TIMEOUT, || mounts_at(mnt).len() > before) {
            // Clean up whatever daemon it left before failing.
            terminate(&daemon_pids(mnt));
            panic!(
                "`cmkfs mount` exited 0 but {} is not mounted after {MOUNT_TIMEOUT:?}:\n{out}",
                mnt.display()
            );
        }
        Mount::adopt(self, cipher, mnt)
    }

    /// Mounts with `cmkfs mount --foreground` as our own child process and waits until the
    /// mount is visible. The returned guard unmounts on drop and reaps the child.
    #[track_caller]
    pub fn mount_foreground(&self, cipher: &Path, mnt: &Path) -> Mount {
        self.mount_foreground_with(cipher, mnt, &[])
    }

    /// [`Env::mount_foreground`] with extra `cmkfs mount` arguments (e.g.
    /// `--key-check-interval 100ms`).
    #[track_caller]
    pub fn mount_foreground_with(&self, cipher: &Path, mnt: &Path, extra: &[&str]) -> Mount {
        self.mount_foreground_by(cipher, mnt, extra, |_| {})
    }

    /// [`Env::mount_foreground_with`], with `tweak` applied to the daemon's command before
    /// it is spawned (e.g. a `pre_exec` that drops a capability).
    #[track_caller]
    pub fn mount_foreground_by(
        &self,
        cipher: &Path,
        mnt: &Path,
        extra: &[&str],
        tweak: impl FnOnce(&mut Command),
    ) -> Mount {
        let mut args: Vec<OsString> = vec![
            "mount".into(),
            cipher.into(),
            mnt.into(),
            "--foreground".into(),
        ];
        args.extend(self.mount_args.iter().cloned());
        args.extend(extra.iter().map(OsString::from));
        let mut cmd = self.command(&args);
        let log = tempfile::tempfile().expect("temp file");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log.try_clone().unwrap())
            .process_group(0);
        tweak(&mut cmd);
        let what = describe(&cmd);
        let mut child = cmd.spawn().expect("spawn cmkfs mount --foreground");
        let before = mounts_at(mnt).len();
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if mounts_at(mnt).len() > before {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "`{what}` exited ({}) before mounting:\n{}",
                    describe_status(&status),
                    read_all_at(&log)
                );
            }
            if Instant::now() >= deadline {
                kill_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                detach(mnt);
                panic!(
                    "`{what}` did not mount within {MOUNT_TIMEOUT:?}:\n{}",
                    read_all_at(&log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let mut m = Mount::adopt(self, cipher, mnt);
        m.daemon = Daemon::Child(child, log);
        m
    }

    /// Every mount below this env's root (stale ones, if a guard failed).
    fn mounts_below(&self) -> Vec<MountEntry> {
        mounts()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&self.root))
            .collect()
    }
}

impl Drop for Env {
    /// The last sweep: detach anything still mounted under the root and kill any process
    /// whose argv mentions it, before the temp dir (dropped after this) is deleted.
    fn drop(&mut self) {
        // Innermost first, in case mounts are nested.
        let mut left = self.mounts_below();
        left.sort_by_key(|m| std::cmp::Reverse(m.mount_point.as_os_str().len()));
        for m in &left {
            eprintln!(
                "harness: {} still mounted at the end of the test; aborting and detaching",
                m.mount_point.display()
            );
            abort_fuse_connection(m.dev);
            detach(&m.mount_point);
        }
        let root = self.root.as_os_str().as_bytes().to_vec();
        let strays = pids_where(|a| {
            a.iter()
                .any(|x| x.as_bytes().windows(root.len()).any(|w| w == root))
        });
        if !strays.is_empty() {
            eprintln!("harness: stray processes {strays:?} still use the test dir; terminating");
            terminate(&strays);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mount: RAII guard for one live mount
// ---------------------------------------------------------------------------------------------

/// Who serves the mount.
enum Daemon {
    /// Daemonized `cmkfs mount`: pids found by scanning /proc (see the module docs).
    Detached(Vec<i32>),
    /// `cmkfs mount --foreground`, our child; the file holds its stdout+stderr.
    Child(Child, File),
}

/// A live mount. Dropping it unmounts (escalating as needed, never panicking); call
/// [`Mount::unmount`] to unmount *and assert* that everything went cleanly.
pub struct Mount {
    pub cipher: PathBuf,
    pub mnt: PathBuf,
    home: PathBuf,
    /// fusectl connection number, to abort a hung connection.
    dev: Option<u64>,
    daemon: Daemon,
    watchdog: Option<Watchdog>,
    done: bool,
}

impl Mount {
    /// Takes charge of a mount that is already visible at `mnt` (e.g. made by a `cmkfs mount`
    /// a test ran itself, with its own environment, or whose output it inspects).
    pub fn adopt(env: &Env, cipher: &Path, mnt: &Path) -> Mount {
        let dev = mounts_at(mnt).last().map(|m| m.dev);
        let watchdog = Watchdog::start(mnt.to_path_buf(), dev, watchdog_limit());
        Mount {
            cipher: cipher.to_path_buf(),
            mnt: mnt.to_path_buf(),
            home: env.home.clone(),
            dev,
            daemon: Daemon::Detached(daemon_pids_of(&env.home, mnt)),
            watchdog: Some(watchdog),
            done: false,
        }
    }

    /// `mnt.join(rel)`.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The mount's fstype as the kernel reports it (e.g. `fuse.cmkfs`).
    pub fn fstype(&self) -> Option<String> {
        mounts_at(&self.mnt).last().map(|m| m.fstype.clone())
    }

    fn daemon_exited(&mut self) -> bool {
        match &mut self.daemon {
            Daemon::Detached(pids) => pids.iter().all(|&p| !pid_alive(p)),
            Daemon::Child(c, _) => !matches!(c.try_wait(), Ok(None)),
        }
    }

    /// Unmounts with `cmkfs umount` and asserts it all went cleanly: the command succeeds,
    /// the mount disappears, the daemon exits (a foreground daemon with status 0), and the
    /// watchdog never fired. On a failed assertion `Drop` still cleans up.
    ///
    /// A busy mount (EBUSY) is tried again for up to [`BUSY_RETRY`]: a process of the test
    /// that uses the mount may still be exiting (a daemon of a volume stored in this mount
    /// closes its files only when its last thread ends, which waits for this mount's
    /// answers). A file left open for good still fails the test.
    #[track_caller]
    pub fn unmount(mut self) {
        let end = Instant::now() + BUSY_RETRY;
        let out = loop {
            let out = run_with_timeout(self.umount_command(), UMOUNT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}"));
            if out.ok() || !out.stderr.contains("busy") || Instant::now() > end {
                break out;
            }
            eprintln!(
                "harness: {} busy at unmount; trying again",
                self.mnt.display()
            );
            thread::sleep(Duration::from_millis(100));
        };
        assert!(out.ok(), "umount failed:\n{out}");
        assert!(
            wait_until(UMOUNT_TIMEOUT, || !is_mounted(&self.mnt)),
            "{} still mounted {UMOUNT_TIMEOUT:?} after a successful `cmkfs umount`",
            self.mnt.display()
        );
        assert!(
            wait_until(DAEMON_EXIT_TIMEOUT, || self.daemon_exited()),
            "the daemon of {} is still running {DAEMON_EXIT_TIMEOUT:?} after unmount",
            self.mnt.display()
        );
        if let Daemon::Child(c, log) = &mut self.daemon {
            let status = c.wait().expect("wait for foreground daemon");
            assert!(
                status.success(),
                "foreground `cmkfs mount` exited with {} after unmount:\n{}",
                describe_status(&status),
                read_all_at(log)
            );
        }
        let fired = self.watchdog.take().is_some_and(|w| w.stop());
        self.done = true;
        assert!(!fired, "the watchdog had to abort this mount (it hung)");
    }

    /// The pid of the daemon serving this mount (a foreground child's, or the first one found
    /// for a daemonized mount).
    pub fn daemon_pid(&self) -> Option<u32> {
        match &self.daemon {
            Daemon::Child(c, _) => Some(c.id()),
            Daemon::Detached(pids) => pids.first().map(|&p| p as u32),
        }
    }

    /// Simulates a crash of the daemon: SIGKILL, then cleans up the dead mount the way an
    /// operator would (abort the FUSE connection so nothing stays blocked on it, lazy
    /// unmount), waits for the mountpoint to be free, and reaps the daemon. Panics if the
    /// mount cannot be cleaned up within the time limits.
    #[track_caller]
    pub fn crash(mut self) {
        match &self.daemon {
            Daemon::Child(c, _) => kill_group(c.id(), libc::SIGKILL),
            Daemon::Detached(pids) => {
                for &p in pids {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(p, libc::SIGKILL);
                    }
                }
            }
        }
        assert!(
            wait_until(DAEMON_EXIT_TIMEOUT, || self.daemon_exited()),
            "the daemon of {} survived SIGKILL",
            self.mnt.display()
        );
        // The kernel aborts the connection when the daemon's /dev/fuse descriptors close;
        // aborting again is harmless and covers a descriptor inherited elsewhere.
        if let Some(dev) = self.dev {
            abort_own_connection(dev, &self.mnt);
        }
        while is_mounted(&self.mnt) && detach(&self.mnt) {}
        assert!(
            wait_until(UMOUNT_TIMEOUT, || !is_mounted(&self.mnt)),
            "{} still mounted after the daemon was killed and the mount detached",
            self.mnt.display()
        );
        if let Daemon::Child(c, _) = &mut self.daemon {
            let _ = c.wait();
        }
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
        self.done = true;
    }

    /// The daemon's log so far (foreground mounts only; empty otherwise).
    pub fn daemon_log(&self) -> String {
        match &self.daemon {
            Daemon::Child(_, log) => read_all_at(log),
            Daemon::Detached(_) => String::new(),
        }
    }

    fn umount_command(&self) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("umount")
            .arg(&self.mnt)
            .env("CMKFS_HOME", &self.home)
            .env_remove("XDG_DATA_HOME");
        cmd
    }

    /// Best-effort teardown for `Drop`: never panics, every step bounded.
    fn teardown(&mut self) {
        if is_mounted(&self.mnt) {
            match run_with_timeout(self.umount_command(), UMOUNT_TIMEOUT) {
                Ok(out) if out.ok() => {}
                Ok(out) => eprintln!("harness: cleanup umount failed:\n{out}"),
                Err(e) => eprintln!("harness: cleanup umount: {e}"),
            }
        }
        if !wait_until(Duration::from_secs(5), || !is_mounted(&self.mnt)) {
            eprintln!(
                "harness: {} still mounted; lazy unmount (MNT_DETACH)",
                self.mnt.display()
            );
            while is_mounted(&self.mnt) && detach(&self.mnt) {}
        }
        if !wait_until(Duration::from_secs(5), || self.daemon_exited()) {
            // A detached mount may keep the connection (and daemon) alive: abort it.
            if let Some(dev) = self.dev {
                if abort_own_connection(dev, &self.mnt) {
                    eprintln!("harness: aborted FUSE connection {dev}");
                }
            }
        }
        if !wait_until(Duration::from_secs(5), || self.daemon_exited()) {
            match &mut self.daemon {
                Daemon::Detached(pids) => {
                    eprintln!("harness: daemon {pids:?} did not exit; terminating");
                    terminate(pids);
                }
                Daemon::Child(c, _) => {
                    eprintln!(
                        "harness: foreground daemon {} did not exit; killing",
                        c.id()
                    );
                    kill_group(c.id(), libc::SIGKILL);
                }
            }
        }
        if let Daemon::Child(c, _) = &mut self.daemon {
            // Reap it (it is dead or SIGKILLed by now, so this does not block for long).
            let _ = c.wait();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.done {
            self.teardown();
        }
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------------------------

/// Aborts a mount's FUSE connection if it is still live after a time limit, so a hung
/// filesystem turns into failing syscalls (ENOTCONN) instead of a hung test.
struct Watchdog {
    /// (cancelled, fired)
    state: Arc<(Mutex<(bool, bool)>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(mnt: PathBuf, dev: Option<u64>, limit: Duration) -> Watchdog {
        let state = Arc::new((Mutex::new((false, false)), Condvar::new()));
        let st = Arc::clone(&state);
        let thread = thread::spawn(move || {
            let (lock, cv) = &*st;
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (mut g, res) = cv
                .wait_timeout_while(guard, limit, |s| !s.0)
                .unwrap_or_else(|e| e.into_inner());
            if res.timed_out() && !g.0 {
                g.1 = true;
                drop(g);
                eprintln!(
                    "harness: WATCHDOG: {} still mounted after {limit:?}; aborting its FUSE \
                     connection so blocked calls fail with ENOTCONN",
                    mnt.display()
                );
                if let Some(dev) = dev {
                    abort_own_connection(dev, &mnt);
                }
                detach(&mnt);
            }
        });
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    /// Cancels the watchdog and returns whether it had fired.
    fn stop(mut self) -> bool {
        let (lock, cv) = &*self.state;
        let fired = {
            let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
            g.0 = true;
            g.1
        };
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        fired
    }
}

// ---------------------------------------------------------------------------------------------
// Backing-dir inspection
// ---------------------------------------------------------------------------------------------

/// Whether a backing-dir name is cmkfs metadata (not an encrypted name).
pub fn is_metadata_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"cmkfs.") || b.starts_with(b".cmkfs")
}

/// Every path below `dir` (not `dir` itself), depth first, without following symlinks.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        let mut children: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        children.sort();
        for c in children {
            if fs::symlink_metadata(&c).is_ok_and(|m| m.is_dir()) {
                stack.push(c.clone());
            }
            out.push(c);
        }
    }
    out.sort();
    out
}

/// The backing file of the plaintext file at `p` (inode numbers are the backing ones).
pub fn backing_of(cipher: &Path, p: &Path) -> PathBuf {
    let ino = fs::metadata(p).unwrap().ino();
    data_files(cipher)
        .into_iter()
        .find(|b| fs::metadata(b).unwrap().ino() == ino)
        .unwrap_or_else(|| panic!("no backing file for {}", p.display()))
}

/// The regular files below `dir` whose names are encrypted names (not metadata): the backing
/// files of plaintext files.
pub fn data_files(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .filter(|p| p.file_name().is_some_and(|n| !is_metadata_name(n)))
        .collect()
}

/// The data files directly in `dir` (not below it).
pub fn data_files_in(dir: &Path) -> Vec<PathBuf> {
    data_files(dir)
        .into_iter()
        .filter(|p| p.parent() == Some(dir))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Scans everything below `dir` (file contents, entry names, symlink targets) for any of
/// `markers`; returns one line per finding (empty = clean).
pub fn find_markers(dir: &Path, markers: &[&[u8]]) -> Vec<String> {
    let mut found = Vec::new();
    for p in walk(dir) {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        let mut check = |what: &str, bytes: &[u8]| {
            for m in markers.iter().filter(|m| contains(bytes, m)) {
                found.push(format!(
                    "{what} of {} contains {:?}",
                    p.display(),
                    String::from_utf8_lossy(m)
                ));
            }
        };
        if let Some(name) = p.file_name() {
            check("name", name.as_bytes());
        }
        if md.file_type().is_symlink() {
            if let Ok(t) = fs::read_link(&p) {
                check("symlink target", t.as_os_str().as_bytes());
            }
        } else if md.is_file() {
            match fs::read(&p) {
                Ok(bytes) => check("contents", &bytes),
                Err(e) => found.push(format!("cannot read {}: {e}", p.display())),
            }
        }
    }
    found
}

/// Replaces `to` (removed first when present) with a copy of `from` that keeps modes, owners,
/// times and xattrs (`cp -a --preserve=all`): a test sets a state up once and puts it back
/// before each case instead of rebuilding it.
pub fn copy_tree(from: &Path, to: &Path) {
    match fs::remove_dir_all(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            panic!("remove {}: {e}", to.display())
        }
        _ => {}
    }
    let st = Command::new("cp")
        .args(["-a", "--preserve=all"])
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// A recursive listing of `dir` with modes, sizes, content hashes and symlink targets, for
/// "nothing changed on disk" comparisons. A missing `dir` is recorded as such.
pub fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut snap = BTreeMap::new();
    let Ok(md) = fs::symlink_metadata(dir) else {
        snap.insert(".".into(), "<missing>".into());
        return snap;
    };
    snap.insert(".".into(), describe_entry(dir, &md));
    for p in walk(dir) {
        let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        let desc = match fs::symlink_metadata(&p) {
            Ok(md) => describe_entry(&p, &md),
            Err(e) => format!("<unreadable: {e}>"),
        };
        snap.insert(rel, desc);
    }
    snap
}

fn describe_entry(p: &Path, md: &fs::Metadata) -> String {
    let mode = md.permissions().mode() & 0o7777;
    let ft = md.file_type();
    if ft.is_symlink() {
        format!("symlink -> {:?}", fs::read_link(p).ok())
    } else if ft.is_dir() {
        format!("dir {mode:o}")
    } else if ft.is_file() {
        let hash = fs::read(p)
            .map(|b| hex::encode(Sha256::digest(&b)))
            .unwrap_or_else(|e| format!("<unreadable: {e}>"));
        format!("file {mode:o} size={} sha256={hash}", md.size())
    } else {
        format!("other {:o}", md.mode())
    }
}

/// Panics with a readable diff unless the two snapshots are equal.
#[track_caller]
pub fn assert_same_snapshot(
    what: &str,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) {
    if before == after {
        return;
    }
    let mut diff = String::new();
    for (k, v) in before {
        match after.get(k) {
            None => diff.push_str(&format!("  - {k}: {v}\n")),
            Some(w) if w != v => diff.push_str(&format!("  ~ {k}: {v}  =>  {w}\n")),
            _ => {}
        }
    }
    for (k, w) in after {
        if !before.contains_key(k) {
            diff.push_str(&format!("  + {k}: {w}\n"));
        }
    }
    panic!("{what}: the directory changed on disk:\n{diff}");
}

/// A recursive description of a *plaintext* tree (as seen through a mount): type, permission
/// bits, size, content hash, symlink target and link count per path. Used to prove a remount
/// shows exactly what was there before.
pub fn tree_view(dir: &Path) -> BTreeMap<String, String> {
    let mut view = BTreeMap::new();
    for p in walk(dir) {
        let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("stat {} through the mount: {e}", p.display()));
        let mut desc = describe_entry(&p, &md);
        if md.is_file() {
            desc.push_str(&format!(" nlink={}", md.nlink()));
        }
        view.insert(rel, desc);
    }
    view
}

/// `len` bytes from a seeded RNG.
pub fn random_bytes(rng: &mut impl rand::RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// `len` bytes consisting of `marker` repeated (and cut at `len`).
pub fn repeated(marker: &[u8], len: usize) -> Vec<u8> {
    marker.iter().copied().cycle().take(len).collect()
}

/// A short random hex string, to make markers unique per run.
pub fn unique_hex() -> String {
    let mut b = [0u8; 6];
    getrandom::getrandom(&mut b).expect("getrandom");
    hex::encode(b)
}

/// Reads `path` and panics with a useful message on error.
#[track_caller]
pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes `path` and panics with a useful message on error.
#[track_caller]
pub fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()))
}

/// What a write of `data` at `off` makes of a file's contents `model`: grown with zeros to
/// reach it where it is shorter.
pub fn model_write(model: &mut Vec<u8>, off: usize, data: &[u8]) {
    if model.len() < off + data.len() {
        model.resize(off + data.len(), 0);
    }
    model[off..off + data.len()].copy_from_slice(data);
}

/// `len` bytes of `f` from `off`, or fewer where the file ends first: `pread` until full
/// or end of file (a read may return less than asked). Panics on an error.
pub fn pread_all(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("pread at {}: {e}", off + got as u64),
        }
    }
    buf.truncate(got);
    buf
}

/// Asserts two byte strings are equal, reporting lengths and the first difference instead of
/// dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: contents differ: got {} bytes, want {} bytes; first difference at offset {first} \
         (sector {}, offset in sector {})",
        got.len(),
        want.len(),
        first / SECTOR,
        first % SECTOR
    );
}

// ---------------------------------------------------------------------------------------------
// The vault passphrase of tests
// ---------------------------------------------------------------------------------------------

/// The passphrase every test vault is sealed with (test data only).
pub const TEST_PASSPHRASE: &str = "cmkfs test passphrase";

/// Gives this test process the test passphrase and the cheap Argon2id setting, for vaults it
/// opens or creates in-process (children get theirs from [`passphrase_env`]).
pub fn use_test_passphrase() {
    use cmkfs::vault::local::{seal::KdfParams, unlock};
    unlock::set_passphrase_source(Some(unlock::PassphraseSource::Value(std::sync::Arc::new(
        zeroize::Zeroizing::new(TEST_PASSPHRASE.to_string()),
    ))));
    unlock::set_kdf_params(Some(KdfParams::TEST));
}

/// Writes the test passphrase into `dir/test-passphrase` (0600) and points `cmd` at it with
/// `$CMKFS_PASSPHRASE_FILE`, with the cheap Argon2id setting for the vaults it creates.
pub fn passphrase_env<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("test-passphrase");
    if !path.exists() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("write the test passphrase file");
        std::io::Write::write_all(&mut f, format!("{TEST_PASSPHRASE}\n").as_bytes())
            .expect("write the test passphrase file");
    }
    cmd.env("CMKFS_PASSPHRASE_FILE", &path)
        .env("CMKFS_VAULT_KDF", "test")
}

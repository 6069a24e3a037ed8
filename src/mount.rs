//! Mount lifecycle: checks on the mountpoint, the FUSE session, the run record a live mount
//! leaves under `$CMKFS_HOME/run`, and unmounting.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fs::CmkFs;
use crate::home::Home;

/// The filesystem type the kernel shows (`fuse.cmkfs`).
pub const SUBTYPE: &str = "cmkfs";

/// Why a mount or unmount cannot go ahead.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Mountpoint missing.
    #[error("mountpoint {0} does not exist; create it first")]
    Missing(PathBuf),
    /// Mountpoint is not a directory.
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    /// Something is mounted there already.
    #[error("mountpoint {0} is busy: something is already mounted there")]
    Busy(PathBuf),
    /// Not a cmkfs mount (umount).
    #[error("{0} is not a mounted cmkfs volume")]
    NotMounted(PathBuf),
    /// The kernel refused to unmount (files open).
    #[error("cannot unmount {path}: {error} (close files using it, or use --lazy)")]
    Unmount {
        /// Mountpoint.
        path: PathBuf,
        /// Kernel error.
        error: io::Error,
    },
    /// Mount system call or FUSE handshake failed.
    #[error("mounting at {path} failed: {error}")]
    Mount {
        /// Mountpoint.
        path: PathBuf,
        /// Error.
        error: io::Error,
    },
    /// The backing directory and the mountpoint overlap: the daemon would reach its own
    /// mount through the backing store and wait on itself.
    #[error("{0}; use a mountpoint outside the backing directory (and not above it)")]
    Overlap(String),
    /// Unmounted, but the daemon could not make some new directories' ids durable.
    #[error(
        "{} was unmounted, but {why}; directories made in its last moments may come back \
         empty after a crash: check the backing disk, then run `cmkfs fsck`",
        path.display()
    )]
    IdsLost {
        /// Mountpoint.
        path: PathBuf,
        /// What the daemon said.
        why: String,
    },
    /// Other I/O.
    #[error("{}: {error}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Error.
        error: io::Error,
    },
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// FUSE worker threads.
    pub fuse_threads: usize,
    /// Let other users in (kernel permission checks apply either way).
    pub allow_other: bool,
    /// Kernel readahead window in KiB, set after mounting; 0 leaves the kernel's default.
    pub readahead_kb: u32,
}

/// Readahead of a mount unless told otherwise: the largest request the kernel sends
/// (`max_pages` = 256 pages, from the 1 MiB `max_write`).
pub const DEFAULT_READAHEAD_KB: u32 = 1024;

/// What a live mount records about itself, for `umount` and `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// Daemon process id.
    pub pid: u32,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The backing directory.
    pub cipherdir: PathBuf,
    /// Volume id.
    pub volume_id: String,
    /// KEK id at mount time.
    pub key_id: String,
    /// Unix seconds.
    pub started: u64,
    /// Vault identity the mount uses (`None`: the vault owner).
    #[serde(default)]
    pub identity: Option<String>,
}

impl RunRecord {
    fn path(home: &Home, mountpoint: &Path) -> PathBuf {
        let h = hex::encode(&Sha256::digest(mountpoint.as_os_str().as_encoded_bytes())[..8]);
        home.run_dir().join(format!("mount-{h}.json"))
    }

    /// Saves the record (0600) in the home's run directory.
    pub fn save(&self, home: &Home) -> io::Result<()> {
        crate::fsutil::create_private_dir(&home.run_dir())?;
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        crate::fsutil::write_atomic(&Self::path(home, &self.mountpoint), &json, 0o600)
    }

    /// Where the daemon of the mount at `mountpoint` leaves, as it exits, one line saying
    /// that new directories' ids could not be made durable (their fsync failed: a failing
    /// disk); `cmkfs umount` reports it and removes it (0600; a mount removes a stale one).
    pub fn ids_lost_path(home: &Home, mountpoint: &Path) -> PathBuf {
        Self::path(home, mountpoint).with_extension("ids-lost")
    }

    /// The live status file of the mount at `mountpoint` (written by its monitor).
    pub fn status_path(home: &Home, mountpoint: &Path) -> PathBuf {
        Self::path(home, mountpoint).with_extension("status.json")
    }

    /// The control socket of the mount at `mountpoint` (`crate::control`).
    pub fn socket_path(home: &Home, mountpoint: &Path) -> PathBuf {
        Self::path(home, mountpoint).with_extension("sock")
    }

    /// Every run record in the home (mounts that are, or were until a crash, live).
    pub fn all(home: &Home) -> Vec<RunRecord> {
        let Ok(dir) = std::fs::read_dir(home.run_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<RunRecord> = dir
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("mount-") && n.ends_with(".json") && !n.ends_with(".status.json")
            })
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    /// Whether the daemon that wrote this record is still running.
    pub fn alive(&self) -> bool {
        pid_alive(self.pid)
    }

    /// Loads the record of the mount at `mountpoint`, if any.
    pub fn load(home: &Home, mountpoint: &Path) -> Option<RunRecord> {
        let bytes = std::fs::read(Self::path(home, mountpoint)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Removes the record and the status file.
    pub fn remove(home: &Home, mountpoint: &Path) {
        let _ = std::fs::remove_file(Self::path(home, mountpoint));
        let _ = std::fs::remove_file(Self::status_path(home, mountpoint));
    }
}

/// Resolves and checks a mountpoint: exists, is a directory, nothing mounted on it.
pub fn check_mountpoint(mp: &Path) -> Result<PathBuf, MountError> {
    let abs = std::fs::canonicalize(mp).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MountError::Missing(mp.to_path_buf()),
        _ => MountError::Io {
            path: mp.to_path_buf(),
            error: e,
        },
    })?;
    if !abs.is_dir() {
        return Err(MountError::NotADirectory(abs));
    }
    if mount_type(&abs).is_some() {
        return Err(MountError::Busy(abs));
    }
    Ok(abs)
}

/// Refuses a backing directory and a mountpoint that overlap (after resolving symlinks): the
/// same directory, the backing directory inside the mountpoint (hidden under the mount, so
/// every backing call would come back to this daemon and wait on itself), or the mountpoint
/// inside the backing directory (the backing store would hold its own plaintext view).
pub fn check_separate(cipherdir: &Path, mountpoint: &Path) -> Result<(), MountError> {
    let canon = |p: &Path| {
        std::fs::canonicalize(p).map_err(|e| MountError::Io {
            path: p.to_path_buf(),
            error: e,
        })
    };
    let (c, m) = (canon(cipherdir)?, canon(mountpoint)?);
    let why = if c == m {
        format!(
            "the backing directory and the mountpoint are the same directory ({})",
            c.display()
        )
    } else if c.starts_with(&m) {
        format!(
            "the backing directory {} is inside the mountpoint {}",
            c.display(),
            m.display()
        )
    } else if m.starts_with(&c) {
        format!(
            "the mountpoint {} is inside the backing directory {}",
            m.display(),
            c.display()
        )
    } else {
        return Ok(());
    };
    Err(MountError::Overlap(why))
}

/// What is mounted exactly at `mp` (from /proc/self/mountinfo): filesystem type and source.
pub fn mount_type(mp: &Path) -> Option<(String, PathBuf)> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if fields.len() > sep + 2
            && fields.len() > 4
            && unescape(fields[4]) == mp.as_os_str().as_encoded_bytes()
        {
            // Later lines are mounted on top of earlier ones: the last match is visible.
            let source: std::ffi::OsString =
                std::os::unix::ffi::OsStringExt::from_vec(unescape(fields[sep + 2]));
            found = Some((
                String::from_utf8_lossy(fields[sep + 1]).into_owned(),
                PathBuf::from(source),
            ));
        }
    }
    found
}

/// The device number (major, minor) of what is mounted exactly at `mp`, from
/// /proc/self/mountinfo: no system call on the mount itself, which matters before its FUSE
/// session serves requests (a stat would wait for a daemon that is not listening yet).
pub fn mount_device(mp: &Path) -> Option<(u32, u32)> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        if fields.len() > 4 && unescape(fields[4]) == mp.as_os_str().as_encoded_bytes() {
            let dev = std::str::from_utf8(fields[2]).ok()?;
            let (major, minor) = dev.split_once(':')?;
            // Later lines are mounted on top of earlier ones: the last match is visible.
            found = Some((major.parse().ok()?, minor.parse().ok()?));
        }
    }
    found
}

/// Sets the kernel readahead window of the FUSE mount at `mp` (its backing-device info,
/// `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`). The kernel caps what a FUSE daemon may ask for
/// in its init reply at the default (128 KiB); root may raise it afterwards, which turns a
/// sequential read into requests of up to `max_pages` (1 MiB) instead of 128 KiB ones.
/// `mp` must be the absolute, canonical mountpoint. Errors: not mounted, not root.
pub fn set_readahead(mp: &Path, kb: u32) -> io::Result<()> {
    let (major, minor) = mount_device(mp).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not a mountpoint", mp.display()),
        )
    })?;
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        kb.to_string(),
    )
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\' && i + 4 <= f.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&f[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(f[i]);
        i += 1;
    }
    out
}

/// The fuse module's switch for FUSE over io_uring.
pub const ENABLE_URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel will offer FUSE over io_uring to a new mount: the fuse module's
/// `enable_uring` parameter is `Y` (it exists with `CONFIG_FUSE_IO_URING`, Linux 6.14+).
pub fn io_uring_enabled() -> bool {
    std::fs::read_to_string(ENABLE_URING_PARAM).is_ok_and(|v| v.trim() == "Y")
}

/// Mounts `fs` at `mp` and returns the session (not yet serving requests: call `run`).
pub fn mount(fs: CmkFs, mp: &Path, cfg: &MountConfig) -> Result<Session<CmkFs>, MountError> {
    let mut c = Config::default();
    c.n_threads = Some(cfg.fuse_threads.max(1));
    c.clone_fd = true;
    c.mount_options = vec![
        MountOption::FSName(fs.volume().root().display().to_string()),
        MountOption::Subtype(SUBTYPE.into()),
        // The kernel checks modes and owners like on a local filesystem.
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if cfg.allow_other {
        c.acl = SessionACL::All;
    }
    let session = Session::new(fs, mp, &c).map_err(|e| MountError::Mount {
        path: mp.to_path_buf(),
        error: e,
    })?;
    if cfg.readahead_kb > 0 {
        // Not fatal: without root the mount works with the kernel's 128 KiB window.
        if let Err(e) = set_readahead(mp, cfg.readahead_kb) {
            tracing::warn!(error = %e, kib = cfg.readahead_kb, "cannot raise the mount's readahead");
        }
    }
    Ok(session)
}

/// Unmounts the cmkfs mount at `mp`; `lazy` detaches even while files are open. Waits (up
/// to `wait`) for the daemon recorded in `home` to exit, so its last writes are done.
pub fn unmount(home: &Home, mp: &Path, lazy: bool, wait: Duration) -> Result<(), MountError> {
    let abs = std::fs::canonicalize(mp).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MountError::Missing(mp.to_path_buf()),
        _ => MountError::Io {
            path: mp.to_path_buf(),
            error: e,
        },
    })?;
    let record = RunRecord::load(home, &abs);
    if !is_cmkfs_mount_of(&abs, record.as_ref()) {
        return Err(MountError::NotMounted(abs));
    }
    umount_syscall(&abs, lazy).map_err(|e| MountError::Unmount {
        path: abs.clone(),
        error: e,
    })?;
    if let Some(r) = record {
        let deadline = Instant::now() + wait;
        while pid_alive(r.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let lost = RunRecord::ids_lost_path(home, &abs);
    if let Ok(why) = std::fs::read_to_string(&lost) {
        let _ = std::fs::remove_file(&lost);
        return Err(MountError::IdsLost {
            path: abs,
            why: why.trim().to_string(),
        });
    }
    Ok(())
}

/// Whether a cmkfs volume is mounted at `mp`. The pure-Rust mount shows type `fuse` (the
/// subtype is not passed to mount(2)) and the cipher directory as its source.
pub fn is_cmkfs_mount(mp: &Path) -> bool {
    is_cmkfs_mount_of(mp, None)
}

/// [`is_cmkfs_mount`], also told the run record `record` of a daemon that mounted at `mp`.
/// The kernel's word decides: a FUSE mount at `mp` whose source is a cmkfs volume, known by
/// its header file, or, where that is gone (removed or renamed behind the mount, a backing
/// disk answering errors: attack session 15, F2), by a live cmkfs daemon whose record names
/// this mountpoint and this source. Another FUSE filesystem at `mp` is neither.
fn is_cmkfs_mount_of(mp: &Path, record: Option<&RunRecord>) -> bool {
    let Some((t, source)) = mount_type(mp) else {
        return false;
    };
    if t == format!("fuse.{SUBTYPE}") {
        return true;
    }
    if t != "fuse" {
        return false;
    }
    if source.join(crate::volume::header::HEADER_FILE).exists() {
        return true;
    }
    record.is_some_and(|r| r.mountpoint == mp && r.cipherdir == source && pid_alive(r.pid))
}

/// Unmounts with umount2 as root, else through `fusermount3 -u`.
pub fn umount_syscall(mp: &Path, lazy: bool) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c =
            std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: valid C path.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(mp).output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    // Zombies count as gone: their mount work is over. But every thread counts, not only the
    // leader's `/proc/PID/stat`: when a process exits, its leader shows `Z` at once while
    // another thread may still be finishing, holding the descriptors (a thread waiting for a
    // FUSE request already sent to a stalled filesystem waits for its answer even when
    // killed). An unmount of the filesystem below it then fails with EBUSY
    // (`revocation::a_stalled_backing_store_cannot_hold_off_revocation`, under load).
    let live = |stat: &Path| {
        std::fs::read_to_string(stat).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with(['Z', 'X'])
        })
    };
    if live(Path::new(&format!("/proc/{pid}/stat"))) {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .is_ok_and(|tasks| tasks.flatten().any(|t| live(&t.path().join("stat"))))
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and threads spawned after) and starts a
/// thread that unmounts `mp` lazily when one arrives, so the session ends cleanly.
pub fn unmount_on_signal(mp: PathBuf) -> io::Result<()> {
    // SAFETY: plain signal-mask manipulation on a zeroed, then filled sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        set
    };
    std::thread::Builder::new()
        .name("cmkfs-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set blocked in every thread of the process.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!(signal = sig, "signal received, unmounting");
            if let Err(e) = umount_syscall(&mp, true) {
                tracing::error!(error = %e, "unmount on signal failed");
                std::process::exit(1);
            }
        })?;
    Ok(())
}

//! Revocation drills: prove on a live mount that revoking the KEK cuts off every path to
//! plaintext, that the ciphertext is still there, and that restoring access heals the volume.
//!
//! The drill writes and fsyncs a probe file, warms the page cache, keeps a read descriptor,
//! a write descriptor and (in a child process) a shared mmap open, revokes through the vault,
//! then polls every path until each is denied. It checks the backing file, optionally
//! restores access and measures the time to heal, and verifies the probe byte for byte.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::home::Home;
use crate::mount::RunRecord;
use crate::vault::local::{LocalVault, PolicyScope};
use crate::vault::{KeyId, KeyUpdate, Permission, Vault};
use crate::volume::header::VolumeHeader;
use crate::volume::FILE_HEADER_LEN;

/// How access is revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Revoke {
    /// Disable the key version the volume uses.
    Disable,
    /// Remove the access policies that let the mount's identity use the key.
    Policy,
    /// Soft-delete the key.
    Delete,
}

/// Drill options.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// How to revoke.
    pub revoke: Revoke,
    /// Restore access afterwards and measure healing.
    pub restore: bool,
    /// Give up on a path after this long.
    pub timeout: Duration,
    /// Probe file size in bytes.
    pub probe_size: usize,
}

/// One access path and when it was denied.
#[derive(Clone, Debug, Serialize)]
pub struct PathResult {
    /// Path name (`new_open`, `cached_read`, `open_descriptor`, `mmap`, `readdir`).
    pub path: &'static str,
    /// Milliseconds from the revoke call to the first denial; `None` = never denied.
    pub denied_ms: Option<f64>,
    /// The error seen (errno text or signal).
    pub error: Option<String>,
    /// Plaintext bytes this path returned after the volume was cut off.
    pub leaked_bytes: u64,
}

/// The drill's full result (stable JSON field names).
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    /// Schema version.
    pub schema: u32,
    /// Revocation method.
    pub revoke: Revoke,
    /// Mountpoint.
    pub mountpoint: PathBuf,
    /// KEK version revoked.
    pub key_id: String,
    /// Whether the mount had push notifications.
    pub push: bool,
    /// The cut-off bound that applies (1 s with push, interval + 1 s without).
    pub bound_ms: f64,
    /// Milliseconds the vault call took.
    pub revoke_call_ms: f64,
    /// Per path.
    pub paths: Vec<PathResult>,
    /// Slowest path's denial (the cut-off time).
    pub cutoff_ms: Option<f64>,
    /// Plaintext bytes returned after cut-off, all paths.
    pub leaked_bytes: u64,
    /// The backing file still holds the probe's ciphertext (right size, no plaintext).
    pub backing_intact: bool,
    /// Milliseconds from the restore call until the probe read back (None: not restored).
    pub heal_ms: Option<f64>,
    /// The probe read back byte for byte after healing.
    pub verified: Option<bool>,
    /// Timeline, in order.
    pub timeline: Vec<(f64, String)>,
    /// PASS or FAIL.
    pub verdict: String,
    /// Why it failed, when it did.
    pub failures: Vec<String>,
}

/// Why a drill could not run.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Not a live mount of this home.
    #[error("{0} is not a live cmkfs mount recorded in this CMKFS_HOME (mount it first)")]
    NotMounted(PathBuf),
    /// Setup failed.
    #[error("drill setup: {0}")]
    Setup(String),
    /// The vault refused the revoke or restore.
    #[error("vault: {0}")]
    Vault(#[from] crate::vault::VaultError),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DrillError + '_ {
    move |e| DrillError::Setup(format!("{what}: {e}"))
}

struct Clock(Instant);

impl Clock {
    fn ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

/// What it takes to undo a revocation.
enum Undo {
    Enable {
        name: String,
        version: String,
    },
    Recover {
        name: String,
    },
    Policies {
        identity: String,
        policies: Vec<(PolicyScope, Vec<Permission>)>,
    },
}

/// Runs a drill against the mount at `mountpoint`.
pub fn run(home: &Home, mountpoint: &Path, opts: &DrillOptions) -> Result<DrillReport, DrillError> {
    let mp =
        std::fs::canonicalize(mountpoint).map_err(|_| DrillError::NotMounted(mountpoint.into()))?;
    let record = RunRecord::load(home, &mp)
        .filter(|r| r.alive())
        .ok_or_else(|| DrillError::NotMounted(mp.clone()))?;
    let status: serde_json::Value = std::fs::read(RunRecord::status_path(home, &mp))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let push = status
        .get("push")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let interval_s = status
        .get("key_check_interval_s")
        .and_then(|v| v.as_u64())
        .unwrap_or(30);
    let bound_ms = if push {
        1000.0
    } else {
        (interval_s as f64 + 1.0) * 1000.0
    };
    let header =
        VolumeHeader::read(&record.cipherdir).map_err(setup("reading the volume header"))?;
    let kid: KeyId = header.key_id.parse()?;
    if kid.vault != crate::vault::local::URL {
        return Err(DrillError::Setup(format!(
            "drills revoke through the vault owner; {} is not the local vault",
            kid.vault
        )));
    }
    let owner = LocalVault::open(&home.vault_dir())?;

    // The probe: random bytes, fsynced, read once so its pages are cached.
    let mut probe_data = vec![0u8; opts.probe_size.max(4096)];
    getrandom::getrandom(&mut probe_data).map_err(setup("random probe"))?;
    let mut rnd = [0u8; 6];
    getrandom::getrandom(&mut rnd).map_err(setup("random name"))?;
    let probe = mp.join(format!(".cmkfs-drill-{}", hex::encode(rnd)));
    {
        let mut f = File::create(&probe).map_err(setup("creating the probe"))?;
        f.write_all(&probe_data)
            .map_err(setup("writing the probe"))?;
        f.sync_all().map_err(setup("fsyncing the probe"))?;
    }
    let backing_ino = std::fs::metadata(&probe)
        .map_err(setup("stat of the probe"))?
        .ino();
    let reader = File::open(&probe).map_err(setup("opening the probe"))?;
    let mut warm = vec![0u8; probe_data.len()];
    reader
        .read_exact_at(&mut warm, 0)
        .map_err(setup("warming the page cache"))?;
    let writer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&probe)
        .map_err(setup("opening the probe rw"))?;
    let mut mapper = MmapProbe::start(&probe)?;

    let clock = Clock(Instant::now());
    let mut timeline = vec![(
        0.0,
        format!("revoke issued ({:?}) on {kid}", opts.revoke).to_lowercase(),
    )];
    let undo = revoke(&owner, &kid, opts.revoke, record.identity.as_deref())?;
    let revoke_call_ms = clock.ms();
    timeline.push((revoke_call_ms, "vault acknowledged the revocation".into()));

    let mut paths = poll_paths(
        &clock,
        opts.timeout,
        &probe,
        &mp,
        &reader,
        &writer,
        &mut mapper,
        &probe_data,
    );
    for p in &paths {
        match p.denied_ms {
            Some(t) => timeline.push((
                t,
                format!("{} denied ({})", p.path, p.error.as_deref().unwrap_or("?")),
            )),
            None => timeline.push((
                clock.ms(),
                format!("{} NOT denied within {:?}", p.path, opts.timeout),
            )),
        }
    }
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    let cutoff_ms = paths
        .iter()
        .map(|p| p.denied_ms)
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().fold(0.0, f64::max));
    // Keep trying every path for a moment after cut-off: nothing may leak later either.
    leak_watch(
        &mut paths,
        &probe,
        &mp,
        &reader,
        &writer,
        &probe_data,
        Duration::from_millis(200),
    );
    let leaked_bytes = paths.iter().map(|p| p.leaked_bytes).sum();

    let backing_intact = backing_holds_ciphertext(&record.cipherdir, backing_ino, &probe_data);
    timeline.push((
        clock.ms(),
        format!(
            "backing file {}",
            if backing_intact {
                "intact (ciphertext, right size)"
            } else {
                "NOT intact"
            }
        ),
    ));

    let (mut heal_ms, mut verified) = (None, None);
    if opts.restore {
        let t = clock.ms();
        timeline.push((t, "restore issued".into()));
        restore(&owner, undo)?;
        let deadline = Instant::now() + opts.timeout;
        loop {
            if let Ok(bytes) = std::fs::read(&probe) {
                heal_ms = Some(clock.ms() - t);
                verified = Some(bytes == probe_data);
                timeline.push((
                    clock.ms(),
                    format!(
                        "healed: probe read back, {}",
                        if bytes == probe_data {
                            "bytes verified"
                        } else {
                            "BYTES DIFFER"
                        }
                    ),
                ));
                break;
            }
            if Instant::now() > deadline {
                timeline.push((clock.ms(), "NOT healed within the timeout".into()));
                verified = Some(false);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_file(&probe);
    } else {
        timeline.push((
            clock.ms(),
            format!("not restored: the probe stays at {}", probe.display()),
        ));
    }
    drop(mapper);

    let mut failures = Vec::new();
    for p in &paths {
        match p.denied_ms {
            None => failures.push(format!("{} was never denied", p.path)),
            Some(t) if t > bound_ms => failures.push(format!(
                "{} denied after {t:.0} ms > {bound_ms:.0} ms",
                p.path
            )),
            _ => {}
        }
    }
    if leaked_bytes > 0 {
        failures.push(format!(
            "{leaked_bytes} plaintext bytes readable after cut-off"
        ));
    }
    if !backing_intact {
        failures.push("the backing file does not hold the probe's ciphertext".into());
    }
    if let Some(h) = heal_ms {
        if h > 1000.0 && push {
            failures.push(format!("healed after {h:.0} ms > 1000 ms"));
        }
    }
    if verified == Some(false) {
        failures.push("the probe did not read back byte for byte".into());
    }
    Ok(DrillReport {
        schema: 1,
        revoke: opts.revoke,
        mountpoint: mp,
        key_id: kid.to_string(),
        push,
        bound_ms,
        revoke_call_ms,
        paths,
        cutoff_ms,
        leaked_bytes,
        backing_intact,
        heal_ms,
        verified,
        timeline,
        verdict: if failures.is_empty() { "PASS" } else { "FAIL" }.into(),
        failures,
    })
}

fn revoke(
    v: &LocalVault,
    kid: &KeyId,
    how: Revoke,
    identity: Option<&str>,
) -> Result<Undo, DrillError> {
    match how {
        Revoke::Disable => {
            v.update_key(
                &kid.name,
                Some(&kid.version),
                &KeyUpdate {
                    enabled: Some(false),
                    ..Default::default()
                },
            )?;
            Ok(Undo::Enable {
                name: kid.name.clone(),
                version: kid.version.clone(),
            })
        }
        Revoke::Delete => {
            v.delete_key(&kid.name)?;
            Ok(Undo::Recover {
                name: kid.name.clone(),
            })
        }
        Revoke::Policy => {
            let identity = identity.ok_or_else(|| {
                DrillError::Setup(
                    "this mount reaches the vault as its owner, whom no policy limits; mount with --credential to drill policy removal".into(),
                )
            })?;
            let mut policies = Vec::new();
            for p in v.list_policies(Some(identity))? {
                let scope = if p.key == "*" {
                    PolicyScope::AllKeys
                } else {
                    PolicyScope::Key(p.key.clone())
                };
                if p.key == "*" || p.key == kid.name {
                    v.remove_policy(identity, &scope)?;
                    policies.push((scope, p.permissions));
                }
            }
            if policies.is_empty() {
                return Err(DrillError::Setup(format!(
                    "identity {identity} has no policy on key {}",
                    kid.name
                )));
            }
            Ok(Undo::Policies {
                identity: identity.to_string(),
                policies,
            })
        }
    }
}

fn restore(v: &LocalVault, undo: Undo) -> Result<(), DrillError> {
    match undo {
        Undo::Enable { name, version } => {
            v.update_key(
                &name,
                Some(&version),
                &KeyUpdate {
                    enabled: Some(true),
                    ..Default::default()
                },
            )?;
        }
        Undo::Recover { name } => {
            v.recover_deleted_key(&name)?;
        }
        Undo::Policies { identity, policies } => {
            for (scope, perms) in policies {
                v.set_policy(&identity, &scope, &perms)?;
            }
        }
    }
    Ok(())
}

/// A child process holding a shared mmap of the probe and touching every page in a loop;
/// a SIGBUS (the kernel's answer to a refused page-in) ends it.
struct MmapProbe {
    child: Child,
}

impl MmapProbe {
    fn start(file: &Path) -> Result<MmapProbe, DrillError> {
        let exe = std::env::current_exe().map_err(setup("locating cmkfs"))?;
        let mut child = Command::new(exe)
            .arg("__mmap-probe")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(setup("starting the mmap probe"))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| DrillError::Setup("mmap probe stdout".into()))?;
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        if line.trim() != "READY" {
            let _ = child.kill();
            return Err(DrillError::Setup(
                "the mmap probe could not map the file".into(),
            ));
        }
        Ok(MmapProbe { child })
    }

    /// `Some(signal description)` once the child is gone.
    fn ended(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        match self.child.try_wait() {
            Ok(Some(st)) => Some(match st.signal() {
                Some(libc::SIGBUS) => "SIGBUS".into(),
                Some(s) => format!("signal {s}"),
                None => format!("exit {}", st.code().unwrap_or(-1)),
            }),
            _ => None,
        }
    }
}

impl Drop for MmapProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of `cmkfs __mmap-probe FILE`: map, say READY, touch every page forever.
pub fn mmap_probe_main(file: &Path) -> ! {
    use std::os::fd::AsRawFd;
    let f = match File::open(file) {
        Ok(f) => f,
        Err(_) => std::process::exit(2),
    };
    let len = f.metadata().map(|m| m.len() as usize).unwrap_or(0);
    if len == 0 {
        std::process::exit(2);
    }
    // SAFETY: a fresh shared read-only mapping of an open file of `len` bytes.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::process::exit(2);
    }
    let base = p as *const u8;
    let mut sum = 0u8;
    for off in (0..len).step_by(4096) {
        // SAFETY: off < len, inside the mapping.
        sum ^= unsafe { std::ptr::read_volatile(base.add(off)) };
    }
    std::hint::black_box(sum);
    println!("READY");
    let _ = std::io::stdout().flush();
    loop {
        for off in (0..len).step_by(4096) {
            // SAFETY: as above. A refused page-in raises SIGBUS here, which ends the process.
            sum ^= unsafe { std::ptr::read_volatile(base.add(off)) };
        }
        std::hint::black_box(sum);
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn err_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EIO) => "EIO".into(),
        Some(n) => format!("errno {n}"),
        None => e.to_string(),
    }
}

/// One attempt on each path: `Ok(bytes of plaintext seen)` or `Err(error text)`.
fn attempt(
    which: &str,
    probe: &Path,
    mp: &Path,
    reader: &File,
    writer: &File,
    data: &[u8],
) -> Result<u64, String> {
    let mut buf = vec![0u8; 4096];
    let check = |got: &[u8], off: usize| {
        if got == &data[off..off + got.len()] {
            got.len() as u64
        } else {
            0
        }
    };
    match which {
        "new_open" => {
            let f = File::open(probe).map_err(|e| err_text(&e))?;
            let n = f.read_at(&mut buf, 0).map_err(|e| err_text(&e))?;
            Ok(check(&buf[..n], 0))
        }
        "cached_read" => {
            let n = reader.read_at(&mut buf, 0).map_err(|e| err_text(&e))?;
            Ok(check(&buf[..n], 0))
        }
        "open_descriptor" => {
            // The last page through the read-write descriptor, then a write through it: an
            // open descriptor must neither read nor write.
            let off = data.len() - buf.len();
            let n = writer
                .read_at(&mut buf, off as u64)
                .map_err(|e| err_text(&e))?;
            let seen = check(&buf[..n], off);
            writer.write_at(&data[..16], 0).map_err(|e| err_text(&e))?;
            Ok(seen)
        }
        "readdir" => {
            let names: Vec<_> = std::fs::read_dir(mp)
                .map_err(|e| err_text(&e))?
                .collect::<Result<_, _>>()
                .map_err(|e| err_text(&e))?;
            // Names are plaintext too: count their bytes.
            Ok(names.iter().map(|e| e.file_name().len() as u64).sum())
        }
        _ => Ok(0),
    }
}

const PATHS: [&str; 5] = [
    "new_open",
    "cached_read",
    "open_descriptor",
    "mmap",
    "readdir",
];

#[allow(clippy::too_many_arguments)]
fn poll_paths(
    clock: &Clock,
    timeout: Duration,
    probe: &Path,
    mp: &Path,
    reader: &File,
    writer: &File,
    mapper: &mut MmapProbe,
    data: &[u8],
) -> Vec<PathResult> {
    let mut res: Vec<PathResult> = PATHS
        .iter()
        .map(|p| PathResult {
            path: p,
            denied_ms: None,
            error: None,
            leaked_bytes: 0,
        })
        .collect();
    let deadline = Instant::now() + timeout;
    while res.iter().any(|r| r.denied_ms.is_none()) && Instant::now() < deadline {
        for r in res.iter_mut().filter(|r| r.denied_ms.is_none()) {
            let outcome = if r.path == "mmap" {
                mapper.ended().map(Err).unwrap_or(Ok(0))
            } else {
                attempt(r.path, probe, mp, reader, writer, data)
            };
            if let Err(e) = outcome {
                r.denied_ms = Some(clock.ms());
                r.error = Some(e);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    res
}

fn leak_watch(
    paths: &mut [PathResult],
    probe: &Path,
    mp: &Path,
    reader: &File,
    writer: &File,
    data: &[u8],
    d: Duration,
) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        for r in paths
            .iter_mut()
            .filter(|r| r.denied_ms.is_some() && r.path != "mmap")
        {
            if let Ok(n) = attempt(r.path, probe, mp, reader, writer, data) {
                r.leaked_bytes += n;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finds the probe's backing file by inode number (the mount exposes backing inode numbers)
/// and checks it is ciphertext of the right size.
fn backing_holds_ciphertext(cipherdir: &Path, ino: u64, data: &[u8]) -> bool {
    let Ok(dir) = std::fs::read_dir(cipherdir) else {
        return false;
    };
    for e in dir.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.ino() != ino {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            return false;
        };
        // The drill's volume is what `cmkfs init` makes: format v3.
        let lay = crate::volume::layout::Layout::V3;
        let right_size = bytes.len() as u64 == lay.backing_len(data.len() as u64);
        let no_plaintext = !bytes.windows(32).any(|w| w == &data[..32])
            && !bytes[FILE_HEADER_LEN..].starts_with(data);
        return right_size && no_plaintext;
    }
    false
}

/// Renders the timeline as a small SVG: one row per event on a millisecond axis.
pub fn svg(r: &DrillReport) -> String {
    let max = r.timeline.iter().map(|t| t.0).fold(1.0, f64::max) * 1.05;
    let (w, row, left) = (900.0, 22.0, 40.0);
    let h = 70.0 + row * r.timeline.len() as f64;
    let x = |t: f64| left + (w - left - 20.0) * t / max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"monospace\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">cmkfs drill: revoke={:?} verdict={} cut-off={} heal={}</text>\n\
         <line x1=\"{left}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"black\"/>\n",
        r.revoke,
        r.verdict,
        r.cutoff_ms.map(|c| format!("{c:.1} ms")).unwrap_or("-".into()),
        r.heal_ms.map(|c| format!("{c:.1} ms")).unwrap_or("-".into()),
        y = h - 25.0,
        x2 = w - 20.0,
    );
    for (i, (t, what)) in r.timeline.iter().enumerate() {
        let y = 45.0 + row * i as f64;
        let color = if what.contains("denied") {
            "#c0392b"
        } else if what.contains("healed") {
            "#27ae60"
        } else {
            "#2c3e50"
        };
        s += &format!(
            "<line x1=\"{xx}\" y1=\"{y}\" x2=\"{xx}\" y2=\"{b}\" stroke=\"{color}\" stroke-dasharray=\"2,3\"/>\
             <circle cx=\"{xx}\" cy=\"{y}\" r=\"4\" fill=\"{color}\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{t:.1} ms  {}</text>\n",
            xml_escape(what),
            xx = x(*t),
            b = h - 25.0,
            tx = (x(*t) + 8.0).min(w - 420.0),
            ty = y + 4.0,
        );
    }
    s += &format!("<text x=\"{left}\" y=\"{}\">0 ms</text><text x=\"{}\" y=\"{}\">{max:.0} ms</text>\n</svg>\n", h - 8.0, w - 80.0, h - 8.0);
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

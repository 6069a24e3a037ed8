//! `cmkfs backup CIPHERDIR ARCHIVE` and `cmkfs restore ARCHIVE CIPHERDIR --des NAME`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backup::{self, BackupKey, BackupReport, BackupRequest, Progress, RestoreReport};
use crate::des::{DesStore, KeySpec};
use crate::home::Home;
use crate::vault::{self, Credential, Vault};
use crate::volume::header::VolumeHeader;
use crate::volume::lock::VolumeLock;

/// `cmkfs backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Backing directory of the volume.
    cipherdir: PathBuf,
    /// The archive to create (a tar file; it must not exist).
    archive: PathBuf,
    /// Wrap the DEK in the archive with this key: a name in the local vault, or
    /// `<vault-url>/keys/<name>[/<version>]` of any configured vault (default: the volume's
    /// own key).
    #[arg(long, value_name = "KEY_ID", conflicts_with = "des")]
    key: Option<String>,
    /// Wrap the DEK in the archive with this Disk Encryption Set's active key, as its
    /// identity.
    #[arg(long, value_name = "NAME")]
    des: Option<String>,
    /// Reach the --key's vault as this identity (a credential file of that vault; one of
    /// another vault is refused).
    #[arg(long, value_name = "FILE")]
    key_credential: Option<PathBuf>,
    /// Reach the volume's vault as this identity (as `cmkfs mount --credential`).
    #[arg(long, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// Store only what changed since this previous archive of the volume (a full or an
    /// incremental one): the new archive names it as its base, and `cmkfs restore` needs
    /// the whole chain, the full backup first.
    #[arg(long, value_name = "PREVIOUS")]
    incremental_from: Option<PathBuf>,
    /// Back up a mounted volume even when its writes cannot be frozen (the archive is then
    /// not a point-in-time view: files written meanwhile may be torn).
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `cmkfs restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The archive made by `cmkfs backup`; for incremental backups the chain: the full
    /// backup, then each incremental archive in the order they were taken.
    #[arg(required = true, num_args = 1.., value_name = "ARCHIVE")]
    archives: Vec<PathBuf>,
    /// The backing directory to create (absent, or an empty directory).
    cipherdir: PathBuf,
    /// Find the bases of the (one) ARCHIVE given in this directory: the chain is followed
    /// back from ARCHIVE to its full backup through the archives there.
    #[arg(long, value_name = "DIR")]
    bases: Option<PathBuf>,
    /// The Disk Encryption Set the restored volume belongs to (its key wraps the DEK).
    #[arg(long, value_name = "NAME")]
    des: String,
    /// Re-encrypt every file, name, symlink target and xattr under a fresh DEK, so the
    /// restored volume shares no key and no ciphertext block with the source.
    #[arg(long)]
    new_dek: bool,
    /// With --new-dek: leave out what `cmkfs fsck --repair` set aside in the archive's
    /// `cmkfs.quarantine/` (it cannot be re-encrypted); without it such an archive is refused.
    #[arg(long, requires = "new_dek")]
    discard_quarantine: bool,
    /// Recreate the archive's device nodes (block and character). Without it an archive
    /// holding one is refused: a device node in the restored backing directory is usable
    /// directly by whoever its mode lets in, outside the mount's `nodev`.
    #[arg(long)]
    allow_devices: bool,
    /// Reach the backup key's vault as this identity (credential file); by default as the
    /// vault's owner (local) or the configured credential.
    #[arg(long, value_name = "FILE")]
    credential: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A progress bar on a terminal.
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(on: bool, what: &str) -> Bar {
        Bar(on.then(|| {
            let b = ProgressBar::new(0);
            if let Ok(s) = ProgressStyle::with_template(
                "{msg:8} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(s);
            }
            b.set_message(what.to_string());
            b
        }))
    }

    fn show(&self, p: &Progress) {
        if let Some(b) = &self.0 {
            b.set_length(p.bytes_total.max(p.bytes_done));
            b.set_position(p.bytes_done);
        }
    }

    fn done(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// How long `backup` waits for a mount to answer its freeze request.
const FREEZE_ANSWER: Duration = Duration::from_secs(30);

/// Writes through a mount held back for as long as this lives (the daemon thaws when the
/// connection closes, also when this process dies, and when the freeze is not renewed
/// within the mount's `--freeze-limit`: a thread renews it every second).
struct Freeze {
    conn: UnixStream,
    /// What the mount answered: not [`crate::control::FrozenAnswer::exact`] when its drain
    /// could not reach a file open through it, or it is an older daemon that does not say:
    /// the archive is then no point-in-time view.
    answer: crate::control::FrozenAnswer,
    since: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Freeze {
    /// Ends the freeze; an error if the mount lifted it before (its time limit passed while
    /// this process could not renew it, or the volume's key was revoked): then what was read
    /// is not one point in time.
    fn release(mut self) -> Result<(), FreezeLost> {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        let _ = send_nosignal(&self.conn, b"thaw\n");
        let lost = |why: anyhow::Error| FreezeLost {
            revoked: false,
            why,
        };
        self.conn
            .set_read_timeout(Some(FREEZE_ANSWER))
            .map_err(|e| lost(e.into()))?;
        let mut line = String::new();
        let _ = BufReader::new(&self.conn).read_line(&mut line);
        match serde_json::from_str::<crate::control::Answer>(line.trim()) {
            Ok(crate::control::Answer::Thawed(why)) if why == "released" => Ok(()),
            Ok(crate::control::Answer::Thawed(why)) => Err(FreezeLost {
                revoked: why == crate::control::THAWED_REVOKED,
                why: anyhow!(
                    "the mount lifted the write freeze before the backup ended ({why}): the \
                     archive is not a point-in-time view"
                ),
            }),
            _ => Err(lost(anyhow!(
                "the mount did not confirm the write freeze at the end of the backup (answer: \
                 {:?}): the archive may not be a point-in-time view",
                line.trim()
            ))),
        }
    }
}

/// Why a backup's write freeze ended before the backup did.
struct FreezeLost {
    /// The volume's key was revoked (the mount cut itself off): a larger --freeze-limit or
    /// --force would not help, access to the key must come back first.
    revoked: bool,
    why: anyhow::Error,
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer that closed the socket is an error, not a SIGPIPE.
fn send_nosignal(conn: &UnixStream, b: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: send on a valid socket from a valid buffer of the given length.
    let r = unsafe {
        libc::send(
            conn.as_raw_fd(),
            b.as_ptr().cast(),
            b.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the mount at `mountpoint` to freeze writes (after flushing what the kernel holds).
fn freeze(home: &Home, mountpoint: &Path) -> anyhow::Result<Freeze> {
    if let Ok(d) = std::fs::File::open(mountpoint) {
        let _ = rustix::fs::syncfs(&d);
    }
    let path = crate::control::socket_path(home, mountpoint);
    let mut conn = UnixStream::connect(&path)
        .with_context(|| format!("the mount has no control socket ({})", path.display()))?;
    conn.set_read_timeout(Some(FREEZE_ANSWER))?;
    let mut req = serde_json::to_vec(&crate::control::Request::Freeze)?;
    req.push(b'\n');
    conn.write_all(&req)?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?)
        .read_line(&mut line)
        .context("the mount did not answer the freeze request")?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).context("the mount's answer is not JSON")?;
    // Any answer with a boolean `frozen` holds writes back, whatever its age
    // (`FrozenAnswer`); whether it is one point in time is for its `exact` to say.
    if let Ok(answer) = serde_json::from_value::<crate::control::FrozenAnswer>(v.clone()) {
        conn.set_read_timeout(None)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewer = {
            let (conn, stop) = (conn.try_clone()?, stop.clone());
            std::thread::spawn(move || {
                let line = format!("{}\n", crate::control::RENEW);
                let mut seen = backup::activity();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    for _ in 0..10 {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    // Renewed only while the backup advances: one blocked (its archive on a
                    // frozen mount, its own or another backup's) loses the freeze after the
                    // mount's --freeze-limit, and then fails, instead of freezing for ever.
                    let now = backup::activity();
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    // NOSIGNAL: a mount that lifted the freeze closed the socket; the end of
                    // the backup reports it, no SIGPIPE kills this process.
                    if send_nosignal(&conn, line.as_bytes()).is_err() {
                        break;
                    }
                }
            })
        };
        return Ok(Freeze {
            conn,
            answer,
            since: Instant::now(),
            stop,
            renewer: Some(renewer),
        });
    }
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) => bail!("the mount refused to freeze writes: {e}"),
        None => bail!("the mount did not freeze writes (answer: {})", line.trim()),
    }
}

/// Refuses an archive inside the volume it backs up (its backing directory, or the mount
/// being frozen): its writes would wait on the backup's own freeze.
fn refuse_archive_inside(archive: &Path, root: &Path, mnt: Option<&Path>) -> anyhow::Result<()> {
    let dir = archive
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Ok(()); // creating the temp file beside it reports the error
    };
    for (inside, what) in [(Some(root), "backing directory"), (mnt, "mount")] {
        if let Some(p) = inside.filter(|p| dir.starts_with(p)) {
            bail!(
                "{} lies inside the volume it backs up (its {what} {}): write the archive \
                 outside the volume",
                archive.display(),
                p.display()
            );
        }
    }
    Ok(())
}

/// What a backup needs from the volume's header: its vault, its DEK(s), the base.
struct Unlocked {
    vault: Box<dyn Vault>,
    deks: crate::keyring::Unwrapped,
    base: Option<backup::BaseState>,
}

fn unlock_for_backup(
    home: &Home,
    root: &Path,
    header: &VolumeHeader,
    a: &BackupArgs,
) -> anyhow::Result<Unlocked> {
    let (vault, _) = super::volume::volume_vault(home, header, a.credential.as_deref())?;
    crate::des::check_binding(home, root, header)?;
    let deks = crate::unlock::unwrap(home, vault.as_ref(), header)?;
    crate::crypto::secret::scrub_stack();
    let base = match &a.incremental_from {
        Some(p) => Some(
            backup::BaseState::load(p, header, &deks)
                .with_context(|| format!("previous archive {}", p.display()))?,
        ),
        None => None,
    };
    Ok(Unlocked { vault, deks, base })
}

/// A backup key named by `--key` or `--des`, resolved before the freeze.
struct ChosenKey {
    vault: Box<dyn Vault>,
    name: String,
    version: Option<String>,
    alg: vault::WrapAlg,
}

/// How long a backup whose freeze came in the middle of an online re-encryption waits for
/// the run to end before it is refused.
const RUN_TO_END: Duration = Duration::from_secs(30);

/// Waits (at most `limit`) until the volume at `root` is not in the middle of something.
fn wait_quiet(root: &Path, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        let quiet = VolumeHeader::read(root)
            .ok()
            .is_some_and(|h| backup::check_quiet(root, &h).is_ok());
        if quiet {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmkfs backup`.
pub fn run_backup(a: BackupArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let root = std::fs::canonicalize(&a.cipherdir)
        .with_context(|| format!("{}", a.cipherdir.display()))?;
    let before = VolumeHeader::read(&root)?;
    crate::unlock::check_configured(&home, &before)?;
    let mount = crate::fsck::find_mount(&root, &home);
    refuse_archive_inside(&a.archive, &root, mount.as_ref().map(|(m, _)| m.as_path()))?;
    // Everything that may wait (the vault, the base archive, the archive's directory) before
    // the freeze: a frozen backup only walks the volume and writes its archive. A volume
    // being re-encrypted is refused at once, not after waiting for the freeze.
    backup::check_quiet(&root, &before)?;
    let chosen: Option<ChosenKey> = match (&a.key, &a.des) {
        (_, Some(name)) => {
            let des = DesStore::new(&home).load(name)?;
            let key_vault = crate::des::open_vault(&home, &des)?;
            let kid = des.active_key_id()?;
            let info = key_vault.get_key(&kid.name, Some(&kid.version))?;
            Some(ChosenKey {
                vault: key_vault,
                name: kid.name,
                version: Some(kid.version),
                alg: info.wrap_alg,
            })
        }
        (Some(k), None) => {
            let spec = KeySpec::parse(k, None, vault::local::URL)?;
            if spec.vault == vault::local::URL && spec.name == crate::des::PLATFORM_KEY {
                bail!("{k} is cmkfs's platform key; choose another --key");
            }
            let key_vault = match &a.key_credential {
                Some(p) => {
                    let cred = Credential::load(p)?;
                    if !crate::des::same_vault(&cred.vault, &spec.vault) {
                        bail!(
                            "--key-credential {} is for vault {}, not for the vault of --key {k} \
                             ({}): give a credential of {}, or name the key by its URL in {}",
                            p.display(),
                            cred.vault,
                            spec.vault,
                            spec.vault,
                            cred.vault
                        );
                    }
                    vault::open_with_credential(&home, &cred)?
                }
                None => vault::open(&spec.vault, &home)?,
            };
            let info = key_vault
                .get_key(&spec.name, spec.version.as_deref())
                .with_context(|| format!("backup key {k}"))?;
            Some(ChosenKey {
                vault: key_vault,
                name: info.name.clone(),
                version: Some(info.version.clone()),
                alg: info.wrap_alg,
            })
        }
        (None, None) => None,
    };
    let mut unlocked = unlock_for_backup(&home, &root, &before, &a)?;
    let temp = backup::ArchiveTemp::prepare(&a.archive)?;
    #[cfg(debug_assertions)]
    test_hold("before-freeze");

    // A point-in-time view: a mounted volume's writes are frozen; an unmounted one is locked
    // exclusively, so no mount starts meanwhile.
    let mut frozen = None;
    let mut _lock = None;
    let mut rounds = 0;
    let header = loop {
        rounds += 1;
        match &mount {
            Some((mnt, pid)) => match freeze(&home, mnt) {
                Ok(f) => frozen = Some(f),
                Err(e) if a.force => {
                    if !a.json {
                        eprintln!(
                            "cmkfs: warning: {} is mounted at {} and its writes are not frozen \
                             ({e:#}): the archive is not a point-in-time view",
                            root.display(),
                            mnt.display()
                        );
                    }
                }
                Err(e) => bail!(
                    "{} is mounted at {} (daemon {pid}) and its writes could not be frozen \
                     ({e:#}); unmount it, or add --force to back it up while it changes",
                    root.display(),
                    mnt.display()
                ),
            },
            None => _lock = Some(VolumeLock::exclusive(&root)?),
        }
        #[cfg(debug_assertions)]
        test_hold("frozen");
        // The header as it is now that nothing changes it: the freeze may have waited for
        // an online re-encryption (or a rewrap) to end; then the finished volume is backed up.
        let header = VolumeHeader::read(&root)?;
        let Some(f) = frozen.take() else {
            break header;
        };
        if rounds > 3 || backup::check_quiet(&root, &header).is_ok() {
            frozen = Some(f); // after three rounds `backup` refuses it
            break header;
        }
        // An online re-encryption began after the check above, and the mount granted the
        // freeze between its phases or just before it wrote its final header: let it end,
        // then freeze again (a run that does not end soon is refused, as one at the start).
        let _ = f.release();
        if !wait_quiet(&root, RUN_TO_END) {
            bail!(
                "{} is being re-encrypted (a run started while this backup waited for its \
                 freeze and has not ended within {} s): back up once it has finished",
                root.display(),
                RUN_TO_END.as_secs()
            );
        }
    };
    if let (Some(f), Some((mnt, pid))) = (&frozen, &mount) {
        if f.answer.from_older_daemon() {
            eprintln!(
                "cmkfs: warning: the mount at {} (daemon {pid}) is from an older cmkfs that \
                 does not say whether its freeze reached every file open through it, so the \
                 archive says point_in_time: false; unmount and mount it again with this cmkfs \
                 for one point in time",
                mnt.display()
            );
        } else if !f.answer.exact() {
            eprintln!(
                "cmkfs: warning: the mount at {} could not reach a file open through it before \
                 the freeze (its only name one the mount never looked up, or a file its daemon \
                 may neither read nor write; its log names the inode): a write(2) into it that \
                 returned before the backup may be missing or in part, so the archive says \
                 point_in_time: false; close that file and back up again for one point in time",
                mnt.display()
            );
        }
    }
    if header != before {
        unlocked = unlock_for_backup(&home, &root, &header, &a)?;
    }
    let Unlocked { vault, deks, base } = unlocked;
    let key = match &chosen {
        Some(c) => BackupKey {
            vault: c.vault.as_ref(),
            name: c.name.clone(),
            version: c.version.clone(),
            alg: c.alg,
        },
        None => {
            let kid = header.key_id()?;
            BackupKey {
                vault: vault.as_ref(),
                name: kid.name,
                version: Some(kid.version),
                alg: header.wrap_alg,
            }
        }
    };
    let bar = Bar::new(!a.json, "backup");
    let mut show = |p: &Progress| bar.show(p);
    let result = backup::backup_into(
        &BackupRequest {
            root: &root,
            header: &header,
            deks: &deks,
            key,
            archive: &a.archive,
            point_in_time: frozen.as_ref().is_some_and(|f| f.answer.exact()) || _lock.is_some(),
            base: base.as_ref(),
        },
        temp,
        Some(&mut show),
    );
    let freeze_seconds = frozen.as_ref().map(|f| f.since.elapsed().as_secs_f64());
    let held = frozen.map(Freeze::release).transpose();
    bar.done();
    let mut report = result.with_context(|| format!("backing up {}", root.display()))?;
    if let Err(lost) = held {
        // Not the view it claims to be: removed rather than left looking like one.
        let _ = std::fs::remove_file(&a.archive);
        let remedy = if lost.revoked {
            "the volume's key was revoked or disabled while the backup ran: restore access to \
             the key, then back up again"
        } else {
            "mount with a larger --freeze-limit, or back up with --force to accept a view \
             that is not one point in time"
        };
        return Err(lost.why).with_context(|| {
            format!(
                "backing up {} ({} removed; {remedy})",
                root.display(),
                a.archive.display()
            )
        });
    }
    #[cfg(debug_assertions)]
    test_pause_before_recheck();
    // A key owner who revoked the volume's KEK while the backup ran has cut the mount off
    // already; the archive would otherwise be a fresh copy of the DEK, usable under the
    // backup key, made after the revocation. The same unwrap as at the start, on the header
    // as it is now (a rotation meanwhile is not a revocation).
    let still = VolumeHeader::read(&root)
        .map_err(anyhow::Error::from)
        .and_then(|h| Ok(crate::unlock::unwrap(&home, vault.as_ref(), &h)?));
    crate::crypto::secret::scrub_stack();
    if let Err(e) = still {
        let _ = std::fs::remove_file(&a.archive);
        return Err(e).with_context(|| {
            format!(
                "backing up {}: the volume's key stopped unwrapping its DEK before the backup \
                 ended (revoked or disabled?), so {} was removed; back up again once access \
                 is restored",
                root.display(),
                a.archive.display()
            )
        });
    }
    report.freeze_seconds = freeze_seconds;
    print_backup(&root, &report, a.json)
}

/// Debug builds only (tests): with `CMKFS_TEST_BACKUP_PAUSE=PATH`, the archive is complete
/// and `PATH.reached` is created, then the backup waits (at most 20 s) for `PATH` to exist
/// before its final key check, so a test can revoke the key in between.
#[cfg(debug_assertions)]
fn test_pause_before_recheck() {
    let Some(gate) = std::env::var_os("CMKFS_TEST_BACKUP_PAUSE").map(std::path::PathBuf::from)
    else {
        return;
    };
    let mut reached = gate.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, b"");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !gate.exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Debug builds only (tests): with `CMKFS_TEST_BACKUP_HOLD=STAGE:PATH`, at `STAGE`
/// (`before-freeze`: everything prepared, the freeze not yet asked for; `frozen`: the freeze
/// granted, nothing copied) `PATH.reached` is created and the backup waits, doing nothing
/// (at most 20 s), for `PATH` to exist.
#[cfg(debug_assertions)]
fn test_hold(stage: &str) {
    let Some(v) = std::env::var_os("CMKFS_TEST_BACKUP_HOLD") else {
        return;
    };
    let v = v.to_string_lossy();
    let Some(gate) = v.strip_prefix(stage).and_then(|r| r.strip_prefix(':')) else {
        return;
    };
    let gate = std::path::PathBuf::from(gate);
    let _ = std::fs::write(format!("{}.reached", gate.display()), b"");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !gate.exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn mbs(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

fn print_backup(root: &Path, r: &BackupReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let t = &r.totals;
    println!(
        "backed up {} to {}: {} files ({} sparse), {} directories, {} symlinks, {} hard links, \
         {} special; {:.1} MB of data in {:.2} s ({:.0} MB/s), archive {:.1} MB",
        root.display(),
        r.archive.display(),
        t.files,
        t.sparse,
        t.dirs,
        t.symlinks,
        t.hardlinks,
        t.special,
        t.bytes as f64 / 1e6,
        r.seconds,
        mbs(t.bytes, r.seconds),
        r.archive_bytes as f64 / 1e6
    );
    println!("  DEK wrapped by {}", r.key_id);
    if let (Some(base), Some(s)) = (&r.base, &r.stored) {
        println!(
            "  incremental (archive {} of its chain) on {}: {} members ({:.1} MB) stored, {} \
             taken from the base ({} of them renamed or with new metadata), {} files read to \
             compare",
            r.chain_depth.unwrap_or(0) + 1,
            base.display(),
            s.members,
            s.bytes as f64 / 1e6,
            s.referenced,
            s.changed_records,
            r.files_compared
        );
    }
    match r.freeze_seconds {
        Some(s) if r.point_in_time => {
            println!("  writes through the mount were frozen for {s:.2} s (a point-in-time view)")
        }
        Some(s) => println!(
            "  writes through the mount were frozen for {s:.2} s, but not a point-in-time view: \
             the mount's drain missed a file open through it"
        ),
        None if r.point_in_time => {}
        None => println!("  not a point-in-time view: the mount kept writing (--force)"),
    }
    if r.sockets_skipped > 0 {
        println!(
            "  {} sockets skipped (they hold no data)",
            r.sockets_skipped
        );
    }
    for p in &r.stale_temp_removed {
        println!("  removed {} (left by a killed backup)", p.display());
    }
    Ok(())
}

/// Runs `cmkfs restore`.
pub fn run_restore(a: RestoreArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let cred = match &a.credential {
        Some(p) => Some(Credential::load(p)?),
        None => None,
    };
    let open = |kid: &vault::KeyId| -> Result<Box<dyn Vault>, backup::BackupError> {
        Ok(match &cred {
            Some(c) => {
                if c.vault != kid.vault {
                    return Err(backup::BackupError::Refused(format!(
                        "the credential of {} is for vault {:?}, but the backup key is in {:?}",
                        c.identity, c.vault, kid.vault
                    )));
                }
                vault::open_with_credential(&home, c)?
            }
            None => vault::open(&kid.vault, &home)?,
        })
    };
    let archives = match &a.bases {
        None => a.archives.clone(),
        Some(dir) => {
            let [newest] = a.archives.as_slice() else {
                bail!("--bases takes one ARCHIVE (the newest of its chain); its bases are found in {}", dir.display());
            };
            backup::chain::find_chain(newest, dir)?
        }
    };
    let shown = archives
        .last()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let bar = Bar::new(!a.json, "restore");
    let mut show = |p: &Progress| bar.show(p);
    let r = backup::restore(
        &backup::RestoreRequest {
            home: &home,
            archives: &archives,
            target: &a.cipherdir,
            des: &a.des,
            new_dek: a.new_dek,
            discard_quarantine: a.discard_quarantine,
            allow_devices: a.allow_devices,
            open_vault: &open,
        },
        Some(&mut show),
    );
    bar.done();
    let r = r.with_context(|| format!("restoring {shown}"))?;
    print_restore(&r, a.json)
}

fn print_restore(r: &RestoreReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let t = &r.totals;
    println!(
        "restored volume {} into {} under Disk Encryption Set {}: {} files, {} directories, {} \
         symlinks, {} hard links; {:.1} MB archive in {:.2} s ({:.0} MB/s); verified: every \
         member's SHA-256, the manifest MAC",
        r.volume_id,
        r.target.display(),
        r.des,
        t.files,
        t.dirs,
        t.symlinks,
        t.hardlinks,
        r.archive_bytes as f64 / 1e6,
        r.seconds,
        mbs(r.archive_bytes, r.seconds)
    );
    println!(
        "  DEK wrapped by {} (the archive's by {})",
        r.key_id, r.backup_key_id
    );
    if let Some(p) = &r.source_live_at {
        println!(
            "  the source volume is live at {} (same DEK): the restored copy got a new volume \
             id, so that the two are never taken for each other (incremental backups of the \
             copy start with a full one; --new-dek makes an independent copy under its own DEK)",
            p.display()
        );
    }
    if r.archives.len() > 1 {
        println!(
            "  chain of {} archives: {}",
            r.archives.len(),
            r.archives
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" <- ")
        );
    }
    for c in &r.cleaned_up {
        println!(
            "  removed {}, left by a restore that was killed",
            c.display()
        );
    }
    if let Some(n) = &r.new_dek {
        println!(
            "  re-encrypted under a new DEK (fingerprint {}): {} files, {:.1} MB in {:.2} s",
            n.dek_fingerprint,
            n.files,
            n.bytes as f64 / 1e6,
            n.seconds
        );
    }
    if let Some(n) = &r.new_ids {
        println!(
            "  fresh ids (unlinkable to the source): volume {}, {} directory ids ({} names \
             sealed again), {} file ids ({:.1} MB re-tweaked in {:.2} s), {} long-target names",
            r.volume_id,
            n.dirs,
            n.names,
            n.files,
            n.bytes as f64 / 1e6,
            n.seconds,
            n.long_targets
        );
    }
    if !r.backup_point_in_time {
        println!(
            "  note: the backup is not one point in time (taken with --force while the mount \
             kept writing, or its drain missed a file open through the mount)"
        );
    }
    if r.quarantine_left_out > 0 {
        println!(
            "  {} entries of the archive's cmkfs.quarantine/ left out (--discard-quarantine)",
            r.quarantine_left_out
        );
    }
    if r.owners_skipped > 0 {
        println!(
            "  {} owners not restored (not running as root)",
            r.owners_skipped
        );
    }
    Ok(())
}

//! The rewrap of a set's volumes to a new key or key version (crash-safe: intent recorded
//! first, each header replaced atomically, old keys kept until every volume is done), with
//! its fault and progress hooks.

use super::*;

/// The steps of a key change, in order. A [`Hooks::fault`] hook is called after each one and
/// can stop the operation right there, as a crash would (nothing is cleaned up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RewrapStep {
    /// The record names the new key as active and the old one in `previousKeys`.
    IntentRecorded,
    /// A volume's DEK was unwrapped with its current key.
    Unwrapped,
    /// The DEK was wrapped with the new key.
    Wrapped,
    /// The new wrap was unwrapped again and matches the volume.
    Verified,
    /// Half of the new header is in the temp file (a torn write).
    TempPartial,
    /// The temp file is complete and fsynced.
    TempSynced,
    /// The temp file was renamed over the header.
    Renamed,
    /// The directory was fsynced: the new header is durable.
    DirSynced,
    /// Every volume is done and `previousKeys` is cleared.
    Completed,
}

impl RewrapStep {
    /// Every step, in order.
    pub const ALL: [RewrapStep; 9] = [
        RewrapStep::IntentRecorded,
        RewrapStep::Unwrapped,
        RewrapStep::Wrapped,
        RewrapStep::Verified,
        RewrapStep::TempPartial,
        RewrapStep::TempSynced,
        RewrapStep::Renamed,
        RewrapStep::DirSynced,
        RewrapStep::Completed,
    ];
}

/// Progress of a multi-volume rewrap: called once with `volume: None` before the first
/// volume, then after each volume.
#[derive(Clone, Debug)]
pub struct Progress<'p> {
    /// Volumes handled so far.
    pub done: usize,
    /// Volumes in all.
    pub total: usize,
    /// The volume just handled.
    pub volume: Option<&'p Path>,
}

/// A fault-injection hook (see [`Hooks::fault`]).
pub type FaultHook<'a> = &'a mut dyn FnMut(RewrapStep, &Path) -> io::Result<()>;

/// The vault connection of a mount and the identity it acts as.
pub type MountVault = (Box<dyn Vault>, String);

/// Observers of a rewrap.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Progress reports (the CLI draws a progress bar from them).
    pub progress: Option<&'a mut dyn FnMut(&Progress)>,
    /// Fault injection for crash-safety tests: called after every [`RewrapStep`] with the
    /// volume concerned (the DES directory for record steps); an `Err` stops the operation
    /// at once, leaving the disk as a crash at that point would.
    #[doc(hidden)]
    pub fault: Option<FaultHook<'a>>,
}

impl Hooks<'_> {
    fn step(&mut self, step: RewrapStep, at: &Path) -> Result<(), DesError> {
        match &mut self.fault {
            Some(f) => f(step, at).map_err(|_| DesError::Interrupted(step)),
            None => Ok(()),
        }
    }

    fn progress(&mut self, p: &Progress) {
        if let Some(f) = &mut self.progress {
            f(p);
        }
    }
}

/// What a rewrap did to one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RewrapOutcome {
    /// The header now names the new key.
    Rewrapped,
    /// It already did.
    AlreadyCurrent,
    /// No volume there any more (nothing to protect): skipped.
    Missing,
}

/// The new key of a rewrap.
pub(super) struct Target {
    pub(super) kid: KeyId,
    pub(super) info: KeyInfo,
}

/// The vault connections of a key change: the new key's vault, and, opened on demand, the
/// vaults of the keys volumes are still wrapped with (a key change may move to a key in
/// another vault). Each is reached as the DES identity whose credential is for it, else with
/// that vault's default connection (the owner of `local:`, a token's PIN, a credential found
/// in `$CMKFS_HOME/credentials`).
pub(super) struct Vaults<'a> {
    home: &'a Home,
    target_url: String,
    target: &'a dyn Vault,
    identities: Vec<DesIdentity>,
    others: Vec<(String, Box<dyn Vault>)>,
}

impl<'a> Vaults<'a> {
    pub(super) fn new(
        home: &'a Home,
        target_url: &str,
        target: &'a dyn Vault,
        identities: Vec<DesIdentity>,
    ) -> Vaults<'a> {
        Vaults {
            home,
            target_url: target_url.to_string(),
            target,
            identities,
            others: Vec::new(),
        }
    }

    /// The connection for vault `url`.
    fn for_url(&mut self, url: &str) -> Result<&dyn Vault, DesError> {
        if same_vault(url, &self.target_url) {
            return Ok(self.target);
        }
        if let Some(i) = self.others.iter().position(|(u, _)| same_vault(u, url)) {
            return Ok(self.others[i].1.as_ref());
        }
        let id = self.identities.iter().find(|id| {
            Credential::load(&id.credential_file).is_ok_and(|c| same_vault(&c.vault, url))
        });
        let v = open_vault_as(self.home, url, id)?;
        self.others.push((url.to_string(), v));
        Ok(self
            .others
            .last()
            .map(|(_, v)| v.as_ref())
            .unwrap_or(self.target))
    }
}

/// How long a rewrap waits for a running `cmkfs upgrade` of the volume.
const UPGRADE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Moves one volume to `target`: unwrap with its current key, wrap with the new one, check
/// the new wrap, replace the header atomically. The DEK and data are untouched.
fn rewrap_volume(
    dir: &Path,
    des: &DiskEncryptionSet,
    vaults: &mut Vaults,
    target: &Target,
    hooks: &mut Hooks,
) -> Result<RewrapOutcome, DesError> {
    if let Err(VolumeError::NotAVolume(_)) = VolumeHeader::read(dir) {
        return Ok(RewrapOutcome::Missing);
    }
    // Not while `cmkfs upgrade` rewrites this header (it holds the volume lock exclusively):
    // wait for it. Mounts share the lock, so online rewraps go ahead.
    let _lock = crate::volume::lock::VolumeLock::shared_wait(dir, UPGRADE_WAIT)
        .map_err(|e| DesError::Refused(e.to_string()))?;
    let header = VolumeHeader::read(dir)?;
    if header.des.as_deref() != Some(des.name.as_str()) {
        return Err(DesError::Refused(format!(
            "the volume at {} belongs to {}, not to Disk Encryption Set {}",
            dir.display(),
            header
                .des
                .as_deref()
                .map_or("no Disk Encryption Set".into(), |d| format!(
                    "Disk Encryption Set {d}"
                )),
            des.name
        )));
    }
    let new_url = target.kid.to_string();
    if header.key_id == new_url {
        return Ok(RewrapOutcome::AlreadyCurrent);
    }
    let vault = vaults.target;
    let dek = header.unwrap_dek(vaults.for_url(&header.key_id()?.vault)?)?;
    hooks.step(RewrapStep::Unwrapped, dir)?;
    let wrapped = vault.wrap_key(
        &target.kid.name,
        Some(&target.kid.version),
        target.info.wrap_alg,
        dek.as_bytes(),
    )?;
    if wrapped.kid != target.kid {
        return Err(DesError::Invalid(format!(
            "the vault wrapped with {} instead of {new_url}",
            wrapped.kid
        )));
    }
    hooks.step(RewrapStep::Wrapped, dir)?;
    // A re-encryption in progress: its retiring DEK moves to the new key as well, so that
    // both stay reachable with the key the record lists.
    let retiring = match &header.retiring {
        None => None,
        Some(_) => {
            let old = header.unwrap_retiring_dek(vaults.for_url(&header.key_id()?.vault)?)?;
            Some(vault.wrap_key(
                &target.kid.name,
                Some(&target.kid.version),
                target.info.wrap_alg,
                old.as_bytes(),
            )?)
        }
    };
    let new_header = header.rewrapped_both(&wrapped, retiring.as_ref(), &dek);
    // Never write a wrap that does not come back: unwrap it again and check it against the
    // volume's fingerprint and MAC.
    let check = new_header.unwrap_dek(vault)?;
    if check.as_bytes() != dek.as_bytes() {
        return Err(DesError::Invalid(format!(
            "the new wrap of {} does not unwrap to the volume's key",
            dir.display()
        )));
    }
    if new_header.retiring.is_some() {
        new_header.unwrap_retiring_dek(vault)?;
    }
    drop((check, dek));
    hooks.step(RewrapStep::Verified, dir)?;
    // The header is a control file in the backing root, whose times are the mount root's:
    // the root keeps its mtime. A mounted volume's users may change the root meanwhile, and
    // their change must stand: the mount holds their requests back while the header is
    // replaced (its control socket), as it does for its own control files.
    let root = fs::canonicalize(dir).ok();
    if root.as_deref().is_some_and(crate::fsck::mounted_anywhere) {
        let hold = root
            .as_deref()
            .and_then(|r| MountRootHold::take(vaults.home, r));
        // Tests: a user's change of the root while the header is replaced.
        #[cfg(debug_assertions)]
        fsutil::test_pause("CMKFS_TEST_DES_REWRAP_PAUSE");
        let r = replace_header(dir, &new_header, hooks);
        if let Some(h) = hold {
            h.release();
        }
        r?;
    } else {
        match fs::File::open(dir) {
            Ok(d) => crate::volume::keep_mtime(std::os::fd::AsFd::as_fd(&d), || {
                replace_header(dir, &new_header, hooks)
            })?,
            Err(_) => replace_header(dir, &new_header, hooks)?,
        }
    }
    Ok(RewrapOutcome::Rewrapped)
}

/// How long a rewrap waits for each answer of a mount's control socket.
const CONTROL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A mount's root gate, held for this process through the mount's control socket
/// (`keeprootmtime`, [`crate::control`]): while it is held, no request of the mount changes
/// the root, and on release the mount puts the root's mtime back.
struct MountRootHold(std::os::unix::net::UnixStream);

impl MountRootHold {
    /// Asks the mount of the volume at `root` (canonical), found in `home`'s run records, to
    /// hold its root gate. `None` when it cannot: no record in this home (a mount of another
    /// `CMKFS_HOME`), an older daemon, a busy root (requests kept changing it); the header is
    /// then replaced without it and the root's mtime moves, as it did before.
    fn take(home: &Home, root: &Path) -> Option<MountRootHold> {
        use crate::control::{self, Answer, Request};
        let record = crate::mount::RunRecord::all(home)
            .into_iter()
            .find(|r| r.alive() && fs::canonicalize(&r.cipherdir).is_ok_and(|c| c == root))?;
        let conn = control::connect(home, &record.mountpoint, &Request::KeepRootMtime)
            .inspect_err(|e| tracing::debug!(error = %e, "the mount cannot keep the root's mtime"))
            .ok()?;
        conn.set_read_timeout(Some(CONTROL_WAIT)).ok()?;
        let mut r = io::BufReader::new(conn.try_clone().ok()?);
        match control::read_answer(&mut r) {
            Ok(Some(Answer::RootGate(true))) => Some(MountRootHold(conn)),
            other => {
                tracing::debug!(answer = ?other.ok(), "the mount did not hold its root gate");
                None
            }
        }
    }

    /// Lets the mount put the root's mtime back and release its root gate; waits (bounded)
    /// until it has, so that the root's times are settled when the rewrap reports.
    fn release(self) {
        let mut conn = self.0;
        if conn.write_all(b"done\n").is_ok() {
            let mut r = io::BufReader::new(&conn);
            let _ = crate::control::read_answer(&mut r);
        }
    }
}

/// [`VolumeHeader::write`]'s atomic replace, step by step so that [`Hooks::fault`] can stop
/// it between steps: temp file → fsync → rename over the header → fsync the directory.
fn replace_header(dir: &Path, header: &VolumeHeader, hooks: &mut Hooks) -> Result<(), DesError> {
    let path = dir.join(HEADER_FILE);
    let bytes = header.to_bytes()?;
    let mut rnd = [0u8; 6];
    getrandom::getrandom(&mut rnd).map_err(|e| DesError::io(dir, io::Error::other(e)))?;
    let tmp = dir.join(format!(
        "{}{HEADER_FILE}.{}",
        fsutil::TEMP_PREFIX,
        hex::encode(rnd)
    ));
    let mut interrupted = None;
    let result = (|| -> Result<(), DesError> {
        let io_err = |e| DesError::io(&tmp, e);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half]).map_err(io_err)?;
        hooks
            .step(RewrapStep::TempPartial, dir)
            .inspect_err(|_| interrupted = Some(()))?;
        f.write_all(&bytes[half..]).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        hooks
            .step(RewrapStep::TempSynced, dir)
            .inspect_err(|_| interrupted = Some(()))?;
        fs::rename(&tmp, &path).map_err(|e| DesError::io(&path, e))?;
        Ok(())
    })();
    if let Err(e) = result {
        // A real error cleans up after itself; an injected crash leaves what a crash would.
        if interrupted.is_none() {
            let _ = fs::remove_file(&tmp);
        }
        return Err(e);
    }
    hooks.step(RewrapStep::Renamed, dir)?;
    fsutil::sync_dir(dir).map_err(|e| DesError::io(dir, e))?;
    hooks.step(RewrapStep::DirSynced, dir)
}

/// What a key change did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationReport {
    /// DES name.
    pub des: String,
    /// The key(s) volumes were moved from.
    pub from: Vec<String>,
    /// The key they are on now.
    pub to: String,
    /// Per volume.
    pub volumes: Vec<(PathBuf, RewrapOutcome)>,
}

impl RotationReport {
    /// Volumes whose header was rewritten.
    pub fn rewrapped(&self) -> usize {
        self.volumes
            .iter()
            .filter(|(_, o)| *o == RewrapOutcome::Rewrapped)
            .count()
    }
}

/// Moves `des` (locked by the caller) to `target` and rewraps all its volumes: records the
/// intent, rewraps each volume, then completes the record. On failure of some volumes the
/// record stays "in progress" (old keys in `previousKeys`) and the error lists them.
pub(super) fn rotate_locked(
    store: &DesStore,
    des: &mut DiskEncryptionSet,
    vaults: &mut Vaults,
    target: &Target,
    hooks: &mut Hooks,
) -> Result<RotationReport, DesError> {
    let new_url = target.kid.to_string();
    if des.active_key.key_url != new_url {
        let old = std::mem::replace(
            &mut des.active_key,
            KeyRef {
                key_url: new_url.clone(),
            },
        );
        if !des.previous_keys.contains(&old) {
            des.previous_keys.push(old);
        }
    }
    des.previous_keys.retain(|k| k.key_url != new_url);
    let from: Vec<String> = des
        .previous_keys
        .iter()
        .map(|k| k.key_url.clone())
        .collect();
    store.save(des)?;
    hooks.step(RewrapStep::IntentRecorded, store.dir())?;
    let total = des.volumes.len();
    hooks.progress(&Progress {
        done: 0,
        total,
        volume: None,
    });
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (i, dir) in des.volumes.clone().iter().enumerate() {
        match rewrap_volume(dir, des, vaults, target, hooks) {
            Ok(o) => outcomes.push((dir.clone(), o)),
            Err(e @ DesError::Interrupted(_)) => return Err(e),
            Err(e) => failures.push(format!("{}: {e}", dir.display())),
        }
        hooks.progress(&Progress {
            done: i + 1,
            total,
            volume: Some(dir),
        });
    }
    if !failures.is_empty() {
        return Err(DesError::Incomplete(format!(
            "Disk Encryption Set {}: {} of {total} volume{} could not be moved to {new_url} \
             (first: {}); the rotation stays in progress with the old key{} in previousKeys: \
             fix the cause and run `cmkfs des update {}` to finish",
            des.name,
            failures.len(),
            if total == 1 { "" } else { "s" },
            failures[0],
            if from.len() == 1 { "" } else { "s" },
            des.name
        )));
    }
    let changed = !from.is_empty() || outcomes.iter().any(|(_, o)| *o == RewrapOutcome::Rewrapped);
    des.previous_keys.clear();
    if changed {
        des.last_key_rotation_timestamp = Some(now_rfc3339());
    }
    store.save(des)?;
    hooks.step(RewrapStep::Completed, store.dir())?;
    Ok(RotationReport {
        des: des.name.clone(),
        from,
        to: new_url,
        volumes: outcomes,
    })
}

//! How a volume's keys are reached, and how a mount keeps its header honest.
//!
//! The backing store is untrusted input: whoever can write it can write the header. So the
//! order of a mount (and of `status`, `fsck`) is fixed:
//!
//! 1. structural checks ([`VolumeHeader::read`]);
//! 2. the vault must be one this machine configured (`vault::connect` refuses any other
//!    before loading or contacting anything), and the header must agree with this machine's
//!    Disk Encryption Set records ([`des::check_binding`]);
//! 3. unwrap → fingerprint → MAC over every field ([`VolumeHeader::unwrap_dek`]);
//! 4. only then the platform envelope (double encryption), through cmkfs's own `local:`
//!    vault;
//! 5. a header with a version 1 MAC is rewritten with a version 2 one (mount only).
//!
//! While mounted, [`HeaderSource`] re-reads the header before every check and compares it
//! with the one it verified: a change that a rewrap could not have made (anything outside the
//! outer envelope, another vault, a platform entry appearing, a key the volume's Disk
//! Encryption Set does not list, a MAC that does not verify with the volume's DEK) is a
//! *denial* — the mount is cut off at once — never an outage that would only degrade it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::VolumeKeys;
use crate::des;
use crate::home::Home;
use crate::keyring::{CheckFailure, KeySource, Keyring, KeyringConfig, Unwrapped};
use crate::vault::{self, ErrorClass, Vault, VaultError};
use crate::volume::header::VolumeHeader;
use crate::volume::VolumeError;

/// Refuses a header whose vault this machine has not configured (step 2 of the module docs,
/// for commands that do not connect: `info`, and `mount` before it starts its daemon).
pub fn check_configured(home: &Home, header: &VolumeHeader) -> Result<(), VolumeError> {
    let kid = header.key_id()?;
    vault::trust::lookup(home, &kid.vault)?;
    Ok(())
}

/// Unwraps and verifies a header's DEK(s): the outer one through `vault` (fingerprint and
/// MAC checked), then, for a double-encrypted volume only, the inner one through `platform`.
pub fn unwrap_with(
    vault: &dyn Vault,
    platform: Option<&dyn Vault>,
    header: &VolumeHeader,
) -> Result<Unwrapped, VolumeError> {
    let outer = header.unwrap_dek(vault)?;
    layers(vault, platform, header, outer)
}

/// The rest of [`unwrap_with`] once the outer DEK (and so the MAC) verified: the inner DEK of
/// a double-encrypted volume, the retiring DEK(s) of a re-encrypting one.
fn layers(
    vault: &dyn Vault,
    platform: Option<&dyn Vault>,
    header: &VolumeHeader,
    outer: crate::crypto::Dek,
) -> Result<Unwrapped, VolumeError> {
    // The MAC just verified: `platform` is honoured only because the volume was made
    // double-encrypted.
    let inner = match (&header.platform, platform) {
        (None, _) => None,
        (Some(_), Some(p)) => Some(header.unwrap_platform_dek(p)?),
        (Some(_), None) => {
            return Err(VolumeError::Internal(
                "a double-encrypted volume needs the platform vault".into(),
            ))
        }
    };
    let retiring = match &header.retiring {
        None => None,
        Some(r) => Some(Box::new(Unwrapped {
            outer: header.unwrap_retiring_dek(vault)?,
            inner: match (&r.platform, platform) {
                (None, _) => None,
                (Some(_), Some(p)) => Some(header.unwrap_retiring_platform_dek(p)?),
                (Some(_), None) => {
                    return Err(VolumeError::Internal(
                        "a double-encrypted volume needs the platform vault".into(),
                    ))
                }
            },
            sector_size: header.sector_size as usize,
            generation: r.key_generation,
            retiring: None,
        })),
    };
    Ok(Unwrapped {
        outer,
        inner,
        sector_size: header.sector_size as usize,
        generation: header.key_generation,
        retiring,
    })
}

/// [`unwrap_with`], the platform vault being cmkfs's own `local:` vault of `home` (as its
/// owner), opened only after the outer DEK verified.
pub fn unwrap(
    home: &Home,
    vault: &dyn Vault,
    header: &VolumeHeader,
) -> Result<Unwrapped, VolumeError> {
    // The outer DEK (and the MAC) first: nothing else in the header counts before it.
    let outer = header.unwrap_dek(vault)?;
    let pv = match &header.platform {
        None => None,
        Some(_) => Some(vault::open(vault::local::URL, home)?),
    };
    layers(vault, pv.as_deref(), header, outer)
}

/// The volume's ciphers, for one-shot checks (`status CIPHERDIR`, `fsck`): the header's
/// binding to this machine's Disk Encryption Sets, then [`unwrap`].
pub fn keys(
    home: &Home,
    dir: &Path,
    vault: &dyn Vault,
    header: &VolumeHeader,
) -> Result<VolumeKeys, VolumeError> {
    binding(home, dir, header)?;
    let keys = unwrap(home, vault, header)?
        .keys()
        .map_err(VolumeError::Crypto);
    crate::crypto::secret::scrub_stack();
    keys
}

/// Step 2's Disk Encryption Set part: the header agrees with this machine's records.
pub(crate) fn binding(home: &Home, dir: &Path, header: &VolumeHeader) -> Result<(), VolumeError> {
    des::check_binding(home, dir, header).map_err(|e| match e {
        des::DesError::Volume(v) => v,
        des::DesError::Vault(v) => VolumeError::Vault(v),
        other => VolumeError::CorruptHeader {
            path: dir.join(crate::volume::header::HEADER_FILE),
            why: other.to_string(),
        },
    })
}

/// Unlocks a volume for a mount: the checks of the module docs, in order, then a keyring
/// whose checks re-read and re-verify the header ([`HeaderSource`]). Returns the keyring and
/// the header it verified (upgraded to a version 2 MAC where the backing store allowed it).
pub fn unlock(
    home: &Home,
    vault: Box<dyn Vault>,
    dir: &Path,
    header: &VolumeHeader,
    cfg: KeyringConfig,
) -> Result<(Keyring, VolumeHeader), VolumeError> {
    unlock_with_handle(home, vault, dir, header, cfg).map(|(k, h, _)| (k, h))
}

/// [`unlock`], and the handle through which this process replaces the header it verified
/// (a re-encryption starting or finishing) without its own checks taking that for a
/// tampered header.
pub fn unlock_with_handle(
    home: &Home,
    vault: Box<dyn Vault>,
    dir: &Path,
    header: &VolumeHeader,
    cfg: KeyringConfig,
) -> Result<(Keyring, VolumeHeader, HeaderHandle), VolumeError> {
    let result = unlock_inner(home, vault, dir, header, cfg);
    crate::crypto::secret::scrub_stack();
    result
}

/// Shared with a mount's [`HeaderSource`]: the header it verified last, and the lock its
/// checks hold, so that a header this process writes itself is adopted atomically.
#[derive(Clone)]
pub struct HeaderHandle {
    verified: Arc<RwLock<VolumeHeader>>,
    update: Arc<Mutex<()>>,
    dir: PathBuf,
}

impl HeaderHandle {
    /// The header in force.
    pub fn current(&self) -> VolumeHeader {
        self.verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes `new` as the volume header (atomically) and makes it the one checks compare
    /// with, with no check in between.
    pub fn replace(&self, new: &VolumeHeader) -> Result<(), VolumeError> {
        self.replace_then(new, &mut || ())
    }

    /// [`HeaderHandle::replace`], calling `changed` right after each change of the backing
    /// directory, before the fsyncs ([`VolumeHeader::write_then`]).
    pub fn replace_then(
        &self,
        new: &VolumeHeader,
        changed: &mut dyn FnMut(),
    ) -> Result<(), VolumeError> {
        let _g = self.update.lock().unwrap_or_else(|p| p.into_inner());
        new.write_then(&self.dir, changed)?;
        *self.verified.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        Ok(())
    }

    /// A handle for a process that checks nothing itself (offline commands).
    pub fn detached(dir: &Path, header: VolumeHeader) -> HeaderHandle {
        HeaderHandle {
            verified: Arc::new(RwLock::new(header)),
            update: Arc::new(Mutex::new(())),
            dir: dir.to_path_buf(),
        }
    }
}

#[inline(never)]
fn unlock_inner(
    home: &Home,
    vault: Box<dyn Vault>,
    dir: &Path,
    header: &VolumeHeader,
    cfg: KeyringConfig,
) -> Result<(Keyring, VolumeHeader, HeaderHandle), VolumeError> {
    binding(home, dir, header)?;
    let first = unwrap(home, vault.as_ref(), header)?;
    let verified = if header.mac_version < crate::volume::header::MAC_VERSION {
        upgrade(home, dir, header, &first)
    } else {
        header.clone()
    };
    let handle = HeaderHandle::detached(dir, verified.clone());
    let source = HeaderSource {
        home: home.clone(),
        dir: dir.to_path_buf(),
        vault,
        handle: handle.clone(),
    };
    let keyring = Keyring::new(Box::new(source), first, cfg).map_err(VolumeError::Crypto)?;
    Ok((keyring, verified, handle))
}

/// Rewrites a header that carries a version 1 MAC (layout fields only) with a version 2 one
/// (every field), now that the DEK verified it and this machine's records agree with it.
/// Under the Disk Encryption Set's lock, so that a concurrent rewrap is never overwritten;
/// skipped (and retried at the next mount) when the set is busy or the backing store is
/// read-only. Returns the header now in force.
fn upgrade(home: &Home, dir: &Path, header: &VolumeHeader, keys: &Unwrapped) -> VolumeHeader {
    let store = des::DesStore::new(home);
    let _lock = match &header.des {
        Some(d) if store.load(d).is_ok() => {
            match store.try_lock() {
                Ok(Some(l)) => Some(l),
                _ => {
                    tracing::info!("the Disk Encryption Set is busy: the header MAC is upgraded at a later mount");
                    return header.clone();
                }
            }
        }
        _ => None,
    };
    // Only if the header is still the one verified.
    if VolumeHeader::read(dir).ok().as_ref() != Some(header) {
        return header.clone();
    }
    let up = header.upgraded(&keys.outer);
    match up.write(dir) {
        Ok(()) => {
            tracing::info!("volume header upgraded to a MAC over every field (mac_version 2)");
            up
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot upgrade the volume header's MAC (read-only backing store?); it stays at version 1");
            header.clone()
        }
    }
}

/// A mounted volume's key source: before every unwrap it re-reads the header and accepts a
/// change only if a rewrap could have made it (see the module docs).
pub struct HeaderSource {
    home: Home,
    dir: PathBuf,
    vault: Box<dyn Vault>,
    handle: HeaderHandle,
}

impl HeaderSource {
    fn verified(&self) -> VolumeHeader {
        self.handle.current()
    }
}

fn denied(reason: String) -> CheckFailure {
    CheckFailure {
        class: ErrorClass::Denied,
        reason,
    }
}

/// Sorts a failed unwrap of the header into denied / unavailable. `changed`: the header is
/// not the one verified before, so anything but a vault outage means it is not a rewrap.
fn classify(e: &VolumeError, changed: bool) -> CheckFailure {
    let (class, reason) = match e {
        VolumeError::Vault(v) => {
            let reason = match v {
                VaultError::Denied { reason, .. } => reason.to_string(),
                VaultError::NotFound(_) => "key deleted or purged".into(),
                VaultError::UnwrapFailed { .. } => "key cannot unwrap the DEK".into(),
                other => other.to_string(),
            };
            let class = match v.class() {
                ErrorClass::Other if changed => ErrorClass::Denied,
                ErrorClass::Other => ErrorClass::Unavailable,
                c => c,
            };
            (class, reason)
        }
        // The vault unwrapped something that is not this volume's key, or the header does
        // not verify with it: not something an outage does.
        VolumeError::WrongKey(m) => (ErrorClass::Denied, m.clone()),
        VolumeError::CorruptHeader { why, .. } => (ErrorClass::Denied, why.clone()),
        // Only the vault's answers are sorted by their class: anything else that fails an
        // unwrap of this volume (its header, the platform envelope) is no outage.
        other => (ErrorClass::Denied, other.to_string()),
    };
    let reason = if changed && class == ErrorClass::Denied {
        format!("the volume header was changed on disk and does not verify: {reason}")
    } else {
        reason
    };
    CheckFailure { class, reason }
}

/// How long a key check waits for the volume header. A backing store that stops answering
/// (a hung NFS or SMB share, a stopped FUSE filesystem) blocks `read` even with `O_NONBLOCK`;
/// without a deadline the check never ends and revocation never applies.
const HEADER_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Header reads still blocked in the backing store: at most one is ever left behind, so a
/// stalled store cannot make each check leak a thread.
static STUCK_HEADER_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// [`VolumeHeader::read`] on a thread of its own, given up after `deadline` (an error that
/// says so: the caller denies, as for any header it cannot read).
fn read_header_within(
    dir: &std::path::Path,
    deadline: std::time::Duration,
) -> Result<VolumeHeader, String> {
    use std::sync::atomic::Ordering;
    if STUCK_HEADER_READS.load(Ordering::SeqCst) > 0 {
        return Err(
            "an earlier read of it is still blocked: the backing store does not answer".into(),
        );
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let dir = dir.to_path_buf();
    STUCK_HEADER_READS.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("header-read".into())
        .spawn(move || {
            let r = VolumeHeader::read(&dir).map_err(|e| e.to_string());
            STUCK_HEADER_READS.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        STUCK_HEADER_READS.fetch_sub(1, Ordering::SeqCst);
        return Err(format!("cannot start its reader: {e}"));
    }
    match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {} s: the backing store does not answer",
            deadline.as_secs()
        )),
    }
}

impl KeySource for HeaderSource {
    fn unwrap(&self) -> Result<Unwrapped, CheckFailure> {
        // A header this process is writing itself is adopted before we look again.
        let _g = self.handle.update.lock().unwrap_or_else(|p| p.into_inner());
        let verified = self.verified();
        let current = match read_header_within(&self.dir, HEADER_READ_DEADLINE) {
            Ok(h) => h,
            // Whatever the errno: a header that cannot be read as a small regular file, or no
            // longer parses, is denied. Only the vault's transport may cause an outage — a
            // writer of the backing store can make a read fail at will (a symlink to a
            // directory, a socket, a file the daemon may not open), and an outage would keep
            // plaintext flowing for the whole grace period.
            Err(e) => {
                return Err(denied(format!(
                    "the volume header on disk cannot be read as this volume's ({e})"
                )))
            }
        };
        if current == verified {
            return unwrap(&self.home, self.vault.as_ref(), &verified)
                .map_err(|e| classify(&e, false));
        }
        if let Some(why) = verified.change_outside_rewrap(&current) {
            return Err(denied(format!(
                "the volume header was changed on disk: {why} (not a rewrap)"
            )));
        }
        if current.mac_version < crate::volume::header::MAC_VERSION {
            return Err(denied(
                "the volume header was changed on disk without a MAC over every field (not a \
                 rewrap)"
                    .into(),
            ));
        }
        if current.key_id != verified.key_id {
            binding(&self.home, &self.dir, &current)
                .map_err(|e| denied(format!("the volume header was changed on disk: {e}")))?;
            if current.des.is_none() {
                return Err(denied(
                    "the volume header was changed on disk: its key changed, but only a Disk \
                     Encryption Set rewraps volumes"
                        .into(),
                ));
            }
        }
        let r =
            unwrap(&self.home, self.vault.as_ref(), &current).map_err(|e| classify(&e, true))?;
        // A verified rewrap: it becomes the header to compare with.
        *self
            .handle
            .verified
            .write()
            .unwrap_or_else(|p| p.into_inner()) = current;
        Ok(r)
    }

    fn key_id(&self) -> String {
        self.verified().key_id
    }

    fn des(&self) -> Option<String> {
        self.verified().des
    }

    fn vault(&self) -> &dyn Vault {
        self.vault.as_ref()
    }
}

/// What a re-encryption needs from the vault and the header in force
/// ([`crate::volume::reencrypt::KeyAccess`]): the volume's vault connection (the mount's, or
/// the command's), cmkfs's platform vault for a double-encrypted volume, and the header
/// handle of the process's keyring.
pub struct ReencryptAccess<'a> {
    home: Home,
    vault: &'a dyn Vault,
    platform: Option<Box<dyn Vault>>,
    handle: HeaderHandle,
}

impl<'a> ReencryptAccess<'a> {
    /// Access through `vault` (the volume's) for the volume whose header `handle` holds.
    pub fn new(
        home: &Home,
        vault: &'a dyn Vault,
        handle: HeaderHandle,
    ) -> Result<ReencryptAccess<'a>, VolumeError> {
        let platform = match handle.current().platform {
            Some(_) => Some(vault::open(vault::local::URL, home)?),
            None => None,
        };
        Ok(ReencryptAccess {
            home: home.clone(),
            vault,
            platform,
            handle,
        })
    }
}

impl crate::volume::reencrypt::KeyAccess for ReencryptAccess<'_> {
    fn current_header(&self) -> VolumeHeader {
        self.handle.current()
    }

    fn unwrap(&self, header: &VolumeHeader) -> Result<Unwrapped, VolumeError> {
        let r = unwrap_with(self.vault, self.platform.as_deref(), header);
        crate::crypto::secret::scrub_stack();
        r
    }

    fn wrap(
        &self,
        header: &VolumeHeader,
        outer: &crate::crypto::Dek,
        inner: Option<&crate::crypto::Dek>,
    ) -> Result<
        (
            vault::Wrapped,
            Option<crate::volume::header::PlatformEnvelope>,
        ),
        VolumeError,
    > {
        let kid = header.key_id()?;
        let wrapped = self.vault.wrap_key(
            &kid.name,
            Some(&kid.version),
            header.wrap_alg,
            outer.as_bytes(),
        )?;
        if wrapped.kid != kid {
            return Err(VolumeError::WrongKey(format!(
                "the vault wrapped with {} instead of {kid}",
                wrapped.kid
            )));
        }
        let platform = match (inner, &header.platform, &self.platform) {
            (Some(d), Some(p), Some(pv)) => {
                let pk = p.key_id()?;
                let w = pv.wrap_key(&pk.name, None, p.wrap_alg, d.as_bytes())?;
                Some(crate::volume::header::PlatformEnvelope::new(d, &w))
            }
            (None, None, _) => None,
            _ => {
                return Err(VolumeError::Internal(
                    "a double-encrypted volume needs its platform vault".into(),
                ))
            }
        };
        Ok((wrapped, platform))
    }

    fn replace_header(
        &self,
        new: &VolumeHeader,
        changed: &mut dyn FnMut(),
    ) -> Result<(), VolumeError> {
        // Not beside a rewrap of the volume's Disk Encryption Set (it rewrites the header).
        let store = des::DesStore::new(&self.home);
        // The set's lock is taken before a volume's everywhere else (`cmkfs des update`
        // holds it, then waits for the volume lock to rewrap): an offline re-encryption holds
        // the volume lock exclusive here, so it only tries for a while, then stops with the
        // volume as it is (resumable) and lets the update go on.
        let _lock = match &new.des {
            Some(d) if store.load(d).is_ok() => Some(lock_set_bounded(&store, d)?),
            _ => None,
        };
        self.handle.replace_then(new, changed)
    }
}

/// How long a header replacement waits for its Disk Encryption Set's lock.
const SET_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The lock of set `name`, tried until [`SET_LOCK_WAIT`] has passed.
///
/// # Errors
/// [`VolumeError::Os`] (`WouldBlock`) saying the set is busy (another command holds its
/// lock for longer than the wait); [`VolumeError::Internal`] why the lock could not be taken.
fn lock_set_bounded(store: &des::DesStore, name: &str) -> Result<des::DesLock, VolumeError> {
    #[allow(unused_mut)]
    let mut wait = SET_LOCK_WAIT;
    // Debug builds only (tests): a shorter wait.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("CMKFS_TEST_SET_LOCK_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        wait = std::time::Duration::from_millis(ms);
    }
    let end = std::time::Instant::now() + wait;
    loop {
        match store.try_lock() {
            Ok(Some(l)) => return Ok(l),
            Ok(None) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Ok(None) => {
                return Err(VolumeError::Os(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "Disk Encryption Set {name} is busy (a `cmkfs des update` or other set \
                     command holds it, and may be waiting for this volume): stopped before \
                     changing the header; run the command again once it has finished, and it \
                     resumes where it stopped"
                    ),
                )))
            }
            Err(e) => {
                return Err(VolumeError::Internal(format!(
                    "locking Disk Encryption Set {name}: {e}"
                )))
            }
        }
    }
}

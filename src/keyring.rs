//! The keyring: holds a mounted volume's live keys and the state that says whether they may
//! be used. Every data path asks it for the keys on each request, so taking the keys away
//! here cuts off every path at once.
//!
//! States (DESIGN.md): `Locked → Accessible ⇄ Inaccessible(reason)`, and `Degraded` while the
//! vault cannot be reached but the grace period has not run out (keys stay live). A check is
//! a real unwrap of the wrapped DEK through the vault, with the header re-read from disk so
//! that a rewrap done by another process (rotation) is picked up.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::crypto::{Dek, VolumeKeys};
use crate::vault::{ErrorClass, Vault, VaultError};
use crate::volume::header::VolumeHeader;
use crate::volume::VolumeError;

/// How often and how forgivingly the keyring re-validates its KEK.
#[derive(Clone, Copy, Debug)]
pub struct KeyringConfig {
    /// Time between periodic checks (push notifications trigger extra ones).
    pub check_interval: Duration,
    /// How long an unreachable vault is tolerated before the keys are erased (0 = never).
    pub grace: Duration,
}

impl Default for KeyringConfig {
    fn default() -> Self {
        KeyringConfig {
            check_interval: Duration::from_secs(30),
            grace: Duration::from_secs(3600),
        }
    }
}

/// Whether the volume's keys may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Not unlocked yet.
    Locked,
    /// Keys live; requests are served.
    Accessible,
    /// Keys live, but the vault cannot be reached; the grace period is running.
    Degraded {
        /// The last vault error.
        reason: String,
    },
    /// Keys erased; every request is refused.
    Inaccessible {
        /// Why (e.g. "key disabled").
        reason: String,
    },
}

impl KeyState {
    /// The state's name as `status` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            KeyState::Locked => "Locked",
            KeyState::Accessible => "Accessible",
            KeyState::Degraded { .. } => "Degraded",
            KeyState::Inaccessible { .. } => "Inaccessible",
        }
    }

    /// The reason, for Degraded and Inaccessible.
    pub fn reason(&self) -> Option<&str> {
        match self {
            KeyState::Degraded { reason } | KeyState::Inaccessible { reason } => Some(reason),
            _ => None,
        }
    }
}

/// A change of state.
#[derive(Clone, Debug)]
pub struct Transition {
    /// Before.
    pub from: KeyState,
    /// After.
    pub to: KeyState,
    /// When.
    pub at: SystemTime,
}

/// A point-in-time view of the keyring for `cmkfs status` (stable JSON field names).
#[derive(Clone, Debug, Serialize)]
pub struct KeyringStatus {
    /// `Accessible`, `Degraded`, `Inaccessible` or `Locked`.
    pub state: String,
    /// Why Degraded or Inaccessible.
    pub reason: Option<String>,
    /// When the current state began (RFC 3339).
    pub since: String,
    /// Full versioned KEK id.
    pub key_id: String,
    /// The KEK version.
    pub key_version: String,
    /// Last check (RFC 3339), if any.
    pub last_check: Option<String>,
    /// Last successful unwrap (RFC 3339).
    pub last_success: Option<String>,
    /// Next periodic check (RFC 3339).
    pub next_check: Option<String>,
    /// Requests refused because the keys were not live.
    pub requests_denied: u64,
    /// Seconds between periodic checks.
    pub key_check_interval_s: u64,
    /// Grace period for an unreachable vault, in seconds.
    pub grace_period_s: u64,
    /// Disk Encryption Set, if the volume belongs to one.
    pub des: Option<String>,
}

struct Inner {
    state: KeyState,
    since: SystemTime,
    last_check: Option<SystemTime>,
    last_success: Option<SystemTime>,
    next_check: SystemTime,
    unreachable_since: Option<SystemTime>,
}

/// Holds the live keys of one mounted volume.
pub struct Keyring {
    vault: Box<dyn Vault>,
    cipherdir: Option<PathBuf>,
    header: RwLock<VolumeHeader>,
    live: RwLock<Option<Arc<VolumeKeys>>>,
    inner: Mutex<Inner>,
    denied: AtomicU64,
    cfg: KeyringConfig,
}

/// Formats a time as RFC 3339 with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Keyring {
    /// Unwraps the volume's DEK through `vault`, checks it against the header and makes the
    /// keys live. `cipherdir` (when given) is where checks re-read the header from.
    pub fn unlock(
        vault: Box<dyn Vault>,
        header: &VolumeHeader,
        cipherdir: Option<PathBuf>,
        cfg: KeyringConfig,
    ) -> Result<Keyring, VolumeError> {
        header.key_id()?;
        let keys = unwrap_keys(vault.as_ref(), header)?;
        let now = SystemTime::now();
        Ok(Keyring {
            vault,
            cipherdir,
            header: RwLock::new(header.clone()),
            live: RwLock::new(Some(Arc::new(keys))),
            inner: Mutex::new(Inner {
                state: KeyState::Accessible,
                since: now,
                last_check: Some(now),
                last_success: Some(now),
                next_check: now + cfg.check_interval,
                unreachable_since: None,
            }),
            denied: AtomicU64::new(0),
            cfg,
        })
    }

    /// The live keys, or why there are none. Cheap: a read lock and an `Arc` clone.
    pub fn keys(&self) -> Result<Arc<VolumeKeys>, VolumeError> {
        if let Some(k) = read(&self.live).as_ref() {
            return Ok(k.clone());
        }
        self.denied.fetch_add(1, Ordering::Relaxed);
        Err(VolumeError::Inaccessible(match &self.inner().state {
            KeyState::Inaccessible { reason } => reason.clone(),
            _ => "volume is locked".into(),
        }))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current state.
    pub fn state(&self) -> KeyState {
        self.inner().state.clone()
    }

    /// The configuration.
    pub fn config(&self) -> KeyringConfig {
        self.cfg
    }

    /// When the next periodic check is due.
    pub fn next_check(&self) -> SystemTime {
        self.inner().next_check
    }

    /// The vault connection this keyring validates against.
    pub fn vault(&self) -> &dyn Vault {
        self.vault.as_ref()
    }

    /// The header as last read.
    pub fn header(&self) -> VolumeHeader {
        read(&self.header).clone()
    }

    fn set(&self, inner: &mut Inner, to: KeyState, at: SystemTime) -> Option<Transition> {
        if inner.state == to {
            return None;
        }
        let from = std::mem::replace(&mut inner.state, to.clone());
        inner.since = at;
        Some(Transition { from, to, at })
    }

    /// Erases the keys: requests in flight finish with the `Arc` they hold (the key is
    /// zeroized when the last one drops), new ones are refused.
    pub fn revoke(&self, reason: String) -> Option<Transition> {
        write(&self.live).take();
        let mut inner = self.inner();
        self.set(
            &mut inner,
            KeyState::Inaccessible { reason },
            SystemTime::now(),
        )
    }

    /// Re-validates the KEK with a real unwrap and moves the state accordingly: denied →
    /// Inaccessible now; unreachable → Degraded, Inaccessible once the grace period is over;
    /// success → Accessible (healing an Inaccessible volume without a remount).
    pub fn check(&self) -> Option<Transition> {
        if let Some(dir) = &self.cipherdir {
            match VolumeHeader::read(dir) {
                Ok(h) => *write(&self.header) = h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-read the volume header; using the one in memory")
                }
            }
        }
        let header = self.header();
        let result = unwrap_keys(self.vault.as_ref(), &header);
        let now = SystemTime::now();
        let mut inner = self.inner();
        inner.last_check = Some(now);
        inner.next_check = now + self.cfg.check_interval;
        match result {
            Ok(keys) => {
                inner.last_success = Some(now);
                inner.unreachable_since = None;
                if inner.state == KeyState::Accessible {
                    return None;
                }
                *write(&self.live) = Some(Arc::new(keys));
                self.set(&mut inner, KeyState::Accessible, now)
            }
            Err(e) => {
                let (class, reason) = classify(&e);
                if class == ErrorClass::Denied {
                    inner.unreachable_since = None;
                    write(&self.live).take();
                    return self.set(&mut inner, KeyState::Inaccessible { reason }, now);
                }
                let since = *inner.unreachable_since.get_or_insert(now);
                let waited = now.duration_since(since).unwrap_or_default();
                if self.cfg.grace.is_zero() || waited >= self.cfg.grace {
                    write(&self.live).take();
                    let reason = format!("vault unreachable past the grace period: {reason}");
                    return self.set(&mut inner, KeyState::Inaccessible { reason }, now);
                }
                match inner.state {
                    KeyState::Accessible | KeyState::Degraded { .. } => {
                        self.set(&mut inner, KeyState::Degraded { reason }, now)
                    }
                    // Still cut off: an unreachable vault does not restore anything.
                    _ => None,
                }
            }
        }
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> KeyringStatus {
        let header = self.header();
        let kid = header.key_id().ok();
        let inner = self.inner();
        KeyringStatus {
            state: inner.state.name().into(),
            reason: inner.state.reason().map(str::to_string),
            since: rfc3339(inner.since),
            key_id: header.key_id.clone(),
            key_version: kid.map(|k| k.version).unwrap_or_default(),
            last_check: inner.last_check.map(rfc3339),
            last_success: inner.last_success.map(rfc3339),
            next_check: Some(rfc3339(inner.next_check)),
            requests_denied: self.denied.load(Ordering::Relaxed),
            key_check_interval_s: self.cfg.check_interval.as_secs(),
            grace_period_s: self.cfg.grace.as_secs(),
            des: header.des.clone(),
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Sorts a failed check into denied / unavailable, with the reason `status` shows.
fn classify(e: &VolumeError) -> (ErrorClass, String) {
    match e {
        VolumeError::Vault(v) => {
            let reason = match v {
                VaultError::Denied { reason, .. } => reason.to_string(),
                VaultError::NotFound(_) => "key deleted or purged".into(),
                VaultError::UnwrapFailed { .. } => "key cannot unwrap the DEK".into(),
                other => other.to_string(),
            };
            let class = match v.class() {
                ErrorClass::Other => ErrorClass::Unavailable,
                c => c,
            };
            (class, reason)
        }
        // The vault unwrapped something that is not this volume's key: treat as denied.
        VolumeError::WrongKey(m) => (ErrorClass::Denied, m.clone()),
        other => (ErrorClass::Unavailable, other.to_string()),
    }
}

/// Unwraps and verifies a header's DEK(s) and builds the volume's ciphers. A double-encrypted
/// volume's inner DEK is unwrapped too, through cmkfs's own vault (see [`platform_vault`]):
/// both keys must answer, so losing either one denies access.
pub fn unwrap_keys(vault: &dyn Vault, header: &VolumeHeader) -> Result<VolumeKeys, VolumeError> {
    let platform = match &header.platform {
        Some(_) => Some(platform_vault(header)?),
        None => None,
    };
    unwrap_keys_with(vault, platform.as_deref(), header)
}

/// [`unwrap_keys`] with the platform vault given (library callers and tests that do not use
/// `$CMKFS_HOME`). `platform` is only consulted for a double-encrypted header.
pub fn unwrap_keys_with(
    vault: &dyn Vault,
    platform: Option<&dyn Vault>,
    header: &VolumeHeader,
) -> Result<VolumeKeys, VolumeError> {
    let dek = unwrap_dek(vault, header)?;
    let inner = match (&header.platform, platform) {
        (None, _) => None,
        (Some(_), Some(p)) => Some(unwrap_platform_dek(p, header)?),
        (Some(_), None) => {
            return Err(VolumeError::Internal(
                "a double-encrypted volume needs the platform vault".into(),
            ))
        }
    };
    VolumeKeys::from_deks(&dek, inner.as_ref(), header.sector_size as usize)
        .map_err(VolumeError::Crypto)
}

/// The vault that holds a double-encrypted volume's platform key: cmkfs's own (`local:`) vault
/// of `$CMKFS_HOME`, reached as its owner, because the platform key is cmkfs's, not the
/// customer's. Opened per call: a check must see the key's current state.
pub fn platform_vault(header: &VolumeHeader) -> Result<Box<dyn Vault>, VolumeError> {
    let Some(p) = &header.platform else {
        return Err(VolumeError::Internal(
            "the volume is not double-encrypted".into(),
        ));
    };
    let kid = p.key_id()?;
    Ok(crate::vault::open(
        &kid.vault,
        &crate::home::Home::from_env(),
    )?)
}

/// Unwraps and verifies a double-encrypted header's inner (platform-key) DEK.
pub fn unwrap_platform_dek(
    platform: &dyn Vault,
    header: &VolumeHeader,
) -> Result<Dek, VolumeError> {
    let Some(p) = &header.platform else {
        return Err(VolumeError::Internal(
            "the volume is not double-encrypted".into(),
        ));
    };
    let kid = p.key_id()?;
    let wrapped = p.wrapped().map_err(|_| VolumeError::CorruptHeader {
        path: crate::volume::header::HEADER_FILE.into(),
        why: "platform wrapped_dek is not valid base64".into(),
    })?;
    let raw = platform.unwrap_key(&kid, p.wrap_alg, &wrapped)?;
    let dek = Dek::from_slice(&raw).map_err(|_| {
        VolumeError::WrongKey(format!("{kid} unwrapped something that is not a cmkfs DEK"))
    })?;
    p.verify(&dek)?;
    Ok(dek)
}

/// Unwraps and verifies a header's (outer, customer-key) DEK. For a double-encrypted volume
/// this alone does not give access to data: see [`unwrap_keys`].
pub fn unwrap_dek(vault: &dyn Vault, header: &VolumeHeader) -> Result<Dek, VolumeError> {
    let kid = header.key_id()?;
    let wrapped = header.wrapped().map_err(|_| VolumeError::CorruptHeader {
        path: crate::volume::header::HEADER_FILE.into(),
        why: "wrapped_dek is not valid base64".into(),
    })?;
    let raw = vault.unwrap_key(&kid, header.wrap_alg, &wrapped)?;
    let dek = Dek::from_slice(&raw).map_err(|_| {
        VolumeError::WrongKey(format!("{kid} unwrapped something that is not a cmkfs DEK"))
    })?;
    header.verify(&dek)?;
    Ok(dek)
}

//! The keyring: holds a mounted volume's live keys and the state that says whether they may
//! be used. Every data path asks it for the keys on each request, so taking the keys away
//! here cuts off every path at once.
//!
//! States (DESIGN.md): `Locked → Accessible ⇄ Inaccessible(reason)`, and `Degraded` while the
//! vault cannot be reached but the grace period has not run out (keys stay live). A check is
//! a real unwrap through the vault, done by a [`KeySource`]: the keyring knows nothing of
//! volume headers (`crate::unlock` re-reads and verifies the header), only whether the answer
//! was a key, a denial or an outage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::crypto::{CryptoError, Dek, VolumeKeys};
use crate::vault::{ErrorClass, KeyId, Vault};

/// The DEK(s) of one successful check, verified by the source: what the keyring builds the
/// ciphers from.
pub struct Unwrapped {
    /// The customer-key DEK (the only one for single encryption).
    pub outer: Dek,
    /// Double encryption: the platform-key DEK.
    pub inner: Option<Dek>,
    /// Data unit size of the volume.
    pub sector_size: usize,
    /// The key generation of these DEKs (0 until the first re-encryption).
    pub generation: u32,
    /// While a re-encryption runs: the DEK(s) being retired (the previous generation),
    /// unwrapped and verified in the same check, so that a revocation takes both.
    pub retiring: Option<Box<Unwrapped>>,
}

impl Unwrapped {
    /// The volume's ciphers (with the retiring generation's, during a re-encryption).
    pub fn keys(&self) -> Result<VolumeKeys, CryptoError> {
        let retiring = self.retiring.as_ref().map(|r| r.keys()).transpose()?;
        Ok(
            VolumeKeys::from_deks(&self.outer, self.inner.as_ref(), self.sector_size)?
                .with_generation(self.generation, retiring),
        )
    }
}

/// Why a check gave no key: [`ErrorClass::Denied`] (revoke now) or
/// [`ErrorClass::Unavailable`] (degrade, revoke after the grace period).
#[derive(Clone, Debug)]
pub struct CheckFailure {
    /// Denied or Unavailable.
    pub class: ErrorClass,
    /// What `status` shows.
    pub reason: String,
}

/// Where a keyring's keys come from: a real unwrap through the vault on every call.
pub trait KeySource: Send + Sync {
    /// Re-reads and verifies what the keys are wrapped in, and unwraps them.
    fn unwrap(&self) -> Result<Unwrapped, CheckFailure>;
    /// The full versioned id of the KEK in use (for status and events).
    fn key_id(&self) -> String;
    /// The Disk Encryption Set of the volume, if any.
    fn des(&self) -> Option<String>;
    /// The vault connection checks go through.
    fn vault(&self) -> &dyn Vault;
}

/// The keys are not live (revoked, or never unlocked): the reason, for the request's error.
#[derive(Clone, Debug, thiserror::Error)]
#[error("volume is inaccessible: {0}")]
pub struct NotLive(pub String);

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
    source: Box<dyn KeySource>,
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
    /// A keyring whose keys are live, built from the first unwrap `first` of `source`.
    pub fn new(
        source: Box<dyn KeySource>,
        first: Unwrapped,
        cfg: KeyringConfig,
    ) -> Result<Keyring, CryptoError> {
        let keys = first.keys()?;
        drop(first);
        let now = SystemTime::now();
        Ok(Keyring {
            source,
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

    /// The live keys, or why there are none. Cheap: a read lock and an `Arc` clone. Generic in
    /// the error so that callers get their own error type (`VolumeError: From<NotLive>`).
    pub fn keys<E: From<NotLive>>(&self) -> Result<Arc<VolumeKeys>, E> {
        if let Some(k) = read(&self.live).as_ref() {
            return Ok(k.clone());
        }
        self.denied.fetch_add(1, Ordering::Relaxed);
        Err(E::from(NotLive(match &self.inner().state {
            KeyState::Inaccessible { reason } => reason.clone(),
            _ => "volume is locked".into(),
        })))
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
        self.source.vault()
    }

    /// The full versioned id of the KEK in use.
    pub fn key_id(&self) -> String {
        self.source.key_id()
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

    /// Re-validates the KEK with a real unwrap (through the source, which re-reads the
    /// header) and moves the state accordingly: denied → Inaccessible now; unreachable →
    /// Degraded, Inaccessible once the grace period is over; success → Accessible (healing an
    /// Inaccessible volume without a remount).
    pub fn check(&self) -> Option<Transition> {
        let result = self.source.unwrap();
        let t = self.apply(result);
        // The unwrap, HKDF and key expansion ran on this thread's stack.
        crate::crypto::secret::scrub_stack();
        t
    }

    fn apply(&self, result: Result<Unwrapped, CheckFailure>) -> Option<Transition> {
        let now = SystemTime::now();
        let mut inner = self.inner();
        inner.last_check = Some(now);
        inner.next_check = now + self.cfg.check_interval;
        match result {
            Ok(unwrapped) => {
                inner.last_success = Some(now);
                inner.unreachable_since = None;
                if inner.state == KeyState::Accessible {
                    return None;
                }
                match unwrapped.keys() {
                    Ok(keys) => *write(&self.live) = Some(Arc::new(keys)),
                    Err(e) => {
                        write(&self.live).take();
                        let reason = format!("the unwrapped key is unusable: {e}");
                        return self.set(&mut inner, KeyState::Inaccessible { reason }, now);
                    }
                }
                self.set(&mut inner, KeyState::Accessible, now)
            }
            Err(CheckFailure { class, reason }) => {
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

    /// Puts keys unwrapped from a header this process just wrote in place of the live ones (a
    /// re-encryption starting or finishing): requests from now on use them; requests in
    /// flight finish with the keys they hold. Refused (false) while the keys are not live: a
    /// revocation is never undone this way.
    pub fn install(&self, unwrapped: &Unwrapped) -> Result<bool, CryptoError> {
        let keys = unwrapped.keys()?;
        let mut live = write(&self.live);
        if live.is_none() {
            return Ok(false);
        }
        *live = Some(Arc::new(keys));
        Ok(true)
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> KeyringStatus {
        let key_id = self.source.key_id();
        let version = key_id
            .parse::<KeyId>()
            .map(|k| k.version)
            .unwrap_or_default();
        let des = self.source.des();
        let inner = self.inner();
        KeyringStatus {
            state: inner.state.name().into(),
            reason: inner.state.reason().map(str::to_string),
            since: rfc3339(inner.since),
            key_id,
            key_version: version,
            last_check: inner.last_check.map(rfc3339),
            last_success: inner.last_success.map(rfc3339),
            next_check: Some(rfc3339(inner.next_check)),
            requests_denied: self.denied.load(Ordering::Relaxed),
            key_check_interval_s: self.cfg.check_interval.as_secs(),
            grace_period_s: self.cfg.grace.as_secs(),
            des,
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

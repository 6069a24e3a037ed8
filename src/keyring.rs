//! The keyring: holds a mounted volume's live keys and the state that says whether they may
//! be used. Every data path asks it for the keys on each request, so taking the keys away
//! here cuts off every path at once.
//!
//! States: `Locked → Accessible ⇄ Inaccessible(reason)` (DESIGN.md). Revocation detection
//! (periodic re-validation with the vault, push notifications, the grace period of
//! `Degraded`) builds on this type.

use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::crypto::{Dek, VolumeKeys};
use crate::vault::{KeyId, Vault};
use crate::volume::header::VolumeHeader;
use crate::volume::VolumeError;

/// Whether the volume's keys may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Not unlocked yet.
    Locked,
    /// Keys live; requests are served.
    Accessible,
    /// Keys erased; every request is refused.
    Inaccessible {
        /// Why (e.g. "key disabled").
        reason: String,
    },
}

/// Holds the live keys of one mounted volume.
pub struct Keyring {
    vault: Box<dyn Vault>,
    key_id: KeyId,
    live: RwLock<Option<Arc<VolumeKeys>>>,
    state: Mutex<(KeyState, SystemTime)>,
}

impl Keyring {
    /// Unwraps the volume's DEK through `vault`, checks it against the header and makes the
    /// keys live.
    pub fn unlock(vault: Box<dyn Vault>, header: &VolumeHeader) -> Result<Keyring, VolumeError> {
        let key_id = header.key_id()?;
        let keys = unwrap_keys(vault.as_ref(), header)?;
        Ok(Keyring {
            vault,
            key_id,
            live: RwLock::new(Some(Arc::new(keys))),
            state: Mutex::new((KeyState::Accessible, SystemTime::now())),
        })
    }

    /// The live keys, or why there are none. Cheap: a read lock and an `Arc` clone.
    pub fn keys(&self) -> Result<Arc<VolumeKeys>, VolumeError> {
        if let Some(k) = self.live.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(k.clone());
        }
        Err(VolumeError::Inaccessible(match self.state().0 {
            KeyState::Inaccessible { reason } => reason,
            _ => "volume is locked".into(),
        }))
    }

    /// Current state and since when.
    pub fn state(&self) -> (KeyState, SystemTime) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The KEK version the volume's DEK is wrapped with.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The vault connection this keyring validates against.
    pub fn vault(&self) -> &dyn Vault {
        self.vault.as_ref()
    }

    /// Erases the keys: requests in flight finish with the `Arc` they hold, new ones are refused.
    pub fn revoke(&self, reason: String) {
        self.live.write().unwrap_or_else(|p| p.into_inner()).take();
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) =
            (KeyState::Inaccessible { reason }, SystemTime::now());
    }
}

/// Unwraps and verifies a header's DEK and builds the volume's ciphers.
pub fn unwrap_keys(vault: &dyn Vault, header: &VolumeHeader) -> Result<VolumeKeys, VolumeError> {
    let dek = unwrap_dek(vault, header)?;
    VolumeKeys::from_dek(&dek, header.sector_size as usize).map_err(VolumeError::Crypto)
}

/// Unwraps and verifies a header's DEK.
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

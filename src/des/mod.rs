//! Disk Encryption Sets (DES): a named binding of a vault key (and version), the identity that
//! uses it, the encryption type and the auto-rotation setting, plus the volumes bound to it.
//! The operations here touch many volumes at once: bind a new volume, move every volume to a
//! new key version or a different key (a *rewrap*: the DEK is unwrapped with the old key and
//! wrapped with the new one; data is never touched), and auto-rotate when the vault gets a
//! newer version of the key.
//!
//! Records live in `$CMKFS_HOME/des/<name>.json` (0600, directory 0700), replaced atomically;
//! every change takes the exclusive `flock` on `$CMKFS_HOME/des/.lock`, so concurrent
//! `cmkfs des` commands and mounts that auto-rotate never interleave their updates.
//!
//! **Crash safety of a rewrap.** A key change first records its intent (the new key becomes
//! `activeKey`, the old one goes to `previousKeys`), then replaces each volume's header
//! atomically (temp file → fsync → rename → fsync directory), and only when every volume is
//! done clears `previousKeys`. At every point each volume's header names either the old or the
//! new key, and both are listed in the record until the rotation is complete, so an
//! interrupted rotation leaves volumes that mount with the old or the new wrap, and
//! `cmkfs des update NAME` finishes it. Every new wrap is unwrapped again and checked before
//! it is written. [`Hooks::fault`] lets tests stop the process of a rewrap after any step.
//!
//! **Double encryption** (`EncryptionAtRestWithPlatformAndCustomerKeys`): volumes get a second,
//! inner DEK wrapped by cmkfs's own platform key ([`PLATFORM_KEY`] in the `local:` vault,
//! created on demand). Rotations only rewrap the outer (customer) DEK.
//!
//! **Irreversibility.** Customer-managed keys cannot be traded back for the platform key: a DES
//! refuses [`PLATFORM_KEY`] as its key, a bound volume cannot leave its DES, and the encryption
//! type of a DES cannot change. Moving to a different customer key is fine.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::crypto::Dek;
use crate::fsutil;
use crate::home::Home;
use crate::keyring;
use crate::vault::{
    self, valid_key_name, CreateKeyOptions, Credential, DenyReason, KeyId, KeyInfo, Permission,
    Vault, VaultError,
};
use crate::volume::header::{VolumeHeader, HEADER_FILE};
use crate::volume::{CreateOptions, PlatformLayer, Volume, VolumeError};

/// Name of the platform key in cmkfs's own (`local:`) vault: it wraps the inner DEK of
/// double-encrypted volumes and is never a customer-managed key.
pub use crate::volume::header::PLATFORM_KEY;
/// RSA size of the platform key when cmkfs creates it.
pub const PLATFORM_KEY_SIZE: u32 = 3072;
/// Schema version of the DES record.
pub const SCHEMA: u32 = 1;
/// The permissions a DES identity needs on its key.
pub const REQUIRED_PERMISSIONS: [Permission; 3] =
    [Permission::Get, Permission::WrapKey, Permission::UnwrapKey];

const DES_DIR: &str = "des";
const LOCK_FILE: &str = ".lock";

/// What can go wrong with a Disk Encryption Set. Every message is one line that names what
/// was wrong.
#[derive(Debug, thiserror::Error)]
pub enum DesError {
    /// A name outside the allowed alphabet or length.
    #[error(
        "invalid Disk Encryption Set name {0:?}: use 1-80 letters, digits, dashes and underscores"
    )]
    InvalidName(String),
    /// No such DES.
    #[error("Disk Encryption Set {0} does not exist (see `cmkfs des list`)")]
    NotFound(String),
    /// The name is taken.
    #[error("Disk Encryption Set {0} already exists")]
    Exists(String),
    /// Caller input that cannot be right.
    #[error("{0}")]
    Invalid(String),
    /// A DES rule refuses the request (the message says which and why).
    #[error("{0}")]
    Refused(String),
    /// A vault call failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// An I/O error on a named path.
    #[error("{}: {error}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A DES record that cannot be read.
    #[error("Disk Encryption Set record {} is corrupt: {why}", path.display())]
    Corrupt {
        /// Record path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Some volumes could not be moved to the new key (the rotation stays in progress).
    #[error("{0}")]
    Incomplete(String),
    /// A fault hook stopped the operation (tests of crash safety).
    #[error("interrupted after step {0:?}")]
    Interrupted(RewrapStep),
}

impl DesError {
    fn io(path: &Path, error: io::Error) -> DesError {
        DesError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

mod binding;
mod keys;
mod manage;
mod records;
mod rewrap;
mod rotation;
#[cfg(test)]
mod tests;
mod update;

pub use binding::*;
pub use keys::*;
pub use manage::*;
pub use records::*;
pub use rewrap::*;
pub use rotation::*;
pub use update::*;

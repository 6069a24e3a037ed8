//! cmkfs — a transparent-encryption FUSE filesystem with customer-managed keys.
//!
//! Rooms (see `docs/ARCHITECTURE.md`): [`crypto`] (pure ciphers and key types), [`engine`]
//! (parallel sector work), [`volume`] (on-disk format), [`fs`] (thin FUSE adapter),
//! [`keyring`] (the live key and its state), [`vault`] (KEKs behind one trait), [`cli`].

pub mod backup;
pub mod bench;
pub mod cli;
pub mod control;
pub mod crypto;
pub mod des;
pub mod drill;
pub mod engine;
pub mod fs;
pub mod fsck;
pub mod fsutil;
pub mod home;
pub mod keyring;
pub mod monitor;
pub mod mount;
pub mod process;
pub mod unlock;
pub mod vault;
pub mod volume;

//! A WRITE's payload and who wipes it.
//!
//! Over `/dev/fuse` the payload is fuser's own request buffer, handed over as `&mut [u8]`
//! (`Filesystem::write_mut`, vendor/fuser/CMKFS-PATCH.md, fourth change): the units it covers
//! whole are encrypted in place in it and stored from there (`content::write_mut`), so it
//! then holds ciphertext, and the session no longer wipes it. Whatever plaintext a request
//! leaves in it (a failed or short write: ENOSPC, revocation, a closed handle) is wiped here
//! before the reply goes out. Over io_uring (and for a WRITE held by a backup's freeze before
//! it is copied) the payload is borrowed: a copy the session wipes.

use crate::volume::{OpenFile, Volume, VolumeError};

/// The payload of one WRITE.
pub(super) enum Payload<'a> {
    /// Borrowed: written through [`Volume::write`]; the session wipes it.
    Shared(&'a [u8]),
    /// Given up: written through [`Volume::write_mut`]; wiped here where it still holds
    /// plaintext ([`Payload::wipe_from`]).
    Mut(&'a mut [u8]),
}

impl Payload<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Payload::Shared(d) => d.len(),
            Payload::Mut(d) => d.len(),
        }
    }

    /// A copy of the payload (a WRITE held by a backup's freeze).
    pub(super) fn to_vec(&self) -> Vec<u8> {
        match self {
            Payload::Shared(d) => d.to_vec(),
            Payload::Mut(d) => d.to_vec(),
        }
    }

    /// Writes the payload's bytes from `from` on at `off`. With [`Payload::Mut`], on `Ok(n)`
    /// bytes `[from, from + n)` hold no plaintext any more and the rest is as given.
    pub(super) fn write(
        &mut self,
        vol: &Volume,
        of: &OpenFile,
        off: u64,
        from: usize,
    ) -> Result<usize, VolumeError> {
        match self {
            Payload::Shared(d) => vol.write(of, off, &d[from..]),
            Payload::Mut(d) => vol.write_mut(of, off, &mut d[from..]),
        }
    }

    /// Wipes bytes `from..` of a given-up payload: the plaintext a request did not write
    /// (or, after an error, all of it: `from` 0).
    pub(super) fn wipe_from(&mut self, from: usize) {
        if let Payload::Mut(d) = self {
            if from < d.len() {
                // A `memset` of fuser's buffer, which outlives the request: not dropped.
                d[from..].fill(0);
                std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}

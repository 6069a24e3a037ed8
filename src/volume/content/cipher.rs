//! The units' cipher: each unit encrypted or decrypted with the keys of its file's key
//! generation (two during a re-encryption), in one or two XTS layers.

use super::{corrupt, Ctx, FileHeader, VolumeError};
use crate::crypto::VolumeKeys;
use crate::engine::Holes;
use crate::volume::layout::BLOCK;

/// Refuses a buffer that is not whole AES blocks: the cipher would fall back to ciphertext
/// stealing or the v1 short-tail rule, which format v2 never uses.
fn check_blocks(buf: &[u8]) -> Result<(), VolumeError> {
    if !(buf.len() as u64).is_multiple_of(BLOCK) {
        return Err(VolumeError::Internal(format!(
            "a {}-byte unit buffer is not whole AES blocks",
            buf.len()
        )));
    }
    Ok(())
}

/// The keys of a file's units `[first, first + n)` as runs: `(units, keys)`. A file is
/// under the DEK of its header's key generation, except while a re-encryption converts it:
/// then its first `reencrypted` units are under the volume's current DEK already.
pub(super) fn key_runs<'k>(
    cx: &Ctx<'k>,
    h: &FileHeader,
    first: u64,
    n: u64,
) -> Result<[(u64, &'k VolumeKeys); 2], VolumeError> {
    let current: &'k VolumeKeys = cx.keys;
    if h.key_gen == current.generation as u16 {
        return Ok([(n, current), (0, current)]);
    }
    let Some(old) = current.for_file_generation(h.key_gen) else {
        return Err(corrupt(format!(
            "file data is under key generation {}, but the volume's keys are of generation {}{}",
            h.key_gen,
            current.generation as u16,
            match &current.retiring {
                Some(r) => format!(" and {} (retiring)", r.generation as u16),
                None => String::new(),
            }
        )));
    };
    let done = h.reencrypted.saturating_sub(first).min(n);
    Ok([(done, current), (n - done, old)])
}

/// The number of whole units `buf` covers starting at unit boundary (the last may be short).
fn units_in(cx: &Ctx, buf: &[u8]) -> u64 {
    (buf.len() as u64).div_ceil(cx.sector)
}

/// Encrypts consecutive units in place, each with the keys of its file's generation (see
/// [`key_runs`]): the inner (platform-key) layer first when the volume is double-encrypted,
/// then the outer one. Both layers use the same tweaks and the same whole-block units; their
/// keys are independent, so the passes do not cancel.
pub(crate) fn encrypt(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    by_key_runs(cx, h, first, buf, encrypt_with)
}

/// Copies `data` into `buf[at..]` and encrypts `buf` as [`encrypt`] does, in one pass over
/// memory: each unit gets its part of `data` just before it is encrypted (the request's
/// plaintext goes from the FUSE buffer to ciphertext in the pooled one, never to plaintext
/// in a second buffer first).
pub(super) fn encrypt_copying(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
    data: &[u8],
    at: usize,
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    let mut pos = 0usize;
    let mut unit = first;
    for (n, keys) in key_runs(cx, h, first, units_in(cx, buf))? {
        if n == 0 {
            continue;
        }
        let end = (pos + (n * cx.sector) as usize).min(buf.len());
        // The part of `data` inside this run (`lo >= at` whenever the part is not empty).
        let lo = at.clamp(pos, end);
        let hi = (at + data.len()).clamp(lo, end);
        let run = &mut buf[pos..end];
        let tweak = h.tweak();
        if hi > lo {
            let part = &data[lo - at..hi - at];
            let layer = keys.inner.as_ref().unwrap_or(&keys.xts);
            cx.engine
                .encrypt_from(layer, tweak, unit, run, part, lo - pos)
                .map_err(VolumeError::Crypto)?;
            if keys.inner.is_some() {
                cx.engine
                    .encrypt(&keys.xts, tweak, unit, run)
                    .map_err(VolumeError::Crypto)?;
            }
        } else {
            encrypt_with(cx, keys, tweak, unit, run)?;
        }
        pos = end;
        unit += n;
    }
    Ok(())
}

/// One cipher pass over consecutive units with one generation's keys: [`encrypt_with`] or
/// [`decrypt_with`] (context, keys, file tweak, first unit, buffer).
type CipherPass = fn(&Ctx, &VolumeKeys, u128, u64, &mut [u8]) -> Result<(), VolumeError>;

/// Runs `pass` over consecutive units of `buf` (unit `first` at its start), one run of units
/// per key generation ([`key_runs`]).
fn by_key_runs(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
    pass: CipherPass,
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    let mut at = 0usize;
    let mut unit = first;
    for (n, keys) in key_runs(cx, h, first, units_in(cx, buf))? {
        if n == 0 {
            continue;
        }
        let end = (at + (n * cx.sector) as usize).min(buf.len());
        pass(cx, keys, h.tweak(), unit, &mut buf[at..end])?;
        at = end;
        unit += n;
    }
    Ok(())
}

/// Encrypts consecutive units in place with `keys`.
pub(crate) fn encrypt_with(
    cx: &Ctx,
    keys: &VolumeKeys,
    tweak: u128,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    if let Some(inner) = &keys.inner {
        cx.engine
            .encrypt(inner, tweak, first, buf)
            .map_err(VolumeError::Crypto)?;
    }
    cx.engine
        .encrypt(&keys.xts, tweak, first, buf)
        .map_err(VolumeError::Crypto)
}

/// Decrypts consecutive units in place, the inverse of [`encrypt`]. All-zero stored blocks
/// (holes) stay zeros through both layers: the outer pass leaves them as they are, and a real
/// inner ciphertext block is all zero with probability 2^-128.
pub(crate) fn decrypt(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    by_key_runs(cx, h, first, buf, decrypt_with)
}

/// Decrypts consecutive units in place with `keys`.
pub(crate) fn decrypt_with(
    cx: &Ctx,
    keys: &VolumeKeys,
    tweak: u128,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    cx.engine
        .decrypt(&keys.xts, tweak, first, buf, Holes::Zero)
        .map_err(VolumeError::Crypto)?;
    if let Some(inner) = &keys.inner {
        cx.engine
            .decrypt(inner, tweak, first, buf, Holes::Zero)
            .map_err(VolumeError::Crypto)?;
    }
    Ok(())
}

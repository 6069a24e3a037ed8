//! File contents: the per-file header and sector read / write / truncate.
//!
//! A backing file is `FILE_HEADER_LEN` bytes of header followed by the XTS ciphertext, exactly
//! as long as the plaintext (no expansion). The logical size is therefore
//! `backing length - FILE_HEADER_LEN` (an empty file may have no header at all), which the
//! backing filesystem keeps consistent with the data by itself: no separate size record can
//! disagree with it after a crash.
//!
//! Sector `i` of a file is encrypted with tweak `file_id + i` (the file id is random per file),
//! so equal plaintext in two files, or at two offsets, gives unrelated ciphertext. The last
//! sector is a short XTS unit (ciphertext stealing); because its ciphertext depends on its
//! length, any write or truncate that moves the end of the file re-encrypts the old last
//! sector. All-zero ciphertext units read as zeros: they are holes of the sparse backing file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, RwLock};

use super::VolumeError;
use crate::crypto::VolumeKeys;
use crate::engine::{Holes, SectorEngine};

/// Bytes of the per-file header.
pub const FILE_HEADER_LEN: usize = 32;
const FILE_MAGIC: &[u8; 4] = b"CMKF";
const FILE_VERSION: u16 = 1;

/// The per-file header: magic, version, and the random file id used in the tweak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Random per-file id; the tweak of sector `i` is `file_id + i`.
    pub file_id: [u8; 16],
}

impl FileHeader {
    /// A header with a fresh random file id.
    pub fn generate() -> Result<FileHeader, VolumeError> {
        let mut file_id = [0u8; 16];
        getrandom::getrandom(&mut file_id).map_err(|e| VolumeError::Internal(e.to_string()))?;
        Ok(FileHeader { file_id })
    }

    /// On-disk encoding: magic(4) version(2, LE) reserved(2) file_id(16) reserved(8).
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[..4].copy_from_slice(FILE_MAGIC);
        b[4..6].copy_from_slice(&FILE_VERSION.to_le_bytes());
        b[8..24].copy_from_slice(&self.file_id);
        b
    }

    /// Parses a header; says what is wrong if it is not one.
    pub fn decode(b: &[u8]) -> Result<FileHeader, String> {
        if b.len() < FILE_HEADER_LEN {
            return Err(format!("file header truncated to {} bytes", b.len()));
        }
        if &b[..4] != FILE_MAGIC {
            return Err("file header has a wrong magic".into());
        }
        let v = u16::from_le_bytes([b[4], b[5]]);
        if v != FILE_VERSION {
            return Err(format!("file header version {v} is not supported"));
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[8..24]);
        Ok(FileHeader { file_id })
    }

    fn tweak(&self) -> u128 {
        u128::from_le_bytes(self.file_id)
    }
}

/// Logical size of a file whose backing file is `backing_len` bytes long.
pub fn logical_size(backing_len: u64) -> Result<u64, String> {
    match backing_len {
        0 => Ok(0),
        n if n < FILE_HEADER_LEN as u64 => Err(format!(
            "backing file of {n} bytes is shorter than a file header"
        )),
        n => Ok(n - FILE_HEADER_LEN as u64),
    }
}

/// Shared state of one backing file, common to all its open handles: the lock that makes
/// read-modify-write and size changes atomic, and the cached header.
#[derive(Debug, Default)]
pub struct FileState {
    /// Shared for reads and whole-sector overwrites inside the file; exclusive for anything
    /// that reads-modifies-writes a sector or moves the end of the file.
    pub(crate) rmw: RwLock<()>,
    header: Mutex<Option<FileHeader>>,
}

/// The cipher context a content operation needs.
pub struct Ctx<'a> {
    /// Live keys.
    pub keys: &'a VolumeKeys,
    /// Sector engine.
    pub engine: &'a SectorEngine,
    /// Sector (XTS data unit) size.
    pub sector: u64,
}

fn corrupt(why: impl Into<String>) -> VolumeError {
    VolumeError::CorruptFile {
        path: None,
        why: why.into(),
    }
}

fn backing_size(f: &File) -> Result<u64, VolumeError> {
    let len = f.metadata().map_err(VolumeError::Os)?.len();
    logical_size(len).map_err(corrupt)
}

fn header(f: &File, st: &FileState, create: bool) -> Result<Option<FileHeader>, VolumeError> {
    let mut cached = st.header.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = *cached {
        return Ok(Some(h));
    }
    let len = f.metadata().map_err(VolumeError::Os)?.len();
    if len == 0 {
        if !create {
            return Ok(None);
        }
        let h = FileHeader::generate()?;
        f.write_all_at(&h.encode(), 0).map_err(VolumeError::Os)?;
        *cached = Some(h);
        return Ok(Some(h));
    }
    let mut b = [0u8; FILE_HEADER_LEN];
    f.read_exact_at(&mut b, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt("file header truncated")
        } else {
            VolumeError::Os(e)
        }
    })?;
    let h = FileHeader::decode(&b).map_err(corrupt)?;
    *cached = Some(h);
    Ok(Some(h))
}

fn read_exact(f: &File, buf: &mut [u8], off: u64) -> Result<(), VolumeError> {
    f.read_exact_at(buf, FILE_HEADER_LEN as u64 + off)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt("backing file shrank while reading (changed behind the mount?)")
            } else {
                VolumeError::Os(e)
            }
        })
}

/// Encrypts consecutive units in place: the inner (platform-key) layer first when the volume
/// is double-encrypted, then the outer one. Both layers use the same tweaks; their keys are
/// independent, so the passes do not cancel.
fn encrypt(cx: &Ctx, tweak: u128, first: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
    if let Some(inner) = &cx.keys.inner {
        cx.engine
            .encrypt(inner, tweak, first, buf)
            .map_err(VolumeError::Crypto)?;
    }
    cx.engine
        .encrypt(&cx.keys.xts, tweak, first, buf)
        .map_err(VolumeError::Crypto)
}

/// Decrypts consecutive units in place, the inverse of [`encrypt`]. All-zero units (holes)
/// stay zeros through both layers: the outer pass leaves them as they are, and a real inner
/// ciphertext unit is never all zeros.
fn decrypt(cx: &Ctx, tweak: u128, first: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
    cx.engine
        .decrypt(&cx.keys.xts, tweak, first, buf, Holes::Zero)
        .map_err(VolumeError::Crypto)?;
    if let Some(inner) = &cx.keys.inner {
        cx.engine
            .decrypt(inner, tweak, first, buf, Holes::Zero)
            .map_err(VolumeError::Crypto)?;
    }
    Ok(())
}

/// Reads and decrypts one whole unit (sector `s` of a file of logical size `size`).
fn read_unit(
    f: &File,
    cx: &Ctx,
    h: &FileHeader,
    s: u64,
    size: u64,
    out: &mut [u8],
) -> Result<usize, VolumeError> {
    let start = s * cx.sector;
    let len = (size - start).min(cx.sector) as usize;
    read_exact(f, &mut out[..len], start)?;
    decrypt(cx, h.tweak(), s, &mut out[..len])?;
    Ok(len)
}

/// Reads up to `len` bytes at `off`. Returns the plaintext (shorter at end of file).
pub fn read(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    len: usize,
) -> Result<Vec<u8>, VolumeError> {
    let _g = st.rmw.read().unwrap_or_else(|p| p.into_inner());
    let size = backing_size(f)?;
    if off >= size || len == 0 {
        return Ok(Vec::new());
    }
    let end = size.min(off.saturating_add(len as u64));
    let Some(h) = header(f, st, false)? else {
        return Err(corrupt("non-empty file without a header"));
    };
    let first = off / cx.sector;
    let start = first * cx.sector;
    let stop = size.min((end - 1) / cx.sector * cx.sector + cx.sector);
    let mut buf = vec![0u8; (stop - start) as usize];
    read_exact(f, &mut buf, start)?;
    decrypt(cx, h.tweak(), first, &mut buf)?;
    buf.truncate((end - start) as usize);
    buf.drain(..(off - start) as usize);
    Ok(buf)
}

/// Writes `data` at `off`, growing the file as needed. Returns the bytes written.
pub fn write(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &[u8],
) -> Result<usize, VolumeError> {
    if data.is_empty() {
        return Ok(0);
    }
    let end = off.checked_add(data.len() as u64).ok_or(VolumeError::Os(
        std::io::Error::from_raw_os_error(libc::EFBIG),
    ))?;
    // Whole sectors strictly inside the file: no read-modify-write and no size change, so
    // such writes run concurrently under the shared lock.
    {
        let _g = st.rmw.read().unwrap_or_else(|p| p.into_inner());
        let size = backing_size(f)?;
        if off % cx.sector == 0 && end % cx.sector == 0 && end <= size {
            let h =
                header(f, st, false)?.ok_or_else(|| corrupt("non-empty file without a header"))?;
            let mut buf = data.to_vec();
            encrypt(cx, h.tweak(), off / cx.sector, &mut buf)?;
            f.write_all_at(&buf, FILE_HEADER_LEN as u64 + off)
                .map_err(VolumeError::Os)?;
            return Ok(data.len());
        }
    }
    let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
    write_locked(f, st, cx, off, data)
}

/// The read-modify-write body of [`write`]; the caller holds the exclusive lock.
fn write_locked(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &[u8],
) -> Result<usize, VolumeError> {
    let end = off + data.len() as u64;
    let size = backing_size(f)?;
    let h = header(f, st, true)?.ok_or_else(|| corrupt("could not create the file header"))?;
    let ss = cx.sector;
    let new_size = size.max(end);
    let first = off / ss;
    let last = (end - 1) / ss;
    // The old last sector was a short unit; if this write starts beyond it, it becomes a
    // full sector of zeros-padded data. Written first so that a crash leaves a consistent file.
    if size % ss != 0 && size / ss < first {
        pad_tail(f, cx, &h, size, (size / ss + 1) * ss)?;
    }
    let start = first * ss;
    let stop = new_size.min((last + 1) * ss);
    let mut buf = vec![0u8; (stop - start) as usize];
    // Keep the old bytes of the first and last sectors where the write does not cover them.
    let edges = [first, last];
    for &s in &edges[..if first == last { 1 } else { 2 }] {
        let (s_start, s_old_end) = (s * ss, size.min(s * ss + ss));
        if s_start < size && !(off <= s_start && end >= s_old_end) {
            let at = (s_start - start) as usize;
            read_unit(f, cx, &h, s, size, &mut buf[at..])?;
        }
    }
    buf[(off - start) as usize..(end - start) as usize].copy_from_slice(data);
    encrypt(cx, h.tweak(), first, &mut buf)?;
    f.write_all_at(&buf, FILE_HEADER_LEN as u64 + start)
        .map_err(VolumeError::Os)?;
    Ok(data.len())
}

/// Re-encrypts the short last unit of a file of logical `size` as a unit reaching `new_end`
/// (within the same sector), zero-padded.
fn pad_tail(
    f: &File,
    cx: &Ctx,
    h: &FileHeader,
    size: u64,
    new_end: u64,
) -> Result<(), VolumeError> {
    let s = size / cx.sector;
    let start = s * cx.sector;
    let mut buf = vec![0u8; (new_end - start) as usize];
    read_unit(f, cx, h, s, size, &mut buf)?;
    encrypt(cx, h.tweak(), s, &mut buf)?;
    f.write_all_at(&buf, FILE_HEADER_LEN as u64 + start)
        .map_err(VolumeError::Os)
}

/// Sets the logical size to `new_size` (shrink or grow with zeros).
pub fn truncate(f: &File, st: &FileState, cx: &Ctx, new_size: u64) -> Result<(), VolumeError> {
    let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
    truncate_locked(f, st, cx, new_size)
}

fn truncate_locked(f: &File, st: &FileState, cx: &Ctx, new_size: u64) -> Result<(), VolumeError> {
    let size = backing_size(f)?;
    if new_size == size {
        return Ok(());
    }
    let ss = cx.sector;
    if new_size == 0 {
        // Dropping the header too means the next write picks a new file id: old and new
        // contents never share tweaks.
        f.set_len(0).map_err(VolumeError::Os)?;
        *st.header.lock().unwrap_or_else(|p| p.into_inner()) = None;
        return Ok(());
    }
    let h = header(f, st, true)?.ok_or_else(|| corrupt("could not create the file header"))?;
    if new_size > size {
        if size % ss != 0 {
            pad_tail(f, cx, &h, size, new_size.min((size / ss + 1) * ss))?;
        }
    } else if new_size % ss != 0 {
        // The new last sector becomes a shorter unit: re-encrypt it at its new length.
        let s = new_size / ss;
        let start = s * ss;
        let mut buf = vec![0u8; ss as usize];
        read_unit(f, cx, &h, s, size, &mut buf)?;
        buf.truncate((new_size - start) as usize);
        encrypt(cx, h.tweak(), s, &mut buf)?;
        f.write_all_at(&buf, FILE_HEADER_LEN as u64 + start)
            .map_err(VolumeError::Os)?;
    }
    f.set_len(FILE_HEADER_LEN as u64 + new_size)
        .map_err(VolumeError::Os)
}

fn os_err(errno: i32) -> VolumeError {
    VolumeError::Os(std::io::Error::from_raw_os_error(errno))
}

/// `fallocate(2)` on the plaintext view. Supported: mode 0 and `KEEP_SIZE` (reserve space;
/// growth reads as zeros), `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE` (the range reads as
/// zeros). `COLLAPSE_RANGE` and `INSERT_RANGE` would move data across tweaks: EOPNOTSUPP.
pub fn fallocate(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    mode: i32,
    off: u64,
    len: u64,
) -> Result<(), VolumeError> {
    let supported =
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    if mode & !supported != 0 {
        return Err(os_err(libc::EOPNOTSUPP));
    }
    if len == 0 {
        return Err(os_err(libc::EINVAL));
    }
    let end = off.checked_add(len).ok_or_else(|| os_err(libc::EFBIG))?;
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
    let size = backing_size(f)?;
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
        zero_range(f, st, cx, off, end.min(size), size)?;
        if !keep && end > size {
            truncate_locked(f, st, cx, end)?;
        }
        return Ok(());
    }
    if !keep && end > size {
        truncate_locked(f, st, cx, end)?;
    }
    // Reserve the blocks so that a later write cannot fail with ENOSPC; unwritten extents
    // read as zero ciphertext, which reads as zeros.
    if header(f, st, false)?.is_some() {
        let r = unsafe_fallocate(
            f,
            libc::FALLOC_FL_KEEP_SIZE,
            FILE_HEADER_LEN as u64 + off,
            len,
        );
        if let Err(e) = r {
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(VolumeError::Os(e));
            }
        }
    }
    Ok(())
}

fn unsafe_fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `[a, b)` (inside a file of logical `size`) read as zeros: whole sectors become
/// holes of the backing file (zero ciphertext), partial sectors are rewritten.
fn zero_range(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    a: u64,
    b: u64,
    size: u64,
) -> Result<(), VolumeError> {
    if a >= b {
        return Ok(());
    }
    let ss = cx.sector;
    // Whole units inside [a, b): the first at or after a, up to the last ending by b
    // (the file's short last unit counts as whole when b reaches the end of file).
    let first_full = a.div_ceil(ss) * ss;
    let last_full_end = if b == size { b } else { b / ss * ss };
    if first_full < last_full_end {
        let (off, len) = (
            FILE_HEADER_LEN as u64 + first_full,
            last_full_end - first_full,
        );
        let punched = unsafe_fallocate(
            f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        );
        if punched.is_err() {
            // No hole punching here: zero ciphertext reads as zeros all the same.
            let zeros = vec![0u8; (ss as usize).min(len as usize)];
            let mut at = 0;
            while at < len {
                let n = zeros.len().min((len - at) as usize);
                f.write_all_at(&zeros[..n], off + at)
                    .map_err(VolumeError::Os)?;
                at += n as u64;
            }
        }
    }
    // The partial edges, rewritten as encrypted zeros.
    let head_end = b.min(first_full);
    if a < head_end {
        write_locked(f, st, cx, a, &vec![0u8; (head_end - a) as usize])?;
    }
    let tail_start = a.max(last_full_end);
    if tail_start < b && tail_start >= head_end {
        write_locked(f, st, cx, tail_start, &vec![0u8; (b - tail_start) as usize])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use rand::{Rng, SeedableRng};

    struct Fixture {
        _dir: tempfile::TempDir,
        file: File,
        st: FileState,
        keys: VolumeKeys,
        engine: SectorEngine,
        sector: u64,
    }

    fn fixture(sector: u64, threads: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let keys = VolumeKeys::from_dek(&Dek::generate().unwrap(), sector as usize).unwrap();
        Fixture {
            _dir: dir,
            file,
            st: FileState::default(),
            keys,
            engine: SectorEngine::new(threads).unwrap(),
            sector,
        }
    }

    impl Fixture {
        fn cx(&self) -> Ctx<'_> {
            Ctx {
                keys: &self.keys,
                engine: &self.engine,
                sector: self.sector,
            }
        }
        fn all(&self) -> Vec<u8> {
            read(&self.file, &self.st, &self.cx(), 0, usize::MAX / 2).unwrap()
        }
    }

    #[test]
    fn random_writes_and_truncates_match_a_model() {
        for (seed, sector) in [(1u64, 512u64), (2, 512), (3, 4096), (4, 4096), (5, 1024)] {
            let fx = fixture(sector, 2);
            let mut model: Vec<u8> = Vec::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for step in 0..400 {
                let max = (sector * 6) as usize;
                if rng.gen_ratio(1, 5) {
                    let n = rng.gen_range(0..max);
                    truncate(&fx.file, &fx.st, &fx.cx(), n as u64).unwrap();
                    model.resize(n, 0);
                } else if rng.gen_ratio(1, 6) {
                    let off = rng.gen_range(0..max);
                    let len = rng.gen_range(1..(sector as usize * 3));
                    let mode = [
                        0,
                        libc::FALLOC_FL_KEEP_SIZE,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        libc::FALLOC_FL_ZERO_RANGE,
                    ][rng.gen_range(0..4)];
                    fallocate(&fx.file, &fx.st, &fx.cx(), mode, off as u64, len as u64).unwrap();
                    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
                    if !keep && model.len() < off + len {
                        model.resize(off + len, 0);
                    }
                    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                        let stop = (off + len).min(model.len());
                        if off < stop {
                            model[off..stop].fill(0);
                        }
                    }
                } else {
                    let off = rng.gen_range(0..max);
                    let len = rng.gen_range(1..(sector as usize * 3));
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    write(&fx.file, &fx.st, &fx.cx(), off as u64, &data).unwrap();
                    if model.len() < off + len {
                        model.resize(off + len, 0);
                    }
                    model[off..off + len].copy_from_slice(&data);
                }
                let got = fx.all();
                assert_eq!(got.len(), model.len(), "seed {seed} step {step}: size");
                assert!(got == model, "seed {seed} step {step}: contents differ");
                let backing = fx.file.metadata().unwrap().len();
                assert_eq!(
                    logical_size(backing).unwrap(),
                    model.len() as u64,
                    "no ciphertext expansion"
                );
                // Random partial reads agree with the model too.
                if !model.is_empty() {
                    let off = rng.gen_range(0..model.len());
                    let len = rng.gen_range(1..=model.len() - off + 10);
                    let part = read(&fx.file, &fx.st, &fx.cx(), off as u64, len).unwrap();
                    assert_eq!(part[..], model[off..(off + len).min(model.len())]);
                }
            }
        }
    }

    #[test]
    fn tails_of_every_short_length_round_trip() {
        for len in [
            1usize, 2, 15, 16, 17, 31, 4095, 4096, 4097, 4111, 4112, 8191,
        ] {
            let fx = fixture(4096, 1);
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            write(&fx.file, &fx.st, &fx.cx(), 0, &data).unwrap();
            assert_eq!(fx.all(), data, "len {len}");
            let mut raw = vec![0u8; len];
            fx.file
                .read_exact_at(&mut raw, FILE_HEADER_LEN as u64)
                .unwrap();
            assert_ne!(raw, data, "len {len}: stored in the clear");
        }
    }

    #[test]
    fn sparse_growth_reads_zeros_and_keeps_old_tail() {
        let fx = fixture(4096, 1);
        write(&fx.file, &fx.st, &fx.cx(), 0, b"0123456789").unwrap();
        truncate(&fx.file, &fx.st, &fx.cx(), 3 * 4096 + 100).unwrap();
        write(&fx.file, &fx.st, &fx.cx(), 5 * 4096 + 1, b"end").unwrap();
        let all = fx.all();
        assert_eq!(all.len(), 5 * 4096 + 4);
        assert_eq!(&all[..10], b"0123456789");
        assert!(all[10..5 * 4096 + 1].iter().all(|b| *b == 0));
        assert_eq!(&all[5 * 4096 + 1..], b"end");
    }

    #[test]
    fn concurrent_disjoint_writers_lose_nothing() {
        let fx = std::sync::Arc::new(fixture(4096, 2));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let fx = fx.clone();
                std::thread::spawn(move || {
                    for i in 0..32u64 {
                        // Unaligned, sector-straddling chunks interleaved across threads.
                        let off = (i * 4 + t as u64) * 3000;
                        write(&fx.file, &fx.st, &fx.cx(), off, &[t + 1; 3000]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = fx.all();
        assert_eq!(all.len(), 128 * 3000);
        for (chunk, bytes) in all.chunks(3000).enumerate() {
            assert!(
                bytes.iter().all(|b| *b == (chunk % 4) as u8 + 1),
                "chunk {chunk} torn"
            );
        }
    }

    #[test]
    fn corrupt_headers_are_errors_not_panics() {
        let fx = fixture(4096, 1);
        fx.file.write_all_at(b"short", 0).unwrap();
        assert!(matches!(
            read(&fx.file, &fx.st, &fx.cx(), 0, 10),
            Err(VolumeError::CorruptFile { .. })
        ));
        fx.file.write_all_at(&[0xAA; 64], 0).unwrap();
        assert!(matches!(
            read(&fx.file, &fx.st, &fx.cx(), 0, 10),
            Err(VolumeError::CorruptFile { .. })
        ));
    }
}

//! Changed-chunk incrementals (archive version 3; docs/FORMAT.md, "Backup archive").
//!
//! Every file of a version 3 manifest carries one digest per chunk ([`grain`] bytes: 64 KiB
//! for files up to 4 GiB) of its backing file ([`ChunkHasher`]). An incremental backup of a file whose data changed compares the
//! file's chunk digests with the base entry's and, when that saves at least half of its
//! data, stores only the changed chunks: a member with the file's record but only the data
//! extents inside those chunks ([`plan`]). A restore takes the base entry's file, makes each
//! listed chunk a hole, writes the member's extents, sets the size, and checks the whole
//! result — the data digest over the record's extents, zeros everywhere else — before the
//! entry counts as made ([`apply`]). The base archive is not read at backup time: its
//! manifest has what is needed.
//!
//! The grain, 64 KiB (16 data units), keeps the manifest small (a digest of 32 hex digits per
//! chunk: about 35 bytes, 0.05% of the data; a chunk without data is `""`) while a changed
//! 4 KiB data unit costs at most 64 KiB in the archive. Files over 4 GiB get larger chunks
//! (at most 65536 per file), so no file's entry passes 2.3 MB.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use super::manifest::{self, Delta, Digester, Entry, Kind, Member};
use super::BackupError;

/// The smallest chunk: 16 data units.
pub const MIN_CHUNK: u64 = 64 << 10;
/// The most chunks a file has (bounds its manifest entry: 35 bytes per digest, 2.3 MB).
pub const MAX_CHUNKS: u64 = 1 << 16;

/// Bytes of backing file per chunk digest for a file of `size` bytes: 64 KiB up to 4 GiB,
/// then the power of two that keeps the file at [`MAX_CHUNKS`] chunks or fewer. A function of
/// the size alone: backup and restore agree on it without recording it.
pub fn grain(size: u64) -> u64 {
    size.div_ceil(MAX_CHUNKS)
        .checked_next_power_of_two()
        .unwrap_or(1 << 63)
        .max(MIN_CHUNK)
}

/// Chunks of a backing file of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(grain(size))
}

/// Computes the chunk digests of a file from the bytes of its data extents, fed in order.
/// Chunk `i` covers `[i·g, min((i+1)·g, size))` with `g` = [`grain`]`(size)`; its digest is the first 16 bytes
/// (hex) of SHA-256 over each part of a data extent inside it, in order: offset (u64 LE),
/// length (u64 LE), bytes. A chunk with no data has the digest `""`. Equal digests so mean
/// equal bytes and equal holes.
pub struct ChunkHasher {
    grain: u64,
    extents: Vec<(u64, u64)>,
    out: Vec<String>,
    /// Index into `extents`, and bytes of it done.
    ext: usize,
    in_ext: u64,
    /// The chunk being hashed, and bytes left in the current part.
    cur: Option<(u64, Sha256)>,
    part_left: u64,
}

impl ChunkHasher {
    /// A hasher for a file of `size` bytes whose data extents are `extents`.
    pub fn new(size: u64, extents: &[(u64, u64)]) -> ChunkHasher {
        ChunkHasher {
            grain: grain(size),
            extents: extents.to_vec(),
            out: vec![String::new(); chunk_count(size) as usize],
            ext: 0,
            in_ext: 0,
            cur: None,
            part_left: 0,
        }
    }

    /// Feeds data bytes (the extents', in order).
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.part_left == 0 {
                // Skip finished extents; bytes past the last one are not data.
                while self
                    .extents
                    .get(self.ext)
                    .is_some_and(|&(_, l)| self.in_ext == l)
                {
                    self.ext += 1;
                    self.in_ext = 0;
                }
                let Some(&(o, l)) = self.extents.get(self.ext) else {
                    return;
                };
                let off = o + self.in_ext;
                let g = self.grain;
                let c = off / g;
                if self.cur.as_ref().is_none_or(|(i, _)| *i != c) {
                    self.finish_chunk();
                    self.cur = Some((c, Sha256::new()));
                }
                let len = (o + l).min((c + 1) * g) - off;
                if let Some((_, h)) = &mut self.cur {
                    h.update(off.to_le_bytes());
                    h.update(len.to_le_bytes());
                }
                self.part_left = len;
            }
            let n = (self.part_left as usize).min(bytes.len());
            if let Some((_, h)) = &mut self.cur {
                h.update(&bytes[..n]);
            }
            self.part_left -= n as u64;
            self.in_ext += n as u64;
            bytes = &bytes[n..];
        }
    }

    fn finish_chunk(&mut self) {
        if let Some((i, h)) = self.cur.take() {
            if let Some(slot) = self.out.get_mut(i as usize) {
                *slot = hex::encode(&h.finalize()[..16]);
            }
        }
    }

    /// The digests, one per chunk.
    pub fn finish(mut self) -> Vec<String> {
        self.finish_chunk();
        self.out
    }
}

/// A reader that feeds a [`ChunkHasher`] with what passes through it.
pub struct Chunking<'a, R> {
    /// The data.
    pub inner: R,
    /// The hasher.
    pub hash: &'a mut ChunkHasher,
}

impl<R: Read> Read for Chunking<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// `extents` cut to the chunks `chunks` (sorted) of a file of `size` bytes: the data a delta
/// member stores.
pub fn extents_in(extents: &[(u64, u64)], chunks: &[u64], size: u64) -> Vec<(u64, u64)> {
    let g = grain(size);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let (lo, hi) = (c * g, ((c + 1) * g).min(size));
        for &(o, l) in extents {
            let (a, b) = (o.max(lo), (o + l).min(hi));
            if a < b {
                match out.last_mut() {
                    Some((po, pl)) if *po + *pl == a => *pl += b - a,
                    _ => out.push((a, b - a)),
                }
            }
        }
    }
    out
}

/// What [`plan`] decided for a changed file: store these chunks of it.
pub struct Plan {
    /// The member to store: the file's record with only the changed chunks' extents.
    pub member: Member,
    /// The changed chunks.
    pub chunks: Vec<u64>,
    /// The file's chunk digests.
    pub digests: Vec<String>,
    /// The file's data digest.
    pub data_sha256: String,
}

/// Reads the file `f` (record `m`) and compares its chunk digests with the base entry's:
/// `Some` when storing only the changed chunks saves at least half of its data bytes.
pub fn plan(base: &Entry, m: &Member, f: &File) -> io::Result<Option<Plan>> {
    let Some(old) = &base.chunks else {
        return Ok(None);
    };
    let base_size = base.change.as_ref().map_or(0, |c| c.size);
    if m.data_len() == 0 || grain(base_size) != grain(m.size) {
        return Ok(None);
    }
    let mut ch = ChunkHasher::new(m.size, &m.extents);
    let mut d = Digester::new(m, manifest::VERSION);
    let mut buf = vec![0u8; 1 << 20];
    for &(off, len) in &m.extents {
        let mut done = 0u64;
        while done < len {
            let k = ((len - done) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..k], off + done)?;
            super::tick();
            ch.update(&buf[..k]);
            d.update(&buf[..k]);
            done += k as u64;
        }
    }
    let digests = ch.finish();
    let chunks: Vec<u64> = (0..digests.len() as u64)
        .filter(|&i| old.get(i as usize) != Some(&digests[i as usize]))
        .collect();
    let member = Member {
        extents: extents_in(&m.extents, &chunks, m.size),
        ..m.clone()
    };
    if member.data_len().saturating_mul(2) > m.data_len() {
        return Ok(None);
    }
    let Some(data_sha256) = d.finish().1 else {
        return Ok(None);
    };
    Ok(Some(Plan {
        member,
        chunks,
        digests,
        data_sha256,
    }))
}

fn corrupt(m: String) -> BackupError {
    BackupError::Corrupt(m)
}

/// Checks a delta member `dm` against its entry before anything is written: the record is
/// a file's, the chunks are sorted, unique and inside the file, and the member's size and
/// extents are exactly the record's cut to those chunks (so nothing outside the file, no
/// overlap, nothing the manifest does not list).
pub fn check(dm: &Member, record: &Member, delta: &Delta) -> Result<(), BackupError> {
    let p = &record.path;
    if record.kind != Kind::File || dm.kind != Kind::File || dm.path != *p {
        return Err(corrupt(format!("{p:?}: a delta of something not a file")));
    }
    let n = chunk_count(record.size);
    if delta.chunks.windows(2).any(|w| w[0] >= w[1]) || delta.chunks.iter().any(|&c| c >= n) {
        return Err(corrupt(format!(
            "{p:?}: the changed chunks are out of order, repeated or outside the file"
        )));
    }
    let mut sorted = true;
    let mut end = 0u64;
    for &(o, l) in &record.extents {
        sorted &= l > 0 && o >= end;
        end = o.saturating_add(l);
    }
    if !sorted || end > record.size {
        return Err(corrupt(format!(
            "{p:?}: its extents overlap or lie outside the file"
        )));
    }
    if dm.size != record.size
        || dm.extents != extents_in(&record.extents, &delta.chunks, record.size)
    {
        return Err(corrupt(format!(
            "{p:?}: the stored extents are not the changed chunks of the file"
        )));
    }
    Ok(())
}

/// Applies a delta to `f` (the base's file, already in place under the entry's name): the
/// size set, each changed chunk made a hole, the member's extents written from `data`.
/// Returns the member's digest (of `dm`, layout `version`).
pub fn write(
    f: &File,
    dm: &Member,
    delta: &Delta,
    data: &mut dyn Read,
    version: u32,
    path: &str,
) -> Result<String, BackupError> {
    let io = |e: io::Error| BackupError::io(path, e);
    f.set_len(dm.size).map_err(io)?;
    let g = grain(dm.size);
    for &c in &delta.chunks {
        let (lo, hi) = (c * g, ((c + 1) * g).min(dm.size));
        punch(f, lo, hi - lo).map_err(io)?;
    }
    let mut hash = Digester::new(dm, version);
    let mut buf = vec![0u8; 1 << 20];
    for &(off, len) in &dm.extents {
        let mut done = 0u64;
        while done < len {
            let k = ((len - done) as usize).min(buf.len());
            data.read_exact(&mut buf[..k]).map_err(BackupError::Read)?;
            hash.update(&buf[..k]);
            f.write_all_at(&buf[..k], off + done).map_err(io)?;
            done += k as u64;
        }
    }
    Ok(hash.finish().0)
}

/// Makes `[off, off+len)` of `f` a hole (zeros where the filesystem cannot punch).
fn punch(f: &File, off: u64, len: u64) -> io::Result<()> {
    use rustix::fs::FallocateFlags as F;
    match rustix::fs::fallocate(f.as_fd(), F::PUNCH_HOLE | F::KEEP_SIZE, off, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let k = ((len - done) as usize).min(zeros.len());
                f.write_all_at(&zeros[..k], off + done)?;
                done += k as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The data digest of `f` over the record's extents, after checking that every byte outside
/// them reads as zero (a base's data left where the file now has a hole would otherwise go
/// unnoticed).
pub fn verify(f: &File, record: &Member, path: &str) -> Result<String, BackupError> {
    let io = |e: io::Error| BackupError::io(path, e);
    let len = f.metadata().map_err(io)?.len();
    if len != record.size {
        return Err(corrupt(format!("{path:?}: rebuilt with the wrong size")));
    }
    let mut buf = vec![0u8; 1 << 20];
    // The gaps between the extents (and after the last): zeros only.
    let mut gaps = Vec::new();
    let mut at = 0u64;
    for &(o, l) in &record.extents {
        if o > at {
            gaps.push((at, o));
        }
        at = o + l;
    }
    if record.size > at {
        gaps.push((at, record.size));
    }
    for (lo, hi) in gaps {
        let mut pos = lo;
        while pos < hi {
            let data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(io(e.into())),
            };
            if data >= hi {
                break;
            }
            let k = ((hi - data) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..k], data).map_err(io)?;
            if buf[..k].iter().any(|b| *b != 0) {
                return Err(corrupt(format!(
                    "{path:?}: rebuilt from its base with data where the file has a hole"
                )));
            }
            pos = data + k as u64;
        }
    }
    let mut d = Digester::new(record, manifest::VERSION);
    for &(off, len) in &record.extents {
        let mut done = 0u64;
        while done < len {
            let k = ((len - done) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..k], off + done).map_err(io)?;
            d.update(&buf[..k]);
            done += k as u64;
        }
    }
    d.finish()
        .1
        .ok_or_else(|| BackupError::Internal("a file without a data digest".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(size: u64, extents: &[(u64, u64)], data: &[u8], piece: usize) -> Vec<String> {
        let mut h = ChunkHasher::new(size, extents);
        for c in data.chunks(piece) {
            h.update(c);
        }
        h.finish()
    }

    const CHUNK: u64 = MIN_CHUNK;

    #[test]
    fn the_grain_is_64_kib_up_to_4_gib_then_keeps_65536_chunks() {
        assert_eq!(grain(0), MIN_CHUNK);
        assert_eq!(grain(4 << 30), MIN_CHUNK);
        assert_eq!(grain((4 << 30) + 1), 2 * MIN_CHUNK);
        assert_eq!(chunk_count(1 << 40), MAX_CHUNKS);
        assert!(chunk_count(u64::MAX) <= MAX_CHUNKS);
    }

    #[test]
    fn chunk_digests_do_not_depend_on_how_the_bytes_arrive_and_see_holes() {
        let size = 3 * CHUNK + 100;
        let ext = [(10, CHUNK), (2 * CHUNK + 5, CHUNK + 90)];
        let data: Vec<u8> = (0..(2 * CHUNK + 90)).map(|i| (i * 7 % 251) as u8).collect();
        let a = digests(size, &ext, &data, 1 << 17);
        assert_eq!(a.len(), 4);
        assert_eq!(a, digests(size, &ext, &data, 4097));
        assert_eq!(a, digests(size, &ext, &data, 1));
        assert!(a.iter().all(|d| d.len() == 32), "{a:?}");
        // One byte changed: only its chunk.
        let mut d2 = data.clone();
        d2[CHUNK as usize + 3] ^= 1;
        let b = digests(size, &ext, &d2, 65536);
        let diff: Vec<usize> = (0..4).filter(|&i| a[i] != b[i]).collect();
        assert_eq!(diff, vec![2]);
        // The same bytes moved by one (a hole grew): chunk 0 differs.
        let ext2 = [(11, CHUNK), (2 * CHUNK + 5, CHUNK + 90)];
        let c = digests(size, &ext2, &data, 65536);
        assert_ne!(a[0], c[0]);
        // A chunk without data.
        let e = digests(3 * CHUNK, &[(0, 10)], &[1; 10], 3);
        assert_eq!(e[1], "");
        assert_eq!(e[2], "");
    }

    #[test]
    fn crafted_deltas_are_refused_before_anything_is_written() {
        let rec = Member {
            path: "f".into(),
            kind: Kind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            atime: (0, 0),
            target: None,
            rdev: None,
            xattrs: Vec::new(),
            size: 4 * CHUNK,
            extents: vec![(0, 4 * CHUNK)],
        };
        let delta = |chunks: Vec<u64>| Delta {
            from: "f".into(),
            base_sha256: String::new(),
            chunks,
            member_sha256: String::new(),
        };
        let dm = |extents: Vec<(u64, u64)>| Member {
            extents,
            ..rec.clone()
        };
        let good = dm(vec![(CHUNK, CHUNK), (3 * CHUNK, CHUNK)]);
        check(&good, &rec, &delta(vec![1, 3])).unwrap();
        let refused = |dm: &Member, rec: &Member, d: &Delta, why: &str| {
            let e = check(dm, rec, d).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        };
        // Chunks outside the file, repeated, out of order.
        refused(&good, &rec, &delta(vec![1, 4]), "outside the file");
        refused(&good, &rec, &delta(vec![1, 1, 3]), "repeated");
        refused(&good, &rec, &delta(vec![3, 1]), "out of order");
        // Stored extents outside the listed chunks, or overlapping, or past the end.
        let d13 = delta(vec![1, 3]);
        refused(
            &dm(vec![(0, 2 * CHUNK), (3 * CHUNK, CHUNK)]),
            &rec,
            &d13,
            "not the changed",
        );
        refused(
            &dm(vec![(CHUNK, CHUNK), (CHUNK + 5, 10), (3 * CHUNK, CHUNK)]),
            &rec,
            &d13,
            "not the changed",
        );
        refused(
            &dm(vec![(CHUNK, CHUNK), (3 * CHUNK, CHUNK + 1)]),
            &rec,
            &d13,
            "not the changed",
        );
        // A record whose own extents overlap or pass its size.
        let overlapping = Member {
            extents: vec![(0, 2 * CHUNK), (CHUNK, CHUNK)],
            ..rec.clone()
        };
        refused(&good, &overlapping, &d13, "overlap");
        let past = Member {
            extents: vec![(0, 5 * CHUNK)],
            ..rec.clone()
        };
        refused(&good, &past, &d13, "outside the file");
        // A size that differs from the record's.
        refused(
            &Member {
                size: 5 * CHUNK,
                ..good.clone()
            },
            &rec,
            &d13,
            "not the changed",
        );
    }

    #[test]
    fn extents_are_cut_to_chunks() {
        let ext = [(0, 3 * CHUNK), (4 * CHUNK + 1, 10)];
        assert_eq!(
            extents_in(&ext, &[1, 2, 4], 5 * CHUNK),
            vec![(CHUNK, 2 * CHUNK), (4 * CHUNK + 1, 10)]
        );
        assert_eq!(extents_in(&ext, &[3], 5 * CHUNK), vec![]);
    }
}

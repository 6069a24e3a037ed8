//! In-process model test of the data path (issue 10): the volume's content operations on real
//! backing files against byte vectors, fast enough for 100 000+ operations per CI run.
//!
//! * Every size 0..=8200, written in one to three pieces, reads back and has the backing
//!   length of its layout (v3, what `cmkfs init` makes, and v2).
//! * Random operations on four files of up to 2 MiB: write, append, overwrite, O_TRUNC
//!   rewrite, truncate up and down (sizes biased to 4096·k + 1..15), punch hole, zero range,
//!   fallocate (with and without KEEP_SIZE), copy_file_range (between and within files).
//!   Contents are random, or chosen to be what format v1 stored as an all-zero tail (its
//!   keystream for the file's last unit), the special value of the bug. Also the states a
//!   crash may leave (a shrink without its scrub, garbage in the filler), after which no
//!   operation may show those bytes.
//! * After every operation: the size (from the backing length alone, as `stat` sees it) and
//!   the touched range (its edges when long); every 5000 operations: every file in full.
//!   Single and double
//!   encryption, 4096- and 512-byte units, both layouts (v3: data at 4096; v2: at 32).
//!
//! Seed: printed; `CMKFS_TEST_SEED` replays it. `CMKFS_CONTENT_OPS` sets the operation count
//! (default 100 000 in all).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use cmkfs::crypto::{Dek, VolumeKeys};
use cmkfs::engine::SectorEngine;
use cmkfs::volume::content::{self, Ctx, FileState};
use cmkfs::volume::layout::{self, Layout};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MAX_SIZE: usize = 2 << 20;

fn seed() -> u64 {
    let seed = match std::env::var("CMKFS_TEST_SEED") {
        Ok(v) => v.parse().expect("CMKFS_TEST_SEED is a u64"),
        Err(_) => {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).unwrap();
            u64::from_le_bytes(b)
        }
    };
    eprintln!("content model: seed = {seed} (replay with CMKFS_TEST_SEED={seed})");
    seed
}

fn total_ops() -> usize {
    std::env::var("CMKFS_CONTENT_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

struct Slot {
    file: File,
    st: FileState,
    model: Vec<u8>,
}

struct World {
    _dir: tempfile::TempDir,
    keys: VolumeKeys,
    engine: SectorEngine,
    unit: u64,
    lay: Layout,
    slots: Vec<Slot>,
    log: VecDeque<String>,
    seed: u64,
    /// Writes so far (every other one through `write_mut`).
    writes: u64,
}

impl World {
    fn new(lay: Layout, unit: u64, double: bool, files: usize, seed: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let inner = Dek::generate().unwrap();
        let keys = VolumeKeys::from_deks(
            &Dek::generate().unwrap(),
            double.then_some(&inner),
            unit as usize,
        )
        .unwrap();
        let slots = (0..files)
            .map(|i| Slot {
                file: OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(dir.path().join(format!("f{i}")))
                    .unwrap(),
                st: FileState::default(),
                model: Vec::new(),
            })
            .collect();
        World {
            _dir: dir,
            keys,
            engine: SectorEngine::new(2).unwrap(),
            unit,
            lay,
            slots,
            log: VecDeque::new(),
            seed,
            writes: 0,
        }
    }

    fn cx(&self) -> Ctx<'_> {
        Ctx {
            keys: &self.keys,
            engine: &self.engine,
            sector: self.unit,
            layout: self.lay,
        }
    }

    fn note(&mut self, s: String) {
        if self.log.len() == 20 {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }

    #[track_caller]
    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} (unit {}, double {}, {:?}): {what}\nlast operations:\n  {}",
            self.seed,
            self.unit,
            self.keys.inner.is_some(),
            self.lay,
            self.log.iter().cloned().collect::<Vec<_>>().join("\n  ")
        );
    }

    fn read(&self, i: usize, off: u64, len: usize) -> Vec<u8> {
        let s = &self.slots[i];
        content::read(&s.file, &s.st, &self.cx(), off, len)
            .unwrap_or_else(|e| self.fail(format!("read f{i} {off}+{len}: {e}")))
    }

    /// Every other write goes through `write_mut` (as a FUSE WRITE does: whole units
    /// encrypted in place in the request's buffer), on a copy whose plaintext must be gone
    /// afterwards: each AES block of it zeros or not the plaintext.
    fn write(&mut self, i: usize, off: u64, data: &[u8]) {
        let s = &self.slots[i];
        self.writes += 1;
        if self.writes.is_multiple_of(2) {
            content::write(&s.file, &s.st, &self.cx(), off, data)
                .unwrap_or_else(|e| self.fail(format!("write f{i} {off}+{}: {e}", data.len())));
        } else {
            let mut buf = data.to_vec();
            let n = content::write_mut(&s.file, &s.st, &self.cx(), off, &mut buf)
                .unwrap_or_else(|e| self.fail(format!("write_mut f{i} {off}+{}: {e}", data.len())));
            if n != data.len() {
                self.fail(format!("write_mut f{i} {off}+{}: wrote {n}", data.len()));
            }
            // Block by block near the ends (the partial units, copied out and wiped), a
            // unit-sized step in between (units encrypted in place): cheap in a debug build.
            let edge = 2 * self.unit as usize;
            let mut at = 0usize;
            while at < data.len() {
                let step = if at < edge || at + edge >= data.len() {
                    16
                } else {
                    self.unit as usize
                };
                let next =
                    ((off as usize + at) / step * step + step - off as usize).min(data.len());
                let (b, d) = (&buf[at..next], &data[at..next]);
                if b == d && d.iter().any(|x| *x != 0) {
                    self.fail(format!(
                        "write_mut f{i} {off}+{}: plaintext left in the buffer at {at}..{next}",
                        data.len()
                    ));
                }
                at = next;
            }
        }
        let m = &mut self.slots[i].model;
        let end = off as usize + data.len();
        resize(m, end.max(m.len()));
        m[off as usize..end].copy_from_slice(data);
    }

    fn truncate(&mut self, i: usize, n: u64) {
        let s = &self.slots[i];
        content::truncate(&s.file, &s.st, &self.cx(), n)
            .unwrap_or_else(|e| self.fail(format!("truncate f{i} {n}: {e}")));
        resize(&mut self.slots[i].model, n as usize);
    }

    fn fallocate(&mut self, i: usize, mode: i32, off: u64, len: u64) {
        let s = &self.slots[i];
        content::fallocate(&s.file, &s.st, &self.cx(), mode, off, len)
            .unwrap_or_else(|e| self.fail(format!("fallocate f{i} {mode:#x} {off}+{len}: {e}")));
        let m = &mut self.slots[i].model;
        let end = (off + len) as usize;
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && m.len() < end {
            resize(m, end);
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            let stop = end.min(m.len());
            if (off as usize) < stop {
                m[off as usize..stop].fill(0);
            }
        }
    }

    /// Size as `stat` sees it, and the bytes around `[a, b)`: all of it when short, else
    /// both edges (the full checks every few thousand operations cover the middle).
    fn check_op(&self, i: usize, a: usize, b: usize) {
        const EDGE: usize = 8200;
        if b - a <= 2 * EDGE {
            return self.check(i, a, b);
        }
        self.check(i, a, a + EDGE);
        self.check(i, b - EDGE, b);
    }

    /// Size as `stat` sees it (backing length only) and the range `[a, b)` against the model.
    fn check(&self, i: usize, a: usize, b: usize) {
        let m = &self.slots[i].model;
        let len = self.slots[i].file.metadata().unwrap().len();
        let size = self
            .lay
            .logical_size(len)
            .unwrap_or_else(|e| self.fail(format!("f{i}: backing length {len}: {e}")));
        if size != m.len() as u64 {
            self.fail(format!("f{i}: size {size}, model {}", m.len()));
        }
        if len != 0 && len != self.lay.backing_len(size) {
            self.fail(format!("f{i}: backing length {len} for size {size}"));
        }
        let (a, b) = (a.min(m.len()), b.min(m.len()));
        if a < b {
            let got = self.read(i, a as u64, b - a);
            if got != m[a..b] {
                let first = got.iter().zip(&m[a..b]).position(|(x, y)| x != y);
                self.fail(format!(
                    "f{i}: bytes {a}..{b} differ (first at +{first:?}, size {})",
                    m.len()
                ));
            }
        }
    }

    fn check_all(&self) {
        for i in 0..self.slots.len() {
            self.check(i, 0, usize::MAX);
        }
    }

    /// The bytes format v1 stored as all zeros at the tail of a file ending at `end`: its
    /// v1 keystream (outer layer; inner undone) for that unit, or random when no header yet.
    fn v1_zero_maker(&self, i: usize, end: usize, len: usize) -> Option<Vec<u8>> {
        let r = end % self.unit as usize;
        if r == 0 || r >= 16 || len < r {
            return None;
        }
        let mut h = [0u8; layout::FILE_HEADER_LEN];
        self.slots[i].file.read_exact_at(&mut h, 0).ok()?;
        let h = layout::FileHeader::decode(&h).ok()?;
        let t = h.tweak().wrapping_add((end as u64 / self.unit) as u128);
        let mut k = vec![0u8; r];
        self.keys.xts.encrypt_unit(t, &mut k).ok()?;
        if let Some(inner) = &self.keys.inner {
            inner.decrypt_unit(t, &mut k).ok()?;
        }
        Some(k)
    }
}

/// `Vec::resize` without the byte-at-a-time loop of an unoptimized build.
fn resize(v: &mut Vec<u8>, n: usize) {
    if n <= v.len() {
        v.truncate(n);
    } else {
        v.extend_from_slice(&vec![0u8; n - v.len()]);
    }
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// A size biased to the edges that matter: 4096·k + 1..15, block and unit boundaries.
fn pick_size(rng: &mut StdRng, unit: usize, max: usize) -> usize {
    let n = match rng.gen_range(0..10) {
        0..=3 => rng.gen_range(0..8) * unit + rng.gen_range(1..16),
        4 => rng.gen_range(0..8) * unit,
        5 => rng.gen_range(0..=8200),
        6 => rng.gen_range(0..64) * 16 + rng.gen_range(0..2),
        7 => rng.gen_range(0..max),
        _ => rng.gen_range(0..3 * unit),
    };
    n.min(max)
}

fn pick_len(rng: &mut StdRng, unit: usize) -> usize {
    match rng.gen_range(0..20) {
        0..=9 => rng.gen_range(1..16),
        10..=14 => rng.gen_range(1..=8200),
        15..=17 => rng.gen_range(1..3 * unit),
        18 => unit,
        _ => rng.gen_range(1..256 * 1024),
    }
}

fn random_ops(w: &mut World, rng: &mut StdRng, ops: usize) {
    let unit = w.unit as usize;
    for step in 0..ops {
        let i = rng.gen_range(0..w.slots.len());
        let size = w.slots[i].model.len();
        let (a, b);
        match rng.gen_range(0..100) {
            // write anywhere (often past the end), append, overwrite inside
            0..=44 => {
                let len = pick_len(rng, unit);
                let off = match rng.gen_range(0..3) {
                    0 => size,
                    1 if size > 0 => rng.gen_range(0..size),
                    _ => pick_size(rng, unit, MAX_SIZE),
                }
                .min(MAX_SIZE - len);
                let end = off + len;
                let data: Vec<u8> = match w.v1_zero_maker(i, end, len) {
                    Some(k) if rng.gen_ratio(1, 2) => {
                        let mut d = random_bytes(rng, len);
                        d[len - k.len()..].copy_from_slice(&k);
                        d
                    }
                    _ => random_bytes(rng, len),
                };
                w.note(format!("{step}: write f{i} {off}+{len} (size {size})"));
                w.write(i, off as u64, &data);
                (a, b) = (off.saturating_sub(20), end + 20);
            }
            // O_TRUNC rewrite
            45..=49 => {
                let len = pick_size(rng, unit, 64 * 1024);
                let data = random_bytes(rng, len);
                w.note(format!("{step}: rewrite f{i} {len}"));
                w.truncate(i, 0);
                if len > 0 {
                    w.write(i, 0, &data);
                }
                (a, b) = (0, len);
            }
            // What a crash may leave: a shrink without its scrub (stale plaintext in the
            // padding of the last block), or garbage in the filler. Both are unspecified
            // bytes that no later operation may show.
            50..=52 if size > 0 => {
                let len = w.slots[i].file.metadata().unwrap().len();
                if rng.gen_ratio(1, 2) {
                    let n = rng.gen_range(0..size).max(1);
                    w.note(format!("{step}: bare set_len f{i} {size} -> {n}"));
                    w.slots[i]
                        .file
                        .set_len(w.lay.backing_len(n as u64))
                        .unwrap();
                    resize(&mut w.slots[i].model, n);
                    (a, b) = (n.saturating_sub(40), n);
                } else {
                    let filler = layout::filler_len(size as u64) as usize;
                    let junk = random_bytes(rng, filler);
                    w.note(format!("{step}: garbage filler f{i} ({filler} bytes)"));
                    w.slots[i]
                        .file
                        .write_all_at(&junk, len - filler as u64)
                        .unwrap();
                    (a, b) = (size.saturating_sub(40), size);
                }
            }
            // truncate up or down
            50..=69 => {
                let n = pick_size(rng, unit, MAX_SIZE);
                w.note(format!("{step}: truncate f{i} {size} -> {n}"));
                w.truncate(i, n as u64);
                (a, b) = (n.min(size).saturating_sub(40), n.max(size) + 40);
            }
            // punch, zero range, allocate
            70..=84 => {
                let off = if size > 0 && rng.gen_ratio(3, 4) {
                    rng.gen_range(0..size)
                } else {
                    pick_size(rng, unit, MAX_SIZE)
                };
                let len = pick_len(rng, unit).min(MAX_SIZE - off).max(1);
                let mode = [
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_ZERO_RANGE,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    libc::FALLOC_FL_KEEP_SIZE,
                ][rng.gen_range(0..5)];
                // A range that reaches the end of file exactly: the last unit is whole.
                let len = if size > off && rng.gen_ratio(1, 4) {
                    size - off
                } else {
                    len
                };
                w.note(format!(
                    "{step}: fallocate f{i} {mode:#x} {off}+{len} (size {size})"
                ));
                w.fallocate(i, mode, off as u64, len as u64);
                (a, b) = (off.saturating_sub(20), off + len + 20);
            }
            // copy_file_range: read the source range, write it (as Volume::copy_range does)
            _ => {
                let j = rng.gen_range(0..w.slots.len());
                let src = w.slots[j].model.len();
                if src == 0 {
                    continue;
                }
                let off_in = rng.gen_range(0..src);
                let len = pick_len(rng, unit).min(src - off_in);
                let off_out = match rng.gen_range(0..3) {
                    0 => size,
                    1 if size > 0 => rng.gen_range(0..size),
                    _ => pick_size(rng, unit, MAX_SIZE),
                }
                .min(MAX_SIZE - len);
                w.note(format!(
                    "{step}: copy f{j} {off_in}+{len} -> f{i} {off_out} (sizes {src}, {size})"
                ));
                let data = w.read(j, off_in as u64, len);
                if data != w.slots[j].model[off_in..off_in + len] {
                    w.fail(format!("copy source f{j} {off_in}+{len} reads wrong"));
                }
                w.write(i, off_out as u64, &data);
                (a, b) = (off_out.saturating_sub(20), off_out + len + 20);
            }
        }
        w.check_op(i, a, b.max(a));
        if step % 5000 == 4999 {
            w.check_all();
        }
    }
    w.check_all();
}

#[test]
fn every_size_up_to_8200_round_trips_with_the_backing_length() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for (lay, double) in [(Layout::V3, false), (Layout::V2, true)] {
        let mut w = World::new(lay, 4096, double, 1, seed);
        for n in 0..=8200usize {
            let data = random_bytes(&mut rng, n);
            w.note(format!("size {n}"));
            w.truncate(0, 0);
            // One to three pieces: the size is reached by a write, appends, or a truncate
            // up followed by writes.
            let cuts = {
                let mut c: Vec<usize> = (0..rng.gen_range(0..3))
                    .map(|_| rng.gen_range(0..=n))
                    .collect();
                c.sort();
                c
            };
            if rng.gen_ratio(1, 4) {
                w.truncate(0, n as u64);
            }
            let mut at = 0;
            for c in cuts.into_iter().chain([n]) {
                if c > at {
                    w.write(0, at as u64, &data[at..c]);
                    at = c;
                }
            }
            w.check(0, 0, n);
        }
    }
}

#[test]
fn random_operations_match_the_model() {
    let seed = seed();
    let ops = total_ops();
    // Most operations on the format's real shape (v3, 4096-byte units); some on v2 volumes,
    // small units (more unit edges) and double encryption.
    let plan = [
        (Layout::V3, 4096u64, false, ops * 4 / 10),
        (Layout::V2, 4096, false, ops * 2 / 10),
        (Layout::V3, 4096, true, ops * 2 / 10),
        (Layout::V2, 512, false, ops * 2 / 10),
    ];
    let started = std::time::Instant::now();
    for (k, (lay, unit, double, n)) in plan.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(k as u64));
        let mut w = World::new(lay, unit, double, 4, seed);
        random_ops(&mut w, &mut rng, n);
    }
    eprintln!(
        "{ops} operations in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

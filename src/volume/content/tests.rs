//! Unit tests of the content rules (the model test is tests/suite/content_model.rs).

use super::cipher::encrypt;
use super::write::{lower_progress, Src};
use super::*;
use crate::crypto::Dek;
use crate::volume::direct;
use crate::volume::layout::{units_end, BLOCK};
use rand::{Rng, SeedableRng};

struct Fixture {
    _dir: tempfile::TempDir,
    file: File,
    st: FileState,
    keys: VolumeKeys,
    engine: SectorEngine,
    sector: u64,
    lay: Layout,
}

/// A file of a v3 volume (what `cmkfs init` makes).
fn fixture_keys(sector: u64, threads: usize, double: bool) -> Fixture {
    fixture_in(Layout::V3, sector, threads, double)
}

fn fixture_in(lay: Layout, sector: u64, threads: usize, double: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("f"))
        .unwrap();
    let inner = Dek::generate().unwrap();
    let keys = VolumeKeys::from_deks(
        &Dek::generate().unwrap(),
        double.then_some(&inner),
        sector as usize,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        file,
        st: FileState::default(),
        keys,
        engine: SectorEngine::new(threads).unwrap(),
        sector,
        lay,
    }
}

fn fixture(sector: u64, threads: usize) -> Fixture {
    fixture_keys(sector, threads, false)
}

impl Fixture {
    fn cx(&self) -> Ctx<'_> {
        Ctx {
            keys: &self.keys,
            engine: &self.engine,
            sector: self.sector,
            layout: self.lay,
        }
    }
    /// The data offset in the backing file.
    fn h(&self) -> usize {
        self.lay.data_offset as usize
    }
    fn all(&self) -> Vec<u8> {
        read(&self.file, &self.st, &self.cx(), 0, usize::MAX / 2).unwrap()
    }
    fn raw(&self) -> Vec<u8> {
        std::fs::read(self._dir.path().join("f")).unwrap()
    }
    fn write(&self, off: u64, data: &[u8]) {
        write(&self.file, &self.st, &self.cx(), off, data).unwrap();
    }
    /// [`write_mut`] of a copy of `data`, checking its promise: nothing of the plaintext
    /// left in the buffer (each block either zeros or not the plaintext's).
    fn write_mut(&self, off: u64, data: &[u8]) {
        let mut buf = data.to_vec();
        let n = write_mut(&self.file, &self.st, &self.cx(), off, &mut buf).unwrap();
        assert_eq!(n, data.len());
        assert_no_plaintext(off, data, &buf);
    }
    fn truncate(&self, n: u64) {
        truncate(&self.file, &self.st, &self.cx(), n).unwrap();
    }
    fn file_id(&self) -> FileHeader {
        FileHeader::decode(&self.raw()[..FILE_HEADER_LEN]).unwrap()
    }
}

/// Fails unless every AES block of the file that `buf` (written at `off`) covers is all
/// zeros or differs from the plaintext `data` it held; zeros in `data` are no evidence.
pub(super) fn assert_no_plaintext(off: u64, data: &[u8], buf: &[u8]) {
    let mut i = 0usize;
    while i < data.len() {
        let next = ((off + i as u64) / BLOCK * BLOCK + BLOCK - off) as usize;
        let j = next.min(data.len());
        let (b, d) = (&buf[i..j], &data[i..j]);
        assert!(
            b.iter().all(|x| *x == 0) || b != d || d.iter().all(|x| *x == 0),
            "plaintext left at {}..{} of a {}-byte write at {off}",
            i,
            j,
            data.len()
        );
        i = j;
    }
}

/// A short [`write_mut`] (the backing disk filled up midway) gives back, as the plaintext it
/// was, every byte it did not write, even those of the units it had encrypted in place (the
/// writeback cache's retry writes them again), and wipes what it wrote; a full one leaves
/// ciphertext in the middle and zeros beside it.
#[test]
fn a_short_write_mut_gives_back_the_plaintext_it_did_not_write() {
    for double in [false, true] {
        let fx = fixture_keys(4096, 1, double);
        let cx = fx.cx();
        let h = cx.layout.generate_header(cx.keys.generation).unwrap();
        // A write at 1000 of 5384 bytes: units 1..=3 whole, encrypted in place.
        let data: Vec<u8> = (0..15384 + 2000).map(|i| (i % 253) as u8 + 1).collect();
        let mid = 3096..15384;
        for n in [0, 100, 3096, 5000, 15384, 16000, data.len()] {
            let mut buf = data.clone();
            encrypt(&cx, &h, 1, &mut buf[mid.clone()]).unwrap();
            let got = Src::Mut(&mut buf)
                .give_back(&cx, &h, mid.clone(), 1, n)
                .unwrap();
            assert_eq!(got, n);
            if n == data.len() {
                assert!(buf[..mid.start].iter().all(|&b| b == 0));
                assert!(buf[mid.end..].iter().all(|&b| b == 0));
                assert_no_plaintext(1000, &data, &buf);
            } else {
                assert!(buf[..n].iter().all(|&b| b == 0), "n {n}");
                assert!(buf[n..] == data[n..], "n {n} double {double}");
            }
        }
    }
}

/// A write into a hole unit that reaches the disk only in part (ENOSPC after the first
/// page, or a power cut between the unit's two pages: in format v2, behind the 32-byte
/// header, a unit straddles two pages) leaves whole old (zero) and new blocks, never
/// garbage. Found by a hostile tester: the unfinished part decrypted to random bytes the
/// user never wrote.
#[test]
fn a_torn_write_into_a_hole_leaves_zeros_where_it_did_not_land() {
    for (lay, double) in [
        (Layout::V2, false),
        (Layout::V2, true),
        (Layout::V3, false),
        (Layout::V3, true),
    ] {
        let fx = fixture_in(lay, 4096, 1, double);
        fx.truncate(3 * 4096);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        // What a full write of unit 1 stores; then only a part of it reaches the disk.
        fx.write(4096, &data);
        let raw = fx.raw();
        let unit = fx.h() + 4096..fx.h() + 2 * 4096;
        // The backing page boundary inside unit 1 (v2); v3's unit 1 is one whole page.
        let page_end = 2 * 4096;
        for cut in [page_end, fx.h() + 4096 + 16, fx.h() + 4096 + 4080] {
            if !unit.contains(&cut) {
                continue;
            }
            let mut torn = raw.clone();
            torn[cut..unit.end].fill(0);
            std::fs::write(fx._dir.path().join("f"), &torn).unwrap();
            let got = fx.all();
            assert_eq!(got.len(), 3 * 4096, "cut {cut}");
            let landed = cut - unit.start;
            assert_eq!(
                &got[4096..4096 + landed],
                &data[..landed],
                "cut {cut} double {double}"
            );
            assert!(
                got[4096 + landed..].iter().all(|&b| b == 0),
                "cut {cut} double {double}: bytes the write never stored must read as zeros"
            );
            assert!(got[..4096].iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn random_writes_and_truncates_match_a_model() {
    for (seed, sector, double, lay) in [
        (1u64, 512u64, false, Layout::V3),
        (2, 512, true, Layout::V2),
        (3, 4096, false, Layout::V3),
        (4, 4096, true, Layout::V3),
        (5, 1024, false, Layout::V2),
        (6, 4096, false, Layout::V2),
    ] {
        let fx = fixture_in(lay, sector, 2, double);
        let mut model: Vec<u8> = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for step in 0..400 {
            let max = (sector * 6) as usize;
            if rng.gen_ratio(1, 5) {
                let n = rng.gen_range(0..max);
                fx.truncate(n as u64);
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
                if rng.gen() {
                    fx.write(off as u64, &data);
                } else {
                    fx.write_mut(off as u64, &data);
                }
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&data);
            }
            let got = fx.all();
            assert_eq!(got.len(), model.len(), "seed {seed} step {step}: size");
            assert!(got == model, "seed {seed} step {step}: contents differ");
            let backing = fx.file.metadata().unwrap().len();
            assert!(
                backing == fx.lay.backing_len(model.len() as u64)
                    || (model.is_empty() && backing == 0),
                "seed {seed} step {step}: backing length {backing} for size {}",
                model.len()
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
fn large_reads_decrypt_where_the_direct_read_put_the_units() {
    // Units at every alignment in the direct buffer (sector 512: the units of a request
    // start at any multiple of 512, plus the 32-byte header), holes, the last partial
    // unit, both layers; the backing file's page cache dropped so the disk is read.
    for (seed, sector, double, lay) in [
        (1u64, 512u64, false, Layout::V3),
        (2, 4096, true, Layout::V3),
        (3, 1024, false, Layout::V2),
        (4, 4096, false, Layout::V2),
    ] {
        let fx = fixture_in(lay, sector, 2, double);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let size = (700 << 10) + rng.gen_range(1..16);
        let mut model: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
        fx.write(0, &model);
        // A hole of whole units in the middle.
        let hole = 200 * 1024..(300 << 10);
        fallocate(
            &fx.file,
            &fx.st,
            &fx.cx(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            hole.start as u64,
            (hole.end - hole.start) as u64,
        )
        .unwrap();
        model[hole].fill(0);
        let before = direct::direct_reads();
        for i in 0..24 {
            if i % 3 == 0 {
                fx.file.sync_data().unwrap();
                rustix::fs::fadvise(&fx.file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            }
            let off = rng.gen_range(0..size - 1000);
            let len = rng.gen_range(direct::DIRECT_MIN..(1 << 20) + 8192);
            let got = read(&fx.file, &fx.st, &fx.cx(), off as u64, len).unwrap();
            let stop = (off + len).min(size);
            assert!(got == model[off..stop], "seed {seed} read {i}: {off}+{len}");
        }
        assert!(fx.all() == model, "seed {seed}: whole file");
        // Skipped where the backing filesystem has no O_DIRECT (tmpfs before Linux 6.6).
        if fx.st.direct.get(&fx.file).is_some() {
            assert!(direct::direct_reads() > before, "seed {seed}: never direct");
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
        fx.write(0, &data);
        assert_eq!(fx.all(), data, "len {len}");
        let raw = fx.raw();
        assert_eq!(
            raw.len() as u64,
            fx.lay.backing_len(len as u64),
            "len {len}"
        );
        assert_ne!(raw[fx.h()..][..len], data[..], "len {len}: in the clear");
    }
}

/// The v1 keystream of a short tail: what plaintext the old rule stored as all zeros.
fn v1_zero_making_tail(keys: &VolumeKeys, tweak: u128, r: usize) -> Vec<u8> {
    let mut k = vec![0u8; r];
    keys.xts.encrypt_unit(tweak, &mut k).unwrap();
    k
}

#[test]
fn contents_that_v1_stored_as_zeros_read_back() {
    // The deterministic form, for every tail length and in the first three units:
    // the plaintext the v1 stream rule turned into all-zero stored bytes (read back as a
    // hole) is ordinary data now.
    for r in 1..=15usize {
        for unit in 0..3u64 {
            let fx = fixture(4096, 1);
            let off = unit * 4096;
            fx.write(0, &vec![0x11; off as usize + r]);
            let h = fx.file_id();
            let k = v1_zero_making_tail(&fx.keys, h.tweak().wrapping_add(unit as u128), r);
            fx.write(off, &k);
            let all = fx.all();
            assert_eq!(&all[off as usize..], &k[..], "r {r} unit {unit}");
            let raw = fx.raw();
            let stored = &raw[fx.h() + off as usize..][..16];
            assert!(stored.iter().any(|b| *b != 0), "r {r} unit {unit}");
            // Appending after it keeps it (v1 re-encrypted the misread zeros).
            fx.write(off + r as u64, b"more");
            assert_eq!(&fx.all()[off as usize..][..r], &k[..], "r {r} unit {unit}");
        }
    }
}

#[test]
fn two_versions_of_a_tail_reveal_nothing_like_their_xor() {
    let fx = fixture(4096, 1);
    let (a, b) = (*b"secret", *b"public");
    fx.write(0, &a);
    let ca = fx.raw()[fx.h()..][..16].to_vec();
    fx.write(0, &b);
    let cb = fx.raw()[fx.h()..][..16].to_vec();
    let xc: Vec<u8> = ca.iter().zip(&cb).map(|(x, y)| x ^ y).collect();
    let xp: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
    assert_ne!(
        &xc[..6],
        &xp[..],
        "stored XOR equals plaintext XOR: a stream rule"
    );
    // A one-bit change of the plaintext changes about half of the stored block's bits.
    fx.write(0, b"secreu");
    let cc = fx.raw()[fx.h()..][..16].to_vec();
    let flipped: u32 = ca.iter().zip(&cc).map(|(x, y)| (x ^ y).count_ones()).sum();
    assert!(flipped > 20, "only {flipped} stored bits changed");
}

#[test]
fn a_flipped_stored_bit_garbles_a_whole_block() {
    for len in [6usize, 17, 4097, 5000] {
        let fx = fixture(4096, 1);
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        fx.write(0, &data);
        // Flip one bit of the last stored block that holds data.
        let at = fx.h() + (len - 1) / 16 * 16 + 3;
        let mut raw = fx.raw();
        raw[at] ^= 0x10;
        fx.file.write_all_at(&raw, 0).unwrap();
        let got = fx.all();
        let block = (len - 1) / 16 * 16;
        assert_eq!(
            got[..block],
            data[..block],
            "len {len}: other blocks intact"
        );
        let diff = got[block..]
            .iter()
            .zip(&data[block..])
            .filter(|(x, y)| x != y)
            .count();
        let live = len - block;
        assert!(
            diff + 2 >= live,
            "len {len}: only {diff} of {live} bytes of the block changed"
        );
    }
}

/// A shrink of a file a re-encryption has converted in part (attack session 15, F1):
/// the header's progress comes down to the new unit count before the length does, and
/// the state a crash can leave between the two (progress lowered, length not cut yet)
/// reads every kept byte right and the cut-off converted units as zeros, never as
/// garbage under the wrong DEK.
#[test]
fn a_shrink_during_a_reencryption_lowers_the_progress_before_the_length() {
    for lay in [Layout::V2, Layout::V3] {
        let fx = fixture_in(lay, 4096, 1, false);
        let sector = fx.sector;
        let old_dek = Dek::generate().unwrap();
        let old = VolumeKeys::from_dek(&old_dek, 4096).unwrap();
        let retiring =
            VolumeKeys::from_dek(&Dek::from_slice(old_dek.as_bytes()).unwrap(), 4096).unwrap();
        let new = VolumeKeys::from_dek(&Dek::generate().unwrap(), 4096)
            .unwrap()
            .with_generation(1, Some(retiring));
        let cx_of = |keys| Ctx {
            keys,
            engine: &fx.engine,
            sector,
            layout: lay,
        };
        let size = 10 * sector + 7;
        let plain: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        write(&fx.file, &fx.st, &cx_of(&old), 0, &plain).unwrap();
        // Units [0, 6) converted, as a batch leaves them: rewritten under the new DEK,
        // then the header's progress.
        let h = fx.file_id();
        assert_eq!(h.key_gen, 0);
        let part = FileHeader {
            reencrypted: 6,
            ..h
        };
        fx.file.write_all_at(&part.encode(), 0).unwrap();
        fx.st.set_cached_header(Some(part));
        let cx = cx_of(&new);
        write(&fx.file, &fx.st, &cx, 0, &plain[..6 * sector as usize]).unwrap();
        assert_eq!(
            read(&fx.file, &fx.st, &cx, 0, size as usize).unwrap(),
            plain
        );

        // The crash state between the lowered header and the cut.
        let cut = 2 * sector + 5;
        let lowered = lower_progress(&fx.file, &fx.st, &cx, part, size, cut).unwrap();
        assert_eq!((lowered.key_gen, lowered.reencrypted), (0, 3), "{lay:?}");
        assert_eq!(fx.file_id(), lowered, "{lay:?}: not on disk");
        let fresh = FileState::default();
        let got = read(&fx.file, &fresh, &cx, 0, size as usize).unwrap();
        assert_eq!(
            &got[..3 * sector as usize],
            &plain[..3 * sector as usize],
            "{lay:?}"
        );
        assert!(
            got[3 * sector as usize..6 * sector as usize]
                .iter()
                .all(|b| *b == 0),
            "{lay:?}: a cut-off converted unit reads as garbage"
        );
        assert_eq!(
            &got[6 * sector as usize..],
            &plain[6 * sector as usize..],
            "{lay:?}"
        );

        // The whole truncate, then a resumed conversion's view: progress within the file.
        truncate(&fx.file, &fx.st, &cx, cut).unwrap();
        assert_eq!(fx.file_id().reencrypted, 3, "{lay:?}");
        let got = read(&fx.file, &FileState::default(), &cx, 0, size as usize).unwrap();
        assert_eq!(got, &plain[..cut as usize], "{lay:?}");
        // A shrink that keeps every converted unit leaves the progress alone.
        truncate(&fx.file, &fx.st, &cx, 2 * sector + 1).unwrap();
        assert_eq!(fx.file_id().reencrypted, 3, "{lay:?}");
    }
}

#[test]
fn shrink_is_one_set_len_and_growth_reads_zeros() {
    let fx = fixture(4096, 1);
    let data: Vec<u8> = (0..10_000).map(|i| (i % 251 + 1) as u8).collect();
    fx.write(0, &data);
    for n in [9_999u64, 8_193, 8_192, 4_100, 33, 17, 5, 1] {
        fx.truncate(n);
        assert_eq!(fx.all(), data[..n as usize], "shrink to {n}");
        assert_eq!(fx.raw().len() as u64, fx.lay.backing_len(n));
        // Growth shows zeros, not the bytes that were cut off.
        fx.truncate(n + 20);
        let all = fx.all();
        assert_eq!(all[..n as usize], data[..n as usize]);
        assert!(all[n as usize..].iter().all(|b| *b == 0), "grow from {n}");
        fx.truncate(n);
    }
}

#[test]
fn filler_and_padding_are_never_read_as_data() {
    // Stale bytes in the padding or the filler (e.g. left by a crash between a shrink
    // and its scrub) must not show up when the file grows by any means.
    for (size, grow) in [
        (10u64, 12u64),
        (10, 5000),
        (4095, 4097),
        (4090, 9000),
        (17, 40),
    ] {
        for how in 0..3 {
            let fx = fixture(4096, 1);
            let data = vec![0xA5u8; size as usize];
            fx.write(0, &data);
            let mut raw = fx.raw();
            let data_end = raw.len();
            // Garbage in the filler (stale padding: see the next test).
            for b in &mut raw[fx.h() + units_end(size) as usize..data_end] {
                *b = 0xEE;
            }
            fx.file.write_all_at(&raw, 0).unwrap();
            assert_eq!(fx.all(), data);
            match how {
                0 => fx.truncate(grow),
                1 => fx.write(grow - 1, &[7]),
                _ => fallocate(&fx.file, &fx.st, &fx.cx(), 0, 0, grow).unwrap(),
            }
            let all = fx.all();
            assert_eq!(all.len() as u64, grow, "{size}->{grow} how {how}");
            assert_eq!(all[..size as usize], data[..], "{size}->{grow} how {how}");
            let end = if how == 1 { grow - 1 } else { grow } as usize;
            assert!(
                all[size as usize..end].iter().all(|b| *b == 0),
                "{size}->{grow} how {how}: growth does not read zeros"
            );
        }
    }
}

#[test]
fn stale_padding_after_a_bare_set_len_stays_invisible() {
    // A crash between a shrink's set_len and its scrub leaves stale plaintext in the
    // padding of the last block; growth still reads zeros there.
    let fx = fixture(4096, 1);
    fx.write(0, &[0x5A; 40]);
    fx.file.set_len(fx.lay.backing_len(20)).unwrap();
    assert_eq!(fx.all(), vec![0x5A; 20]);
    fx.write(25, b"x");
    let all = fx.all();
    assert_eq!(all[..20], [0x5A; 20]);
    assert_eq!(all[20..25], [0; 5]);
    assert_eq!(&all[25..], b"x");
}

#[test]
fn sparse_growth_reads_zeros_and_keeps_old_tail() {
    let fx = fixture(4096, 1);
    fx.write(0, b"0123456789");
    fx.truncate(3 * 4096 + 100);
    fx.write(5 * 4096 + 1, b"end");
    let all = fx.all();
    assert_eq!(all.len(), 5 * 4096 + 4);
    assert_eq!(&all[..10], b"0123456789");
    assert!(all[10..5 * 4096 + 1].iter().all(|b| *b == 0));
    assert_eq!(&all[5 * 4096 + 1..], b"end");
    // Units 1..=4 were never written: they stay holes of the backing file.
    let raw = fx.raw();
    for u in 1..5 {
        let unit = &raw[fx.h() + u * 4096..][..4096];
        assert!(unit.iter().all(|b| *b == 0), "unit {u} was written");
    }
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
                    fx.write(off, &[t + 1; 3000]);
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
fn corrupt_headers_lengths_and_v1_files_are_errors_not_panics() {
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
    // A data area of 1..15 bytes cannot be a v2 file.
    let h = fx.lay.generate_header(0).unwrap();
    fx.file.set_len(0).unwrap();
    fx.file.write_all_at(&h.encode(), 0).unwrap();
    fx.file.set_len(fx.h() as u64 + 7).unwrap();
    assert!(matches!(
        read(&fx.file, &fx.st, &fx.cx(), 0, 10),
        Err(VolumeError::CorruptFile { .. })
    ));
    // v3: every length inside the header area is corrupt (1..4095), the bare area is an
    // empty file.
    for n in [1u64, 31, 32, 33, 48, 2048, 4095] {
        let fx = fixture(4096, 1);
        fx.file.write_all_at(&h.encode(), 0).unwrap();
        fx.file.set_len(n).unwrap();
        assert!(
            matches!(
                read(&fx.file, &fx.st, &fx.cx(), 0, 10),
                Err(VolumeError::CorruptFile { .. })
            ),
            "length {n}"
        );
    }
    let fx = fixture(4096, 1);
    fx.file.write_all_at(&fx.lay.header_area(&h), 0).unwrap();
    assert_eq!(fx.all(), b"");
    // A header of the other current version is refused, not read at the wrong offset.
    for (lay, other) in [(Layout::V3, Layout::V2), (Layout::V2, Layout::V3)] {
        let fx = fixture_in(lay, 4096, 1, false);
        let foreign = other.generate_header(0).unwrap();
        fx.file.write_all_at(&lay.header_area(&foreign), 0).unwrap();
        fx.file.write_all_at(&[1; 48], lay.data_offset).unwrap();
        let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
        assert!(
            matches!(e, VolumeError::CorruptFile { .. }) && e.to_string().contains("says format"),
            "{e}"
        );
    }
    // A bare header area (v3: 4096 bytes, v2: 32) is an empty file only under a header of
    // this volume: zeros, random bytes, the other version or an unknown key generation
    // are refused at open and read (attack12 F4), not served as an empty file.
    for (lay, other) in [(Layout::V3, Layout::V2), (Layout::V2, Layout::V3)] {
        let n = lay.data_offset as usize;
        let good = lay.generate_header(0).unwrap();
        let kg = FileHeader { key_gen: 1, ..good };
        let mut foreign = lay.header_area(&other.generate_header(0).unwrap());
        foreign.resize(n, 0);
        for (what, area) in [
            ("zeros", vec![0u8; n]),
            ("random", vec![0x5A; n]),
            ("other version", foreign),
            ("key generation 1", lay.header_area(&kg)),
        ] {
            let fx = fixture_in(lay, 4096, 1, false);
            fx.file.write_all_at(&area, 0).unwrap();
            let e = check_bare_header(&fx.file, &fx.st, &fx.cx(), n as u64).unwrap_err();
            assert!(matches!(e, VolumeError::CorruptFile { .. }), "{what}: {e}");
            let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
            assert!(matches!(e, VolumeError::CorruptFile { .. }), "{what}: {e}");
        }
        let fx = fixture_in(lay, 4096, 1, false);
        fx.file.write_all_at(&lay.header_area(&good), 0).unwrap();
        check_bare_header(&fx.file, &fx.st, &fx.cx(), n as u64).unwrap();
        assert_eq!(fx.all(), b"");
    }
    // A v1 file (in a v2 volume being upgraded) is refused, not misread.
    let fx = fixture_in(Layout::V2, 4096, 1, false);
    let v1 = FileHeader {
        version: layout::FILE_VERSION_V1,
        ..h
    };
    fx.file.write_all_at(&v1.encode(), 0).unwrap();
    fx.file.write_all_at(&[1; 48], 32).unwrap();
    let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
    assert!(e.to_string().contains("cmkfs upgrade"), "{e}");
}

#[test]
fn units_are_whole_block_xts_with_zero_padding() {
    // The last unit is XTS over whole blocks (padding zero-filled), never ciphertext
    // stealing, followed by the filler.
    let fx = fixture(4096, 1);
    let data: Vec<u8> = (0..4096 + 21).map(|i| (i * 31 + 7) as u8).collect();
    fx.write(0, &data);
    let h = fx.file_id();
    let raw = fx.raw();
    let mut unit1 = data[4096..].to_vec();
    unit1.resize(32, 0);
    fx.keys
        .xts
        .encrypt_unit(h.tweak().wrapping_add(1), &mut unit1)
        .unwrap();
    assert_eq!(&raw[fx.h() + 4096..][..32], &unit1[..]);
    assert_eq!(raw.len(), fx.h() + 4096 + 32 + 5);
}

/// The first read of a file opened anew (a fresh `FileState`: header not cached) at offset 0
/// takes header and units in one `preadv`; it must return what the two-step path returns
/// (header `pread`, then units) for every size around the unit and block edges, in v2 and
/// v3, and leave the header cached for the reads after it.
#[test]
fn a_first_read_at_the_start_matches_the_two_step_read() {
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for lay in [Layout::V3, Layout::V2] {
        let mut sizes: Vec<usize> = vec![1, 15, 16, 17, 4095, 4096, 4097, 8192, 8200];
        sizes.extend((1..=15).map(|t| 4096 + t));
        sizes.extend((0..8).map(|_| rng.gen_range(1..=8200)));
        for n in sizes {
            let fx = fixture_in(lay, 4096, 1, false);
            let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            fx.write(0, &data);
            for len in [1usize, 7, 16, 4096, n, n + 100] {
                let fresh = FileState::default();
                assert!(!fresh.header_cached());
                let got = read(&fx.file, &fresh, &fx.cx(), 0, len).unwrap();
                assert_eq!(
                    got,
                    data[..len.min(n)],
                    "{lay:?} size {n} len {len}, seed {seed}"
                );
                assert!(fresh.header_cached(), "header cached by the first read");
                // The two-step path: header first (a read past the start), then the units.
                let two = FileState::default();
                let at = n as u64 / 2;
                let tail = read(&fx.file, &two, &fx.cx(), at, len).unwrap();
                assert_eq!(tail, data[at as usize..(at as usize + len).min(n)]);
                assert_eq!(read(&fx.file, &two, &fx.cx(), 0, len).unwrap(), got);
            }
        }
    }
}

/// Overwrites `f` in place with `bytes` (same inode: what `rsync --inplace` or a restore
/// does) and returns once its change time differs from before, as it does on a kernel with
/// multigrain timestamps; elsewhere a rewrite within one clock tick of the last `fstat`
/// keeps the time, so the rewrite is repeated after a millisecond (the contract: a rewrite
/// that finished, then a request).
fn rewrite_in_place(f: &File, bytes: &[u8]) {
    use std::os::unix::fs::MetadataExt;
    let ctime = |f: &File| {
        let m = f.metadata().unwrap();
        (m.ctime(), m.ctime_nsec())
    };
    let before = ctime(f);
    f.set_len(bytes.len() as u64).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    while ctime(f) == before {
        std::thread::sleep(std::time::Duration::from_millis(1));
        f.write_all_at(&bytes[..1], 0).unwrap();
    }
}

/// Attack session 17, F1: a backing file rewritten in place behind the mount with another
/// file's bytes (another file id in its header) while a `FileState` of it lives. The next
/// request through that state must use the header now on disk: a read returns the other
/// file's plaintext, never units decrypted under the stale file id, and a write is stored
/// under the new header, so that it reads back through a state opened anew. Every first
/// request kind: a read at the start (header and units in one `preadv`), a read inside the
/// file, a whole-unit overwrite (shared lock) and a partial write (read-modify-write); same
/// and other lengths; v2 and v3. Then an invalid header: EIO, not cached, and once a valid
/// file is back, read as that one.
#[test]
fn a_file_rewritten_in_place_is_read_and_written_under_its_new_header() {
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for lay in [Layout::V3, Layout::V2] {
        for (first, other_len) in [(0, 3 * 4096 + 5), (1, 3 * 4096 + 5), (2, 9000), (3, 100)] {
            let fx = fixture_in(lay, 4096, 1, false);
            let ctx =
                format!("{lay:?} first request {first}, other length {other_len}, seed {seed}");
            let mine: Vec<u8> = (0..3 * 4096 + 5).map(|_| rng.gen()).collect();
            fx.write(0, &mine);
            assert_eq!(fx.all(), mine);
            // Another file of the same volume, written through its own state.
            let path_b = fx._dir.path().join("b");
            let fb = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path_b)
                .unwrap();
            let mut other: Vec<u8> = (0..other_len).map(|_| rng.gen()).collect();
            write(&fb, &FileState::default(), &fx.cx(), 0, &other).unwrap();
            let b_bytes = std::fs::read(&path_b).unwrap();
            assert_ne!(b_bytes[..FILE_HEADER_LEN], fx.raw()[..FILE_HEADER_LEN]);
            rewrite_in_place(&fx.file, &b_bytes);
            match first {
                0 => assert!(fx.all() == other, "{ctx}: not the new file's plaintext"),
                1 => {
                    let got = read(&fx.file, &fx.st, &fx.cx(), 4096 + 3, 100).unwrap();
                    assert!(got == other[4096 + 3..4096 + 103], "{ctx}");
                }
                2 => {
                    let unit: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
                    fx.write(4096, &unit);
                    other[4096..8192].copy_from_slice(&unit);
                }
                _ => {
                    let bytes: Vec<u8> = (0..37).map(|_| rng.gen()).collect();
                    fx.write(50, &bytes);
                    other[50..87].copy_from_slice(&bytes);
                }
            }
            // A write after it, then a state opened anew (what a remount sees).
            let tail: Vec<u8> = (0..700).map(|_| rng.gen()).collect();
            fx.write(10, &tail);
            other.resize(other.len().max(710), 0);
            other[10..710].copy_from_slice(&tail);
            assert!(fx.all() == other, "{ctx}: not the new file's plaintext");
            let fresh = FileState::default();
            let got = read(&fx.file, &fresh, &fx.cx(), 0, usize::MAX / 2).unwrap();
            assert!(got == other, "{ctx}: not stored under the header on disk");

            // A header that is no file's: EIO, for every request, and nothing cached.
            let good = fx.raw();
            let mut bad = good.clone();
            bad[..FILE_HEADER_LEN].fill(0x5a);
            rewrite_in_place(&fx.file, &bad);
            for _ in 0..2 {
                let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
                assert!(matches!(e, VolumeError::CorruptFile { .. }), "{ctx}: {e}");
                let e = write(&fx.file, &fx.st, &fx.cx(), 4096, &[1; 4096]).unwrap_err();
                assert!(matches!(e, VolumeError::CorruptFile { .. }), "{ctx}: {e}");
            }
            assert!(!fx.st.header_cached(), "{ctx}");
            // A copy of the first file's bytes back: read as that file.
            rewrite_in_place(&fx.file, &good);
            assert!(fx.all() == other, "{ctx}: not the new file's plaintext");
        }
    }
}

#[test]
fn a_header_checked_within_a_timestamp_step_of_its_change_time_is_not_trusted_later() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let at = |secs_ago: i64| (now.as_secs() as i64 - secs_ago, 0i64);
    // Coarse timestamps (1 s, 2 s steps): a check in the same step as the change proves
    // nothing about a rewrite in that step, so the next request reads the header again.
    assert_eq!(super::settled(at(0)), None);
    assert_eq!(super::settled(at(1)), None);
    assert_eq!(super::settled(at(2)), None);
    assert_eq!(super::settled(at(10)), Some(at(10)));
    // A change time in the future (a skewed clock) is never trusted.
    assert_eq!(super::settled(at(-60)), None);
    assert_eq!(super::settled((-1, 0)), None);
    assert_eq!(super::settled((0, -1)), None);
}

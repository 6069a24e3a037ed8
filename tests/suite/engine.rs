//! The sector engine: same bytes whatever the thread count, the documented tweak arithmetic,
//! short last units and sparse-file holes.

use cmkfs::crypto::XtsCipher;
use cmkfs::engine::{Holes, SectorEngine, PARALLEL_MIN_BYTES};
use rand::{Rng, RngCore, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(0xe9_91e)
}

fn cipher(r: &mut impl RngCore, unit: usize) -> XtsCipher {
    let mut key = [0u8; 64];
    r.fill_bytes(&mut key);
    XtsCipher::new(&key, unit).unwrap()
}

/// What the engine must produce: unit `i` with tweak `file_tweak + first_unit + i`, one
/// `encrypt_unit` call at a time.
fn reference(c: &XtsCipher, file_tweak: u128, first: u64, buf: &mut [u8]) {
    for (i, u) in buf.chunks_mut(c.unit_size()).enumerate() {
        let t = file_tweak.wrapping_add(first as u128 + i as u128);
        c.encrypt_unit(t, u).unwrap();
    }
}

/// Lengths around the parallel threshold, with and without a short last unit.
fn lengths(unit: usize) -> Vec<usize> {
    vec![
        1,
        15,
        16,
        17,
        unit,
        unit + 1,
        unit + 15,
        3 * unit + 100,
        PARALLEL_MIN_BYTES - 1,
        PARALLEL_MIN_BYTES,
        PARALLEL_MIN_BYTES + 5,
        PARALLEL_MIN_BYTES + unit,
        1 << 20,
        (1 << 20) + 4095,
        3 << 20,
    ]
}

#[test]
fn parallel_equals_serial_equals_reference() {
    let mut r = rng();
    let engines: Vec<SectorEngine> = [1, 2, 3, 8, 0]
        .into_iter()
        .map(|n| SectorEngine::new(n).unwrap())
        .collect();
    for unit in [512, 4096, 65536] {
        let c = cipher(&mut r, unit);
        for len in lengths(unit) {
            let file_tweak: u128 = r.gen();
            let first: u64 = r.gen_range(0..1 << 40);
            let mut pt = vec![0u8; len];
            r.fill_bytes(&mut pt);
            let mut want = pt.clone();
            reference(&c, file_tweak, first, &mut want);
            for e in &engines {
                let mut buf = pt.clone();
                e.encrypt(&c, file_tweak, first, &mut buf).unwrap();
                assert!(buf == want, "threads {} unit {unit} len {len}", e.threads());
                e.decrypt(&c, file_tweak, first, &mut buf, Holes::Decrypt)
                    .unwrap();
                assert!(buf == pt, "threads {} unit {unit} len {len}", e.threads());
            }
        }
    }
}

#[test]
fn buffer_split_anywhere_on_unit_boundaries_matches() {
    // Encrypting units 0..n in one call equals encrypting them in pieces at the right
    // first_unit: the volume layer relies on this for partial reads and writes.
    let mut r = rng();
    let c = cipher(&mut r, 4096);
    let e = SectorEngine::new(2).unwrap();
    let mut pt = vec![0u8; 4096 * 40 + 123];
    r.fill_bytes(&mut pt);
    let mut whole = pt.clone();
    e.encrypt(&c, 77, 5, &mut whole).unwrap();
    for split in [1, 7, 16, 33, 40] {
        let mut pieces = pt.clone();
        let (a, b) = pieces.split_at_mut(split * 4096);
        e.encrypt(&c, 77, 5, a).unwrap();
        e.encrypt(&c, 77, 5 + split as u64, b).unwrap();
        assert!(pieces == whole, "split at unit {split}");
    }
}

#[test]
fn tweak_wraps_around() {
    let mut r = rng();
    let c = cipher(&mut r, 4096);
    let e = SectorEngine::new(2).unwrap();
    let mut pt = vec![0u8; PARALLEL_MIN_BYTES * 2];
    r.fill_bytes(&mut pt);
    let file_tweak = u128::MAX - 3;
    let mut want = pt.clone();
    reference(&c, file_tweak, u64::MAX, &mut want);
    let mut buf = pt.clone();
    e.encrypt(&c, file_tweak, u64::MAX, &mut buf).unwrap();
    assert!(buf == want);
    e.decrypt(&c, file_tweak, u64::MAX, &mut buf, Holes::Zero)
        .unwrap();
    assert!(buf == pt);
}

#[test]
fn empty_buffer_is_a_no_op() {
    let mut r = rng();
    let c = cipher(&mut r, 4096);
    let e = SectorEngine::new(2).unwrap();
    let mut empty: [u8; 0] = [];
    e.encrypt(&c, 1, 2, &mut empty).unwrap();
    e.decrypt(&c, 1, 2, &mut empty, Holes::Zero).unwrap();
    e.decrypt(&c, 1, 2, &mut empty, Holes::Decrypt).unwrap();
}

#[test]
fn holes_zero_keeps_zero_units() {
    let mut r = rng();
    for threads in [1, 2] {
        let e = SectorEngine::new(threads).unwrap();
        for unit in [512, 4096] {
            let c = cipher(&mut r, unit);
            // Units 0, 2 and the short last one are holes (all-zero ciphertext); 1 and 3 are
            // data. Large enough to take the parallel path too.
            let n = PARALLEL_MIN_BYTES / unit + 4;
            let len = n * unit + 300;
            let mut pt = vec![0u8; len];
            r.fill_bytes(&mut pt);
            let mut ct = pt.clone();
            e.encrypt(&c, 9, 0, &mut ct).unwrap();
            let holes = [0usize, 2, n];
            for &h in &holes {
                let end = ((h + 1) * unit).min(len);
                ct[h * unit..end].fill(0);
            }
            let mut zeroed = ct.clone();
            e.decrypt(&c, 9, 0, &mut zeroed, Holes::Zero).unwrap();
            let mut decrypted = ct.clone();
            e.decrypt(&c, 9, 0, &mut decrypted, Holes::Decrypt).unwrap();
            for (i, (z, d)) in zeroed.chunks(unit).zip(decrypted.chunks(unit)).enumerate() {
                if holes.contains(&i) {
                    assert!(z.iter().all(|&b| b == 0), "unit {i} must stay a hole");
                    // Holes::Decrypt really decrypts the zeros into something else.
                    assert!(d.iter().any(|&b| b != 0), "unit {i}");
                } else {
                    assert!(z == &pt[i * unit..i * unit + z.len()], "unit {i}");
                    assert!(z == d, "unit {i}");
                }
            }
        }
    }
}

#[test]
fn holes_zero_short_tail_below_16_bytes() {
    let mut r = rng();
    let c = cipher(&mut r, 4096);
    let e = SectorEngine::new(1).unwrap();
    let mut buf = vec![0u8; 4096 + 7];
    buf[..4096].fill(1);
    let orig = buf.clone();
    e.encrypt(&c, 3, 0, &mut buf).unwrap();
    buf[4096..].fill(0);
    e.decrypt(&c, 3, 0, &mut buf, Holes::Zero).unwrap();
    assert!(buf[..4096] == orig[..4096]);
    assert!(buf[4096..].iter().all(|&b| b == 0));
}

#[test]
fn different_files_differ() {
    // Same plaintext, same sector index, different file tweak: different ciphertext.
    let mut r = rng();
    let c = cipher(&mut r, 4096);
    let e = SectorEngine::new(0).unwrap();
    let mut a = vec![0u8; 1 << 20];
    let mut b = a.clone();
    e.encrypt(&c, 1 << 64, 0, &mut a).unwrap();
    e.encrypt(&c, 2 << 64, 0, &mut b).unwrap();
    assert!(a.chunks(4096).zip(b.chunks(4096)).all(|(x, y)| x != y));
    // And within a file no two sectors of identical plaintext collide.
    let mut seen = std::collections::HashSet::new();
    assert!(a.chunks(4096).all(|s| seen.insert(s.to_vec())));
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SectorEngine>();
    check::<XtsCipher>();
}

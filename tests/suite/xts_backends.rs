//! The XTS implementations against each other (VAES, AES-NI, portable: each one this CPU
//! has), on random keys, tweaks near the 2^64 and 2^128 wraps, every unit size the volume
//! uses and every whole-block length; the fused hole check of the VAES backend against the
//! scan-first one, with zero blocks at every position; and the engine's multi-threaded paths
//! over buffers of many units; and `CMKFS_XTS`, end to end. The seed is printed
//! (`CMKFS_TEST_SEED=<n>` replays a run).

use std::process::Command;
use std::time::Duration;

use cmkfs::crypto::xts::Implementation;
use cmkfs::crypto::XtsCipher;
use cmkfs::engine::{Holes, SectorEngine};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const BLOCK: usize = 16;

fn seeded(test: &str) -> StdRng {
    StdRng::seed_from_u64(crate::common::seed(test))
}

/// Every implementation this CPU has (portable first: the reference), for `key`.
fn ciphers(key: &[u8], unit: usize) -> Vec<XtsCipher> {
    let v: Vec<XtsCipher> = Implementation::ALL
        .into_iter()
        .rev()
        .filter(|i| i.available())
        .map(|i| XtsCipher::with_implementation(key, unit, i).unwrap())
        .collect();
    if v.len() < 3 {
        eprintln!(
            "NOTE: this CPU runs only {:?}; the others are not compared",
            v.iter().map(|c| c.implementation()).collect::<Vec<_>>()
        );
    }
    // The default is the first available of ALL: the last of `v`.
    assert_eq!(
        XtsCipher::new(key, unit).unwrap().implementation(),
        v.last().unwrap().implementation(),
        "XtsCipher::new picks the fastest (CMKFS_XTS must be unset for this test)"
    );
    v
}

fn random_key(r: &mut impl RngCore) -> [u8; 64] {
    let mut k = [0u8; 64];
    while k[..32] == k[32..] {
        r.fill_bytes(&mut k);
    }
    k
}

/// Tweaks that exercise the carries: random, small, around 2^64, around the 2^128 wrap.
fn tweak(r: &mut impl Rng) -> u128 {
    let d: u128 = r.gen_range(0..300);
    match r.gen_range(0..4) {
        0 => r.gen(),
        1 => d,
        2 => (1u128 << 64).wrapping_add(d).wrapping_sub(150),
        _ => u128::MAX.wrapping_sub(d).wrapping_add(150),
    }
}

/// What hole keeping must give: the unit decrypted whole by `reference`, then every block
/// that was all zeros as ciphertext zeroed again (an all-zero unit stays zeros).
fn keeping_zero_blocks(reference: &XtsCipher, tweak: u128, ct: &[u8]) -> Vec<u8> {
    let mut pt = ct.to_vec();
    if ct.iter().all(|&b| b == 0) {
        return pt;
    }
    reference.decrypt_unit(tweak, &mut pt).unwrap();
    if ct.len().is_multiple_of(BLOCK) {
        for (p, c) in pt.chunks_exact_mut(BLOCK).zip(ct.chunks_exact(BLOCK)) {
            if c.iter().all(|&b| b == 0) {
                p.fill(0);
            }
        }
    }
    pt
}

/// One random unit through every implementation: encrypt, decrypt, and hole-keeping decrypt
/// of the ciphertext with a few blocks (or 64-bit halves of blocks) zeroed.
fn check_unit(cs: &[XtsCipher], r: &mut impl Rng, tweak: u128, len: usize) {
    let mut pt = vec![0u8; len];
    r.fill_bytes(&mut pt);
    let mut want = pt.clone();
    cs[0].encrypt_unit(tweak, &mut want).unwrap();
    for c in cs {
        let name = c.implementation();
        let mut ct = pt.clone();
        c.encrypt_unit(tweak, &mut ct).unwrap();
        assert!(ct == want, "{name}: encrypt len {len} tweak {tweak:#x}");
        c.decrypt_unit(tweak, &mut ct).unwrap();
        assert!(ct == pt, "{name}: decrypt len {len} tweak {tweak:#x}");
    }
    let blocks = len / BLOCK;
    let mut holed = want.clone();
    for _ in 0..r.gen_range(0..3) {
        if blocks == 0 {
            break;
        }
        let b = r.gen_range(0..blocks) * BLOCK;
        // A whole block, or one of its 8-byte halves (not a hole: must decrypt).
        let (lo, hi) = match r.gen_range(0..3) {
            0 => (b, b + BLOCK),
            1 => (b, b + 8),
            _ => (b + 8, b + BLOCK),
        };
        holed[lo..hi].fill(0);
    }
    let want = keeping_zero_blocks(&cs[0], tweak, &holed);
    for c in cs {
        let mut got = holed.clone();
        c.decrypt_unit_keeping_zero_blocks(tweak, &mut got).unwrap();
        assert!(
            got == want,
            "{}: hole keeping len {len} tweak {tweak:#x}",
            c.implementation()
        );
    }
}

#[test]
fn implementations_agree_on_random_units() {
    let mut r = seeded("implementations_agree_on_random_units");
    for _ in 0..1500 {
        let key = random_key(&mut r);
        let unit = [512, 1024, 2048, 4096][r.gen_range(0..4)];
        let cs = ciphers(&key, unit);
        let t = tweak(&mut r);
        let len = match r.gen_range(0..4) {
            0 => unit,
            1 => BLOCK * r.gen_range(1..=unit / BLOCK),
            2 => BLOCK * r.gen_range(1..=20),
            // Stealing and short tails (format v1): the shared framing around each backend.
            _ => r.gen_range(1..=unit),
        };
        check_unit(&cs, &mut r, t, len);
    }
}

#[test]
fn implementations_agree_on_every_whole_block_length() {
    let mut r = seeded("implementations_agree_on_every_whole_block_length");
    let key = random_key(&mut r);
    let cs = ciphers(&key, 4096);
    for len in (BLOCK..=4096).step_by(BLOCK) {
        let t = tweak(&mut r);
        check_unit(&cs, &mut r, t, len);
    }
}

/// A zero block at every position of a 4 KiB unit (and of short whole-block units, whose
/// last blocks take the masked tail path), zero half-blocks and two zero blocks at every
/// fifth position, an all-zero unit and one with a single non-zero block: each implementation keeps exactly the zero blocks.
#[test]
fn hole_keeping_at_every_block_position() {
    let mut r = seeded("hole_keeping_at_every_block_position");
    let key = random_key(&mut r);
    let cs = ciphers(&key, 4096);
    for len in [4096usize, 16, 48, 240, 496, 528, 4096 - 16] {
        let mut pt = vec![0u8; len];
        r.fill_bytes(&mut pt);
        let t = tweak(&mut r);
        let mut ct = pt.clone();
        cs[0].encrypt_unit(t, &mut ct).unwrap();
        let blocks = len / BLOCK;
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for i in 0..blocks {
            let mut h = ct.clone();
            h[i * BLOCK..(i + 1) * BLOCK].fill(0);
            cases.push(h);
            // Partial zeros (not holes) and pairs at every fifth block: every lane of every
            // vector of an iteration, at less cost.
            if i % 5 != 0 {
                continue;
            }
            for (lo, hi) in [(0, 8), (8, BLOCK), (1, BLOCK)] {
                let mut h = ct.clone();
                h[i * BLOCK + lo..i * BLOCK + hi].fill(0);
                cases.push(h);
            }
            let mut h = ct.clone();
            h[i * BLOCK..(i + 1) * BLOCK].fill(0);
            let j = (i * 7 + 3) % blocks;
            h[j * BLOCK..(j + 1) * BLOCK].fill(0);
            cases.push(h);
        }
        cases.push(vec![0u8; len]);
        let mut all_but_one = vec![0u8; len];
        all_but_one[len - BLOCK..].copy_from_slice(&ct[len - BLOCK..]);
        cases.push(all_but_one);
        for h in cases {
            let want = keeping_zero_blocks(&cs[0], t, &h);
            for c in &cs {
                let mut got = h.clone();
                c.decrypt_unit_keeping_zero_blocks(t, &mut got).unwrap();
                assert!(got == want, "{}: len {len}", c.implementation());
            }
        }
    }
}

/// The engine's paths (`encrypt`, `encrypt_from`, `decrypt` with `Holes::Zero`) on 1, 2 and
/// 3 threads, over buffers of 1..300 units with zero units and zero blocks, against the
/// portable cipher one unit at a time.
#[test]
fn engine_paths_agree_across_implementations() {
    let mut r = seeded("engine_paths_agree_across_implementations");
    let engines: Vec<SectorEngine> = [1, 2, 3]
        .into_iter()
        .map(|n| SectorEngine::new(n).unwrap())
        .collect();
    for round in 0..6 {
        let unit = if round % 3 == 2 { 512 } else { 4096 };
        let key = random_key(&mut r);
        let cs = ciphers(&key, unit);
        let units = if round == 0 {
            300
        } else {
            r.gen_range(1..=300)
        };
        // Whole units, or a whole-block tail.
        let len = units * unit - BLOCK * r.gen_range(0..unit / BLOCK);
        let file_tweak = tweak(&mut r);
        let first: u64 = r.gen_range(0..1 << 40);
        let mut pt = vec![0u8; len];
        r.fill_bytes(&mut pt);
        let mut want = pt.clone();
        for (i, u) in want.chunks_mut(unit).enumerate() {
            let t = file_tweak.wrapping_add(u128::from(first) + i as u128);
            cs[0].encrypt_unit(t, u).unwrap();
        }
        // Holes: some whole units and some single blocks of ciphertext zeroed.
        let mut holed = want.clone();
        for _ in 0..r.gen_range(0..4) {
            let u = r.gen_range(0..units) * unit;
            holed[u..(u + unit).min(len)].fill(0);
        }
        for _ in 0..r.gen_range(0..8) {
            let b = r.gen_range(0..len / BLOCK) * BLOCK;
            holed[b..b + BLOCK].fill(0);
        }
        let mut want_holed = holed.clone();
        for (i, u) in want_holed.chunks_mut(unit).enumerate() {
            let t = file_tweak.wrapping_add(u128::from(first) + i as u128);
            let d = keeping_zero_blocks(&cs[0], t, u);
            u.copy_from_slice(&d);
        }
        let at = r.gen_range(0..len);
        let n = r.gen_range(0..=len - at);
        let mut want_from = vec![0u8; len];
        r.fill_bytes(&mut want_from);
        let base = want_from.clone();
        want_from[at..at + n].copy_from_slice(&pt[..n]);
        for (i, u) in want_from.chunks_mut(unit).enumerate() {
            let t = file_tweak.wrapping_add(u128::from(first) + i as u128);
            cs[0].encrypt_unit(t, u).unwrap();
        }
        for c in &cs {
            for e in &engines {
                let ctx = format!(
                    "{} threads {} unit {unit} len {len}",
                    c.implementation(),
                    e.threads()
                );
                let mut buf = pt.clone();
                e.encrypt(c, file_tweak, first, &mut buf).unwrap();
                assert!(buf == want, "encrypt: {ctx}");
                let mut buf = holed.clone();
                e.decrypt(c, file_tweak, first, &mut buf, Holes::Zero)
                    .unwrap();
                assert!(buf == want_holed, "decrypt Holes::Zero: {ctx}");
                let mut buf = base.clone();
                e.encrypt_from(c, file_tweak, first, &mut buf, &pt[..n], at)
                    .unwrap();
                assert!(buf == want_from, "encrypt_from at {at} n {n}: {ctx}");
            }
        }
    }
}

/// `CMKFS_XTS` caps the implementation the binary uses (`bench sectors` names it), and a
/// value that names none is a one-line error.
#[test]
fn cmkfs_xts_caps_the_implementation() {
    let run = |xts: &str| {
        let mut cmd = Command::new(crate::common::bin());
        cmd.args(["bench", "sectors", "--seconds", "0.01", "--rounds", "1"])
            .args(["--threads", "1", "--no-openssl"])
            .env("CMKFS_XTS", xts);
        crate::common::run_with_timeout(cmd, Duration::from_secs(60)).unwrap()
    };
    let default = Implementation::ALL
        .into_iter()
        .find(|i| i.available())
        .unwrap()
        .name();
    for (xts, want) in [
        ("", default),
        ("auto", default),
        ("portable", "portable"),
        (
            "aes-ni",
            if Implementation::AesNi.available() {
                "aes-ni"
            } else {
                "portable"
            },
        ),
    ] {
        let out = run(xts);
        out.assert_ok();
        assert!(
            out.stdout.contains(&format!("implementation {want},")),
            "CMKFS_XTS={xts:?}: want {want}\n{out}"
        );
    }
    let out = run("aes-nix");
    out.assert_clear_error();
    assert!(out.stderr.contains("CMKFS_XTS=\"aes-nix\""), "{out}");
}

//! Sector-path benchmarks: AES-256-XTS over 4096-byte units through the engine, for 4 KiB,
//! 64 KiB and 1 MiB requests, on 1 thread and on all cores, beside the portable (`aes`
//! crate) implementation and the `xts-mode` crate's block-at-a-time loop.
//!
//! `cargo bench --bench sector` (a couple of minutes); filter with e.g.
//! `cargo bench --bench sector -- encrypt/ours-1t`.

use std::time::Duration;

use aes::cipher::KeyInit;
use aes::Aes256;
use cmkfs::crypto::XtsCipher;
use cmkfs::engine::{Holes, SectorEngine};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use xts_mode::{get_tweak_default, Xts128};

const UNIT: usize = 4096;
const SIZES: [usize; 3] = [4096, 64 * 1024, 1024 * 1024];

fn key() -> [u8; 64] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(29).wrapping_add(1))
}

fn sectors(c: &mut Criterion) {
    let key = key();
    let fast = XtsCipher::new(&key, UNIT).unwrap();
    let portable = XtsCipher::new_portable(&key, UNIT).unwrap();
    let one = SectorEngine::new(1).unwrap();
    let all = SectorEngine::new(0).unwrap();
    let oracle = Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    let all_name = format!("ours-{}t", all.threads());

    for decrypt in [false, true] {
        let mut g = c.benchmark_group(if decrypt { "decrypt" } else { "encrypt" });
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2))
            .sample_size(30);
        for size in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0x5au8; size];
            let engines = [
                ("ours-1t", &fast, &one),
                (all_name.as_str(), &fast, &all),
                ("portable-1t", &portable, &one),
            ];
            for (name, cipher, engine) in engines {
                g.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                    b.iter(|| {
                        if decrypt {
                            engine.decrypt(cipher, 7, 0, &mut buf, Holes::Decrypt)
                        } else {
                            engine.encrypt(cipher, 7, 0, &mut buf)
                        }
                        .unwrap()
                    })
                });
            }
            // The baseline: the `xts-mode` crate, one block at a time.
            g.bench_with_input(BenchmarkId::new("xts-mode-1t", size), &size, |b, _| {
                b.iter(|| {
                    if decrypt {
                        oracle.decrypt_area(&mut buf, UNIT, 7, get_tweak_default)
                    } else {
                        oracle.encrypt_area(&mut buf, UNIT, 7, get_tweak_default)
                    }
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, sectors);
criterion_main!(benches);

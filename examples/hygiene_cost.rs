//! What the memory hygiene of issue 11 costs on the data path, measured in one run:
//! the stack scrub after each engine call (`crypto::secret::scrub_stack`) and the zeroing of
//! a freed request buffer (what `ZeroizingAlloc` does on every free), each beside the XTS
//! time of the same request.
//!
//! `cargo run --release --example hygiene_cost`

use std::time::{Duration, Instant};

use cmkfs::crypto::XtsCipher;
use cmkfs::engine::{Holes, SectorEngine};

fn per_call(n: u32, mut f: impl FnMut(u32)) -> Duration {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed() / n
}

fn main() {
    let key: Vec<u8> = (0..64u8).collect();
    let cipher = XtsCipher::new(&key, 4096).expect("key");
    let engine = SectorEngine::new(1).expect("engine");
    let scrub = (0..3)
        .map(|_| per_call(200_000, |_| cmkfs::crypto::secret::scrub_stack()))
        .min()
        .unwrap_or_default();
    println!(
        "scrub_stack ({} KiB): {scrub:?} per call",
        cmkfs::crypto::secret::SCRUB_BYTES / 1024
    );
    println!("request   decrypt (engine, incl. scrub)   zeroing the freed buffer   ratio");
    for size in [4096usize, 65536, 1 << 20] {
        let n = (100_000_000 / size) as u32;
        let mut buf = vec![7u8; size];
        let (mut dec, mut wipe) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            dec = dec.min(per_call(n, |i| {
                engine
                    .decrypt(&cipher, 1, u64::from(i), &mut buf, Holes::Decrypt)
                    .expect("decrypt")
            }));
            wipe = wipe.min(per_call(n, |_| {
                // SAFETY: `buf` is a live buffer of `size` bytes.
                unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0, size) };
                std::hint::black_box(&mut buf);
            }));
        }
        println!(
            "{:>7}   {:>29?}   {:>24?}   {:.2}",
            size,
            dec,
            wipe,
            wipe.as_secs_f64() / dec.as_secs_f64()
        );
    }
}

//! Streaming writes through a real mount (issue 15, session 9): the daemon hands a large
//! writer's backing pages to the disk as it goes (`sync_file_range`, src/volume/writeout.rs)
//! instead of leaving them all for the `fsync`. What the file holds must not depend on when
//! its pages reach the disk: whole-unit writes of 4 KiB..1 MiB at unit-aligned offsets (also
//! past the end of file), mixed with writes of 1..15 and 0..8200 bytes, truncates to tails of
//! 1..15 bytes, reads, the backing file's page cache dropped, and remounts, all compared with
//! a model (seed printed).

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Dirty pages of a file (`cachestat(2)`, Linux 6.5), `None` where the call is missing.
fn dirty_pages(f: &File) -> Option<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: the kernel reads `range` and writes `st`, live `repr(C)` values of the layout
    // cachestat(2) documents; `f` is open.
    let r = unsafe {
        libc::syscall(
            451,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    (r == 0).then_some(st.dirty)
}

/// The backing file of mount path `p` (same inode number).
fn backing_of(cipher: &Path, p: &Path) -> File {
    let ino = fs::metadata(p).unwrap().ino();
    let b = data_files(cipher)
        .into_iter()
        .find(|b| fs::metadata(b).is_ok_and(|m| m.ino() == ino))
        .expect("backing file");
    File::open(b).unwrap()
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn streaming_writes_mixed_with_small_ones_truncates_and_remounts_match_a_model() {
    let env = Env::new();
    env.init(&env.cipher);
    let mut m = Some(env.mount(&env.cipher, &env.mnt));
    let seed = seed("mount_writeout");
    let mut rng = StdRng::seed_from_u64(seed);
    let p = env.mnt.join("f");
    // A streaming writer first: 40 MiB in 1 MiB writes, closed without an fsync. The close
    // sends every dirty page to the daemon; the write-outs it started leave at most the part
    // after the last one dirty in the backing page cache.
    let mut model = random_bytes(&mut rng, 40 << 20);
    {
        let w = File::create(&p).unwrap();
        for (i, c) in model.chunks(1 << 20).enumerate() {
            w.write_all_at(c, (i << 20) as u64).unwrap();
        }
    }
    let backing = backing_of(&env.cipher, &p);
    if let Some(d) = dirty_pages(&backing) {
        assert!(
            d * 4096 <= 20 << 20,
            "{} MiB of 40 still dirty in the backing file: no write-out started",
            (d * 4096) >> 20
        );
    }
    let mut w = open_rw(&p);
    for i in 0..160 {
        let why = format!("seed {seed} step {i}");
        if i % 10 == 9 {
            w.sync_data().unwrap();
            // SAFETY: plain syscall on a valid descriptor.
            let r =
                unsafe { libc::posix_fadvise(backing_of(&env.cipher, &p).as_raw_fd(), 0, 0, 4) };
            assert_eq!(r, 0, "posix_fadvise DONTNEED");
        }
        if i % 50 == 49 {
            // A remount: everything the daemon wrote, read back by a fresh one.
            drop(w);
            drop(m.take());
            m = Some(env.mount(&env.cipher, &env.mnt));
            assert_bytes_eq(&format!("{why}: after remount"), &read(&p), &model);
            w = open_rw(&p);
        }
        match rng.gen_range(0..12) {
            0 => {
                // A new length with a tail of 1..15 bytes (shrink, or grow with zeros).
                let n = rng.gen_range(1 << 20..44 << 20) / 16 * 16 + rng.gen_range(1..16);
                w.set_len(n as u64).unwrap();
                model.resize(n, 0);
            }
            k => {
                let (off, len) = match k {
                    1..=5 => {
                        // Whole units at a unit boundary, inside, across or past the end.
                        let units = model.len() / 4096 + 64;
                        (
                            4096 * rng.gen_range(0..units),
                            4096 * rng.gen_range(1..=256),
                        )
                    }
                    6..=8 => (rng.gen_range(0..model.len() + 8192), rng.gen_range(1..16)),
                    _ => (rng.gen_range(0..model.len() + 8192), rng.gen_range(0..8201)),
                };
                let data = random_bytes(&mut rng, len);
                w.write_all_at(&data, off as u64).unwrap();
                model_write(&mut model, off, &data);
            }
        }
        // Read back around a random point or the end of file.
        let len = rng.gen_range(1..(1 << 20) + 8193);
        let off = if rng.gen_ratio(1, 3) {
            model.len().saturating_sub(rng.gen_range(1..len + 1))
        } else {
            rng.gen_range(0..model.len())
        };
        let want = &model[off.min(model.len())..(off + len).min(model.len())];
        assert_bytes_eq(&why, &pread_all(&w, off as u64, len), want);
    }
    w.sync_all().unwrap();
    drop(w);
    assert_eq!(fs::metadata(&p).unwrap().len(), model.len() as u64, "size");
    assert_bytes_eq("whole file", &read(&p), &model);
    drop(m.take());
    let _m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq("whole file after the last remount", &read(&p), &model);
}

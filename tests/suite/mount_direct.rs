//! Large reads of the backing file with `O_DIRECT` (issue 15) through a real mount: what a
//! write through the mount stored is what the next read returns, at once, whatever part of
//! the backing file the page cache still holds (dirty, clean, or nothing), at every size
//! including tails of 1..15 bytes and holes. Reads on the mount use `O_DIRECT` in large
//! pieces, so each reaches the daemon as one large request (the daemon's direct path).

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The daemon holds a descriptor opened with `O_DIRECT` (the direct path is set up).
fn daemon_has_direct_fd(pid: u32) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    dir.flatten().any(|e| {
        fs::read_to_string(e.path()).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| i64::from_str_radix(v.trim(), 8).ok())
                .is_some_and(|f| f & libc::O_DIRECT as i64 != 0)
        })
    })
}

/// Drops the clean pages of the backing file from the page cache (dirty ones stay).
fn drop_backing_cache(backing: &File) {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::posix_fadvise(backing.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

#[test]
fn reads_right_after_writes_through_the_mount_match_a_model() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let seed = seed("mount_direct");
    let mut rng = StdRng::seed_from_u64(seed);
    let p = m.path("f");
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let mut model = random_bytes(&mut rng, (3 << 20) + 7);
    w.write_all_at(&model, 0).unwrap();
    let ino = fs::metadata(&p).unwrap().ino();
    let backing_path = data_files(&env.cipher)
        .into_iter()
        .find(|b| fs::metadata(b).is_ok_and(|m| m.ino() == ino))
        .expect("backing file of f");
    let backing = File::open(&backing_path).unwrap();
    let r = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    for i in 0..150 {
        let why = format!("seed {seed} step {i}");
        if i % 5 == 0 {
            // Clean and out of the page cache, except what the next writes dirty.
            w.sync_data().unwrap();
            drop_backing_cache(&backing);
        }
        // A change through the mount, read back at once (the daemon writes buffered; its
        // direct read must write the dirty pages back first).
        match rng.gen_range(0..10) {
            0 => {
                // A new length with a tail of 1..15 bytes (shrink or grow with zeros).
                let n = rng.gen_range(1 << 20..4 << 20) / 16 * 16 + rng.gen_range(1..16);
                w.set_len(n as u64).unwrap();
                model.resize(n, 0);
            }
            k => {
                let len = match k {
                    1..=3 => rng.gen_range(1..16),
                    4..=7 => rng.gen_range(0..8201),
                    _ => rng.gen_range(8201..300_000),
                };
                let off = rng.gen_range(0..model.len() + 8192);
                let data = random_bytes(&mut rng, len);
                w.write_all_at(&data, off as u64).unwrap();
                model_write(&mut model, off, &data);
            }
        }
        // Around a random point, or the end of file (its last partial unit).
        let len = rng.gen_range(128 << 10..(1 << 20) + 8193);
        let off = if rng.gen_ratio(1, 3) {
            model.len().saturating_sub(rng.gen_range(1..len))
        } else {
            rng.gen_range(0..model.len())
        };
        let want = &model[off.min(model.len())..(off + len).min(model.len())];
        assert_bytes_eq(&why, &pread_all(&r, off as u64, len), want);
    }
    assert_bytes_eq("whole file", &read(&p), &model);
    // Where the backing filesystem takes O_DIRECT (ext4, tmpfs since Linux 6.6), the reads
    // above went through the direct path.
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&backing_path);
    if probe.is_ok() {
        let pid = m.daemon_pid().expect("daemon pid");
        assert!(
            daemon_has_direct_fd(pid),
            "no O_DIRECT descriptor in the daemon"
        );
    }
    drop((r, w));
    m.unmount();
}

/// `O_DIRECT` writes and reads through the mount of up to 4 MiB: with `FUSE_ASYNC_DIO` the
/// kernel sends the 1 MiB pieces of one such request to the daemon together (several FUSE
/// threads at once on one file, extending writes included), and the file must still read
/// back as a model says, at every size including tails of 1..15 bytes and past the end.
#[test]
fn direct_requests_split_into_pieces_in_flight_together_match_a_model() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--threads", "4"]);
    let seed = seed("mount_direct_pieces");
    let mut rng = StdRng::seed_from_u64(seed);
    let p = m.path("g");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let mut model: Vec<u8> = Vec::new();
    for i in 0..60 {
        let why = format!("seed {seed} step {i}");
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..16),
            1 => rng.gen_range(0..8201),
            _ => rng.gen_range((1 << 20) + 1..(4 << 20) + 16),
        };
        // Inside the file (pieces written side by side), across its end, or past it.
        let off = rng.gen_range(0..model.len() + (1 << 20));
        if rng.gen_bool(0.5) {
            let data = random_bytes(&mut rng, len);
            f.write_all_at(&data, off as u64).unwrap();
            model_write(&mut model, off, &data);
        }
        let want = &model[off.min(model.len())..(off + len).min(model.len())];
        assert_bytes_eq(&why, &pread_all(&f, off as u64, len), want);
        assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "{why}");
    }
    drop(f);
    assert_bytes_eq("whole file", &read(&p), &model);
    m.unmount();
}

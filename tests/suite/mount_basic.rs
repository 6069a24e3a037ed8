//! Real-mount tests of the plaintext view: contents of every interesting size, random writes
//! and truncates against an in-memory model, concurrent unaligned writers, directories,
//! renames, symlinks, hard links, long names, and remounts that keep everything.
//!
//! Every test mounts a fresh volume under a private temp dir; see `common` for how mounts are
//! always unmounted and never allowed to hang.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The sizes the issue names: empty, sub-block tails, the AES block and sector boundaries, and
/// a multi-sector file with a tail.
const SIZES: [usize; 9] = [0, 1, 15, 16, 17, 4095, 4096, 4097, (1 << 20) + 3];

/// Reads random ranges of `path` (crossing sector boundaries) and compares them with `want`.
#[track_caller]
fn check_ranges(path: &Path, want: &[u8], rng: &mut StdRng) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    for _ in 0..16 {
        if want.is_empty() {
            break;
        }
        let off = if rng.gen_bool(0.5) {
            // Straddle a sector boundary.
            let k = rng.gen_range(0..=want.len() / SECTOR);
            (k * SECTOR)
                .saturating_sub(rng.gen_range(0..20))
                .min(want.len() - 1)
        } else {
            rng.gen_range(0..want.len())
        };
        let len = rng.gen_range(1..=(want.len() - off).min(3 * SECTOR));
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64)
            .unwrap_or_else(|e| panic!("pread {} at {off}+{len}: {e}", path.display()));
        assert_bytes_eq(
            &format!("{} range {off}+{len}", path.display()),
            &buf,
            &want[off..off + len],
        );
    }
    // Reading at and past EOF returns nothing.
    let mut buf = [0u8; 16];
    assert_eq!(f.read_at(&mut buf, want.len() as u64).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, want.len() as u64 + 5000).unwrap(), 0);
}

/// Checks every file's size and contents through the mount.
#[track_caller]
fn verify_files(m: &Mount, files: &[(String, Vec<u8>)], rng: &mut StdRng) {
    for (name, data) in files {
        let p = m.path(name);
        let md = fs::metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        assert_eq!(md.len(), data.len() as u64, "size of {name}");
        assert_bytes_eq(name, &read(&p), data);
        check_ranges(&p, data, rng);
    }
}

/// Backing files carry the header area (per-file header; v3: zeros to 4096) in front of the ciphertext, whose length is the
/// plaintext's when a multiple of 16, else the plaintext's + 16 (the last block padded, then
/// the filler that makes the length say the size); empty files may be 0 bytes or header only. Assumes every file lives in the
/// root and no name is long enough to need the long-name scheme.
#[track_caller]
fn check_backing_sizes(cipher: &Path, plain_sizes: &[usize]) {
    let mut got: Vec<u64> = data_files_in(cipher)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(
        got.len(),
        plain_sizes.len(),
        "one backing file per plaintext file expected; backing root: {:?}",
        snapshot(cipher)
    );
    got.sort_unstable();
    let empties = plain_sizes.iter().filter(|&&n| n == 0).count();
    let (small, big) = got.split_at(empties);
    assert!(
        small.iter().all(|&n| n == 0 || n == data_offset(cipher)),
        "backing files of empty files must be 0 or {} bytes, got {small:?}",
        data_offset(cipher)
    );
    let mut want: Vec<u64> = plain_sizes
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| backing_len(cipher, n as u64))
        .collect();
    want.sort_unstable();
    assert_eq!(
        big, want,
        "backing sizes must be the format v2 length of each plaintext size"
    );
}

#[test]
fn round_trip_sizes() {
    let env = Env::new();
    env.init(&env.cipher);
    let mut rng = StdRng::seed_from_u64(seed("round_trip_sizes"));
    // Each size twice: written in one call, and in unaligned 1000-byte pieces (exercising the
    // partial-sector read-modify-write path and size growth by small appends).
    let mut files = Vec::new();
    for n in SIZES {
        files.push((format!("whole-{n}"), random_bytes(&mut rng, n)));
        files.push((format!("pieces-{n}"), random_bytes(&mut rng, n)));
    }

    let m = env.mount(&env.cipher, &env.mnt);
    for (name, data) in &files {
        let p = m.path(name);
        if name.starts_with("whole") {
            write(&p, data);
        } else {
            let mut f = File::create(&p).unwrap();
            for piece in data.chunks(1000) {
                f.write_all(piece)
                    .unwrap_or_else(|e| panic!("write to {name}: {e}"));
            }
            f.sync_all().unwrap();
        }
    }
    verify_files(&m, &files, &mut rng);
    let sizes: Vec<usize> = files.iter().map(|(_, d)| d.len()).collect();
    check_backing_sizes(&env.cipher, &sizes);
    m.unmount();

    // A fresh daemon (the foreground flavour this time) sees the same bytes.
    let m = env.mount_foreground(&env.cipher, &env.mnt);
    verify_files(&m, &files, &mut rng);
    m.unmount();
    check_backing_sizes(&env.cipher, &sizes);
}

/// A write offset for the model test: biased towards sector boundaries and EOF.
fn pick_offset(rng: &mut StdRng, len: usize) -> usize {
    match rng.gen_range(0..4) {
        // Near a sector boundary (the interesting places), possibly past EOF.
        0 | 1 => {
            let k = rng.gen_range(0..=len / SECTOR + 1);
            (k * SECTOR + rng.gen_range(0..40)).saturating_sub(20)
        }
        // Anywhere in the file.
        2 => rng.gen_range(0..=len),
        // Past EOF, leaving a hole.
        _ => len + rng.gen_range(1..3 * SECTOR),
    }
}

/// A write length for the model test: mostly small and sub-sector, sometimes whole sectors or
/// large multi-sector writes.
fn pick_len(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..10) {
        0..=3 => rng.gen_range(1..=32),
        4..=6 => rng.gen_range(1..=2 * SECTOR + 100),
        7 => SECTOR * rng.gen_range(1..=4),
        _ => rng.gen_range(1..=256 * 1024),
    }
}

/// Keeps the files bounded so the test stays quick.
const MODEL_MAX: usize = 1 << 20;

#[test]
fn random_writes_and_truncates_match_model() {
    let seed = seed("random_writes_and_truncates_match_model");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);

    const FILES: usize = 3;
    const BATCHES: usize = 16;
    const OPS: usize = 40;
    let names: Vec<String> = (0..FILES).map(|i| format!("model-{i}.bin")).collect();
    let mut models: Vec<Vec<u8>> = vec![Vec::new(); FILES];
    let handles: Vec<File> = names
        .iter()
        .map(|n| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(m.path(n))
                .unwrap_or_else(|e| panic!("create {n}: {e}"))
        })
        .collect();

    for batch in 0..BATCHES {
        let mut log = Vec::new();
        for _ in 0..OPS {
            let i = rng.gen_range(0..FILES);
            let (model, h, name) = (&mut models[i], &handles[i], &names[i]);
            match rng.gen_range(0..20) {
                // pwrite through the long-lived handle.
                0..=10 => {
                    let off = pick_offset(&mut rng, model.len()).min(MODEL_MAX);
                    let len = pick_len(&mut rng).min(MODEL_MAX + SECTOR - off);
                    let data = random_bytes(&mut rng, len);
                    log.push(format!("{name}: pwrite {off}+{len}"));
                    h.write_all_at(&data, off as u64)
                        .unwrap_or_else(|e| panic!("seed {seed}: {log:#?}: {e}"));
                    model_write(model, off, &data);
                }
                // Truncate: shrink or extend, often to or next to a sector boundary.
                11..=13 => {
                    let new_len = match rng.gen_range(0..4) {
                        0 => 0,
                        1 => rng.gen_range(0..=model.len()),
                        2 => (rng.gen_range(0..=model.len() / SECTOR + 1) * SECTOR
                            + rng.gen_range(0..3))
                        .saturating_sub(1),
                        _ => model.len() + rng.gen_range(1..2 * SECTOR),
                    }
                    .min(MODEL_MAX);
                    log.push(format!("{name}: truncate {} -> {new_len}", model.len()));
                    h.set_len(new_len as u64)
                        .unwrap_or_else(|e| panic!("seed {seed}: {log:#?}: {e}"));
                    model.resize(new_len, 0);
                }
                // Open, write, close: exercises flush/release on a second handle.
                14..=15 => {
                    let off = pick_offset(&mut rng, model.len()).min(MODEL_MAX);
                    let len = pick_len(&mut rng).min(8 * SECTOR);
                    let data = random_bytes(&mut rng, len);
                    log.push(format!("{name}: open+pwrite {off}+{len}+close"));
                    let f = OpenOptions::new().write(true).open(m.path(name)).unwrap();
                    f.write_all_at(&data, off as u64)
                        .unwrap_or_else(|e| panic!("seed {seed}: {log:#?}: {e}"));
                    drop(f);
                    model_write(model, off, &data);
                }
                // O_APPEND write.
                16 => {
                    let len = pick_len(&mut rng).min(4 * SECTOR);
                    let data = random_bytes(&mut rng, len);
                    log.push(format!("{name}: append {len} at {}", model.len()));
                    let mut f = OpenOptions::new().append(true).open(m.path(name)).unwrap();
                    f.write_all(&data)
                        .unwrap_or_else(|e| panic!("seed {seed}: {log:#?}: {e}"));
                    model.extend_from_slice(&data);
                }
                // Read a range through the long-lived handle right away.
                _ => {
                    if model.is_empty() {
                        continue;
                    }
                    let off = rng.gen_range(0..model.len());
                    let len = rng.gen_range(1..=(model.len() - off).min(3 * SECTOR));
                    log.push(format!("{name}: pread {off}+{len}"));
                    let mut buf = vec![0u8; len];
                    h.read_exact_at(&mut buf, off as u64)
                        .unwrap_or_else(|e| panic!("seed {seed}: {log:#?}: {e}"));
                    if buf != model[off..off + len] {
                        eprintln!("seed {seed}, batch {batch}, ops so far: {log:#?}");
                    }
                    assert_bytes_eq(
                        &format!("seed {seed}: {name} pread"),
                        &buf,
                        &model[off..off + len],
                    );
                }
            }
        }
        for (i, name) in names.iter().enumerate() {
            let got = read(&m.path(name));
            let len = fs::metadata(m.path(name)).unwrap().len();
            if got != models[i] || len != models[i].len() as u64 {
                eprintln!("seed {seed}, batch {batch}, ops: {log:#?}");
            }
            assert_eq!(len, models[i].len() as u64, "seed {seed}: size of {name}");
            assert_bytes_eq(
                &format!("seed {seed}, batch {batch}: {name}"),
                &got,
                &models[i],
            );
        }
    }
    drop(handles);
    m.unmount();

    let m = env.mount(&env.cipher, &env.mnt);
    for (i, name) in names.iter().enumerate() {
        assert_bytes_eq(
            &format!("seed {seed}, after remount: {name}"),
            &read(&m.path(name)),
            &models[i],
        );
    }
    m.unmount();
}

#[test]
fn concurrent_unaligned_writers_lose_nothing() {
    // Four threads write interleaved, non-overlapping 1000-byte pieces of one file through
    // their own handles; pieces share sectors, so a read-modify-write without the per-file
    // lock would lose updates. The outcome is schedule-independent, hence deterministic.
    const THREADS: usize = 4;
    const PIECE: usize = 1000;
    const PIECES: usize = 160;
    let mut rng = StdRng::seed_from_u64(seed("concurrent_unaligned_writers_lose_nothing"));
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    for round in 0..3 {
        let want = random_bytes(&mut rng, PIECE * PIECES);
        let path = m.path(format!("shared-{round}.bin"));
        File::create(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (path, want) = (&path, &want);
                s.spawn(move || {
                    let f = OpenOptions::new().write(true).open(path).unwrap();
                    // Each thread walks its pieces from the end backwards on odd rounds, so
                    // size growth races as well.
                    let mut mine: Vec<usize> = (t..PIECES).step_by(THREADS).collect();
                    if round % 2 == 1 {
                        mine.reverse();
                    }
                    for k in mine {
                        let off = k * PIECE;
                        f.write_all_at(&want[off..off + PIECE], off as u64)
                            .unwrap_or_else(|e| panic!("thread {t} piece {k}: {e}"));
                    }
                });
            }
        });
        assert_bytes_eq(&format!("round {round}"), &read(&path), &want);
    }
    m.unmount();
}

/// Sorted names in a directory.
#[track_caller]
fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `build` on a fresh mount, then checks that a remount shows exactly the same tree
/// (types, modes, sizes, contents, symlink targets, link counts) and returns the env and the
/// remounted mount for further checks.
fn build_then_remount(build: impl FnOnce(&Mount)) -> (Env, Mount) {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    build(&m);
    let view = tree_view(&m.mnt);
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(tree_view(&m.mnt), view, "tree changed across remount");
    (env, m)
}

#[test]
fn directories_mkdir_rmdir_unlink() {
    let (_env, m) = build_then_remount(|m| {
        let p = |r: &str| m.path(r);
        fs::create_dir_all(p("a/b/c")).unwrap();
        write(&p("a/one.txt"), b"one");
        write(&p("a/b/two.txt"), b"two");
        write(&p("a/b/c/three.txt"), b"three");
        assert_eq!(list(&m.mnt), ["a"]);
        assert_eq!(list(&p("a")), ["b", "one.txt"]);
        assert_eq!(list(&p("a/b")), ["c", "two.txt"]);
        assert!(fs::metadata(p("a/b")).unwrap().is_dir());
        assert_eq!(
            fs::create_dir(p("a/b")).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            fs::metadata(p("a/nope")).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // rmdir refuses a non-empty directory and removes an empty one; unlink removes a
        // file.
        assert!(fs::remove_dir(p("a/b/c")).is_err());
        fs::create_dir(p("a/empty")).unwrap();
        fs::remove_dir(p("a/empty")).unwrap();
        fs::remove_file(p("a/b/two.txt")).unwrap();
        assert_eq!(list(&p("a/b")), ["c"]);
        assert_eq!(
            fs::read(p("a/b/two.txt")).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // A FIFO can be created (mknod); it is never opened here (that would block).
        let fifo = std::ffi::CString::new(p("a/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
        assert!(fs::symlink_metadata(p("a/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
    });
    assert_eq!(read(&m.path("a/b/c/three.txt")), b"three");
    // Emptying and removing a whole tree works after the remount too.
    fs::remove_dir_all(m.path("a")).unwrap();
    assert!(list(&m.mnt).is_empty());
    m.unmount();
}

#[test]
fn renames() {
    let (_env, m) = build_then_remount(|m| {
        let p = |r: &str| m.path(r);
        fs::create_dir_all(p("a/b/c")).unwrap();
        write(&p("a/one.txt"), b"one");
        write(&p("a/b/two.txt"), b"two");
        write(&p("a/b/c/three.txt"), b"three");
        // Within a directory.
        fs::rename(p("a/one.txt"), p("a/uno.txt")).unwrap();
        assert_eq!(list(&p("a")), ["b", "uno.txt"]);
        assert_eq!(read(&p("a/uno.txt")), b"one");
        // Across directories.
        fs::rename(p("a/uno.txt"), p("a/b/c/uno.txt")).unwrap();
        assert_eq!(list(&p("a")), ["b"]);
        assert_eq!(read(&p("a/b/c/uno.txt")), b"one");
        // Over an existing file, which is replaced.
        write(&p("a/b/target.txt"), b"old contents, longer than the new");
        fs::rename(p("a/b/two.txt"), p("a/b/target.txt")).unwrap();
        assert_eq!(list(&p("a/b")), ["c", "target.txt"]);
        assert_eq!(read(&p("a/b/target.txt")), b"two");
        // A whole directory with contents.
        fs::rename(p("a/b"), p("a/bee")).unwrap();
        assert_eq!(list(&p("a")), ["bee"]);
        assert_eq!(list(&p("a/bee/c")), ["three.txt", "uno.txt"]);
        assert_eq!(read(&p("a/bee/c/three.txt")), b"three");
        // An open file keeps working across a rename of its directory.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p("a/bee/c/three.txt"))
            .unwrap();
        fs::rename(p("a/bee/c"), p("a/sea")).unwrap();
        f.write_all_at(b"THREE", 0).unwrap();
        drop(f);
        assert_eq!(read(&p("a/sea/three.txt")), b"THREE");
    });
    assert_eq!(list(&m.path("a")), ["bee", "sea"]);
    assert_eq!(read(&m.path("a/sea/uno.txt")), b"one");
    m.unmount();
}

#[test]
fn symlinks() {
    let long_target = "x/".repeat(1000) + "end";
    let (_env, m) = build_then_remount(|m| {
        let p = |r: &str| m.path(r);
        fs::create_dir_all(p("a/bee/c")).unwrap();
        write(&p("a/bee/c/three.txt"), b"three");
        // Relative, followed by the kernel.
        std::os::unix::fs::symlink("bee/c/three.txt", p("a/rel-link")).unwrap();
        assert_eq!(
            fs::read_link(p("a/rel-link")).unwrap(),
            Path::new("bee/c/three.txt")
        );
        assert!(fs::symlink_metadata(p("a/rel-link"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::symlink_metadata(p("a/rel-link")).unwrap().len(),
            "bee/c/three.txt".len() as u64,
            "a symlink's size is its target's length"
        );
        assert_eq!(read(&p("a/rel-link")), b"three");
        // Dangling, absolute.
        std::os::unix::fs::symlink("/nonexistent/cmkfs/target", p("a/dangling")).unwrap();
        assert_eq!(
            fs::read_link(p("a/dangling")).unwrap(),
            Path::new("/nonexistent/cmkfs/target")
        );
        assert_eq!(
            fs::metadata(p("a/dangling")).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // Long target.
        std::os::unix::fs::symlink(&long_target, p("a/long-link")).unwrap();
        assert_eq!(
            fs::read_link(p("a/long-link")).unwrap(),
            Path::new(&long_target)
        );
        // A link to a directory, traversed by the kernel.
        std::os::unix::fs::symlink("bee", p("a/dir-link")).unwrap();
        assert!(fs::metadata(p("a/dir-link")).unwrap().is_dir());
        assert_eq!(list(&p("a/dir-link")), ["c"]);
    });
    assert_eq!(read(&m.path("a/rel-link")), b"three");
    assert_eq!(
        fs::read_link(m.path("a/long-link")).unwrap(),
        Path::new(&long_target)
    );
    // Removing a symlink leaves its target alone.
    fs::remove_file(m.path("a/rel-link")).unwrap();
    assert_eq!(read(&m.path("a/bee/c/three.txt")), b"three");
    m.unmount();
}

#[test]
fn hard_links() {
    let (_env, m) = build_then_remount(|m| {
        let p = |r: &str| m.path(r);
        fs::create_dir(p("d")).unwrap();
        write(&p("d/target.txt"), b"two");
        // Same inode, shared contents, across directories.
        fs::hard_link(p("d/target.txt"), p("hard")).unwrap();
        let (m1, m2) = (
            fs::metadata(p("d/target.txt")).unwrap(),
            fs::metadata(p("hard")).unwrap(),
        );
        assert_eq!(m1.nlink(), 2, "nlink after link()");
        assert_eq!(m2.nlink(), 2, "nlink after link()");
        assert_eq!(m1.ino(), m2.ino(), "hard links share an inode number");
        OpenOptions::new()
            .write(true)
            .open(p("hard"))
            .unwrap()
            .write_all_at(b"TWO and more", 0)
            .unwrap();
        assert_eq!(read(&p("d/target.txt")), b"TWO and more");
        assert_eq!(fs::metadata(p("d/target.txt")).unwrap().len(), 12);
    });
    // Unlinking one name leaves the other with the contents.
    fs::remove_file(m.path("d/target.txt")).unwrap();
    assert_eq!(read(&m.path("hard")), b"TWO and more");
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 1);
    m.unmount();
}

/// A hard-linked symlink stays readable by its inode after the kernel forgets the directory
/// of its freshest name. Under memory pressure the kernel drops unused entries and inodes: a
/// directory goes once nothing below it is in use, while the symlink stays known by another
/// name. The daemon tried only the freshest name, whose directory it no longer knew, and
/// answered `readlink` with ENOENT (the model test hit it about one run in three on a busy
/// machine). Also: the two names share a long target's side file, which goes with the last.
#[test]
fn hard_linked_symlink_reads_after_the_kernel_forgets_one_names_directory() {
    use rustix::fs::{Mode, OFlags};
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let p = |r: &str| m.path(r);
    let side_files = || {
        fs::read_dir(&env.cipher)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".cmkfs.target.")
            })
            .count()
    };
    // A long target (side file) and a short one.
    for (i, len) in [3500usize, 40].into_iter().enumerate() {
        let target = format!("~{}", "t".repeat(len - 1));
        let (dir, a, b) = (format!("d{i}"), format!("d{i}/a"), format!("b{i}"));
        fs::create_dir(p(&dir)).unwrap();
        // Made at `b`, linked as `d/a`: `d/a` is the freshest name the daemon knows.
        std::os::unix::fs::symlink(&target, p(&b)).unwrap();
        // `b`, held, keeps the symlink's inode known to the kernel throughout.
        let keep = rustix::fs::open(
            p(&b),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        fs::hard_link(p(&b), p(&a)).unwrap();
        // Memory pressure, asked for (root): `d/a` and `d` go, and the kernel tells the
        // daemon to forget `d`.
        if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "2") {
            eprintln!("cannot drop the kernel's caches ({e}): checked without the forget");
        }
        // The forget is sent asynchronously: give the daemon a moment to take it.
        std::thread::sleep(Duration::from_millis(300));
        // Through the held descriptor: no walk, so no lookup of `b` makes it the freshest.
        let got = rustix::fs::readlinkat(&keep, c"", Vec::new()).unwrap_or_else(|e| {
            panic!("readlink of {b} ({len}-byte target) after {dir} was forgotten: {e}")
        });
        assert_eq!(got.as_bytes(), target.as_bytes(), "{b}");
        drop(keep);
        assert_eq!(fs::read_link(p(&a)).unwrap(), Path::new(&target));
        // One name gone, the other still reads its target; both gone, the side file too.
        fs::remove_file(p(&b)).unwrap();
        assert_eq!(fs::read_link(p(&a)).unwrap(), Path::new(&target));
        assert_eq!(side_files(), usize::from(len > 3039), "{a} alone");
        fs::remove_file(p(&a)).unwrap();
        assert_eq!(side_files(), 0, "{a} and {b} gone");
    }
    m.unmount();
}

#[test]
fn long_unicode_and_many_names() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);

    // NAME_MAX-long names: their encrypted, base64url form exceeds 255 bytes, so they take
    // the long-name path of the format.
    let longest = "L".repeat(255);
    let long_unicode = "é".repeat(127); // 254 bytes of UTF-8
    let spaced = "with spaces, quotes ' \" and ünïcödé ✓".to_string();
    for name in [&longest, &long_unicode, &spaced] {
        write(&m.path(name), name.as_bytes());
    }
    fs::create_dir(m.path(format!("d{}", "D".repeat(254)))).unwrap();
    // A name one byte too long is refused by the kernel or the filesystem, never truncated.
    assert!(File::create(m.path("M".repeat(256))).is_err());

    // A directory with enough entries to need several readdir calls.
    fs::create_dir(m.path("many")).unwrap();
    let mut want: Vec<String> = (0..300)
        .map(|i| format!("entry-{i:04}-{}", "n".repeat(i % 50)))
        .collect();
    for n in &want {
        write(&m.path("many").join(n), n.as_bytes());
    }
    want.sort();
    assert_eq!(list(&m.path("many")), want);

    let check = |m: &Mount| {
        for name in [&longest, &long_unicode, &spaced] {
            assert_eq!(read(&m.path(name)), name.as_bytes(), "contents of {name:?}");
        }
        assert!(m.path(format!("d{}", "D".repeat(254))).is_dir());
        assert_eq!(list(&m.path("many")), want);
    };
    check(&m);
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    check(&m);
    m.unmount();
}

#[test]
fn remount_keeps_everything() {
    let env = Env::new();
    env.init(&env.cipher);
    let info_before = env.info(&env.cipher);
    let mut rng = StdRng::seed_from_u64(seed("remount_keeps_everything"));

    let m = env.mount_foreground(&env.cipher, &env.mnt);
    fs::create_dir_all(m.path("docs/deep/er")).unwrap();
    fs::create_dir(m.path("empty-dir")).unwrap();
    File::create(m.path("empty-file")).unwrap();
    write(&m.path("docs/big.bin"), &random_bytes(&mut rng, 300_000));
    write(
        &m.path("docs/deep/er/tail.bin"),
        &random_bytes(&mut rng, 4097),
    );
    write(&m.path("private.txt"), b"mode 0600");
    fs::set_permissions(m.path("private.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(m.path("docs/deep"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("docs/big.bin", m.path("big-link")).unwrap();
    fs::hard_link(m.path("docs/deep/er/tail.bin"), m.path("tail-hardlink")).unwrap();
    // setattr(times): an mtime far from "now" must come back exactly.
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(m.path("docs/big.bin"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let view = tree_view(&m.mnt);
    m.unmount();

    for round in 0..2 {
        // Both mount flavours.
        let m = if round == 0 {
            env.mount(&env.cipher, &env.mnt)
        } else {
            env.mount_foreground(&env.cipher, &env.mnt)
        };
        assert_eq!(
            tree_view(&m.mnt),
            view,
            "tree changed across remount {round}"
        );
        assert_eq!(
            fs::metadata(m.path("docs/big.bin"))
                .unwrap()
                .modified()
                .unwrap(),
            mtime,
            "mtime after remount {round}"
        );
        m.unmount();
    }
    assert_eq!(
        env.info(&env.cipher),
        info_before,
        "mounting must not change the header"
    );
}

#[test]
fn sigterm_to_the_daemon_unmounts_cleanly() {
    // What a shutdown or `kill` does: the daemon must unmount and exit, keeping what was
    // written (and fsynced), and the volume must mount again.
    let mut rng = StdRng::seed_from_u64(seed("sigterm_to_the_daemon_unmounts_cleanly"));
    let data = random_bytes(&mut rng, 3 * SECTOR + 7);
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let mut f = File::create(m.path("kept.bin")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let pids = daemon_pids_of(&env.home, &env.mnt);
    assert!(
        !pids.is_empty(),
        "cannot find the daemon of {}",
        env.mnt.display()
    );
    for &p in &pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(p, libc::SIGTERM);
        }
    }
    assert!(
        wait_until(UMOUNT_TIMEOUT, || !is_mounted(&env.mnt)),
        "SIGTERM did not unmount {}",
        env.mnt.display()
    );
    assert!(
        wait_until(DAEMON_EXIT_TIMEOUT, || pids.iter().all(|&p| !pid_alive(p))),
        "the daemon did not exit after SIGTERM"
    );
    drop(m); // nothing left to clean up; the guard just checks and returns

    let m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq(
        "after SIGTERM and remount",
        &read(&m.path("kept.bin")),
        &data,
    );
    m.unmount();
}

#[test]
fn info_reports_the_header() {
    let env = Env::new();
    env.init(&env.cipher);
    let info = env.info(&env.cipher);
    let field = |k: &str| {
        info.get(k)
            .unwrap_or_else(|| panic!("info --json lacks {k:?}: {info}"))
    };
    for k in [
        "volume_id",
        "cipher",
        "wrap_alg",
        "dek_fingerprint",
        "sector_size",
    ] {
        field(k);
    }
    let kid = field("key_id").as_str().expect("key_id is a string");
    let version = kid
        .strip_prefix("local:/keys/default/")
        .unwrap_or_else(|| panic!("key_id {kid:?} is not a versioned id of the default key"));
    assert!(
        version.len() == 32 && version.bytes().all(|b| b.is_ascii_hexdigit()),
        "key version {version:?} is not 32 hex digits"
    );
    assert_eq!(field("sector_size").as_u64(), Some(SECTOR as u64));
    assert_eq!(field("wrap_alg").as_str(), Some("RSA-OAEP-256"));
    // The info output never carries key material.
    let text = info.to_string().to_ascii_lowercase();
    for secret in ["\"dek\"", "private"] {
        assert!(!text.contains(secret), "info shows {secret}: {info}");
    }

    // A second volume has its own id and data key under the same KEK version.
    let c2 = env.dir("cipher2");
    env.init(&c2);
    let info2 = env.info(&c2);
    assert_ne!(info2["volume_id"], info["volume_id"]);
    assert_ne!(info2["dek_fingerprint"], info["dek_fingerprint"]);
    assert_eq!(info2["key_id"], info["key_id"]);

    // A fresh volume holds only metadata.
    assert!(
        data_files(&env.cipher).is_empty(),
        "a fresh volume has no data files: {:?}",
        snapshot(&env.cipher)
    );
}

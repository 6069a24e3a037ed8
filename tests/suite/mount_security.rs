//! Real-mount tests of what reaches the backing directory: no plaintext in contents, names or
//! symlink targets; identical plaintext never gives identical ciphertext; and one volume's
//! ciphertext copied into another volume does not decrypt there.

use crate::common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn backing_dir_holds_no_plaintext() {
    let tag = unique_hex();
    // Distinctive markers, unique per run, for each place plaintext could leak from.
    let content = format!("PLAINTEXT-CONTENT-MARKER-{tag}");
    let tail = format!("tl-{tag}"); // 15 bytes: a file shorter than one AES block
    let fname = format!("secretfilename{tag}");
    let dname = format!("secretdirname{tag}");
    let target = format!("secretlinktarget{tag}");
    assert_eq!(tail.len(), 15);

    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let dir = m.path(&dname);
    fs::create_dir(&dir).unwrap();
    fs::create_dir(m.path(format!("{dname}-empty"))).unwrap();
    // 1 MiB + 3 of the marker repeated: identical plaintext blocks everywhere, so any
    // ECB-like or per-sector-deterministic leak shows up as a repeat of the marker.
    write(
        &dir.join(format!("{fname}.txt")),
        &repeated(content.as_bytes(), (1 << 20) + 3),
    );
    write(&m.path(format!("{fname}-small")), content.as_bytes());
    write(&m.path(format!("{fname}-tail")), tail.as_bytes());
    write(
        &m.path(format!("{fname}-16")),
        &tail.as_bytes()[..15].repeat(2)[..16],
    );
    std::os::unix::fs::symlink(format!("{target}/x"), m.path(format!("{fname}-link"))).unwrap();
    std::os::unix::fs::symlink(format!("{target}/{target}"), dir.join("second-link")).unwrap();
    fs::hard_link(
        m.path(format!("{fname}-small")),
        dir.join(format!("{fname}-hardlink")),
    )
    .unwrap();
    // A NAME_MAX-long name made of the marker (long-name scheme).
    let long: String = fname.repeat(255 / fname.len() + 1)[..255].to_string();
    write(&m.path(&long), content.as_bytes());

    let markers: Vec<&[u8]> = vec![
        content.as_bytes(),
        tail.as_bytes(),
        fname.as_bytes(),
        dname.as_bytes(),
        target.as_bytes(),
    ];
    // While mounted (catches plaintext in temp files the daemon might keep around) ...
    let found = find_markers(&env.cipher, &markers);
    assert!(
        found.is_empty(),
        "plaintext in the backing dir while mounted:\n{found:#?}"
    );
    m.unmount();
    // ... and at rest.
    let found = find_markers(&env.cipher, &markers);
    assert!(
        found.is_empty(),
        "plaintext in the backing dir at rest:\n{found:#?}"
    );

    // The scan was not vacuous: the ciphertext is there.
    let total: u64 = walk(&env.cipher)
        .iter()
        .filter_map(|p| fs::symlink_metadata(p).ok())
        .filter(|md| md.is_file())
        .map(|md| md.len())
        .sum();
    assert!(total > 1 << 20, "backing dir holds only {total} bytes");
    // And nothing was lost: the plaintext view still has it all.
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(
        read(&m.path(&dname).join(format!("{fname}.txt"))),
        repeated(content.as_bytes(), (1 << 20) + 3)
    );
    assert_eq!(read(&m.path(&long)), content.as_bytes());
    assert_eq!(read(&m.path(format!("{fname}-tail"))), tail.as_bytes());
    assert_eq!(
        fs::read_link(m.path(format!("{fname}-link"))).unwrap(),
        PathBuf::from(format!("{target}/x"))
    );
    m.unmount();
}

/// The ciphertext of a backing file of the volume in `cipher` (after its header area).
fn body(cipher: &Path, p: &Path) -> Vec<u8> {
    read(p)[data_offset(cipher) as usize..].to_vec()
}

/// The non-metadata directories directly in `dir`.
fn data_dirs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !is_metadata_name(p.file_name().unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn same_plaintext_gives_different_ciphertext() {
    let mut rng = StdRng::seed_from_u64(seed("same_plaintext_gives_different_ciphertext"));
    // Three identical sectors and a 17-byte tail: the same plaintext sector at different
    // positions and in different files must never encrypt the same way.
    let sector = random_bytes(&mut rng, SECTOR);
    let mut plain = sector.repeat(3);
    plain.extend_from_slice(&sector[..17]);

    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    write(&m.path("copy-1"), &plain);
    write(&m.path("copy-2"), &plain);
    for d in ["dir-1", "dir-2"] {
        fs::create_dir(m.path(d)).unwrap();
        write(&m.path(d).join("same-name"), &plain);
    }
    m.unmount();

    let files = data_files_in(&env.cipher);
    assert_eq!(files.len(), 2, "two backing files in the root: {files:?}");
    let (a, b) = (read(&files[0]), read(&files[1]));
    assert_eq!(a.len() as u64, backing_len(&env.cipher, plain.len() as u64));
    assert_ne!(
        a[..FILE_HEADER_LEN as usize],
        b[..FILE_HEADER_LEN as usize],
        "two files share a file header (file id)"
    );
    let (ba, bb) = (body(&env.cipher, &files[0]), body(&env.cipher, &files[1]));
    assert_ne!(ba, bb, "identical plaintext gave identical ciphertext");
    let sectors = |v: &[u8]| -> Vec<Vec<u8>> { v.chunks(SECTOR).map(<[u8]>::to_vec).collect() };
    let all: Vec<Vec<u8>> = sectors(&ba).into_iter().chain(sectors(&bb)).collect();
    let distinct: BTreeSet<&Vec<u8>> = all.iter().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "a ciphertext sector repeats (tweak not unique per file and sector)"
    );
    assert!(
        !ba.windows(16).any(|w| w == &sector[..16]),
        "plaintext visible in the ciphertext"
    );

    // Same name in two directories: different encrypted names and different ciphertext.
    let dirs = data_dirs_in(&env.cipher);
    assert_eq!(dirs.len(), 2, "two backing dirs: {dirs:?}");
    let (fa, fb) = (data_files_in(&dirs[0]), data_files_in(&dirs[1]));
    assert_eq!(
        (fa.len(), fb.len()),
        (1, 1),
        "one file per dir: {fa:?} {fb:?}"
    );
    assert_ne!(
        fa[0].file_name(),
        fb[0].file_name(),
        "the same name in two directories encrypted to the same name (names must be per-directory)"
    );
    assert_ne!(body(&env.cipher, &fa[0]), body(&env.cipher, &fb[0]));
}

#[test]
fn foreign_ciphertext_does_not_decrypt() {
    let marker = format!("VOLUME-A-SECRET-{}-", unique_hex());
    let secret = repeated(marker.as_bytes(), 2 * SECTOR + 5);

    let env = Env::new();
    let (ca, cb) = (env.cipher.clone(), env.dir("cipher-b"));
    // Same vault and same KEK: only the per-volume DEKs differ.
    env.init(&ca);
    env.init(&cb);
    let m = env.mount(&ca, &env.mnt);
    write(&m.path("secret.bin"), &secret);
    m.unmount();
    let m = env.mount(&cb, &env.mnt);
    write(&m.path("victim.bin"), &vec![b'v'; secret.len()]);
    write(&m.path("other.txt"), b"untouched");
    m.unmount();

    let fa = data_files_in(&ca);
    assert_eq!(fa.len(), 1, "{fa:?}");
    // B's backing file of victim.bin is the one with victim's size.
    let fb: Vec<PathBuf> = data_files_in(&cb)
        .into_iter()
        .filter(|p| fs::metadata(p).unwrap().len() == backing_len(&cb, secret.len() as u64))
        .collect();
    assert_eq!(fb.len(), 1, "{fb:?}");
    // Attack 1: A's backing file over B's victim.bin (B's name, A's header + ciphertext).
    fs::copy(&fa[0], &fb[0]).unwrap();
    // Attack 2: A's backing file beside it, under A's encrypted name.
    let foreign_name = fa[0].file_name().unwrap();
    if !cb.join(foreign_name).exists() {
        fs::copy(&fa[0], cb.join(foreign_name)).unwrap();
    }

    let m = env.mount(&cb, &env.mnt);
    match fs::read(m.path("victim.bin")) {
        Ok(got) => {
            assert_ne!(got, secret, "volume B decrypted volume A's file");
            assert!(
                !got.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "volume B's view of A's ciphertext contains A's plaintext"
            );
        }
        Err(e) => eprintln!("reading the foreign ciphertext failed (fine): {e}"),
    }
    // Whatever the listing shows for the foreign entry, it is not A's name or plaintext.
    match fs::read_dir(&m.mnt) {
        Ok(rd) => {
            for e in rd.flatten() {
                assert_ne!(e.file_name(), "secret.bin", "B decrypted A's file name");
                let p = e.path();
                if let Ok(f) = File::open(&p) {
                    let mut buf = vec![0u8; secret.len()];
                    if let Ok(n) = f.read_at(&mut buf, 0) {
                        assert!(
                            !buf[..n]
                                .windows(marker.len())
                                .any(|w| w == marker.as_bytes()),
                            "{} shows A's plaintext",
                            p.display()
                        );
                    }
                }
            }
        }
        Err(e) => eprintln!("listing B with a foreign entry failed (fine): {e}"),
    }
    assert_eq!(read(&m.path("other.txt")), b"untouched");
    m.unmount();

    // The attack was meaningful: A itself still decrypts its file.
    let m = env.mount(&ca, &env.mnt);
    assert_eq!(read(&m.path("secret.bin")), secret);
    m.unmount();
}

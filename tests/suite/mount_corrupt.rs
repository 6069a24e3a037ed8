//! Bad input from the backing store is input too (issue 6): a file header that is corrupt or
//! truncated, a name that does not decrypt, a backing file changed behind the mount → EIO (or
//! the entry hidden) for that file and a log line naming it, while the rest keeps working.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn corrupt_backing_files_fail_alone_and_are_logged() {
    // Without the writeback cache: with it the kernel keeps serving the pages it was given
    // (written through the mount) and owns the file's size and mtime, so it does not see a
    // change behind the mount until it drops those pages (README, "Writes, errors and the
    // writeback cache"); this test reads the backing store again.
    let env = Env::new().in_mode(&["--no-writeback-cache"]);
    env.init(&env.cipher);
    let m = env.mount_foreground(&env.cipher, &env.mnt);
    for name in ["good", "badheader", "short"] {
        write(
            &m.path(name),
            format!("{name} contents").repeat(500).as_bytes(),
        );
    }
    // Find each file's backing path by inode (the mount shows backing inode numbers).
    let backing = |name: &str| {
        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(m.path(name)).unwrap());
        data_files(&env.cipher)
            .into_iter()
            .find(|p| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap()) == ino)
            .expect("backing file")
    };
    let bad = backing("badheader");
    let short = backing("short");
    // Changed behind the mount: a header that is not ours, and one cut to 10 bytes.
    fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .write_all_at(&[0xEE; 32], 0)
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(10)
        .unwrap();
    // A foreign entry whose name does not decrypt in this directory.
    fs::write(env.cipher.join("QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"), b"junk").unwrap();

    let err = fs::read(m.path("badheader")).expect_err("corrupt header must not read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = fs::metadata(m.path("short")).and_then(|_| fs::read(m.path("short")));
    assert_eq!(
        err.expect_err("truncated header").raw_os_error(),
        Some(libc::EIO)
    );
    // The rest of the volume keeps working.
    assert_eq!(
        read(&m.path("good")),
        "good contents".repeat(500).as_bytes()
    );
    write(&m.path("new"), b"still writable");
    assert_eq!(read(&m.path("new")), b"still writable");
    let names: Vec<String> = fs::read_dir(&env.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&"good".to_string()) && names.contains(&"new".to_string()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("QUJD")),
        "undecryptable names stay hidden: {names:?}"
    );

    // Each problem is a log line naming the backing file.
    let log = m.daemon_log();
    for p in [&bad, &short] {
        assert!(
            log.contains(&p.display().to_string()),
            "log does not name {}:\n{log}",
            p.display()
        );
    }
    assert!(
        log.contains("QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"),
        "log does not name the foreign entry:\n{log}"
    );
    m.unmount();
}

/// The daemon's peak resident memory in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The backing entry of mount path `p` (found by inode: the mount shows backing numbers).
fn backing_of(env: &Env, p: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ino = fs::symlink_metadata(p).unwrap().ino();
    walk(&env.cipher)
        .into_iter()
        .find(|b| fs::symlink_metadata(b).map(|m| m.ino()).ok() == Some(ino))
        .expect("backing entry")
}

#[test]
fn the_daemon_never_follows_a_symlink_planted_in_the_backing_store() {
    // Issue 12: a backing file replaced by a symlink within the attribute-cache window made
    // the (root) daemon write a file header and ciphertext through it, outside the volume.
    let env = Env::new();
    env.init(&env.cipher);
    let outside = env.dir("outside");
    let target = outside.join("target");
    let m = env.mount(&env.cipher, &env.mnt);
    type Attack = fn(&std::path::Path) -> std::io::Result<()>;
    let attacks: [(&str, Attack); 4] = [
        ("write", |p| {
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"ciphertext?"))
        }),
        ("truncate", |p| {
            fs::OpenOptions::new().write(true).open(p)?.set_len(5000)
        }),
        ("chmod", |p| {
            fs::set_permissions(p, fs::Permissions::from_mode(0o777))
        }),
        ("setxattr", |p| {
            let (c, n) = (
                std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap(),
                std::ffi::CString::new("user.x").unwrap(),
            );
            // SAFETY: valid C strings and buffer.
            match unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        }),
    ];
    for (what, attack) in attacks {
        // An empty file outside the volume: the old daemon wrote a file header into it.
        fs::write(&target, b"").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let name = m.path(what);
        write(&name, b"");
        let b = backing_of(&env, &name);
        // Cached by the kernel (attributes and dentry live for a second), then swapped
        // behind its back, then attacked within that window.
        let _ = fs::metadata(&name).unwrap();
        fs::remove_file(&b).unwrap();
        std::os::unix::fs::symlink(&target, &b).unwrap();
        let _ = attack(&name);
        let meta = fs::metadata(&target).unwrap();
        assert_eq!(meta.len(), 0, "{what}: written through a planted symlink");
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o644,
            "{what}: mode changed through it"
        );
        let x = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C strings; a size query.
        let has_xattr =
            unsafe { libc::getxattr(x.as_ptr(), c"user.x".as_ptr(), std::ptr::null_mut(), 0) } >= 0;
        assert!(!has_xattr, "{what}: xattr set through it");
    }
    // A directory swapped for a symlink to an outside directory: nothing is created there.
    fs::create_dir(m.path("dir")).unwrap();
    let b = backing_of(&env, &m.path("dir"));
    let _ = fs::metadata(m.path("dir")).unwrap();
    fs::remove_dir_all(&b).unwrap();
    std::os::unix::fs::symlink(&outside, &b).unwrap();
    let _ = fs::write(m.path("dir/new"), b"x");
    let _ = fs::create_dir(m.path("dir/newdir"));
    let names: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("target")],
        "outside dir touched"
    );
    m.unmount();
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn directory_ids_are_read_with_a_bound_and_never_through_a_symlink_or_fifo() {
    // Issue 12: a directory-id file swapped for a symlink to a 200 MB file was read whole.
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    for d in ["symlink", "fifo", "huge", "good"] {
        fs::create_dir(m.path(d)).unwrap();
        write(&m.path(format!("{d}/f")), b"inside");
    }
    let backing: Vec<_> = ["symlink", "fifo", "huge"]
        .iter()
        .map(|d| backing_of(&env, &m.path(d)))
        .collect();
    m.unmount();
    let big = env.root.join("big");
    fs::File::create(&big).unwrap().set_len(200 << 20).unwrap();
    let id = |d: &std::path::Path| d.join(".cmkfs.dirid");
    fs::remove_file(id(&backing[0])).unwrap();
    std::os::unix::fs::symlink(&big, id(&backing[0])).unwrap();
    fs::remove_file(id(&backing[1])).unwrap();
    let c = std::ffi::CString::new(id(&backing[1]).as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    fs::remove_file(id(&backing[2])).unwrap();
    fs::File::create(id(&backing[2]))
        .unwrap()
        .set_len(200 << 20)
        .unwrap();

    let m = env.mount(&env.cipher, &env.mnt);
    for d in ["symlink", "fifo", "huge"] {
        // The watchdog turns a hang (a blocking open of the FIFO) into a failure.
        let err = fs::read_dir(m.path(d)).map(|_| ()).expect_err(d);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{d}: {err}");
        assert!(fs::read(m.path(format!("{d}/f"))).is_err(), "{d}");
    }
    assert_eq!(read(&m.path("good/f")), b"inside", "the rest keeps working");
    let pid = m.daemon_pid().expect("daemon pid");
    let peak = peak_rss_kib(pid);
    assert!(
        peak < 120 * 1024,
        "the daemon read a huge id file whole: peak RSS {peak} KiB"
    );
    m.unmount();
}

/// Fourth hostile finding of session 7: another volume's valid header (same vault, a key the
/// mounting identity unwraps) copied over `cmkfs.volume.json` mounted without a word: an
/// empty view, and new files written under the other volume's DEK. Now `mount` (before it
/// writes anything) and `fsck` (before a repair would quarantine every entry) refuse with
/// one line, since not one name at the root decrypts.
#[test]
fn another_volumes_header_over_this_one_is_refused_by_mount_and_fsck() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    write(&m.path("old"), b"victim data");
    fs::create_dir(m.path("dir")).unwrap();
    m.unmount();
    let other = env.dir("other");
    env.init(&other);
    let header = env.cipher.join("cmkfs.volume.json");
    let own = fs::read(&header).unwrap();
    fs::copy(other.join("cmkfs.volume.json"), &header).unwrap();
    let before = snapshot(&env.cipher);
    let out = env.try_mount(&env.cipher, &env.mnt);
    assert!(!out.ok(), "a foreign header was mounted:\n{out}");
    out.assert_clear_error();
    assert!(
        out.stderr.contains("does not belong to the files in")
            && out
                .stderr
                .contains("restore this volume's own cmkfs.volume.json"),
        "{out}"
    );
    assert!(!is_mounted(&env.mnt));
    for args in [&["fsck"][..], &["fsck", "--repair"]] {
        let mut a: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        a.push(env.cipher.as_os_str());
        let out = env.cmkfs(&a);
        assert!(!out.ok(), "{args:?} took a foreign header:\n{out}");
        out.assert_clear_error();
        assert!(
            out.stderr.contains("does not belong to the files in"),
            "{out}"
        );
    }
    assert_same_snapshot("backing dir", &before, &snapshot(&env.cipher));
    // Its own header back: everything is there. (A fresh volume, no names yet, mounts: every
    // other mount test.)
    fs::write(&header, own).unwrap();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("old")), b"victim data");
    m.unmount();
}

/// Second hostile finding of session 7: a short name planted in long form
/// (`cmkfs.long.<hash>` and a side file holding an encoding of at most 255 bytes) was listed
/// twice, left a ghost after `rm` that made the directory impossible to remove, and `fsck`
/// called the volume clean. Now readdir hides it (logged), fsck reports it and `--repair`
/// moves it to the quarantine.
#[test]
fn a_short_name_planted_in_long_form_is_hidden_and_quarantined() {
    use base64::Engine as _;
    use sha2::Digest as _;
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    fs::create_dir(m.path("dd")).unwrap();
    write(&m.path("dd/x"), b"x");
    m.unmount();
    let visible = |e: &fs::DirEntry| !e.file_name().to_string_lossy().starts_with(['.', 'c']);
    let bdir = fs::read_dir(&env.cipher)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().is_dir() && visible(e))
        .unwrap()
        .path();
    let ent = fs::read_dir(&bdir)
        .unwrap()
        .map(|e| e.unwrap())
        .find(visible)
        .unwrap()
        .file_name();
    let enc = ent.to_str().unwrap();
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(enc));
    fs::write(bdir.join(format!("cmkfs.long.{hash}.name")), enc).unwrap();
    fs::copy(bdir.join(enc), bdir.join(format!("cmkfs.long.{hash}"))).unwrap();

    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(list(&m.path("dd")), ["x"], "the planted twin is listed");
    fs::remove_file(m.path("dd/x")).unwrap();
    assert!(list(&m.path("dd")).is_empty(), "a ghost stays listed");
    m.unmount();
    let out = env.cmkfs(&["fsck".as_ref(), env.cipher.as_os_str()]);
    assert!(!out.ok(), "fsck calls the planted entry clean:\n{out}");
    assert!(out.stdout.contains("cmkfs never writes one"), "{out}");
    let out = env.cmkfs(&["fsck".as_ref(), "--repair".as_ref(), env.cipher.as_os_str()]);
    assert!(
        out.stdout.contains("long_name_not_canonical") && out.stdout.contains("moved to"),
        "{out}"
    );
    let m = env.mount(&env.cipher, &env.mnt);
    fs::remove_dir(m.path("dd")).unwrap();
    m.unmount();
}

/// The plaintext names in directory `p`, sorted.
fn list(p: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Attack 17 F2: a `.cmkfs.dirid` of 16 zero bytes is what a lost write leaves (never a
/// random id). The mount took it as an id: the directory listed empty (no name decrypts)
/// and a file made in it would have been encrypted under the zero id, hiding the loss. Now
/// the directory answers EIO like any corrupt id (the rest of the volume works), and `fsck`
/// reports `dir_id_zero` with what happened; an empty directory gets a fresh id on repair.
#[test]
fn an_all_zero_directory_id_is_refused_by_the_mount_and_reported_by_fsck() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    for d in ["lost", "good"] {
        fs::create_dir(m.path(d)).unwrap();
        write(&m.path(format!("{d}/f")), b"inside");
    }
    let lost = backing_of(&env, &m.path("lost"));
    m.unmount();
    let id = lost.join(".cmkfs.dirid");
    fs::remove_file(&id).unwrap();
    fs::write(&id, [0u8; 16]).unwrap();

    let m = env.mount(&env.cipher, &env.mnt);
    let err = fs::read_dir(m.path("lost")).map(|_| ()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = fs::write(m.path("lost/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(read(&m.path("good/f")), b"inside", "the rest keeps working");
    m.unmount();

    let out = env.cmkfs(&["fsck".as_ref(), env.cipher.as_os_str()]);
    assert!(!out.ok(), "{out}");
    assert!(
        out.stdout.contains("dir_id_zero")
            && out
                .stdout
                .contains("is all zeros: its write never reached the disk"),
        "{out}"
    );
}

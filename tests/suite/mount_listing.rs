//! Listings with attributes (READDIRPLUS, issue 15): the kernel takes each entry's attributes
//! from the listing and makes a dentry of it, so those attributes must be as fresh as a
//! LOOKUP's, and every entry handed out must stay reachable (its lookup counted once).
//!
//! Each test mounts its own volume (see `common` for the hang guards).

use crate::common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};

use common::*;

/// A listing opened before a write, an unlink and a rename through the mount, read after
/// them: the attributes the kernel gets with it are today's (a stale size would make reads
/// stop short), and a removed name is not brought back as a dentry.
#[test]
fn listing_attributes_are_read_when_listed_not_at_opendir() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("grows"), b"0123456789").unwrap();
    fs::write(d.join("gone"), b"x").unwrap();
    fs::write(d.join("old"), b"old contents").unwrap();
    fs::write(d.join("new"), b"the new file, longer").unwrap();

    // opendir: the daemon takes its snapshot of the names now.
    let rd = fs::read_dir(&d).unwrap();
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    OpenOptions::new()
        .append(true)
        .open(d.join("grows"))
        .unwrap()
        .write_all(&big)
        .unwrap();
    fs::remove_file(d.join("gone")).unwrap();
    fs::rename(d.join("new"), d.join("old")).unwrap();
    // The first readdir of the handle: READDIRPLUS.
    let names: BTreeMap<String, u64> = rd
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.ino())
        })
        .collect();
    assert!(
        names.contains_key("grows") && names.contains_key("old"),
        "{names:?}"
    );

    let meta = fs::metadata(d.join("grows")).unwrap();
    assert_eq!(meta.len(), 5010, "size after the listing");
    let mut back = Vec::new();
    File::open(d.join("grows"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back.len(), 5010);
    assert_eq!(&back[10..], &big[..]);
    assert_eq!(
        fs::metadata(d.join("gone")).unwrap_err().kind(),
        ErrorKind::NotFound,
        "an unlinked name must not come back from an older listing"
    );
    assert_eq!(fs::read(d.join("old")).unwrap(), b"the new file, longer");
    assert_eq!(fs::metadata(d.join("old")).unwrap().len(), 20);
    m.unmount();
}

/// A directory long enough to take many READDIRPLUS replies (long names fill each reply
/// after a few entries, so the "reply full" path runs at every batch boundary): every entry
/// listed can then be stat'ed, opened, changed and removed, through the dentries and
/// inodes the listing made; the listing is that of the plain directory.
#[test]
fn every_entry_of_a_long_listing_stays_reachable() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    let plain = env.dir("plain");
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    let n = 300;
    for i in 0..n {
        let name = format!("{i:04}-{}", "n".repeat(100 + i % 50));
        let body = format!("file {i}").repeat(i % 7);
        for dir in [&d, &plain] {
            fs::write(dir.join(&name), &body).unwrap();
        }
        if i % 10 == 0 {
            fs::create_dir(d.join(format!("sub{i}"))).unwrap();
            fs::create_dir(plain.join(format!("sub{i}"))).unwrap();
        }
    }
    let list = |dir: &std::path::Path| -> BTreeMap<String, (bool, u64)> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    (md.is_dir(), if md.is_dir() { 0 } else { md.len() }),
                )
            })
            .collect()
    };
    // Twice: the second listing finds the dentries of the first.
    for round in 0..2 {
        let got = list(&d);
        assert_eq!(got, list(&plain), "round {round}");
        for (name, (is_dir, len)) in &got {
            let p = d.join(name);
            let md = fs::symlink_metadata(&p).unwrap();
            assert_eq!(md.is_dir(), *is_dir, "{name}");
            if !is_dir {
                assert_eq!(fs::read(&p).unwrap(), fs::read(plain.join(name)).unwrap());
                assert_eq!(md.len(), *len);
            }
        }
    }
    // Changes through entries the listing handed out.
    for (i, name) in list(&d).keys().enumerate() {
        let p = d.join(name);
        if p.is_dir() {
            fs::remove_dir(&p).unwrap();
        } else if i % 2 == 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
            fs::remove_file(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    assert!(list(&d).is_empty());
    fs::remove_dir(&d).unwrap();
    m.unmount();
}

/// What `tar -x` does to each file while it holds it open (owner, mode, times through the
/// open file's inode, which the daemon reaches through the open handle rather than the
/// name): each change lands, also on a file renamed while open and on one with no name
/// left, and never on what took its name over.
#[test]
fn owner_mode_and_times_of_an_open_file_land_on_it() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    let p = m.path("f");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"contents").unwrap();
    let fd = f.as_raw_fd();
    let futimens = |fd: i32, secs: i64| {
        let ts = [
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        ];
        // SAFETY: valid descriptor and a two-element array.
        assert_eq!(unsafe { libc::futimens(fd, ts.as_ptr()) }, 0);
    };
    // SAFETY: plain system calls on a valid descriptor.
    unsafe {
        assert_eq!(libc::fchown(fd, 4101, 4102), 0);
        assert_eq!(libc::fchmod(fd, 0o751), 0);
    }
    futimens(fd, 1_000_000_000);
    let md = fs::metadata(&p).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (4101, 4102, 0o751)
    );
    assert_eq!(md.mtime(), 1_000_000_000);

    // Renamed while open, another file in its old place: changes by descriptor reach the
    // open file only.
    fs::rename(&p, m.path("moved")).unwrap();
    fs::write(&p, b"other").unwrap();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::fchmod(fd, 0o600), 0) };
    futimens(fd, 1_100_000_000);
    let moved = fs::metadata(m.path("moved")).unwrap();
    assert_eq!(moved.mode() & 0o7777, 0o600);
    assert_eq!(moved.mtime(), 1_100_000_000);
    let other = fs::metadata(&p).unwrap();
    assert_ne!(other.mode() & 0o7777, 0o600);
    assert_ne!(other.mtime(), 1_100_000_000);
    // By name, the name's file.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o604)).unwrap();
    assert_eq!(
        fs::metadata(m.path("moved")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o604);

    // No name left.
    fs::remove_file(m.path("moved")).unwrap();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::fchmod(fd, 0o640), 0) };
    assert_eq!(f.metadata().unwrap().mode() & 0o7777, 0o640);
    assert_eq!(f.metadata().unwrap().len(), 8);
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"other");
    m.unmount();
}

//! Bad input from the backing store is input too (issue 6): a file header that is corrupt or
//! truncated, a name that does not decrypt, a backing file changed behind the mount → EIO (or
//! the entry hidden) for that file and a log line naming it, while the rest keeps working.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn corrupt_backing_files_fail_alone_and_are_logged() {
    let env = Env::new();
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

//! Crafted archives (valid MAC) that would plant something the host can run or use: a
//! set-id executable as a "data file" (finding F5), file capabilities and other xattrs the
//! kernel acts on, side files with execute or set-id bits, hard links from a data name to a
//! side file, device nodes without `--allow-devices`; and a sparse map whose manifest claims
//! more data bytes than the archive stores (finding F4). Each is refused before its entry
//! exists; what a real volume holds (set-id data files, FIFOs, side files, its own xattrs, a
//! quarantine, a foreign `lost+found`) still restores.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

/// `members` after the root must be refused naming `why`, and the entry `never` must not
/// have been created in the temp tree (refused before it was made).
#[track_caller]
fn refused_before(members: Vec<Raw>, why: &str, never: &str) {
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let mut all = vec![raw("volume/", tar::EntryType::Directory)];
    all.extend(members);
    let a = craft(d.path(), &all, &dek, false);
    let e = try_restore(d.path(), &a, dek).expect_err(why).to_string();
    assert!(e.contains(why), "expected {why:?}, got: {e}");
    assert!(!e.contains('\n'), "more than one line: {e}");
    let p = d.path().join("work/t").join(never);
    assert!(
        p.symlink_metadata().is_err(),
        "{never} was created before the refusal ({e})"
    );
}

fn file(name: &str, data: Vec<u8>, mode: u32) -> Raw {
    let mut f = raw(&format!("volume/{name}"), tar::EntryType::Regular);
    f.data = data;
    f.mode = mode;
    f
}

/// A file member with backing xattrs `xs` (pax `SCHILY.xattr.*` and the record's).
fn with_xattrs(mut f: Raw, xs: &[(&'static str, &[u8])]) -> Raw {
    let path = f.listed.clone().unwrap();
    let mut r = record(&path, Kind::File, None, &f.data);
    r.mode = f.mode;
    for (n, v) in xs {
        let key: &'static str = Box::leak(format!("SCHILY.xattr.{n}").into_boxed_str());
        f.pax.push((key, v.to_vec()));
        r.xattrs.push((n.to_string(), hex::encode(v)));
    }
    r.xattrs.sort();
    f.rec = Some(r);
    f
}

fn elf() -> Vec<u8> {
    fs::read("/usr/bin/id").unwrap_or_else(|_| b"\x7fELF\x02\x01\x01\0 an executable".to_vec())
}

#[test]
fn a_set_id_executable_planted_as_a_data_file_is_refused_before_it_exists() {
    // F5: `/usr/bin/id`'s bytes, mode 04755, owner root, under an encrypted-looking name.
    refused_before(
        vec![file("suidid", elf(), 0o4755)],
        "does not start with a cmkfs file header",
        "suidid",
    );
    // The same without set-id bits, or without any execute bit: a data file always starts
    // with its header.
    for mode in [0o755, 0o644] {
        refused_before(
            vec![file("tool", elf(), mode)],
            "file header has a wrong magic",
            "tool",
        );
    }
    // A header that is not whole, or a first extent that is a hole.
    refused_before(
        vec![file("short", b"CMKF\x02\0".to_vec(), 0o4755)],
        "first 32 bytes are not stored",
        "short",
    );
    let mut bad_version = ct(b"x");
    bad_version[4] = 9;
    refused_before(
        vec![file("v9", bad_version, 0o4755)],
        "version 9 is not supported",
        "v9",
    );
    // Under a long-name entry's name too.
    let long = format!("cmkfs.long.{}", "A".repeat(43));
    refused_before(
        vec![file(&long, elf(), 0o4755)],
        "does not start with a cmkfs file header",
        &long,
    );
}

#[test]
fn file_capabilities_acls_and_other_foreign_backing_xattrs_are_refused() {
    for (name, value) in [
        ("security.capability", &b"\x01\0\0\x02\0\x20\0\0"[..]),
        ("system.posix_acl_access", b"\x02\0\0\0"),
        ("trusted.overlay.opaque", b"y"),
        ("security.selinux", b"unconfined_u:object_r:shadow_t:s0"),
        ("user.mime_type", b"x"),
    ] {
        let f = with_xattrs(file("f", ct(b"data"), 0o755), &[(name, value)]);
        refused_before(vec![f], &format!("backing xattr {name:?}"), "f");
    }
}

#[test]
fn side_files_of_another_shape_mode_or_owner_are_refused() {
    let dirid = |mode: u32, len: usize| file(".cmkfs.dirid", vec![1; len], mode);
    for mode in [0o755, 0o4444, 0o2444, 0o1444, 0o666, 0o100] {
        refused_before(vec![dirid(mode, 16)], "side file of mode", ".cmkfs.dirid");
    }
    refused_before(
        vec![dirid(0o444, 100)],
        "100 bytes (at most 64)",
        ".cmkfs.dirid",
    );
    let mut d = raw("volume/.cmkfs.dirid/", tar::EntryType::Directory);
    d.mode = 0o755;
    refused_before(vec![d], "side file that is a Dir", ".cmkfs.dirid");
    let target = format!(".cmkfs.target.{}", "0".repeat(32));
    let mut t = file(&target, vec![5; 100], 0o400);
    t.uid = 1234;
    refused_before(vec![t], "owned by uid 1234", &target);
    refused_before(
        vec![file(&target, elf(), 0o4500)],
        "side file of mode 4500",
        &target,
    );
    let side = format!("cmkfs.long.{}.name", "B".repeat(43));
    refused_before(
        vec![file(&side, b"QUFB".to_vec(), 0o755)],
        "side file of mode 0755",
        &side,
    );
    // A data name that is a hard link to a side file (its bytes, its owner).
    let mut h = raw("volume/h", tar::EntryType::Link);
    h.link = Some(b"volume/.cmkfs.dirid".to_vec());
    refused_before(
        vec![dirid(0o444, 16), h],
        "hard link to \".cmkfs.dirid\"",
        "h",
    );
    // A data symlink whose target is not an encrypted one.
    let mut l = raw("volume/l", tar::EntryType::Symlink);
    l.link = Some(b"/etc/shadow".to_vec());
    refused_before(vec![l], "target is not an encrypted one", "l");
}

#[test]
fn foreign_and_quarantined_entries_may_not_be_set_id_or_executable() {
    let mut lf = raw("volume/lost+found/", tar::EntryType::Directory);
    lf.mode = 0o700;
    refused_before(
        vec![lf, file("lost+found/x", elf(), 0o755)],
        "not a cmkfs entry, of mode 0755",
        "lost+found/x",
    );
    let mut sg = raw("volume/odd.dir/", tar::EntryType::Directory);
    sg.mode = 0o2777;
    refused_before(vec![sg], "of mode 2777", "odd.dir");
    let mut q = raw("volume/cmkfs.quarantine/", tar::EntryType::Directory);
    q.mode = 0o700;
    refused_before(
        vec![q, file("cmkfs.quarantine/f", elf(), 0o4644)],
        "of mode 4644",
        "cmkfs.quarantine/f",
    );
    // A quarantine that is a link to a host directory: fsck would move entries out through it.
    let mut ql = raw("volume/cmkfs.quarantine", tar::EntryType::Symlink);
    ql.link = Some(b"/tmp".to_vec());
    refused_before(
        vec![ql],
        "the quarantine of a volume is a directory",
        "cmkfs.quarantine",
    );
}

/// Restores as `restore` would, recreating device nodes.
fn try_restore_devices(dir: &Path, archive: &Path, dek: Dek) -> Result<(), BackupError> {
    let sealed = read_sealed(archive)?;
    let manifest = sealed.open(&dek, false)?;
    let link = Link {
        sealed,
        manifest,
        dek,
        inner: None,
    };
    let t = dir.join("work/t");
    fs::create_dir_all(&t).unwrap();
    let mut tree = Tree::new(&t)?;
    tree.allow_devices = true;
    apply(&mut tree, None, &link, &mut |_, _| {}).map(|_| ())
}

#[test]
fn device_nodes_are_refused_without_allow_devices_and_recreated_with_it() {
    let dev = || {
        let mut b = raw("volume/sda", tar::EntryType::Block);
        b.mode = 0o666;
        b.rdev = Some((8, 0));
        b
    };
    refused_before(
        vec![dev()],
        "block device node \"sda\" (device 8:0, mode 0666, owner 0); nothing was restored: \
         device nodes are recreated only with `cmkfs restore --allow-devices`",
        "sda",
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: mknod is not allowed, the --allow-devices half is skipped");
        return;
    }
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let a = craft(
        d.path(),
        &[raw("volume/", tar::EntryType::Directory), dev()],
        &dek,
        false,
    );
    try_restore_devices(d.path(), &a, dek).unwrap();
    let md = fs::symlink_metadata(d.path().join("work/t/sda")).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!(
        (md.rdev(), md.mode() & 0o7777),
        (libc::makedev(8, 0), 0o666)
    );
}

#[test]
fn what_a_real_volume_holds_still_restores_byte_for_byte() {
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let suid = ct(b"setuid plaintext's ciphertext");
    let target = format!(".cmkfs.target.{}", "a".repeat(32));
    let long = format!("cmkfs.long.{}", "C".repeat(43));
    let mut fifo = raw("volume/fifo", tar::EntryType::Fifo);
    fifo.mode = 0o640;
    let mut sticky = raw("volume/sticky/", tar::EntryType::Directory);
    sticky.mode = 0o1777;
    let mut setgid = raw("volume/setgid/", tar::EntryType::Directory);
    setgid.mode = 0o2750;
    let mut lf = raw("volume/lost+found/", tar::EntryType::Directory);
    lf.mode = 0o700;
    let mut q = raw("volume/cmkfs.quarantine/", tar::EntryType::Directory);
    q.mode = 0o700;
    let mut l = raw("volume/l", tar::EntryType::Symlink);
    l.link = Some(target.clone().into_bytes());
    let mut h = raw("volume/h", tar::EntryType::Link);
    h.link = Some(b"volume/suid".to_vec());
    let members = vec![
        raw("volume/", tar::EntryType::Directory),
        file(".cmkfs.dirid", vec![9; 16], 0o444),
        file(&target, vec![5; 100], 0o400),
        file(&format!("{long}.name"), b"QUFB".to_vec(), 0o644),
        file(&long, ct(b"long"), 0o600),
        with_xattrs(
            file("suid", suid.clone(), 0o4755),
            &[("user.cmkfs.AAAA", b"sealed"), ("user.cmkfs.h.BBBB", b"x")],
        ),
        file("empty", Vec::new(), 0o6755),
        h,
        l,
        fifo,
        sticky,
        setgid,
        file("setgid/.cmkfs.replaced", Vec::new(), 0o400),
        lf,
        q,
        file("cmkfs.quarantine/junk", b"not cmkfs".to_vec(), 0o600),
    ];
    let a = craft(d.path(), &members, &dek, false);
    try_restore(d.path(), &a, dek).unwrap();
    let t = d.path().join("work/t");
    let md = fs::metadata(t.join("suid")).unwrap();
    assert_eq!(
        (fs::read(t.join("suid")).unwrap(), md.mode() & 0o7777),
        (suid, 0o4755)
    );
    assert_eq!(md.nlink(), 2, "the hard link");
    assert!(fs::symlink_metadata(t.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(t.join("sticky").is_dir() && t.join("lost+found").is_dir());
    assert_eq!(fs::read(t.join(&target)).unwrap(), vec![5; 100]);
    assert_eq!(
        fs::read(t.join("cmkfs.quarantine/junk")).unwrap(),
        b"not cmkfs"
    );
}

#[test]
fn a_sparse_map_is_bounded_by_the_bytes_the_archive_stores_not_by_what_it_claims() {
    // F4: 2000 one-byte extents 4 KiB apart (8 MB of blocks from 2 KB of data), with a
    // manifest that claims plenty of data bytes (the MAC is the crafter's).
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let mut m = many_extents("s", 2000);
    let mut rec = record("s", Kind::File, None, b"");
    rec.size = 2000 * 4096;
    rec.extents = extents_of(2000);
    m.rec = Some(rec);
    let a = craft_with(
        d.path(),
        &[raw("volume/", tar::EntryType::Directory), m],
        &dek,
        false,
        1 << 40,
    );
    let e = try_restore(d.path(), &a, dek).unwrap_err().to_string();
    assert!(
        e.contains("more disk blocks than the data the archive stores"),
        "{e}"
    );
    assert!(
        fs::symlink_metadata(d.path().join("work/t/s")).is_err(),
        "created before the refusal"
    );
}

/// Restores a full crafted archive of `members` into `dir/base`: the base state of an
/// incremental one.
fn base_state(dir: &Path, members: &[Raw], dek: &Dek) -> (Tree, State) {
    let a = craft(dir, members, dek, false);
    let sealed = read_sealed(&a).unwrap();
    let manifest = sealed.open(dek, false).unwrap();
    let dek = Dek::from_slice(dek.as_bytes()).unwrap();
    let link = Link {
        sealed,
        manifest,
        dek,
        inner: None,
    };
    let t = dir.join("base");
    fs::create_dir_all(&t).unwrap();
    let mut tree = Tree::new(&t).unwrap();
    let (state, _) = apply(&mut tree, None, &link, &mut |_, _| {}).unwrap();
    (tree, state)
}

/// An incremental archive (valid MAC) that stores nothing: every entry of `entries` is a
/// reference to the base.
fn incremental(dir: &Path, dek: &Dek, entries: Vec<Entry>) -> Link {
    let env = KeyEnvelope {
        format: manifest::FORMAT.into(),
        version: VERSION,
        volume_id: VOL.into(),
        key_id: KID.into(),
        wrap_alg: WrapAlg::RsaOaep256,
        wrapped_dek: "AAAA".into(),
        dek_fingerprint: dek.fingerprint(),
        inner: None,
    };
    let env_bytes = serde_json::to_vec(&env).unwrap();
    let man = Manifest {
        format: manifest::FORMAT.into(),
        version: VERSION,
        created: 2,
        point_in_time: true,
        source: Source {
            volume_id: VOL.into(),
            created: 1,
            format_version: crate::volume::header::FORMAT_VERSION,
            sector_size: 4096,
            key_generation: 1,
            double: false,
            key_id: KID.into(),
            des: None,
        },
        key_envelope_sha256: manifest::sha256_hex(&env_bytes),
        totals: Totals::default(),
        stored: Some(Stored {
            referenced: entries.len() as u64,
            ..Stored::default()
        }),
        members: entries,
        base: Some(manifest::BaseLink {
            manifest_sha256: "0".repeat(64),
            created: 1,
            archive: "base.tar".into(),
            depth: 1,
        }),
    };
    let mb = serde_json::to_vec(&man).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        (KEY_MEMBER, env_bytes),
        (MANIFEST_MEMBER, mb.clone()),
        (MAC_MEMBER, manifest::mac(dek, &mb).into_bytes()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append(&h, &bytes[..]).unwrap();
    }
    let p = dir.join("inc.tar");
    fs::write(&p, b.into_inner().unwrap()).unwrap();
    let sealed = read_sealed(&p).unwrap();
    let manifest = sealed.open(dek, false).unwrap();
    Link {
        sealed,
        manifest,
        dek: Dek::from_slice(dek.as_bytes()).unwrap(),
        inner: None,
    }
}

/// Applies an incremental archive over a base of the root, `.cmkfs.dirid` and a data file
/// `f`; its entries are the root's reference and, for each `(path, from)` of `takers`, `path`
/// taken from `from` with the record `edit` makes of the base entry's. Returns the sandbox
/// (kept alive), the restore's tree and the result.
fn apply_takers(
    takers: &[(&str, &str)],
    edit: &dyn Fn(&mut Member),
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Result<(), BackupError>,
) {
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let members = [
        raw("volume/", tar::EntryType::Directory),
        file(".cmkfs.dirid", vec![9; 16], 0o444),
        file("f", ct(b"data"), 0o600),
    ];
    let (ptree, pstate) = base_state(d.path(), &members, &dek);
    let base = |p: &str| pstate.entries.iter().find(|e| e.0.path == p).unwrap();
    let root = base("");
    let mut entries = vec![Entry {
        path: String::new(),
        sha256: root.1.clone(),
        data_sha256: None,
        change: None,
        from: Some(String::new()),
        record: None,
        chunks: None,
        delta: None,
    }];
    for &(path, from) in takers {
        let (pm, _, pdata) = base(from);
        let mut rec = Member {
            path: path.into(),
            ..pm.clone()
        };
        edit(&mut rec);
        entries.push(Entry {
            path: path.into(),
            sha256: Digester::with_data(&rec, pdata.as_deref()).unwrap(),
            data_sha256: pdata.clone(),
            change: None,
            from: Some(from.into()),
            record: Some(Box::new(rec)),
            chunks: None,
            delta: None,
        });
    }
    let link = incremental(d.path(), &dek, entries);
    let t = d.path().join("work/t");
    fs::create_dir_all(&t).unwrap();
    let mut tree = Tree::new(&t).unwrap();
    let r = apply(&mut tree, Some((&ptree, &pstate)), &link, &mut |_, _| {}).map(|_| ());
    (d, t, r)
}

/// One reference, `path` taken from `from` (see [`apply_takers`]); on a refusal, neither
/// was `path` made nor `from` taken.
fn try_reference(path: &str, from: &str, edit: &dyn Fn(&mut Member)) -> Result<(), BackupError> {
    let (d, t, r) = apply_takers(&[(path, from)], edit);
    if r.is_err() {
        assert!(
            t.join(path).symlink_metadata().is_err() && d.path().join("base").join(from).exists(),
            "{path} was made, or {from} taken, before the refusal"
        );
    }
    r
}

#[test]
fn an_incremental_reference_gets_the_same_screen_as_a_stored_member() {
    // A record that adds file capabilities, or a data name that takes a side file's bytes.
    let e = try_reference("x", "f", &|m| {
        m.mode = 0o4755;
        m.xattrs = vec![("security.capability".into(), "0100000200200000".into())];
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("backing xattr \"security.capability\""), "{e}");
    let e = try_reference("y", ".cmkfs.dirid", &|m| m.mode = 0o4755)
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes the data of \".cmkfs.dirid\""), "{e}");
    // A renamed data file that became set-id, with cmkfs's own xattrs: what a volume does.
    try_reference("z", "f", &|m| {
        m.mode = 0o4755;
        m.xattrs = vec![("user.cmkfs.AAAA".into(), "00".into())];
    })
    .unwrap();
}

/// One base file taken by many entries of a small incremental would be copied once per
/// entry (a tested attack: 40 KiB of archive restored as 200 MiB): two are allowed (a move
/// and a copy), a third is refused.
#[test]
fn a_base_file_is_taken_by_at_most_two_entries() {
    let takers = [("f", "f"), ("g", "f"), ("h", "f")];
    let (_d, _t, r) = apply_takers(&takers[..2], &|_| {});
    assert!(r.is_ok(), "{:?}", r.err());
    let (_d, _t, r) = apply_takers(&takers, &|_| {});
    let e = r.expect_err("a third taker must be refused").to_string();
    assert!(e.contains("take already"), "{e}");
}

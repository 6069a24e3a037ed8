//! Hostile archives. The MAC keeps out anyone without the DEK, but whoever can write archives
//! can make a consistent one of their own (a DEK of theirs wrapped by the backup key's public
//! half, a manifest under its MAC), and its members then reach extraction. These archives
//! are made that way, with a valid MAC, and each must be refused with one error and nothing
//! written outside the temp tree: path traversal, absolute paths, a symlink and then entries
//! through it, hard links out of the tree or forward, huge sizes, duplicates, truncation,
//! references in a full archive.

use std::fs;
use std::path::Path;

use super::*;
use crate::backup::archive::MAC_MEMBER;
use crate::backup::chain::read_sealed;
use crate::backup::manifest::{
    ChangeKey, Digester, Entry, KeyEnvelope, Manifest, Source, Stored, Totals, VERSION,
};
use crate::crypto::Dek;
use crate::vault::WrapAlg;

const KID: &str = "local:/keys/k/0123456789abcdef0123456789abcdef";
const VOL: &str = "00112233445566778899aabbccddeeff";

/// One member to craft: its tar name (as the pax `path`), type, link, data, and the record
/// the manifest is computed from (`None`: listed with a dummy digest).
struct Raw {
    name: Vec<u8>,
    kind: tar::EntryType,
    link: Option<Vec<u8>>,
    data: Vec<u8>,
    size: Option<u64>,
    listed: Option<String>,
    from: Option<String>,
    /// More pax records (a sparse map's).
    pax: Vec<(&'static str, Vec<u8>)>,
    /// The record the manifest lists, when not the one `record` makes of the data.
    rec: Option<Member>,
    /// The change key the manifest lists.
    change: Option<ChangeKey>,
    /// Permission bits (tar header) and owner (pax `uid`).
    mode: u32,
    uid: u64,
    /// Device number of a device node.
    rdev: Option<(u32, u32)>,
}

fn raw(name: &str, kind: tar::EntryType) -> Raw {
    Raw {
        name: name.as_bytes().to_vec(),
        kind,
        link: None,
        data: Vec::new(),
        size: None,
        listed: name
            .strip_prefix("volume/")
            .map(|p| p.trim_end_matches('/').to_string()),
        from: None,
        pax: Vec::new(),
        rec: None,
        change: None,
        mode: 0o700,
        uid: 0,
        rdev: None,
    }
}

/// A data file's bytes: a valid cmkfs file header, then `tail`.
fn ct(tail: &[u8]) -> Vec<u8> {
    let mut b = crate::volume::layout::Layout::V3
        .generate_header(0)
        .unwrap()
        .encode()
        .to_vec();
    b.extend_from_slice(tail);
    b
}

fn record(path: &str, kind: Kind, target: Option<&str>, data: &[u8]) -> Member {
    Member {
        path: path.into(),
        kind,
        mode: 0o700,
        uid: 0,
        gid: 0,
        mtime: (1, 0),
        atime: (1, 0),
        target: target.map(Into::into),
        rdev: None,
        xattrs: Vec::new(),
        size: data.len() as u64,
        extents: if data.is_empty() {
            Vec::new()
        } else {
            vec![(0, data.len() as u64)]
        },
    }
}

/// Writes an archive of `members` with a valid key envelope, manifest and MAC under `dek`.
fn craft(dir: &Path, members: &[Raw], dek: &Dek, stored: bool) -> std::path::PathBuf {
    craft_with(dir, members, dek, stored, 0)
}

/// [`craft`], with `more_bytes` added to the manifest's `totals.bytes` (a claim the archive
/// makes of itself).
fn craft_with(
    dir: &Path,
    members: &[Raw],
    dek: &Dek,
    stored: bool,
    more_bytes: u64,
) -> std::path::PathBuf {
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
    let mut b = tar::Builder::new(Vec::new());
    let small = |b: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append(&h, bytes).unwrap();
    };
    small(&mut b, KEY_MEMBER, &env_bytes);
    let mut entries = Vec::new();
    let mut totals = Totals::default();
    for m in members {
        let uid = m.uid.to_string();
        let mut pax: Vec<(&str, &[u8])> = vec![
            ("path", &m.name),
            ("mtime", b"1.000000000"),
            ("atime", b"1.000000000"),
            ("uid", uid.as_bytes()),
            ("gid", b"0"),
        ];
        if let Some(l) = &m.link {
            pax.push(("linkpath", l));
        }
        for (k, v) in &m.pax {
            pax.push((k, v));
        }
        if m.from.is_none() {
            b.append_pax_extensions(pax).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_path("volume/x").unwrap();
            h.set_entry_type(m.kind);
            h.set_mode(m.mode);
            if let Some((maj, min)) = m.rdev {
                h.set_device_major(maj).unwrap();
                h.set_device_minor(min).unwrap();
            }
            h.set_size(m.size.unwrap_or(m.data.len() as u64));
            h.set_cksum();
            if m.size.is_some() {
                // A header that claims more than follows: write it alone.
                b.get_mut().extend_from_slice(h.as_bytes());
                b.get_mut().extend_from_slice(&m.data);
            } else {
                b.append(&h, &m.data[..]).unwrap();
            }
        }
        if let Some(path) = &m.listed {
            let kind = match m.kind {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink,
                tar::EntryType::Link => Kind::Hardlink,
                tar::EntryType::Fifo => Kind::Fifo,
                tar::EntryType::Char => Kind::Char,
                tar::EntryType::Block => Kind::Block,
                _ => Kind::File,
            };
            let target = m.link.as_ref().map(|l| {
                let l = String::from_utf8_lossy(l).into_owned();
                l.strip_prefix("volume/").map(str::to_string).unwrap_or(l)
            });
            let r = m.rec.clone().unwrap_or_else(|| {
                let mut r = record(path, kind, target.as_deref(), &m.data);
                (r.mode, r.uid, r.rdev) = (m.mode, m.uid, m.rdev);
                if !matches!(kind, Kind::File) {
                    (r.size, r.extents) = (0, Vec::new());
                }
                r
            });
            if r.kind == Kind::File {
                totals.files += 1;
                totals.bytes += r.data_len();
            }
            let mut d = Digester::new(&r, VERSION);
            // A sparse member's data starts with its map: the extents' bytes follow it.
            let skip = if m.rec.is_some() {
                m.data.len().saturating_sub(r.data_len() as usize)
            } else {
                0
            };
            d.update(&m.data[skip..]);
            let (sha256, data_sha256) = d.finish();
            entries.push(Entry {
                path: path.clone(),
                sha256,
                data_sha256,
                change: m.change.clone(),
                from: m.from.clone(),
                record: None,
                chunks: None,
                delta: None,
            });
        }
    }
    let man = Manifest {
        format: manifest::FORMAT.into(),
        version: VERSION,
        created: 1,
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
        totals: Totals {
            bytes: totals.bytes + more_bytes,
            ..totals
        },
        members: entries,
        base: None,
        stored: stored.then(Stored::default),
    };
    let mb = serde_json::to_vec(&man).unwrap();
    small(&mut b, MANIFEST_MEMBER, &mb);
    small(&mut b, MAC_MEMBER, manifest::mac(dek, &mb).as_bytes());
    let bytes = b.into_inner().unwrap();
    let p = dir.join(format!("crafted-{}.tar", super::super::random_hex()));
    fs::write(&p, bytes).unwrap();
    p
}

/// Restores a crafted archive's members into `dir/work/t` as `restore` would (seals, then
/// the members); `dir/outside` must stay empty.
fn try_restore(dir: &Path, archive: &Path, dek: Dek) -> Result<(), BackupError> {
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
    apply(&mut tree, None, &link, &mut |_, _| {}).map(|_| ())
}

fn sandbox() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("outside")).unwrap();
    d
}

/// `members` after the root must be refused with an error containing `why`, with nothing
/// written outside.
#[track_caller]
fn refused(members: Vec<Raw>, why: &str) {
    refused_with(members, why, false)
}

#[track_caller]
fn refused_with(mut members: Vec<Raw>, why: &str, stored: bool) {
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    members.insert(0, raw("volume/", tar::EntryType::Directory));
    let a = craft(d.path(), &members, &dek, stored);
    let e = try_restore(d.path(), &a, dek).expect_err(why).to_string();
    assert!(e.contains(why), "expected {why:?}, got: {e}");
    assert!(!e.contains('\n'), "more than one line: {e}");
    let outside: Vec<_> = fs::read_dir(d.path().join("outside")).unwrap().collect();
    assert!(outside.is_empty(), "{why}: written outside: {outside:?}");
    let top: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("crafted-") && n != "outside" && n != "work")
        .collect();
    assert!(top.is_empty(), "{why}: written beside: {top:?}");
}

#[test]
fn a_well_formed_crafted_archive_restores_so_the_refusals_below_are_for_their_reason() {
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let mut f = raw("volume/f", tar::EntryType::Regular);
    f.data = ct(b"data");
    let mut h = raw("volume/h", tar::EntryType::Link);
    h.link = Some(b"volume/f".to_vec());
    let members = vec![
        raw("volume/", tar::EntryType::Directory),
        raw("volume/d/", tar::EntryType::Directory),
        f,
        h,
    ];
    let a = craft(d.path(), &members, &dek, false);
    try_restore(d.path(), &a, dek).unwrap();
    assert_eq!(&fs::read(d.path().join("work/t/f")).unwrap()[32..], b"data");
}

#[test]
fn crafted_archives_that_climb_out_or_name_absolute_paths_are_refused() {
    for name in [
        "volume/../escaped",
        "volume/d/../../escaped",
        "volume/./x",
        "volume//x",
        "volume/a\0b",
    ] {
        let mut m = raw(name, tar::EntryType::Regular);
        m.data = b"evil".to_vec();
        refused(vec![m], "unsafe path");
    }
    for name in ["/tmp/escaped", "../escaped", "escaped"] {
        refused(
            vec![raw(name, tar::EntryType::Regular)],
            "unexpected member",
        );
    }
    // Hard links out of the tree, to nothing, or forward.
    for (target, why) in [
        (&b"/etc/passwd"[..], "unexpected member"),
        (b"volume/../etc/passwd", "unsafe path"),
        (b"volume/nothing", "not an earlier file"),
    ] {
        let mut h = raw("volume/h", tar::EntryType::Link);
        h.link = Some(target.to_vec());
        refused(vec![h], why);
    }
}

#[test]
fn entries_through_a_crafted_symlink_are_refused_and_nothing_lands_where_it_points() {
    for (outside_target, second, kind) in [
        // A name cmkfs never makes: its symlink may point anywhere (it is not a cmkfs
        // symlink), so what is below it must be stopped by the extraction itself.
        (true, "volume/q.l/evil", tar::EntryType::Regular),
        (true, "volume/q.l/dir/", tar::EntryType::Directory),
        (false, "volume/q.l/evil", tar::EntryType::Symlink),
    ] {
        let d = sandbox();
        let target = if outside_target {
            d.path().join("outside").display().to_string()
        } else {
            "../../outside".into()
        };
        let dek = Dek::generate().unwrap();
        let mut l = raw("volume/q.l", tar::EntryType::Symlink);
        l.link = Some(target.into_bytes());
        let mut evil = raw(second, kind);
        if kind == tar::EntryType::Symlink {
            evil.link = Some(b"x".to_vec());
        } else if kind == tar::EntryType::Regular {
            evil.data = ct(b"evil");
        }
        let members = vec![raw("volume/", tar::EntryType::Directory), l, evil];
        let a = craft(d.path(), &members, &dek, false);
        let e = try_restore(d.path(), &a, dek)
            .expect_err(second)
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        let outside: Vec<_> = fs::read_dir(d.path().join("outside")).unwrap().collect();
        assert!(
            outside.is_empty(),
            "{second}: written through the symlink: {e}"
        );
    }
}

#[test]
fn crafted_duplicates_huge_sizes_truncation_and_stray_references_are_refused() {
    // The same path twice, listed twice or once.
    let twice = || {
        let mut a = raw("volume/x", tar::EntryType::Regular);
        a.data = b"first".to_vec();
        let mut b = raw("volume/x", tar::EntryType::Regular);
        b.data = b"second".to_vec();
        (a, b)
    };
    let (a, b) = twice();
    refused(vec![a, b], "lists \"x\" twice");
    let (a, mut b) = twice();
    b.listed = None;
    refused(vec![a, b], "stores 3 members, its manifest lists 2");
    let mut dir = raw("volume/x/", tar::EntryType::Directory);
    dir.listed = Some("x".into());
    let (a, _) = twice();
    refused(vec![dir, a], "twice");
    // A header that claims a terabyte.
    let mut huge = raw("volume/huge", tar::EntryType::Regular);
    huge.size = Some(1 << 40);
    huge.data = vec![1; 1024];
    refused(vec![huge], "ends before its manifest");
    // A reference to a base in a full archive, and incremental fields without a base.
    let mut r = raw("volume/r", tar::EntryType::Regular);
    r.from = Some("r".into());
    refused(vec![r], "refers to a base");
    refused_with(Vec::new(), "incremental fields", true);
    // Truncated anywhere: refused by the seals.
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let mut f = raw("volume/f", tar::EntryType::Regular);
    f.data = vec![7; 5000];
    let a = craft(
        d.path(),
        &[raw("volume/", tar::EntryType::Directory), f],
        &dek,
        false,
    );
    let full = fs::read(&a).unwrap();
    for cut in [
        0,
        100,
        512,
        1536,
        full.len() / 2,
        full.len() - 1100,
        full.len() - 600,
    ] {
        fs::write(&a, &full[..cut]).unwrap();
        assert!(read_sealed(&a).is_err(), "cut at {cut} of {}", full.len());
    }
}

/// A GNU sparse 1.0 member `volume/<name>` of a file header and `n - 1` one-byte extents
/// 4 KiB apart (a few KiB of archive; a block of disk for each byte once written).
fn many_extents(name: &str, n: u64) -> Raw {
    let mut map = format!("{n}\n0\n32\n");
    for k in 1..n {
        map.push_str(&format!("{}\n1\n", k * 4096));
    }
    let mut data = map.into_bytes();
    data.resize(data.len().div_ceil(512) * 512, 0);
    data.extend(ct(b""));
    data.extend(std::iter::repeat_n(b'A', n as usize - 1));
    let mut m = raw(&format!("volume/{name}"), tar::EntryType::Regular);
    m.pax = vec![
        ("GNU.sparse.major", b"1".to_vec()),
        ("GNU.sparse.minor", b"0".to_vec()),
        ("GNU.sparse.name", format!("volume/{name}").into_bytes()),
        ("GNU.sparse.realsize", (n * 4096).to_string().into_bytes()),
    ];
    m.data = data;
    m
}

#[test]
fn a_crafted_sparse_map_of_many_tiny_extents_is_refused_before_a_block_is_written() {
    // The manifest recorded a 5-byte file (its change key says so): a map that differs is
    // refused before the file is even created.
    let mut m = many_extents("s", 2000);
    let mut rec = record("s", Kind::File, None, b"12345");
    m.change = Some(ChangeKey {
        ino: 1,
        size: rec.size,
        mtime: (1, 0),
        ctime: (1, 0),
        layout: ChangeKey::layout_of(&rec.extents),
    });
    m.rec = Some(rec.clone());
    refused(vec![m], "not the one the manifest recorded");
    // No change key to compare with (a version 1 manifest): the blocks its extents touch
    // must fit the data bytes the archive stores (plus two blocks a file).
    let mut m = many_extents("s", 2000);
    rec.size = 2000 * 4096;
    rec.extents = extents_of(2000);
    m.rec = Some(rec);
    refused(vec![m], "more disk blocks than the data the archive stores");
    // A sparse file whose map is the manifest's restores, holes as holes.
    let d = sandbox();
    let dek = Dek::generate().unwrap();
    let mut m = many_extents("s", 2);
    let mut rec = record("s", Kind::File, None, b"");
    rec.size = 2 * 4096;
    rec.extents = extents_of(2);
    m.change = Some(ChangeKey {
        ino: 1,
        size: rec.size,
        mtime: (1, 0),
        ctime: (1, 0),
        layout: ChangeKey::layout_of(&rec.extents),
    });
    m.rec = Some(rec);
    let a = craft(
        d.path(),
        &[raw("volume/", tar::EntryType::Directory), m],
        &dek,
        false,
    );
    try_restore(d.path(), &a, dek).unwrap();
    let got = fs::read(d.path().join("work/t/s")).unwrap();
    assert_eq!(
        (got.len(), &got[..4], got[4096], got[32]),
        (2 * 4096, &b"CMKF"[..], b'A', 0)
    );
}

/// The extents of [`many_extents`].
fn extents_of(n: u64) -> Vec<(u64, u64)> {
    std::iter::once((0, 32))
        .chain((1..n).map(|k| (k * 4096, 1)))
        .collect()
}

#[path = "screen_tests.rs"]
mod screen_tests;

//! The tar encoding of a backup archive's members (POSIX pax, as GNU tar and bsdtar read it):
//! each backing entry is one member whose pax records carry what ustar cannot — long paths
//! and link targets, times with nanoseconds, large ids, extended attributes
//! (`SCHILY.xattr.*`) — and a sparse file uses GNU's sparse format 1.0 (`GNU.sparse.*`
//! records, the map of data extents at the start of the member's data), so only the data
//! extents are stored and a restore leaves the holes as holes.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use super::manifest::{Digester, Kind, Member, VERSION};
use super::BackupError;

/// Prefix of every backing entry's member name.
pub const VOLUME_PREFIX: &str = "volume/";
/// The key envelope member (first).
pub const KEY_MEMBER: &str = "cmkfs-backup/key.json";
/// The manifest member (second to last).
pub const MANIFEST_MEMBER: &str = "cmkfs-backup/manifest.json";
/// The manifest MAC member (last).
pub const MAC_MEMBER: &str = "cmkfs-backup/manifest.mac";

const BLOCK: u64 = 512;
/// Upper bound on the entries of a sparse map (a hostile archive cannot make us allocate
/// more).
const MAX_EXTENTS: u64 = 1 << 22;
const XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Writes members to a tar stream.
pub struct Writer<W: Write> {
    tar: tar::Builder<W>,
}

fn ustar(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_size(size);
    h.set_mtime(mtime.max(0) as u64);
    h
}

/// Sets a ustar name field, or a short stand-in when it does not fit (the pax record is what
/// readers use).
fn set_name(h: &mut tar::Header, name: &str) {
    if h.set_path(name).is_err() {
        let short = format!(
            "{VOLUME_PREFIX}long.{}",
            &hex::encode(Sha256::digest(name))[..32]
        );
        let _ = h.set_path(short);
    }
}

fn time_record(t: (i64, u32)) -> Vec<u8> {
    format!("{}.{:09}", t.0, t.1).into_bytes()
}

fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, "0"));
    let sec: i64 = sec.parse().ok()?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ns: u32 = format!("{frac:0<9}").parse().ok()?;
    Some((sec, ns))
}

/// A reader that hashes what passes through it.
struct Hashing<'a, R> {
    inner: R,
    hash: &'a mut Digester,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The GNU sparse 1.0 map: the count, then offset and length per extent, one decimal per
/// line, padded with NULs to whole blocks. A file that ends in a hole gets a last empty
/// extent at its size, as GNU tar writes it.
fn sparse_map(m: &Member) -> Vec<u8> {
    let mut ext = m.extents.clone();
    if ext.last().is_none_or(|(o, l)| o + l < m.size) {
        ext.push((m.size, 0));
    }
    let mut out = format!("{}\n", ext.len()).into_bytes();
    for (o, l) in ext {
        out.extend_from_slice(format!("{o}\n{l}\n").as_bytes());
    }
    let pad = (BLOCK - out.len() as u64 % BLOCK) % BLOCK;
    out.resize(out.len() + pad as usize, 0);
    out
}

fn is_sparse(m: &Member) -> bool {
    m.kind == Kind::File && !(m.extents.is_empty() && m.size == 0) && m.extents != [(0, m.size)]
}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Writer<W> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Complete);
        Writer { tar }
    }

    /// Appends a small regular file of cmkfs's own (the key envelope, the manifest, its MAC).
    pub fn small(&mut self, name: &str, bytes: &[u8], now: i64) -> io::Result<()> {
        let mut h = ustar(tar::EntryType::Regular, 0o600, bytes.len() as u64, now);
        set_name(&mut h, name);
        h.set_cksum();
        self.tar.append(&h, bytes)
    }

    /// Appends the member `m`; `data` yields the bytes of its extents, in order (regular
    /// files only). Returns the member's digest and data digest ([`Digester`], layout
    /// [`VERSION`], hex).
    pub fn member(
        &mut self,
        m: &Member,
        data: Option<&mut dyn Read>,
    ) -> io::Result<(String, Option<String>)> {
        let mut hash = Digester::new(m, VERSION);
        let name = format!(
            "{VOLUME_PREFIX}{}{}",
            m.path,
            if m.kind == Kind::Dir && !m.path.is_empty() {
                "/"
            } else {
                ""
            }
        );
        let mut pax: Vec<(String, Vec<u8>)> = vec![
            ("mtime".into(), time_record(m.mtime)),
            ("atime".into(), time_record(m.atime)),
            ("uid".into(), m.uid.to_string().into_bytes()),
            ("gid".into(), m.gid.to_string().into_bytes()),
        ];
        let sparse = is_sparse(m);
        if sparse {
            pax.push(("GNU.sparse.major".into(), b"1".to_vec()));
            pax.push(("GNU.sparse.minor".into(), b"0".to_vec()));
            pax.push(("GNU.sparse.name".into(), name.clone().into_bytes()));
            pax.push((
                "GNU.sparse.realsize".into(),
                m.size.to_string().into_bytes(),
            ));
        } else {
            pax.push(("path".into(), name.clone().into_bytes()));
        }
        let link = match (&m.kind, &m.target) {
            (Kind::Hardlink, Some(t)) => Some(format!("{VOLUME_PREFIX}{t}")),
            (Kind::Symlink, Some(t)) => Some(t.clone()),
            _ => None,
        };
        if let Some(l) = &link {
            pax.push(("linkpath".into(), l.clone().into_bytes()));
        }
        for (n, v) in &m.xattrs {
            let v = hex::decode(v).map_err(io::Error::other)?;
            pax.push((format!("{XATTR_PREFIX}{n}"), v));
        }
        self.tar
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        let kind = match m.kind {
            Kind::Dir => tar::EntryType::Directory,
            Kind::File => tar::EntryType::Regular,
            Kind::Symlink => tar::EntryType::Symlink,
            Kind::Hardlink => tar::EntryType::Link,
            Kind::Fifo => tar::EntryType::Fifo,
            Kind::Char => tar::EntryType::Char,
            Kind::Block => tar::EntryType::Block,
        };
        let map = if sparse { sparse_map(m) } else { Vec::new() };
        let size = if m.kind == Kind::File {
            map.len() as u64 + m.data_len()
        } else {
            0
        };
        let mut h = ustar(kind, m.mode, size, m.mtime.0);
        h.set_uid(m.uid.min(0o777_7777));
        h.set_gid(m.gid.min(0o777_7777));
        if sparse {
            let base = m.path.rsplit('/').next().unwrap_or("");
            set_name(&mut h, &format!("{VOLUME_PREFIX}GNUSparseFile.0/{base}"));
        } else {
            set_name(&mut h, &name);
        }
        if let Some(l) = &link {
            if h.set_link_name(l).is_err() {
                let _ = h.set_link_name("long-link");
            }
        }
        if let Some((maj, min)) = m.rdev {
            h.set_device_major(maj)?;
            h.set_device_minor(min)?;
        }
        h.set_cksum();
        match data {
            Some(d) if m.kind == Kind::File => {
                let body = io::Cursor::new(map).chain(Hashing {
                    inner: d.take(m.data_len()),
                    hash: &mut hash,
                });
                // A source that ends early (a file shrunk under a forced backup) is padded
                // with zeros, so the archive stays well formed; the digest covers what was
                // written.
                let padded = body.chain(io::repeat(0)).take(size);
                self.tar.append(&h, padded)?;
            }
            _ => self.tar.append(&h, io::empty())?,
        }
        Ok(hash.finish())
    }

    /// Ends the archive and returns the output.
    pub fn finish(self) -> io::Result<W> {
        self.tar.into_inner()
    }
}

/// What a member of an archive is.
pub enum Parsed {
    /// A backing entry; for a regular file the reader is positioned at its extents' bytes.
    Member(Box<Member>),
    /// One of cmkfs's own members (key envelope, manifest, MAC): its name.
    Own(String),
}

fn corrupt(what: impl std::fmt::Display) -> BackupError {
    BackupError::Corrupt(what.to_string())
}

/// A relative backing path from a member name: `/`-separated single components.
fn rel_path(name: &[u8], what: &str) -> Result<String, BackupError> {
    let s = std::str::from_utf8(name).map_err(|_| corrupt(format!("{what} is not UTF-8")))?;
    let rel = s
        .strip_prefix(VOLUME_PREFIX)
        .ok_or_else(|| corrupt(format!("unexpected member {s:?}")))?;
    let rel = rel.strip_suffix('/').unwrap_or(rel);
    if !rel.is_empty() {
        for c in rel.split('/') {
            crate::volume::sys::component(std::ffi::OsStr::new(c))
                .map_err(|_| corrupt(format!("member {s:?} has an unsafe path")))?;
        }
    }
    Ok(rel.to_string())
}

/// Checks a relative backing path named by a manifest (the rule of member names: `/`-separated
/// single components, no `.`, `..` or empty ones; `""` is the root).
pub fn check_rel(rel: &str) -> Result<(), BackupError> {
    if !rel.is_empty() {
        for c in rel.split('/') {
            crate::volume::sys::component(std::ffi::OsStr::new(c))
                .map_err(|_| corrupt(format!("the manifest names an unsafe path {rel:?}")))?;
        }
    }
    Ok(())
}

fn read_decimal(r: &mut impl Read, consumed: &mut u64) -> Result<u64, BackupError> {
    let mut v: u64 = 0;
    let mut digits = 0;
    loop {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)
            .map_err(|_| corrupt("a sparse map is truncated"))?;
        *consumed += 1;
        match b[0] {
            b'\n' if digits > 0 => return Ok(v),
            d @ b'0'..=b'9' if digits < 20 => {
                v = v
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(d - b'0')))
                    .ok_or_else(|| corrupt("a sparse map number overflows"))?;
                digits += 1;
            }
            _ => return Err(corrupt("a sparse map is malformed")),
        }
    }
}

/// Upper bound on one member's pax records (many xattrs of up to 64 KiB each fit).
const MAX_PAX: u64 = 16 << 20;

/// Parses pax records (`"<len> <key>=<value>\n"`, where the value may hold any byte,
/// newlines included: the length says where a record ends).
pub fn parse_pax(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    let bad = || corrupt("a pax header is malformed");
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        let key = std::str::from_utf8(&rec[..eq]).map_err(|_| bad())?;
        out.push((key.to_string(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// The next member of a raw entry stream (pax headers read and applied here, not by the
/// `tar` crate, whose pax parser splits binary values at newlines), parsed; `None` at the
/// end of the archive.
pub fn next<'a, R: Read>(
    entries: &mut tar::Entries<'a, R>,
) -> Result<Option<(tar::Entry<'a, R>, Parsed)>, BackupError> {
    let mut records: Option<Vec<(String, Vec<u8>)>> = None;
    loop {
        let Some(e) = entries.next() else {
            return match records {
                Some(_) => Err(corrupt("the archive ends after a pax header")),
                None => Ok(None),
            };
        };
        let mut e = e.map_err(BackupError::Read)?;
        let t = e.header().entry_type();
        if t.is_pax_local_extensions() {
            if records.is_some() || e.size() > MAX_PAX {
                return Err(corrupt("a pax header is misplaced or too large"));
            }
            let mut data = Vec::with_capacity(e.size() as usize);
            e.read_to_end(&mut data).map_err(BackupError::Read)?;
            records = Some(parse_pax(&data)?);
            continue;
        }
        if t.is_pax_global_extensions() || t.is_gnu_longname() || t.is_gnu_longlink() {
            return Err(corrupt(format!("unexpected member type {t:?}")));
        }
        let p = parse(&mut e, records.unwrap_or_default())?;
        return Ok(Some((e, p)));
    }
}

/// Parses the member `e` with its pax `records` (for a sparse file it also consumes the map
/// from the data).
fn parse<R: Read>(
    e: &mut tar::Entry<'_, R>,
    records: Vec<(String, Vec<u8>)>,
) -> Result<Parsed, BackupError> {
    let get = |k: &str| {
        records
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_slice())
    };
    let sparse_name = get("GNU.sparse.name").map(<[u8]>::to_vec);
    let name = match (&sparse_name, get("path")) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p.to_vec(),
        (None, None) => e.header().path_bytes().into_owned(),
    };
    if !name.starts_with(VOLUME_PREFIX.as_bytes()) {
        let n = String::from_utf8_lossy(&name).into_owned();
        return Ok(Parsed::Own(n));
    }
    let path = rel_path(&name, "a member name")?;
    let hdr = e.header();
    let et = hdr.entry_type();
    let kind = match et {
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Link => Kind::Hardlink,
        tar::EntryType::Fifo => Kind::Fifo,
        tar::EntryType::Char => Kind::Char,
        tar::EntryType::Block => Kind::Block,
        other => return Err(corrupt(format!("member {path:?} has type {other:?}"))),
    };
    let num = |k: &str| -> Result<u64, BackupError> {
        let v = get(k).ok_or_else(|| corrupt(format!("member {path:?} lacks its {k}")))?;
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(format!("member {path:?} has an invalid {k}")))
    };
    let time = |k: &str| -> Result<(i64, u32), BackupError> {
        get(k)
            .and_then(parse_time)
            .ok_or_else(|| corrupt(format!("member {path:?} lacks a valid {k}")))
    };
    let mode = hdr.mode().map_err(BackupError::Read)? & 0o7777;
    let (uid, gid) = (num("uid")?, num("gid")?);
    let (mtime, atime) = (time("mtime")?, time("atime")?);
    let target = match kind {
        Kind::Symlink | Kind::Hardlink => {
            let l = get("linkpath")
                .ok_or_else(|| corrupt(format!("link member {path:?} has no target")))?
                .to_vec();
            Some(if kind == Kind::Hardlink {
                rel_path(&l, "a hard link target")?
            } else {
                String::from_utf8(l)
                    .map_err(|_| corrupt(format!("symlink member {path:?}: target not UTF-8")))?
            })
        }
        _ => None,
    };
    let rdev = match kind {
        Kind::Char | Kind::Block => {
            let maj = hdr.device_major().map_err(BackupError::Read)?.unwrap_or(0);
            let min = hdr.device_minor().map_err(BackupError::Read)?.unwrap_or(0);
            Some((maj, min))
        }
        _ => None,
    };
    let mut xattrs: Vec<(String, String)> = records
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(XATTR_PREFIX)?.to_string(), hex::encode(v))))
        .collect();
    xattrs.sort();
    let total = e.size();
    let (size, extents) = if kind != Kind::File {
        if total != 0 {
            return Err(corrupt(format!("member {path:?} carries data")));
        }
        (0, Vec::new())
    } else if sparse_name.is_some() {
        if get("GNU.sparse.major") != Some(b"1") || get("GNU.sparse.minor") != Some(b"0") {
            return Err(corrupt(format!("member {path:?}: unknown sparse format")));
        }
        let size = num("GNU.sparse.realsize")?;
        let mut consumed = 0u64;
        let n = read_decimal(e, &mut consumed)?;
        if n > MAX_EXTENTS {
            return Err(corrupt(format!("member {path:?}: sparse map too large")));
        }
        let mut ext = Vec::new();
        let mut end = 0u64;
        for _ in 0..n {
            let o = read_decimal(e, &mut consumed)?;
            let l = read_decimal(e, &mut consumed)?;
            let stop = o.checked_add(l).filter(|s| *s <= size);
            match stop {
                Some(s) if o >= end => end = s,
                _ => return Err(corrupt(format!("member {path:?}: sparse map out of order"))),
            }
            if l > 0 {
                ext.push((o, l));
            }
        }
        let pad = (BLOCK - consumed % BLOCK) % BLOCK;
        io::copy(&mut e.take(pad), &mut io::sink()).map_err(BackupError::Read)?;
        let data: u64 = ext.iter().map(|x| x.1).sum();
        if consumed + pad + data != total {
            return Err(corrupt(format!(
                "member {path:?}: sparse map and size disagree"
            )));
        }
        (size, ext)
    } else {
        (
            total,
            if total > 0 {
                vec![(0, total)]
            } else {
                Vec::new()
            },
        )
    };
    Ok(Parsed::Member(Box::new(Member {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime,
        atime,
        target,
        rdev,
        xattrs,
        size,
        extents,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(path: &str, size: u64, extents: Vec<(u64, u64)>) -> Member {
        Member {
            path: path.into(),
            kind: Kind::File,
            mode: 0o640,
            uid: 1234,
            gid: 99_999_999,
            mtime: (1_700_000_000, 123_456_789),
            atime: (-5, 1),
            target: None,
            rdev: None,
            xattrs: vec![("user.cmkfs.x".into(), hex::encode([0u8, 1, 255]))],
            size,
            extents,
        }
    }

    #[test]
    fn members_read_back_as_written_sparse_and_long_names_included() {
        let long = format!("{}/{}", "d".repeat(200), "n".repeat(250));
        let ms = vec![
            member("a", 5, vec![(0, 5)]),
            member("empty", 0, vec![]),
            member(&long, 1 << 20, vec![(4096, 100), (8192, 10)]),
            member("hole-only", 300, vec![]),
        ];
        let mut w = Writer::new(Vec::new());
        let mut digests = Vec::new();
        for m in &ms {
            let mut data = io::repeat(7).take(m.data_len());
            digests.push(w.member(m, Some(&mut data)).unwrap());
        }
        let bytes = w.finish().unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut entries = a.entries().unwrap().raw(true);
        let mut i = 0;
        while let Some((mut e, p)) = next(&mut entries).unwrap() {
            let Parsed::Member(m) = p else {
                panic!("own member")
            };
            assert_eq!(*m, ms[i]);
            let mut h = Digester::new(&m, VERSION);
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).unwrap();
            assert_eq!(buf.len() as u64, m.data_len());
            h.update(&buf);
            let (d, data) = h.finish();
            assert_eq!((d.clone(), data.clone()), digests[i]);
            assert_eq!(Digester::with_data(&m, data.as_deref()).unwrap(), d);
            i += 1;
        }
        assert_eq!(i, ms.len());
    }

    #[test]
    fn pax_values_may_hold_newlines_and_any_byte() {
        let mut w = Writer::new(Vec::new());
        let mut m = member("x", 0, vec![]);
        m.xattrs = vec![("user.cmkfs.v".into(), hex::encode(b"a\nb=c\n\0\xff"))];
        w.member(&m, Some(&mut io::empty())).unwrap();
        let bytes = w.finish().unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut entries = a.entries().unwrap().raw(true);
        let (_, p) = next(&mut entries).unwrap().unwrap();
        let Parsed::Member(got) = p else { panic!() };
        assert_eq!(*got, m);
        assert!(parse_pax(b"6 a=b\n").is_ok());
        assert!(parse_pax(b"5 a=b\n").is_err());
        assert!(parse_pax(b"99 a=b\n").is_err());
    }

    #[test]
    fn times_parse_strictly() {
        assert_eq!(parse_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_time(b"-3.000000001"), Some((-3, 1)));
        assert_eq!(parse_time(b"7"), Some((7, 0)));
        assert_eq!(parse_time(b"7.1234567890"), None);
        assert_eq!(parse_time(b"x"), None);
    }
}

//! The committed format v1 fixture volume (tests/fixtures/v1-volume): a private, writable
//! copy per test, restored to what the v1 release left on disk.
//!
//! Git keeps file contents, symlinks and the executable bit only, so the copy step puts back
//! the rest from `fixture.json`: every entry's mode (empty directories included), hard
//! links, extended attributes, and the sparseness of backing files (a 4 KiB block of zeros is
//! left unwritten: the v1 release never wrote one, since a written unit is never all zero,
//! and the upgrade's hole decisions look at the backing file's allocation).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// One plaintext file of the fixture: its true size and SHA-256 (hex).
#[derive(Clone, Debug)]
pub struct FileTruth {
    pub size: u64,
    pub sha256: String,
}

/// A copy of the fixture.
pub struct V1Fixture {
    /// `CMKFS_HOME` of the copy (the vault with the fixture's key).
    pub home: PathBuf,
    /// The volume.
    pub cipher: PathBuf,
    /// Plaintext path (relative, no leading `/`) → truth.
    pub files: BTreeMap<String, FileTruth>,
    /// The files format v1 reads wrongly (their stored tails are all zero).
    pub v1_misreads: Vec<String>,
    /// The whole manifest, for the rest (symlinks, links, xattrs, modes, directories).
    pub manifest: serde_json::Value,
}

/// The fixture's source directory.
pub fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-volume")
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Copies the fixture into `dst` (which must exist) as `dst/home` and `dst/cipher`.
pub fn copy(dst: &Path) -> V1Fixture {
    let src = source();
    let meta = json(&src.join("fixture.json"));
    let entries = meta["entries"].as_array().expect("fixture.json: entries");
    let mut dirs = Vec::new();
    for e in entries {
        let rel = e["path"].as_str().expect("entry path");
        let mode = u32::from_str_radix(e["mode"].as_str().expect("entry mode"), 8).unwrap();
        let (from, to) = (src.join(rel), dst.join(rel));
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        match e["kind"].as_str() {
            Some("dir") => {
                fs::create_dir_all(&to).unwrap();
                dirs.push((to, mode));
            }
            Some("symlink") => {
                std::os::unix::fs::symlink(fs::read_link(&from).unwrap(), &to).unwrap();
            }
            _ => {
                copy_sparse(&from, &to);
                fs::set_permissions(&to, fs::Permissions::from_mode(mode)).unwrap();
            }
        }
    }
    for group in meta["hard_links"].as_array().unwrap() {
        let g: Vec<&str> = group
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for other in &g[1..] {
            fs::remove_file(dst.join(other)).unwrap();
            fs::hard_link(dst.join(g[0]), dst.join(other)).unwrap();
        }
    }
    for (rel, xs) in meta["xattrs"].as_object().unwrap() {
        for (name, value) in xs.as_object().unwrap() {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().unwrap())
                .unwrap();
            set_xattr(&dst.join(rel), name, &value);
        }
    }
    // Directory modes last (a read-only directory would refuse the entries above).
    for (d, mode) in dirs.iter().rev() {
        fs::set_permissions(d, fs::Permissions::from_mode(*mode)).unwrap();
    }
    let manifest = json(&src.join("manifest.json"));
    let files = manifest["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                FileTruth {
                    size: v["size"].as_u64().unwrap(),
                    sha256: v["sha256"].as_str().unwrap().to_string(),
                },
            )
        })
        .collect();
    let v1_misreads = manifest["v1_misreads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    V1Fixture {
        home: dst.join("home"),
        cipher: dst.join("cipher"),
        files,
        v1_misreads,
        manifest,
    }
}

/// Copies a file, leaving 4 KiB blocks of zeros unwritten (holes).
fn copy_sparse(from: &Path, to: &Path) {
    let data = fs::read(from).unwrap();
    let f = File::create(to).unwrap();
    for (i, block) in data.chunks(4096).enumerate() {
        if block.iter().any(|b| *b != 0) {
            f.write_all_at(block, (i * 4096) as u64).unwrap();
        }
    }
    f.set_len(data.len() as u64).unwrap();
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (cp, cn) = (
        CString::new(p.as_os_str().as_bytes()).unwrap(),
        CString::new(name).unwrap(),
    );
    // SAFETY: valid C strings and a value buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

//! Small filesystem helpers shared by the vault store and the volume header: private
//! directories and atomic, durable file replacement.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of the temporary files [`write_atomic`] creates; `fsck` recognises leftovers by it.
pub const TEMP_PREFIX: &str = ".cmkfs-tmp.";

/// Creates `dir` (and missing parents) with mode 0700; tightens an existing one to 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Replaces `path` with `bytes` atomically: write a temp file beside it, fsync, rename over
/// the target, fsync the directory. A crash leaves either the old or the new content (and at
/// worst a stray temp file), never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_then(path, bytes, mode, &mut || ())
}

/// [`write_atomic`], calling `changed` right after the temp file is created and right after
/// the rename, before the fsyncs (see `volume::sys::write_atomic_then`).
pub fn write_atomic_then(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    changed: &mut dyn FnMut(),
) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut rnd = [0u8; 6];
    getrandom::getrandom(&mut rnd).map_err(io::Error::other)?;
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{}.{}",
        name.to_string_lossy(),
        hex::encode(rnd)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        changed();
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        changed();
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a new file that must not exist yet, durably (fsync file and directory).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    sync_dir(&parent_dir(path))
}

/// Opens `path` for appending (a log), creating it 0600; an existing file with group or
/// other permission bits (written by an older cmkfs) is tightened to 0600.
pub fn open_private_append(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    tighten(&f, 0o600)?;
    Ok(f)
}

/// Replaces `path` with `bytes` through a temp file and a rename, not fsynced (a live view
/// that the next write rebuilds, like a status file); the file is 0600.
pub fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Drops permission bits beyond `mode` from an open file (never adds any).
pub fn tighten(f: &File, mode: u32) -> io::Result<()> {
    let have = f.metadata()?.permissions().mode() & 0o7777;
    if have & !mode != 0 {
        f.set_permissions(fs::Permissions::from_mode(have & mode))?;
    }
    Ok(())
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Shifts size-rotated logs: `path.{keep-1}` → `path.{keep}` (the oldest is replaced), ...,
/// `path.1` → `path.2`, then `path` → `path.1`. The caller serializes rotations and creates
/// the new `path` afterwards; a crash in between leaves every line in one of the files.
pub fn rotate_numbered(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    };
    let keep = keep.max(1);
    for n in (1..keep).rev() {
        match fs::rename(numbered(n), numbered(n + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fs::rename(path, numbered(1))?;
    sync_dir(&parent_dir(path))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Debug builds only (tests): with the environment variable `var` set to PATH, creates
/// `PATH.reached`, then waits (at most 20 s) for `PATH` to exist, so that a test can act at
/// that point of a command (change keys, change the volume) and then let it go on.
#[cfg(debug_assertions)]
pub fn test_pause(var: &str) {
    let Some(gate) = std::env::var_os(var).map(PathBuf::from) else {
        return;
    };
    let mut reached = gate.clone().into_os_string();
    reached.push(".reached");
    let _ = fs::write(&reached, b"");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !gate.exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn private_files_are_0600_and_loose_ones_are_tightened() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("a.log");
        fs::write(&log, b"old\n").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
        open_private_append(&log)
            .unwrap()
            .write_all(b"new\n")
            .unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"old\nnew\n");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&log), 0o600);
        let st = d.path().join("s.json");
        replace_private(&st, b"{}").unwrap();
        replace_private(&st, b"{ }").unwrap();
        assert_eq!(mode(&st), 0o600);
        assert_eq!(fs::read(&st).unwrap(), b"{ }");
    }
}

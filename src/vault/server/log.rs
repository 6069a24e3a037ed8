//! The vault server's log: a file (0600) that `cmkfs vault serve` writes its events to,
//! rotated by size like the audit log (`vault-server.log` → `.1` .. `.N`), so that what a
//! 500 answer points to exists and a noisy client cannot fill the disk with it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fsutil::rotate_numbered;

/// Size at which the server log is rotated.
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Rotated server logs kept.
pub const KEEP: u32 = 3;

struct Inner {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    keep: u32,
}

/// A size-rotated log file; cheap to clone (one file shared behind a lock).
#[derive(Clone)]
pub struct RotatingLog {
    inner: Arc<Mutex<Inner>>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl RotatingLog {
    /// Opens (creates, 0600) the log at `path`, rotated at `max` bytes keeping `keep` files.
    pub fn open(path: &Path, max: u64, keep: u32) -> io::Result<RotatingLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            inner: Arc::new(Mutex::new(Inner {
                path: path.to_path_buf(),
                file,
                size,
                max,
                keep,
            })),
        })
    }
}

/// One writer handed to the tracing subscriber per event.
pub struct LogWriter(Arc<Mutex<Inner>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.max > 0 && g.size > 0 && g.size + buf.len() as u64 > g.max {
            rotate_numbered(&g.path, g.keep)?;
            g.file = open(&g.path)?;
            g.size = 0;
        }
        g.file.write_all(buf)?;
        g.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingLog {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.inner.clone())
    }
}

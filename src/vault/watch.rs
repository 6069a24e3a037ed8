//! Push notifications from a file-based vault store: inotify on the directory of a file
//! that is replaced (renamed over) on every change, e.g. the local vault's `generation`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};

/// Watches `file` and sends `()` whenever it is created, replaced or written. The channel
/// holds at most one pending notification: bursts of changes coalesce into one wake-up.
/// The watcher thread ends when the receiver is dropped and the next event arrives.
pub fn watch_file(file: &Path) -> io::Result<Receiver<()>> {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    // SAFETY: inotify_init1 has no preconditions; the fd is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it once.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mask = libc::IN_MOVED_TO
        | libc::IN_CLOSE_WRITE
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_ATTRIB;
    // SAFETY: valid fd and C path.
    if unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("cmkfs-vault-watch".into())
        .spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&owned);
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: reading into a local buffer of the stated length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                let mut hit = false;
                let mut off = 0usize;
                let hdr = std::mem::size_of::<libc::inotify_event>();
                while off + hdr <= n as usize {
                    // SAFETY: the kernel writes whole inotify_event records; read_unaligned copes
                    // with the byte buffer's alignment.
                    let ev: libc::inotify_event =
                        unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                    let nb = &buf[off + hdr..(off + hdr + ev.len as usize).min(n as usize)];
                    let evname = nb.split(|b| *b == 0).next().unwrap_or(&[]);
                    if evname == name.as_slice() {
                        hit = true;
                    }
                    off += hdr + ev.len as usize;
                }
                if hit {
                    match tx.try_send(()) {
                        Ok(()) | Err(TrySendError::Full(())) => {}
                        Err(TrySendError::Disconnected(())) => return,
                    }
                }
            }
        })?;
    Ok(rx)
}

/// One channel that fires when any of `sources` fires (bursts coalesce, as in
/// [`watch_file`]). Each source gets a small forwarding thread that ends with its source.
pub fn merge(sources: Vec<Receiver<()>>) -> Receiver<()> {
    let (tx, rx) = sync_channel(1);
    for src in sources {
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("cmkfs-watch-merge".into())
            .spawn(move || {
                while src.recv().is_ok() {
                    if let Err(TrySendError::Disconnected(())) = tx.try_send(()) {
                        return;
                    }
                }
            });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sees_atomic_replacement() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("generation");
        std::fs::write(&f, b"1").unwrap();
        let rx = watch_file(&f).unwrap();
        std::fs::write(d.path().join("other"), b"x").unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "other files are ignored"
        );
        crate::fsutil::write_atomic(&f, b"2", 0o600).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
    }
}

//! WRITEs held by a backup's freeze, kept off the FUSE threads.
//!
//! During a freeze (`drain`) every WRITE waits for the thaw. Waiting on the FUSE thread that
//! read it took that thread: with the writeback cache, a heavy writer makes the kernel send
//! up to `max_background` write-backs at once, more than the mount has threads, and then no
//! request at all was answered until the thaw (measured: a `stat` of another file waited 19 s
//! of a 20 s freeze with the default 2 threads). So a WRITE that finds the write gate closed
//! is copied into a queue and answered by one thread of its own, in arrival order, once the
//! gate opens; the FUSE thread goes back for the next request. While the queue is not empty,
//! later WRITEs join it, so none overtakes one held before it.
//!
//! The copies are bounded by the kernel (at most `max_background` write-backs in flight, and
//! the FUSE device's dirty limit) and here by [`MAX_HELD_BYTES`]: past it a WRITE waits on
//! its FUSE thread as before. The reply is sent after the write is done, so `fsync` and
//! `close` (which wait for the kernel's write-backs) still see its outcome, and a refused
//! write-back is recorded for FLUSH as any other (`wb_errors`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{FileHandle, INodeNo, ReplyWrite, WriteFlags};

use super::payload::Payload;
use super::{lock, CmkFs};

impl CmkFs {
    /// A WRITE through the write gate: a WRITE held by a backup's freeze must not take this
    /// thread until the thaw; it is queued (a copy of its payload, which is then wiped), and
    /// answered after the thaw.
    pub(super) fn gated_write(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut data: Payload,
        flags: WriteFlags,
        reply: ReplyWrite,
    ) {
        let pass = match self.held.busy() {
            false => self.vol.gates().try_write(),
            true => None,
        };
        let reply = match pass {
            Some(_pass) => return self.do_write(ino, fh, offset, data, flags, reply),
            None => match self.held.hold(self, ino, fh, offset, &data, flags, reply) {
                Ok(()) => return data.wipe_from(0),
                Err(reply) => reply,
            },
        };
        let _pass = self.vol.gates().write();
        self.do_write(ino, fh, offset, data, flags, reply)
    }
}

/// Bytes of held WRITEs kept in memory at most; a WRITE past it waits on its FUSE thread.
pub(super) const MAX_HELD_BYTES: usize = 64 << 20;

/// One WRITE waiting for the thaw, with its own copy of the data.
struct Held {
    ino: INodeNo,
    fh: FileHandle,
    offset: u64,
    /// Wiped when dropped unwritten (a failed send); otherwise given up to the write.
    data: zeroize::Zeroizing<Vec<u8>>,
    flags: WriteFlags,
    reply: ReplyWrite,
}

/// The queue of held WRITEs of one mount and its thread (started at the first held WRITE).
#[derive(Default)]
pub(super) struct HeldWrites {
    queue: OnceLock<Mutex<Sender<Held>>>,
    /// WRITEs queued and not yet answered.
    count: AtomicUsize,
    /// Their bytes.
    bytes: AtomicUsize,
}

impl HeldWrites {
    /// Whether WRITEs are queued: a new one must then queue too (arrival order).
    pub(super) fn busy(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Queues a WRITE for the thread that answers it after the thaw. `Err(reply)`: the
    /// queue is full ([`MAX_HELD_BYTES`]) or its thread could not start; the caller waits.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold(
        self: &Arc<Self>,
        fs: &CmkFs,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &Payload,
        flags: WriteFlags,
        reply: ReplyWrite,
    ) -> Result<(), ReplyWrite> {
        let len = data.len();
        if self.bytes.load(Ordering::SeqCst) + len > MAX_HELD_BYTES {
            return Err(reply);
        }
        let Some(tx) = self.sender(fs) else {
            return Err(reply);
        };
        self.count.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(len, Ordering::SeqCst);
        let held = Held {
            ino,
            fh,
            offset,
            data: zeroize::Zeroizing::new(data.to_vec()),
            flags,
            reply,
        };
        // The thread never ends while the mount's filesystem exists: the send cannot fail,
        // but if it did, the reply comes back with the WRITE to be served here.
        match lock(tx).send(held) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.count.fetch_sub(1, Ordering::SeqCst);
                self.bytes.fetch_sub(len, Ordering::SeqCst);
                Err(e.0.reply)
            }
        }
    }

    /// The queue's sender, starting its thread on first use.
    fn sender(self: &Arc<Self>, fs: &CmkFs) -> Option<&Mutex<Sender<Held>>> {
        if let Some(tx) = self.queue.get() {
            return Some(tx);
        }
        let (tx, rx) = channel::<Held>();
        let me = self.clone();
        let view = fs.view();
        let started = std::thread::Builder::new()
            .name("cmkfs-held-wr".into())
            .spawn(move || {
                for h in rx {
                    let len = h.data.len();
                    {
                        let _pass = view.vol.gates().write();
                        // The copy is given up: written in place, then wiped where it
                        // still holds plaintext.
                        let mut data = h.data;
                        let d = Payload::Mut(&mut data[..]);
                        view.do_write(h.ino, h.fh, h.offset, d, h.flags, h.reply);
                    }
                    me.bytes.fetch_sub(len, Ordering::SeqCst);
                    me.count.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the thread for WRITEs held by a freeze");
            return None;
        }
        // Two FUSE threads may race to start it: the loser's thread ends with its channel.
        let _ = self.queue.set(Mutex::new(tx));
        self.queue.get()
    }
}

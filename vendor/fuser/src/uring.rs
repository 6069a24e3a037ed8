//! cmkfs patch (CMKFS-PATCH.md, third change): FUSE over io_uring, an experiment.
//!
//! Protocol 7.42 (Linux 6.14+, `CONFIG_FUSE_IO_URING`, module parameter `enable_uring`):
//! once INIT has negotiated `FUSE_OVER_IO_URING`, the daemon hands the kernel, for every
//! queue (one per possible CPU: a request goes to the queue of the CPU its caller runs on),
//! ring entries of two buffers each — a 288-byte `fuse_uring_req_header` and a payload
//! buffer of at least `max(8 KiB, max_write, max_pages * page size)` — with
//! `IORING_OP_URING_CMD` SQEs (128-byte SQEs: the command area holds a
//! `fuse_uring_cmd_req`) on the `/dev/fuse` descriptor, command
//! `FUSE_IO_URING_CMD_REGISTER`. The kernel switches its request queue over to the rings
//! once every queue has an entry. A request arrives as the completion of an entry's SQE:
//! the `fuse_in_header` in `in_out`, the operation's own header (its first argument) in
//! `op_in`, the rest (names, write data) in the payload, its size in
//! `ring_ent_in_out.payload_sz`. The answer goes back in the same buffers (`fuse_out_header`
//! in `in_out`, everything after it in the payload) with a
//! `FUSE_IO_URING_CMD_COMMIT_AND_FETCH` SQE, whose completion is the entry's next request:
//! one `io_uring_enter` per request instead of a `read` and a `writev`.
//!
//! What stays on `/dev/fuse` (the kernel sends it there): FORGET/BATCH_FORGET, INTERRUPT,
//! and the daemon's notifications; the session's read loops keep serving those.
//!
//! This version rebuilds each request into one contiguous buffer (header, operation header,
//! payload) so fuser's parser and dispatch are reused unchanged; a copy-free version would
//! parse the operation header from `op_in` and the payload in place (a two-part
//! `ll::AnyRequest`), and let replies write straight into the payload buffer.
//!
//! Plaintext hygiene, as for the read loop (first change): the request bytes are zeroed in
//! the ring buffers as soon as they are copied out, the rebuilt copy once the request is
//! handled, and a reply's bytes as soon as the kernel has taken them. The rings use
//! `IORING_SETUP_DEFER_TASKRUN`, so the kernel writes a new request into an idle entry only
//! inside this thread's own `io_uring_enter` calls: after a COMMIT_AND_FETCH returns, either
//! a new request is already in the entry (its `commit_id` is no longer 0; the old reply's
//! tail is zeroed when that request is taken) or the entry stays untouched until the next
//! wait, and the reply is zeroed at once.

use std::cell::UnsafeCell;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::atomic::compiler_fence;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::info;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::read_buf::FuseReadBuf;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `sizeof(struct fuse_uring_req_header)`: `in_out[128]`, `op_in[128]`, `ring_ent_in_out`.
const HEADER_SIZE: usize = 288;
const OP_IN: usize = 128;
/// Offsets inside `ring_ent_in_out` (at 256): flags u64, commit_id u64, payload_sz u32.
const COMMIT_ID: usize = 264;
const PAYLOAD_SZ: usize = 272;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// Ring entries (request slots) per queue.
pub(crate) const ENTRIES_PER_QUEUE: usize = 2;

/// Requests served over io_uring since the process started (all sessions).
static SERVED: AtomicU64 = AtomicU64::new(0);

/// Number of requests this process has served over FUSE io_uring queues (0 when the
/// experiment is off or its setup failed and the session fell back to `/dev/fuse`).
pub fn requests_served() -> u64 {
    SERVED.load(Ordering::Relaxed)
}

/// What the handshake negotiated for io_uring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UringParams {
    /// Bytes of each entry's payload buffer (the kernel's `max_payload_sz` or more).
    pub(crate) payload_size: usize,
}

/// Number of FUSE queues the kernel expects: `num_possible_cpus()`.
pub(crate) fn possible_cpus() -> usize {
    // "0-1", "0-3,5", "0"
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut n = 0usize;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let last = part.rsplit('-').next().unwrap_or(part);
        if let Ok(v) = last.parse::<usize>() {
            n = n.max(v + 1);
        }
    }
    if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    }
}

/// One ring entry: the two buffers the kernel was given, and the reply hand-over.
///
/// The kernel writes the buffers only while the entry is registered and idle; between a
/// completion and the next COMMIT_AND_FETCH they belong to this process: the queue thread
/// reads the request, then exactly one reply (possibly from another thread) writes its
/// answer under `reply`'s lock, then the queue thread commits.
pub(crate) struct Entry {
    header: UnsafeCell<Box<[u8]>>,
    payload: UnsafeCell<Box<[u8]>>,
    /// `Some(payload bytes)` once the reply for the current request is written.
    reply: Mutex<Option<usize>>,
    replied: Condvar,
}

// SAFETY: the buffers are accessed by one thread at a time, as described above (the queue
// thread, or the reply sender holding `reply`'s lock while the queue thread waits for it).
unsafe impl Sync for Entry {}
// SAFETY: plain owned memory.
unsafe impl Send for Entry {}

impl Entry {
    fn new(payload_size: usize) -> Self {
        Self {
            header: UnsafeCell::new(vec![0u8; HEADER_SIZE].into_boxed_slice()),
            payload: UnsafeCell::new(vec![0u8; payload_size].into_boxed_slice()),
            reply: Mutex::new(None),
            replied: Condvar::new(),
        }
    }

    /// # Safety
    /// The caller owns the entry's buffers at this point (see the type's doc).
    #[allow(clippy::mut_from_ref)]
    unsafe fn header(&self) -> &mut [u8] {
        unsafe { &mut *self.header.get() }
    }

    /// # Safety
    /// As [`Entry::header`].
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload(&self) -> &mut [u8] {
        unsafe { &mut *self.payload.get() }
    }

    fn wipe(&self) {
        // SAFETY: called when the kernel no longer uses the entry (teardown).
        unsafe {
            self.header().fill(0);
            self.payload().fill(0);
        }
        compiler_fence(Ordering::SeqCst);
    }
}

/// Sends a reply into a ring entry (the `ReplySender` of a request that came over io_uring).
#[derive(Clone)]
pub(crate) struct UringSender {
    entry: Arc<Entry>,
    /// For what has no io_uring form (backing files of passthrough).
    pub(crate) ch: ChannelSender,
}

impl std::fmt::Debug for UringSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringSender")
    }
}

impl UringSender {
    /// Writes the reply (`fuse_out_header` then its payload) into the entry and wakes the
    /// queue thread. A payload larger than the buffer becomes an EIO reply.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut done = self.entry.reply.lock();
        if done.is_some() {
            return Err(io::Error::other("second reply to one FUSE io_uring request"));
        }
        // SAFETY: the queue thread waits for `reply` and does not touch the buffers now.
        let (header, payload) = unsafe { (self.entry.header(), self.entry.payload()) };
        let total: usize = data.iter().map(|s| s.len()).sum();
        let mut result = Ok(());
        let n = if total < OUT_HEADER_SIZE || total - OUT_HEADER_SIZE > payload.len() {
            result = Err(io::Error::other(format!(
                "FUSE reply of {total} bytes does not fit the io_uring payload buffer"
            )));
            // An EIO answer with the request's unique id, which the header carries first.
            let unique = data
                .first()
                .filter(|s| s.len() >= OUT_HEADER_SIZE)
                .map_or([0u8; 8], |s| s[8..16].try_into().unwrap_or([0u8; 8]));
            header[..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            header[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            header[8..16].copy_from_slice(&unique);
            0
        } else {
            let mut pos = 0usize;
            for s in data {
                let mut s: &[u8] = s;
                if pos < OUT_HEADER_SIZE {
                    let k = s.len().min(OUT_HEADER_SIZE - pos);
                    header[pos..pos + k].copy_from_slice(&s[..k]);
                    pos += k;
                    s = &s[k..];
                }
                let off = pos - OUT_HEADER_SIZE;
                payload[off..off + s.len()].copy_from_slice(s);
                pos += s.len();
            }
            total - OUT_HEADER_SIZE
        };
        header[PAYLOAD_SZ..PAYLOAD_SZ + 4].copy_from_slice(&(n as u32).to_ne_bytes());
        *done = Some(n);
        self.entry.replied.notify_one();
        result
    }
}

fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    c[16..18].copy_from_slice(&qid.to_ne_bytes());
    c
}

/// `opcode::UringCmd80` has no `len`; REGISTER needs `sqe->len` = 2 (iovec count).
fn with_len(e: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `#[repr(C)]`, 128 bytes: a `struct io_uring_sqe` (len at byte
    // 24) and the 64 extra command bytes; every bit pattern is a valid value.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    unsafe { std::mem::transmute(raw) }
}

/// Serves queue `qid` until the connection ends. Returns when every entry has been torn
/// down by the kernel (unmount: its SQEs complete with ENOTCONN) or an entry failed.
pub(crate) fn run_queue<FS: Filesystem>(
    qid: u16,
    params: UringParams,
    ch: Channel,
    se: SessionEventLoop<FS>,
) -> io::Result<()> {
    let n = ENTRIES_PER_QUEUE;
    let entries: Vec<Arc<Entry>> = (0..n)
        .map(|_| Arc::new(Entry::new(params.payload_size)))
        .collect();
    // Queue depth: one SQE per entry in flight at most.
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build((2 * n) as u32)?;
    let fd = types::Fd(ch.as_fd_raw());
    let iovecs: Vec<[libc::iovec; 2]> = entries
        .iter()
        .map(|e| {
            // SAFETY: the buffers are ours until registered.
            let (h, p) = unsafe { (e.header(), e.payload()) };
            [
                libc::iovec {
                    iov_base: h.as_mut_ptr().cast(),
                    iov_len: h.len(),
                },
                libc::iovec {
                    iov_base: p.as_mut_ptr().cast(),
                    iov_len: p.len(),
                },
            ]
        })
        .collect();
    for (i, iov) in iovecs.iter().enumerate() {
        let sqe = opcode::UringCmd80::new(fd, FUSE_IO_URING_CMD_REGISTER)
            .cmd(cmd_req(0, qid))
            .addr(Some(iov.as_ptr() as u64))
            .build()
            .user_data(i as u64);
        let sqe = with_len(sqe, 2);
        // SAFETY: the iovecs and the buffers they point to outlive the ring (dropped last).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut reqbuf = FuseReadBuf::new();
    let reqbuf = reqbuf.as_mut();
    // Reply bytes left in an entry's payload by a commit that was followed at once by a new
    // request (zeroed when that request is taken).
    let mut stale = vec![0usize; n];
    let mut closed = vec![false; n];
    let mut first_error: Option<io::Error> = None;
    let mut registered = false;
    let mut pending: Vec<(usize, i32)> = Vec::with_capacity(2 * n);
    let chs = ch.sender();
    // Entries committed by the last io_uring_enter, with their reply's payload size.
    let mut committed: Vec<(usize, usize)> = Vec::with_capacity(n);
    'serve: loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                first_error = Some(e);
                break 'serve;
            }
        }
        settle(&entries, &mut committed, &mut stale);
        pending.clear();
        pending.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for (k, &(i, res)) in pending.iter().enumerate() {
            if i >= n || closed[i] {
                continue;
            }
            if res < 0 {
                closed[i] = true;
                let errno = -res;
                if errno == libc::ENOTCONN || errno == libc::ECONNABORTED {
                    debug!("FUSE io_uring queue {qid} entry {i}: connection ended");
                } else {
                    let e = io::Error::from_raw_os_error(errno);
                    let step = if registered {
                        "COMMIT_AND_FETCH"
                    } else {
                        "REGISTER"
                    };
                    error!("FUSE io_uring queue {qid} entry {i}: {step} failed: {e}");
                    first_error.get_or_insert(e);
                }
                continue;
            }
            if !registered {
                registered = true;
                info!("FUSE io_uring queue {qid}: serving");
            }
            let e = &entries[i];
            let (len, unique, psz, valid, size) = {
            // SAFETY: the completion hands the entry's buffers to us until the next commit;
            // these borrows end before a reply can write them.
            let (header, payload) = unsafe { (e.header(), e.payload()) };
            let len = u32::from_ne_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
            let unique = u64::from_ne_bytes(header[8..16].try_into().unwrap_or_default());
            let psz = u32::from_ne_bytes(
                header[PAYLOAD_SZ..PAYLOAD_SZ + 4]
                    .try_into()
                    .unwrap_or_default(),
            ) as usize;
            let valid = psz <= payload.len()
                && len >= IN_HEADER_SIZE + psz
                && len - IN_HEADER_SIZE - psz <= OP_IN
                && len <= reqbuf.len();
            let mut size = 0;
            if valid {
                let arg0 = len - IN_HEADER_SIZE - psz;
                reqbuf[..IN_HEADER_SIZE].copy_from_slice(&header[..IN_HEADER_SIZE]);
                reqbuf[IN_HEADER_SIZE..IN_HEADER_SIZE + arg0]
                    .copy_from_slice(&header[OP_IN..OP_IN + arg0]);
                reqbuf[IN_HEADER_SIZE + arg0..len].copy_from_slice(&payload[..psz]);
                size = len;
            }
            // The request (and any earlier reply's tail) leaves the ring buffers now.
            let plen = payload.len();
            payload[..psz.max(stale[i]).min(plen)].fill(0);
            header[..COMMIT_ID].fill(0);
            stale[i] = 0;
            (len, unique, psz, valid, size)
            };
            *e.reply.lock() = None;
            let sender = UringSender {
                entry: e.clone(),
                ch: chs.clone(),
            };
            match RequestWithSender::new_uring(sender.clone(), &reqbuf[..size]) {
                Some(req) if valid => {
                    if let Ok(Operation::Destroy(_)) = req.request.operation() {
                        req.reply::<ReplyEmpty>().ok();
                    } else {
                        req.dispatch(&se);
                    }
                }
                _ => {
                    error!("FUSE io_uring queue {qid}: malformed request (len {len}, payload {psz})");
                    // An EIO answer so the caller is not left waiting.
                    let mut h = [0u8; OUT_HEADER_SIZE];
                    h[..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
                    h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                    h[8..16].copy_from_slice(&unique.to_ne_bytes());
                    let _ = sender.send(&[IoSlice::new(&h)]);
                }
            }
            reqbuf[..size].fill(0);
            compiler_fence(Ordering::SeqCst);
            let reply_len = {
                let mut done = e.reply.lock();
                while done.is_none() {
                    e.replied.wait(&mut done);
                }
                done.unwrap_or(0)
            };
            SERVED.fetch_add(1, Ordering::Relaxed);
            // 0 marks "no new request yet"; the kernel writes the next one's unique here.
            // SAFETY: the reply is written; the entry is ours until the commit.
            let header = unsafe { e.header() };
            header[COMMIT_ID..COMMIT_ID + 8].fill(0);
            let sqe = opcode::UringCmd80::new(fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
                .cmd(cmd_req(unique, qid))
                .build()
                .user_data(i as u64);
            // SAFETY: the SQE points at no memory of ours (the entry's buffers were given
            // at REGISTER and outlive the ring).
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                first_error = Some(io::Error::other("io_uring submission queue full"));
                break 'serve;
            }
            committed.push((i, reply_len));
            // The last request of a batch is committed by the wait at the top of the loop
            // (one io_uring_enter per request); earlier ones now, so their callers go on.
            if k + 1 < pending.len() {
                loop {
                    match ring.submit() {
                        Ok(_) => break,
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                        Err(e) => {
                            first_error = Some(e);
                            break 'serve;
                        }
                    }
                }
                settle(&entries, &mut committed, &mut stale);
            }
        }
        if closed.iter().all(|c| *c) {
            break 'serve;
        }
    }
    // Close the ring first: its cancel handler releases what the kernel still holds, so the
    // buffers are not in its hands when they are wiped and freed.
    let all_closed = closed.iter().all(|c| *c);
    drop(ring);
    for e in &entries {
        e.wipe();
    }
    if !all_closed {
        // An entry the kernel may still refer to: keep its memory (wiped) rather than free
        // memory it could write to.
        warn!("FUSE io_uring queue {qid}: ended with live entries; their buffers are kept");
        std::mem::forget(entries);
        std::mem::forget(iovecs);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// After an `io_uring_enter`: zeroes the replies the kernel has taken from entries that are
/// idle now, and marks for later (`stale`) those already holding a new request.
fn settle(entries: &[Arc<Entry>], committed: &mut Vec<(usize, usize)>, stale: &mut [usize]) {
    for (i, reply_len) in committed.drain(..) {
        let e = &entries[i];
        // SAFETY: with DEFER_TASKRUN the kernel fills an idle entry only inside this
        // thread's io_uring_enter with GETEVENTS: the call that just returned filled it
        // (commit_id set) or it stays untouched until the next one.
        let (header, payload) = unsafe { (e.header(), e.payload()) };
        let refilled = unsafe {
            std::ptr::read_volatile(header[COMMIT_ID..].as_ptr().cast::<[u8; 8]>())
        } != [0u8; 8];
        if refilled {
            stale[i] = reply_len;
        } else {
            let plen = payload.len();
            payload[..reply_len.min(plen)].fill(0);
            header[..OUT_HEADER_SIZE].fill(0);
            compiler_fence(Ordering::SeqCst);
        }
    }
}

impl Channel {
    fn as_fd_raw(&self) -> i32 {
        self.as_fd().as_raw_fd()
    }
}

//! What one content request costs in the daemon's own code: the `volume::content` read and
//! write paths (system calls on the backing file, allocation, copies, the cipher) without
//! FUSE and without a disk (the backing file lives on tmpfs), one engine thread.
//!
//!   cargo run --release --example datapath_cost [WORKLOAD [OPS]]
//!
//! Workloads: `read1m` (sequential aligned 1 MiB reads), `read128k`, `read4k` (random),
//! `write1m` (sequential 1 MiB overwrites inside the file), `write4k` (random 4 KiB
//! overwrites), `write1m_mut` and `write4k_mut` (the same through `content::write_mut`, as
//! the daemon serves a FUSE WRITE: whole units encrypted in place in the request buffer), `append10k` (10 KiB appends at unaligned offsets, as `tar` writes). Without a
//! workload, runs each and prints the time per request (best of 3). Under
//! `valgrind --tool=callgrind` the instruction counts compare two builds on a noisy machine:
//! `valgrind --tool=callgrind target/release/examples/datapath_cost read1m 200`.
//! `datapath_cost stackdepth` prints how deep the sector loop writes into the stack in this
//! build, against the bytes the engine scrubs after it.

use std::fs::{File, OpenOptions};
use std::time::{Duration, Instant};

use cmkfs::crypto::{Dek, VolumeKeys};
use cmkfs::engine::SectorEngine;
use cmkfs::volume::content::{self, Ctx, FileState};

/// The daemon's allocator (it zeroes every freed block), so that allocation costs what it
/// costs in the daemon.
#[global_allocator]
static ALLOC: cmkfs::crypto::secret::ZeroizingAlloc = cmkfs::crypto::secret::ZeroizingAlloc;

const FILE_MIB: u64 = 64;

struct Fixture {
    _dir: tempfile::TempDir,
    file: File,
    st: FileState,
    keys: VolumeKeys,
    engine: SectorEngine,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("cmkfs-datapath-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("backing file");
        let keys = VolumeKeys::from_dek(&Dek::generate().expect("dek"), 4096).expect("keys");
        let fx = Fixture {
            _dir: dir,
            file,
            st: FileState::default(),
            keys,
            engine: SectorEngine::new(1).expect("engine"),
        };
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..FILE_MIB {
            content::write(&fx.file, &fx.st, &fx.cx(), i << 20, &chunk).expect("fill");
        }
        fx
    }

    fn cx(&self) -> Ctx<'_> {
        Ctx {
            keys: &self.keys,
            engine: &self.engine,
            sector: 4096,
            layout: cmkfs::volume::layout::Layout::V3,
        }
    }

    fn read(&self, off: u64, len: usize) -> usize {
        // As the daemon replies: from the buffer the data was decrypted in.
        content::read_buf(&self.file, &self.st, &self.cx(), off, len)
            .expect("read")
            .len()
    }

    fn write(&self, off: u64, data: &[u8]) {
        content::write(&self.file, &self.st, &self.cx(), off, data).expect("write");
    }

    /// As the daemon writes a FUSE WRITE: in place in the request's buffer.
    fn write_mut(&self, off: u64, data: &mut [u8]) {
        content::write_mut(&self.file, &self.st, &self.cx(), off, data).expect("write");
    }
}

/// A fixed pseudo-random sequence (xorshift), so every build does the same requests.
fn offsets(n: u32, span: u64, align: u64) -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % (span / align) * align
        })
        .collect()
}

fn run(fx: &Fixture, workload: &str, n: u32) -> Duration {
    let size = FILE_MIB << 20;
    let t = Instant::now();
    match workload {
        "read1m" => {
            let mut got = 0;
            for i in 0..n {
                got += fx.read((u64::from(i) << 20) % size, 1 << 20);
            }
            std::hint::black_box(got);
        }
        "read128k" => {
            for i in 0..n {
                std::hint::black_box(fx.read((u64::from(i) << 17) % size, 128 << 10));
            }
        }
        "read4k" => {
            for off in offsets(n, size, 4096) {
                std::hint::black_box(fx.read(off, 4096));
            }
        }
        "write1m" => {
            let data = vec![0xa5u8; 1 << 20];
            for i in 0..n {
                fx.write((u64::from(i) << 20) % size, &data);
            }
        }
        "write1m_mut" => {
            // The buffer is encrypted again each time: what it holds costs the same.
            let mut data = vec![0xa5u8; 1 << 20];
            for i in 0..n {
                fx.write_mut((u64::from(i) << 20) % size, &mut data);
            }
        }
        "write4k_mut" => {
            let mut data = vec![0xa5u8; 4096];
            for off in offsets(n, size, 4096) {
                fx.write_mut(off, &mut data);
            }
        }
        "write4k" => {
            let data = vec![0xa5u8; 4096];
            for off in offsets(n, size, 4096) {
                fx.write(off, &data);
            }
        }
        "append10k" => {
            let data = vec![0xa5u8; 10240];
            let start = size + 100;
            for i in 0..n {
                fx.write(start + u64::from(i) * 10240, &data);
            }
            content::truncate(&fx.file, &fx.st, &fx.cx(), size).expect("truncate");
        }
        other => {
            eprintln!("unknown workload {other}");
            std::process::exit(2);
        }
    }
    t.elapsed() / n
}

const ALL: [(&str, u32); 8] = [
    ("read1m", 300),
    ("read128k", 2000),
    ("read4k", 20000),
    ("write1m", 300),
    ("write1m_mut", 300),
    ("write4k", 20000),
    ("write4k_mut", 20000),
    ("append10k", 5000),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    #[cfg(target_arch = "x86_64")]
    if args.first().map(String::as_str) == Some("stackdepth") {
        // What the sector engine's stack scrub must cover in this (optimized) build.
        println!(
            "sector loop stack depth: {} bytes; the engine scrubs {} bytes",
            cmkfs::engine::stack_depth(),
            cmkfs::engine::ENGINE_SCRUB_BYTES
        );
        return;
    }
    let fx = Fixture::new();
    if let Some(w) = args.first() {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
        let t = run(&fx, w, n);
        println!("{w}: {t:?} per request ({n} requests)");
        return;
    }
    println!("workload    per request (best of 3)");
    for (w, n) in ALL {
        let best = (0..3).map(|_| run(&fx, w, n)).min().unwrap_or_default();
        println!("{w:<10}  {best:?}");
    }
}

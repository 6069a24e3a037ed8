//! Cost of double encryption (`EncryptionAtRestWithPlatformAndCustomerKeys`) beside single
//! encryption, through the real content path (`volume::content::{write, read}`: sector
//! engine + file I/O) on a file in `/dev/shm` (tmpfs, so the disk does not drown the cipher
//! cost), for 4 KiB, 64 KiB and 1 MiB requests on 1 thread and on all cores.
//!
//! `cargo bench --bench double` (about two minutes); filter with e.g.
//! `cargo bench --bench double -- write/double-1t`.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::Duration;

use cmkfs::crypto::{Dek, VolumeKeys};
use cmkfs::engine::SectorEngine;
use cmkfs::volume::content::{self, Ctx, FileState};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const UNIT: usize = 4096;
const SIZES: [usize; 3] = [4096, 64 * 1024, 1024 * 1024];

fn scratch_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

fn double(c: &mut Criterion) {
    let outer = Dek::generate().unwrap();
    let inner = Dek::generate().unwrap();
    let single = VolumeKeys::from_dek(&outer, UNIT).unwrap();
    let double = VolumeKeys::from_deks(&outer, Some(&inner), UNIT).unwrap();
    let one = SectorEngine::new(1).unwrap();
    let all = SectorEngine::new(0).unwrap();
    let dir = tempfile::tempdir_in(scratch_dir()).unwrap();
    let path = dir.path().join("bench");
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let st = FileState::default();
    // A file as large as the largest request, written once so reads have data.
    {
        let cx = Ctx {
            keys: &single,
            engine: &one,
            sector: UNIT as u64,
            layout: content::Layout::V3,
        };
        content::write(&file, &st, &cx, 0, &vec![0x5a; SIZES[2]]).unwrap();
    }
    let all_t = format!("{}t", all.threads());
    let configs = [
        ("single-1t".to_string(), &single, &one),
        ("double-1t".to_string(), &double, &one),
        (format!("single-{all_t}"), &single, &all),
        (format!("double-{all_t}"), &double, &all),
    ];
    for op in ["write", "read"] {
        let mut g = c.benchmark_group(op);
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20);
        for size in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            let data = vec![0xa5u8; size];
            for (name, keys, engine) in &configs {
                let cx = Ctx {
                    keys,
                    engine,
                    sector: UNIT as u64,
                    layout: content::Layout::V3,
                };
                g.bench_with_input(BenchmarkId::new(name.as_str(), size), &size, |b, _| {
                    b.iter(|| {
                        if op == "write" {
                            content::write(&file, &st, &cx, 0, &data).unwrap();
                        } else {
                            let got = content::read(&file, &st, &cx, 0, size).unwrap();
                            assert_eq!(got.len(), size);
                        }
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, double);
criterion_main!(benches);

//! Randomized, seed-reproducible model test (issue 6 item 4): thousands of random operations
//! against a real mount and an in-memory model of the same files, comparing contents and
//! metadata (type, size, link count, inode identity, directory listings) after every step.
//!
//! Operations: create (O_TRUNC on an existing name), write at an offset (through an open
//! descriptor or a fresh open), truncate (descriptor or path), fallocate (extend, keep-size,
//! punch hole), rename (also over an existing name and between hard links of one file), link,
//! unlink (also of files still open), reopen, shared-mmap write, and a remount half-way.
//! Names include long ones (side files) and three directories.
//!
//! Seeds: `CMKFS_MODEL_SEEDS=1,2,3` (a list) replaces the default set (two fixed seeds and one
//! fresh seed, printed, replayable with `CMKFS_TEST_SEED`); `CMKFS_MODEL_OPS=N` sets the
//! operations per seed (default 600). `scripts/soak.sh` runs long sets.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest file the model lets grow (keeps full-content checks cheap).
const MAX_SIZE: usize = 192 * 1024;
/// Open descriptors kept at most.
const MAX_HANDLES: usize = 4;
/// Full-content check of every file every this many steps (touched files are checked always).
const FULL_CHECK_EVERY: usize = 25;

const DIRS: [&str; 3] = ["", "d1", "d2"];

fn names() -> Vec<String> {
    let mut v: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    // Long names: their encrypted form needs a side file.
    v.push(format!("{}1", "l".repeat(180)));
    v.push(format!("{}2", "m".repeat(200)));
    v
}

fn rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Short form of a path for the op log.
fn short(p: &str) -> String {
    if p.len() > 24 {
        format!("{}…{}", &p[..12], &p[p.len() - 4..])
    } else {
        p.to_string()
    }
}

#[derive(Clone, Debug)]
struct Node {
    data: Vec<u8>,
    nlink: u32,
}

struct Handle {
    node: usize,
    file: File,
}

/// The model and the mount side by side.
struct World {
    /// Plaintext path (relative) → node.
    paths: BTreeMap<String, usize>,
    nodes: HashMap<usize, Node>,
    next_node: usize,
    handles: Vec<Handle>,
    /// Node → inode number seen through the mount (stable while the node lives).
    inos: HashMap<usize, u64>,
    log: Vec<String>,
    /// Set when fallocate turned out to be unsupported: the test fails at the end, after
    /// everything else has been exercised.
    fallocate_unsupported: Option<String>,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl World {
    fn new() -> World {
        World {
            paths: BTreeMap::new(),
            nodes: HashMap::new(),
            next_node: 0,
            handles: Vec::new(),
            inos: HashMap::new(),
            log: Vec::new(),
            fallocate_unsupported: None,
        }
    }

    fn note(&mut self, s: String) {
        self.log.push(s);
    }

    /// Drops nodes nobody can reach any more (no name, no descriptor).
    fn collect(&mut self) {
        let open: BTreeSet<usize> = self.handles.iter().map(|h| h.node).collect();
        self.nodes.retain(|id, n| n.nlink > 0 || open.contains(id));
        let nodes = &self.nodes;
        self.inos.retain(|id, _| nodes.contains_key(id));
    }

    fn existing(&self, rng: &mut StdRng) -> Option<String> {
        if self.paths.is_empty() {
            return None;
        }
        let i = rng.gen_range(0..self.paths.len());
        self.paths.keys().nth(i).cloned()
    }

    fn any_path(rng: &mut StdRng, names: &[String]) -> String {
        let d = DIRS[rng.gen_range(0..DIRS.len())];
        rel(d, &names[rng.gen_range(0..names.len())])
    }

    fn open_rw(mnt: &Path, p: &str) -> Result<File, String> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join(p))
            .map_err(|e| format!("open {p}: {e}"))
    }

    /// One random operation on both sides. Returns the nodes whose contents to check.
    fn step(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let roll = rng.gen_range(0..100);
        match roll {
            0..=7 => self.op_create(mnt, rng, names),
            8..=37 => self.op_write(mnt, rng),
            38..=47 => self.op_truncate(mnt, rng),
            48..=55 => self.op_fallocate(rng),
            56..=65 => self.op_rename(mnt, rng, names),
            66..=71 => self.op_link(mnt, rng, names),
            72..=79 => self.op_unlink(mnt, rng),
            80..=87 => self.op_reopen(mnt, rng),
            88..=93 => self.op_mmap(rng),
            _ => self.op_read(rng),
        }
    }

    fn op_create(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let p = Self::any_path(rng, names);
        // O_CREAT|O_TRUNC: a new file, or an existing one emptied.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(mnt.join(&p))
            .map_err(|e| format!("create {p}: {e}"))?;
        let node = match self.paths.get(&p) {
            Some(&n) => {
                self.nodes.get_mut(&n).expect("node").data.clear();
                n
            }
            None => {
                let n = self.next_node;
                self.next_node += 1;
                self.nodes.insert(
                    n,
                    Node {
                        data: Vec::new(),
                        nlink: 1,
                    },
                );
                self.paths.insert(p.clone(), n);
                n
            }
        };
        self.note(format!("create {} -> node {node}", short(&p)));
        if self.handles.len() < MAX_HANDLES {
            self.handles.push(Handle { node, file: f });
        }
        Ok(vec![node])
    }

    /// Offsets near sector boundaries are where the interesting cases are.
    fn pick_offset(rng: &mut StdRng, size: usize) -> usize {
        let limit = (size + 2 * SECTOR).min(MAX_SIZE - 1);
        if rng.gen_bool(0.5) {
            let k = rng.gen_range(0..=limit / SECTOR);
            (k * SECTOR + rng.gen_range(0..40))
                .saturating_sub(20)
                .min(limit)
        } else {
            rng.gen_range(0..=limit)
        }
    }

    fn pick_len(rng: &mut StdRng) -> usize {
        match rng.gen_range(0..10) {
            0..=2 => rng.gen_range(1..=32),
            3..=4 => rng.gen_range(SECTOR - 8..=SECTOR + 8),
            5..=8 => rng.gen_range(1..=3 * SECTOR),
            _ => rng.gen_range(1..=16 * SECTOR),
        }
    }

    fn op_write(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let via_handle = !self.handles.is_empty() && rng.gen_bool(0.7);
        let (node, file, how) = if via_handle {
            let i = rng.gen_range(0..self.handles.len());
            let h = &self.handles[i];
            (
                h.node,
                h.file.try_clone().map_err(|e| e.to_string())?,
                format!("fd{i}"),
            )
        } else {
            let Some(p) = self.existing(rng) else {
                return Ok(vec![]);
            };
            let n = self.paths[&p];
            (n, Self::open_rw(mnt, &p)?, short(&p))
        };
        let size = self.nodes[&node].data.len();
        let off = Self::pick_offset(rng, size);
        let len = Self::pick_len(rng).min(MAX_SIZE - off);
        let data = random_bytes(rng, len);
        self.note(format!(
            "write {how} node {node} at {off}+{len} (size {size})"
        ));
        file.write_all_at(&data, off as u64)
            .map_err(|e| format!("write at {off}+{len}: {e}"))?;
        let d = &mut self.nodes.get_mut(&node).expect("node").data;
        if d.len() < off + len {
            d.resize(off + len, 0);
        }
        d[off..off + len].copy_from_slice(&data);
        Ok(vec![node])
    }

    fn op_truncate(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let via_handle = !self.handles.is_empty() && rng.gen_bool(0.5);
        let (node, size_now) = if via_handle {
            let i = rng.gen_range(0..self.handles.len());
            let n = self.handles[i].node;
            (n, self.nodes[&n].data.len())
        } else {
            let Some(p) = self.existing(rng) else {
                return Ok(vec![]);
            };
            let n = self.paths[&p];
            (n, self.nodes[&n].data.len())
        };
        let new = match rng.gen_range(0..4) {
            0 => 0,
            1 => rng.gen_range(0..=size_now),
            _ => Self::pick_offset(rng, size_now),
        };
        if via_handle {
            let h = self
                .handles
                .iter()
                .find(|h| h.node == node)
                .expect("handle");
            self.log
                .push(format!("ftruncate node {node} {size_now} -> {new}"));
            h.file
                .set_len(new as u64)
                .map_err(|e| format!("ftruncate to {new}: {e}"))?;
        } else {
            let p = self
                .paths
                .iter()
                .find(|(_, &n)| n == node)
                .map(|(p, _)| p.clone())
                .expect("path");
            self.note(format!(
                "truncate {} node {node} {size_now} -> {new}",
                short(&p)
            ));
            let c = CString::new(mnt.join(&p).as_os_str().as_bytes()).expect("path");
            // SAFETY: valid C path.
            if unsafe { libc::truncate(c.as_ptr(), new as i64) } != 0 {
                return Err(format!(
                    "truncate to {new}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        self.nodes.get_mut(&node).expect("node").data.resize(new, 0);
        Ok(vec![node])
    }

    fn op_fallocate(&mut self, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        if self.handles.is_empty() || self.fallocate_unsupported.is_some() {
            return Ok(vec![]);
        }
        let i = rng.gen_range(0..self.handles.len());
        let node = self.handles[i].node;
        let size = self.nodes[&node].data.len();
        let off = Self::pick_offset(rng, size);
        let len = Self::pick_len(rng).min(MAX_SIZE - off).max(1);
        let (mode, what) = match rng.gen_range(0..3) {
            0 => (0, "extend"),
            1 => (libc::FALLOC_FL_KEEP_SIZE, "keep-size"),
            _ => (
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                "punch",
            ),
        };
        self.note(format!(
            "fallocate {what} fd{i} node {node} at {off}+{len} (size {size})"
        ));
        let fd = self.handles[i].file.as_raw_fd();
        // SAFETY: plain syscall on an open descriptor.
        if unsafe { libc::fallocate(fd, mode, off as i64, len as i64) } != 0 {
            let e = std::io::Error::last_os_error();
            if errno_of(&e) == libc::EOPNOTSUPP {
                self.fallocate_unsupported = Some(format!("fallocate {what}: {e}"));
                return Ok(vec![]);
            }
            return Err(format!("fallocate {what} at {off}+{len}: {e}"));
        }
        let d = &mut self.nodes.get_mut(&node).expect("node").data;
        match mode {
            0 => {
                if d.len() < off + len {
                    d.resize(off + len, 0);
                }
            }
            libc::FALLOC_FL_KEEP_SIZE => {}
            _ => {
                let end = (off + len).min(d.len());
                if off < end {
                    d[off..end].fill(0);
                }
            }
        }
        Ok(vec![node])
    }

    fn op_rename(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let Some(src) = self.existing(rng) else {
            return Ok(vec![]);
        };
        let dst = Self::any_path(rng, names);
        if dst == src {
            return Ok(vec![]);
        }
        let node = self.paths[&src];
        self.note(format!(
            "rename {} -> {} (node {node})",
            short(&src),
            short(&dst)
        ));
        fs::rename(mnt.join(&src), mnt.join(&dst))
            .map_err(|e| format!("rename {src} -> {dst}: {e}"))?;
        let mut touched = vec![node];
        match self.paths.get(&dst).copied() {
            // Two names of one file: rename does nothing (POSIX).
            Some(d) if d == node => return Ok(touched),
            Some(d) => {
                self.nodes.get_mut(&d).expect("node").nlink -= 1;
                touched.push(d);
            }
            None => {}
        }
        self.paths.remove(&src);
        self.paths.insert(dst, node);
        self.collect();
        touched.retain(|n| self.nodes.contains_key(n));
        Ok(touched)
    }

    fn op_link(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let Some(src) = self.existing(rng) else {
            return Ok(vec![]);
        };
        let dst = Self::any_path(rng, names);
        if self.paths.contains_key(&dst) {
            // Must fail with EEXIST and change nothing.
            let r = fs::hard_link(mnt.join(&src), mnt.join(&dst));
            return match r {
                Err(e) if errno_of(&e) == libc::EEXIST => Ok(vec![]),
                other => Err(format!(
                    "link {src} -> existing {dst}: {other:?}, expected EEXIST"
                )),
            };
        }
        let node = self.paths[&src];
        self.note(format!(
            "link {} -> {} (node {node})",
            short(&src),
            short(&dst)
        ));
        fs::hard_link(mnt.join(&src), mnt.join(&dst))
            .map_err(|e| format!("link {src} -> {dst}: {e}"))?;
        self.nodes.get_mut(&node).expect("node").nlink += 1;
        self.paths.insert(dst, node);
        Ok(vec![node])
    }

    fn op_unlink(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let Some(p) = self.existing(rng) else {
            return Ok(vec![]);
        };
        let node = self.paths[&p];
        self.note(format!("unlink {} (node {node})", short(&p)));
        fs::remove_file(mnt.join(&p)).map_err(|e| format!("unlink {p}: {e}"))?;
        self.paths.remove(&p);
        self.nodes.get_mut(&node).expect("node").nlink -= 1;
        self.collect();
        Ok(if self.nodes.contains_key(&node) {
            vec![node]
        } else {
            vec![]
        })
    }

    fn op_reopen(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        if !self.handles.is_empty() && (self.handles.len() >= MAX_HANDLES || rng.gen_bool(0.5)) {
            let i = rng.gen_range(0..self.handles.len());
            let h = self.handles.remove(i);
            self.note(format!("close fd{i} (node {})", h.node));
            drop(h);
            self.collect();
        }
        if let Some(p) = self.existing(rng) {
            let node = self.paths[&p];
            let file = Self::open_rw(mnt, &p)?;
            self.note(format!(
                "open {} -> fd{} (node {node})",
                short(&p),
                self.handles.len()
            ));
            self.handles.push(Handle { node, file });
            return Ok(vec![node]);
        }
        Ok(vec![])
    }

    fn op_mmap(&mut self, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let candidates: Vec<usize> = (0..self.handles.len())
            .filter(|&i| !self.nodes[&self.handles[i].node].data.is_empty())
            .collect();
        if candidates.is_empty() {
            return Ok(vec![]);
        }
        let i = candidates[rng.gen_range(0..candidates.len())];
        let node = self.handles[i].node;
        let size = self.nodes[&node].data.len();
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(1..=(size - off).min(3 * SECTOR));
        let data = random_bytes(rng, len);
        self.note(format!(
            "mmap-write fd{i} node {node} at {off}+{len} (size {size})"
        ));
        let fd = self.handles[i].file.as_raw_fd();
        // SAFETY: a shared mapping of `size` bytes of an open descriptor, written within its
        // bounds, synced and unmapped before anything else touches the file.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(format!("mmap: {}", std::io::Error::last_os_error()));
            }
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(off), len);
            let r = libc::msync(p, size, libc::MS_SYNC);
            let e = std::io::Error::last_os_error();
            libc::munmap(p, size);
            if r != 0 {
                return Err(format!("msync: {e}"));
            }
        }
        self.nodes.get_mut(&node).expect("node").data[off..off + len].copy_from_slice(&data);
        Ok(vec![node])
    }

    fn op_read(&mut self, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        if self.handles.is_empty() {
            return Ok(vec![]);
        }
        let i = rng.gen_range(0..self.handles.len());
        let node = self.handles[i].node;
        let data = &self.nodes[&node].data;
        let off = Self::pick_offset(rng, data.len());
        let len = Self::pick_len(rng);
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.handles[i]
                .file
                .read_at(&mut buf[got..], (off + got) as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(format!("pread fd{i} at {}: {e}", off + got)),
            }
        }
        let want = &data[off.min(data.len())..(off + len).min(data.len())];
        if &buf[..got] != want {
            return Err(format!(
                "pread fd{i} node {node} at {off}+{len}: got {got} bytes, want {} ({})",
                want.len(),
                first_difference(&buf[..got], want)
            ));
        }
        Ok(vec![])
    }

    /// Compares the mount with the model: listings, types, sizes, link counts, inode
    /// identity, and the contents of `touched` nodes (all nodes when `full`).
    fn verify(&mut self, mnt: &Path, touched: &[usize], full: bool) -> Result<(), String> {
        for d in DIRS {
            let dir = mnt.join(d);
            let mut got: Vec<String> = fs::read_dir(&dir)
                .map_err(|e| format!("readdir /{d}: {e}"))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("readdir /{d}: {e}"))?;
            got.retain(|n| !DIRS.contains(&n.as_str()));
            got.sort();
            let mut want: Vec<String> = self
                .paths
                .keys()
                .filter_map(|p| {
                    let (pd, n) = p.rsplit_once('/').unwrap_or(("", p));
                    (pd == d).then(|| n.to_string())
                })
                .collect();
            want.sort();
            if got != want {
                return Err(format!(
                    "listing of /{d}: got {:?}, want {:?}",
                    got.iter().map(|s| short(s)).collect::<Vec<_>>(),
                    want.iter().map(|s| short(s)).collect::<Vec<_>>()
                ));
            }
        }
        let mut seen_inos: HashMap<u64, usize> = HashMap::new();
        for (p, &node) in &self.paths {
            let md = fs::symlink_metadata(mnt.join(p)).map_err(|e| format!("stat {p}: {e}"))?;
            let n = &self.nodes[&node];
            if !md.is_file() {
                return Err(format!("{p}: not a regular file ({:?})", md.file_type()));
            }
            if md.len() != n.data.len() as u64 {
                return Err(format!(
                    "{}: size {} , want {} (node {node})",
                    short(p),
                    md.len(),
                    n.data.len()
                ));
            }
            if md.nlink() != n.nlink as u64 {
                return Err(format!(
                    "{}: nlink {}, want {} (node {node})",
                    short(p),
                    md.nlink(),
                    n.nlink
                ));
            }
            match self.inos.get(&node) {
                Some(&ino) if ino != md.ino() => {
                    return Err(format!(
                        "{}: inode {} changed from {ino} (node {node})",
                        short(p),
                        md.ino()
                    ))
                }
                Some(_) => {}
                None => {
                    self.inos.insert(node, md.ino());
                }
            }
            if let Some(&other) = seen_inos.get(&md.ino()) {
                if other != node {
                    return Err(format!(
                        "{}: inode {} shared by nodes {other} and {node}",
                        short(p),
                        md.ino()
                    ));
                }
            }
            seen_inos.insert(md.ino(), node);
        }
        let check: Vec<usize> = if full {
            self.nodes.keys().copied().collect()
        } else {
            touched.to_vec()
        };
        for node in check {
            let Some(n) = self.nodes.get(&node) else {
                continue;
            };
            let path = self
                .paths
                .iter()
                .find(|(_, &x)| x == node)
                .map(|(p, _)| p.clone());
            let got = match &path {
                Some(p) => fs::read(mnt.join(p)).map_err(|e| format!("read {p}: {e}"))?,
                None => {
                    // Unlinked but open: read through a descriptor.
                    let h = self
                        .handles
                        .iter()
                        .find(|h| h.node == node)
                        .ok_or_else(|| {
                            format!("node {node} has neither a name nor a descriptor")
                        })?;
                    let mut buf = vec![0u8; n.data.len() + SECTOR];
                    let mut got = 0;
                    loop {
                        match h.file.read_at(&mut buf[got..], got as u64) {
                            Ok(0) => break,
                            Ok(k) => got += k,
                            Err(e) => return Err(format!("pread unlinked node {node}: {e}")),
                        }
                        if got == buf.len() {
                            break;
                        }
                    }
                    buf.truncate(got);
                    buf
                }
            };
            if got != n.data {
                return Err(format!(
                    "contents of node {node} ({}): {}",
                    path.as_deref()
                        .map(short)
                        .unwrap_or_else(|| "unlinked".into()),
                    first_difference(&got, &n.data)
                ));
            }
        }
        Ok(())
    }
}

fn first_difference(got: &[u8], want: &[u8]) -> String {
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    format!(
        "got {} bytes, want {}; first difference at {i} (sector {}, +{})",
        got.len(),
        want.len(),
        i / SECTOR,
        i % SECTOR
    )
}

/// Runs `ops` random operations from `seed` on a fresh volume; remounts half-way and at the
/// end. Panics with the seed and the last operations on the first mismatch.
fn run_seed(seed: u64, ops: usize) {
    let env = Env::new();
    env.init(&env.cipher);
    let names = names();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut world = World::new();
    let mut m = env.mount(&env.cipher, &env.mnt);
    for d in DIRS.iter().filter(|d| !d.is_empty()) {
        fs::create_dir(m.mnt.join(d)).unwrap();
    }
    let fail = |world: &World, step: usize, why: String| -> ! {
        let start = world.log.len().saturating_sub(30);
        panic!(
            "model mismatch, seed {seed}, step {step}: {why}\nlast operations:\n  {}\n\
             replay: CMKFS_MODEL_SEEDS={seed} CMKFS_MODEL_OPS={ops} cargo nextest run --test model",
            world.log[start..].join("\n  ")
        );
    };
    for step in 0..ops {
        if step == ops / 2 {
            // Everything must survive a remount (descriptors closed first).
            world.handles.clear();
            world.collect();
            world.note("remount".into());
            m.unmount();
            m = env.mount(&env.cipher, &env.mnt);
            if let Err(e) = world.verify(&m.mnt, &[], true) {
                fail(&world, step, format!("after remount: {e}"));
            }
        }
        let touched = match world.step(&m.mnt, &mut rng, &names) {
            Ok(t) => t,
            Err(e) => fail(&world, step, e),
        };
        if let Err(e) = world.verify(&m.mnt, &touched, step % FULL_CHECK_EVERY == 0) {
            fail(&world, step, e);
        }
    }
    world.handles.clear();
    world.collect();
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    if let Err(e) = world.verify(&m.mnt, &[], true) {
        fail(&world, ops, format!("after the final remount: {e}"));
    }
    m.unmount();
    // And the backing store is consistent.
    let out = env.cmkfs(&[std::ffi::OsStr::new("fsck"), env.cipher.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "seed {seed}: fsck after the run:\n{out}"
    );
    if let Some(why) = world.fallocate_unsupported {
        panic!("seed {seed}: fallocate is not supported ({why}); the model skipped it");
    }
    eprintln!("seed {seed}: {ops} operations matched the model");
}

/// The seeds to run: `CMKFS_MODEL_SEEDS` or two fixed ones and a fresh one.
fn seeds() -> Vec<u64> {
    match std::env::var("CMKFS_MODEL_SEEDS") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("CMKFS_MODEL_SEEDS: {s:?} is not a u64"))
            })
            .collect(),
        Err(_) => vec![1, 2, seed("model")],
    }
}

fn ops() -> usize {
    std::env::var("CMKFS_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

#[test]
fn random_operations_match_the_model() {
    let ops = ops();
    for s in seeds() {
        eprintln!("model: seed {s}, {ops} operations");
        run_seed(s, ops);
    }
}

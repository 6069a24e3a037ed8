//! Randomized, seed-reproducible model test (issue 6 item 4): thousands of random operations
//! against a real mount and an in-memory model of the same files, comparing contents and
//! metadata (type, size, link count, inode identity, directory listings) after every step.
//!
//! Operations: create (O_TRUNC on an existing name), write at an offset (through an open
//! descriptor or a fresh open), truncate (descriptor or path), fallocate (extend, keep-size,
//! punch hole), rename (also over an existing name and between hard links of one file), link,
//! unlink (also of files still open), reopen, shared-mmap write, and a remount half-way.
//! Names include long ones (side files) and three directories. Since issue 12 also: symlinks
//! (targets of 1..=4095 bytes, long ones in side files), FIFOs and device nodes, mkdir and
//! rmdir of subdirectories and directories renamed over (empty or not) directories, and
//! extended attributes (`user.*`, `trusted.*`) set and removed by name or through a
//! descriptor, also of a file unlinked while open.
//!
//! Seeds: `CMKFS_MODEL_SEEDS=1,2,3` (a list) replaces the default set (two fixed seeds and one
//! fresh seed, printed, replayable with `CMKFS_TEST_SEED`); `CMKFS_MODEL_OPS=N` sets the
//! operations per seed (default 600). `scripts/soak.sh` runs long sets.
//!
//! Cache mode: the mounts use the default (the writeback cache); one cheap test runs the
//! model with `--no-writeback-cache`, and `CMKFS_TEST_MOUNT_ARGS=--no-writeback-cache` runs
//! every test of the suite in that mode.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
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
/// Names of the subdirectories the model makes and removes (in any of `DIRS`).
const SUBDIRS: [&str; 2] = ["s1", "s2"];
/// The file a subdirectory may hold (so that it is not empty).
const INNER: &str = "inner";

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

/// What a node is.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    File,
    Symlink(Vec<u8>),
    Fifo,
    CharDev(u64),
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    data: Vec<u8>,
    nlink: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Node {
    fn new(kind: Kind) -> Node {
        Node {
            kind,
            data: Vec::new(),
            nlink: 1,
            xattrs: BTreeMap::new(),
        }
    }
}

struct Handle {
    node: usize,
    file: File,
}

/// The model and the mount side by side.
struct World {
    /// Plaintext path (relative) → node (everything but directories).
    paths: BTreeMap<String, usize>,
    /// Subdirectories made by the model (relative path) → whether they hold `INNER`.
    subdirs: BTreeMap<String, bool>,
    nodes: HashMap<usize, Node>,
    next_node: usize,
    handles: Vec<Handle>,
    /// Node → inode number seen through the mount (stable while the node lives).
    inos: HashMap<usize, u64>,
    /// A re-encryption ran before a remount: it replaces each symlink by a new one (a
    /// symlink's target cannot be rewritten in place), which the mount that ran it keeps
    /// showing under the old number, and a new mount under the new one. Cleared once seen.
    symlinks_renumbered: bool,
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
            subdirs: BTreeMap::new(),
            nodes: HashMap::new(),
            next_node: 0,
            handles: Vec::new(),
            inos: HashMap::new(),
            symlinks_renumbered: false,
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

    /// Any existing name (file, symlink, FIFO, device).
    fn existing(&self, rng: &mut StdRng) -> Option<String> {
        if self.paths.is_empty() {
            return None;
        }
        let i = rng.gen_range(0..self.paths.len());
        self.paths.keys().nth(i).cloned()
    }

    /// An existing name of a regular file.
    fn existing_file(&self, rng: &mut StdRng) -> Option<String> {
        let files: Vec<&String> = self
            .paths
            .iter()
            .filter(|(_, n)| self.nodes[n].kind == Kind::File)
            .map(|(p, _)| p)
            .collect();
        (!files.is_empty()).then(|| files[rng.gen_range(0..files.len())].clone())
    }

    /// A path for a new entry, or `None` when a subdirectory has that name.
    fn free_path(&self, rng: &mut StdRng, names: &[String]) -> Option<String> {
        let p = Self::any_path(rng, names);
        (!self.subdirs.contains_key(&p)).then_some(p)
    }

    fn new_node(&mut self, kind: Kind) -> usize {
        let n = self.next_node;
        self.next_node += 1;
        self.nodes.insert(n, Node::new(kind));
        n
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
        let roll = rng.gen_range(0..120);
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
            94..=99 => self.op_read(rng),
            100..=103 => self.op_symlink(mnt, rng, names),
            104..=105 => self.op_mknod(mnt, rng, names),
            106..=108 => self.op_mkdir(mnt, rng),
            109..=110 => self.op_rmdir(mnt, rng),
            111..=113 => self.op_rename_dir(mnt, rng, names),
            _ => self.op_xattr(mnt, rng),
        }
    }

    fn op_create(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let Some(p) = self.free_path(rng, names) else {
            return Ok(vec![]);
        };
        if self
            .paths
            .get(&p)
            .is_some_and(|n| self.nodes[n].kind != Kind::File)
        {
            return Ok(vec![]); // a symlink would be followed, a FIFO would block
        }
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
                let n = self.new_node(Kind::File);
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
            let Some(p) = self.existing_file(rng) else {
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
        model_write(d, off, &data);
        Ok(vec![node])
    }

    fn op_truncate(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let via_handle = !self.handles.is_empty() && rng.gen_bool(0.5);
        let (node, size_now) = if via_handle {
            let i = rng.gen_range(0..self.handles.len());
            let n = self.handles[i].node;
            (n, self.nodes[&n].data.len())
        } else {
            let Some(p) = self.existing_file(rng) else {
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
        if self.subdirs.contains_key(&dst) {
            // A non-directory over a directory: EISDIR, nothing changes.
            let r = fs::rename(mnt.join(&src), mnt.join(&dst));
            return match r {
                Err(e) if errno_of(&e) == libc::EISDIR => Ok(vec![]),
                other => Err(format!(
                    "rename {src} over directory {dst}: {other:?}, want EISDIR"
                )),
            };
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
        if self.paths.contains_key(&dst) || self.subdirs.contains_key(&dst) {
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
        if let Some(p) = self.existing_file(rng) {
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

    fn op_symlink(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let Some(p) = self.free_path(rng, names) else {
            return Ok(vec![]);
        };
        // Short targets, targets around the side-file threshold (3039/3040), and long ones.
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..=64),
            1 => rng.gen_range(3030..=3050),
            2 => rng.gen_range(3051..=4094),
            _ => 4095,
        };
        // Any byte but NUL; a fixed first byte keeps it from resolving anywhere real.
        let mut target: Vec<u8> = (0..len).map(|_| rng.gen_range(1..=255u8)).collect();
        target[0] = b'~';
        let r = std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), mnt.join(&p));
        if self.paths.contains_key(&p) {
            return match r {
                Err(e) if errno_of(&e) == libc::EEXIST => Ok(vec![]),
                other => Err(format!("symlink over existing {p}: {other:?}, want EEXIST")),
            };
        }
        r.map_err(|e| format!("symlink {p} ({len}-byte target): {e}"))?;
        let node = self.new_node(Kind::Symlink(target));
        self.paths.insert(p.clone(), node);
        self.note(format!(
            "symlink {} ({len} bytes) -> node {node}",
            short(&p)
        ));
        Ok(vec![node])
    }

    fn op_mknod(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        let Some(p) = self.free_path(rng, names) else {
            return Ok(vec![]);
        };
        let (kind, mode, dev) = if rng.gen_bool(0.5) {
            (Kind::Fifo, libc::S_IFIFO | 0o644, 0)
        } else {
            let dev = libc::makedev(rng.gen_range(1..300), rng.gen_range(0..70000));
            (Kind::CharDev(dev), libc::S_IFCHR | 0o600, dev)
        };
        let c = CString::new(mnt.join(&p).as_os_str().as_bytes()).expect("path");
        // SAFETY: valid C path.
        let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
        let e = std::io::Error::last_os_error();
        if self.paths.contains_key(&p) {
            return match r {
                -1 if errno_of(&e) == libc::EEXIST => Ok(vec![]),
                _ => Err(format!("mknod over existing {p}: {r} {e}, want EEXIST")),
            };
        }
        if r != 0 {
            return Err(format!("mknod {p} {kind:?}: {e}"));
        }
        let node = self.new_node(kind.clone());
        self.paths.insert(p.clone(), node);
        self.note(format!("mknod {} {kind:?} -> node {node}", short(&p)));
        Ok(vec![node])
    }

    fn any_subdir(rng: &mut StdRng) -> String {
        rel(
            DIRS[rng.gen_range(0..DIRS.len())],
            SUBDIRS[rng.gen_range(0..SUBDIRS.len())],
        )
    }

    fn op_mkdir(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let p = Self::any_subdir(rng);
        let r = fs::create_dir(mnt.join(&p));
        if self.subdirs.contains_key(&p) {
            return match r {
                Err(e) if errno_of(&e) == libc::EEXIST => Ok(vec![]),
                other => Err(format!("mkdir existing {p}: {other:?}, want EEXIST")),
            };
        }
        r.map_err(|e| format!("mkdir {p}: {e}"))?;
        let inner = rng.gen_bool(0.4);
        if inner {
            fs::write(mnt.join(&p).join(INNER), p.as_bytes())
                .map_err(|e| format!("write {p}/{INNER}: {e}"))?;
        }
        self.note(format!("mkdir {p} (inner: {inner})"));
        self.subdirs.insert(p, inner);
        Ok(vec![])
    }

    fn op_rmdir(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        if self.subdirs.is_empty() {
            return Ok(vec![]);
        }
        let i = rng.gen_range(0..self.subdirs.len());
        let (p, inner) = self
            .subdirs
            .iter()
            .nth(i)
            .map(|(p, i)| (p.clone(), *i))
            .expect("dir");
        let r = fs::remove_dir(mnt.join(&p));
        if inner {
            return match r {
                Err(e) if errno_of(&e) == libc::ENOTEMPTY => Ok(vec![]),
                other => Err(format!("rmdir non-empty {p}: {other:?}, want ENOTEMPTY")),
            };
        }
        r.map_err(|e| format!("rmdir {p}: {e}"))?;
        self.note(format!("rmdir {p}"));
        self.subdirs.remove(&p);
        Ok(vec![])
    }

    /// Renames a subdirectory: to a free name, over an empty directory (which it replaces),
    /// over a non-empty one (ENOTEMPTY), or over a non-directory (ENOTDIR).
    fn op_rename_dir(
        &mut self,
        mnt: &Path,
        rng: &mut StdRng,
        names: &[String],
    ) -> Result<Vec<usize>, String> {
        if self.subdirs.is_empty() {
            return Ok(vec![]);
        }
        let i = rng.gen_range(0..self.subdirs.len());
        let (src, inner) = self
            .subdirs
            .iter()
            .nth(i)
            .map(|(p, i)| (p.clone(), *i))
            .expect("dir");
        let dst = if rng.gen_bool(0.8) {
            Self::any_subdir(rng)
        } else {
            Self::any_path(rng, names)
        };
        if dst == src {
            return Ok(vec![]);
        }
        let r = fs::rename(mnt.join(&src), mnt.join(&dst));
        let want = if self.paths.contains_key(&dst) {
            Some(libc::ENOTDIR)
        } else if self.subdirs.get(&dst) == Some(&true) {
            Some(libc::ENOTEMPTY)
        } else {
            None
        };
        self.note(format!("rename dir {src} -> {dst} (want {want:?})"));
        match (r, want) {
            (Ok(()), None) => {
                self.subdirs.remove(&src);
                self.subdirs.insert(dst, inner);
                Ok(vec![])
            }
            (Err(e), Some(w)) if errno_of(&e) == w => Ok(vec![]),
            (r, w) => Err(format!("rename dir {src} -> {dst}: {r:?}, want {w:?}")),
        }
    }

    /// Sets or removes an extended attribute of a regular file, by name or through a
    /// descriptor (also of a file unlinked while open).
    fn op_xattr(&mut self, mnt: &Path, rng: &mut StdRng) -> Result<Vec<usize>, String> {
        let via_handle = !self.handles.is_empty() && rng.gen_bool(0.5);
        let (node, target) = if via_handle {
            let i = rng.gen_range(0..self.handles.len());
            (
                self.handles[i].node,
                XTarget::Fd(self.handles[i].file.as_raw_fd()),
            )
        } else {
            let Some(p) = self.existing_file(rng) else {
                return Ok(vec![]);
            };
            (self.paths[&p], XTarget::Path(mnt.join(&p)))
        };
        let name = format!(
            "{}.k{}",
            ["user", "trusted"][rng.gen_range(0..2)],
            rng.gen_range(0..3)
        );
        if rng.gen_bool(0.25) {
            let r = target.remove(&name);
            let had = self
                .nodes
                .get_mut(&node)
                .expect("node")
                .xattrs
                .remove(&name)
                .is_some();
            self.note(format!("removexattr node {node} {name} (had: {had})"));
            return match (r, had) {
                (Ok(()), true) => Ok(vec![node]),
                (Err(libc::ENODATA), false) => Ok(vec![node]),
                (r, _) => Err(format!("removexattr {name} of node {node}: {r:?}")),
            };
        }
        let len = rng.gen_range(0..=300);
        let value = random_bytes(rng, len);
        self.note(format!(
            "setxattr node {node} {name} ({len} bytes, via fd: {via_handle})"
        ));
        target
            .set(&name, &value)
            .map_err(|e| format!("setxattr {name} of node {node}: errno {e}"))?;
        self.nodes
            .get_mut(&node)
            .expect("node")
            .xattrs
            .insert(name, value);
        Ok(vec![node])
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
                .chain(self.subdirs.keys())
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
        for (p, &inner) in &self.subdirs {
            let md = fs::symlink_metadata(mnt.join(p)).map_err(|e| format!("stat {p}: {e}"))?;
            if !md.is_dir() {
                return Err(format!("{p}: not a directory ({:?})", md.file_type()));
            }
            let names: Vec<_> = fs::read_dir(mnt.join(p))
                .map_err(|e| format!("readdir {p}: {e}"))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("readdir {p}: {e}"))?;
            if inner {
                // The inner file says where its directory was made.
                if names != [std::ffi::OsString::from(INNER)] {
                    return Err(format!("{p}: holds {names:?}, want [{INNER}]"));
                }
                fs::read(mnt.join(p).join(INNER)).map_err(|e| format!("read {p}/{INNER}: {e}"))?;
            } else if !names.is_empty() {
                return Err(format!("{p}: holds {names:?}, want nothing"));
            }
        }
        let mut seen_inos: HashMap<u64, usize> = HashMap::new();
        for (p, &node) in &self.paths {
            let md = fs::symlink_metadata(mnt.join(p)).map_err(|e| format!("stat {p}: {e}"))?;
            let n = &self.nodes[&node];
            let ft = md.file_type();
            let kind_ok = match &n.kind {
                Kind::File => ft.is_file(),
                Kind::Symlink(t) => {
                    ft.is_symlink()
                        && md.len() == t.len() as u64
                        && fs::read_link(mnt.join(p))
                            .map(|g| g.as_os_str().as_bytes() == t.as_slice())
                            .unwrap_or(false)
                }
                Kind::Fifo => ft.is_fifo(),
                Kind::CharDev(d) => ft.is_char_device() && md.rdev() == *d,
            };
            if !kind_ok {
                return Err(format!(
                    "{}: type {ft:?} size {} rdev {:x}, want {:?} (node {node})",
                    short(p),
                    md.len(),
                    md.rdev(),
                    match &n.kind {
                        Kind::Symlink(t) => format!(
                            "symlink of {} bytes (readlink: {:?})",
                            t.len(),
                            fs::read_link(mnt.join(p)).map(|g| g.as_os_str().len())
                        ),
                        k => format!("{k:?}"),
                    }
                ));
            }
            if n.kind == Kind::File && md.len() != n.data.len() as u64 {
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
                Some(&ino)
                    if ino != md.ino()
                        && self.symlinks_renumbered
                        && matches!(n.kind, Kind::Symlink(_)) =>
                {
                    self.inos.insert(node, md.ino());
                }
                Some(&ino) if ino != md.ino() => {
                    return Err(format!(
                        "{}: inode {} changed from {ino} (node {node}, {})",
                        short(p),
                        md.ino(),
                        match &n.kind {
                            Kind::Symlink(t) => format!("symlink of {} bytes", t.len()),
                            k => format!("{k:?}"),
                        }
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
            if n.kind != Kind::File {
                continue;
            }
            self.verify_xattrs(mnt, node)?;
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

impl World {
    /// The `user.*` and `trusted.*` attributes of a file, by name or through a descriptor
    /// when it has no name left.
    fn verify_xattrs(&self, mnt: &Path, node: usize) -> Result<(), String> {
        let target = match self.paths.iter().find(|(_, &x)| x == node) {
            Some((p, _)) => XTarget::Path(mnt.join(p)),
            None => match self.handles.iter().find(|h| h.node == node) {
                Some(h) => XTarget::Fd(h.file.as_raw_fd()),
                None => return Ok(()),
            },
        };
        let mut got = BTreeMap::new();
        for name in target
            .list()
            .map_err(|e| format!("listxattr node {node}: errno {e}"))?
        {
            if name.starts_with("user.") || name.starts_with("trusted.") {
                let v = target
                    .get(&name)
                    .map_err(|e| format!("getxattr {name} of node {node}: errno {e}"))?;
                got.insert(name, v);
            }
        }
        if got != self.nodes[&node].xattrs {
            return Err(format!(
                "xattrs of node {node}: got {:?}, want {:?}",
                got.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>(),
                self.nodes[&node]
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k, v.len()))
                    .collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

/// Where an xattr call goes: a path or an open descriptor.
enum XTarget {
    Path(std::path::PathBuf),
    Fd(i32),
}

impl XTarget {
    fn set(&self, name: &str, value: &[u8]) -> Result<(), i32> {
        let n = CString::new(name).expect("name");
        // SAFETY: valid C strings, descriptor and buffer.
        let r = unsafe {
            match self {
                XTarget::Path(p) => {
                    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
                    libc::setxattr(
                        c.as_ptr(),
                        n.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                }
                XTarget::Fd(fd) => {
                    libc::fsetxattr(*fd, n.as_ptr(), value.as_ptr().cast(), value.len(), 0)
                }
            }
        };
        if r != 0 {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), i32> {
        let n = CString::new(name).expect("name");
        // SAFETY: valid C strings and descriptor.
        let r = unsafe {
            match self {
                XTarget::Path(p) => {
                    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
                    libc::removexattr(c.as_ptr(), n.as_ptr())
                }
                XTarget::Fd(fd) => libc::fremovexattr(*fd, n.as_ptr()),
            }
        };
        if r != 0 {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, i32> {
        let n = CString::new(name).expect("name");
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid C strings, descriptor and buffer.
        let r = unsafe {
            match self {
                XTarget::Path(p) => {
                    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
                    libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
                XTarget::Fd(fd) => {
                    libc::fgetxattr(*fd, n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
            }
        };
        if r < 0 {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    fn list(&self) -> Result<Vec<String>, i32> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid C strings, descriptor and buffer.
        let r = unsafe {
            match self {
                XTarget::Path(p) => {
                    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
                    libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
                XTarget::Fd(fd) => libc::flistxattr(*fd, buf.as_mut_ptr().cast(), buf.len()),
            }
        };
        if r < 0 {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        Ok(buf[..r as usize]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect())
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
    run_seed_with(seed, ops, false, None)
}

/// [`run_seed`]; with `reencrypt`, `cmkfs volume reencrypt --online` runs again and again on
/// the mount meanwhile (issue 13: reads and writes during an online re-encryption).
fn run_seed_with(seed: u64, ops: usize, reencrypt: bool, mode: Option<&[&str]>) {
    let mut env = Env::new();
    if let Some(mode) = mode {
        env = env.in_mode(mode);
    }
    env.init(&env.cipher);
    let names = names();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut world = World::new();
    let m = env.mount(&env.cipher, &env.mnt);
    for d in DIRS.iter().filter(|d| !d.is_empty()) {
        fs::create_dir(m.mnt.join(d)).unwrap();
    }
    let fail = |world: &World, step: usize, why: String| -> ! {
        let start = world.log.len().saturating_sub(30);
        // The daemon's warnings say what it saw (the temp dir is gone after the test).
        let warnings: String = fs::read_dir(env.home.join("run"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .flat_map(|e| {
                fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("  {l}\n"))
                    .collect::<Vec<_>>()
            })
            .collect();
        panic!(
            "model mismatch, seed {seed}, step {step}: {why}\nlast operations:\n  {}\n\
             daemon warnings:\n{warnings}\
             replay: CMKFS_MODEL_SEEDS={seed} CMKFS_MODEL_OPS={ops} cargo nextest run -E 'test(/^model::/)'",
            world.log[start..].join("\n  ")
        );
    };
    let remounting = std::sync::Mutex::new(());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let finished = std::sync::atomic::AtomicUsize::new(0);
    /// Stops the re-encrypting thread however the operations end (a panic included).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let m = std::thread::scope(|sc| {
        let mut m = m;
        let _stop = StopOnDrop(&stop);
        if reencrypt {
            sc.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let _g = remounting.lock().unwrap_or_else(|p| p.into_inner());
                    let out = env.cmkfs(&[
                        std::ffi::OsStr::new("volume"),
                        std::ffi::OsStr::new("reencrypt"),
                        env.cipher.as_os_str(),
                        std::ffi::OsStr::new("--online"),
                        std::ffi::OsStr::new("--json"),
                    ]);
                    assert!(out.ok(), "seed {seed}: online re-encryption failed:\n{out}");
                    finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        for step in 0..ops {
            if step == ops / 2 {
                // Everything must survive a remount (descriptors closed first).
                let _g = remounting.lock().unwrap_or_else(|p| p.into_inner());
                world.handles.clear();
                world.collect();
                world.note("remount".into());
                m.unmount();
                m = env.mount(&env.cipher, &env.mnt);
                world.symlinks_renumbered = reencrypt;
                if let Err(e) = world.verify(&m.mnt, &[], true) {
                    fail(&world, step, format!("after remount: {e}"));
                }
                world.symlinks_renumbered = false;
            }
            let touched = match world.step(&m.mnt, &mut rng, &names) {
                Ok(t) => t,
                Err(e) => fail(&world, step, e),
            };
            if let Err(e) = world.verify(&m.mnt, &touched, step % FULL_CHECK_EVERY == 0) {
                fail(&world, step, e);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        m
    });
    if reencrypt {
        let n = finished.load(std::sync::atomic::Ordering::SeqCst);
        let h = cmkfs::volume::header::VolumeHeader::read(&env.cipher).unwrap();
        assert!(
            n >= 1 && h.key_generation as usize >= n,
            "seed {seed}: {n} re-encryptions, generation {}",
            h.key_generation
        );
        eprintln!("seed {seed}: {n} online re-encryptions ran during the operations");
    }
    world.handles.clear();
    world.collect();
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    world.symlinks_renumbered = reencrypt;
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
fn random_operations_match_the_model_while_the_volume_is_reencrypted_online() {
    // Small batches: files are converted over several batches while they are used.
    std::env::set_var("CMKFS_REENCRYPT_BATCH_BYTES", "16384");
    let s = seed("model during online reencrypt");
    // Suite budget (issue 13): a sixth of the plain model's operations unless
    // `CMKFS_MODEL_OPS` says otherwise.
    let ops = match std::env::var("CMKFS_MODEL_OPS") {
        Ok(_) => ops(),
        Err(_) => 100,
    };
    run_seed_with(s, ops, true, None);
}

/// The cache mode that is not the default (`--no-writeback-cache`: every write reaches the
/// daemon as it is made), on a cheap subset: one fresh seed, a sixth of the default
/// operations unless `CMKFS_MODEL_OPS` says otherwise (`scripts/soak.sh` with
/// `CMKFS_TEST_MOUNT_ARGS=--no-writeback-cache` runs long sets in that mode). The other tests
/// run in the default mode, or in the one `CMKFS_TEST_MOUNT_ARGS` names.
#[test]
fn random_operations_match_the_model_without_the_writeback_cache() {
    let s = seed("model without the writeback cache");
    let ops = match std::env::var("CMKFS_MODEL_OPS") {
        Ok(_) => ops(),
        Err(_) => 100,
    };
    run_seed_with(s, ops, false, Some(&["--no-writeback-cache"]));
}

#[test]
fn random_operations_match_the_model() {
    let ops = ops();
    // The seeds run side by side, each on a volume and mount of its own: the test waits on
    // FUSE round trips more than it computes, so their waits overlap (the same operations
    // and checks as one after the other, in about half the time). A failure names its seed.
    std::thread::scope(|scope| {
        for s in seeds() {
            std::thread::Builder::new()
                .name(format!("model seed {s}"))
                .spawn_scoped(scope, move || {
                    eprintln!("model: seed {s}, {ops} operations");
                    run_seed(s, ops);
                })
                .expect("spawn a model thread");
        }
    });
}

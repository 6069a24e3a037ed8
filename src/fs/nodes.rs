//! The inodes the kernel knows, and how a request's inode is turned into something the
//! volume can act on.
//!
//! Each inode keeps the names it was reached by as links — (parent inode, plaintext name,
//! backing name) — never a backing path: a path would go stale when another request renames
//! a parent, and could outgrow PATH_MAX long before the plaintext path does. A directory
//! is reached through its cached descriptor ([`Dir`], which follows the directory through
//! renames) or, when none is cached, by opening it from its nearest cached ancestor one
//! component at a time, checking at each step that the inode is the one expected. The cache
//! is bounded; the root is always in it.
//!
//! Inode numbers are the backing inode numbers, except the root, which is 1 (and a backing
//! inode numbered 1, which shows as `u64::MAX`), and a symlink an online re-encryption
//! replaced by a new inode, which keeps the number the kernel knows it by ([`Aliases`]).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use fuser::INodeNo;

use crate::volume::{Attr, Dir, Volume, VolumeError};

use super::{enoent, lock, FsResult};

/// Directory descriptors cached at most (besides the root). Past it the cache is emptied
/// and refilled on demand: correctness never depends on an entry being there. The
/// environment variable `CMKFS_DIR_CACHE` sets another bound (tests use 1 to make every
/// request walk from the root).
const DIR_CACHE_MAX: usize = 2048;
/// Longest chain of parents walked to reach a directory (plaintext paths are at most
/// PATH_MAX bytes, so at most 2048 components).
const MAX_DEPTH: usize = 4096;

/// One step down from a cached directory: (inode, backing name).
type Step = (u64, OsString);

/// One name of an inode.
#[derive(Clone, Debug)]
pub(super) struct Link {
    pub(super) parent: u64,
    pub(super) name: OsString,
    pub(super) bname: OsString,
}

struct Node {
    nlookup: u64,
    /// `S_IFMT` bits.
    kind: u32,
    /// Most recently used last. Empty when every name the kernel knew is gone (the file may
    /// still be open).
    links: Vec<Link>,
    dir: Option<Arc<Dir>>,
    /// The FUSE generation the kernel knows this number with. Bumped when the number is
    /// handed out for a new object while the kernel may still hold the old one (see
    /// [`NodeTable::remember`]).
    generation: u64,
}

#[derive(Default)]
struct Nodes {
    map: HashMap<u64, Node>,
    by_name: HashMap<(u64, OsString), u64>,
    cached: usize,
}

impl Nodes {
    fn drop_link(&mut self, parent: u64, name: &OsStr) -> Option<u64> {
        let ino = self.by_name.remove(&(parent, name.to_os_string()))?;
        if let Some(n) = self.map.get_mut(&ino) {
            n.links.retain(|l| !(l.parent == parent && l.name == name));
        }
        Some(ino)
    }

    fn drop_dir(&mut self, ino: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        if let Some(n) = self.map.get_mut(&ino) {
            if n.dir.take().is_some() {
                self.cached = self.cached.saturating_sub(1);
            }
        }
    }
}

/// Symlinks an online re-encryption replaced while the kernel knew them: each keeps its old
/// number (`st_ino` does not change under a running program), mapped to the new backing
/// inode. The old inode is held open (`O_PATH`, unlinked) for as long as the alias lives, so
/// the backing filesystem cannot give its number to another object meanwhile. An alias
/// lives as long as the mount, unless the symlink loses its last name through the mount
/// (then its new backing number may be reused: it no longer maps to the old one, which
/// stays held until the kernel forgets it). A leaf lock: nothing else is taken while it is
/// held.
#[derive(Default)]
struct Aliases {
    /// New backing inode → the number shown.
    shown: HashMap<u64, u64>,
    /// Number shown → (new backing inode, the held old inode).
    backing: HashMap<u64, (u64, std::os::fd::OwnedFd)>,
}

/// The inodes the kernel currently knows (handed out by lookup, create, readdirplus...).
/// Shared with the revocation monitor, which must invalidate every one of them.
pub struct NodeTable {
    nodes: Mutex<Nodes>,
    root_backing: u64,
    cache_max: usize,
    /// Held shared while a directory is found by walking, exclusively while a rename moves
    /// entries: a walk never sees a chain of names that a rename is changing.
    moves: RwLock<()>,
    /// Bumped when a re-encryption changed every backing name ([`NodeTable::rekey`]): a
    /// listing taken before carries stale backing names.
    epoch: std::sync::atomic::AtomicU64,
    aliases: Mutex<Aliases>,
    /// Whether `aliases` has any (the per-request number translations skip the lock).
    any_alias: std::sync::atomic::AtomicBool,
}

impl NodeTable {
    pub(super) fn new(vol: &Volume) -> NodeTable {
        let mut nodes = Nodes::default();
        nodes.map.insert(
            INodeNo::ROOT.0,
            Node {
                nlookup: 1,
                kind: libc::S_IFDIR,
                links: Vec::new(),
                dir: Some(vol.root_dir().clone()),
                generation: 0,
            },
        );
        NodeTable {
            nodes: Mutex::new(nodes),
            root_backing: vol.root_dir().ino(),
            cache_max: std::env::var("CMKFS_DIR_CACHE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DIR_CACHE_MAX),
            moves: RwLock::new(()),
            epoch: std::sync::atomic::AtomicU64::new(0),
            aliases: Mutex::new(Aliases::default()),
            any_alias: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// How many times every backing name changed (see the field).
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A re-encryption sealed every name again (no request runs meanwhile): each link's
    /// backing name becomes `new_name(parent's backing inode, plaintext name)` (left as it is
    /// where that gives nothing: the parent is gone).
    pub(super) fn rekey(&self, new_name: impl Fn(u64, &OsStr) -> Option<OsString>) {
        let mut nodes = lock(&self.nodes);
        for node in nodes.map.values_mut() {
            for l in node.links.iter_mut() {
                if let Some(b) = new_name(self.backing_ino(l.parent), &l.name) {
                    l.bname = b;
                }
            }
        }
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A re-encryption replaced these symlinks (no request runs meanwhile): each keeps the
    /// number it had ([`Aliases`]), whether the kernel knows it now or not (it forgets an
    /// unused entry a TTL after its last use, and a program's `stat` before the run must
    /// match one after).
    pub(super) fn symlinks_replaced(
        &self,
        replaced: Vec<crate::volume::reencrypt::ReplacedSymlink>,
    ) {
        for r in replaced {
            let shown = self.fuse_ino(r.old);
            let mut a = lock(&self.aliases);
            a.shown.remove(&r.old);
            a.shown.insert(r.new, shown);
            match a.backing.get_mut(&shown) {
                // Replaced again: the inode held since the first run still reserves `shown`
                // (the intermediate one, `r.hold`, goes).
                Some(e) => e.0 = r.new,
                None => {
                    a.backing.insert(shown, (r.new, r.hold));
                }
            }
            self.any_alias
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Kernel inode `ino` lost a name (unlink, rename over it) and the table knows no other:
    /// its backing inode may be freed and its number reused, which must then show as itself,
    /// not as `ino`. The held number stays reserved until the kernel forgets `ino`.
    fn name_gone(&self, nodes: &Nodes, ino: u64) {
        if !self.any_alias.load(std::sync::atomic::Ordering::SeqCst)
            || nodes.map.get(&ino).is_some_and(|n| !n.links.is_empty())
        {
            return;
        }
        let mut a = lock(&self.aliases);
        if let Some(b) = a.backing.get(&ino).map(|e| e.0) {
            if a.shown.get(&b) == Some(&ino) {
                a.shown.remove(&b);
            }
            if !nodes.map.contains_key(&ino) {
                a.backing.remove(&ino);
            }
        }
    }

    /// The kernel forgot `ino`: an alias whose symlink is gone ends (its held inode is let
    /// go). One whose symlink lives on stays: the next lookup shows the same number.
    fn drop_alias(&self, ino: u64) {
        if !self.any_alias.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut a = lock(&self.aliases);
        let live = a
            .backing
            .get(&ino)
            .is_some_and(|e| a.shown.get(&e.0) == Some(&ino));
        if !live {
            a.backing.remove(&ino);
        }
    }

    /// Every known inode, and every (parent, name) dentry the kernel may have cached.
    pub fn invalidation_targets(&self) -> (Vec<u64>, Vec<(u64, OsString)>) {
        let nodes = lock(&self.nodes);
        let inodes = nodes.map.keys().copied().collect();
        let entries = nodes.by_name.keys().cloned().collect();
        (inodes, entries)
    }

    /// The inode number the kernel sees for backing inode `b`.
    pub(super) fn fuse_ino(&self, b: u64) -> u64 {
        if b == self.root_backing {
            INodeNo::ROOT.0
        } else if b == INodeNo::ROOT.0 {
            u64::MAX
        } else if self.any_alias.load(std::sync::atomic::Ordering::SeqCst) {
            lock(&self.aliases).shown.get(&b).copied().unwrap_or(b)
        } else {
            b
        }
    }

    /// The backing inode number of kernel inode `ino`.
    pub(super) fn backing_ino(&self, ino: u64) -> u64 {
        if ino == INodeNo::ROOT.0 {
            self.root_backing
        } else if ino == u64::MAX {
            INodeNo::ROOT.0
        } else if self.any_alias.load(std::sync::atomic::Ordering::SeqCst) {
            lock(&self.aliases)
                .backing
                .get(&ino)
                .map(|e| e.0)
                .unwrap_or(ino)
        } else {
            ino
        }
    }

    /// Records that the kernel now knows `name` in `parent` (backing `bname`) as the inode
    /// of `attr` (one more lookup). `fresh`: the object was just made (create, mkdir, mknod,
    /// symlink). Returns the inode number and its generation.
    ///
    /// Inode numbers are the backing ones, which the backing filesystem reuses as soon as a
    /// file is gone, while the kernel may still hold its inode for the old file (a file
    /// replaced by a rename, not yet forgotten). Handed out again with the same generation,
    /// the kernel would take the new file for the old inode, keeping that inode's cached
    /// size (with the writeback cache the kernel trusts its own size: the new file's first
    /// write-back went out as long as the old file). A new object under a number the kernel
    /// still knows therefore gets a new generation, and the kernel drops the old inode.
    pub(super) fn remember(
        &self,
        parent: u64,
        name: &OsStr,
        bname: &OsStr,
        attr: &Attr,
        fresh: bool,
    ) -> (u64, u64) {
        let ino = self.fuse_ino(attr.ino);
        let mut nodes = lock(&self.nodes);
        let key = (parent, name.to_os_string());
        if let Some(old) = nodes.by_name.get(&key).copied() {
            if old != ino {
                nodes.drop_link(parent, name);
            }
        }
        let n = nodes.map.entry(ino).or_insert(Node {
            nlookup: 0,
            kind: attr.kind(),
            links: Vec::new(),
            dir: None,
            generation: 0,
        });
        let reused = n.nlookup > 0 && (fresh || n.kind != attr.kind());
        n.nlookup += 1;
        if reused && ino != INodeNo::ROOT.0 {
            // The backing inode number was reused by another object.
            n.generation += 1;
            n.kind = attr.kind();
            let stale: Vec<Link> = std::mem::take(&mut n.links);
            let had_dir = n.dir.take().is_some();
            for l in stale {
                let key = (l.parent, l.name);
                if nodes.by_name.get(&key) == Some(&ino) {
                    nodes.by_name.remove(&key);
                }
            }
            if had_dir {
                nodes.cached = nodes.cached.saturating_sub(1);
            }
        }
        let n = nodes.map.get_mut(&ino).expect("inserted above");
        let generation = n.generation;
        // The freshest name goes last: it is the one most likely to still exist.
        n.links.retain(|l| !(l.parent == parent && l.name == name));
        n.links.push(Link {
            parent,
            name: name.to_os_string(),
            bname: bname.to_os_string(),
        });
        nodes.by_name.insert(key, ino);
        (ino, generation)
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub(super) fn forget(&self, ino: u64, n: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let mut nodes = lock(&self.nodes);
        let Some(node) = nodes.map.get_mut(&ino) else {
            return;
        };
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup > 0 {
            return;
        }
        if let Some(node) = nodes.map.remove(&ino) {
            if node.dir.is_some() {
                nodes.cached = nodes.cached.saturating_sub(1);
            }
            for l in node.links {
                let key = (l.parent, l.name);
                if nodes.by_name.get(&key) == Some(&ino) {
                    nodes.by_name.remove(&key);
                }
            }
        }
        drop(nodes);
        self.drop_alias(ino);
    }

    /// `name` in `parent` is gone (unlink, rmdir). Its inode keeps its other names; a
    /// removed directory's cached descriptor is dropped (its inode number may be reused).
    pub(super) fn unlinked(&self, parent: u64, name: &OsStr, was_dir: bool) {
        let mut nodes = lock(&self.nodes);
        if let Some(ino) = nodes.drop_link(parent, name) {
            if was_dir {
                nodes.drop_dir(ino);
            }
            self.name_gone(&nodes, ino);
        }
    }

    /// Follows a rename: the entry at (`parent`, `name`) is now (`newparent`, `newname`) with
    /// backing name `to`; whatever was at the destination lost that name (or, for an
    /// exchange, moved to the source name with backing name `from`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn renamed(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        from: &OsStr,
        to: &OsStr,
        exchange: bool,
    ) {
        let mut nodes = lock(&self.nodes);
        let moved = nodes.drop_link(parent, name);
        let other = nodes.drop_link(newparent, newname);
        let relink = |nodes: &mut Nodes, ino: u64, parent: u64, name: &OsStr, bname: &OsStr| {
            if let Some(n) = nodes.map.get_mut(&ino) {
                n.links.push(Link {
                    parent,
                    name: name.to_os_string(),
                    bname: bname.to_os_string(),
                });
                nodes.by_name.insert((parent, name.to_os_string()), ino);
            }
        };
        if let Some(ino) = moved {
            relink(&mut nodes, ino, newparent, newname, to);
        }
        if let Some(ino) = other {
            if exchange {
                relink(&mut nodes, ino, parent, name, from);
            } else if Some(ino) != moved {
                // A directory replaced by the rename is gone.
                nodes.drop_dir(ino);
                self.name_gone(&nodes, ino);
            }
        }
    }

    /// The type bits of a known inode.
    /// The FUSE generation the kernel knows inode `ino` with.
    pub(super) fn generation(&self, ino: u64) -> Option<u64> {
        lock(&self.nodes).map.get(&ino).map(|n| n.generation)
    }

    pub(super) fn kind(&self, ino: u64) -> Option<u32> {
        lock(&self.nodes).map.get(&ino).map(|n| n.kind)
    }

    /// The names (parent directory, backing name) of a known non-directory inode, freshest
    /// first.
    pub(super) fn links(&self, ino: u64) -> Vec<Link> {
        lock(&self.nodes)
            .map
            .get(&ino)
            .map(|n| n.links.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Taken by a rename for the time it moves entries (see [`NodeTable::dir`]).
    pub(super) fn moving(&self) -> RwLockWriteGuard<'_, ()> {
        self.moves.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory inode `ino`, held open: from the cache, or opened component by
    /// component from its nearest cached ancestor. The walk runs while no rename moves
    /// entries, so its chain of names is current; each step is also checked to be the
    /// expected inode (a name taken over behind our back is `ENOENT`, never another
    /// directory).
    pub(super) fn dir(&self, vol: &Volume, ino: u64) -> FsResult<Arc<Dir>> {
        if let Some(d) = lock(&self.nodes).map.get(&ino).and_then(|n| n.dir.clone()) {
            return Ok(d);
        }
        let _walk = self.moves.read().unwrap_or_else(|p| p.into_inner());
        let (mut dir, chain) = self.chain(ino)?;
        for (cino, bname) in chain.iter().rev() {
            dir = Arc::new(vol.open_dir(&dir, bname, Some(self.backing_ino(*cino)))?);
            self.cache(*cino, &dir);
        }
        Ok(dir)
    }

    /// The nearest cached directory above (or at) `ino`, and the (inode, backing name) steps
    /// from it down to `ino`, innermost first.
    fn chain(&self, ino: u64) -> FsResult<(Arc<Dir>, Vec<Step>)> {
        let nodes = lock(&self.nodes);
        let mut chain = Vec::new();
        let mut cur = ino;
        loop {
            let n = nodes.map.get(&cur).ok_or_else(enoent)?;
            if let Some(d) = &n.dir {
                return Ok((d.clone(), chain));
            }
            if n.kind != libc::S_IFDIR || chain.len() > MAX_DEPTH {
                return Err(VolumeError::Os(std::io::Error::from_raw_os_error(
                    libc::ENOTDIR,
                )));
            }
            let l = n.links.last().ok_or_else(enoent)?;
            chain.push((cur, l.bname.clone()));
            cur = l.parent;
        }
    }

    fn cache(&self, ino: u64, dir: &Arc<Dir>) {
        let mut nodes = lock(&self.nodes);
        if nodes.cached >= self.cache_max {
            for (i, n) in nodes.map.iter_mut() {
                if *i != INodeNo::ROOT.0 {
                    n.dir = None;
                }
            }
            nodes.cached = 0;
        }
        if let Some(n) = nodes.map.get_mut(&ino) {
            if n.dir.is_none() {
                n.dir = Some(dir.clone());
                nodes.cached += 1;
            }
        }
    }

    /// The plaintext paths of non-directory `ino` below the mount's root, as components,
    /// one per name the kernel knows it by (freshest first), each reached through its
    /// parents' most recent names. Empty when it has no name left (unlinked or renamed over
    /// while open) or no chain of known parents reaches the root. For a backup's drain,
    /// which opens the file through the mount by one of them: the caller checks that what
    /// it opened is `ino` (a rename may move a name in between).
    pub(super) fn plain_paths(&self, ino: u64) -> Vec<Vec<OsString>> {
        let nodes = lock(&self.nodes);
        let Some(node) = nodes.map.get(&ino) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        'links: for l in node.links.iter().rev() {
            let mut parts = vec![l.name.clone()];
            let mut cur = l.parent;
            while cur != INodeNo::ROOT.0 {
                let Some(up) = nodes.map.get(&cur).and_then(|n| n.links.last()) else {
                    continue 'links;
                };
                parts.push(up.name.clone());
                cur = up.parent;
                if parts.len() > MAX_DEPTH {
                    continue 'links;
                }
            }
            parts.reverse();
            out.push(parts);
        }
        out
    }

    /// The backing path of `ino` below the backing root, for log lines only (nothing is
    /// ever opened by it).
    pub(super) fn backing_path(&self, ino: u64) -> Option<PathBuf> {
        let nodes = lock(&self.nodes);
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != INodeNo::ROOT.0 {
            let l = nodes.map.get(&cur)?.links.last()?;
            parts.push(l.bname.clone());
            cur = l.parent;
            if parts.len() > MAX_DEPTH {
                return None;
            }
        }
        Some(parts.iter().rev().collect())
    }
}

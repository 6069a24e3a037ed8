//! How a new directory's id (`.cmkfs.dirid`) is made durable before `mkdir` renames the
//! directory into place, decided once per backing filesystem.
//!
//! The promise: no crash can leave the directory under its final name with an id that is
//! missing, short or zero — every name in it, old files later moved in included, is
//! encrypted under that id and could never be decrypted again. `fsync` of the id file keeps
//! it anywhere, at the price of a journal commit and a device cache flush per `mkdir`.
//!
//! On ext4 with a journal in `data=ordered` mode, waiting for the id's own write-back
//! (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`, no commit, no flush) keeps it
//! too. What that rests on, in Linux 6.18:
//!
//! - `fs/sync.c` `sync_file_range`: `WRITE` with both waits is a `WB_SYNC_ALL` write-out of
//!   the range (`filemap_fdatawrite_range`), so `fs/ext4/inode.c` `ext4_do_writepages` → `mpage_map_one_extent` → `ext4_map_blocks`
//!   allocates the delayed block and sets the on-disk size (`mpage_map_and_submit_extent`)
//!   under a journal handle; `WAIT_AFTER` (`file_fdatawait_range`) returns once the page's
//!   write-back has ended, and reports a write-back error as `fsync` would.
//! - With `dioread_nolock` (the default) that block is allocated *unwritten*
//!   (`EXT4_GET_BLOCKS_IO_CREATE_EXT`), which `ext4_map_blocks` does not put on the
//!   transaction's ordered-data list (`!(map->m_flags & EXT4_MAP_UNWRITTEN)`); it becomes
//!   written in `fs/ext4/page-io.c` `ext4_end_io_end` → `ext4_convert_unwritten_io_end_vec`
//!   (its own handle, stopped) *before* `ext4_release_io_end` → `ext4_finish_bio` →
//!   `folio_end_writeback`. Start-only write-out (`WRITE` alone) is therefore not enough: the
//!   conversion could land in a transaction after the rename's, and a crash between them
//!   would leave a 16-byte id that reads as zeros. With `WAIT_AFTER` every handle that placed
//!   the id has stopped before the rename starts its own.
//! - Without `dioread_nolock` the block is allocated written and `ext4_map_blocks` adds the
//!   inode to the ordered list (`ext4_jbd2_inode_add_wait`); `fs/jbd2/commit.c`
//!   `jbd2_journal_commit_transaction` waits for those pages
//!   (`journal_finish_inode_data_buffers`) before it submits the commit record.
//! - jbd2 commits transactions in tid order and recovery (`fs/jbd2/recovery.c`
//!   `do_one_pass`) replays only up to the first transaction without a valid commit block;
//!   the commit record goes out with `REQ_PREFLUSH | REQ_FUA` (`journal_submit_commit_record`,
//!   barrier on, not `journal_async_commit`, which ext4 refuses with `data=ordered`:
//!   `fs/ext4/super.c`), which flushes the id's completed data write from the device cache
//!   first. So a recovered state that holds the rename holds the id's allocation, size,
//!   written extent and bytes.
//! - An inherited `+j` (data journaling) or inline data puts the id's bytes in the journal at
//!   `write` time, before the rename either way.
//!
//! Anything else keeps the `fsync`: tmpfs (where it is free), ext4 without a journal (no
//! ordering at all: the machine this was measured on), `data=writeback`, `data=journal`,
//! `nobarrier`, DAX, fast commits (a rename within one directory may go into a fast commit,
//! `ext4_rename` only marks moves of a directory to another parent ineligible; that path was
//! not checked), xfs, btrfs, FUSE, an ext4 whose options cannot be read.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Mutex;

use super::sys;

/// `EXT4_SUPER_MAGIC` (also ext2/ext3, which the ext4 driver mounts: their options say
/// whether a journal is there).
const EXT4_MAGIC: i64 = 0xEF53;

/// How a new id file is made durable before its directory is renamed into place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdDurability {
    /// `fsync` of the id file.
    Fsync,
    /// Its write-back waited for (`sync_file_range` WAIT_BEFORE | WRITE | WAIT_AFTER): ext4
    /// with a journal, `data=ordered`, barriers on.
    WrittenBack,
}

/// The decision per backing filesystem (`st_dev`), taken on its first `mkdir`.
static DECIDED: Mutex<Option<HashMap<u64, IdDurability>>> = Mutex::new(None);

/// How ids of new directories inside `dir` are made durable (cached per `st_dev`). Any doubt
/// (a failed `fstatfs`, unreadable options) answers [`IdDurability::Fsync`].
pub fn for_dir(dir: BorrowedFd<'_>) -> IdDurability {
    let Ok(st) = sys::fstat(dir) else {
        return IdDurability::Fsync;
    };
    let dev = st.st_dev;
    let mut map = DECIDED.lock().unwrap_or_else(|p| p.into_inner());
    *map.get_or_insert_with(HashMap::new)
        .entry(dev)
        .or_insert_with(|| decide(dir, dev))
}

fn decide(dir: BorrowedFd<'_>, dev: u64) -> IdDurability {
    let ordered = sys::fs_magic(dir).is_ok_and(|m| m == EXT4_MAGIC)
        && ext4_options(dev).is_some_and(|o| ordered_ext4(&o));
    let d = if ordered {
        IdDurability::WrittenBack
    } else {
        IdDurability::Fsync
    };
    tracing::debug!(dev, durability = ?d, "directory ids on this backing filesystem");
    d
}

/// Every option of the ext4 filesystem on block device `dev`, defaults included
/// (`/proc/fs/ext4/<device>/options`, one per line). `/proc/self/mountinfo` cannot decide
/// this: it leaves out the default `data=ordered`, and shows no `data=` either when the
/// filesystem has no journal (the ext4 driver clears the data mode then), so "none shown"
/// means ordered or no journal at all.
fn ext4_options(dev: u64) -> Option<String> {
    let (maj, min) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    // The block device's kernel name (`vda`, `loop0`, `dm-1`) is the ext4 superblock's s_id.
    let link = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    let name = link.file_name()?;
    std::fs::read_to_string(Path::new("/proc/fs/ext4").join(name).join("options")).ok()
}

/// Whether an ext4 options list (as `/proc/fs/ext4/<device>/options` prints it) has a
/// journal in `data=ordered` mode with barriers, and nothing that changes how data reaches
/// the disk (DAX) or how a rename is logged (fast commits).
pub fn ordered_ext4(options: &str) -> bool {
    let (mut ordered, mut barrier) = (false, false);
    for o in options.lines().map(str::trim) {
        match o {
            "data=ordered" => ordered = true,
            "barrier" => barrier = true,
            // 6.18 prints the fast-commit mount flag as `fc_debug_force` (seen on an image
            // made with `mkfs.ext4 -O fast_commit`).
            "nobarrier" | "journal_async_commit" | "fc_debug_force" => return false,
            _ if o.contains("fast_commit") => return false,
            _ if o.starts_with("dax") => return false,
            _ => {}
        }
    }
    ordered && barrier
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As this machine printed them (Linux 6.18): the root ext4 has no journal (no `data=`
    /// line), a fresh `mkfs.ext4` image mounted with defaults has `data=ordered`.
    #[test]
    fn options_decide() {
        let nojournal = "rw\nbsddf\ndioread_nolock\ndelalloc\nnojournal_checksum\nbarrier\n\
                         errors=continue\ncommit=5\n";
        let ordered = "rw\nbsddf\ndioread_nolock\ndelalloc\njournal_checksum\nbarrier\n\
                       data=ordered\ncommit=5\n";
        assert!(!ordered_ext4(nojournal));
        assert!(ordered_ext4(ordered));
        assert!(!ordered_ext4(&ordered.replace("data=ordered", "data=writeback")));
        assert!(!ordered_ext4(&ordered.replace("data=ordered", "data=journal")));
        assert!(!ordered_ext4(&ordered.replace("\nbarrier", "\nnobarrier")));
        assert!(!ordered_ext4(&format!("{ordered}dax=always\n")));
        assert!(!ordered_ext4(&format!("{ordered}fc_debug_force\n")));
        assert!(!ordered_ext4(""));
    }
}

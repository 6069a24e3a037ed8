//! The volume's own files at the backing root whose bad copy makes every command refuse the
//! volume: the lock file and the journal of an interrupted upgrade. Whoever can write the
//! backing directory can plant either, so fsck names them and `--repair` sets them aside.

use std::os::unix::fs::FileTypeExt;

use super::*;
use crate::volume::lock::LOCK_FILE;
use crate::volume::upgrade::UpgradeError;

impl Checker {
    /// Reports (and with `--repair` moves to the quarantine) a `cmkfs.lock` that is not a
    /// regular file. Runs before the repair takes the volume lock, which such a file refuses;
    /// no mount can hold a lock through it, so nothing is in flight.
    pub(super) fn check_lock_file(&mut self) {
        let path = self.root.join(LOCK_FILE);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return;
        };
        let t = meta.file_type();
        let what = if t.is_file() {
            return;
        } else if t.is_symlink() {
            "a symlink"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a device node"
        };
        self.problem(
            ProblemKind::LockFileInvalid,
            &path,
            None,
            None,
            format!(
                "the volume lock file is {what}, not a regular file: mounts and every command \
                 refuse the volume while it is there; `cmkfs fsck --repair` moves it to the \
                 quarantine (cmkfs creates a new one)"
            ),
            Fix::Quarantine,
            None,
        );
    }

    /// Reports a `cmkfs.quarantine` that is not a directory: repairs would move entries
    /// through it, out of the volume (a symlink to any host directory). A link, FIFO, socket
    /// or device is removed by `--repair` (that deletes no data: a link's target stays where
    /// it is); a regular file is left for the owner to move. Runs before anything else can
    /// quarantine.
    pub(super) fn check_quarantine_dir(&mut self) {
        let path = self.root.join(QUARANTINE_DIR);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return;
        };
        let t = meta.file_type();
        let (what, fix) = if t.is_dir() {
            self.note_quarantine(&path);
            return;
        } else if t.is_symlink() {
            ("a symlink", Fix::Remove)
        } else if t.is_file() {
            ("a regular file", Fix::None)
        } else {
            ("a FIFO, socket or device", Fix::Remove)
        };
        let repair = match fix {
            Fix::Remove => "`cmkfs fsck --repair` removes it (the link alone, never its target)",
            _ => "move it out of the backing directory",
        };
        self.problem(
            ProblemKind::QuarantineInvalid,
            &path,
            None,
            None,
            format!(
                "{QUARANTINE_DIR} is {what}, not a directory: nothing is moved into it until \
                 it is gone; {repair}"
            ),
            fix,
            None,
        );
    }

    /// A quarantine that holds entries: a warning (not corruption; the exit status stays
    /// clean), so that a user whose files an earlier `--repair` set aside (an older cmkfs
    /// quarantines every file of a volume in a format it does not know) learns where they
    /// are and how to put them back.
    fn note_quarantine(&mut self, path: &Path) {
        let n = match crate::volume::reencrypt::quarantine_entries(&self.root) {
            Ok(0) => return,
            Ok(n) => n.to_string(),
            Err(e) => format!("an unknown number of (cannot be read: {e})"),
        };
        let mut batches: Vec<String> = fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| format!("{QUARANTINE_DIR}/{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        batches.sort();
        self.problem(
            ProblemKind::QuarantineNotEmpty,
            path,
            None,
            None,
            format!(
                "{n} entries set aside by an earlier `cmkfs fsck --repair` (perhaps of an older \
                 cmkfs that did not know this volume's format) are in {}: the mount does not \
                 show them; each batch's {MANIFEST_FILE} lists their backing paths: move an \
                 entry back to its path to make it visible again (then `cmkfs fsck`), or \
                 delete the batch (`cmkfs volume reencrypt` refuses while it is there unless \
                 given --discard-quarantine)",
                batches.join(", ")
            ),
            Fix::None,
            None,
        );
    }

    /// Why the upgrade journal at the root cannot be used (damaged, not whole, or another
    /// volume's), or `None` when it can (or the header cannot be read: reported elsewhere).
    pub(super) fn unusable_upgrade_journal(&self) -> Option<String> {
        let header = VolumeHeader::read(&self.root).ok()?;
        match upgrade::pending_journal(&self.root, &header) {
            Ok(_) => None,
            Err(UpgradeError::Journal { why, .. }) => Some(format!(
                "the journal of an interrupted upgrade cannot be used: {why}"
            )),
            Err(e) => Some(format!(
                "the journal of an interrupted upgrade cannot be read: {e}"
            )),
        }
    }
}

//! Size and allocation of open files: truncate and fallocate (the content module does the
//! sector work under the file's lock).

use super::content;
use super::open_create::OpenFile;
use super::{Volume, VolumeError};

impl Volume {
    /// Sets the logical size of an open file.
    pub fn truncate(&self, of: &OpenFile, size: u64) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        content::truncate(of.file(), &of.shared().content, &self.ctx(&keys), size)
    }

    /// `fallocate(2)` on an open file (see [`content::fallocate`]).
    pub fn fallocate(
        &self,
        of: &OpenFile,
        mode: i32,
        off: u64,
        len: u64,
    ) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        content::fallocate(
            of.file(),
            &of.shared().content,
            &self.ctx(&keys),
            mode,
            off,
            len,
        )
    }
}

//! The CLI side of a mount's control socket: online re-encryption and backup freezes.

use std::path::Path;

use anyhow::bail;

use crate::home::Home;

/// Asks the daemon serving `mountpoint` to re-encrypt its volume, showing its progress.
pub(crate) fn reencrypt_online(_home: &Home, mountpoint: &Path, _json: bool) -> anyhow::Result<()> {
    bail!(
        "online re-encryption of the volume mounted at {} is not available yet; unmount it first",
        mountpoint.display()
    )
}

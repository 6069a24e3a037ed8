//! The CLI side of a mount's control socket (`crate::control`): online re-encryption.

use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context};

use crate::control::{self, Answer, Request};
use crate::home::Home;

/// Asks the daemon serving `mountpoint` to re-encrypt its volume, showing its progress; an
/// interrupted command (Ctrl-C) stops it at a crash-safe point, and running it again resumes.
pub(crate) fn reencrypt_online(
    home: &Home,
    mountpoint: &Path,
    json: bool,
    discard_quarantine: bool,
) -> anyhow::Result<()> {
    let req = Request::Reencrypt { discard_quarantine };
    let conn = control::connect(home, mountpoint, &req).with_context(|| {
        format!(
            "re-encrypting the volume mounted at {}",
            mountpoint.display()
        )
    })?;
    let mut r = BufReader::new(conn);
    let bar = super::reencrypt::Bar::new(!json);
    loop {
        match control::read_answer(&mut r)? {
            Some(Answer::Progress(p)) => bar.show(&p),
            Some(Answer::Done(report)) => {
                bar.done();
                return super::reencrypt::print_report(mountpoint, &report, json);
            }
            Some(Answer::Error(e)) => {
                bar.done();
                bail!(
                    "online re-encryption of the volume mounted at {}: {e}",
                    mountpoint.display()
                )
            }
            Some(Answer::Thawed(_) | Answer::RootGate(_) | Answer::Released) => {}
            None => {
                bar.done();
                bail!(
                    "the mount at {} stopped answering during the re-encryption (unmounted or \
                     killed?); `cmkfs volume reencrypt` resumes it",
                    mountpoint.display()
                )
            }
        }
    }
}

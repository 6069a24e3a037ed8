//! `cmkfs upgrade CIPHERDIR [--json] [--credential FILE]`, and the same conversion run by
//! `cmkfs mount` before it serves an old volume.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::home::Home;
use crate::vault::Vault;
use crate::volume::header::VolumeHeader;
use crate::volume::lock::VolumeLock;
use crate::volume::upgrade::{self, Hooks, Progress, Report};
use crate::volume::v1::TailDecision;

/// Files from which a progress bar is drawn (on a terminal).
const PROGRESS_BAR_FROM: u64 = 200;

/// `cmkfs upgrade`.
#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// Backing directory of the volume (unmounted).
    cipherdir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Reach the vault as this identity (as `cmkfs mount --credential`); by default the
    /// volume's Disk Encryption Set identity, else the vault owner, as a mount would.
    #[arg(long, value_name = "FILE")]
    credential: Option<PathBuf>,
}

pub fn run(a: UpgradeArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let header = VolumeHeader::read(&a.cipherdir)?;
    let root = std::fs::canonicalize(&a.cipherdir)
        .with_context(|| format!("{}", a.cipherdir.display()))?;
    if let Some((mountpoint, pid)) = crate::fsck::find_mount(&root, &home) {
        bail!(
            "{} is mounted at {} (daemon {pid}); unmount it before `cmkfs upgrade`",
            root.display(),
            mountpoint.display()
        );
    }
    let lock = VolumeLock::exclusive(&root)?;
    if header.format_version > crate::volume::header::FORMAT_V2 {
        // After the mount and lock checks, which refuse as for any volume: v3 is the newest
        // format and no in-place conversion leads to or from it.
        if a.json {
            let v = serde_json::json!({
                "cipherdir": a.cipherdir,
                "from_version": header.format_version,
                "to_version": header.format_version,
                "files": 0,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{} is already on-disk format v{}, the newest: nothing to upgrade",
                a.cipherdir.display(),
                header.format_version
            );
        }
        return Ok(());
    }
    // A damaged journal is refused before the vault is even opened.
    upgrade::pending_journal(&root, &header)?;
    let (vault, _) = super::volume::volume_vault(&home, &header, a.credential.as_deref())?;
    let report = convert(&root, &lock, vault.as_ref(), &header, !a.json)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

/// Runs the upgrade of the volume at `root` (locked exclusively by the caller), drawing a
/// progress bar on a terminal when `bar` is set and the volume has many files.
pub(crate) fn convert(
    root: &Path,
    lock: &VolumeLock,
    vault: &dyn Vault,
    header: &VolumeHeader,
    bar: bool,
) -> anyhow::Result<Report> {
    let (dek, keys) = upgrade::unlock(&Home::from_env(), root, vault, header)?;
    let mut drawn: Option<ProgressBar> = None;
    let mut progress = |p: &Progress| {
        if !bar || p.total < PROGRESS_BAR_FROM {
            return;
        }
        // indicatif draws to stderr only when it is a terminal.
        let b = drawn.get_or_insert_with(|| {
            let b = ProgressBar::new(p.total);
            if let Ok(style) = ProgressStyle::with_template("upgrading {bar:30} {pos}/{len} files")
            {
                b.set_style(style);
            }
            b
        });
        b.set_position(p.done);
    };
    let report = upgrade::run(
        root,
        lock,
        &dek,
        &keys,
        &mut Hooks {
            progress: Some(&mut progress),
            fault: None,
        },
    )
    .with_context(|| format!("upgrading {}", root.display()))?;
    if let Some(b) = drawn {
        b.finish_and_clear();
    }
    Ok(report)
}

/// One line saying what an upgrade did (for `cmkfs mount`'s stderr and log).
pub(crate) fn summary(r: &Report) -> String {
    let recovered = r
        .zero_tails
        .iter()
        .filter(|z| z.decision == TailDecision::Data)
        .count();
    format!(
        "{} is now on-disk format v{}: {} files, {} last units re-encrypted, {} headers \
         updated, {} already v2{}; {} tails that format v1 read as zeros recovered{}",
        r.cipherdir.display(),
        r.to_version,
        r.files,
        r.converted,
        r.header_only,
        r.already_v2,
        if r.resumed > 0 {
            format!(", {} restored from an interrupted run", r.resumed)
        } else {
            String::new()
        },
        recovered,
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} files left alone (not cmkfs files)", r.skipped.len())
        }
    )
}

fn print_human(r: &Report) {
    if r.from_version == r.to_version && r.converted == 0 && r.header_only == 0 && r.resumed == 0 {
        println!(
            "{} is already on-disk format v{} ({} files checked); `cmkfs upgrade` does not \
             convert v2 to v3 (page-aligned data units): for v3, copy the files into a new \
             volume (`cmkfs init`, mount both, copy)",
            r.cipherdir.display(),
            r.to_version,
            r.files
        );
    } else {
        println!("{}", summary(r));
    }
    for z in &r.zero_tails {
        let shown = z.plaintext.as_ref().unwrap_or(&z.backing);
        let what = match z.decision {
            TailDecision::Data => "recovered",
            TailDecision::Hole => "kept as zeros",
        };
        println!(
            "  {}: last {} bytes (offset {}) {what}: {}",
            shown.display(),
            z.len,
            z.offset,
            z.reason
        );
    }
    for s in &r.skipped {
        let shown = s.plaintext.as_ref().unwrap_or(&s.backing);
        println!("  left alone: {}: {}", shown.display(), s.why);
    }
}

//! Temp directories left by a killed `cmkfs restore` (`.<target>.cmkfs-restore.<random>`
//! beside the target, [`crate::backup::leftovers`]): fsck of the target, or of such a
//! directory itself, reports them and says how to clean up; `--repair` removes those no
//! restore is working in any more. Nothing of a killed restore is ever in the target: the
//! temp directory is renamed into place only once complete.

use super::*;
use crate::backup::leftovers::{self, Leftover};

/// Whether `dir` holds a volume (a header, or a directory id at its root).
fn is_volume(dir: &Path) -> bool {
    dir.join(HEADER_FILE).exists() || dir.join(DIRID_FILE).exists()
}

fn problem(target: &Path, l: &Leftover, backing: PathBuf, severity: Severity) -> Problem {
    let (detail, fix) = if l.running {
        (
            format!(
                "a `cmkfs restore` into {} is working in {} (it holds its lock)",
                target.display(),
                l.path.display()
            ),
            Fix::None,
        )
    } else {
        (
            format!(
                "{} is the temp directory of a `cmkfs restore` into {} that was killed; \
                 nothing of it reached {}: remove it (`cmkfs fsck --repair {}` or `rm -rf \
                 {}`), or run the restore again, which removes it first",
                l.path.display(),
                target.display(),
                target.display(),
                target.display(),
                l.path.display()
            ),
            Fix::Remove,
        )
    };
    Problem {
        kind: ProblemKind::RestoreLeftover,
        severity: if l.running {
            Severity::Warning
        } else {
            severity
        },
        backing,
        plaintext: None,
        plaintext_dir: None,
        detail,
        fix,
        repaired: false,
        moved_to: None,
        repair_error: None,
    }
}

fn relative(target: &Path, p: &Path) -> PathBuf {
    match p.file_name() {
        Some(_) if p == target => PathBuf::from("."),
        Some(n) => Path::new("..").join(n),
        None => p.to_path_buf(),
    }
}

fn repair(p: &mut Problem, l: &Leftover) {
    if p.fix != Fix::Remove {
        return;
    }
    match leftovers::remove(&l.path) {
        Ok(true) => p.repaired = true,
        Ok(false) => p.repair_error = Some("a restore started working in it".into()),
        Err(e) => p.repair_error = Some(e.to_string()),
    }
}

/// The problems of restore temp directories for a check of `dir`: `Some(report)` when `dir`
/// is not a volume because of an interrupted restore (it is such a temp directory, or the
/// absent or empty target of one), `None` when the check proceeds as usual.
pub(super) fn check_target(dir: &Path, repair_them: bool) -> Option<Report> {
    let abs = std::path::absolute(dir).ok()?;
    let name = abs.file_name()?.to_string_lossy().into_owned();
    let (target, found) = if let Some(t) = leftovers::target_name_of(&name) {
        let target = abs.with_file_name(t);
        let found: Vec<Leftover> = leftovers::find(&target)
            .ok()?
            .into_iter()
            .filter(|l| l.path == abs)
            .collect();
        (target, found)
    } else {
        if is_volume(&abs) {
            return None;
        }
        (abs.clone(), leftovers::find(&abs).ok()?)
    };
    if found.is_empty() {
        return None;
    }
    let mut problems = Vec::new();
    for l in &found {
        let mut p = problem(&target, l, relative(&abs, &l.path), Severity::Error);
        if repair_them {
            repair(&mut p, l);
        }
        problems.push(p);
    }
    let mut report = Report {
        schema: REPORT_SCHEMA,
        cipherdir: abs,
        volume_id: None,
        repair: repair_them,
        keys: KeyCheck::NotUsed,
        counts: Counts::default(),
        problems,
        quarantine: None,
        outcome: Outcome::Clean,
        exit_code: EXIT_CLEAN,
    };
    report.finish();
    Some(report)
}

/// Warnings about restore temp directories beside the volume `root` (left by a killed
/// restore into a directory of the same name before this volume got there).
pub(super) fn beside(root: &Path, repair_them: bool) -> Vec<Problem> {
    let Ok(found) = leftovers::find(root) else {
        return Vec::new();
    };
    found
        .iter()
        .map(|l| {
            let mut p = problem(root, l, relative(root, &l.path), Severity::Warning);
            if repair_them {
                repair(&mut p, l);
            }
            p
        })
        .collect()
}

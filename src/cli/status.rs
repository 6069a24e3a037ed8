//! `cmkfs status [MOUNTPOINT|CIPHERDIR] [--json]`.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::home::Home;
use crate::keyring::rfc3339;
use crate::mount::RunRecord;
use crate::vault;
use crate::volume::header::VolumeHeader;

/// `cmkfs status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A mountpoint or a cipher directory; all mounts when omitted.
    target: Option<PathBuf>,
    /// JSON output (one object; an array when listing all mounts).
    #[arg(long)]
    json: bool,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let home = Home::from_env();
    let docs: Vec<serde_json::Value> = match &a.target {
        None => RunRecord::all(&home)
            .iter()
            .map(|r| mounted_status(&home, r))
            .collect(),
        Some(t) => vec![target_status(&home, t)?],
    };
    if a.json {
        let out = if a.target.is_some() {
            docs[0].clone()
        } else {
            serde_json::Value::Array(docs)
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if docs.is_empty() {
        println!("no cmkfs mounts recorded in {}", home.run_dir().display());
    }
    for d in docs {
        print_human(&d);
    }
    Ok(())
}

fn target_status(home: &Home, target: &Path) -> anyhow::Result<serde_json::Value> {
    let abs =
        std::fs::canonicalize(target).map_err(|e| anyhow::anyhow!("{}: {e}", target.display()))?;
    if let Some(r) = RunRecord::load(home, &abs) {
        return Ok(mounted_status(home, &r));
    }
    if let Some(r) = RunRecord::all(home)
        .into_iter()
        .find(|r| r.cipherdir == abs && r.alive())
    {
        return Ok(mounted_status(home, &r));
    }
    // Not mounted: answer with a one-shot check of the key, which is what "accessible" means.
    let header = VolumeHeader::read(&abs)?;
    let kid = header.key_id()?;
    // The same connection a mount would use (DES identity included), and every key the
    // volume needs (the platform key of a double-encrypted volume too).
    let checked = super::volume::volume_vault(home, &header, None).and_then(|(v, _)| {
        crate::unlock::keys(home, &abs, v.as_ref(), &header).map_err(anyhow::Error::from)
    });
    let (state, reason) = match checked {
        Ok(_) => ("Accessible", None),
        Err(e) => {
            let denied = matches!(
                e.downcast_ref::<crate::volume::VolumeError>(),
                Some(crate::volume::VolumeError::Vault(v)) if v.class() == vault::ErrorClass::Denied
            ) || matches!(e.downcast_ref::<vault::VaultError>(), Some(v) if v.class() == vault::ErrorClass::Denied);
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            (if denied { "Inaccessible" } else { "Unknown" }, Some(msg))
        }
    };
    Ok(serde_json::json!({
        "schema": 1,
        "mounted": false,
        "cipherdir": abs,
        "volume_id": header.volume_id,
        "state": state,
        "reason": reason,
        "key_id": header.key_id,
        "key_version": kid.version,
        "last_check": rfc3339(std::time::SystemTime::now()),
        "des": header.des,
    }))
}

fn mounted_status(home: &Home, r: &RunRecord) -> serde_json::Value {
    let path = RunRecord::status_path(home, &r.mountpoint);
    let mut doc: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| {
            serde_json::json!({
                "schema": 1, "mountpoint": r.mountpoint, "cipherdir": r.cipherdir,
                "volume_id": r.volume_id, "pid": r.pid, "key_id": r.key_id, "state": "Unknown",
                "reason": "the mount has not published its status yet",
            })
        });
    let alive = r.alive();
    if let Some(o) = doc.as_object_mut() {
        o.insert("mounted".into(), serde_json::Value::Bool(alive));
        if !alive {
            o.insert("state".into(), "Unknown".into());
            o.insert(
                "reason".into(),
                format!("stale record: daemon {} is not running", r.pid).into(),
            );
        }
    }
    doc
}

fn print_human(d: &serde_json::Value) {
    let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
    let where_ = d
        .get("mountpoint")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| s("cipherdir"));
    println!("{where_}");
    println!(
        "  state          {}{}",
        s("state"),
        d.get("reason")
            .and_then(|v| v.as_str())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    for (label, key) in [
        ("since", "since"),
        ("cipherdir", "cipherdir"),
        ("key", "key_id"),
        ("last check", "last_check"),
        ("last success", "last_success"),
        ("next check", "next_check"),
        ("des", "des"),
    ] {
        if d.get(key).is_some_and(|v| !v.is_null()) {
            println!("  {label:<14} {}", s(key));
        }
    }
    if let Some(ids) = d.get("ids_not_durable").filter(|v| v.is_object()) {
        let f = |k: &str| ids.get(k).and_then(|v| v.as_str()).unwrap_or("-");
        // The latest try's error only where it is not the one requests fail with.
        let last = Some(f("last_error"))
            .filter(|l| *l != f("error"))
            .map(|l| format!(" (latest try: {l})"))
            .unwrap_or_default();
        println!(
            "  directory ids  {} not durable since {}: renames, links and fsyncs fail with \
             \"{}\" until the disk takes them{last}",
            ids.get("count").and_then(|v| v.as_u64()).unwrap_or(0),
            f("since"),
            f("error"),
        );
    }
    if let Some(n) = d.get("requests_denied").and_then(|v| v.as_u64()) {
        println!("  denied         {n} requests");
    }
    if let Some(m) = d.get("memory").filter(|m| m.is_object()) {
        let on = |k: &str| m.get(k).and_then(|v| v.as_bool()).unwrap_or(true);
        println!(
            "  memory         {} kB of keys locked in RAM, core dumps {}, {}",
            m.get("locked_bytes").and_then(|v| v.as_u64()).unwrap_or(0) / 1024,
            if on("core_dumps") { "ON" } else { "off" },
            if on("dumpable") {
                "DUMPABLE"
            } else {
                "not dumpable"
            }
        );
    }
    if let Some(p) = d.get("push").and_then(|v| v.as_bool()) {
        println!(
            "  push           {}",
            if p {
                "on"
            } else {
                "off (periodic checks only)"
            }
        );
    }
}

//! `cmkfs vault config` and `cmkfs vault audit`: the embedded vault's settings and audit log.

use super::*;

#[derive(Args, Debug)]
pub(super) struct ConfigArgs {
    /// Days a deleted key stays recoverable (7-90); applies to keys deleted from now on.
    #[arg(long, value_name = "N")]
    retention_days: Option<u32>,
    /// `on` turns purge protection on; it can never be turned off again.
    #[arg(long, value_enum, value_name = "on")]
    purge_protection: Option<OnOff>,
    /// Rotate the audit log (audit.log -> audit.log.1 ..) when a line would take it past
    /// this many bytes; 0 = never (default 64 MiB).
    #[arg(long, value_name = "BYTES")]
    audit_max_size: Option<u64>,
    /// Rotated audit logs kept (default 5); older ones are deleted.
    #[arg(long, value_name = "N")]
    audit_keep: Option<u32>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub(super) struct AuditArgs {
    /// Keep reading: print new events as they are written (stop with Ctrl-C).
    #[arg(long)]
    follow: bool,
    /// Print the events as JSON lines (as stored).
    #[arg(long)]
    json: bool,
    /// Only events about this key.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Only events by this identity (`owner` for the vault owner).
    #[arg(long, value_name = "NAME")]
    identity: Option<String>,
    /// Only failed operations.
    #[arg(long)]
    failures: bool,
    /// Only the last N matching events (before following).
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
}

impl ConfigArgs {
    /// Whether any setting is given (a change), rather than a request to show them.
    pub(super) fn changes_something(&self) -> bool {
        self.retention_days.is_some()
            || self.purge_protection.is_some()
            || self.audit_max_size.is_some()
            || self.audit_keep.is_some()
    }
}

pub(super) fn config(v: &LocalVault, c: ConfigArgs) -> anyhow::Result<()> {
    let props = if !c.changes_something() {
        v.config()?
    } else {
        v.configure(&ConfigUpdate {
            retention_days: c.retention_days,
            purge_protection: c.purge_protection.map(|p| matches!(p, OnOff::On)),
            audit_max_bytes: c.audit_max_size,
            audit_keep: c.audit_keep,
        })?
    };
    if c.json {
        return print_json(&props);
    }
    print_props(&props);
    let (max, keep) = v.audit_rotation()?;
    println!(
        "{:<18}{}",
        "audit log:",
        if max == 0 {
            "never rotated".to_string()
        } else {
            format!("rotated at {max} bytes, {keep} kept")
        }
    );
    if let Some(rec) = seal::read_record(v.store_dir())? {
        println!(
            "{:<18}yes ({}{})",
            "sealed:",
            rec.kdf(),
            if rec.complete {
                ""
            } else {
                "; an interrupted seal: run `cmkfs vault seal`"
            }
        );
    } else {
        println!("{:<18}no (run `cmkfs vault seal`)", "sealed:");
    }
    Ok(())
}

pub(super) fn audit(v: &LocalVault, a: AuditArgs) -> anyhow::Result<()> {
    let mut reader = v.audit_reader()?;
    let key_prefix = a
        .key
        .as_ref()
        .map(|k| format!("{}/keys/{k}", crate::vault::local::URL));
    let deleted_prefix = a
        .key
        .as_ref()
        .map(|k| format!("{}/deletedkeys/{k}", crate::vault::local::URL));
    let keep = |ev: &AuditEvent| {
        let id_matches = |prefix: &Option<String>| {
            prefix.as_ref().is_some_and(|p| {
                ev.properties.id == *p || ev.properties.id.starts_with(&format!("{p}/"))
            })
        };
        (a.key.is_none() || id_matches(&key_prefix) || id_matches(&deleted_prefix))
            && a.identity.as_ref().is_none_or(|i| &ev.identity == i)
            && (!a.failures || !ev.succeeded())
    };
    let mut first: Vec<AuditEvent> = reader.read_new()?.into_iter().filter(|e| keep(e)).collect();
    if let Some(n) = a.tail {
        let skip = first.len().saturating_sub(n);
        first.drain(..skip);
    }
    let out = std::io::stdout();
    let print = |events: &[AuditEvent]| -> anyhow::Result<()> {
        let mut out = out.lock();
        for ev in events {
            if a.json {
                writeln!(out, "{}", serde_json::to_string(ev)?)?;
            } else {
                write!(
                    out,
                    "{}  {:<16} {:<12} {} {}  {}  {}ms",
                    ev.time,
                    ev.operation_name,
                    ev.identity,
                    ev.result_type,
                    ev.properties.http_status_code,
                    ev.properties.id,
                    ev.duration_ms
                )?;
                if !ev.result_description.is_empty() {
                    write!(out, "  {}", ev.result_description)?;
                }
                writeln!(out)?;
            }
        }
        out.flush()?;
        Ok(())
    };
    print(&first)?;
    if !a.follow {
        return Ok(());
    }
    // Polling is enough for a human-paced tail, and works on every filesystem.
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let new: Vec<AuditEvent> = reader.read_new()?.into_iter().filter(|e| keep(e)).collect();
        print(&new)?;
    }
}

fn print_props(p: &VaultProperties) {
    println!("{:<18}{}", "vault:", p.url);
    println!(
        "{:<18}{}",
        "soft delete:",
        if p.soft_delete { "on" } else { "off" }
    );
    println!("{:<18}{} days", "retention:", p.retention_days);
    println!(
        "{:<18}{}",
        "purge protection:",
        if p.purge_protection {
            "on (cannot be turned off)"
        } else {
            "off"
        }
    );
}

//! Output and parsing shared by the `cmkfs vault` commands: tables, JSON, times, progress.

use super::*;

/// Runs `f` (RSA key generation: up to a second or more for 4096 bits) with a spinner on
/// stderr when it is a terminal; the spinner line is erased afterwards.
pub(super) fn with_progress<T>(what: &str, f: impl FnOnce() -> T) -> T {
    use std::io::IsTerminal as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let what = what.to_string();
    let spinner = std::thread::spawn(move || {
        for c in ['|', '/', '-', '\\'].iter().cycle() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            eprint!("\r{what} {c}");
            std::thread::sleep(Duration::from_millis(100));
        }
        eprint!("\r\x1b[K");
    });
    let out = f();
    done.store(true, Ordering::Relaxed);
    let _ = spinner.join();
    out
}

/// Parses a time argument into Unix seconds (`None` for `none`).
pub(super) fn parse_time(t: &str) -> anyhow::Result<Option<u64>> {
    let t = t.trim();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let bad = || {
        anyhow::anyhow!(
            "invalid time {t:?}: use RFC 3339 (2030-01-31T12:00:00Z), now, +DURATION, -DURATION (e.g. +30d), @UNIXSECS or none"
        )
    };
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if t.eq_ignore_ascii_case("now") {
        return Ok(Some(now));
    }
    if let Some(d) = t.strip_prefix('+') {
        let d = humantime::parse_duration(d).map_err(|_| bad())?;
        return Ok(Some(now.saturating_add(d.as_secs())));
    }
    if let Some(d) = t.strip_prefix('-') {
        let d = humantime::parse_duration(d).map_err(|_| bad())?;
        return Ok(Some(now.saturating_sub(d.as_secs())));
    }
    if let Some(s) = t.strip_prefix('@') {
        return s.parse::<u64>().map(Some).map_err(|_| bad());
    }
    let st = humantime::parse_rfc3339_weak(t).map_err(|_| bad())?;
    Ok(Some(
        st.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_secs(),
    ))
}

pub(super) fn time(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

pub(super) fn opt_time(t: Option<u64>) -> String {
    t.map_or_else(|| "-".to_string(), time)
}

pub(super) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(super) fn print_json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(super) fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

//! The vault's audit log: one JSON line per operation, shaped like Azure Key Vault's
//! `AuditEvent` diagnostic log, in `<store>/audit.log`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::vault::VaultError;

/// One audit record. Field names follow Key Vault's `AuditEvent` (camelCase JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Always `AuditEvent`.
    pub category: String,
    /// The vault URL (`local:`).
    pub resource_id: String,
    /// `KeyCreate`, `KeyGet`, `KeyList`, `KeyWrap`, `KeyUnwrap`, `KeyUpdate`, `KeyRotate`,
    /// `KeyDelete`, `KeyRecover`, `KeyPurge`, `VaultPatch`, `IdentityCreate`, ...
    pub operation_name: String,
    /// `Success` or `Failure`.
    pub result_type: String,
    /// HTTP reason phrase: `OK`, `Forbidden`, `NotFound`, `Conflict`, `BadRequest`, ...
    pub result_signature: String,
    /// Empty on success; the error message on failure (never key material).
    pub result_description: String,
    /// Wall time of the operation.
    pub duration_ms: u64,
    /// Who asked: an identity name, or `owner` for the vault owner.
    pub identity: String,
    /// The remote client's IP address (requests through `cmkfs vault serve`); absent for
    /// local callers. Key Vault's `callerIpAddress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_ip_address: Option<String>,
    /// Request details.
    pub properties: AuditProperties,
}

/// The `properties` object of an [`AuditEvent`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuditProperties {
    /// What the operation addressed: a full versioned key id when known, else
    /// `<vault>/keys/<name>`, `<vault>/identities/<name>`, or the vault URL.
    pub id: String,
    /// 200, 400, 403, 404, 409, 500 or 503.
    pub http_status_code: u16,
    /// `cmkfs/<version>` and the process id.
    pub client_info: String,
}

impl AuditEvent {
    /// Builds the record of one finished operation.
    pub(crate) fn new(
        operation: &str,
        identity: &str,
        id: &str,
        started: SystemTime,
        elapsed: Duration,
        error: Option<&VaultError>,
    ) -> AuditEvent {
        let status = error.map_or(200, VaultError::http_status);
        AuditEvent {
            time: humantime::format_rfc3339_millis(started).to_string(),
            category: "AuditEvent".into(),
            resource_id: super::URL.into(),
            operation_name: operation.into(),
            result_type: if error.is_none() {
                "Success"
            } else {
                "Failure"
            }
            .into(),
            result_signature: reason_phrase(status).into(),
            result_description: error.map(|e| e.to_string()).unwrap_or_default(),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            identity: identity.into(),
            caller_ip_address: None,
            properties: AuditProperties {
                id: id.into(),
                http_status_code: status,
                client_info: format!(
                    "cmkfs/{} pid={}",
                    env!("CARGO_PKG_VERSION"),
                    std::process::id()
                ),
            },
        }
    }

    /// Whether the operation succeeded.
    pub fn succeeded(&self) -> bool {
        self.result_type == "Success"
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "BadRequest",
        401 => "Unauthorized",
        429 => "TooManyRequests",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        503 => "ServiceUnavailable",
        _ => "InternalServerError",
    }
}

/// Reads the audit log incrementally (for `cmkfs vault audit [--follow]`), across rotations:
/// the first read starts with the rotated files (oldest first), and a rotation between two
/// reads is noticed by the live file's inode changing, so the rest of the old file is read
/// before the new one (as `tail -F` does).
pub struct AuditReader {
    path: PathBuf,
    /// Rotated files still to read before the live one (oldest first).
    backlog: Vec<PathBuf>,
    /// The live file as opened, with its inode.
    current: Option<(File, u64)>,
    offset: u64,
    partial: Vec<u8>,
}

impl AuditReader {
    /// A reader at the start of the log at `path` and its rotated files `path.1` ..
    /// (a missing log reads as empty).
    pub fn new(path: &Path) -> AuditReader {
        let mut backlog = Vec::new();
        for i in 1.. {
            let p = rotated_path(path, i);
            if !p.exists() {
                break;
            }
            backlog.push(p);
        }
        backlog.reverse();
        AuditReader {
            path: path.to_path_buf(),
            backlog,
            current: None,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Events appended since the last call. Only whole lines are returned; a line being
    /// written is kept until its newline arrives. A line that is not an event is reported as
    /// a store error naming its position.
    pub fn read_new(&mut self) -> Result<Vec<AuditEvent>, VaultError> {
        let io = |p: &Path, e: io::Error| {
            VaultError::Unavailable(format!("cannot read audit log {}: {e}", p.display()))
        };
        let mut out = Vec::new();
        for p in std::mem::take(&mut self.backlog) {
            let bytes = match std::fs::read(&p) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&p, e)),
            };
            self.partial.clear();
            self.take_lines(&bytes, &p, &mut out)?;
        }
        loop {
            if self.current.is_none() {
                match File::open(&self.path) {
                    Ok(f) => {
                        let ino = f.metadata().map_err(|e| io(&self.path, e))?.ino();
                        self.current = Some((f, ino));
                        self.offset = 0;
                        self.partial.clear();
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(io(&self.path, e)),
                }
            }
            let Some((f, ino)) = self.current.as_mut() else {
                return Ok(out);
            };
            let ino = *ino;
            let len = f.metadata().map_err(|e| io(&self.path, e))?.len();
            if len < self.offset {
                // Truncated in place: start again.
                self.offset = 0;
                self.partial.clear();
            }
            f.seek(SeekFrom::Start(self.offset))
                .map_err(|e| io(&self.path, e))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(|e| io(&self.path, e))?;
            self.offset += buf.len() as u64;
            let path = self.path.clone();
            self.take_lines(&buf, &path, &mut out)?;
            // Rotated since we opened it? Then what we just read was its end: go on with the
            // new live file.
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != ino => {
                    self.current = None;
                    continue;
                }
                _ => return Ok(out),
            }
        }
    }

    fn take_lines(
        &mut self,
        buf: &[u8],
        path: &Path,
        out: &mut Vec<AuditEvent>,
    ) -> Result<(), VaultError> {
        self.partial.extend_from_slice(buf);
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=last_nl).collect();
        for line in complete
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        {
            let ev = serde_json::from_slice(line).map_err(|e| {
                VaultError::Store(format!(
                    "audit log {} has a damaged line: {e}",
                    path.display()
                ))
            })?;
            out.push(ev);
        }
        Ok(())
    }
}

/// `audit.log.N`.
pub(crate) fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

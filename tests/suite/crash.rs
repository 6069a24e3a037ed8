//! Crash safety (issue 6 item 5) and `cmkfs fsck` (item 6) through real mounts.
//!
//! The crash tests run writers against a mount — overwrites, appends, truncates with fsync at
//! known points, editor-style replace-by-rename, mkdir/rmdir churn with long names — then
//! SIGKILL the daemon at a seeded random moment, clean up the dead mount (abort the FUSE
//! connection, lazy unmount), remount, and check:
//!
//! - every file and directory opens and reads without an error (no unreadable header);
//! - every byte acknowledged by fsync is there: each file's length is one it had since its
//!   last fsync, and each of its sectors equals that sector in one of those states (so no torn
//!   or garbage sector; format v2 has no exception, a shrinking truncate included:
//!   docs/FORMAT.md "Crash behaviour");
//! - a file replaced by rename holds one complete version, never a mix;
//! - `cmkfs fsck` finds nothing but what it can repair without the data (temp files, orphaned
//!   side files, interrupted mkdirs), `--repair` fixes that, and a second run is clean.
//!
//! The rewrap test kills `cmkfs des update` (and sometimes the mount) in the middle of key
//! changes and checks that the header is always the old or the new one and the data is intact.
//!
//! Seeds are printed; replay with `CMKFS_TEST_SEED=<seed>`. `CMKFS_CRASH_ROUNDS` sets the
//! number of kill rounds (default 5).

use crate::common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use cmkfs::volume::header::VolumeHeader;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// The model of one file under a single writer
// ---------------------------------------------------------------------------------------------

/// A content-changing operation, recorded before it is issued.
#[derive(Clone, Debug)]
enum Op {
    Write { off: usize, data: Vec<u8> },
    Truncate(usize),
}

fn apply(state: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { off, data } => model_write(state, *off, data),
        Op::Truncate(n) => state.resize(*n, 0),
    }
}

/// What a writer has done to one file: the contents at its last successful fsync, and every
/// operation issued since (the last one possibly cut off by the kill).
#[derive(Clone, Debug, Default)]
struct Tracked {
    synced: Vec<u8>,
    pending: Vec<Op>,
}

impl Tracked {
    /// The states the file may be in after a crash: synced, then after each pending op.
    fn states(&self) -> Vec<Vec<u8>> {
        let mut out = vec![self.synced.clone()];
        let mut cur = self.synced.clone();
        for op in &self.pending {
            apply(&mut cur, op);
            out.push(cur.clone());
        }
        out
    }

    fn current(&self) -> Vec<u8> {
        self.states().pop().unwrap_or_default()
    }
}

/// Checks a file read back after a crash against the states it may be in; says what is
/// wrong.
fn check_against(actual: &[u8], t: &Tracked) -> Result<(), String> {
    let states = t.states();
    let last = t.pending.last();
    let prev_len = states[states.len().saturating_sub(2)].len();
    // The operation the kill interrupted may leave any length between the one before it and
    // the one after it: a write cut short, or an extension done in steps (the old last sector
    // is rewritten at its new length first, docs/FORMAT.md). Its contents are checked below.
    let len_ok = states.iter().any(|s| s.len() == actual.len())
        || last.is_some()
            && actual.len() > prev_len.min(states[states.len() - 1].len())
            && actual.len() < prev_len.max(states[states.len() - 1].len());
    if !len_ok {
        return Err(format!(
            "length {} is none of the lengths since the last fsync {:?}",
            actual.len(),
            states.iter().map(Vec::len).collect::<Vec<_>>()
        ));
    }
    for (x, a) in actual.chunks(SECTOR).enumerate() {
        let start = x * SECTOR;
        let matches = states
            .iter()
            .any(|s| s.len() >= start + a.len() && &s[start..start + a.len()] == a);
        if matches {
            continue;
        }
        return Err(format!(
            "sector {x} (bytes {start}..{}) matches none of the {} states since the last fsync \
             (last op: {})",
            start + a.len(),
            states.len(),
            match last {
                Some(Op::Write { off, data }) => format!("write {off}+{}", data.len()),
                Some(Op::Truncate(n)) => format!("truncate to {n}"),
                None => "none".into(),
            }
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Fixed size, unaligned overwrites.
    Overwrite,
    /// Appends of unaligned chunks.
    Append,
    /// Shrinks, grows and refills.
    Truncate,
}

struct FileSpec {
    name: String,
    kind: Kind,
    state: Arc<Mutex<Tracked>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one writer until its file errors (the daemon was killed) or `stop` is set.
fn file_writer(
    path: PathBuf,
    kind: Kind,
    state: Arc<Mutex<Tracked>>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> JoinHandle<usize> {
    thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else {
            return 0;
        };
        let mut ops = 0;
        while !stop.load(Ordering::Relaxed) {
            let cur = lock(&state).current();
            let op = match kind {
                Kind::Overwrite => {
                    let off = rng.gen_range(0..cur.len());
                    let len = rng.gen_range(1..=(cur.len() - off).min(3 * SECTOR));
                    Op::Write {
                        off,
                        data: random_bytes(&mut rng, len),
                    }
                }
                Kind::Append => {
                    if cur.len() > 2 << 20 {
                        Op::Truncate(rng.gen_range(0..SECTOR * 3))
                    } else {
                        let len = rng.gen_range(1..=2 * SECTOR + 100);
                        Op::Write {
                            off: cur.len(),
                            data: random_bytes(&mut rng, len),
                        }
                    }
                }
                Kind::Truncate => match rng.gen_range(0..4) {
                    0 => Op::Truncate(rng.gen_range(0..cur.len().max(1))),
                    1 => Op::Truncate(cur.len() + rng.gen_range(1..3 * SECTOR)),
                    2 if !cur.is_empty() => Op::Write {
                        off: 0,
                        data: random_bytes(&mut rng, cur.len()),
                    },
                    _ => Op::Truncate(rng.gen_range(0..6 * SECTOR)),
                },
            };
            lock(&state).pending.push(op.clone());
            let r = match &op {
                Op::Write { off, data } => f.write_all_at(data, *off as u64),
                Op::Truncate(n) => f.set_len(*n as u64),
            };
            if r.is_err() {
                break;
            }
            ops += 1;
            // Truncaters sync after every op (so a kill lands inside a size change); the others
            // every few ops.
            let sync_now = kind == Kind::Truncate || rng.gen_range(0..4) == 0;
            if sync_now {
                if f.sync_all().is_err() {
                    break;
                }
                let mut st = lock(&state);
                let done = st.current();
                st.synced = done;
                st.pending.clear();
            }
        }
        ops
    })
}

/// Editor-style replacement: write a temp file, fsync, rename over the document. Versions are
/// numbered; the document must always be one complete version.
#[derive(Debug, Default)]
struct DocState {
    /// Contents of every version written so far.
    versions: Vec<Vec<u8>>,
    /// Highest version whose rename returned.
    acked: Option<usize>,
}

fn doc_writer(
    dir: PathBuf,
    name: String,
    state: Arc<Mutex<DocState>>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> JoinHandle<usize> {
    thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let len = rng.gen_range(0..5 * SECTOR);
            let data = random_bytes(&mut rng, len);
            let v = {
                let mut st = lock(&state);
                st.versions.push(data.clone());
                st.versions.len() - 1
            };
            // Alternate short and long temp names (long ones have side files).
            let tmp = if v % 2 == 0 {
                dir.join(format!("{name}.tmp{v}"))
            } else {
                dir.join(format!("{}{v}", "t".repeat(190)))
            };
            let ok = (|| -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &data)?;
                f.sync_all()?;
                drop(f);
                fs::rename(&tmp, dir.join(&name))?;
                File::open(&dir)?.sync_all()
            })();
            if ok.is_err() {
                break;
            }
            lock(&state).acked = Some(v);
            n += 1;
        }
        n
    })
}

/// mkdir / rmdir churn with short and long names, each directory holding one synced file.
fn dir_writer(dir: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let i = rng.gen_range(0..12);
            let d = if i % 3 == 0 {
                dir.join(format!("{}{i}", "D".repeat(200)))
            } else {
                dir.join(format!("dir{i}"))
            };
            let r = if d.exists() {
                fs::remove_file(d.join("inner")).ok();
                fs::remove_dir(&d)
            } else {
                fs::create_dir(&d).and_then(|()| {
                    let mut f = File::create(d.join("inner"))?;
                    std::io::Write::write_all(&mut f, format!("inner of {i}").as_bytes())?;
                    f.sync_all()
                })
            };
            if let Err(e) = r {
                if e.raw_os_error() == Some(libc::ENOTCONN)
                    || e.raw_os_error() == Some(libc::ENOENT) && !dir.exists()
                {
                    break;
                }
            }
            n += 1;
        }
        n
    })
}

/// Joins writer threads, failing the test if one does not stop (a syscall stuck on the dead
/// connection would be a hang).
fn join_all(handles: Vec<JoinHandle<usize>>) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    for h in handles {
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "a writer is still blocked 60 s after the daemon was killed"
            );
            thread::sleep(Duration::from_millis(10));
        }
        out.push(h.join().expect("writer thread panicked"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Checks after a crash
// ---------------------------------------------------------------------------------------------

/// Opens, lists and reads everything below `dir` through the mount; any error is a finding.
fn read_everything(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(format!("list {}: {e}", d.display()));
                continue;
            }
        };
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    errors.push(format!("readdir {}: {e}", d.display()));
                    continue;
                }
            };
            let p = e.path();
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() => {
                    if let Err(e) = fs::read(&p) {
                        errors.push(format!("read {}: {e}", p.display()));
                    }
                }
                Ok(m) if m.file_type().is_symlink() => {
                    if let Err(e) = fs::read_link(&p) {
                        errors.push(format!("readlink {}: {e}", p.display()));
                    }
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("stat {}: {e}", p.display())),
            }
        }
    }
    errors
}

/// `cmkfs fsck --json CIPHER [extra]`, parsed; returns (exit code, report).
fn fsck(env: &Env, cipher: &Path, extra: &[&str]) -> (i32, serde_json::Value, Output) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("fsck"), cipher.as_os_str(), OsStr::new("--json")];
    args.extend(extra.iter().map(OsStr::new));
    let out = env.cmkfs(&args);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("fsck killed by a signal:\n{out}"));
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("fsck --json printed invalid JSON ({e}):\n{out}"));
    (code, v, out)
}

/// The (kind, fix) of every error-severity problem in a report.
fn problems(v: &serde_json::Value) -> Vec<(String, String, String)> {
    v["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["severity"] == "error")
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or("?").to_string(),
                p["fix"].as_str().unwrap_or("?").to_string(),
                p["backing"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// After a crash: fsck may only find what it repairs without the data; repair it and check
/// that a second run is clean. Returns the problems found.
fn fsck_after_crash(env: &Env, round: usize) -> Vec<(String, String, String)> {
    let (code, v, out) = fsck(env, &env.cipher, &[]);
    let found = problems(&v);
    match code {
        0 => assert!(
            found.is_empty(),
            "round {round}: exit 0 with problems:\n{out}"
        ),
        2 => {
            for (kind, fix, path) in &found {
                assert!(
                    matches!(fix.as_str(), "remove" | "restore" | "recreate"),
                    "round {round}: after a crash fsck found {kind} at {path}, which needs \
                     `{fix}` (data would be set aside or lost):\n{}",
                    out.stdout
                );
            }
            let (code, v, out) = fsck(env, &env.cipher, &["--repair"]);
            assert_eq!(code, 1, "round {round}: fsck --repair:\n{out}");
            assert!(
                v["quarantine"].is_null(),
                "round {round}: nothing may be quarantined:\n{out}"
            );
            let (code, _, out) = fsck(env, &env.cipher, &[]);
            assert_eq!(code, 0, "round {round}: fsck after --repair:\n{out}");
        }
        _ => panic!("round {round}: fsck exit {code}:\n{out}"),
    }
    found
}

fn rounds() -> usize {
    std::env::var("CMKFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn sigkill_during_writes_renames_and_mkdirs_loses_no_synced_byte() {
    let seed = seed("sigkill_during_writes");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new();
    env.init(&env.cipher);

    let specs: Vec<FileSpec> = [
        ("over", Kind::Overwrite),
        ("append", Kind::Append),
        ("trunc", Kind::Truncate),
        (&*format!("{}-over", "o".repeat(190)), Kind::Overwrite),
        (&*format!("{}-append", "a".repeat(200)), Kind::Append),
        (&*format!("{}-trunc", "t".repeat(170)), Kind::Truncate),
    ]
    .into_iter()
    .map(|(name, kind)| FileSpec {
        name: name.to_string(),
        kind,
        state: Arc::new(Mutex::new(Tracked::default())),
    })
    .collect();
    let doc = Arc::new(Mutex::new(DocState::default()));

    // Initial contents, synced, before any kill.
    {
        let m = env.mount_foreground(&env.cipher, &env.mnt);
        fs::create_dir(m.path("w")).unwrap();
        fs::create_dir(m.path("w/dirs")).unwrap();
        for s in &specs {
            let init = match s.kind {
                Kind::Overwrite => random_bytes(&mut rng, 16 * SECTOR + 77),
                Kind::Append => random_bytes(&mut rng, 1000),
                Kind::Truncate => random_bytes(&mut rng, 5 * SECTOR + 5),
            };
            let f = File::create(m.path("w").join(&s.name)).unwrap();
            f.write_all_at(&init, 0).unwrap();
            f.sync_all().unwrap();
            lock(&s.state).synced = init;
        }
        m.unmount();
    }

    let mut repaired_kinds: Vec<String> = Vec::new();
    for round in 0..rounds() {
        let m = env.mount_foreground(&env.cipher, &env.mnt);
        let w = m.path("w");
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for s in &specs {
            handles.push(file_writer(
                w.join(&s.name),
                s.kind,
                s.state.clone(),
                rng.gen(),
                stop.clone(),
            ));
        }
        handles.push(doc_writer(
            w.clone(),
            "doc".into(),
            doc.clone(),
            rng.gen(),
            stop.clone(),
        ));
        handles.push(dir_writer(w.join("dirs"), rng.gen(), stop.clone()));
        let delay = Duration::from_millis(rng.gen_range(50..1500));
        thread::sleep(delay);
        // Kill first, then tell the writers: their in-flight calls must die with the daemon.
        m.crash();
        stop.store(true, Ordering::Relaxed);
        let ops = join_all(handles);
        eprintln!("round {round}: killed after {delay:?}; ops per writer {ops:?}");

        let m = env.mount_foreground(&env.cipher, &env.mnt);
        let errors = read_everything(&m.mnt);
        assert!(
            errors.is_empty(),
            "round {round} (seed {seed}): unreadable after the crash:\n{errors:#?}"
        );
        for s in &specs {
            let p = w_path(&m, &s.name);
            let actual =
                fs::read(&p).unwrap_or_else(|e| panic!("round {round}: read {}: {e}", s.name));
            let mut st = lock(&s.state);
            match check_against(&actual, &st) {
                Ok(()) => {}
                Err(why) => panic!(
                    "round {round} (seed {seed}): {} ({:?}): {why}",
                    short(&s.name),
                    s.kind
                ),
            }
            // What is on disk now is the new starting point, made durable.
            st.synced = actual;
            st.pending.clear();
            File::open(&p).and_then(|f| f.sync_all()).unwrap();
        }
        {
            let st = lock(&doc);
            match fs::read(m.path("w/doc")) {
                Ok(got) => {
                    let first = st.acked.unwrap_or(0);
                    let v = (first..st.versions.len()).find(|&v| st.versions[v] == got);
                    assert!(
                        v.is_some(),
                        "round {round} (seed {seed}): the document is none of versions {first}..{} \
                         ({} bytes)",
                        st.versions.len(),
                        got.len()
                    );
                }
                Err(e) => assert!(
                    st.acked.is_none(),
                    "round {round}: the document is gone after rename {:?} returned: {e}",
                    st.acked
                ),
            }
        }
        // Every directory of the churner that exists is listable, its file complete or absent.
        for e in fs::read_dir(m.path("w/dirs")).unwrap() {
            let d = e.unwrap().path();
            if let Ok(got) = fs::read(d.join("inner")) {
                let name = d.file_name().unwrap().to_string_lossy().into_owned();
                let i: String = name.chars().filter(|c| c.is_ascii_digit()).collect();
                let want = format!("inner of {i}").into_bytes();
                assert!(
                    got.is_empty() || want.starts_with(&got),
                    "round {round}: {}/inner holds {got:?}",
                    short(&name)
                );
            }
        }
        m.unmount();
        for (kind, _, _) in fsck_after_crash(&env, round) {
            repaired_kinds.push(kind);
        }
    }
    eprintln!(
        "seed {seed}: {} rounds; fsck repaired {:?}",
        rounds(),
        repaired_kinds
    );
}

fn w_path(m: &Mount, name: &str) -> PathBuf {
    m.path("w").join(name)
}

fn short(s: &str) -> String {
    if s.len() > 20 {
        format!("{}…{}", &s[..8], &s[s.len() - 8..])
    } else {
        s.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Rewraps
// ---------------------------------------------------------------------------------------------

/// After a killed rewrap: the header is the old or the new one; fsck finds at most a temp
/// file to remove. Returns "old" or "new".
fn check_rewrapped_header(env: &Env, round: usize, before: &str, new: &str) -> &'static str {
    let h = VolumeHeader::read(&env.cipher)
        .unwrap_or_else(|e| panic!("round {round}: header unreadable after the kill: {e}"));
    assert!(
        h.key_id == before || h.key_id == new,
        "round {round}: header names {}, neither {before} nor {new}",
        h.key_id
    );
    if h.key_id == new {
        "new"
    } else {
        "old"
    }
}

/// fsck of an unmounted volume after a killed rewrap: only temp files may be left.
fn fsck_after_rewrap(env: &Env, round: usize) {
    let (code, v, out) = fsck(env, &env.cipher, &[]);
    if code != 0 {
        for (kind, fix, path) in problems(&v) {
            assert_eq!(fix, "remove", "round {round}: {kind} at {path}:\n{out}");
        }
        let (code, _, out) = fsck(env, &env.cipher, &["--repair"]);
        assert_eq!(code, 1, "round {round}: fsck --repair:\n{out}");
    }
}

#[test]
fn sigkill_during_rewraps_leaves_the_old_or_the_new_header() {
    let seed = seed("sigkill_during_rewraps");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new();
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
    json(&env.cmkfs(&[
        "vault",
        "key",
        "create",
        "k",
        "--key-size",
        KEY_SIZE,
        "--json",
    ]));
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    env.cmkfs(&[
        OsStr::new("init"),
        env.cipher.as_os_str(),
        OsStr::new("--des"),
        OsStr::new("d"),
    ])
    .assert_ok();
    let data = random_bytes(&mut rng, 7 * SECTOR + 9);
    let rotate = |env: &Env| -> String {
        json(&env.cmkfs(&["vault", "key", "rotate", "k", "--json"]))["kid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let version = |kid: &str| kid.rsplit('/').next().unwrap().to_string();
    let mut m = Some(env.mount_foreground(&env.cipher, &env.mnt));
    {
        let f = File::create(m.as_ref().unwrap().path("f")).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
    }
    // How long one `des update` takes here, so the kills land before, during and after.
    let new = rotate(&env);
    let t0 = Instant::now();
    env.cmkfs(&["des", "update", "d", "--version", &version(&new)])
        .assert_ok();
    let full = t0.elapsed().as_millis().max(10) as u64;

    // Phase 1: `cmkfs des update` killed (and sometimes the mount with it).
    let mut outcomes = Vec::new();
    for round in 0..rounds().max(6) {
        let before = VolumeHeader::read(&env.cipher).expect("header").key_id;
        let new = rotate(&env);
        let mut cmd = env.command(&["des", "update", "d", "--version", &version(&new)]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("spawn des update");
        thread::sleep(Duration::from_millis(rng.gen_range(0..=full * 11 / 10)));
        let kill_mount = rng.gen_bool(0.4);
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().expect("wait des update");
        if kill_mount {
            m.take().unwrap().crash();
        }
        let which = check_rewrapped_header(&env, round, &before, &new);
        outcomes.push(format!(
            "{which}{}{}",
            if status.success() { " (finished)" } else { "" },
            if kill_mount { " +mount killed" } else { "" }
        ));
        // Re-issuing the interrupted change finishes it and moves the volume to the new key.
        // (A plain `des update d` only finishes what was recorded: a kill that lands before
        // the record is written leaves nothing to finish, and the set on its old key.)
        env.cmkfs(&["des", "update", "d", "--version", &version(&new)])
            .assert_ok();
        let show = json(&env.cmkfs(&["des", "show", "d", "--json"]));
        assert_eq!(show["activeKey"]["keyUrl"], new.as_str(), "{show:#}");
        assert_eq!(VolumeHeader::read(&env.cipher).unwrap().key_id, new);
        if m.is_none() {
            fsck_after_rewrap(&env, round);
            m = Some(env.mount_foreground(&env.cipher, &env.mnt));
        }
        let got = read(&m.as_ref().unwrap().path("f"));
        assert_bytes_eq(
            &format!("round {round}: data after the rewrap"),
            &got,
            &data,
        );
    }
    m.take().unwrap().unmount();

    // Phase 2: the mount rotates by itself (auto-rotation within a key check) and is killed
    // at a random moment after a new key version appears.
    env.cmkfs(&["des", "update", "d", "--auto-rotate"])
        .assert_ok();
    for round in 0..rounds().max(4) {
        let m =
            env.mount_foreground_with(&env.cipher, &env.mnt, &["--key-check-interval", "100ms"]);
        let before = VolumeHeader::read(&env.cipher).expect("header").key_id;
        let new = rotate(&env);
        thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        m.crash();
        let which = check_rewrapped_header(&env, round, &before, &new);
        outcomes.push(format!("auto: {which}"));
        fsck_after_rewrap(&env, round);
        let m = env.mount_foreground(&env.cipher, &env.mnt);
        assert_bytes_eq(
            &format!("auto round {round}: data"),
            &read(&m.path("f")),
            &data,
        );
        m.unmount();
        // Whatever the kill interrupted, `des update` to the new version completes it (the
        // kill may land before the rotation was recorded: then there is nothing to finish).
        env.cmkfs(&["des", "update", "d", "--version", &version(&new)])
            .assert_ok();
        assert_eq!(VolumeHeader::read(&env.cipher).unwrap().key_id, new);
    }
    let (code, _, out) = fsck(&env, &env.cipher, &["--repair"]);
    assert!(code == 0 || code == 1, "final fsck --repair:\n{out}");
    assert_eq!(fsck(&env, &env.cipher, &[]).0, 0, "final fsck");
    eprintln!("seed {seed}: one des update takes ~{full} ms; rewrap outcomes {outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// fsck on a damaged volume
// ---------------------------------------------------------------------------------------------

/// Makes plaintext `rel` with `make` and returns its backing path: the one new backing entry
/// (side files and directory ids aside).
fn backing_of(env: &Env, m: &Mount, rel: &str, make: impl FnOnce(&Path)) -> PathBuf {
    let before: std::collections::BTreeSet<PathBuf> = walk(&env.cipher).into_iter().collect();
    make(&m.path(rel));
    let after: Vec<PathBuf> = walk(&env.cipher)
        .into_iter()
        .filter(|p| !before.contains(p))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().ends_with(".name"))
        .filter(|p| p.file_name().unwrap() != ".cmkfs.dirid")
        .collect();
    assert_eq!(after.len(), 1, "one new backing entry for {rel}: {after:?}");
    after[0].clone()
}

fn find<'a>(
    v: &'a serde_json::Value,
    kind: &str,
    backing: &Path,
    cipher: &Path,
) -> &'a serde_json::Value {
    let rel = backing
        .strip_prefix(cipher)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == kind && p["backing"] == rel.as_str())
        .unwrap_or_else(|| panic!("no {kind} problem at {rel} in:\n{v:#}"))
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and value buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn list_xattrs(p: &Path) -> Vec<String> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn fsck_finds_reports_and_repairs_damage() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let secret = format!("plainname{}", unique_hex());
    fs::create_dir(m.path("docs")).unwrap();
    let empty_dir = backing_of(&env, &m, "empty", |p| fs::create_dir(p).unwrap());
    let full_dir = backing_of(&env, &m, "full", |p| fs::create_dir(p).unwrap());
    write(&m.path("full/inner"), b"inner");
    let keep = backing_of(&env, &m, "keep", |p| write(p, b"keep me"));
    set_xattr(&m.path("keep"), "user.good", b"fine");
    set_xattr(&m.path("keep"), "user.bad", b"to be damaged");
    let trunc = backing_of(&env, &m, &format!("docs/{secret}-trunc"), |p| {
        write(p, &[7u8; 5000])
    });
    let corrupt = backing_of(&env, &m, "docs/corrupt", |p| write(p, &[8u8; 100]));
    let long_name = format!("{}{secret}", "L".repeat(180));
    let long = backing_of(&env, &m, &long_name, |p| write(p, b"long"));
    let long2 = backing_of(&env, &m, &format!("{}2", "M".repeat(190)), |p| {
        write(p, b"m")
    });
    let link = backing_of(&env, &m, "link", |p| {
        std::os::unix::fs::symlink("keep", p).unwrap()
    });
    let moved = backing_of(&env, &m, "moved", |p| write(p, b"moved"));

    // fsck of a mounted volume may check, but refuses to repair.
    let (code, v, out) = fsck(&env, &env.cipher, &[]);
    assert_eq!(code, 0, "a healthy mounted volume checks clean:\n{out}");
    assert_eq!(v["keys"], "verified");
    let (code, _, out) = fsck(&env, &env.cipher, &["--repair"]);
    assert_eq!(code, 8, "--repair of a mounted volume is refused:\n{out}");
    assert!(out.stderr.contains("mounted"), "{out}");
    m.unmount();

    // Damage.
    let side = |p: &Path| PathBuf::from(format!("{}.name", p.display()));
    let docs_dir = trunc.parent().unwrap().to_path_buf();
    fs::OpenOptions::new()
        .write(true)
        .open(&trunc)
        .unwrap()
        .set_len(10)
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&corrupt)
        .unwrap()
        .write_all_at(b"JUNK", 0)
        .unwrap();
    fs::remove_file(side(&long)).unwrap(); // long entry without its side file
    fs::write(side(&long2), b"c29tZXRoaW5nIGVsc2U").unwrap(); // hash mismatch
    let orphan = env.cipher.join("cmkfs.long.orphanorphanorphan.name");
    fs::write(&orphan, b"xyz").unwrap();
    let side_tmp = docs_dir.join(".cmkfs-tmp.cmkfs.long.abc.name.0123456789ab");
    fs::write(&side_tmp, b"partial").unwrap();
    let header_tmp = env.cipher.join(".cmkfs-tmp.cmkfs.volume.json.0123456789ab");
    fs::write(&header_tmp, b"{\"format\":").unwrap();
    let mkdir_tmp = docs_dir.join(".cmkfs-tmp.mkdir.0123456789abcdef");
    fs::create_dir(&mkdir_tmp).unwrap();
    fs::write(mkdir_tmp.join(".cmkfs.dirid"), [1u8; 16]).unwrap();
    fs::set_permissions(&mkdir_tmp, fs::Permissions::from_mode(0o555)).unwrap();
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("bm90IGEgdGFyZ2V0", &link).unwrap(); // target does not decrypt
    let moved_to = docs_dir.join(moved.file_name().unwrap());
    fs::rename(&moved, &moved_to).unwrap(); // a name in the wrong directory
    fs::remove_file(empty_dir.join(".cmkfs.dirid")).unwrap();
    fs::remove_file(full_dir.join(".cmkfs.dirid")).unwrap();
    // Damage one encrypted xattr's value (the other one stays good).
    let stored: Vec<String> = list_xattrs(&keep)
        .into_iter()
        .filter(|n| n.starts_with("user.cmkfs."))
        .collect();
    assert_eq!(
        stored.len(),
        2,
        "two encrypted xattrs on the backing file: {stored:?}"
    );
    let bad_xattr = stored[0].clone();
    set_xattr(&keep, &bad_xattr, &[0u8; 40]);
    let foreign = env.cipher.join("notes.txt");
    fs::write(&foreign, b"someone else's").unwrap();

    let (code, v, out) = fsck(&env, &env.cipher, &[]);
    assert_eq!(code, 2, "problems found, nothing repaired:\n{out}");
    let p = find(&v, "file_header_truncated", &trunc, &env.cipher);
    assert_eq!(
        p["plaintext"],
        format!("/docs/{secret}-trunc").as_str(),
        "plaintext path known"
    );
    assert_eq!(p["fix"], "quarantine");
    assert_eq!(
        find(&v, "file_header_corrupt", &corrupt, &env.cipher)["plaintext"],
        "/docs/corrupt"
    );
    assert_eq!(
        find(&v, "long_name_side_file_missing", &long, &env.cipher)["fix"],
        "quarantine"
    );
    find(&v, "long_name_hash_mismatch", &long2, &env.cipher);
    assert_eq!(
        find(&v, "long_name_orphan_side_file", &orphan, &env.cipher)["fix"],
        "remove"
    );
    assert_eq!(
        find(&v, "temp_file", &side_tmp, &env.cipher)["fix"],
        "remove"
    );
    assert_eq!(
        find(&v, "header_temp_file", &header_tmp, &env.cipher)["fix"],
        "remove"
    );
    assert_eq!(
        find(&v, "mkdir_temp_dir", &mkdir_tmp, &env.cipher)["fix"],
        "remove"
    );
    assert_eq!(
        find(&v, "symlink_undecryptable", &link, &env.cipher)["plaintext"],
        "/link"
    );
    assert_eq!(
        find(&v, "name_undecryptable", &moved_to, &env.cipher)["plaintext_dir"],
        "/docs"
    );
    assert_eq!(
        find(
            &v,
            "dir_id_missing",
            &empty_dir.join(".cmkfs.dirid"),
            &env.cipher
        )["fix"],
        "recreate"
    );
    assert_eq!(
        find(&v, "dir_id_missing", &full_dir, &env.cipher)["fix"],
        "quarantine"
    );
    assert_eq!(
        find(&v, "xattr_undecryptable", &keep, &env.cipher)["plaintext"],
        "/keep"
    );
    let warn = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["backing"] == "notes.txt")
        .expect("foreign file reported");
    assert_eq!(warn["severity"], "warning");
    // Human output: one line per problem with its path, and the summary.
    let human = env.cmkfs(&[OsStr::new("fsck"), env.cipher.as_os_str()]);
    assert_eq!(human.status.code(), Some(2), "{human}");
    assert!(human.stdout.contains("problems left"), "{human}");
    assert!(
        human.stdout.contains(&format!("/docs/{secret}-trunc")),
        "{human}"
    );

    // Repair: exit 1, then clean; nothing but metadata deleted.
    let (code, v, out) = fsck(&env, &env.cipher, &["--repair"]);
    assert_eq!(code, 1, "all repaired:\n{out}");
    let batch = env
        .cipher
        .join(v["quarantine"].as_str().expect("a quarantine batch"));
    assert!(batch.starts_with(env.cipher.join("cmkfs.quarantine")));
    for q in [&trunc, &corrupt, &long, &long2, &link, &moved_to, &full_dir] {
        let rel = q.strip_prefix(&env.cipher).unwrap();
        assert!(
            fs::symlink_metadata(batch.join(rel)).is_ok(),
            "{} kept in the quarantine under its relative path",
            rel.display()
        );
        assert!(
            fs::symlink_metadata(q).is_err(),
            "{} moved away",
            q.display()
        );
    }
    assert!(foreign.exists(), "a foreign file is left alone");
    assert!(
        !list_xattrs(&keep).contains(&bad_xattr),
        "the damaged xattr is removed from the file"
    );
    let saved = fs::read_to_string(batch.join("cmkfs.xattrs.json")).expect("xattrs set aside");
    assert!(saved.contains(&bad_xattr), "{saved}");
    for gone in [&orphan, &side_tmp, &header_tmp, &mkdir_tmp] {
        assert!(!gone.exists(), "{} removed", gone.display());
    }
    let (code, _, out) = fsck(&env, &env.cipher, &[]);
    assert_eq!(code, 0, "clean after repair:\n{out}");
    // The quarantine (manifest included) holds no plaintext name.
    let leaks = find_markers(&env.cipher, &[secret.as_bytes()]);
    assert!(
        leaks.is_empty(),
        "plaintext in the backing store: {leaks:#?}"
    );

    // The volume mounts; healthy entries are intact, quarantined ones gone, the quarantine
    // itself invisible.
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("keep")), b"keep me");
    let left: Vec<String> = list_xattrs(&m.path("keep"))
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .collect();
    assert_eq!(left.len(), 1, "one good xattr left: {left:?}");
    let mut root: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    let want = vec!["docs".to_string(), "empty".into(), "keep".into()];
    assert_eq!(root, want, "root listing after repair");
    assert!(
        fs::read_dir(m.path("docs")).unwrap().next().is_none(),
        "docs emptied"
    );
    write(&m.path("empty/new"), b"the recreated directory id works");
    m.unmount();

    // Errors running fsck itself: exit 8 with one line.
    let (code, _, out) = fsck(&env, &env.dir("not-a-volume"), &[]);
    assert_eq!(code, 8, "{out}");
    out.assert_clear_error();
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let (code, _, out) = fsck(&env, &env.cipher, &[]);
    assert_eq!(code, 8, "the key cannot be had:\n{out}");
    assert!(out.stderr.contains("--no-key"), "{out}");
    let (code, v, out) = fsck(&env, &env.cipher, &["--no-key"]);
    assert_eq!(code, 0, "structure only:\n{out}");
    assert_eq!(v["keys"], "not_used");
}

/// A crash during `mkdir` leaves a `.cmkfs-tmp.mkdir.*` directory (holding only its id) in the
/// parent's backing directory. The parent looks empty; `rmdir` of it may succeed (the leftover
/// is garbage) or fail with ENOTEMPTY, but it must not break the directory: it stays
/// listable and usable, and fsck finds only the leftover to remove. Eight directories with
/// differently named leftovers, so that the backing directory's listing order (a hash on
/// ext4) puts the id before the leftover in some of them.
#[test]
fn rmdir_next_to_an_interrupted_mkdir_keeps_the_directory_usable() {
    const N: usize = 8;
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let dirs: Vec<PathBuf> = (0..N)
        .map(|i| backing_of(&env, &m, &format!("d{i}"), |p| fs::create_dir(p).unwrap()))
        .collect();
    m.unmount();
    // What a daemon killed between mkdir's temp directory and its rename leaves behind.
    for (i, d) in dirs.iter().enumerate() {
        let leftover = d.join(format!(
            ".cmkfs-tmp.mkdir.{:016x}",
            0x1234_5678_9abc_u64 * (i as u64 + 1)
        ));
        fs::create_dir(&leftover).unwrap();
        fs::write(leftover.join(".cmkfs.dirid"), [9u8; 16]).unwrap();
    }

    let m = env.mount(&env.cipher, &env.mnt);
    let mut kept = Vec::new();
    for i in 0..N {
        let dir = m.path(format!("d{i}"));
        assert!(
            fs::read_dir(&dir).unwrap().next().is_none(),
            "d{i} looks empty"
        );
        match fs::remove_dir(&dir) {
            Ok(()) => assert!(!dir.exists(), "rmdir d{i} succeeded but it is still there"),
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY),
                    "rmdir d{i} holding a crash leftover: {e}"
                );
                // The failed rmdir must have left the directory intact.
                let f = dir.join("after");
                if let Err(e) = fs::write(&f, b"still usable") {
                    panic!("d{i} after a failed rmdir: cannot create a file: {e}");
                }
                let got = fs::read(&f).unwrap_or_else(|e| {
                    panic!("d{i} after a failed rmdir: cannot read a new file: {e}")
                });
                assert_eq!(got, b"still usable");
                kept.push(i);
            }
        }
    }
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    for i in &kept {
        let got = fs::read(m.path(format!("d{i}/after"))).unwrap_or_else(|e| {
            panic!("d{i} (rmdir failed before the remount): cannot read its file: {e}")
        });
        assert_eq!(got, b"still usable", "d{i} after a remount");
    }
    m.unmount();
    let (_, v, out) = fsck(&env, &env.cipher, &[]);
    for (kind, fix, path) in problems(&v) {
        assert_eq!(
            (kind.as_str(), fix.as_str()),
            ("mkdir_temp_dir", "remove"),
            "only leftovers may be reported ({path}):\n{out}"
        );
    }
}

//! Shared by the vault server tests: a `cmkfs vault serve` child process.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Time limit for the server to print its URL.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for a SIGTERM to end it (then SIGKILL).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary under test: the harness's [`crate::common::bin`].
pub use crate::common::bin;

/// A `cmkfs vault serve` process; SIGTERM (then SIGKILL) when dropped.
pub struct ServerProc {
    child: Option<Child>,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The port it listens on.
    pub port: u16,
}

impl ServerProc {
    /// Starts a server on `<home>/vault` and waits for its "listening on" line.
    pub fn start(home: &Path, port: u16) -> ServerProc {
        ServerProc::start_with(home, &format!("127.0.0.1:{port}"), &[])
    }

    /// Starts a server listening on `listen` with extra `vault serve` arguments.
    pub fn start_with(home: &Path, listen: &str, extra: &[&str]) -> ServerProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(home.join("server.log"))
            .unwrap();
        let mut cmd = Command::new(bin());
        passphrase_env(&mut cmd, home);
        let mut child = cmd
            .args(["vault", "serve", "--listen", listen])
            .args(extra)
            .env("CMKFS_HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start cmkfs vault serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("listening on ") {
                    let _ = tx.send(u.trim().to_string());
                }
            }
        });
        let mut server = ServerProc {
            child: Some(child),
            url: String::new(),
            port: 0,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => {
                server.port = url.rsplit(':').next().unwrap().parse().unwrap();
                server.url = url;
            }
            Err(_) => {
                server.stop();
                let log = std::fs::read_to_string(home.join("server.log")).unwrap_or_default();
                panic!("the vault server did not start within {START_TIMEOUT:?}: {log}");
            }
        }
        server
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGTERM, wait, SIGKILL if need be.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

// The vault passphrase of tests: the harness's (one suite binary, one copy).
pub use crate::common::{passphrase_env, use_test_passphrase};

//! A volume whose KEK lives in a PKCS#11 token (SoftHSM2): init, mount, read and write,
//! revoke on the token (decrypt permission cleared) and heal — through real FUSE mounts.
//! PKCS#11 has no push, so the mount relies on its periodic check (1 s here).

use crate::common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn status_state(env: &Env) -> String {
    let out = env.cmkfs(&[
        OsStr::new("status"),
        env.mnt.as_os_str(),
        OsStr::new("--json"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn volume_on_a_pkcs11_token_mounts_revokes_and_heals() {
    assert!(
        Path::new(MODULE).exists(),
        "{MODULE} is missing: install softhsm2 (scripts/test.sh does)"
    );
    let env = Env::new();
    let hsm = env.dir("hsm");
    std::fs::create_dir(hsm.join("tokens")).unwrap();
    let conf = hsm.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            hsm.join("tokens").display()
        ),
    )
    .unwrap();
    std::fs::write(hsm.join("pin"), "1234\n").unwrap();
    // The only test in this binary: setting the environment for the children is safe here.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "cmkfs-test",
            "--so-pin",
            "5678",
            "--pin",
            "1234",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!(
        "pkcs11:{MODULE}?token=cmkfs-test&pin-source=file:{}",
        hsm.join("pin").display()
    );

    // The module is loaded only once this machine configured the token.
    env.cmkfs(&["vault", "add", "hsm", &url]).assert_ok();
    // SoftHSM 2.6 has no SHA-2 OAEP: the key is created for RSA-OAEP.
    env.init_with(
        &env.cipher,
        &["--vault", &url, "--key", "hsm-kek", "--alg", "RSA-OAEP"],
    );
    let info = env.info(&env.cipher);
    assert_eq!(info["wrap_alg"], "RSA-OAEP");
    assert!(
        info["key_id"].as_str().unwrap().starts_with("pkcs11:"),
        "{info}"
    );

    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("hsm.txt"), b"kept by a token");
    assert_eq!(read(&m.path("hsm.txt")), b"kept by a token");

    let key = |flag: &str| {
        env.cmkfs(&[
            "vault",
            "--vault",
            url.as_str(),
            "key",
            "update",
            "hsm-kek",
            flag,
        ])
        .assert_ok();
    };
    key("--disable");
    assert!(wait_until(Duration::from_secs(60), || status_state(&env)
        == "Inaccessible"));
    assert!(std::fs::read(m.path("hsm.txt")).is_err());
    key("--enable");
    assert!(wait_until(Duration::from_secs(60), || status_state(&env)
        == "Accessible"));
    assert_eq!(read(&m.path("hsm.txt")), b"kept by a token");
    m.unmount();

    // Remount from the key id alone.
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("hsm.txt")), b"kept by a token");
    m.unmount();
}

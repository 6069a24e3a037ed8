//! A real FUSE mount whose key lives on a vault server (`cmkfs vault serve` over HTTPS): the
//! mount uses the HTTP backend, goes Inaccessible within the push bound when the key owner
//! disables the key on the vault host, heals when it is re-enabled, rides out a server
//! restart (grace period) and reconnects, push included.

use crate::common;
use crate::vault_support;

use std::time::{Duration, Instant};

use cmkfs::vault::local::{LocalVault, PolicyScope};
use cmkfs::vault::{CreateKeyOptions, KeyUpdate, Permission, Vault, WrapAlg};
use common::{wait_until, Env};
use vault_support::ServerProc;

/// How soon a push must cut a mount off (the bound is one second; the extra covers
/// the kernel cache invalidation and a loaded 2-core machine).
const PUSH_BOUND: Duration = Duration::from_secs(2);

fn readable(path: &std::path::Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b == b"secret data\n")
}

fn set_enabled(owner: &LocalVault, enabled: bool) {
    owner
        .update_key(
            "kek",
            None,
            &KeyUpdate {
                enabled: Some(enabled),
                ..Default::default()
            },
        )
        .unwrap();
}

#[test]
fn mount_through_a_vault_server_revoke_heal_restart() {
    let env = Env::new();
    let host = env.dir("vault-host");
    let owner = LocalVault::open(&host.join("vault")).unwrap();
    owner
        .create_key(
            "kek",
            &CreateKeyOptions {
                key_size: 2048,
                wrap_alg: WrapAlg::RsaOaep256,
            },
        )
        .unwrap();
    let mut server = ServerProc::start(&host, 0);

    // The identity's credential is made on the vault host for the server URL (with the
    // server's CA pinned) and placed in the client's $CMKFS_HOME/credentials.
    let cred = env.home.join("credentials/mnt.json");
    std::fs::create_dir_all(cred.parent().unwrap()).unwrap();
    let mut cmd = std::process::Command::new(vault_support::bin());
    vault_support::passphrase_env(&mut cmd, &host);
    let out = cmd
        .args([
            "vault",
            "identity",
            "create",
            "mnt",
            "--server-url",
            &server.url,
        ])
        .arg("--credential-file")
        .arg(&cred)
        .env("CMKFS_HOME", &host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    owner
        .set_policy(
            "mnt",
            &PolicyScope::Key("kek".into()),
            &[Permission::Get, Permission::WrapKey, Permission::UnwrapKey],
        )
        .unwrap();

    // The client machine trusts the server (a header alone never makes it connect anywhere).
    env.cmkfs(&["vault", "add", "keyserver", &server.url])
        .assert_ok();
    env.init_with(&env.cipher, &["--vault", &server.url, "--key", "kek"]);
    let info = env.info(&env.cipher);
    let kid = info["key_id"].as_str().unwrap_or_default().to_string();
    assert!(
        kid.starts_with(&format!("{}/keys/kek/", server.url)),
        "the header names the server's key: {info}"
    );
    let m = env.mount_with(
        &env.cipher,
        &env.mnt,
        &[
            "--credential",
            cred.to_str().unwrap(),
            "--key-check-interval",
            "60s",
            "--grace-period",
            "1h",
        ],
    );
    let f = m.path("f");
    std::fs::write(&f, b"secret data\n").unwrap();
    assert!(readable(&f));

    // Revoke on the vault host: the push cuts the mount off within the bound.
    let t0 = Instant::now();
    set_enabled(&owner, false);
    assert!(
        wait_until(PUSH_BOUND, || !readable(&f)),
        "still readable {PUSH_BOUND:?} after the key was disabled"
    );
    println!("https mount cut off {:?} after disable", t0.elapsed());
    set_enabled(&owner, true);
    assert!(wait_until(PUSH_BOUND, || readable(&f)), "did not heal");

    // Server down: the mount stays Accessible (grace period) ...
    let port = server.port;
    server.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        readable(&f),
        "an unreachable vault must not revoke before the grace period"
    );
    // ... and reconnects when it is back, push included.
    let _server = ServerProc::start(&host, port);
    std::thread::sleep(Duration::from_secs(3));
    assert!(readable(&f));
    set_enabled(&owner, false);
    assert!(
        wait_until(PUSH_BOUND + Duration::from_secs(3), || !readable(&f)),
        "no push after the server restart"
    );
    set_enabled(&owner, true);
    assert!(wait_until(PUSH_BOUND, || readable(&f)), "did not heal");
    m.unmount();
}

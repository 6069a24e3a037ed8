//! Integration tests of the vault server (`cmkfs vault serve`, the real binary over HTTPS)
//! and the HTTP vault backend (`vault::http`). Every test has its own temporary store and
//! server process, killed when the test ends (also on panic); every wait has a time limit.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cmkfs::vault::http::HttpVault;
use cmkfs::vault::local::{LocalVault, PolicyScope};
use cmkfs::vault::{
    CreateKeyOptions, Credential, DenyReason, ErrorClass, ImportKeyOptions, KeyUpdate, Permission,
    Vault, VaultError, WrapAlg,
};

const DEK: [u8; 64] = [0x42; 64];
use crate::vault_support;
use vault_support::{bin, ServerProc};

fn opts() -> CreateKeyOptions {
    CreateKeyOptions {
        key_size: 2048,
        wrap_alg: WrapAlg::RsaOaep256,
    }
}

/// A store with a key, two identities and a running server.
struct Fx {
    home: tempfile::TempDir,
    owner: LocalVault,
    server: ServerProc,
    app: Credential,
    reader: Credential,
}

impl Fx {
    fn new() -> Fx {
        vault_support::use_test_passphrase();
        let home = tempfile::tempdir().unwrap();
        let owner = LocalVault::open(&home.path().join("vault")).unwrap();
        owner.create_key("kek", &opts()).unwrap();
        let (_, app) = owner.create_identity("app").unwrap();
        owner
            .set_policy("app", &PolicyScope::AllKeys, &Permission::ALL)
            .unwrap();
        let (_, reader) = owner.create_identity("reader").unwrap();
        owner
            .set_policy(
                "reader",
                &PolicyScope::AllKeys,
                &[Permission::Get, Permission::WrapKey],
            )
            .unwrap();
        let server = ServerProc::start(home.path(), 0);
        let mut fx = Fx {
            home,
            owner,
            server,
            app,
            reader,
        };
        let ca = fx.ca();
        for c in [&mut fx.app, &mut fx.reader] {
            c.vault = fx.server.url.clone();
            c.ca_cert = Some(ca.clone());
        }
        fx
    }

    fn ca(&self) -> String {
        std::fs::read_to_string(self.home.path().join("vault/tls/ca.pem")).unwrap()
    }

    fn app(&self) -> HttpVault {
        HttpVault::connect(&self.app).unwrap()
    }

    /// A raw HTTPS agent trusting the server's CA (for status codes and headers).
    fn raw(&self) -> ureq::Agent {
        let ca = self.ca();
        let cert = ureq::tls::Certificate::from_pem(ca.as_bytes()).unwrap();
        let tls = ureq::tls::TlsConfig::builder()
            .unversioned_rustls_crypto_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]))
            .build();
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent()
    }

    fn token(&self, c: &Credential) -> String {
        format!("Bearer {}", &*c.bearer_token())
    }
}

/// (status, parsed JSON body or Null, WWW-Authenticate)
fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    auth: Option<&str>,
    body: Option<&[u8]>,
) -> (u16, serde_json::Value, Option<String>) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    let resp = match body {
        Some(body) => agent.run(
            b.header("content-type", "application/json")
                .body(body.to_vec())
                .unwrap(),
        ),
        None => agent.run(b.body(()).unwrap()),
    };
    let mut resp = resp.expect("request");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json, challenge)
}

fn deny_reason(e: &VaultError) -> Option<DenyReason> {
    match e {
        VaultError::Denied { reason, .. } => Some(*reason),
        _ => None,
    }
}

#[track_caller]
fn assert_denied<T: std::fmt::Debug>(r: Result<T, VaultError>, reason: DenyReason) {
    let e = r.expect_err("expected a denial");
    assert_eq!(deny_reason(&e), Some(reason), "got: {e}");
    assert_eq!(e.class(), ErrorClass::Denied);
}

// ------------------------------------------------------------------ the HTTP backend

#[test]
fn lifecycle_and_round_trip_over_https() {
    let fx = Fx::new();
    let v = fx.app();
    assert_eq!(v.url(), fx.server.url);
    let k = v.get_key("kek", None).unwrap();
    assert_eq!(k.kid, format!("{}/keys/kek/{}", fx.server.url, k.version));
    assert_eq!((k.key_size, k.enabled), (2048, true));
    assert_eq!(k.wrap_alg, WrapAlg::RsaOaep256);
    for alg in [WrapAlg::RsaOaep256, WrapAlg::RsaOaep] {
        let w = v.wrap_key("kek", None, alg, &DEK).unwrap();
        assert_eq!(w.kid.to_string(), k.kid);
        assert_eq!(&v.unwrap_key(&w.kid, alg, &w.value).unwrap()[..], &DEK);
    }
    // Corrupt bytes: the key cannot unwrap them (not a denial of the key).
    let w = v.wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let mut bad = w.value.clone();
    bad[7] ^= 1;
    assert!(matches!(
        v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &bad),
        Err(VaultError::UnwrapFailed { .. })
    ));

    // Create with the SHA-1 algorithm (an HSM-style key), rotate, list.
    let k2 = v
        .create_key(
            "k2",
            &CreateKeyOptions {
                key_size: 2048,
                wrap_alg: WrapAlg::RsaOaep,
            },
        )
        .unwrap();
    assert_eq!(k2.wrap_alg, WrapAlg::RsaOaep);
    let r = v.rotate_key("k2").unwrap();
    assert_ne!(r.version, k2.version);
    let versions = v.list_key_versions("k2").unwrap();
    assert_eq!(versions.len(), 2);
    let names: Vec<String> = v.list_keys().unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["k2", "kek"]);

    // Disable: every operation refused, as Key Vault does; describe still works.
    let w_old = v
        .wrap_key("k2", Some(&k2.version), WrapAlg::RsaOaep, &DEK)
        .unwrap();
    v.update_key(
        "k2",
        Some(&k2.version),
        &KeyUpdate {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_denied(v.get_key("k2", Some(&k2.version)), DenyReason::KeyDisabled);
    assert_denied(
        v.unwrap_key(&w_old.kid, WrapAlg::RsaOaep, &w_old.value),
        DenyReason::KeyDisabled,
    );
    assert!(!v.describe_key("k2", Some(&k2.version)).unwrap().enabled);
    v.update_key(
        "k2",
        Some(&k2.version),
        &KeyUpdate {
            enabled: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        &v.unwrap_key(&w_old.kid, WrapAlg::RsaOaep, &w_old.value)
            .unwrap()[..],
        &DEK
    );

    // Soft delete: denied, name taken (409), recoverable, purgeable.
    let d = v.delete_key("k2").unwrap();
    assert_eq!(d.recovery_id, format!("{}/deletedkeys/k2", fx.server.url));
    assert_denied(
        v.unwrap_key(&w_old.kid, WrapAlg::RsaOaep, &w_old.value),
        DenyReason::KeyDeleted,
    );
    assert_denied(v.get_key("k2", None), DenyReason::KeyDeleted);
    assert!(matches!(
        v.create_key("k2", &opts()),
        Err(VaultError::Conflict(_))
    ));
    assert_eq!(v.list_deleted_keys().unwrap().len(), 1);
    assert_eq!(v.get_deleted_key("k2").unwrap().key.name, "k2");
    assert_eq!(v.recover_deleted_key("k2").unwrap().version, r.version);
    v.delete_key("k2").unwrap();
    v.purge_deleted_key("k2").unwrap();
    assert!(matches!(
        v.get_key("k2", None),
        Err(VaultError::NotFound(_))
    ));
    assert_denied(
        v.unwrap_key(&w_old.kid, WrapAlg::RsaOaep, &w_old.value),
        DenyReason::KeyPurged,
    );

    // Import through the JWK form.
    let outside =
        aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = aws_lc_rs::encoding::AsDer::as_der(&outside).unwrap();
    let imp = v
        .import_key("imp", der.as_ref(), &ImportKeyOptions::default())
        .unwrap();
    assert_eq!(imp.key_size, 2048);
    let w = v.wrap_key("imp", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let dec = aws_lc_rs::rsa::OaepPrivateDecryptingKey::new(outside).unwrap();
    let mut buf = vec![0u8; 256];
    let pt = dec
        .decrypt(
            &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
            &w.value,
            &mut buf,
            None,
        )
        .unwrap();
    assert_eq!(pt, &DEK);

    // The server's calls are in the vault's audit log, under the caller's identity.
    let events = fx.owner.audit_reader().unwrap().read_new().unwrap();
    let unwraps = events
        .iter()
        .filter(|e| e.operation_name == "KeyUnwrap" && e.identity == "app")
        .count();
    assert!(unwraps >= 5, "{unwraps} unwrap events");
    assert!(events
        .iter()
        .any(|e| e.operation_name == "KeyPurge" && e.identity == "app" && e.succeeded()));
}

#[test]
fn challenge_permissions_and_key_state_status_codes() {
    let fx = Fx::new();
    let raw = fx.raw();
    let u = &fx.server.url;
    let app = fx.token(&fx.app);

    // No token, a wrong token, a deleted identity: 401 with Key Vault's challenge.
    let (s, body, challenge) = send(
        &raw,
        "GET",
        &format!("{u}/keys?api-version=7.6"),
        None,
        None,
    );
    assert_eq!(s, 401);
    assert_eq!(body["error"]["code"], "Unauthorized");
    let challenge = challenge.expect("WWW-Authenticate");
    assert!(
        challenge.starts_with("Bearer authorization=\""),
        "{challenge}"
    );
    assert!(
        challenge.contains(&format!("resource=\"{u}\"")),
        "{challenge}"
    );
    for bad in [
        "Bearer app.nope",
        "Bearer nodots",
        "Basic YTpi",
        "Bearer ghost.abc",
    ] {
        let (s, _, c) = send(
            &raw,
            "GET",
            &format!("{u}/keys?api-version=7.6"),
            Some(bad),
            None,
        );
        assert_eq!(s, 401, "{bad}");
        assert!(c.is_some());
    }

    // An identity without unwrapKey: 403 Forbidden.
    let reader = HttpVault::connect(&fx.reader).unwrap();
    let w = reader
        .wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK)
        .unwrap();
    assert_denied(
        reader.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value),
        DenyReason::PermissionDenied,
    );
    let body = serde_json::json!({"alg": "RSA-OAEP-256", "value": base64url(&w.value)}).to_string();
    let (s, e, _) = send(
        &raw,
        "POST",
        &format!("{}/unwrapkey?api-version=7.6", w.kid),
        Some(&fx.token(&fx.reader)),
        Some(body.as_bytes()),
    );
    assert_eq!(s, 403);
    assert_eq!(e["error"]["code"], "Forbidden");
    assert_eq!(e["error"]["innererror"]["code"], "AccessDenied");

    // Disabled: 403 with inner KeyDisabled.
    fx.owner
        .update_key(
            "kek",
            None,
            &KeyUpdate {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .unwrap();
    let (s, e, _) = send(
        &raw,
        "POST",
        &format!("{}/unwrapkey?api-version=7.6", w.kid),
        Some(&app),
        Some(body.as_bytes()),
    );
    assert_eq!(
        (s, e["error"]["innererror"]["code"].as_str()),
        (403, Some("KeyDisabled"))
    );
    let (s, e, _) = send(
        &raw,
        "GET",
        &format!("{u}/keys/kek?api-version=7.6"),
        Some(&app),
        None,
    );
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("Forbidden")));

    // Unknown key: 404; soft-deleted name: 409 on create.
    let (s, e, _) = send(
        &raw,
        "GET",
        &format!("{u}/keys/nope?api-version=7.6"),
        Some(&app),
        None,
    );
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("KeyNotFound")));
    fx.owner.delete_key("kek").unwrap();
    let create = br#"{"kty":"RSA","key_size":2048}"#;
    let (s, e, _) = send(
        &raw,
        "POST",
        &format!("{u}/keys/kek/create?api-version=7.6"),
        Some(&app),
        Some(create),
    );
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("Conflict")));
    // Purge answers 204.
    let (s, _, _) = send(
        &raw,
        "DELETE",
        &format!("{u}/deletedkeys/kek?api-version=7.6"),
        Some(&app),
        None,
    );
    assert_eq!(s, 204);

    // Deleting the identity revokes its token at once.
    fx.owner.delete_identity("app").unwrap();
    let (s, _, _) = send(
        &raw,
        "GET",
        &format!("{u}/keys?api-version=7.6"),
        Some(&app),
        None,
    );
    assert_eq!(s, 401);
    assert_denied(fx.app().list_keys(), DenyReason::PermissionDenied);
}

fn base64url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn bad_input_is_a_400_with_an_error_body_never_a_crash() {
    let fx = Fx::new();
    let raw = fx.raw();
    let u = &fx.server.url;
    let app = fx.token(&fx.app);
    let k = fx.owner.describe_key("kek", None).unwrap();
    let unwrap_url = format!("{u}/keys/kek/{}/unwrapkey?api-version=7.6", k.version);
    let big = vec![b'a'; 100 * 1024];
    let huge = vec![b'{'; 3 * 1024 * 1024];
    let cases: Vec<(&str, String, Option<&[u8]>)> = vec![
        ("malformed JSON", unwrap_url.clone(), Some(b"{\"alg\": ")),
        ("not an object", unwrap_url.clone(), Some(b"[1,2]")),
        ("empty body", unwrap_url.clone(), Some(b"")),
        ("oversized body", unwrap_url.clone(), Some(&big)),
        ("very oversized body", unwrap_url.clone(), Some(&huge)),
        (
            "bad base64url",
            unwrap_url.clone(),
            Some(br#"{"alg":"RSA-OAEP-256","value":"***"}"#),
        ),
        (
            "unknown algorithm",
            unwrap_url.clone(),
            Some(br#"{"alg":"RSA1_5","value":"AAAA"}"#),
        ),
        (
            "unknown api-version",
            unwrap_url.replace("7.6", "2016-10-01"),
            Some(br#"{"alg":"RSA-OAEP-256","value":"AAAA"}"#),
        ),
        (
            "missing api-version",
            format!("{u}/keys/kek/{}/unwrapkey", k.version),
            Some(br#"{"alg":"RSA-OAEP-256","value":"AAAA"}"#),
        ),
        (
            "bad key size",
            format!("{u}/keys/new/create?api-version=7.6"),
            Some(br#"{"kty":"RSA","key_size":1024}"#),
        ),
        (
            "bad key type",
            format!("{u}/keys/new/create?api-version=7.6"),
            Some(br#"{"kty":"EC"}"#),
        ),
        (
            "bad key name",
            format!("{u}/keys/bad_name/create?api-version=7.6"),
            Some(br#"{"kty":"RSA"}"#),
        ),
    ];
    for (what, url, body) in cases {
        if what == "very oversized body" {
            // Past 1 MiB the server answers 400 without reading the rest and closes the
            // connection: a client still sending may see the reset instead of the answer.
            let mut b = ureq::http::Request::builder()
                .method("POST")
                .uri(&url)
                .header("authorization", &app);
            b = b.header("content-type", "application/json");
            // (An agent of its own: the closed connection must not go back to the shared
            // pool, where the next POST would find it broken.)
            if let Ok(mut r) = fx
                .raw()
                .run(b.body(body.unwrap_or_default().to_vec()).unwrap())
            {
                assert_eq!(r.status().as_u16(), 400);
                let e: serde_json::Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                assert!(e["error"]["code"].is_string());
            }
            continue;
        }
        let (s, e, _) = send(&raw, "POST", &url, Some(&app), body);
        assert_eq!(s, 400, "{what}: {e}");
        assert!(e["error"]["code"].is_string(), "{what}: {e}");
        assert!(
            !e["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
    }
    let (s, e, _) = send(
        &raw,
        "GET",
        &format!("{u}/secrets/x?api-version=7.6"),
        Some(&app),
        None,
    );
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("NotFound")));
    let (s, _, _) = send(
        &raw,
        "PUT",
        &format!("{u}/keys?api-version=7.6"),
        Some(&app),
        Some(b"{}"),
    );
    assert_eq!(s, 405);
    // Still serving.
    assert_eq!(fx.app().get_key("kek", None).unwrap().version, k.version);
}

#[test]
fn server_restart_client_reconnects_and_watch_notices() {
    let mut fx = Fx::new();
    let v = fx.app();
    let w = v.wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    let rx = v.watch().expect("the server pushes");
    let port = fx.server.port;
    fx.server.stop();
    let e = v
        .unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value)
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    // The watcher reports the lost connection (a mount degrades at once)...
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
    fx.server = ServerProc::start(fx.home.path(), port);
    // ...and the connection coming back.
    assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
    assert_eq!(
        &v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value).unwrap()[..],
        &DEK
    );
}

#[test]
fn watch_fires_within_a_second_of_a_change() {
    let fx = Fx::new();
    let v = fx.app();
    let rx = v.watch().expect("the server pushes");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "quiet while nothing changes"
    );
    let mut worst = Duration::ZERO;
    for enabled in [false, true, false] {
        let t0 = Instant::now();
        fx.owner
            .update_key(
                "kek",
                None,
                &KeyUpdate {
                    enabled: Some(enabled),
                    ..Default::default()
                },
            )
            .unwrap();
        rx.recv_timeout(Duration::from_secs(1))
            .expect("a push within a second");
        worst = worst.max(t0.elapsed());
        // Let the watcher re-arm with the new generation.
        std::thread::sleep(Duration::from_millis(100));
        while rx.try_recv().is_ok() {}
    }
    println!("watch latency (worst of 3): {worst:?}");
    // A mount re-checks on the push and finds the key disabled.
    let k = fx.owner.describe_key("kek", None).unwrap();
    assert_denied(v.get_key("kek", Some(&k.version)), DenyReason::KeyDisabled);
}

#[test]
fn load_200_concurrent_unwraps_from_8_clients() {
    let fx = Fx::new();
    const CLIENTS: usize = 8;
    let per_client: usize = std::env::var("CMKFS_LOAD_UNWRAPS_PER_CLIENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let w = fx
        .app()
        .wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK)
        .unwrap();
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let mut threads = Vec::new();
    for _ in 0..CLIENTS {
        let (cred, w, barrier) = (fx.app.clone(), w.clone(), barrier.clone());
        threads.push(std::thread::spawn(move || {
            let v = HttpVault::connect(&cred).unwrap();
            // Warm the connection (TLS handshake) before the clock starts.
            v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value).unwrap();
            barrier.wait();
            let mut errors = Vec::new();
            for _ in 0..per_client {
                match v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value) {
                    Ok(pt) if pt[..] == DEK => {}
                    Ok(_) => errors.push("wrong plaintext".to_string()),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    let errors: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = t0.elapsed();
    let total = CLIENTS * per_client;
    assert!(
        errors.is_empty(),
        "{} errors, first: {}",
        errors.len(),
        errors[0]
    );
    println!(
        "{total} unwraps (RSA-2048, OAEP-SHA256) from {CLIENTS} clients in {elapsed:?}: {:.0} unwraps/s",
        total as f64 / elapsed.as_secs_f64()
    );
}

// ------------------------------------------------------------------ the command line

fn cli(home: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin());
    vault_support::passphrase_env(&mut cmd, home);
    let out = cmd
        .args(args)
        .env("CMKFS_HOME", home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cmkfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn cli_prints_a_token_and_drives_keys_through_the_server() {
    let fx = Fx::new();
    let home = fx.home.path();
    let cred_path = home.join("remote.json");
    let out = cli(
        home,
        &[
            "vault",
            "identity",
            "create",
            "remote",
            "--server-url",
            &fx.server.url,
            "--credential-file",
            cred_path.to_str().unwrap(),
            "--json",
        ],
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = j["token"].as_str().unwrap();
    assert!(token.starts_with("remote."), "the token names its identity");
    assert_eq!(j["vault"], fx.server.url.as_str());
    let cred = Credential::load(&cred_path).unwrap();
    assert_eq!(cred.vault, fx.server.url);
    assert_eq!(cred.ca_cert.as_deref(), Some(fx.ca().as_str()));
    cli(
        home,
        &[
            "vault",
            "policy",
            "set",
            "remote",
            "--all-keys",
            "--permissions",
            "get,list,create,rotate",
        ],
    );
    let c = cred_path.to_str().unwrap();
    // The client side trusts the server's URL first.
    cli(home, &["vault", "add", "srv", &fx.server.url]);
    let out = cli(home, &["vault", "--credential", c, "key", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        keys[0]["kid"].as_str().unwrap().rsplit_once('/').unwrap().0,
        format!("{}/keys/kek", fx.server.url)
    );
    let out = cli(
        home,
        &[
            "vault",
            "--credential",
            c,
            "key",
            "create",
            "viahttp",
            "--key-size",
            "2048",
            "--json",
        ],
    );
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(k["kid"].as_str().unwrap().starts_with(&fx.server.url));
    // The key exists in the served store, created by the remote identity.
    assert!(fx.owner.describe_key("viahttp", None).is_ok());
    let events = fx.owner.audit_reader().unwrap().read_new().unwrap();
    assert!(events
        .iter()
        .any(|e| e.operation_name == "KeyCreate" && e.identity == "remote"));
    // A credential in $CMKFS_HOME/credentials is found by URL (what `cmkfs mount` relies on).
    std::fs::create_dir_all(home.join("credentials")).unwrap();
    std::fs::copy(&cred_path, home.join("credentials/remote.json")).unwrap();
    let v = cmkfs::vault::open(&fx.server.url, &cmkfs::home::Home::at(home)).unwrap();
    assert_eq!(v.list_keys().unwrap().len(), 2);
}

#[test]
fn tls_is_verified_and_plain_http_refused() {
    let fx = Fx::new();
    // No pinned CA: the public roots do not know our server.
    let mut c = fx.app.clone();
    c.ca_cert = None;
    let e = HttpVault::connect(&c).unwrap().list_keys().unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    // Some other CA.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    c.ca_cert = Some(other.cert.pem());
    assert!(HttpVault::connect(&c).unwrap().list_keys().is_err());
    c.vault = fx.server.url.replace("https://", "http://");
    assert!(matches!(
        HttpVault::connect(&c),
        Err(VaultError::Invalid(_))
    ));
}

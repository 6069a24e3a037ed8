//! The Azure backend (`vault::azure`, the official Azure SDK for Rust) against a real
//! `cmkfs vault serve` process, and its Entra ID sign-in flows against a token endpoint the
//! test starts (a fake authority: the one part that cannot run offline). Each flow's request
//! is recorded and checked field by field against what Microsoft's identity platform
//! documents (form fields, the client assertion's header and claims and signature, managed
//! identity query and headers), and the token it returns is one the vault server accepts, so
//! every flow ends in a real key operation.

#![cfg(feature = "azure")]
// Several of the SDK's models are `#[non_exhaustive]` (no struct literal from outside); the
// test builds them all the same way.
#![allow(clippy::field_reassign_with_default)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cmkfs::vault::azure::AzureVault;
use cmkfs::vault::azure_auth::AzureAuth;
use cmkfs::vault::local::{LocalVault, PolicyScope};
use cmkfs::vault::{
    CreateKeyOptions, Credential, DenyReason, ErrorClass, KeyId, KeyUpdate, Permission, Vault,
    VaultError, WrapAlg,
};
use zeroize::Zeroizing;

use crate::vault_support;
use vault_support::ServerProc;

const DEK: [u8; 64] = [0x24; 64];

// ---------------------------------------------------------------------------------------------
// A token endpoint: records every request, answers with what the test's responder says.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: String,
}

impl Recorded {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    fn query(&self) -> HashMap<String, String> {
        pairs(self.target.split_once('?').map_or("", |q| q.1))
    }

    fn form(&self) -> HashMap<String, String> {
        pairs(&self.body)
    }
}

/// `application/x-www-form-urlencoded` pairs (also a query string).
fn pairs(s: &str) -> HashMap<String, String> {
    fn decode(v: &str) -> String {
        let b = v.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(h, 16).unwrap());
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

type Responder = Arc<dyn Fn(&Recorded) -> (u16, String) + Send + Sync>;

struct Authority {
    url: String,
    /// PEM of its certificate (https), to pin.
    cert_pem: Option<String>,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl Authority {
    fn start(tls: bool, respond: Responder) -> Authority {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (config, cert_pem) = if tls {
            let ck = rcgen::generate_simple_self_signed(vec![
                "127.0.0.1".to_string(),
                "localhost".to_string(),
            ])
            .unwrap();
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![ck.cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
                )
                .unwrap();
            (Some(Arc::new(cfg)), Some(ck.cert.pem()))
        } else {
            (None, None)
        };
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, seen, respond) = (config.clone(), s2.clone(), respond.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    match config {
                        Some(c) => {
                            let conn = rustls::ServerConnection::new(c).unwrap();
                            let mut tls = rustls::StreamOwned::new(conn, stream);
                            serve_one(&mut tls, &seen, &respond);
                        }
                        None => {
                            let mut s: TcpStream = stream;
                            serve_one(&mut s, &seen, &respond);
                        }
                    }
                });
            }
        });
        let scheme = if tls { "https" } else { "http" };
        Authority {
            url: format!("{scheme}://127.0.0.1:{port}"),
            cert_pem,
            seen,
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_one<S: Read + Write>(s: &mut S, seen: &Mutex<Vec<Recorded>>, respond: &Responder) {
    let mut r = BufReader::new(&mut *s);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let rec = Recorded {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let (status, answer) = respond(&rec);
    seen.lock().unwrap().push(rec);
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = write!(
        s,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = s.flush();
}

/// Entra ID's v2 token answer.
fn entra_token(token: &str) -> String {
    serde_json::json!({
        "token_type": "Bearer",
        "expires_in": 3599,
        "ext_expires_in": 3599,
        "access_token": token,
    })
    .to_string()
}

/// The managed identity endpoints' answer (expires_on is a string of Unix seconds).
fn msi_token(token: &str, resource: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    serde_json::json!({
        "access_token": token,
        "expires_on": exp.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// A vault server with one identity whose token the authority hands out.
// ---------------------------------------------------------------------------------------------

struct Fx {
    home: tempfile::TempDir,
    server: ServerProc,
    /// `<identity>.<secret>`: what the fake authority issues as the access token.
    token: String,
}

impl Fx {
    fn new() -> Fx {
        vault_support::use_test_passphrase();
        let home = tempfile::tempdir().unwrap();
        let owner = LocalVault::open(&home.path().join("vault")).unwrap();
        owner
            .create_key(
                "kek",
                &CreateKeyOptions {
                    key_size: 2048,
                    wrap_alg: WrapAlg::RsaOaep256,
                },
            )
            .unwrap();
        let (_, app) = owner.create_identity("app").unwrap();
        owner
            .set_policy("app", &PolicyScope::AllKeys, &Permission::ALL)
            .unwrap();
        let server = ServerProc::start(home.path(), 0);
        Fx {
            token: app.bearer_token().to_string(),
            home,
            server,
        }
    }

    fn ca(&self) -> String {
        std::fs::read_to_string(self.home.path().join("vault/tls/ca.pem")).unwrap()
    }

    fn credential(&self, auth: AzureAuth, extra_ca: Option<&str>) -> Credential {
        let mut ca = self.ca();
        if let Some(e) = extra_ca {
            ca.push_str(e);
        }
        let json = serde_json::json!({
            "vault": self.server.url,
            "identity": "app",
            "secret": self.token,
            "ca_cert": ca,
        });
        let mut c: Credential = serde_json::from_value(json).unwrap();
        c.azure = Some(auth);
        c
    }

    fn scope(&self) -> String {
        format!("{}/.default", self.server.url)
    }
}

#[track_caller]
fn denied<T: std::fmt::Debug>(r: Result<T, VaultError>, want: DenyReason) {
    match r {
        Err(VaultError::Denied { reason, .. }) if reason == want => {}
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

/// A key operation through the SDK backend that needs a valid token.
fn works(v: &AzureVault) {
    let k = v.get_key("kek", None).unwrap();
    assert_eq!(k.name, "kek");
    let w = v.wrap_key("kek", None, WrapAlg::RsaOaep256, &DEK).unwrap();
    assert_eq!(
        &v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value).unwrap()[..],
        &DEK
    );
}

// ---------------------------------------------------------------------------------------------
// The SDK backend against a cmkfs server
// ---------------------------------------------------------------------------------------------

#[test]
fn the_sdk_backend_drives_a_cmkfs_server_through_the_vault_trait() {
    let fx = Fx::new();
    let v = AzureVault::connect(&fx.credential(AzureAuth::BearerToken, None)).unwrap();
    assert_eq!(v.url(), fx.server.url);
    works(&v);
    let opts = CreateKeyOptions {
        key_size: 2048,
        wrap_alg: WrapAlg::RsaOaep,
    };
    let k1 = v.create_key("k", &opts).unwrap();
    assert_eq!((k1.key_size, k1.wrap_alg), (2048, WrapAlg::RsaOaep));
    assert_eq!(k1.key_ops, ["wrapKey", "unwrapKey"]);
    let w1 = v.wrap_key("k", None, WrapAlg::RsaOaep, &DEK).unwrap();
    assert_eq!(w1.kid.to_string(), k1.kid);
    let k2 = v.rotate_key("k").unwrap();
    assert_eq!(v.list_key_versions("k").unwrap().len(), 2);
    let names: Vec<String> = v.list_keys().unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["k", "kek"]);
    assert_eq!(v.get_key("k", None).unwrap().version, k2.version);

    // Tags and attributes.
    let upd = KeyUpdate {
        tags: Some([("team".to_string(), "storage".to_string())].into()),
        ..Default::default()
    };
    let t = v.update_key("k", Some(&k2.version), &upd).unwrap();
    assert_eq!(t.tags["team"], "storage");
    assert_eq!(
        t.wrap_alg,
        WrapAlg::RsaOaep,
        "the wrap algorithm tag survives"
    );

    // Revocation classes: disabled → KeyDisabled; deleted → KeyDeleted; wrong token → denied.
    let off = KeyUpdate {
        enabled: Some(false),
        ..Default::default()
    };
    v.update_key("k", Some(&k1.version), &off).unwrap();
    denied(
        v.unwrap_key(&w1.kid, WrapAlg::RsaOaep, &w1.value),
        DenyReason::KeyDisabled,
    );
    assert!(!v.describe_key("k", Some(&k1.version)).unwrap().enabled);
    let on = KeyUpdate {
        enabled: Some(true),
        ..Default::default()
    };
    v.update_key("k", Some(&k1.version), &on).unwrap();
    assert_eq!(
        &v.unwrap_key(&w1.kid, WrapAlg::RsaOaep, &w1.value).unwrap()[..],
        &DEK
    );
    let d = v.delete_key("k").unwrap();
    assert_eq!(d.key.name, "k");
    denied(
        v.unwrap_key(&w1.kid, WrapAlg::RsaOaep, &w1.value),
        DenyReason::KeyDeleted,
    );
    assert_eq!(v.list_deleted_keys().unwrap()[0].key.name, "k");
    assert_eq!(v.get_deleted_key("k").unwrap().key.name, "k");
    v.recover_deleted_key("k").unwrap();
    assert_eq!(
        &v.unwrap_key(&w1.kid, WrapAlg::RsaOaep, &w1.value).unwrap()[..],
        &DEK
    );
    v.delete_key("k").unwrap();
    v.purge_deleted_key("k").unwrap();
    denied(
        v.unwrap_key(&w1.kid, WrapAlg::RsaOaep, &w1.value),
        DenyReason::KeyPurged,
    );

    // Import.
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let imp = v
        .import_key("imported", der.as_ref(), &Default::default())
        .unwrap();
    assert_eq!(imp.key_size, 2048);

    let mut bad = fx.credential(AzureAuth::BearerToken, None);
    bad.secret = Zeroizing::new("app.not-the-secret".into());
    let bad = AzureVault::connect(&bad).unwrap();
    denied(bad.get_key("kek", None), DenyReason::PermissionDenied);

    // A server that is gone is unavailable, not a refusal.
    let url = fx.server.url.clone();
    drop(fx);
    let gone = v.get_key("kek", None).unwrap_err();
    assert_eq!(gone.class(), ErrorClass::Unavailable, "{gone} ({url})");
}

// ---------------------------------------------------------------------------------------------
// The official KeyClient for the rest of the API, at its default api-version
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Token(String);

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for Token {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        Ok(azure_core::credentials::AccessToken::new(
            azure_core::credentials::Secret::new(self.0.clone()),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }
}

#[test]
fn the_official_rust_key_client_covers_the_rest_of_the_api() {
    use azure_security_keyvault_keys::models::*;
    use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
    use futures::TryStreamExt as _;

    let fx = Fx::new();
    let ca = reqwest::Certificate::from_pem(fx.ca().as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let mut opts = KeyClientOptions::default();
    opts.client_options.transport = Some(azure_core::http::Transport::new(Arc::new(http)));
    opts.verify_challenge_resource = Some(false);
    let client = KeyClient::new(
        &fx.server.url,
        Arc::new(Token(fx.token.clone())),
        Some(opts),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Create with tags, no key_ops: all six operations.
        let mut p = CreateKeyParameters::default();
        p.kty = Some(KeyType::Rsa);
        p.key_size = Some(2048);
        p.tags = Some([("env".to_string(), "test".to_string())].into());
        let key = client
            .create_key("rust-sdk", p.try_into().unwrap(), None)
            .await
            .unwrap()
            .into_model()
            .unwrap();
        assert_eq!(key.tags.as_ref().unwrap()["env"], "test");
        let jwk = key.key.clone().unwrap();
        assert_eq!(jwk.key_ops.as_ref().unwrap().len(), 6);
        let version = jwk
            .kid
            .as_deref()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();

        // Sign and verify (server side), every RSA algorithm.
        for (alg, n) in [
            (SignatureAlgorithm::Rs256, 32),
            (SignatureAlgorithm::Ps384, 48),
            (SignatureAlgorithm::Rs512, 64),
        ] {
            let mut sp = SignParameters::default();
            sp.algorithm = Some(alg.clone());
            sp.value = Some(vec![7; n]);
            let so = KeyClientSignOptions {
                key_version: Some(version.clone()),
                ..Default::default()
            };
            let sig = client
                .sign("rust-sdk", sp.try_into().unwrap(), Some(so))
                .await
                .unwrap()
                .into_model()
                .unwrap()
                .result
                .unwrap();
            let mut vp = VerifyParameters::default();
            vp.algorithm = Some(alg);
            vp.digest = Some(vec![7; n]);
            vp.signature = Some(sig);
            let ok = client
                .verify("rust-sdk", &version, vp.try_into().unwrap(), None)
                .await
                .unwrap()
                .into_model()
                .unwrap();
            assert_eq!(ok.value, Some(true));
        }

        // Encrypt and decrypt.
        let mut ep = KeyOperationParameters::default();
        ep.algorithm = Some(EncryptionAlgorithm::RsaOaep256);
        ep.value = Some(b"hello".to_vec());
        let ct = client
            .encrypt("rust-sdk", ep.try_into().unwrap(), None)
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .result
            .unwrap();
        let mut dp = KeyOperationParameters::default();
        dp.algorithm = Some(EncryptionAlgorithm::RsaOaep256);
        dp.value = Some(ct);
        let pt = client
            .decrypt("rust-sdk", &version, dp.try_into().unwrap(), None)
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .result
            .unwrap();
        assert_eq!(pt, b"hello");
        // RSA1_5 is refused by the server with a 400.
        let mut bad = KeyOperationParameters::default();
        bad.algorithm = Some(EncryptionAlgorithm::Rsa1_5);
        bad.value = Some(b"x".to_vec());
        let e = client
            .encrypt("rust-sdk", bad.try_into().unwrap(), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("RSA1_5"), "{e}");

        // Random bytes.
        let mut rp = GetRandomBytesParameters::default();
        rp.count = Some(48);
        let rb = client
            .get_random_bytes(rp.try_into().unwrap(), None)
            .await
            .unwrap()
            .into_model()
            .unwrap();
        assert_eq!(rb.value.unwrap().len(), 48);

        // Rotation policy round trip.
        let mut pol = KeyRotationPolicy::default();
        let mut action = LifetimeAction::default();
        let mut kind = LifetimeActionType::default();
        kind.type_prop = Some(KeyRotationPolicyAction::Rotate);
        action.action = Some(kind);
        let mut trig = LifetimeActionTrigger::default();
        trig.time_after_create = Some("P30D".into());
        action.trigger = Some(trig);
        pol.lifetime_actions = Some(vec![action]);
        let mut attrs = KeyRotationPolicyAttributes::default();
        attrs.expiry_time = Some("P90D".into());
        pol.attributes = Some(attrs);
        client
            .update_key_rotation_policy("rust-sdk", pol.try_into().unwrap(), None)
            .await
            .unwrap();
        let got = client
            .get_key_rotation_policy("rust-sdk", None)
            .await
            .unwrap()
            .into_model()
            .unwrap();
        let acts = got.lifetime_actions.unwrap();
        assert_eq!(
            acts[0]
                .trigger
                .as_ref()
                .unwrap()
                .time_after_create
                .as_deref(),
            Some("P30D")
        );
        assert_eq!(got.attributes.unwrap().expiry_time.as_deref(), Some("P90D"));

        // Backup, delete, purge, restore.
        let blob = client
            .backup_key("rust-sdk", None)
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .value
            .unwrap();
        client.delete_key("rust-sdk", None).await.unwrap();
        client.purge_deleted_key("rust-sdk", None).await.unwrap();
        let mut restore = RestoreKeyParameters::default();
        restore.key_backup = Some(blob);
        let back = client
            .restore_key(restore.try_into().unwrap(), None)
            .await
            .unwrap()
            .into_model()
            .unwrap();
        assert_eq!(back.key.unwrap().kid, jwk.kid);

        // Paging: one key per page, every key once.
        let mut lo = KeyClientListKeyPropertiesOptions::default();
        lo.maxresults = Some(1);
        let all: Vec<KeyProperties> = client
            .list_key_properties(Some(lo))
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let names: Vec<String> = all
            .iter()
            .map(|k| {
                k.kid
                    .clone()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["kek", "rust-sdk"]);
    });
}

// ---------------------------------------------------------------------------------------------
// Entra ID flows
// ---------------------------------------------------------------------------------------------

#[test]
fn client_secret_flow_posts_the_form_entra_expects() {
    let fx = Fx::new();
    let token = fx.token.clone();
    let auth = Authority::start(true, Arc::new(move |_| (200, entra_token(&token))));
    let cred = fx.credential(
        AzureAuth::ClientSecret {
            tenant_id: "contoso-tenant".into(),
            client_id: "app-client-id".into(),
            client_secret: Zeroizing::new("s3cr3t value&=".into()),
            authority_host: Some(auth.url.clone()),
        },
        auth.cert_pem.as_deref(),
    );
    let v = AzureVault::connect(&cred).unwrap();
    works(&v);
    let reqs = auth.requests();
    assert_eq!(reqs.len(), 1, "one token, cached for the later calls");
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path(), "/contoso-tenant/oauth2/v2.0/token");
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let f = r.form();
    assert_eq!(f["grant_type"], "client_credentials");
    assert_eq!(f["client_id"], "app-client-id");
    assert_eq!(f["client_secret"], "s3cr3t value&=");
    assert_eq!(f["scope"], fx.scope());
}

#[test]
fn client_certificate_flow_signs_an_assertion_with_the_claims_entra_expects() {
    use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PSS_2048_8192_SHA256};
    use sha2::Digest as _;

    let fx = Fx::new();
    let token = fx.token.clone();
    let auth = Authority::start(true, Arc::new(move |_| (200, entra_token(&token))));
    // A service principal's certificate and key, in one PEM file (0600).
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["cmkfs-sp".to_string()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let file = fx.home.path().join("sp.pem");
    std::fs::write(&file, format!("{}{}", cert.pem(), kp.serialize_pem())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cred = fx.credential(
        AzureAuth::ClientCertificate {
            tenant_id: "contoso-tenant".into(),
            client_id: "app-client-id".into(),
            certificate: file.clone(),
            authority_host: Some(auth.url.clone()),
        },
        auth.cert_pem.as_deref(),
    );
    match AzureVault::connect(&cred) {
        Err(VaultError::Invalid(m)) => assert!(m.contains("chmod 600"), "{m}"),
        other => panic!("a world-readable key file is refused: {other:?}"),
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let v = AzureVault::connect(&cred).unwrap();
    works(&v);

    let reqs = auth.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path(), "/contoso-tenant/oauth2/v2.0/token");
    let f = r.form();
    assert_eq!(f["grant_type"], "client_credentials");
    assert_eq!(f["client_id"], "app-client-id");
    assert_eq!(
        f["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(f["scope"], fx.scope());
    assert!(!f.contains_key("client_secret"));
    let jwt: Vec<&str> = f["client_assertion"].split('.').collect();
    assert_eq!(jwt.len(), 3);
    let part = |i: usize| -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt[i]).unwrap()).unwrap()
    };
    let (header, claims) = (part(0), part(1));
    assert_eq!(header["alg"], "PS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(
        header["x5t#S256"],
        URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(cert.der()))
    );
    assert_eq!(
        claims["aud"],
        format!("{}/contoso-tenant/oauth2/v2.0/token", auth.url)
    );
    assert_eq!(claims["iss"], "app-client-id");
    assert_eq!(claims["sub"], "app-client-id");
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() >= 16));
    let (nbf, exp) = (
        claims["nbf"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - nbf, 600);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(nbf <= now + 5 && nbf + 300 >= now, "nbf {nbf} now {now}");
    // The signature verifies with the certificate's public key.
    let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(&kp.serialize_der()).unwrap();
    let public = aws_lc_rs::signature::KeyPair::public_key(&pair);
    let signed = format!("{}.{}", jwt[0], jwt[1]);
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, public.as_ref())
        .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(jwt[2]).unwrap())
        .expect("the assertion's signature verifies");
}

#[test]
fn managed_identity_reaches_the_app_service_endpoint_and_imds() {
    let fx = Fx::new();
    let resource = fx.server.url.clone();
    let (token, res) = (fx.token.clone(), resource.clone());
    let ep = Authority::start(false, Arc::new(move |_| (200, msi_token(&token, &res))));

    // App Service: IDENTITY_ENDPOINT + IDENTITY_HEADER.
    std::env::set_var("IDENTITY_ENDPOINT", format!("{}/msi/token", ep.url));
    std::env::set_var("IDENTITY_HEADER", "app-service-secret");
    let cred = fx.credential(
        AzureAuth::ManagedIdentity {
            client_id: Some("user-assigned-client".into()),
            object_id: None,
            resource_id: None,
        },
        None,
    );
    works(&AzureVault::connect(&cred).unwrap());
    let r = ep.requests().remove(0);
    assert_eq!((r.method.as_str(), r.path()), ("GET", "/msi/token"));
    let q = r.query();
    assert_eq!(q["api-version"], "2019-08-01");
    assert_eq!(q["resource"], resource);
    assert_eq!(q["client_id"], "user-assigned-client");
    assert_eq!(r.headers["x-identity-header"], "app-service-secret");
    assert_eq!(r.headers["metadata"], "true");

    // A VM: the fixed IMDS address, here redirected by AZURE_POD_IDENTITY_AUTHORITY_HOST.
    std::env::remove_var("IDENTITY_ENDPOINT");
    std::env::remove_var("IDENTITY_HEADER");
    let (token, res) = (fx.token.clone(), resource.clone());
    let imds = Authority::start(false, Arc::new(move |_| (200, msi_token(&token, &res))));
    std::env::set_var("AZURE_POD_IDENTITY_AUTHORITY_HOST", &imds.url);
    let cred = fx.credential(
        AzureAuth::ManagedIdentity {
            client_id: None,
            object_id: None,
            resource_id: None,
        },
        None,
    );
    works(&AzureVault::connect(&cred).unwrap());
    std::env::remove_var("AZURE_POD_IDENTITY_AUTHORITY_HOST");
    let r = imds
        .requests()
        .into_iter()
        .find(|r| r.path() == "/metadata/identity/oauth2/token")
        .expect("an IMDS token request");
    let q = r.query();
    assert_eq!(q["resource"], resource);
    assert!(!q.contains_key("client_id"), "system-assigned");
    assert_eq!(r.headers["metadata"], "true");
}

#[test]
fn workload_identity_sends_the_federated_token() {
    let fx = Fx::new();
    let token = fx.token.clone();
    let auth = Authority::start(true, Arc::new(move |_| (200, entra_token(&token))));
    let file = fx.home.path().join("federated-token");
    std::fs::write(
        &file,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln",
    )
    .unwrap();
    let cred = fx.credential(
        AzureAuth::WorkloadIdentity {
            tenant_id: Some("contoso-tenant".into()),
            client_id: Some("workload-client".into()),
            token_file: Some(file),
            authority_host: Some(auth.url.clone()),
        },
        auth.cert_pem.as_deref(),
    );
    works(&AzureVault::connect(&cred).unwrap());
    let r = auth.requests().remove(0);
    assert_eq!(r.path(), "/contoso-tenant/oauth2/v2.0/token");
    let f = r.form();
    assert_eq!(f["grant_type"], "client_credentials");
    assert_eq!(f["client_id"], "workload-client");
    assert_eq!(
        f["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(
        f["client_assertion"],
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln"
    );
    assert_eq!(f["scope"], fx.scope());
}

#[test]
fn azure_cli_flow_asks_az_for_the_vault_scope() {
    let fx = Fx::new();
    // A stand-in `az` on PATH that records its arguments and prints a token.
    let bin = fx.home.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = fx.home.path().join("az.args");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let answer = serde_json::json!({
        "accessToken": fx.token,
        "expiresOn": "2099-01-01 00:00:00.000000",
        "expires_on": exp,
        "tokenType": "Bearer",
        "subscription": "sub",
        "tenant": "contoso-tenant",
    });
    let script = bin.join("az");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\ncat <<'EOF'\n{answer}\nEOF\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{path}", bin.display()));
    let cred = fx.credential(
        AzureAuth::AzureCli {
            tenant_id: Some("contoso-tenant".into()),
        },
        None,
    );
    works(&AzureVault::connect(&cred).unwrap());
    std::env::set_var("PATH", path);
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(
        args.starts_with("account get-access-token -o json --scope ")
            && args.contains(&fx.scope())
            && args.contains("--tenant contoso-tenant"),
        "{args}"
    );
}

#[test]
fn entra_refusals_are_denials_and_outages_are_unavailable() {
    let fx = Fx::new();
    let refuse = Authority::start(
        true,
        Arc::new(|_| {
            (
                401,
                serde_json::json!({
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                    "error_codes": [7000215],
                })
                .to_string(),
            )
        }),
    );
    let secret = |host: &str| AzureAuth::ClientSecret {
        tenant_id: "contoso-tenant".into(),
        client_id: "app-client-id".into(),
        client_secret: Zeroizing::new("revoked".into()),
        authority_host: Some(host.into()),
    };
    let v = AzureVault::connect(&fx.credential(secret(&refuse.url), refuse.cert_pem.as_deref()))
        .unwrap();
    let e = v.get_key("kek", None).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Denied, "{e}");
    let kid = KeyId {
        vault: fx.server.url.clone(),
        name: "kek".into(),
        version: "0".repeat(32),
    };
    assert_eq!(
        v.unwrap_key(&kid, WrapAlg::RsaOaep256, &[0; 256])
            .unwrap_err()
            .class(),
        ErrorClass::Denied
    );

    let down = Authority::start(true, Arc::new(|_| (503, "{}".to_string())));
    let v =
        AzureVault::connect(&fx.credential(secret(&down.url), down.cert_pem.as_deref())).unwrap();
    let e = v.get_key("kek", None).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    assert!(down.requests().len() >= 2, "retried before giving up");
}

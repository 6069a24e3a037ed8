//! The PKCS#11 vault backend: KEKs as RSA key pairs on an HSM token (tested with SoftHSM2),
//! through the `cryptoki` crate.
//!
//! URL: `pkcs11:<module-path>?token=<label>&pin-source=file:<path>` (or `&pin-value=<pin>`;
//! without either, `$CMKFS_PKCS11_PIN`). Key ids never carry a `pin-value`: the vault URL in a
//! key id is the URL without it.
//!
//! - **Keys**: each version is a key pair generated *on the token* (private half
//!   `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`), both halves labelled
//!   `<name>/<version>/<alg>` with `CKA_ID` = the version's 16 bytes. Versions are 32 hex
//!   digits whose first half is the creation time in microseconds, so they sort by age and
//!   the latest is the largest.
//! - **Wrap algorithm** is per key (the label's last part): `RSA-OAEP-256` where the token can
//!   decrypt OAEP with SHA-256, else `RSA-OAEP` (SoftHSM 2.6 only does OAEP with SHA-1; creating
//!   an `RSA-OAEP-256` key there is refused after a test decryption).
//! - **Wrap** uses the public half in software (aws-lc); **unwrap** is `C_Decrypt` with
//!   `CKM_RSA_PKCS_OAEP` inside the token.
//! - **Revocation**: the key object removed (`Denied(KeyDeleted)`), its `CKA_DECRYPT` cleared
//!   (`Denied(KeyDisabled)`: that is what disable does), or the user PIN changed
//!   (`Denied(PermissionDenied)`). Every operation opens a session and logs in afresh, so a
//!   PIN change takes effect on the next check, not at the next mount.
//! - **No soft delete** on a token: delete destroys the objects (it is a purge).
//!
//! PKCS#11 allows one `C_Initialize` per process and module; modules are loaded once and
//! operations on one token are serialized (login state is per process and token).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rsa::{
    OaepPublicEncryptingKey, PublicEncryptingKey, PublicKeyComponents, OAEP_SHA1_MGF1SHA1,
    OAEP_SHA256_MGF1SHA256,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::crypto::secret::SecretBytes;

use super::{
    default_key_ops, valid_key_name, CreateKeyOptions, DeletedKeyInfo, DenyReason, KeyId, KeyInfo,
    KeyUpdate, Permission, Vault, VaultError, VaultProperties, WrapAlg, Wrapped,
};

/// The environment variable consulted for the user PIN when the URL names no PIN source.
pub const PIN_ENV: &str = "CMKFS_PKCS11_PIN";

/// A parsed `pkcs11:` vault URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Url {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Token label.
    pub token: String,
    /// `pin-source=file:<path>`.
    pub pin_file: Option<PathBuf>,
    /// `pin-value=<pin>` (never written back into key ids).
    pin_value: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Pkcs11Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Url")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("pin_file", &self.pin_file)
            .finish()
    }
}

fn pct_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Pkcs11Url {
    /// Parses `pkcs11:<module>?token=L[&pin-source=file:P|&pin-value=V]`.
    pub fn parse(url: &str) -> Result<Pkcs11Url, VaultError> {
        let bad = |why: &str| {
            VaultError::Invalid(format!(
                "malformed PKCS#11 vault URL ({why}): expected \
                 pkcs11:/path/to/module.so?token=LABEL&pin-source=file:/path/to/pin"
            ))
        };
        let rest = url
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("no pkcs11: prefix"))?;
        let (module, query) = rest.split_once('?').unwrap_or((rest, ""));
        if module.is_empty() || !module.starts_with('/') {
            return Err(bad("the module path must be absolute"));
        }
        let mut token = None;
        let mut pin_file = None;
        let mut pin_value = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("a parameter lacks '='"))?;
            match k {
                "token" => token = Some(super::percent_decode(v, false)),
                "pin-source" => {
                    let v = super::percent_decode(v, false);
                    let p = v
                        .strip_prefix("file:")
                        .ok_or_else(|| bad("pin-source must be file:/path"))?;
                    pin_file = Some(PathBuf::from(p));
                }
                "pin-value" => pin_value = Some(Zeroizing::new(super::percent_decode(v, false))),
                other => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("token=LABEL is required"))?;
        Ok(Pkcs11Url {
            module: PathBuf::from(super::percent_decode(module, false)),
            token,
            pin_file,
            pin_value,
        })
    }

    /// Whether the URL carries the PIN itself (`pin-value=`).
    pub fn has_pin_value(&self) -> bool {
        self.pin_value.is_some()
    }

    /// The URL as key ids carry it: module, token and PIN file, never a PIN value.
    pub fn vault_url(&self) -> String {
        let mut u = format!(
            "pkcs11:{}?token={}",
            pct_encode(&self.module.to_string_lossy()),
            pct_encode(&self.token)
        );
        if let Some(p) = &self.pin_file {
            u.push_str(&format!(
                "&pin-source=file:{}",
                pct_encode(&p.to_string_lossy())
            ));
        }
        u
    }

    /// The user PIN, in secret pages (the token's login gets a short-lived copy per session).
    fn pin(&self) -> Result<SecretBytes, VaultError> {
        if let Some(v) = &self.pin_value {
            return Ok(SecretBytes::new(v.as_bytes()));
        }
        if let Some(p) = &self.pin_file {
            let text = Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                VaultError::Unavailable(format!("cannot read the PIN file {}: {e}", p.display()))
            })?);
            return Ok(SecretBytes::new(
                text.trim_end_matches(['\n', '\r']).as_bytes(),
            ));
        }
        match std::env::var(PIN_ENV).map(Zeroizing::new) {
            Ok(v) if !v.is_empty() => Ok(SecretBytes::new(v.as_bytes())),
            _ => Err(VaultError::Invalid(format!(
                "no PIN for PKCS#11 token {:?}: add pin-source=file:/path to the vault URL or set ${PIN_ENV}",
                self.token
            ))),
        }
    }
}

/// Loaded modules and per-token locks, for the whole process.
struct Registry {
    modules: HashMap<PathBuf, Pkcs11>,
    locks: HashMap<(PathBuf, String), Arc<Mutex<()>>>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            modules: HashMap::new(),
            locks: HashMap::new(),
        })
    })
}

fn ck(what: &str, e: CkError) -> VaultError {
    match &e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::PinInvalid
            | RvError::PinLenRange => VaultError::Denied {
                reason: DenyReason::PermissionDenied,
                what: format!("{what} (the token refused the PIN: {rv:?})"),
            },
            RvError::KeyFunctionNotPermitted => VaultError::Denied {
                reason: DenyReason::KeyDisabled,
                what: format!("{what} (the key may not decrypt)"),
            },
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => VaultError::Denied {
                reason: DenyReason::KeyDeleted,
                what: format!("{what} (the key object is gone from the token)"),
            },
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => {
                VaultError::UnwrapFailed {
                    kid: what.to_string(),
                }
            }
            RvError::MechanismInvalid | RvError::MechanismParamInvalid | RvError::ArgumentsBad => {
                VaultError::Invalid(format!(
                    "{what}: the token does not support this mechanism ({rv:?})"
                ))
            }
            _ => VaultError::Unavailable(format!("{what}: PKCS#11 error {rv:?}")),
        },
        _ => VaultError::Unavailable(format!("{what}: {e}")),
    }
}

/// A connection to one PKCS#11 token.
pub struct Pkcs11Vault {
    url: String,
    /// Module and token: what identifies the vault (the PIN source may differ between
    /// holders of key ids).
    module: PathBuf,
    token: String,
    ctx: Pkcs11,
    slot: Slot,
    /// The user PIN (the credential), in secret pages.
    pin: SecretBytes,
    lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Pkcs11Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Vault")
            .field("url", &self.url)
            .finish()
    }
}

/// One key version as found on the token.
#[derive(Clone, Debug)]
struct Version {
    name: String,
    version: String,
    alg: WrapAlg,
    private: ObjectHandle,
    label: String,
}

fn parse_label(label: &str) -> Option<(String, String, WrapAlg)> {
    let mut parts = label.splitn(3, '/');
    let (name, version, alg) = (parts.next()?, parts.next()?, parts.next()?);
    if !valid_key_name(name)
        || version.len() != 32
        || !version
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    Some((name.to_string(), version.to_string(), alg.parse().ok()?))
}

fn oaep(alg: WrapAlg) -> PkcsOaepParams<'static> {
    match alg {
        WrapAlg::RsaOaep256 => PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::empty(),
        ),
        WrapAlg::RsaOaep => PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            PkcsOaepSource::empty(),
        ),
    }
}

fn software_wrap(
    n: &[u8],
    e: &[u8],
    alg: WrapAlg,
    plaintext: &[u8],
) -> Result<Vec<u8>, VaultError> {
    let damaged = || VaultError::Unavailable("the token's public key is unusable".into());
    let public: PublicEncryptingKey = PublicKeyComponents { n, e }
        .try_into()
        .map_err(|_| damaged())?;
    let key = OaepPublicEncryptingKey::new(public).map_err(|_| damaged())?;
    let a = match alg {
        WrapAlg::RsaOaep256 => &OAEP_SHA256_MGF1SHA256,
        WrapAlg::RsaOaep => &OAEP_SHA1_MGF1SHA1,
    };
    let max = key.max_plaintext_size(a);
    if plaintext.is_empty() || plaintext.len() > max {
        return Err(VaultError::Invalid(format!(
            "cannot wrap {} bytes with {alg} under a {}-bit key (1..={max} bytes fit)",
            plaintext.len(),
            key.key_size_bits()
        )));
    }
    let mut out = vec![0u8; key.ciphertext_size()];
    let len = key
        .encrypt(a, plaintext, &mut out, None)
        .map_err(|_| VaultError::Unavailable("RSA-OAEP encryption failed".into()))?
        .len();
    out.truncate(len);
    Ok(out)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn new_version() -> Result<String, VaultError> {
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).map_err(|e| VaultError::Store(format!("no randomness: {e}")))?;
    Ok(format!("{:016x}{}", now_micros(), hex::encode(rnd)))
}

fn created_of(version: &str) -> u64 {
    u64::from_str_radix(version.get(..16).unwrap_or("0"), 16).unwrap_or(0) / 1_000_000
}

fn not_found(name: &str, url: &str) -> VaultError {
    VaultError::NotFound(format!("key {name} does not exist on {url}"))
}

impl Pkcs11Vault {
    /// Loads the module (once per process), finds the token by label and checks the PIN.
    pub fn open(url: &str) -> Result<Pkcs11Vault, VaultError> {
        let u = Pkcs11Url::parse(url)?;
        let pin = u.pin()?;
        let (ctx, lock) = {
            let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
            let ctx = match reg.modules.get(&u.module) {
                Some(c) => c.clone(),
                None => {
                    let c = Pkcs11::new(&u.module).map_err(|e| {
                        VaultError::Unavailable(format!(
                            "cannot load PKCS#11 module {}: {e}",
                            u.module.display()
                        ))
                    })?;
                    match c.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                        Err(e) => return Err(ck("initializing the PKCS#11 module", e)),
                    }
                    reg.modules.insert(u.module.clone(), c.clone());
                    c
                }
            };
            let lock = reg
                .locks
                .entry((u.module.clone(), u.token.clone()))
                .or_default()
                .clone();
            (ctx, lock)
        };
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| ck("listing PKCS#11 slots", e))?;
        let mut slot = None;
        for s in slots {
            if let Ok(info) = ctx.get_token_info(s) {
                if info.label().trim_end() == u.token {
                    slot = Some(s);
                    break;
                }
            }
        }
        let slot = slot.ok_or_else(|| {
            VaultError::Unavailable(format!(
                "no PKCS#11 token labelled {:?} in module {}",
                u.token,
                u.module.display()
            ))
        })?;
        let v = Pkcs11Vault {
            url: u.vault_url(),
            module: u.module.clone(),
            token: u.token.clone(),
            ctx,
            slot,
            pin,
            lock,
        };
        v.with_session(|_| Ok(()))?;
        Ok(v)
    }

    /// Runs `f` in a fresh logged-in session (the PIN is checked every time), then logs out.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let s = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(|e| ck(&self.url, e))?;
        let pin = self.auth_pin();
        match s.login(UserType::User, Some(&pin)) {
            Ok(()) => {}
            // Left over from an interrupted operation: log out and prove the PIN again.
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                let _ = s.logout();
                s.login(UserType::User, Some(&pin))
                    .map_err(|e| ck(&self.url, e))?;
            }
            Err(e) => return Err(ck(&self.url, e)),
        }
        let out = f(&s);
        let _ = s.logout();
        out
    }

    /// A short-lived copy of the PIN for one login (`AuthPin` zeroizes itself on drop).
    fn auth_pin(&self) -> AuthPin {
        AuthPin::from(self.pin.as_str().unwrap_or_default().to_string())
    }

    /// Changes the user PIN (the owner revoking every holder of the old one). Holders of
    /// the old PIN are refused from their next operation on.
    pub fn change_pin(&self, new_pin: &str) -> Result<(), VaultError> {
        let new = AuthPin::from(new_pin.to_string());
        self.with_session(|s| {
            s.set_pin(&self.auth_pin(), &new)
                .map_err(|e| ck("changing the PIN", e))
        })
    }

    fn label_of(s: &Session, h: ObjectHandle) -> Option<String> {
        match s.get_attributes(h, &[AttributeType::Label]).ok()?.first()? {
            Attribute::Label(l) => String::from_utf8(l.clone()).ok(),
            _ => None,
        }
    }

    /// Every cmkfs key version on the token, by name, oldest first.
    fn versions(&self, s: &Session) -> Result<BTreeMap<String, Vec<Version>>, VaultError> {
        let handles = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Token(true),
            ])
            .map_err(|e| ck(&self.url, e))?;
        let mut out: BTreeMap<String, Vec<Version>> = BTreeMap::new();
        for h in handles {
            let Some(label) = Self::label_of(s, h) else {
                continue;
            };
            let Some((name, version, alg)) = parse_label(&label) else {
                continue;
            };
            out.entry(name.clone()).or_default().push(Version {
                name,
                version,
                alg,
                private: h,
                label,
            });
        }
        for v in out.values_mut() {
            v.sort_by(|a, b| a.version.cmp(&b.version));
        }
        Ok(out)
    }

    fn find(&self, s: &Session, name: &str, version: Option<&str>) -> Result<Version, VaultError> {
        let mut all = self.versions(s)?;
        let vs = all.remove(name).ok_or_else(|| not_found(name, &self.url))?;
        match version {
            None => vs
                .into_iter()
                .last()
                .ok_or_else(|| not_found(name, &self.url)),
            Some(v) => vs.into_iter().find(|x| x.version == v).ok_or_else(|| {
                VaultError::NotFound(format!("key {name} has no version {v:?} on {}", self.url))
            }),
        }
    }

    fn public_of(&self, s: &Session, v: &Version) -> Result<ObjectHandle, VaultError> {
        s.find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(v.label.as_bytes().to_vec()),
        ])
        .map_err(|e| ck(&self.url, e))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            VaultError::Store(format!(
                "the public half of {} is missing from the token",
                v.label
            ))
        })
    }

    fn enabled(&self, s: &Session, v: &Version) -> Result<bool, VaultError> {
        let attrs = s
            .get_attributes(v.private, &[AttributeType::Decrypt])
            .map_err(|e| ck(&self.url, e))?;
        Ok(attrs.iter().any(|a| matches!(a, Attribute::Decrypt(true))))
    }

    fn public_parts(&self, s: &Session, v: &Version) -> Result<(Vec<u8>, Vec<u8>), VaultError> {
        let public = self.public_of(s, v)?;
        let attrs = s
            .get_attributes(
                public,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .map_err(|e| ck(&self.url, e))?;
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Modulus(m) => n = m,
                Attribute::PublicExponent(x) => e = x,
                _ => {}
            }
        }
        if n.is_empty() || e.is_empty() {
            return Err(VaultError::Store(format!(
                "the public half of {} is unreadable",
                v.label
            )));
        }
        Ok((n, e))
    }

    fn info(&self, s: &Session, v: &Version) -> Result<KeyInfo, VaultError> {
        let (n, e) = self.public_parts(s, v)?;
        let enabled = self.enabled(s, v)?;
        let skip = n.iter().take_while(|b| **b == 0).count();
        let bits = n
            .get(skip)
            .map_or(0, |f| (n.len() - skip) as u32 * 8 - f.leading_zeros());
        let created = created_of(&v.version);
        Ok(KeyInfo {
            kid: format!("{}/keys/{}/{}", self.url, v.name, v.version),
            name: v.name.clone(),
            version: v.version.clone(),
            kty: "RSA-HSM".into(),
            key_size: bits,
            key_ops: if enabled {
                default_key_ops()
            } else {
                Vec::new()
            },
            enabled,
            created,
            updated: created,
            wrap_alg: v.alg,
            n: URL_SAFE_NO_PAD.encode(&n),
            e: URL_SAFE_NO_PAD.encode(&e),
            recovery_level: "Purgeable".into(),
            ..Default::default()
        })
    }

    fn generate(
        &self,
        s: &Session,
        name: &str,
        bits: u32,
        alg: WrapAlg,
    ) -> Result<Version, VaultError> {
        let version = new_version()?;
        let label = format!("{name}/{version}/{alg}");
        let id = hex::decode(&version).map_err(|_| VaultError::Store("bad version id".into()))?;
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Encrypt(true),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::ModulusBits((bits as u64).into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Unwrap(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id),
        ];
        let (pub_h, priv_h) = s
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(|e| ck(&format!("generating {label}"), e))?;
        let v = Version {
            name: name.to_string(),
            version,
            alg,
            private: priv_h,
            label,
        };
        // Prove the token can unwrap with this key's algorithm before anyone wraps with it.
        let probe = (|| {
            let (n, e) = self.public_parts(s, &v)?;
            let w = software_wrap(&n, &e, alg, &[0x5a; 32])?;
            let out = Zeroizing::new(
                s.decrypt(&Mechanism::RsaPkcsOaep(oaep(alg)), priv_h, &w)
                    .map_err(|e| ck(&v.label, e))?,
            );
            if out[..] != [0x5a; 32] {
                return Err(VaultError::Store(
                    "the token's test decryption was wrong".into(),
                ));
            }
            Ok(())
        })();
        if let Err(e) = probe {
            let _ = s.destroy_object(priv_h);
            let _ = s.destroy_object(pub_h);
            return Err(match e {
                VaultError::Invalid(_) if alg == WrapAlg::RsaOaep256 => VaultError::Invalid(format!(
                    "this token cannot unwrap RSA-OAEP-256 (OAEP with SHA-256; SoftHSM 2.6 cannot): \
                     create key {name} with the RSA-OAEP algorithm instead"
                )),
                other => other,
            });
        }
        Ok(v)
    }
}

impl Vault for Pkcs11Vault {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn create_key(&self, name: &str, opts: &CreateKeyOptions) -> Result<KeyInfo, VaultError> {
        if !valid_key_name(name) {
            return Err(VaultError::Invalid(format!(
                "invalid key name {name:?}: use 1-127 letters, digits and dashes"
            )));
        }
        if !super::local::KEY_SIZES.contains(&opts.key_size) {
            return Err(VaultError::Invalid(format!(
                "unsupported RSA key size {} (expected 2048, 3072 or 4096)",
                opts.key_size
            )));
        }
        self.with_session(|s| {
            if self.versions(s)?.contains_key(name) {
                return Err(VaultError::Conflict(format!(
                    "key {name} already exists on {}",
                    self.url
                )));
            }
            let v = self.generate(s, name, opts.key_size, opts.wrap_alg)?;
            self.info(s, &v)
        })
    }

    fn get_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        let k = self.describe_key(name, version)?;
        if !k.enabled {
            return Err(VaultError::Denied {
                reason: DenyReason::KeyDisabled,
                what: k.kid,
            });
        }
        Ok(k)
    }

    fn describe_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        self.with_session(|s| {
            let v = self.find(s, name, version)?;
            self.info(s, &v)
        })
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, VaultError> {
        self.with_session(|s| {
            self.versions(s)?
                .values()
                .filter_map(|vs| vs.last())
                .map(|v| self.info(s, v))
                .collect()
        })
    }

    fn list_key_versions(&self, name: &str) -> Result<Vec<KeyInfo>, VaultError> {
        self.with_session(|s| {
            let all = self.versions(s)?;
            let vs = all.get(name).ok_or_else(|| not_found(name, &self.url))?;
            vs.iter().map(|v| self.info(s, v)).collect()
        })
    }

    fn rotate_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        self.with_session(|s| {
            let latest = self.find(s, name, None)?;
            let bits = self.info(s, &latest)?.key_size;
            let v = self.generate(s, name, bits, latest.alg)?;
            self.info(s, &v)
        })
    }

    fn update_key(
        &self,
        name: &str,
        version: Option<&str>,
        update: &KeyUpdate,
    ) -> Result<KeyInfo, VaultError> {
        if update.nbf.is_some() || update.exp.is_some() || update.key_ops.is_some() {
            return Err(VaultError::Invalid(
                "the PKCS#11 backend can only enable or disable a key version".into(),
            ));
        }
        self.with_session(|s| {
            let v = self.find(s, name, version)?;
            if let Some(en) = update.enabled {
                // Disabling clears CKA_DECRYPT: the token itself then refuses to unwrap.
                s.update_attributes(v.private, &[Attribute::Decrypt(en)])
                    .map_err(|e| ck(&v.label, e))?;
            }
            self.info(s, &v)
        })
    }

    fn delete_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        self.with_session(|s| {
            let all = self.versions(s)?;
            let vs = all.get(name).ok_or_else(|| not_found(name, &self.url))?;
            let last = vs.last().ok_or_else(|| not_found(name, &self.url))?;
            let info = self.info(s, last)?;
            for v in vs {
                if let Ok(p) = self.public_of(s, v) {
                    s.destroy_object(p).map_err(|e| ck(&v.label, e))?;
                }
                s.destroy_object(v.private).map_err(|e| ck(&v.label, e))?;
            }
            let now = now_micros() / 1_000_000;
            Ok(DeletedKeyInfo {
                key: info,
                recovery_id: String::new(),
                deleted_date: now,
                scheduled_purge_date: now,
            })
        })
    }

    fn list_deleted_keys(&self) -> Result<Vec<DeletedKeyInfo>, VaultError> {
        Ok(Vec::new())
    }

    fn get_deleted_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        Err(VaultError::NotFound(format!(
            "key {name} is not deleted: PKCS#11 tokens have no soft delete (deleting destroys the key)"
        )))
    }

    fn properties(&self) -> Result<VaultProperties, VaultError> {
        Ok(VaultProperties {
            url: self.url.clone(),
            soft_delete: false,
            retention_days: 0,
            purge_protection: false,
        })
    }

    fn permissions(&self, _name: &str) -> Result<Vec<Permission>, VaultError> {
        // Whoever holds the PIN may do everything the token allows.
        Ok(Permission::ALL.to_vec())
    }

    fn wrap_key(
        &self,
        name: &str,
        version: Option<&str>,
        alg: WrapAlg,
        plaintext: &[u8],
    ) -> Result<Wrapped, VaultError> {
        self.with_session(|s| {
            let v = self.find(s, name, version)?;
            let kid = format!("{}/keys/{}/{}", self.url, v.name, v.version);
            if !self.enabled(s, &v)? {
                return Err(VaultError::Denied {
                    reason: DenyReason::KeyDisabled,
                    what: kid,
                });
            }
            if alg == WrapAlg::RsaOaep256 && v.alg == WrapAlg::RsaOaep {
                return Err(VaultError::Invalid(format!(
                    "key {name} unwraps only RSA-OAEP on this token: wrap with RSA-OAEP"
                )));
            }
            let (n, e) = self.public_parts(s, &v)?;
            let value = software_wrap(&n, &e, alg, plaintext)?;
            Ok(Wrapped {
                kid: KeyId {
                    vault: self.url.clone(),
                    name: v.name,
                    version: v.version,
                },
                alg,
                value,
            })
        })
    }

    fn unwrap_key(
        &self,
        kid: &KeyId,
        alg: WrapAlg,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let same = Pkcs11Url::parse(&kid.vault)
            .is_ok_and(|u| u.module == self.module && u.token == self.token);
        if !same {
            return Err(VaultError::Invalid(format!(
                "key id {kid} belongs to vault {:?}, not {}",
                kid.vault, self.url
            )));
        }
        let id = kid.to_string();
        self.with_session(|s| {
            // The key a volume header names is not on the token any more: the owner removed it.
            let v = match self.find(s, &kid.name, Some(&kid.version)) {
                Err(VaultError::NotFound(_)) => {
                    return Err(VaultError::Denied {
                        reason: DenyReason::KeyDeleted,
                        what: format!("{id} (the key object is gone from the token)"),
                    })
                }
                other => other?,
            };
            if !self.enabled(s, &v)? {
                return Err(VaultError::Denied {
                    reason: DenyReason::KeyDisabled,
                    what: format!("{id} (CKA_DECRYPT is off)"),
                });
            }
            let out = s
                .decrypt(&Mechanism::RsaPkcsOaep(oaep(alg)), v.private, wrapped)
                .map_err(|e| match e {
                    // SoftHSM reports bad OAEP padding as a general error (a device fault
                    // would be CKR_DEVICE_ERROR); the login and key lookup just worked.
                    CkError::Pkcs11(RvError::GeneralError, _) => {
                        VaultError::UnwrapFailed { kid: id.clone() }
                    }
                    other => ck(&id, other),
                })?;
            Ok(Zeroizing::new(out))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_keep_a_pin_value() {
        let u = Pkcs11Url::parse(
            "pkcs11:/usr/lib/softhsm/libsofthsm2.so?token=my%20token&pin-value=1234",
        )
        .unwrap();
        assert_eq!(u.token, "my token");
        assert_eq!(
            u.vault_url(),
            "pkcs11:/usr/lib/softhsm/libsofthsm2.so?token=my%20token"
        );
        let u = Pkcs11Url::parse("pkcs11:/m.so?token=t&pin-source=file:/etc/pin").unwrap();
        assert_eq!(
            u.vault_url(),
            "pkcs11:/m.so?token=t&pin-source=file:/etc/pin"
        );
        let kid: KeyId = format!("{}/keys/k/{}", u.vault_url(), "a".repeat(32))
            .parse()
            .unwrap();
        assert_eq!(kid.vault, u.vault_url());
        assert!(Pkcs11Url::parse("pkcs11:/m.so").is_err());
        assert!(Pkcs11Url::parse("pkcs11:m.so?token=t").is_err());
        assert!(Pkcs11Url::parse("pkcs11:/m.so?token=t&pin-source=/x").is_err());
        assert!(Pkcs11Url::parse("pkcs11:/m.so?token=t&bogus=1").is_err());
    }

    #[test]
    fn labels_and_versions() {
        let v = new_version().unwrap();
        assert_eq!(v.len(), 32);
        assert!(created_of(&v) > 1_600_000_000);
        let l = format!("k-1/{v}/RSA-OAEP");
        assert_eq!(
            parse_label(&l),
            Some(("k-1".into(), v.clone(), WrapAlg::RsaOaep))
        );
        assert_eq!(parse_label("other-app-key"), None);
        assert_eq!(parse_label(&format!("k/{v}/ECDSA")), None);
    }
}

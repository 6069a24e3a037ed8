//! Entra ID sign-in: the Azure SDK credential for each [`AzureAuth`] kind, all over cmkfs's
//! transport. The client certificate flow signs its RFC 7523 client assertion here (PS256
//! with the certificate's SHA-256 thumbprint in `x5t#S256`, as Microsoft's identity platform
//! documents), with aws-lc-rs, and hands it to the SDK's `ClientAssertionCredential`: the
//! SDK's own certificate credential needs OpenSSL, which cmkfs does not link.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientMethodOptions, ClientOptions, Transport};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertion, ClientAssertionCredential,
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::vault::azure_auth::AzureAuth;
use crate::vault::{Credential, VaultError};

/// Entra ID's public authority.
pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Lifetime of a client assertion, in seconds (Entra accepts up to 10 minutes).
const ASSERTION_LIFETIME: u64 = 600;

fn invalid(what: impl std::fmt::Display) -> VaultError {
    VaultError::Invalid(what.to_string())
}

fn sdk(e: azure_core::Error) -> VaultError {
    invalid(format!("cannot set up the Entra ID sign-in: {e}"))
}

/// The authority: the credential's, else `AZURE_AUTHORITY_HOST`, else the public cloud.
pub(super) fn authority(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("AZURE_AUTHORITY_HOST").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| PUBLIC_AUTHORITY.to_string())
        .trim_end_matches('/')
        .to_string()
}

fn client_options(transport: &Transport, authority_host: Option<&str>) -> ClientOptions {
    let mut o = ClientOptions {
        transport: Some(transport.clone()),
        retry: super::retry(),
        ..Default::default()
    };
    if let Some(h) = authority_host {
        let mut c = CustomConfiguration::default();
        c.authority_host = authority(Some(h));
        o.cloud = Some(Arc::new(CloudConfiguration::from(c)));
    }
    o
}

/// The SDK credential a cmkfs credential signs in with.
pub(super) fn token_credential(
    cred: &Credential,
    transport: &Transport,
) -> Result<Arc<dyn TokenCredential>, VaultError> {
    let Some(auth) = &cred.azure else {
        return Ok(Arc::new(StaticToken(cred.bearer_token())));
    };
    Ok(match auth {
        AzureAuth::BearerToken => Arc::new(StaticToken(cred.bearer_token())),
        AzureAuth::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
            authority_host,
        } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            Secret::new(client_secret.to_string()),
            Some(ClientSecretCredentialOptions {
                client_options: client_options(transport, authority_host.as_deref()),
            }),
        )
        .map_err(sdk)?,
        AzureAuth::ClientCertificate {
            tenant_id,
            client_id,
            certificate,
            authority_host,
        } => {
            let audience = format!(
                "{}/{tenant_id}/oauth2/v2.0/token",
                authority(authority_host.as_deref())
            );
            let assertion = CertificateAssertion::load(certificate, client_id, audience)?;
            ClientAssertionCredential::new(
                tenant_id.clone(),
                client_id.clone(),
                assertion,
                Some(ClientAssertionCredentialOptions {
                    client_options: client_options(
                        transport,
                        Some(&authority(authority_host.as_deref())),
                    ),
                }),
            )
            .map_err(sdk)?
        }
        AzureAuth::ManagedIdentity {
            client_id,
            object_id,
            resource_id,
        } => {
            let user_assigned_id = match (client_id, object_id, resource_id) {
                (Some(c), None, None) => Some(UserAssignedId::ClientId(c.clone())),
                (None, Some(o), None) => Some(UserAssignedId::ObjectId(o.clone())),
                (None, None, Some(r)) => Some(UserAssignedId::ResourceId(r.clone())),
                (None, None, None) => None,
                _ => {
                    return Err(invalid(
                        "a managed identity is named by one of clientId, objectId or resourceId, not several",
                    ))
                }
            };
            let o = ManagedIdentityCredentialOptions {
                user_assigned_id,
                client_options: client_options(transport, None),
            };
            ManagedIdentityCredential::new(Some(o)).map_err(sdk)?
        }
        AzureAuth::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
            authority_host,
        } => {
            let o = WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: client_options(
                        transport,
                        Some(&authority(authority_host.as_deref())),
                    ),
                },
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                token_file_path: token_file.clone(),
            };
            WorkloadIdentityCredential::new(Some(o)).map_err(sdk)?
        }
        AzureAuth::AzureCli { tenant_id } => {
            let o = AzureCliCredentialOptions {
                tenant_id: tenant_id.clone(),
                ..Default::default()
            };
            AzureCliCredential::new(Some(o)).map_err(sdk)?
        }
    })
}

/// A token given in the credential file, sent as it is.
struct StaticToken(Zeroizing<String>);

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(<redacted>)")
    }
}

#[async_trait::async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            Secret::new(self.0.to_string()),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }
}

/// Signs client assertions with a certificate's private key.
pub(crate) struct CertificateAssertion {
    client_id: String,
    audience: String,
    /// base64url SHA-256 of the certificate's DER.
    x5t_s256: String,
    key: aws_lc_rs::rsa::KeyPair,
}

impl std::fmt::Debug for CertificateAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAssertion")
            .field("client_id", &self.client_id)
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

impl CertificateAssertion {
    /// Reads a PEM file holding the certificate and its unencrypted RSA private key; refuses
    /// a file others can read.
    pub(crate) fn load(
        path: &Path,
        client_id: &str,
        audience: String,
    ) -> Result<CertificateAssertion, VaultError> {
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| invalid(format!("cannot read certificate file {shown}: {e}")))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(invalid(format!(
                "certificate file {shown} holds a private key and is readable by others: \
                 chmod 600 {shown}"
            )));
        }
        let pem = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("cannot read certificate file {shown}: {e}")))?,
        );
        CertificateAssertion::from_pem(&pem, client_id, audience)
            .map_err(|e| invalid(format!("certificate file {shown}: {e}")))
    }

    /// The same from PEM text.
    pub(crate) fn from_pem(
        pem: &str,
        client_id: &str,
        audience: String,
    ) -> Result<CertificateAssertion, VaultError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::CertificateDer;
        let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or_else(|| invalid("no CERTIFICATE block"))?
            .map_err(|e| invalid(format!("malformed certificate: {e}")))?;
        let start = pem
            .find("-----BEGIN PRIVATE KEY-----")
            .or_else(|| pem.find("-----BEGIN RSA PRIVATE KEY-----"))
            .ok_or_else(|| {
                invalid("no private key block (expected `BEGIN PRIVATE KEY`, unencrypted)")
            })?;
        let pkcs8 = crate::vault::local::read_private_key(&pem.as_bytes()[start..])?;
        let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| invalid("the private key is not a usable RSA key"))?;
        Ok(CertificateAssertion {
            client_id: client_id.to_string(),
            audience,
            x5t_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(cert.as_ref())),
            key,
        })
    }

    /// A signed assertion for now: header `{alg: PS256, typ: JWT, x5t#S256}`, claims `aud`
    /// (the token endpoint), `iss` = `sub` = client id, `jti`, `nbf`, `iat`, `exp`.
    pub(crate) fn sign(&self, now: u64) -> Result<String, VaultError> {
        let mut jti = [0u8; 16];
        getrandom::getrandom(&mut jti).map_err(|e| VaultError::Store(e.to_string()))?;
        let header = serde_json::json!({"alg": "PS256", "typ": "JWT", "x5t#S256": self.x5t_s256});
        let claims = serde_json::json!({
            "aud": self.audience,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": hex::encode(jti),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PSS_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| VaultError::Store("signing the client assertion failed".into()))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

#[async_trait::async_trait]
impl ClientAssertion for CertificateAssertion {
    async fn secret(
        &self,
        _options: Option<ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.sign(now).map_err(|e| {
            azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e.to_string())
        })
    }
}

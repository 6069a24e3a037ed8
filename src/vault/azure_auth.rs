//! How a credential file signs in to a real Azure Key Vault or Managed HSM with Microsoft
//! Entra ID: the `azure` section of a [`Credential`](super::Credential), read whatever the
//! build; the sign-in itself is the Azure SDK's ([`super::azure`], feature `azure`).
//!
//! ```json
//! {"vault": "https://contoso.vault.azure.net", "identity": "app", "secret": "",
//!  "azure": {"kind": "client-secret", "tenantId": "…", "clientId": "…", "clientSecret": "…"}}
//! ```
//!
//! Kinds (the Azure SDK credential each one uses):
//!
//! | `kind` | fields | SDK credential |
//! |---|---|---|
//! | `client-secret` | `tenantId`, `clientId`, `clientSecret` | `ClientSecretCredential` |
//! | `client-certificate` | `tenantId`, `clientId`, `certificate` (PEM file: certificate + unencrypted private key) | `ClientAssertionCredential` with a signed assertion (RFC 7523, `PS256`, `x5t#S256`) |
//! | `managed-identity` | optional `clientId`, `objectId` or `resourceId` (user-assigned) | `ManagedIdentityCredential` (App Service `IDENTITY_ENDPOINT` or IMDS) |
//! | `workload-identity` | optional `tenantId`, `clientId`, `tokenFile` (else `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`) | `WorkloadIdentityCredential` |
//! | `azure-cli` | optional `tenantId` | `AzureCliCredential` (`az account get-access-token`) |
//! | `bearer-token` | the credential's `secret` is the token | a static token (cmkfs servers, tests) |
//!
//! `authorityHost` (default `https://login.microsoftonline.com`, or `AZURE_AUTHORITY_HOST`)
//! selects a sovereign cloud or a private authority; it must be https.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The Entra ID sign-in of a credential file (see the module docs).
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AzureAuth {
    /// A service principal with a client secret.
    #[serde(rename_all = "camelCase")]
    ClientSecret {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The client secret. Never logged.
        #[serde(with = "zeroizing_string")]
        client_secret: Zeroizing<String>,
        /// Entra ID authority, e.g. `https://login.microsoftonline.us`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority_host: Option<String>,
    },
    /// A service principal with a certificate.
    #[serde(rename_all = "camelCase")]
    ClientCertificate {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// PEM file with the certificate and its unencrypted private key (0600).
        certificate: PathBuf,
        /// Entra ID authority.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority_host: Option<String>,
    },
    /// The managed identity of the machine (system-assigned, or the user-assigned one named).
    #[serde(rename_all = "camelCase")]
    ManagedIdentity {
        /// Client id of a user-assigned identity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// Object (principal) id of a user-assigned identity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object_id: Option<String>,
        /// Azure resource id of a user-assigned identity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource_id: Option<String>,
    },
    /// Kubernetes workload identity federation (a projected service account token).
    #[serde(rename_all = "camelCase")]
    WorkloadIdentity {
        /// Directory (tenant) id; default `AZURE_TENANT_ID`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
        /// Application (client) id; default `AZURE_CLIENT_ID`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// The federated token file; default `AZURE_FEDERATED_TOKEN_FILE`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_file: Option<PathBuf>,
        /// Entra ID authority; default `AZURE_AUTHORITY_HOST`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority_host: Option<String>,
    },
    /// The account `az login` signed in.
    #[serde(rename_all = "camelCase")]
    AzureCli {
        /// Tenant to get the token for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
    },
    /// The credential's `secret` is sent as the bearer token as it is.
    BearerToken,
}

impl AzureAuth {
    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            AzureAuth::ClientSecret { .. } => "client-secret",
            AzureAuth::ClientCertificate { .. } => "client-certificate",
            AzureAuth::ManagedIdentity { .. } => "managed-identity",
            AzureAuth::WorkloadIdentity { .. } => "workload-identity",
            AzureAuth::AzureCli { .. } => "azure-cli",
            AzureAuth::BearerToken => "bearer-token",
        }
    }
}

impl fmt::Debug for AzureAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the kind: ids are not secret, but nothing here needs printing either.
        f.debug_struct("AzureAuth")
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

/// Whether a vault URL is a real Azure Key Vault or Managed HSM (public and sovereign
/// clouds), which cmkfs reaches through the Azure SDK.
pub fn is_azure_url(url: &str) -> bool {
    const SUFFIXES: [&str; 8] = [
        ".vault.azure.net",
        ".managedhsm.azure.net",
        ".vault.azure.cn",
        ".managedhsm.azure.cn",
        ".vault.usgovcloudapi.net",
        ".managedhsm.usgovcloudapi.net",
        ".vault.microsoftazure.de",
        ".vault.cloudapi.de",
    ];
    let host = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .split(['/', ':'])
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    SUFFIXES.iter().any(|s| host.ends_with(s))
}

mod zeroizing_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(v: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
        String::deserialize(d).map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_hosts_are_recognized() {
        assert!(is_azure_url("https://contoso.vault.azure.net"));
        assert!(is_azure_url("https://contoso.managedhsm.azure.net/"));
        assert!(is_azure_url("https://x.vault.usgovcloudapi.net:443"));
        assert!(!is_azure_url("https://vault.azure.net.evil.example"));
        assert!(!is_azure_url("https://127.0.0.1:8443"));
    }

    #[test]
    fn parses_and_hides_secrets() {
        let a: AzureAuth = serde_json::from_str(
            r#"{"kind":"client-secret","tenantId":"t","clientId":"c","clientSecret":"s3cr3t"}"#,
        )
        .unwrap();
        assert_eq!(a.kind(), "client-secret");
        assert!(!format!("{a:?}").contains("s3cr3t"));
        let m: AzureAuth = serde_json::from_str(r#"{"kind":"managed-identity"}"#).unwrap();
        assert_eq!(m.kind(), "managed-identity");
        assert!(serde_json::from_str::<AzureAuth>(r#"{"kind":"nope"}"#).is_err());
    }
}

//! The HTTP transport the Azure SDK clients and credentials use: the SDK's own (`reqwest`,
//! through `azure_core`'s `HttpClient` trait) built here with rustls over aws-lc-rs, no
//! redirects (a bearer token must not travel elsewhere), and the credential's pinned CA when
//! it names one (the system's roots otherwise). It also honours
//! `AZURE_POD_IDENTITY_AUTHORITY_HOST`, as the other Azure SDKs do: managed-identity requests
//! to the fixed IMDS address go to that host instead (AAD Pod Identity, and tests).

use std::sync::Arc;
use std::time::Duration;

use azure_core::http::{AsyncRawResponse, HttpClient, Request, Transport, Url};

use crate::vault::VaultError;

/// The fixed address of the Instance Metadata Service.
const IMDS_HOST: &str = "169.254.169.254";
/// Connection set-up limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit of one request (token endpoints and Key Vault answer in well under this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The transport: reqwest plus the IMDS redirect.
#[derive(Debug)]
pub(super) struct CmkfsTransport {
    inner: reqwest::Client,
    imds: Option<Url>,
}

fn rustls_config(ca_pem: &str) -> Result<rustls::ClientConfig, VaultError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert =
            cert.map_err(|e| VaultError::Invalid(format!("the pinned CA is not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| VaultError::Invalid(format!("the pinned CA is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(VaultError::Invalid(
            "the pinned CA holds no certificate".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VaultError::Invalid(format!("TLS set-up: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl CmkfsTransport {
    /// A transport trusting `ca_pem` only, or the system's roots without it.
    pub(super) fn new(ca_pem: Option<&str>) -> Result<CmkfsTransport, VaultError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cmkfs/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            b = b.tls_backend_preconfigured(rustls_config(pem)?);
        }
        let inner = b
            .build()
            .map_err(|e| VaultError::Invalid(format!("cannot set up HTTPS: {e}")))?;
        let imds = match std::env::var("AZURE_POD_IDENTITY_AUTHORITY_HOST") {
            Ok(h) if !h.is_empty() => Some(Url::parse(&h).map_err(|e| {
                VaultError::Invalid(format!("AZURE_POD_IDENTITY_AUTHORITY_HOST {h:?}: {e}"))
            })?),
            _ => None,
        };
        Ok(CmkfsTransport { inner, imds })
    }

    /// As the SDK's `Transport`.
    pub(super) fn into_sdk(self) -> Transport {
        Transport::new(Arc::new(self))
    }
}

#[async_trait::async_trait]
impl HttpClient for CmkfsTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        match &self.imds {
            Some(to) if request.url().host_str() == Some(IMDS_HOST) => {
                let mut r = request.clone();
                let url = r.url_mut();
                let _ = url.set_scheme(to.scheme());
                let _ = url.set_host(to.host_str());
                let _ = url.set_port(to.port());
                self.inner.execute_request(&r).await
            }
            _ => self.inner.execute_request(request).await,
        }
    }
}

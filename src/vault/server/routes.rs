//! The route table of the keys API: every path and method of the service's swagger
//! (`keys.json`, api-version 2025-07-01), parsed by hand so that trailing slashes and empty
//! versions (`/keys/k/`, `/keys/k//wrapkey`, as the Azure SDKs send them) are accepted.
//!
//! A path the table knows under another method is a 405; a path it does not know is a 404
//! (see `api.rs`). An operation newer than the request's api-version is refused with 400.

use axum::http::Method;

use super::wire::api_version_rank;

/// One operation of the keys API (plus the cmkfs watch extension).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum Route<'a> {
    ListKeys,
    Create(&'a str),
    Import(&'a str),
    Get(&'a str, Option<&'a str>),
    Versions(&'a str),
    Update(&'a str, Option<&'a str>),
    Delete(&'a str),
    Rotate(&'a str),
    Wrap(&'a str, Option<&'a str>),
    Unwrap(&'a str, Option<&'a str>),
    Encrypt(&'a str, Option<&'a str>),
    Decrypt(&'a str, Option<&'a str>),
    Sign(&'a str, Option<&'a str>),
    Verify(&'a str, Option<&'a str>),
    Release(&'a str, Option<&'a str>),
    Attestation(&'a str, Option<&'a str>),
    Backup(&'a str),
    Restore,
    GetPolicy(&'a str),
    SetPolicy(&'a str),
    Random,
    ListDeleted,
    GetDeleted(&'a str),
    Recover(&'a str),
    Purge(&'a str),
    Watch,
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// The methods any route uses (for telling 405 from 404).
pub(super) const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

impl<'a> Route<'a> {
    /// The route of a method and path segments, if any.
    pub(super) fn parse(method: &Method, segs: &[&'a str]) -> Option<Route<'a>> {
        let m = method.as_str();
        Some(match (m, segs) {
            ("GET", ["keys"] | ["keys", ""]) => Route::ListKeys,
            ("POST", ["keys", "restore"]) => Route::Restore,
            ("POST", ["keys", n, "create"]) => Route::Create(n),
            ("POST", ["keys", n, "rotate"]) => Route::Rotate(n),
            ("POST", ["keys", n, "backup"]) => Route::Backup(n),
            ("GET", ["keys", n, "rotationpolicy"]) => Route::GetPolicy(n),
            ("PUT", ["keys", n, "rotationpolicy"]) => Route::SetPolicy(n),
            ("GET", ["keys", n, "versions"]) => Route::Versions(n),
            ("PUT", ["keys", n]) => Route::Import(n),
            ("DELETE", ["keys", n]) => Route::Delete(n),
            ("GET", ["keys", n] | ["keys", n, ""]) => Route::Get(n, None),
            ("GET", ["keys", n, v]) => Route::Get(n, Some(v)),
            ("PATCH", ["keys", n] | ["keys", n, ""]) => Route::Update(n, None),
            ("PATCH", ["keys", n, v]) => Route::Update(n, Some(v)),
            ("GET", ["keys", n, v, "attestation"]) => Route::Attestation(n, version(v)),
            ("POST", ["keys", n, v, op]) => {
                let v = version(v);
                match *op {
                    "wrapkey" => Route::Wrap(n, v),
                    "unwrapkey" => Route::Unwrap(n, v),
                    "encrypt" => Route::Encrypt(n, v),
                    "decrypt" => Route::Decrypt(n, v),
                    "sign" => Route::Sign(n, v),
                    "verify" => Route::Verify(n, v),
                    "release" => Route::Release(n, v),
                    _ => return None,
                }
            }
            ("POST", ["rng"]) => Route::Random,
            ("GET", ["deletedkeys"] | ["deletedkeys", ""]) => Route::ListDeleted,
            ("GET", ["deletedkeys", n]) => Route::GetDeleted(n),
            ("DELETE", ["deletedkeys", n]) => Route::Purge(n),
            ("POST", ["deletedkeys", n, "recover"]) => Route::Recover(n),
            ("GET", ["cmkfs", "watch"]) => Route::Watch,
            _ => return None,
        })
    }

    /// Whether the request carries a JSON body.
    pub(super) fn has_body(&self) -> bool {
        matches!(
            self,
            Route::Create(_)
                | Route::Import(_)
                | Route::Update(..)
                | Route::Wrap(..)
                | Route::Unwrap(..)
                | Route::Encrypt(..)
                | Route::Decrypt(..)
                | Route::Sign(..)
                | Route::Verify(..)
                | Route::Release(..)
                | Route::Restore
                | Route::SetPolicy(_)
                | Route::Random
        )
    }

    /// The first api-version that has the operation.
    pub(super) fn since(&self) -> &'static str {
        match self {
            Route::Rotate(_)
            | Route::GetPolicy(_)
            | Route::SetPolicy(_)
            | Route::Random
            | Route::Release(..) => "7.3",
            Route::Attestation(..) => "7.6",
            _ => "7.0",
        }
    }

    /// Whether the operation exists in api-version `v` (a known one).
    pub(super) fn in_version(&self, v: &str) -> bool {
        api_version_rank(v) >= api_version_rank(self.since())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(m: Method, path: &'static str) -> Option<Route<'static>> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let segs: &'static [&'static str] = Box::leak(segs.into_boxed_slice());
        Route::parse(&m, segs)
    }

    #[test]
    fn every_operation_routes() {
        assert_eq!(p(Method::GET, "/keys"), Some(Route::ListKeys));
        assert_eq!(p(Method::GET, "/keys/"), Some(Route::ListKeys));
        assert_eq!(p(Method::GET, "/keys/k/"), Some(Route::Get("k", None)));
        assert_eq!(
            p(Method::GET, "/keys/k/v1"),
            Some(Route::Get("k", Some("v1")))
        );
        assert_eq!(
            p(Method::GET, "/keys/k/versions"),
            Some(Route::Versions("k"))
        );
        assert_eq!(p(Method::PATCH, "/keys/k/"), Some(Route::Update("k", None)));
        assert_eq!(
            p(Method::POST, "/keys/k//wrapkey"),
            Some(Route::Wrap("k", None))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/unwrapkey"),
            Some(Route::Unwrap("k", Some("v")))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/sign"),
            Some(Route::Sign("k", Some("v")))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/verify"),
            Some(Route::Verify("k", Some("v")))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/encrypt"),
            Some(Route::Encrypt("k", Some("v")))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/decrypt"),
            Some(Route::Decrypt("k", Some("v")))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/release"),
            Some(Route::Release("k", Some("v")))
        );
        assert_eq!(
            p(Method::GET, "/keys/k/v/attestation"),
            Some(Route::Attestation("k", Some("v")))
        );
        assert_eq!(p(Method::POST, "/keys/k/backup"), Some(Route::Backup("k")));
        assert_eq!(p(Method::POST, "/keys/restore"), Some(Route::Restore));
        assert_eq!(
            p(Method::GET, "/keys/k/rotationpolicy"),
            Some(Route::GetPolicy("k"))
        );
        assert_eq!(
            p(Method::PUT, "/keys/k/rotationpolicy"),
            Some(Route::SetPolicy("k"))
        );
        assert_eq!(p(Method::POST, "/rng"), Some(Route::Random));
        assert_eq!(p(Method::DELETE, "/deletedkeys/k"), Some(Route::Purge("k")));
        assert_eq!(p(Method::GET, "/secrets/x"), None);
        assert_eq!(p(Method::POST, "/keys/k/v/frobnicate"), None);
    }

    #[test]
    fn versions_gate_newer_operations() {
        assert!(Route::Rotate("k").in_version("7.3"));
        assert!(!Route::Rotate("k").in_version("7.2"));
        assert!(Route::Rotate("k").in_version("2025-07-01"));
        assert!(!Route::Attestation("k", None).in_version("7.5"));
        assert!(Route::Wrap("k", None).in_version("7.0"));
    }
}

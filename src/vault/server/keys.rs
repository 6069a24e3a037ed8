//! Key lifecycle routes: list (paged), versions (paged), get, create, import, update, delete,
//! rotate; and the conversions from vault facts to the wire shapes every family uses.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::api::{blocking, json, parse, ApiError, Call};
use super::jwk;
use super::wire::{
    DeletedKeyBundle, DeletedKeyItem, KeyAttributes, KeyAttributesUpdate, KeyBundle,
    KeyCreateParameters, KeyImportParameters, KeyItem, KeyUpdateParameters, Page, WRAP_ALG_TAG,
};
use crate::vault::{
    all_key_ops, validate_tags, CreateKeyOptions, DeletedKeyInfo, ImportKeyOptions, KeyInfo,
    KeyUpdate, Vault, WrapAlg,
};

/// Items per page when the request names no `maxresults` (the service's default and most).
pub(super) const PAGE_MAX: usize = 25;

pub(super) fn kid(base: &str, name: &str, version: &str) -> String {
    format!("{base}/keys/{name}/{version}")
}

fn attributes(k: &KeyInfo) -> KeyAttributes {
    KeyAttributes {
        enabled: Some(k.enabled),
        nbf: k.nbf,
        exp: k.exp,
        created: Some(k.created),
        updated: Some(k.updated),
        recovery_level: Some(k.recovery_level.clone()),
        recoverable_days: Some(k.recoverable_days),
        exportable: Some(false),
    }
}

/// The version's application tags plus cmkfs's wrap-algorithm tag.
fn tags(k: &KeyInfo) -> BTreeMap<String, String> {
    let mut t = k.tags.clone();
    t.insert(WRAP_ALG_TAG.to_string(), k.wrap_alg.to_string());
    t
}

pub(super) fn bundle(base: &str, k: &KeyInfo) -> KeyBundle {
    KeyBundle {
        key: super::wire::JsonWebKey {
            kid: Some(kid(base, &k.name, &k.version)),
            kty: k.kty.clone(),
            key_ops: k.key_ops.clone(),
            n: Some(k.n.clone()),
            e: Some(k.e.clone()),
            ..Default::default()
        },
        attributes: attributes(k),
        tags: tags(k),
    }
}

fn item(base: &str, k: &KeyInfo, versioned: bool) -> KeyItem {
    KeyItem {
        kid: if versioned {
            kid(base, &k.name, &k.version)
        } else {
            format!("{base}/keys/{}", k.name)
        },
        attributes: attributes(k),
        tags: tags(k),
        managed: None,
    }
}

pub(super) fn deleted_bundle(base: &str, d: &DeletedKeyInfo) -> DeletedKeyBundle {
    DeletedKeyBundle {
        bundle: bundle(base, &d.key),
        recovery_id: format!("{base}/deletedkeys/{}", d.key.name),
        deleted_date: Some(d.deleted_date),
        scheduled_purge_date: Some(d.scheduled_purge_date),
    }
}

pub(super) fn deleted_item(base: &str, d: &DeletedKeyInfo) -> DeletedKeyItem {
    DeletedKeyItem {
        item: item(base, &d.key, false),
        recovery_id: format!("{base}/deletedkeys/{}", d.key.name),
        deleted_date: Some(d.deleted_date),
        scheduled_purge_date: Some(d.scheduled_purge_date),
    }
}

/// Application tags.
type Tags = BTreeMap<String, String>;

/// Splits user tags from cmkfs's wrap-algorithm tag; checks Key Vault's tag limits.
fn user_tags(tags: Option<Tags>) -> Result<(Option<Tags>, Option<WrapAlg>), ApiError> {
    let Some(mut t) = tags else {
        return Ok((None, None));
    };
    let alg = match t.remove(WRAP_ALG_TAG) {
        Some(a) => Some(super::api::parse_alg(&a)?),
        None => None,
    };
    validate_tags(&t)?;
    Ok((Some(t), alg))
}

fn key_update(
    key_ops: Option<Vec<String>>,
    a: Option<KeyAttributesUpdate>,
    tags: Option<BTreeMap<String, String>>,
) -> KeyUpdate {
    let a = a.unwrap_or_default();
    KeyUpdate {
        enabled: a.enabled,
        nbf: a.nbf,
        exp: a.exp,
        key_ops,
        tags,
    }
}

/// Whether an update asks for anything a new version does not already have.
fn changes_new_version(u: &KeyUpdate, new_ops: &[String]) -> bool {
    u.enabled == Some(false)
        || matches!(u.nbf, Some(Some(_)))
        || matches!(u.exp, Some(Some(_)))
        || u.key_ops.as_ref().is_some_and(|o| o != new_ops)
        || u.tags.as_ref().is_some_and(|t| !t.is_empty())
}

/// One page of `items` (sorted by `key`): `maxresults` (1-25, default 25) and the opaque
/// `$skiptoken` of the previous page's `nextLink`.
pub(super) fn page<T>(
    call: &Call,
    path: &str,
    items: Vec<T>,
    key: impl Fn(&T) -> String,
) -> Result<Page<T>, ApiError> {
    let max = match call.query.get("maxresults") {
        None => PAGE_MAX,
        Some(m) => match m.parse::<usize>() {
            Ok(n) if (1..=PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad(format!(
                    "maxresults must be a number from 1 to {PAGE_MAX}, not {m:?}"
                )))
            }
        },
    };
    let after = match call.query.get("$skiptoken") {
        None => None,
        Some(t) => Some(
            URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::bad("$skiptoken is not one this server issued"))?,
        ),
    };
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| after.as_ref().is_none_or(|a| key(i) > *a))
        .collect();
    let more = rest.len() > max;
    rest.truncate(max);
    let next_link = match rest.last() {
        Some(last) if more => Some(format!(
            "{}{path}?api-version={}&$skiptoken={}&maxresults={max}",
            call.base,
            call.api_version,
            URL_SAFE_NO_PAD.encode(key(last))
        )),
        _ => None,
    };
    Ok(Page {
        value: rest,
        next_link,
    })
}

pub(super) async fn list(call: Call) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let keys = blocking(move || conn.list_keys()).await?;
    let items = keys.iter().map(|k| item(&call.base, k, false)).collect();
    let p = page(&call, "/keys", items, |i: &KeyItem| i.kid.clone())?;
    Ok(json(StatusCode::OK, &p))
}

pub(super) async fn versions(call: Call, name: String) -> Result<Response, ApiError> {
    let (conn, n) = (call.conn.clone(), name.clone());
    let keys = blocking(move || conn.list_key_versions(&n)).await?;
    // Oldest first; the page key is the position, zero-padded so that it sorts.
    let items: Vec<(String, KeyItem)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("{i:08}"), item(&call.base, k, true)))
        .collect();
    let p = page(&call, &format!("/keys/{name}/versions"), items, |i| {
        i.0.clone()
    })?;
    Ok(json(
        StatusCode::OK,
        &Page {
            value: p.value.into_iter().map(|i| i.1).collect(),
            next_link: p.next_link,
        },
    ))
}

pub(super) async fn get(call: Call, name: String, v: Option<String>) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let k = blocking(move || conn.get_key(&name, v.as_deref())).await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

pub(super) async fn create(call: Call, name: String) -> Result<Response, ApiError> {
    let p: KeyCreateParameters = parse(&call.body)?;
    if !matches!(p.kty.as_str(), "RSA" | "RSA-HSM") {
        return Err(ApiError::bad(format!(
            "key type {:?} is not supported: only RSA (RSA-HSM) keys",
            p.kty
        )));
    }
    if p.public_exponent.is_some_and(|e| e != 65537) {
        return Err(ApiError::bad("only the public exponent 65537 is supported"));
    }
    let (tags, alg) = user_tags(p.tags)?;
    let opts = CreateKeyOptions {
        key_size: p.key_size.unwrap_or(2048),
        wrap_alg: alg.unwrap_or_default(),
    };
    // No key_ops in the request: Key Vault's default for RSA keys, all six.
    let upd = key_update(
        Some(p.key_ops.unwrap_or_else(all_key_ops)),
        p.attributes,
        tags,
    );
    let conn = call.conn.clone();
    let k = blocking(move || {
        let k = conn.create_key(&name, &opts)?;
        if changes_new_version(&upd, &k.key_ops) {
            return conn.update_key(&name, Some(&k.version), &upd);
        }
        Ok(k)
    })
    .await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

pub(super) async fn import(call: Call, name: String) -> Result<Response, ApiError> {
    let mut p: KeyImportParameters = parse(&call.body)?;
    let pkcs1 = jwk::pkcs1_from_jwk(&p.key);
    let key_ops = std::mem::take(&mut p.key.key_ops);
    jwk::zeroize_private(&mut p.key);
    let der = crate::vault::local::read_private_key(&pkcs1?)?;
    let (tags, alg) = user_tags(p.tags)?;
    let opts = ImportKeyOptions { wrap_alg: alg };
    let ops = if key_ops.is_empty() {
        all_key_ops()
    } else {
        key_ops
    };
    let upd = key_update(Some(ops), p.attributes, tags);
    let conn = call.conn.clone();
    let k = blocking(move || {
        let k = conn.import_key(&name, &der, &opts)?;
        if changes_new_version(&upd, &k.key_ops) {
            return conn.update_key(&name, Some(&k.version), &upd);
        }
        Ok(k)
    })
    .await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

pub(super) async fn update(
    call: Call,
    name: String,
    v: Option<String>,
) -> Result<Response, ApiError> {
    let p: KeyUpdateParameters = parse(&call.body)?;
    let (tags, alg) = user_tags(p.tags)?;
    let upd = key_update(p.key_ops, p.attributes, tags);
    let conn = call.conn.clone();
    let k = blocking(move || {
        if let Some(alg) = alg {
            // The wrap algorithm is per key and fixed: a tag may repeat it, not change it.
            let k = conn.describe_key(&name, v.as_deref())?;
            if k.wrap_alg != alg {
                return Err(crate::vault::VaultError::Invalid(format!(
                    "key {name} wraps with {}: the {WRAP_ALG_TAG} tag cannot change it",
                    k.wrap_alg
                )));
            }
        }
        conn.update_key(&name, v.as_deref(), &upd)
    })
    .await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

pub(super) async fn delete(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let d = blocking(move || conn.delete_key(&name)).await?;
    Ok(json(StatusCode::OK, &deleted_bundle(&call.base, &d)))
}

pub(super) async fn rotate(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let k = blocking(move || conn.rotate_key(&name)).await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

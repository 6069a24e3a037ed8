//! Soft-deleted key routes: list (paged), get, recover, purge.

use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};

use super::api::{blocking, json, ApiError, Call};
use super::keys::{bundle, deleted_bundle, deleted_item, page};
use super::wire::DeletedKeyItem;
use crate::vault::Vault;

pub(super) async fn list(call: Call) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let ds = blocking(move || conn.list_deleted_keys()).await?;
    let items = ds.iter().map(|d| deleted_item(&call.base, d)).collect();
    let p = page(&call, "/deletedkeys", items, |i: &DeletedKeyItem| {
        i.recovery_id.clone()
    })?;
    Ok(json(StatusCode::OK, &p))
}

pub(super) async fn get(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let d = blocking(move || conn.get_deleted_key(&name)).await?;
    Ok(json(StatusCode::OK, &deleted_bundle(&call.base, &d)))
}

pub(super) async fn recover(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let k = blocking(move || conn.recover_deleted_key(&name)).await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

pub(super) async fn purge(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    blocking(move || conn.purge_deleted_key(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

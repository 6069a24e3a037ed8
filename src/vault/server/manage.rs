//! Key management routes: backup, restore, and the rotation policy (get/update). The
//! policies are applied by the server's own timer ([`apply_loop`]).

use std::path::PathBuf;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::api::{blocking, decode_b64url, json, parse, ApiError, Call};
use super::keys::bundle;
use super::wire::{
    KeyBackupBlob, KeyRotationPolicy, KeyRotationPolicyAttributes, LifetimeActions,
    LifetimeActionsTrigger, LifetimeActionsType,
};
use crate::vault::local::policy::{LifetimeAction, PolicyAction, RotationPolicy};
use crate::vault::local::LocalVault;

pub(super) async fn backup(call: Call, name: String) -> Result<Response, ApiError> {
    let conn = call.conn.clone();
    let blob = blocking(move || conn.backup_key(&name)).await?;
    Ok(json(
        StatusCode::OK,
        &KeyBackupBlob {
            value: URL_SAFE_NO_PAD.encode(blob),
        },
    ))
}

pub(super) async fn restore(call: Call) -> Result<Response, ApiError> {
    let p: KeyBackupBlob = parse(&call.body)?;
    let blob = decode_b64url(&p.value)?;
    let conn = call.conn.clone();
    let k = blocking(move || conn.restore_key(&blob)).await?;
    Ok(json(StatusCode::OK, &bundle(&call.base, &k)))
}

fn to_wire(base: &str, name: &str, p: &RotationPolicy) -> KeyRotationPolicy {
    KeyRotationPolicy {
        id: Some(format!("{base}/keys/{name}/rotationpolicy")),
        lifetime_actions: p
            .actions
            .iter()
            .map(|a| LifetimeActions {
                trigger: LifetimeActionsTrigger {
                    time_after_create: a.time_after_create.clone(),
                    time_before_expiry: a.time_before_expiry.clone(),
                },
                action: LifetimeActionsType {
                    kind: a.action.as_str().into(),
                },
            })
            .collect(),
        attributes: Some(KeyRotationPolicyAttributes {
            expiry_time: p.expiry_time.clone(),
            created: p.created,
            updated: p.updated,
        }),
    }
}

fn from_wire(w: KeyRotationPolicy) -> Result<RotationPolicy, ApiError> {
    let mut actions = Vec::new();
    for a in w.lifetime_actions {
        actions.push(LifetimeAction {
            action: PolicyAction::parse(&a.action.kind)?,
            time_after_create: a.trigger.time_after_create,
            time_before_expiry: a.trigger.time_before_expiry,
        });
    }
    Ok(RotationPolicy {
        actions,
        expiry_time: w.attributes.and_then(|a| a.expiry_time),
        created: None,
        updated: None,
    })
}

pub(super) async fn get_policy(call: Call, name: String) -> Result<Response, ApiError> {
    let (conn, n) = (call.conn.clone(), name.clone());
    let p = blocking(move || conn.get_rotation_policy(&n)).await?;
    Ok(json(StatusCode::OK, &to_wire(&call.base, &name, &p)))
}

pub(super) async fn set_policy(call: Call, name: String) -> Result<Response, ApiError> {
    let w: KeyRotationPolicy = parse(&call.body)?;
    let policy = from_wire(w)?;
    let (conn, n) = (call.conn.clone(), name.clone());
    let p = blocking(move || conn.set_rotation_policy(&n, &policy)).await?;
    Ok(json(StatusCode::OK, &to_wire(&call.base, &name, &p)))
}

/// Applies due rotation policies every `every`, as the vault's owner, until `stop`.
pub(super) async fn apply_loop(
    store: PathBuf,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let store = store.clone();
        let done = tokio::task::spawn_blocking(move || {
            LocalVault::open(&store).and_then(|v| v.apply_rotation_policies())
        })
        .await;
        match done {
            Ok(Ok(made)) => {
                for k in made {
                    tracing::info!(kid = %k.kid, "rotation policy made a new key version");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "applying rotation policies failed"),
            Err(e) => tracing::warn!(error = %e, "the rotation policy task failed"),
        }
    }
}

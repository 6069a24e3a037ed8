//! Every integration test in one binary: one crate to compile and link instead of one per
//! file (the cold CI build links this once). Modules are the former test files; run one
//! with `cargo nextest run -E 'test(/^NAME::/)'` or `cargo test --test suite NAME::`.

mod common;
mod vault_support;

mod azure_client;
mod backup;
mod backup_cached;
mod backup_chain;
mod backup_damaged;
mod backup_drain;
mod backup_freeze;
mod backup_held_writes;
mod content_model;
mod crash;
mod des;
mod engine;
mod errno_parity;
mod hostile_entries;
mod hostile_header;
mod memory;
mod model;
mod mount_basic;
mod mount_corrupt;
mod mount_direct;
mod mount_dirid_sync;
mod mount_errors;
mod mount_format_v3;
mod mount_guards;
mod mount_listing;
mod mount_meta;
mod mount_pkcs11;
mod mount_security;
mod mount_uring;
mod mount_writeout;
mod posix;
mod posix_ext4;
mod private_logs;
mod reencrypt;
mod reencrypt_online;
mod reencrypt_safety;
mod revocation;
mod security;
mod tails;
mod upgrade;
mod vault_keys_api;
mod vault_local;
mod vault_mount;
mod vault_pkcs11;
mod vault_seal;
mod vault_server;
mod vault_server_hardening;
mod xts;

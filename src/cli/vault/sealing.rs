//! `cmkfs vault seal`, `unseal`, `lock`, `change-passphrase`: the embedded vault's master key
//! and passphrase.

use super::*;

#[derive(Args, Debug)]
pub(super) struct SealArgs {
    /// Argon2id cost of a new seal: `default` (64 MiB, t=3, p=4), or m=KIB,t=N,p=N
    /// (default: $CMKFS_VAULT_KDF, else `default`). A vault already sealed keeps its cost:
    /// change it with `cmkfs vault change-passphrase --kdf`.
    #[arg(long, value_name = "PARAMS")]
    kdf: Option<String>,
    /// Also cache the master key in the kernel keyring this long (so that mounts started
    /// before the seal keep working), at most 24h; by default nothing is cached.
    #[arg(long, value_parser = parse_cache_time)]
    cache_for: Option<Duration>,
}

/// Longest time the kernel keyring keeps an unsealed master key (`vault unseal --timeout`,
/// `vault seal --cache-for`): a day. A cache is a trade of safety for convenience; one that
/// outlives a working day is a vault left open.
pub const MAX_CACHE_TIME: Duration = Duration::from_secs(24 * 3600);

fn parse_cache_time(s: &str) -> Result<Duration, String> {
    let d = crate::cli::volume::parse_duration(s)?;
    if d > MAX_CACHE_TIME {
        return Err(format!(
            "{s} is longer than the {} cmkfs keeps an unsealed key cached (use `cmkfs vault \
             unseal` again when it runs out)",
            humantime::format_duration(MAX_CACHE_TIME)
        ));
    }
    Ok(d)
}

#[derive(Args, Debug)]
pub(super) struct UnsealArgs {
    /// How long the kernel keeps the key before it times out (at most 24h).
    #[arg(long, default_value = "15m", value_parser = parse_cache_time)]
    timeout: Duration,
}

#[derive(Args, Debug)]
pub(super) struct ChangePassphraseArgs {
    /// Read the new passphrase from this file (else asked twice on the terminal); the old
    /// one comes from --passphrase-file, $CMKFS_PASSPHRASE_FILE or the terminal.
    #[arg(long, value_name = "FILE")]
    new_passphrase_file: Option<PathBuf>,
    /// Argon2id cost for the new wrap (default: the same as before... see `vault seal --kdf`).
    #[arg(long, value_name = "PARAMS")]
    kdf: Option<String>,
}

fn kdf_arg(kdf: Option<&str>) -> anyhow::Result<KdfParams> {
    Ok(match kdf {
        Some(k) => KdfParams::parse(k)?,
        None => unlock::kdf_params()?,
    })
}

/// `cmkfs vault seal`.
pub(super) fn seal(home: &Home, a: SealArgs) -> anyhow::Result<()> {
    let kdf = kdf_arg(a.kdf.as_deref())?;
    if let (Some(given), Some(rec)) = (&a.kdf, seal::read_record(&home.vault_dir())?) {
        if rec.kdf() != kdf {
            bail!(
                "the vault {} is already sealed with {}; --kdf only sets the cost of a new \
                 seal: to change it, run `cmkfs vault change-passphrase --kdf {given}`",
                home.vault_dir().display(),
                rec.kdf()
            );
        }
    }
    crate::vault::local::suppress_unsealed_warning();
    let vault = LocalVault::open(&home.vault_dir())?;
    let cred_dir = home.root().join("credentials");
    let report = vault.seal(Some(&cred_dir), kdf)?;
    let store = home.vault_dir();
    if report.resumed && report.sealed_files == 0 {
        println!(
            "the vault {} is sealed (nothing left in clear)",
            store.display()
        );
    } else {
        println!(
            "sealed the vault {}: {} file(s) rewritten sealed{}",
            store.display(),
            report.sealed_files,
            if report.resumed {
                " (an earlier seal finished)"
            } else {
                ""
            }
        );
    }
    if let Some(rec) = seal::read_record(&store)? {
        if rec.kdf().memory_kib < KdfParams::DEFAULT.memory_kib / 4 {
            eprintln!(
                "cmkfs: warning: the passphrase is stretched with {} only: a stolen disk's \
                 passphrase is cheap to guess (use --kdf default for real data)",
                rec.kdf()
            );
        }
    }
    match a.cache_for.filter(|d| !d.is_zero()) {
        Some(d) => {
            if let Some(mk) = seal::master_key(&store)? {
                match unlock::keyring_store(&mk, d.as_secs()) {
                    Ok(()) => println!(
                        "the master key stays in the kernel keyring for {} (running mounts \
                         pick it up); `cmkfs vault lock` drops it now",
                        humantime::format_duration(d)
                    ),
                    Err(e) => eprintln!("cmkfs: warning: {e}"),
                }
            }
        }
        // Only a store that was in clear until now can have mounts that never needed the key.
        None if !report.resumed => println!(
            "mounts and servers started before this seal need the master key at their next key \
             use: give it to them with `cmkfs vault unseal` (or seal with --cache-for 15m)"
        ),
        None => {}
    }
    Ok(())
}

/// `cmkfs vault unseal`.
pub(super) fn unseal(home: &Home, a: UnsealArgs) -> anyhow::Result<()> {
    let store = home.vault_dir();
    let mk = seal::master_key_from_passphrase(&store)?;
    let secs = a.timeout.as_secs().max(1);
    unlock::keyring_store(&mk, secs)?;
    println!(
        "unsealed the vault {} for {} (kernel keyring: cmkfs:vault:{}); `cmkfs vault lock` seals it again",
        store.display(),
        humantime::format_duration(Duration::from_secs(secs)),
        mk.id()
    );
    Ok(())
}

/// `cmkfs vault lock`.
pub(super) fn lock(home: &Home) -> anyhow::Result<()> {
    let store = home.vault_dir();
    let Some(rec) = seal::read_record(&store)? else {
        bail!(
            "the vault {} is not sealed, so there is nothing to lock: seal it with `cmkfs vault seal`",
            store.display()
        );
    };
    if unlock::keyring_drop(&rec.id)? {
        println!(
            "locked the vault {}: the cached master key is gone from the kernel keyring",
            store.display()
        );
    } else {
        println!(
            "the vault {} was not unsealed (nothing cached)",
            store.display()
        );
    }
    Ok(())
}

/// `cmkfs vault change-passphrase`.
pub(super) fn change_passphrase(home: &Home, a: ChangePassphraseArgs) -> anyhow::Result<()> {
    let store = home.vault_dir();
    let rec = seal::read_record(&store)?.ok_or_else(|| seal::not_sealed(&store))?;
    let kdf = match a.kdf.as_deref() {
        Some(k) => KdfParams::parse(k)?,
        None => rec.kdf(),
    };
    let vault = LocalVault::open(&store)?;
    let what = format!("the vault {}", store.display());
    let old = unlock::passphrase(&what)?;
    let new = match &a.new_passphrase_file {
        Some(p) => {
            unlock::read_passphrase_file(p, format!("--new-passphrase-file {}", p.display()))?
        }
        None => unlock::new_passphrase_on_terminal(&what)?,
    };
    vault.change_passphrase(&old, &new, kdf)?;
    println!("changed the passphrase of the vault {}", store.display());
    Ok(())
}

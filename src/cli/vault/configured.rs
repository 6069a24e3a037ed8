//! `cmkfs vault add`, `remove`, `list-configured`: the vaults this machine trusts.

use super::*;

#[derive(Args, Debug)]
pub(super) struct AddArgs {
    /// A local name for the vault (`--vault NAME` accepts it).
    name: String,
    /// `https://HOST[:PORT]` or `pkcs11:/path/module.so?token=LABEL&pin-source=file:/path`
    /// (the module must be owned by root and not writable by others).
    url: String,
    /// https: PEM file of the CA the server's certificate must chain to (pinned). With
    /// `--credential FILE`, that credential is the one the vault is used with (else one in
    /// $CMKFS_HOME/credentials).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `cmkfs vault add`.
pub(super) fn add_vault(
    home: &Home,
    a: AddArgs,
    credential: Option<PathBuf>,
) -> anyhow::Result<()> {
    use crate::vault::trust;
    let v = trust::add(
        home,
        &a.name,
        &a.url,
        &trust::AddOptions {
            ca: a.ca,
            credential,
        },
    )?;
    if a.json {
        return print_json(&v);
    }
    println!("configured vault {} ({})", v.name, v.url);
    Ok(())
}

/// `cmkfs vault remove`.
pub(super) fn remove_vault(home: &Home, name: &str) -> anyhow::Result<()> {
    let v = crate::vault::trust::remove(home, name)?;
    println!(
        "removed vault {} ({}): volumes with keys there no longer mount on this machine",
        v.name, v.url
    );
    Ok(())
}

/// `cmkfs vault list-configured`.
pub(super) fn list_configured(home: &Home, json: bool) -> anyhow::Result<()> {
    let vaults = crate::vault::trust::list(home)?;
    if json {
        return print_json(&vaults);
    }
    let mut rows = vec![vec![
        "local".to_string(),
        "local".to_string(),
        crate::vault::local::URL.to_string(),
        "always configured".to_string(),
    ]];
    for v in &vaults {
        let mut notes = Vec::new();
        if v.ca_pem.is_some() {
            notes.push("CA pinned".to_string());
        }
        if let Some(c) = &v.credential {
            notes.push(format!("credential {}", c.display()));
        }
        rows.push(vec![
            v.name.clone(),
            format!("{:?}", v.kind).to_lowercase(),
            v.url.clone(),
            notes.join(", "),
        ]);
    }
    print_table(&["NAME", "KIND", "URL", "NOTES"], rows.into_iter());
    Ok(())
}

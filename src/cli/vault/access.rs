//! `cmkfs vault identity ...` and `cmkfs vault policy ...`: identities and access policies of
//! the embedded vault.

use super::*;

#[derive(Subcommand, Debug)]
pub(super) enum IdentityCommand {
    /// Create an identity and write its credential file (0600).
    Create {
        /// Identity name: 1-127 letters, digits and dashes.
        name: String,
        /// Where to write the credential (default `$CMKFS_HOME/credentials/NAME.json`, sealed
        /// with the vault's keys). A file elsewhere is an export for another host, written in
        /// clear (0600): seal it there (`cmkfs vault seal`) and delete the copy.
        #[arg(long, value_name = "FILE")]
        credential_file: Option<PathBuf>,
        /// Write a credential for this vault server URL (`https://HOST:PORT` of
        /// `cmkfs vault serve`) instead of the embedded vault. Kept in this home it is sealed;
        /// to copy it to a client host, name the export with --credential-file.
        #[arg(long, value_name = "URL")]
        server_url: Option<String>,
        /// CA certificate to pin in a --server-url credential (default: the server's
        /// generated <store>/tls/ca.pem when present).
        #[arg(long, value_name = "FILE", requires = "server_url")]
        ca_cert: Option<PathBuf>,
        /// Print JSON, including the bearer `token` for HTTP clients (e.g. the Azure SDKs).
        #[arg(long)]
        json: bool,
    },
    /// List identities.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an identity and its policies: its credential stops working at once.
    Delete {
        /// Identity name.
        name: String,
    },
}

impl IdentityCommand {
    /// Whether this adds an identity (the only identity command that may start a vault).
    pub(super) fn adds_an_identity(&self) -> bool {
        matches!(self, IdentityCommand::Create { .. })
    }
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("scope").required(true).args(["key", "all_keys"])))]
pub(super) struct ScopeArgs {
    /// The key the policy covers.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// The policy covers every key, present and future.
    #[arg(long)]
    all_keys: bool,
}

impl ScopeArgs {
    fn scope(&self) -> PolicyScope {
        match &self.key {
            Some(k) if !self.all_keys => PolicyScope::Key(k.clone()),
            _ => PolicyScope::AllKeys,
        }
    }
}

#[derive(Subcommand, Debug)]
pub(super) enum PolicyCommand {
    /// Set (replace) an identity's permissions on a key or on all keys.
    Set {
        /// Identity name.
        identity: String,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Comma-separated: get, list, wrapKey, unwrapKey, update, create, import, delete,
        /// recover, purge, rotate, or `all`.
        #[arg(long, value_name = "PERMS", value_delimiter = ',', required = true)]
        permissions: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an identity's policy on a key or on all keys.
    Remove {
        /// Identity name.
        identity: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List access policies.
    List {
        /// Only this identity's policies.
        #[arg(long, value_name = "NAME")]
        identity: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn identity(v: &LocalVault, home: &Home, cmd: IdentityCommand) -> anyhow::Result<()> {
    match cmd {
        IdentityCommand::Create {
            name,
            credential_file,
            server_url,
            ca_cert,
            json,
        } => {
            let cred_dir = home.root().join("credentials");
            let path = match credential_file {
                Some(p) => p,
                None => {
                    create_private_dir(&cred_dir)
                        .with_context(|| format!("cannot create {}", cred_dir.display()))?;
                    cred_dir.join(format!("{name}.json"))
                }
            };
            // A credential that lands in this home's credentials directory is sealed with the
            // vault's keys, whatever vault it is for (a --server-url credential kept here
            // included); only a file the user names elsewhere is an export, in clear.
            let in_home = match (
                path.parent().map(|d| {
                    if d.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        d
                    }
                }),
                std::fs::canonicalize(&cred_dir),
            ) {
                (Some(parent), Ok(home_creds)) => {
                    std::fs::canonicalize(parent).is_ok_and(|p| p == home_creds)
                }
                _ => false,
            };
            // Checked first so that a refused file leaves no identity behind.
            if path.exists() {
                bail!(
                    "credential file {} already exists: choose another with --credential-file",
                    path.display()
                );
            }
            // Read before creating anything, so that a bad --ca-cert leaves no identity behind.
            let server = match &server_url {
                Some(u) => {
                    let url = crate::vault::http::normalize_url(u)?;
                    let ca_path = ca_cert.clone().or_else(|| {
                        let p = crate::vault::server::tls::generated_ca_path(v.store_dir());
                        p.exists().then_some(p)
                    });
                    let ca = ca_path
                        .map(|p| {
                            std::fs::read_to_string(&p)
                                .with_context(|| format!("cannot read {}", p.display()))
                        })
                        .transpose()?;
                    Some((url, ca))
                }
                None => None,
            };
            let (info, mut cred) = v.create_identity(&name)?;
            if let Some((url, ca)) = server {
                cred.vault = url;
                cred.ca_cert = ca;
            }
            let cred_json = cred.to_json()?;
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let sealed = if in_home {
                v.seal_credential(&file_name, &cred_json)?
            } else {
                None
            };
            let saved = match &sealed {
                Some(b) => Credential::save_bytes_new(b, &path),
                None => Credential::save_bytes_new(&cred_json, &path),
            };
            if let Err(e) = saved {
                // Undo: an identity nobody holds a credential for is of no use.
                let _ = v.delete_identity(&name);
                return Err(e.into());
            }
            if sealed.is_none() {
                eprintln!(
                    "note: {} holds the identity's secret in clear (0600); {}",
                    path.display(),
                    if in_home {
                        "this vault is not sealed: run `cmkfs vault seal` to seal it".to_string()
                    } else {
                        "on the host that will use it, move it into $CMKFS_HOME/credentials/ and \
                         run `cmkfs vault seal` there, then delete every other copy"
                            .to_string()
                    }
                );
            }
            if json {
                #[derive(Serialize)]
                struct Out<'a> {
                    name: &'a str,
                    created: u64,
                    credential_file: &'a std::path::Path,
                    vault: &'a str,
                    /// `Authorization: Bearer <token>` for HTTP clients of `cmkfs vault serve`.
                    token: &'a str,
                }
                let token = cred.bearer_token();
                return print_json(&Out {
                    name: &info.name,
                    created: info.created,
                    credential_file: &path,
                    vault: &cred.vault,
                    token: &token,
                });
            }
            println!(
                "created identity {name}; credential written to {} (keep it secret: it carries the \
                 identity's permissions; grant some with `cmkfs vault policy set {name} ...`)",
                path.display()
            );
            Ok(())
        }
        IdentityCommand::List { json } => {
            let ids = v.list_identities()?;
            if json {
                return print_json(&ids);
            }
            if ids.is_empty() {
                println!("no identities (create one with `cmkfs vault identity create NAME`)");
                return Ok(());
            }
            print_table(
                &["NAME", "CREATED"],
                ids.iter().map(|i| vec![i.name.clone(), time(i.created)]),
            );
            Ok(())
        }
        IdentityCommand::Delete { name } => {
            v.delete_identity(&name)?;
            println!("deleted identity {name}: its credential no longer works");
            Ok(())
        }
    }
}

pub(super) fn policy(v: &LocalVault, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Set {
            identity,
            scope,
            permissions,
            json,
        } => {
            let mut perms = Vec::new();
            for p in &permissions {
                if p.trim().eq_ignore_ascii_case("all") {
                    perms.extend(Permission::ALL);
                } else {
                    perms.push(p.parse::<Permission>()?);
                }
            }
            let pol = v.set_policy(&identity, &scope.scope(), &perms)?;
            if json {
                return print_json(&pol);
            }
            println!(
                "{} may {} on {}",
                pol.identity,
                join_perms(&pol.permissions),
                scope_text(&pol.key)
            );
            Ok(())
        }
        PolicyCommand::Remove { identity, scope } => {
            let s = scope.scope();
            v.remove_policy(&identity, &s)?;
            println!(
                "removed the policy of {identity} on {}",
                match &s {
                    PolicyScope::AllKeys => "all keys".to_string(),
                    PolicyScope::Key(k) => format!("key {k}"),
                }
            );
            Ok(())
        }
        PolicyCommand::List { identity, json } => {
            let pols = v.list_policies(identity.as_deref())?;
            if json {
                return print_json(&pols);
            }
            if pols.is_empty() {
                println!("no access policies");
                return Ok(());
            }
            print_table(
                &["IDENTITY", "KEY", "PERMISSIONS"],
                pols.iter().map(|p| {
                    vec![
                        p.identity.clone(),
                        p.key.clone(),
                        join_perms(&p.permissions),
                    ]
                }),
            );
            Ok(())
        }
    }
}

fn join_perms(p: &[Permission]) -> String {
    p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

fn scope_text(key: &str) -> String {
    if key == "*" {
        "all keys".into()
    } else {
        format!("key {key}")
    }
}

//! Credentials: enrollment tokens, agents provisioned offline, admin certificates, and
//! their revocation.

use super::*;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (the only time its secret is shown).
    Create {
        #[arg(long)]
        data_dir: PathBuf,
        /// How long it stays valid: e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100000))]
        uses: u32,
        /// The control API address agents should dial, HOST:PORT (default: this host's
        /// name, port 8443).
        #[arg(long)]
        address: Option<String>,
        /// Enroll only this source server id. Without --reinstall it must be new; without
        /// --server, the token enrolls any server id the receiver does not know yet.
        #[arg(long)]
        server: Option<String>,
        /// Re-enroll the existing server --server (a reinstall of its agent): its
        /// previous agent is revoked and its disks rescan instead of resyncing.
        #[arg(long, requires = "server")]
        reinstall: bool,
    },
    /// List tokens: id, created, expires, uses, state (never the secrets).
    List {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Revoke a token by the id `token list` shows.
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        id: String,
    },
}

/// A duration as a number and a unit: s, m, h or d.
fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, e.g. 30m, 1h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    if secs == 0 || secs > 365 * 86400 {
        return Err(format!("{text:?}: must be between 1s and 365d"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Issue a key and certificate for a new agent and write them, with the CA
    /// certificate, to a directory to copy to the source server.
    Issue {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server's name (its id at the receiver): 1-64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// Where to write agent.key (0600), agent.crt and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// Revoke an agent for good: its handshakes fail from now on and its live session is
    /// closed (at once when the receiver runs, at its next start otherwise).
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        /// The agent id (as in `status`).
        agent_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Issue a key and an admin client certificate for an operator (or a monitoring
    /// system) and write them, with the CA certificate, to a directory.
    Issue {
        #[arg(long)]
        data_dir: PathBuf,
        /// Who holds it, for the logs: 1-64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// Where to write admin.key (0600), admin.crt and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 90)]
        valid_days: u32,
    },
    /// Revoke an admin certificate: its handshakes fail from now on.
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        /// The admin id `admin issue` printed.
        admin_id: String,
    },
}

pub(super) async fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Create {
            data_dir,
            ttl,
            uses,
            address,
            server,
            reinstall,
        } => {
            use crate::control::TokenBinding;
            if let Some(server) = &server {
                crate::pki::validate_name("server id", server)?;
            }
            let binding = match (server, reinstall) {
                (None, _) => TokenBinding::AnyNewServer,
                (Some(id), false) => TokenBinding::NewServer(id),
                (Some(id), true) => TokenBinding::Reinstall(id),
            };
            let ca = crate::pki::CertificateAuthority::load_or_create(&data_dir)?;
            let address = match address {
                Some(address) => address,
                None => format!("{}:8443", crate::control::host_name()),
            };
            let what = match &binding {
                TokenBinding::AnyNewServer => "a new source server".to_owned(),
                TokenBinding::NewServer(id) => format!("new source server {id}"),
                TokenBinding::Reinstall(id) => {
                    format!("a reinstall of source server {id} (its agent will be revoked)")
                }
            };
            let (token, record) =
                crate::control::new_token(ca.fingerprint(), &address, ttl, uses, binding);
            let request = AdminRequest::AddToken {
                record: record.clone(),
            };
            admin_or_catalog(&data_dir, request, |catalog| {
                catalog.add_token(&record).map(|()| AdminResponse::Done)
            })
            .await?;
            println!("{token}");
            eprintln!(
                "token {} for {address}, enrolls {what}: valid {}, {uses} use(s). On the source server: blockferry-agent enroll --token TOKEN --state-dir /var/lib/blockferry-agent",
                record.id,
                humantime(ttl.as_secs())
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List { data_dir } => {
            let AdminResponse::Tokens(tokens) =
                admin_or_catalog(&data_dir, AdminRequest::ListTokens, |catalog| {
                    catalog.tokens().map(AdminResponse::Tokens)
                })
                .await?
            else {
                bail!("unexpected answer from the running receiver");
            };
            println!(
                "{:<18} {:>12} {:>12} {:>6}  STATE",
                "ID", "CREATED", "EXPIRES", "USED"
            );
            let now = crate::catalog::now();
            for t in tokens {
                let state = if t.revoked {
                    "revoked"
                } else if now >= t.expires {
                    "expired"
                } else if t.used >= t.uses {
                    "used"
                } else {
                    "valid"
                };
                println!(
                    "{:<18} {:>12} {:>12} {:>3}/{:<2}  {state}",
                    t.id, t.created, t.expires, t.used, t.uses
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { data_dir, id } => {
            let request = AdminRequest::RevokeToken { id: id.clone() };
            admin_or_catalog(&data_dir, request, |catalog| {
                catalog.revoke_token(&id).map(|found| {
                    if found {
                        AdminResponse::Done
                    } else {
                        AdminResponse::Error(format!("no token with id {id} (see `token list`)"))
                    }
                })
            })
            .await?;
            println!("token {id} revoked");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(super) async fn agent(command: AgentCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentCommand::Issue {
            data_dir,
            name,
            out,
            valid_days,
        } => {
            let identity = crate::pki::write_agent_credentials(
                &data_dir,
                &name,
                &out,
                time::Duration::days(i64::from(valid_days.max(1))),
            )?;
            println!(
                "issued agent {} for source server {}; credentials in {}",
                identity.agent_id,
                identity.server_id,
                out.display()
            );
            println!(
                "copy that directory to the source server and run: blockferry-agent run --receiver HOST:1500 --credentials DIR --disk /dev/sdX"
            );
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Revoke { data_dir, agent_id } => {
            crate::pki::validate_name("agent id", &agent_id)?;
            let answer = revoke(&data_dir, &agent_id).await?;
            match &answer.server_id {
                Some(server) => println!(
                    "revoked agent {agent_id} of source server {server}; {} live session(s) closed",
                    answer.sessions_closed
                ),
                None => println!(
                    "revoked agent {agent_id} (it never connected); its certificate is refused from now on"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(super) async fn admin(command: AdminCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::Issue {
            data_dir,
            name,
            out,
            valid_days,
        } => {
            let identity = crate::pki::write_admin_credentials(
                &data_dir,
                &name,
                &out,
                time::Duration::days(i64::from(valid_days.max(1))),
            )?;
            println!(
                "issued admin certificate {} for {}, valid {valid_days} days; credentials in {}",
                identity.admin_id,
                identity.name,
                out.display()
            );
            println!(
                "use: curl --cacert ca.crt --cert admin.crt --key admin.key --resolve blockferry-receiver:8443:ADDRESS https://blockferry-receiver:8443/v1/status"
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Revoke { data_dir, admin_id } => {
            crate::pki::validate_name("admin id", &admin_id)?;
            revoke(&data_dir, &admin_id).await?;
            println!("revoked admin certificate {admin_id}; it is refused from now on");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Through the running receiver, or in the catalog directly when none runs.
pub(super) async fn revoke(
    data_dir: &std::path::Path,
    agent_id: &str,
) -> anyhow::Result<admin::RevokeAnswer> {
    let request = AdminRequest::RevokeAgent {
        agent_id: agent_id.to_owned(),
    };
    let answer = admin_or_catalog(data_dir, request, |catalog| {
        catalog.revoke_agent(agent_id).map(|server_id| {
            AdminResponse::Revoked(admin::RevokeAnswer {
                server_id,
                sessions_closed: 0,
            })
        })
    })
    .await?;
    match answer {
        AdminResponse::Revoked(answer) => Ok(answer),
        other => bail!("unexpected answer from the running receiver: {other:?}"),
    }
}

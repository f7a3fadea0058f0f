//! The local admin socket (`<data-dir>/admin.sock`, mode 0600): how operator commands
//! reach a running receiver, which holds the catalog open. One JSON request per line, one
//! JSON answer per line.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::catalog::{ServerSettings, SettingsChange, TokenRecord};
use crate::context::SessionContext;
use crate::status::StatusReport;
use blockferry_util::error_chain;

/// Longest request line accepted; requests are tiny.
const MAX_REQUEST: u64 = 64 << 10;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Status,
    /// Rescan `disk` (every disk when absent) of `server_id` at the agent's next session;
    /// a connected agent is made to reconnect at once.
    Rescan {
        server_id: String,
        disk: Option<String>,
    },
    /// Revoke agent `agent_id`: its handshakes fail from now on, its live session ends.
    RevokeAgent {
        agent_id: String,
    },
    /// Store a new enrollment token (only its hash travels here).
    AddToken {
        record: TokenRecord,
    },
    ListTokens,
    RevokeToken {
        id: String,
    },
    /// Change a server's settings (or the template, when `server_id` is absent); a
    /// connected agent hears the change at once.
    UpdateSettings {
        server_id: Option<String>,
        change: SettingsChange,
    },
    ListSettings,
    /// Adopt, reset or forget one disk's staging image (`disk adopt|reset|forget`);
    /// refused while the disk is in a live session.
    Disk {
        server_id: String,
        disk: String,
        action: crate::staging::DiskAction,
        delete_image: bool,
    },
    /// Delete recovery point `epoch` of `server_id` (file backend).
    DeletePoint {
        server_id: String,
        epoch: u64,
    },
    /// Mark `server_id` cut over (`launch --mode cutover`): its live session is ended
    /// with FINISHED and every later one refused.
    CutOver {
        server_id: String,
    },
    /// Keep the record of a launch.
    RecordLaunch {
        record: crate::catalog::LaunchRecord,
    },
    ListLaunches {
        server_id: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    Status(StatusReport),
    Rescan(RescanAnswer),
    Revoked(RevokeAnswer),
    Tokens(Vec<TokenRecord>),
    Settings(SettingsList),
    /// The settings as they now are, and whether a connected agent was told.
    SettingsSet {
        settings: ServerSettings,
        applied_live: bool,
    },
    Disk(crate::staging::DiskActionDone),
    /// The point deleted, if there was one.
    PointDeleted(Option<crate::catalog::RecoveryPointRecord>),
    /// When the server was cut over, and whether a live session was ended now.
    CutOver {
        at_ms: u64,
        session_ended: bool,
    },
    /// The launch's number.
    Launched(u64),
    Launches(Vec<crate::catalog::LaunchRecord>),
    Done,
    Error(String),
}

/// What a revocation did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokeAnswer {
    /// The source server the agent last replicated, if it ever connected.
    pub server_id: Option<String>,
    /// Live sessions closed.
    pub sessions_closed: usize,
}

/// The template and every server's own settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SettingsList {
    pub default: ServerSettings,
    pub servers: Vec<(String, ServerSettings)>,
}

/// What a rescan request did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RescanAnswer {
    pub disks: Vec<String>,
    /// Whether the agent was connected (and so reconnects and rescans now).
    pub connected: bool,
}

pub(crate) fn bind(data_dir: &Path) -> io::Result<UnixListener> {
    // A socket file left by a receiver that crashed is replaced; the catalog lock already
    // proved that no other receiver is running on this data dir.
    let listener = blockferry_util::socket::bind_private(&socket_path(data_dir), 0o600, None)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

pub(crate) fn remove_socket(data_dir: &Path) {
    let _ = std::fs::remove_file(socket_path(data_dir));
}

pub(crate) async fn serve(
    listener: UnixListener,
    ctx: Arc<SessionContext>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &ctx).await {
                tracing::debug!(error = %err, "admin request failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, ctx: &SessionContext) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(AdminRequest::Status) => {
            let catalog = Arc::clone(&ctx.catalog);
            let registry = Arc::clone(&ctx.registry);
            match tokio::task::spawn_blocking(move || {
                StatusReport::build(&catalog, Some(&registry))
            })
            .await
            {
                Ok(Ok(report)) => AdminResponse::Status(report),
                Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::Rescan { server_id, disk }) => {
            let catalog = Arc::clone(&ctx.catalog);
            let server = server_id.clone();
            match tokio::task::spawn_blocking(move || {
                catalog.request_rescan(&server, disk.as_deref())
            })
            .await
            {
                Ok(Ok(disks)) => {
                    let session = ctx.registry.session_of(&server_id);
                    let connected = session.is_some();
                    if let Some(session) = session {
                        session
                            .restart("an operator asked for a rescan; reconnect to start it")
                            .await;
                    }
                    AdminResponse::Rescan(RescanAnswer { disks, connected })
                }
                Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::AddToken { record }) => {
            let catalog = Arc::clone(&ctx.catalog);
            match tokio::task::spawn_blocking(move || catalog.add_token(&record)).await {
                Ok(Ok(())) => AdminResponse::Done,
                Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::ListTokens) => {
            let catalog = Arc::clone(&ctx.catalog);
            blocking(move || catalog.tokens().map(AdminResponse::Tokens)).await
        }
        Ok(AdminRequest::RevokeToken { id }) => {
            let catalog = Arc::clone(&ctx.catalog);
            blocking(move || {
                catalog.revoke_token(&id).map(|found| {
                    if found {
                        AdminResponse::Done
                    } else {
                        AdminResponse::Error(format!("no token with id {id} (see `token list`)"))
                    }
                })
            })
            .await
        }
        Ok(AdminRequest::RevokeAgent { agent_id }) => {
            let catalog = Arc::clone(&ctx.catalog);
            let id = agent_id.clone();
            match tokio::task::spawn_blocking(move || catalog.revoke_agent(&id)).await {
                Ok(Ok(server_id)) => {
                    // Recorded first, then refused at every handshake, then cut off.
                    ctx.revocations.insert(&agent_id);
                    let sessions = ctx.registry.sessions_of_agent(&agent_id);
                    for session in &sessions {
                        session.revoke().await;
                    }
                    AdminResponse::Revoked(RevokeAnswer {
                        server_id,
                        sessions_closed: sessions.len(),
                    })
                }
                Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::UpdateSettings { server_id, change }) => {
            let catalog = Arc::clone(&ctx.catalog);
            let server = server_id.clone();
            match tokio::task::spawn_blocking(move || {
                catalog.update_settings(server.as_deref(), change)
            })
            .await
            {
                Ok(Ok(settings)) => {
                    let session = server_id
                        .as_deref()
                        .and_then(|s| ctx.registry.session_of(s));
                    let applied_live = session.is_some();
                    if let Some(session) = session {
                        session.apply_settings(&settings).await;
                    }
                    AdminResponse::SettingsSet {
                        settings,
                        applied_live,
                    }
                }
                Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::ListSettings) => {
            let catalog = Arc::clone(&ctx.catalog);
            blocking(move || {
                catalog.all_settings().map(|(default, servers)| {
                    AdminResponse::Settings(SettingsList { default, servers })
                })
            })
            .await
        }
        Ok(AdminRequest::Disk {
            server_id,
            disk,
            action,
            delete_image,
        }) => {
            let live = ctx
                .registry
                .session_of(&server_id)
                .is_some_and(|s| s.live_view().disk_index(&disk).is_some());
            if live {
                AdminResponse::Error(
                    crate::catalog::DiskCommandError::Connected {
                        server: server_id,
                        disk,
                    }
                    .to_string(),
                )
            } else {
                let catalog = Arc::clone(&ctx.catalog);
                match tokio::task::spawn_blocking(move || {
                    crate::staging::disk_command(&catalog, &server_id, &disk, action, delete_image)
                })
                .await
                {
                    Ok(Ok(done)) => AdminResponse::Disk(done),
                    Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                    Err(err) => AdminResponse::Error(err.to_string()),
                }
            }
        }
        Ok(AdminRequest::DeletePoint { server_id, epoch }) => {
            let catalog = Arc::clone(&ctx.catalog);
            match tokio::task::spawn_blocking(move || {
                crate::points::delete_point(&catalog, &server_id, epoch)
            })
            .await
            {
                Ok(Ok(point)) => AdminResponse::PointDeleted(point),
                Ok(Err(why)) => AdminResponse::Error(why),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::CutOver { server_id }) => {
            let catalog = Arc::clone(&ctx.catalog);
            let server = server_id.clone();
            match tokio::task::spawn_blocking(move || catalog.cut_over(&server)).await {
                Ok(Ok(mark)) => {
                    // Committed first: the agent's reconnect is refused from now on.
                    let session = ctx.registry.session_of(&server_id);
                    let session_ended = session.is_some();
                    if let Some(session) = session {
                        session.finish().await;
                    }
                    AdminResponse::CutOver {
                        at_ms: mark.at_ms,
                        session_ended,
                    }
                }
                Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
                Err(err) => AdminResponse::Error(err.to_string()),
            }
        }
        Ok(AdminRequest::RecordLaunch { record }) => {
            let catalog = Arc::clone(&ctx.catalog);
            blocking(move || catalog.record_launch(&record).map(AdminResponse::Launched)).await
        }
        Ok(AdminRequest::ListLaunches { server_id }) => {
            let catalog = Arc::clone(&ctx.catalog);
            blocking(move || {
                catalog
                    .launches(server_id.as_deref())
                    .map(AdminResponse::Launches)
            })
            .await
        }
        Err(err) => AdminResponse::Error(format!("bad request: {err}")),
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Runs a catalog operation off the async threads and turns its error into an answer.
async fn blocking(
    op: impl FnOnce() -> Result<AdminResponse, crate::catalog::CatalogError> + Send + 'static,
) -> AdminResponse {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => AdminResponse::Error(error_chain(&err)),
        Err(err) => AdminResponse::Error(err.to_string()),
    }
}

/// Sends `request` to the receiver running on `data_dir`. `Ok(None)` means no receiver
/// is running there (no socket, or nobody listening on it).
pub async fn request(data_dir: &Path, request: &AdminRequest) -> io::Result<Option<AdminResponse>> {
    let stream = match UnixStream::connect(socket_path(data_dir)).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(read).read_to_string(&mut answer).await?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

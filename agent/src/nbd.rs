//! The NBD tap: serves each replicated disk as an NBD export named after the disk, so a
//! workload (a VM, qemu-img, nbdcopy, the kernel's nbd client) runs on top of the agent.
//! Every write goes to the source volume and into the capture.
//!
//! Fixed newstyle handshake with NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO and GO (other
//! options get NBD_REP_ERR_UNSUP, so clients fall back to simple replies); commands READ,
//! WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC, with FUA. Bad input gets the protocol's
//! error reply, never a crash; only a stream that is not NBD at all is closed.
//!
//! In `sync` mode a FLUSH, or a write with FUA, is answered only once the receiver holds
//! every earlier write durably at a consistent point (zero RPO); in `async` mode once the
//! source volume has it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::capture::Capture;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TRANSMISSION_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ENOTSUP: u32 = 95;

/// Largest option payload accepted during the handshake (export names are short).
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest READ or WRITE payload: what the tap advertises as the maximum block size.
const MAX_IO: u32 = 32 << 20;
/// Payloads move through the tap in pieces of at most this size.
const PIECE: u32 = 1 << 20;

/// When a FLUSH (or FUA write) is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    #[default]
    /// Once the source volume has the data.
    Async,
    /// Once the receiver holds it durably at a consistent point.
    Sync,
}

/// Where the tap listens: a Unix socket (`unix:PATH`, the safe choice) or TCP
/// (`HOST:PORT`, which has no authentication at all: see [`NbdAccess::insecure_tcp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdListen {
    Tcp(String),
    Unix(PathBuf),
}

/// Who may use the tap. Whoever reaches it reads and writes the source volumes, which
/// only root may open: the tap must never be more open than the volumes themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdAccess {
    /// Besides the agent's own user and root, this uid may connect to the Unix socket
    /// (it owns the socket, mode 0600); every peer is checked with `SO_PEERCRED`.
    pub allow_uid: Option<u32>,
    /// Serve TCP anyway. Every local user (and, off loopback, every host that can reach
    /// the port) can then read and write the volumes; the agent says so loudly.
    pub insecure_tcp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(
        "the NBD tap on TCP ({0}) would let every local user read and write the replicated volumes (TCP has no authentication); use --nbd-listen unix:PATH, or add --nbd-insecure-tcp if you accept that"
    )]
    TcpRefused(String),
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Dir(#[from] blockferry_util::durable::DirError),
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(Self::Async),
            "sync" => Ok(Self::Sync),
            _ => Err(format!("unknown sync mode {s:?}: expected async or sync")),
        }
    }
}

impl std::str::FromStr for NbdListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path, e.g. unix:/run/blockferry/nbd.sock".into()),
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None if s.contains(':') => Ok(Self::Tcp(s.to_owned())),
            None => Err(format!("{s:?} is neither HOST:PORT nor unix:PATH")),
        }
    }
}

/// Binds the tap and serves until `shutdown`. Returns the address actually bound
/// (`HOST:PORT`, or the socket path) and the accept task.
pub async fn serve(
    listen: &NbdListen,
    access: &NbdAccess,
    capture: Capture,
    mode: SyncMode,
    shutdown: CancellationToken,
) -> Result<(String, tokio::task::JoinHandle<()>), NbdError> {
    let capture = Arc::new(capture);
    match listen {
        NbdListen::Tcp(addr) => {
            if !access.insecure_tcp {
                return Err(NbdError::TcpRefused(addr.clone()));
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| NbdError::Listen {
                    what: addr.clone(),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| NbdError::Listen {
                what: addr.clone(),
                source,
            })?;
            let local = bound.to_string();
            if bound.ip().is_loopback() {
                tracing::warn!(listen = %local, "NBD tap on loopback TCP without authentication: every local user can read and write the replicated volumes through it");
            } else {
                tracing::error!(listen = %local, "NBD tap on a network address without authentication: every host that reaches this port can read and write the replicated volumes");
            }
            Ok((
                local,
                tokio::spawn(async move {
                    loop {
                        let conn = tokio::select! {
                            () = shutdown.cancelled() => return,
                            conn = listener.accept() => conn,
                        };
                        if let Ok((stream, peer)) = conn {
                            let _ = stream.set_nodelay(true);
                            let (r, w) = stream.into_split();
                            spawn_client(
                                r,
                                w,
                                Arc::clone(&capture),
                                mode,
                                peer.to_string(),
                                shutdown.clone(),
                            );
                        }
                    }
                }),
            ))
        }
        NbdListen::Unix(path) => {
            let listen_err = |source| NbdError::Listen {
                what: path.display().to_string(),
                source,
            };
            let dir = blockferry_util::durable::parent_of(path);
            if !dir.exists() {
                blockferry_util::durable::ensure_private_dir(dir, "NBD socket")?;
            }
            let listener = blockferry_util::socket::bind_private(path, 0o600, access.allow_uid)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    UnixListener::from_std(l)
                })
                .map_err(listen_err)?;
            tracing::info!(listen = %path.display(), "NBD tap listening");
            let (owner, allowed) = (blockferry_util::durable::euid(), access.allow_uid);
            Ok((
                path.display().to_string(),
                tokio::spawn(async move {
                    loop {
                        let conn = tokio::select! {
                            () = shutdown.cancelled() => return,
                            conn = listener.accept() => conn,
                        };
                        let Ok((stream, _)) = conn else { continue };
                        // The socket's mode already keeps others out; this holds even if
                        // someone loosens it.
                        match blockferry_util::socket::peer_uid(&stream) {
                            Ok(uid) if uid == owner || uid == 0 || Some(uid) == allowed => {
                                let (r, w) = stream.into_split();
                                spawn_client(
                                    r,
                                    w,
                                    Arc::clone(&capture),
                                    mode,
                                    format!("unix uid {uid}"),
                                    shutdown.clone(),
                                );
                            }
                            Ok(uid) => {
                                tracing::warn!(
                                    uid,
                                    "NBD tap: refused a client of a user that may not use the volumes (allow it with --nbd-allow-uid)"
                                );
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "NBD tap: cannot tell who connected; refused");
                            }
                        }
                    }
                }),
            ))
        }
    }
}

fn spawn_client<R, W>(
    r: R,
    w: W,
    capture: Arc<Capture>,
    mode: SyncMode,
    peer: String,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin + Send + Sync + 'static,
    W: AsyncWrite + Unpin + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut client = Client {
            r: BufReader::new(r),
            w: BufWriter::new(w),
            capture,
            mode,
        };
        let result = tokio::select! {
            result = client.run() => result,
            () = shutdown.cancelled() => Ok(()),
        };
        match result {
            Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
            Err(err) => tracing::info!(%peer, error = %err, "NBD client dropped"),
        }
    });
}

struct Client<R, W> {
    r: BufReader<R>,
    w: BufWriter<W>,
    capture: Arc<Capture>,
    mode: SyncMode,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Client<R, W> {
    async fn run(&mut self) -> io::Result<()> {
        let Some(disk) = self.handshake().await? else {
            return Ok(());
        };
        self.transmission(disk).await
    }

    /// Option haggling; returns the export chosen, or None if the client aborted.
    async fn handshake(&mut self) -> io::Result<Option<usize>> {
        self.w.write_u64(NBDMAGIC).await?;
        self.w.write_u64(IHAVEOPT).await?;
        self.w
            .write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .await?;
        self.w.flush().await?;
        let client_flags = self.r.read_u32().await?;
        let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        loop {
            let magic = self.r.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not an NBD option",
                ));
            }
            let option = self.r.read_u32().await?;
            let len = self.r.read_u32().await?;
            if len > MAX_OPTION_LEN {
                // Too long to be real; skipping it would mean trusting the client, so the
                // connection ends.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "option data over 64 KiB",
                ));
            }
            let mut data = vec![0u8; len as usize];
            self.r.read_exact(&mut data).await?;
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    // This option has no error reply: an unknown export ends the connection.
                    let disk = self.export(&name).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, format!("no export named {name:?}"))
                    })?;
                    self.w.write_u64(self.size(disk)).await?;
                    self.w.write_u16(TRANSMISSION_FLAGS).await?;
                    if !no_zeroes {
                        self.w.write_all(&[0u8; 124]).await?;
                    }
                    self.w.flush().await?;
                    return Ok(Some(disk));
                }
                OPT_ABORT => {
                    self.reply(option, REP_ACK, &[]).await?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.reply(option, REP_ERR_INVALID, b"LIST takes no data")
                            .await?;
                        continue;
                    }
                    let names: Vec<String> = self
                        .capture
                        .volumes()
                        .iter()
                        .map(|v| v.name.clone())
                        .collect();
                    for name in names {
                        let mut body = (name.len() as u32).to_be_bytes().to_vec();
                        body.extend_from_slice(name.as_bytes());
                        self.reply(option, REP_SERVER, &body).await?;
                    }
                    self.reply(option, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(name) = parse_info_request(&data) else {
                        self.reply(option, REP_ERR_INVALID, b"malformed INFO/GO request")
                            .await?;
                        continue;
                    };
                    let Some(disk) = self.export(&name) else {
                        self.reply(
                            option,
                            REP_ERR_UNKNOWN,
                            format!("no export named {name:?}").as_bytes(),
                        )
                        .await?;
                        continue;
                    };
                    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                    export.extend_from_slice(&self.size(disk).to_be_bytes());
                    export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    self.reply(option, REP_INFO, &export).await?;
                    let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [1u32, 4096, MAX_IO] {
                        block.extend_from_slice(&v.to_be_bytes());
                    }
                    self.reply(option, REP_INFO, &block).await?;
                    self.reply(option, REP_ACK, &[]).await?;
                    if option == OPT_GO {
                        return Ok(Some(disk));
                    }
                }
                _ => {
                    self.reply(option, REP_ERR_UNSUP, b"option not supported")
                        .await?;
                }
            }
        }
    }

    fn export(&self, name: &str) -> Option<usize> {
        let volumes = self.capture.volumes();
        // The default export (empty name) is the first disk.
        if name.is_empty() {
            return (!volumes.is_empty()).then_some(0);
        }
        volumes.iter().position(|v| v.name == name)
    }

    fn size(&self, disk: usize) -> u64 {
        self.capture.volumes()[disk].size
    }

    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.w.write_u64(REPLY_MAGIC).await?;
        self.w.write_u32(option).await?;
        self.w.write_u32(kind).await?;
        self.w.write_u32(data.len() as u32).await?;
        self.w.write_all(data).await?;
        self.w.flush().await
    }

    async fn transmission(&mut self, disk: usize) -> io::Result<()> {
        let size = self.size(disk);
        loop {
            let magic = self.r.read_u32().await?;
            if magic != REQUEST_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad NBD request magic",
                ));
            }
            let flags = self.r.read_u16().await?;
            let command = self.r.read_u16().await?;
            let handle = self.r.read_u64().await?;
            let offset = self.r.read_u64().await?;
            let len = self.r.read_u32().await?;
            let in_range = offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= size);
            let fua = flags & CMD_FLAG_FUA != 0;
            match command {
                CMD_READ => {
                    if len > MAX_IO {
                        self.simple_reply(handle, EOVERFLOW).await?;
                    } else if !in_range {
                        self.simple_reply(handle, EINVAL).await?;
                    } else {
                        // The first piece decides between data and an error reply; once
                        // data has started, a failure can only end the connection.
                        let first = len.min(PIECE);
                        match self.read(disk, offset, first).await {
                            Ok(data) => {
                                self.w.write_u32(SIMPLE_REPLY_MAGIC).await?;
                                self.w.write_u32(0).await?;
                                self.w.write_u64(handle).await?;
                                self.w.write_all(&data).await?;
                                let mut done = first;
                                while done < len {
                                    let n = (len - done).min(PIECE);
                                    let data = self.read(disk, offset + u64::from(done), n).await?;
                                    self.w.write_all(&data).await?;
                                    done += n;
                                }
                                self.w.flush().await?;
                            }
                            Err(_) => self.simple_reply(handle, EIO).await?,
                        }
                    }
                }
                CMD_WRITE => {
                    if len > MAX_IO {
                        // The payload must still be consumed to stay in step.
                        self.discard(len).await?;
                        self.simple_reply(handle, EOVERFLOW).await?;
                        continue;
                    }
                    if !in_range {
                        self.discard(len).await?;
                        self.simple_reply(handle, ENOSPC).await?;
                        continue;
                    }
                    // In pieces: a 32 MiB write never needs 32 MiB of memory, and the
                    // capture sees it in order, piece by piece.
                    let mut error = 0;
                    let mut done = 0u32;
                    while done < len {
                        let n = (len - done).min(PIECE);
                        let mut piece = vec![0u8; n as usize];
                        self.r.read_exact(&mut piece).await?;
                        if error == 0
                            && self
                                .capture
                                .write(disk, offset + u64::from(done), piece)
                                .await
                                .is_err()
                        {
                            error = EIO;
                        }
                        done += n;
                    }
                    if error == 0 && fua {
                        error = self.flush().await;
                    }
                    self.simple_reply(handle, error).await?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    if !in_range {
                        self.simple_reply(
                            handle,
                            if command == CMD_TRIM { EINVAL } else { ENOSPC },
                        )
                        .await?;
                        continue;
                    }
                    // A trimmed range may read as anything; zeros are the honest choice and
                    // travel without payload.
                    let error = match self
                        .capture
                        .write_zeroes(disk, offset, u64::from(len))
                        .await
                    {
                        Ok(()) if fua => self.flush().await,
                        Ok(()) => 0,
                        Err(_) => EIO,
                    };
                    self.simple_reply(handle, error).await?;
                }
                CMD_FLUSH => {
                    let error = self.flush().await;
                    self.simple_reply(handle, error).await?;
                }
                CMD_DISC => return Ok(()),
                _ => self.simple_reply(handle, ENOTSUP).await?,
            }
        }
    }

    /// fdatasync of the source volumes, an epoch closed, and in sync mode the wait for
    /// the receiver. Returns an NBD error code (0 for success).
    async fn flush(&self) -> u32 {
        match self.capture.flush_local().await {
            Ok(target) => {
                if self.mode == SyncMode::Sync {
                    self.capture.wait_durable(target).await;
                }
                0
            }
            Err(_) => EIO,
        }
    }

    async fn read(&self, disk: usize, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let path = self.capture.volumes()[disk].path().to_owned();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(path)?;
            let mut data = vec![0u8; len as usize];
            file.read_exact_at(&mut data, offset)?;
            Ok(data)
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn discard(&mut self, mut len: u32) -> io::Result<()> {
        let mut sink = [0u8; 64 << 10];
        while len > 0 {
            let n = (len as usize).min(sink.len());
            self.r.read_exact(&mut sink[..n]).await?;
            len -= n as u32;
        }
        Ok(())
    }

    async fn simple_reply(&mut self, handle: u64, error: u32) -> io::Result<()> {
        self.w.write_u32(SIMPLE_REPLY_MAGIC).await?;
        self.w.write_u32(error).await?;
        self.w.write_u64(handle).await?;
        self.w.flush().await
    }
}

/// INFO/GO data: u32 name length, name, u16 count of info requests, u16 each.
fn parse_info_request(data: &[u8]) -> Option<String> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    let name = rest.get(..len)?;
    let rest = &rest[len..];
    let (count, rest) = rest.split_first_chunk::<2>()?;
    if rest.len() != usize::from(u16::from_be_bytes(*count)) * 2 {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_strictly() {
        let mut ok = 4u32.to_be_bytes().to_vec();
        ok.extend_from_slice(b"sda1");
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&ok).as_deref(), Some("sda1"));
        assert_eq!(parse_info_request(&ok[..ok.len() - 1]), None);
        let mut long = 400u32.to_be_bytes().to_vec();
        long.extend_from_slice(b"x");
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&[]), None);
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "127.0.0.1:10809".parse(),
            Ok(NbdListen::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(NbdListen::Unix("/run/x.sock".into()))
        );
        assert!("unix:".parse::<NbdListen>().is_err());
        assert!("nonsense".parse::<NbdListen>().is_err());
    }
}

//! `blockferry-receiver demo`: a receiver and the embedded agent on loopback replicate a
//! generated image, and the staging copy is checked byte for byte.
//!
//! The image helpers here are shared with the benchmarks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use blockferry_agent::{Agent, AgentConfig, Credentials, ProgressMode, Volume};
use tokio_util::sync::CancellationToken;

use crate::{Receiver, ReceiverConfig};

/// How a generated source image is laid out.
#[derive(Debug, Clone, Copy)]
pub struct ImageLayout {
    /// Fraction of the image that is random data; the rest is zeros, interleaved in
    /// regions of `region` bytes so that both kinds run through the whole sync.
    pub random_fraction: f64,
    pub region: u64,
    pub seed: u64,
}

impl Default for ImageLayout {
    fn default() -> Self {
        Self {
            random_fraction: 0.5,
            region: 4 << 20,
            seed: 0x5eed,
        }
    }
}

/// Writes an image of `size` bytes at `path`; returns the number of non-zero bytes
/// (random regions).
pub fn generate_image(path: &Path, size: u64, layout: ImageLayout) -> io::Result<u64> {
    let mut file = io::BufWriter::with_capacity(4 << 20, File::create(path)?);
    let mut rng = layout.seed | 1;
    let mut random_bytes = 0u64;
    let mut written = 0u64;
    let mut buf = vec![0u8; layout.region.min(size).max(1) as usize];
    while written < size {
        let len = layout.region.min(size - written) as usize;
        // A region is random while the running share of random bytes is below target.
        let random = (random_bytes as f64) < layout.random_fraction * (written + len as u64) as f64;
        let chunk = &mut buf[..len];
        if random {
            for word in chunk.chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let bytes = rng.to_le_bytes();
                word.copy_from_slice(&bytes[..word.len()]);
            }
            random_bytes += len as u64;
        } else {
            chunk.fill(0);
        }
        file.write_all(chunk)?;
        written += len as u64;
    }
    file.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()?;
    Ok(random_bytes)
}

/// Compares two files byte for byte; returns the offset of the first difference.
pub fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut offset = 0u64;
    while offset < la.min(lb) {
        let n = (la.min(lb) - offset).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(offset + i as u64));
        }
        offset += n as u64;
    }
    Ok((la != lb).then_some(la.min(lb)))
}

/// Parses sizes like `1G`, `256M`, `512K`, `1073741824` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size unit in {s:?}: use K, M, G or T")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K, M, G or T")
    })?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n && *v > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

#[derive(Debug)]
pub struct DemoOptions {
    pub size: u64,
    pub data_dir: Option<PathBuf>,
    pub io_engine: blockferry_storage::IoEngine,
    /// Stage into an in-memory EBS as well: a recovery point becomes a snapshot, which is
    /// restored and checked too.
    pub ebs: bool,
}

/// Runs the demo; `Ok(())` only if the staging copy matches the source.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let temp;
    let dir = match &options.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("blockferry-demo")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let source = dir.join("source.img");
    println!(
        "generating a {} source image (half random, half zeros) at {}",
        crate::status::human_bytes(options.size),
        source.display()
    );
    let non_zero = generate_image(&source, options.size, ImageLayout::default())?;

    let mut config = ReceiverConfig::new(dir.join("receiver"));
    config.listen = "127.0.0.1:0".parse()?;
    config.io_engine = options.io_engine;
    let fake_ebs = std::sync::Arc::new(blockferry_storage::ebs::fake::FakeEbs::new());
    if options.ebs {
        config.ebs = Some(crate::snapshots::EbsBackendConfig {
            connection: crate::snapshots::EbsConnection::InMemory(std::sync::Arc::clone(&fake_ebs)),
            chain: blockferry_storage::ebs::chain::ChainSettings::default(),
            recovery_interval: std::time::Duration::ZERO,
        });
    }
    let receiver = Receiver::start(config).await?;
    let credentials_dir = dir.join("agent-credentials");
    crate::pki::write_agent_credentials(
        &dir.join("receiver"),
        "demo-server",
        &credentials_dir,
        time::Duration::days(1),
    )?;

    let volumes = Volume::open_all(&[format!("disk0={}", source.display())])?;
    let mut agent_config = AgentConfig::new(
        receiver.local_addr().to_string(),
        Credentials::load(&credentials_dir)?,
    );
    agent_config.exit_when_synced = true;
    agent_config.progress = ProgressMode::Auto;
    println!("replicating over mutual TLS to {}", receiver.local_addr());
    let started = Instant::now();
    let report = Agent::new(&volumes)
        .run(&agent_config, &volumes, CancellationToken::new())
        .await?;
    let elapsed = started.elapsed();
    let status = receiver.status()?;

    let disk = status
        .servers
        .iter()
        .flat_map(|s| &s.disks)
        .find(|d| d.name == "disk0")
        .context("the receiver has no record of disk0")?;
    let image = PathBuf::from(&disk.image);
    println!(
        "synced {} in {:.2} s: {:.0} MB/s; payload sent {} (the image has {} of non-zero data), {} as zero-fill frames",
        crate::status::human_bytes(options.size),
        elapsed.as_secs_f64(),
        options.size as f64 / elapsed.as_secs_f64() / 1e6,
        crate::status::human_bytes(report.payload_bytes),
        crate::status::human_bytes(non_zero),
        crate::status::human_bytes(report.zero_fill_bytes),
    );
    println!(
        "receiver state: {} ({}), watermark {} of {}",
        disk.state, disk.reason, disk.sync_watermark, disk.size
    );
    if let Some(at) = first_difference(&source, &image)? {
        bail!(
            "the staging copy {} differs from the source at byte {at}",
            image.display()
        );
    }
    println!(
        "verified: {} is byte-identical to the source",
        image.display()
    );
    if options.ebs {
        verify_recovery_point(&receiver, &fake_ebs, &source, &dir).await?;
    }
    receiver.shutdown().await;
    Ok(())
}

/// Waits for the first recovery point (cut when the sync completed), restores disk0 from
/// its snapshot in the in-memory EBS, and checks it against the source.
async fn verify_recovery_point(
    receiver: &Receiver,
    fake_ebs: &std::sync::Arc<blockferry_storage::ebs::fake::FakeEbs>,
    source: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let point = loop {
        let status = receiver.status()?;
        let server = status.servers.first().context("no server in status")?;
        if let Some(point) = server.recovery_points.last() {
            break point.clone();
        }
        if let Some(error) = &server.recovery_point_error {
            bail!("the recovery point failed: {error}");
        }
        if Instant::now() > deadline {
            bail!("no recovery point within 120 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let snapshot = &point.disks[0];
    println!(
        "recovery point {}: snapshot {} ({} blocks of 512 KiB; zero blocks left out) in {:.2} s",
        point.epoch,
        snapshot.snapshot_id,
        snapshot.changed_blocks,
        point.completed_at_ms.saturating_sub(point.cut_at_ms) as f64 / 1000.0
    );
    let restored_path = dir.join("restored.img");
    let client = std::sync::Arc::new(blockferry_storage::ebs::AnyEbs::Fake(
        std::sync::Arc::clone(fake_ebs),
    ));
    crate::snapshots::restore(
        &receiver.status()?,
        client,
        None,
        "disk0",
        Some(point.epoch),
        &restored_path,
    )
    .await?;
    match first_difference(source, &restored_path)? {
        None => {
            println!(
                "verified: the snapshot restores byte-identical to the source ({})",
                restored_path.display()
            );
            Ok(())
        }
        Some(at) => bail!("the restored snapshot differs from the source at byte {at}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn generated_images_have_the_requested_share_of_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.img");
        let size = 64 << 20;
        let non_zero = generate_image(&path, size, ImageLayout::default()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        assert_eq!(non_zero, size / 2);
        assert_eq!(first_difference(&path, &path).unwrap(), None);
    }
}

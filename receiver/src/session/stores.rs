//! Opening a session's staging stores, and refusing a session whose images are missing.

use std::sync::Arc;

use blockferry_storage::BlockStore;

use super::error::SessionError;
use crate::context::SessionContext;

pub(crate) enum OpenedStore {
    /// The store, and the image identity the catalog must record, if any.
    Ready(BlockStore, Option<crate::catalog::ImageId>),
    /// The image is not one the catalog can vouch for: why.
    Missing(String),
}

pub(crate) fn open_store(
    ctx: &SessionContext,
    server_id: &str,
    record: &crate::catalog::DiskRecord,
) -> Result<OpenedStore, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(dir) = record.image.parent() {
        blockferry_util::durable::ensure_private_dir(dir, "staging images")?;
    }
    let (store, stamp) = match crate::staging::open(server_id, record, ctx.engine.clone())? {
        crate::staging::Opened::Ready { store, stamp } => (store, stamp),
        crate::staging::Opened::Missing { why } => return Ok(OpenedStore::Missing(why)),
    };
    let store = match &ctx.ebs {
        Some(ebs) => ebs.open_store(server_id, &record.name, store, &record.image, record.size)?,
        None => BlockStore::File(store),
    };
    Ok(OpenedStore::Ready(store, stamp))
}

/// With any of a server's images missing, its session cannot start: each such disk is
/// recorded STALLED (`staging_missing`, naming the image), and the agent is told to come
/// back later. It keeps its changes meanwhile.
pub(crate) async fn refuse_missing_images(
    ctx: &SessionContext,
    server_id: &str,
    missing: Vec<(String, String)>,
) -> Option<SessionError> {
    let (first, detail) = missing.first().cloned()?;
    for (disk, detail) in &missing {
        tracing::error!(disk = %disk, "the staging image {detail}; the disk is STALLED until the image is back, or an operator runs `blockferry-receiver disk adopt` (keep this file, rescan it) or `disk reset` (sync again) for it");
    }
    let catalog = Arc::clone(&ctx.catalog);
    let server = server_id.to_owned();
    let recorded = tokio::task::spawn_blocking(move || {
        missing.iter().try_for_each(|(disk, detail)| {
            catalog.mark_stalled(&server, disk, crate::catalog::STAGING_MISSING, detail)
        })
    })
    .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::warn!("could not record the staging_missing stall in the catalog");
    }
    Some(SessionError::Stalled {
        disk: first,
        reason: crate::catalog::STAGING_MISSING,
        message: format!(
            "the staging image {detail}; an operator must bring it back, or run `blockferry-receiver disk adopt` or `disk reset`"
        ),
    })
}

//! What EC2 makes of snapshots: volumes (CreateVolume) and machine images
//! (RegisterImage), the two ways a launched recovery point becomes something that runs
//! in AWS. Apart from [`super::EbsClient`] because only `launch` needs it, and only on
//! the real service (moto in tests).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::EbsError;

/// What CreateVolume asks for: a volume holding a completed snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub snapshot: String,
    pub availability_zone: String,
    /// gp3, gp2, io2, …; EC2's own names.
    pub volume_type: String,
    pub tags: Vec<(String, String)>,
}

/// What RegisterImage asks for: an HVM machine image whose disks are snapshots, the
/// first one the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterImage {
    /// Unique within the account and region.
    pub name: String,
    pub description: String,
    /// `x86_64` or `arm64`.
    pub architecture: String,
    /// `uefi`, `legacy-bios` or `uefi-preferred`; None: the instance type's default.
    pub boot_mode: Option<String>,
    /// (device name, snapshot); the first is the root device.
    pub disks: Vec<(String, String)>,
    pub volume_type: String,
    pub tags: Vec<(String, String)>,
}

/// The EC2 calls `launch` makes.
pub trait Ec2Images: Send + Sync + 'static {
    /// Returns the new volume's id.
    fn create_volume(
        &self,
        request: CreateVolume,
    ) -> impl Future<Output = Result<String, EbsError>> + Send;

    /// `creating`, `available`, `error`, …
    fn volume_state(&self, volume: &str) -> impl Future<Output = Result<String, EbsError>> + Send;

    /// `pending`, `completed`, `error`, …, as EC2 sees a snapshot.
    fn snapshot_state(
        &self,
        snapshot: &str,
    ) -> impl Future<Output = Result<String, EbsError>> + Send;

    /// Returns the new image's id.
    fn register_image(
        &self,
        request: RegisterImage,
    ) -> impl Future<Output = Result<String, EbsError>> + Send;

    /// A volume already gone is not an error.
    fn delete_volume(&self, volume: &str) -> impl Future<Output = Result<(), EbsError>> + Send;
}

/// Polls `state` until it returns `wanted`; an `error` state or `timeout` fails with
/// what was seen, naming `what`.
pub async fn wait_for_state<F, Fut>(
    what: &str,
    wanted: &str,
    timeout: Duration,
    mut state: F,
) -> Result<(), EbsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<String, EbsError>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        let seen = match state().await {
            Ok(seen) => seen,
            // Just created: EC2 is eventually consistent.
            Err(err) if err.retryable() => format!("not visible yet ({err})"),
            Err(err) => return Err(err),
        };
        if seen == wanted {
            return Ok(());
        }
        if seen == "error" {
            return Err(EbsError::Rejected(format!(
                "{what} went into state error instead of {wanted}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(EbsError::Retryable(format!(
                "{what} is still {seen} after {} s (waited for {wanted}); look at it in the EC2 console and launch again if it failed",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_on_the_wanted_state_and_fails_on_error_or_timeout() {
        let states = Mutex::new(vec!["available", "creating", "creating"]);
        wait_for_state("volume vol-1", "available", Duration::from_secs(60), || {
            let next = states.lock().unwrap().pop().unwrap().to_owned();
            async move { Ok(next) }
        })
        .await
        .unwrap();

        let err = wait_for_state(
            "volume vol-2",
            "available",
            Duration::from_secs(60),
            || async { Ok("error".to_owned()) },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("vol-2"), "{err}");

        let err = wait_for_state(
            "volume vol-3",
            "available",
            Duration::from_secs(30),
            || async { Ok("creating".to_owned()) },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("still creating"), "{err}");

        let err = wait_for_state("image", "available", Duration::from_secs(30), || async {
            Err(EbsError::AccessDenied("no ec2:DescribeVolumes".into()))
        })
        .await
        .unwrap_err();
        assert!(matches!(err, EbsError::AccessDenied(_)));
    }
}

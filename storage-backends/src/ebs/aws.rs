//! [`EbsClient`] on the real service, through `aws-sdk-ebs`.
//!
//! Retries are ours alone: the SDK's own retry layer is disabled, so that one policy
//! ([`super::RetryPolicy`]) decides for every operation — including "not found" just
//! after StartSnapshot, which the SDK would not retry — and retry loops never nest. Each
//! attempt has a timeout, so a stalled connection becomes a retryable error.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ebs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use bytes::Bytes;

use super::ec2::{CreateVolume, Ec2Images, RegisterImage};
use super::{BlockIndex, BlockPage, EbsClient, EbsError, StartSnapshot};

/// Where and how to reach the service. Credentials come from the standard provider chain
/// (environment, profile, IMDS on EC2, …).
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// None: from the environment or profile (`AWS_REGION`, …).
    pub region: Option<String>,
    /// An endpoint other than the service's (an emulator, a VPC endpoint); None: from
    /// `AWS_ENDPOINT_URL_EBS` / `AWS_ENDPOINT_URL` if set, else the regional endpoint.
    pub endpoint_url: Option<String>,
    /// Longest single attempt of an operation (a 512 KiB PUT included).
    pub attempt_timeout: Option<Duration>,
    /// EC2's endpoint (DeleteSnapshot), when not the regional one; None: from
    /// `AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL` if set. Never `endpoint_url`: a VPC
    /// endpoint of EBS does not serve EC2.
    pub ec2_endpoint_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AwsEbs {
    client: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
}

impl AwsEbs {
    pub async fn connect(settings: &AwsSettings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(
                        settings.attempt_timeout.unwrap_or(Duration::from_secs(30)),
                    )
                    .build(),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let config = loader.load().await;
        let mut ebs = aws_sdk_ebs::config::Builder::from(&config);
        if let Some(url) = &settings.endpoint_url {
            ebs = ebs.endpoint_url(url.clone());
        }
        let mut ec2 = aws_sdk_ec2::config::Builder::from(&config);
        if let Some(url) = &settings.ec2_endpoint_url {
            ec2 = ec2.endpoint_url(url.clone());
        }
        Self {
            client: aws_sdk_ebs::Client::from_conf(ebs.build()),
            ec2: aws_sdk_ec2::Client::from_conf(ec2.build()),
        }
    }
}

/// Sorts an SDK failure by what to do about it.
fn classify<E>(operation: &str, err: SdkError<E>) -> EbsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("").to_owned();
            let status = service.raw().status().as_u16();
            let why = format!(
                "{operation}: {code} (HTTP {status}): {}",
                service.err().message().unwrap_or("no message")
            );
            match code.as_str() {
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "InvalidClientTokenId" => EbsError::AccessDenied(why),
                "ResourceNotFoundException" => EbsError::NotFound(why),
                // EC2's names for the same.
                "UnauthorizedOperation" | "AuthFailure" => EbsError::AccessDenied(why),
                "InvalidSnapshot.NotFound" | "InvalidVolume.NotFound" | "InvalidAMIID.NotFound" => {
                    EbsError::NotFound(why)
                }
                "ThrottlingException"
                | "RequestLimitExceeded"
                | "RequestThrottledException"
                | "InternalServerException"
                | "ServiceUnavailableException" => EbsError::Retryable(why),
                _ if status == 429 || status >= 500 => EbsError::Retryable(why),
                _ if status == 403 => EbsError::AccessDenied(why),
                _ => EbsError::Rejected(why),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            EbsError::Retryable(format!("{operation}: {}", DisplayErrorContext(&err)))
        }
        _ => EbsError::Rejected(format!("{operation}: {}", DisplayErrorContext(&err))),
    }
}

fn index_i32(index: BlockIndex) -> Result<i32, EbsError> {
    i32::try_from(index).map_err(|_| EbsError::Rejected(format!("block index {index} too large")))
}

impl EbsClient for AwsEbs {
    async fn start_snapshot(&self, request: StartSnapshot) -> Result<String, EbsError> {
        let tags = request
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect();
        let mut call = self
            .client
            .start_snapshot()
            .volume_size(i64::try_from(request.volume_size_gib).unwrap_or(i64::MAX))
            .description(&request.description)
            .set_tags(Some(tags))
            .timeout(i32::try_from(request.timeout_minutes).unwrap_or(i32::MAX))
            .client_token(&request.client_token);
        if let Some(parent) = &request.parent {
            call = call.parent_snapshot_id(parent);
        }
        if let Some(key) = &request.kms_key_arn {
            call = call.encrypted(true).kms_key_arn(key);
        }
        let output = call
            .send()
            .await
            .map_err(|e| classify("StartSnapshot", e))?;
        output
            .snapshot_id
            .ok_or_else(|| EbsError::Rejected("StartSnapshot returned no snapshot id".into()))
    }

    async fn put_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        data: Bytes,
        checksum: &str,
    ) -> Result<(), EbsError> {
        let length = i32::try_from(data.len()).unwrap_or(i32::MAX);
        self.client
            .put_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(index_i32(index)?)
            .data_length(length)
            .block_data(ByteStream::from(data))
            .checksum(checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .send()
            .await
            .map_err(|e| classify("PutSnapshotBlock", e))?;
        Ok(())
    }

    async fn complete_snapshot(
        &self,
        snapshot: &str,
        changed_blocks: u32,
        aggregate: &str,
    ) -> Result<(), EbsError> {
        self.client
            .complete_snapshot()
            .snapshot_id(snapshot)
            .changed_blocks_count(i32::try_from(changed_blocks).unwrap_or(i32::MAX))
            .checksum(aggregate)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
            .send()
            .await
            .map_err(|e| classify("CompleteSnapshot", e))?;
        Ok(())
    }

    async fn list_snapshot_blocks(
        &self,
        snapshot: &str,
        next_token: Option<String>,
    ) -> Result<BlockPage, EbsError> {
        let output = self
            .client
            .list_snapshot_blocks()
            .snapshot_id(snapshot)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| classify("ListSnapshotBlocks", e))?;
        let blocks = output
            .blocks()
            .iter()
            .filter_map(|b| {
                Some((
                    BlockIndex::try_from(b.block_index()?).ok()?,
                    b.block_token()?.to_owned(),
                ))
            })
            .collect();
        Ok(BlockPage {
            blocks,
            next_token: output.next_token().map(str::to_owned),
        })
    }

    async fn get_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        block_token: &str,
    ) -> Result<(Bytes, String), EbsError> {
        let output = self
            .client
            .get_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(index_i32(index)?)
            .block_token(block_token)
            .send()
            .await
            .map_err(|e| classify("GetSnapshotBlock", e))?;
        let checksum = output.checksum().unwrap_or_default().to_owned();
        let data = output
            .block_data
            .collect()
            .await
            .map_err(|e| EbsError::Retryable(format!("GetSnapshotBlock body: {e}")))?
            .into_bytes();
        Ok((data, checksum))
    }

    async fn list_changed_blocks(
        &self,
        first: Option<&str>,
        second: &str,
        next_token: Option<String>,
    ) -> Result<BlockPage, EbsError> {
        let output = self
            .client
            .list_changed_blocks()
            .set_first_snapshot_id(first.map(str::to_owned))
            .second_snapshot_id(second)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| classify("ListChangedBlocks", e))?;
        let blocks = output
            .changed_blocks()
            .iter()
            .filter_map(|b| {
                Some((
                    BlockIndex::try_from(b.block_index()?).ok()?,
                    b.second_block_token()?.to_owned(),
                ))
            })
            .collect();
        Ok(BlockPage {
            blocks,
            next_token: output.next_token().map(str::to_owned),
        })
    }

    async fn delete_snapshot(&self, snapshot: &str) -> Result<(), EbsError> {
        match self
            .ec2
            .delete_snapshot()
            .snapshot_id(snapshot)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) => match classify("DeleteSnapshot", err) {
                // Deleted already (by an earlier attempt whose answer was lost).
                EbsError::NotFound(_) => Ok(()),
                err => Err(err),
            },
        }
    }
}

fn ec2_tags(
    resource: aws_sdk_ec2::types::ResourceType,
    tags: &[(String, String)],
) -> aws_sdk_ec2::types::TagSpecification {
    aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(
            tags.iter()
                .map(|(key, value)| {
                    aws_sdk_ec2::types::Tag::builder()
                        .key(key)
                        .value(value)
                        .build()
                })
                .collect(),
        ))
        .build()
}

impl Ec2Images for AwsEbs {
    async fn create_volume(&self, request: CreateVolume) -> Result<String, EbsError> {
        use aws_sdk_ec2::types::{ResourceType, VolumeType};
        let output = self
            .ec2
            .create_volume()
            .snapshot_id(&request.snapshot)
            .availability_zone(&request.availability_zone)
            .volume_type(VolumeType::from(request.volume_type.as_str()))
            .tag_specifications(ec2_tags(ResourceType::Volume, &request.tags))
            .send()
            .await
            .map_err(|e| classify("CreateVolume", e))?;
        output
            .volume_id
            .ok_or_else(|| EbsError::Rejected("CreateVolume returned no volume id".into()))
    }

    async fn volume_state(&self, volume: &str) -> Result<String, EbsError> {
        let output = self
            .ec2
            .describe_volumes()
            .volume_ids(volume)
            .send()
            .await
            .map_err(|e| classify("DescribeVolumes", e))?;
        output
            .volumes()
            .first()
            .and_then(|v| v.state())
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| EbsError::NotFound(format!("DescribeVolumes: no volume {volume}")))
    }

    async fn snapshot_state(&self, snapshot: &str) -> Result<String, EbsError> {
        let output = self
            .ec2
            .describe_snapshots()
            .snapshot_ids(snapshot)
            .send()
            .await
            .map_err(|e| classify("DescribeSnapshots", e))?;
        output
            .snapshots()
            .first()
            .and_then(|s| s.state())
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| EbsError::NotFound(format!("DescribeSnapshots: no snapshot {snapshot}")))
    }

    async fn register_image(&self, request: RegisterImage) -> Result<String, EbsError> {
        use aws_sdk_ec2::types::{
            ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, ResourceType,
            VolumeType,
        };
        let Some((root, _)) = request.disks.first() else {
            return Err(EbsError::Rejected(
                "RegisterImage: an image needs a root disk".into(),
            ));
        };
        let mappings = request
            .disks
            .iter()
            .map(|(device, snapshot)| {
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .snapshot_id(snapshot)
                            .delete_on_termination(true)
                            .volume_type(VolumeType::from(request.volume_type.as_str()))
                            .build(),
                    )
                    .build()
            })
            .collect();
        let output = self
            .ec2
            .register_image()
            .name(&request.name)
            .description(&request.description)
            .architecture(ArchitectureValues::from(request.architecture.as_str()))
            .set_boot_mode(request.boot_mode.as_deref().map(BootModeValues::from))
            .virtualization_type("hvm")
            .ena_support(true)
            .root_device_name(root)
            .set_block_device_mappings(Some(mappings))
            .tag_specifications(ec2_tags(ResourceType::Image, &request.tags))
            .send()
            .await
            .map_err(|e| classify("RegisterImage", e))?;
        output
            .image_id
            .ok_or_else(|| EbsError::Rejected("RegisterImage returned no image id".into()))
    }

    async fn delete_volume(&self, volume: &str) -> Result<(), EbsError> {
        match self.ec2.delete_volume().volume_id(volume).send().await {
            Ok(_) => Ok(()),
            Err(err) => match classify("DeleteVolume", err) {
                EbsError::NotFound(_) => Ok(()),
                err => Err(err),
            },
        }
    }
}

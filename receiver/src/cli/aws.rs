//! How the receiver reaches AWS: the backend choice and the EBS and EC2 flags.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    File,
    Ebs,
}

/// How the EBS direct API is reached. Credentials come from the standard chain
/// (environment, profile, instance role).
#[derive(Debug, Clone, clap::Args)]
pub struct AwsArgs {
    /// AWS region (default: the standard chain, e.g. AWS_REGION or the instance's).
    #[arg(long)]
    ebs_region: Option<String>,
    /// Endpoint override, e.g. a VPC endpoint or a local emulator (AWS_ENDPOINT_URL_EBS
    /// and AWS_ENDPOINT_URL are read too).
    #[arg(long)]
    ebs_endpoint_url: Option<String>,
    /// EC2 endpoint override (DeleteSnapshot, for retention), e.g. a VPC endpoint of EC2
    /// or a local emulator (AWS_ENDPOINT_URL_EC2 and AWS_ENDPOINT_URL are read too).
    #[arg(long)]
    ec2_endpoint_url: Option<String>,
    /// Seconds one EBS request attempt may take before it is retried.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    ebs_attempt_timeout_secs: u64,
}

impl AwsArgs {
    pub(super) fn settings(&self) -> blockferry_storage::ebs::aws::AwsSettings {
        blockferry_storage::ebs::aws::AwsSettings {
            region: self.ebs_region.clone(),
            endpoint_url: self.ebs_endpoint_url.clone(),
            ec2_endpoint_url: self.ec2_endpoint_url.clone(),
            attempt_timeout: Some(std::time::Duration::from_secs(
                self.ebs_attempt_timeout_secs,
            )),
        }
    }
}

/// How `--backend ebs` makes its snapshots.
#[derive(Debug, Clone, clap::Args)]
pub struct EbsArgs {
    /// KMS key (ARN) that encrypts each chain's first snapshot; children inherit it.
    #[arg(long)]
    ebs_kms_key_arn: Option<String>,
    /// A tag on every snapshot, KEY=VALUE; repeatable. Each snapshot is also tagged with
    /// its source server, disk and recovery point.
    #[arg(long = "ebs-tag", value_parser = parse_tag)]
    ebs_tags: Vec<(String, String)>,
    /// Minutes a pending snapshot may go without a request before EBS fails it (10 to
    /// 4320).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(10..=4320))]
    ebs_snapshot_timeout_minutes: u32,
    /// Block uploads in flight per disk (EBS needs about 100 for 500 MB/s).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    ebs_concurrency: u32,
    /// MiB of consistent-point blocks kept in memory per disk while its snapshot uploads
    /// and writes go on (beyond it, writes to blocks not yet uploaded wait).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    ebs_preserve_mib: u64,
}

impl EbsArgs {
    pub(super) fn config(
        &self,
        aws: &AwsArgs,
        recovery_interval: std::time::Duration,
    ) -> anyhow::Result<crate::snapshots::EbsBackendConfig> {
        Ok(crate::snapshots::EbsBackendConfig {
            connection: crate::snapshots::EbsConnection::Aws(aws.settings()),
            chain: blockferry_storage::ebs::chain::ChainSettings {
                upload: blockferry_storage::ebs::upload::UploadConfig {
                    concurrency: self.ebs_concurrency as usize,
                    ..Default::default()
                },
                kms_key_arn: self.ebs_kms_key_arn.clone(),
                tags: self.ebs_tags.clone(),
                timeout_minutes: self.ebs_snapshot_timeout_minutes,
                preserve_limit: usize::try_from(self.ebs_preserve_mib << 20)
                    .context("--ebs-preserve-mib is too large")?,
            },
            recovery_interval,
        })
    }
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() || key.len() > 127 || value.len() > 255 {
        return Err(format!(
            "{text:?}: EBS tag keys are 1 to 127 characters, values at most 255"
        ));
    }
    if key.starts_with("aws:") || key.starts_with("blockferry:") {
        return Err(format!(
            "{text:?}: keys starting with aws: or blockferry: are reserved"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

//! Block tracking under device-mapper, in a Debian guest with a kernel of its own (this
//! host has no device-mapper module): LVM on the guest's second data disk, ext4 on a
//! logical volume, the blockferry agent in the guest tracking the disk beneath (the
//! physical volume) and replicating it to the receiver on the host. The writes through
//! the logical volume reach the disk as its own requests, so the staging image must end
//! byte-identical to the disk, with no rescan.
//!
//! Needs root, mmdebstrap and qemu-system-x86 (`scripts/test` installs them); the guest
//! image is built once and cached (see `common::guest`).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::guest::{self, TransferFile};
use common::*;

/// The guest's test: LVM and ext4 set up before the agent starts; after its initial
/// sync, files are written, copied and deleted through the logical volume (and the
/// freed space discarded), then the agent is stopped cleanly, which sends what is dirty.
const RUN: &str = r#"set -u
modprobe virtio_net
modprobe dm_mod
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
export DM_DISABLE_UDEV=1
lvm() { command lvm "$@" --config 'activation { udev_sync = 0 udev_rules = 0 }'; }
lvm pvcreate -q /dev/vdc || exit 10
lvm vgcreate -q vg /dev/vdc || exit 11
lvm lvcreate -q -y -L 40M -n lv vg || exit 12
lvm vgmknodes -q
mkfs.ext4 -q /dev/vg/lv || exit 13
./blockferry-agent run --capture block --progress log --receiver 10.0.2.2:PORT \
  --credentials creds --state-dir state --disk data=/dev/vdc > agent.log 2>&1 &
agent=$!
for i in $(seq 1 600); do
  grep -q "initial sync is durable" agent.log && break
  kill -0 $agent 2>/dev/null || { echo "the agent stopped"; cat agent.log; exit 20; }
  sleep 0.5
done
grep -q "initial sync is durable" agent.log || { echo "no initial sync"; cat agent.log; exit 21; }
mkdir -p /mnt/lv
mount /dev/vg/lv /mnt/lv || exit 30
dd if=/dev/urandom of=/mnt/lv/random bs=1M count=8 conv=fsync status=none || exit 31
cp -r /usr/share/doc /mnt/lv/doc || exit 32
rm -rf /mnt/lv/doc/[a-l]*
fstrim /mnt/lv 2>/dev/null
umount /mnt/lv || exit 33
lvm lvchange -q -an vg/lv
sync
sleep 1
kill -TERM $agent
wait $agent
status=$?
echo "agent exit $status"
cat agent.log
exit $status
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_lvm_on_a_tracked_disk_reach_the_staging_image() {
    let image = match tokio::task::spawn_blocking(guest::image).await.unwrap() {
        Ok(image) => image,
        Err(err) => panic!("cannot build the test guest: {err}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = dir.path().join("creds");
    credentials(&data, SERVER, &creds);
    let agent_bin =
        PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver")).with_file_name("blockferry-agent");
    let port = receiver.local_addr().port();
    let mut files = vec![
        (
            "run.sh".to_owned(),
            TransferFile::Text(RUN.replace("PORT", &port.to_string())),
        ),
        ("blockferry-agent".to_owned(), TransferFile::Copy(agent_bin)),
    ];
    for name in ["agent.key", "agent.crt", "ca.crt"] {
        files.push((
            format!("creds/{name}"),
            TransferFile::Copy(creds.join(name)),
        ));
    }
    let transfer = guest::transfer_disk(dir.path(), &files).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let disk = dir.path().join("data.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let _ = std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600));

    let run = tokio::task::spawn_blocking({
        let (transfer, disk) = (transfer.clone(), disk.clone());
        move || guest::boot(&image, &transfer, &[&disk], Duration::from_secs(600))
    })
    .await
    .unwrap()
    .unwrap();
    eprintln!("the guest ran under {}", run.accelerator);
    assert_eq!(
        run.exit(),
        Some("0"),
        "the guest's test failed; its console:\n{}",
        run.console
    );
    let log = guest::read_back(&transfer, "agent.log").unwrap_or_default();
    assert!(
        log.contains("block-layer change tracking started"),
        "the agent did not track the disk:\n{log}"
    );

    // The initial sync was durable before the writes began, so what they wrote went
    // out because tracking saw it: at least the 8 MiB of random data.
    let payload: u64 = log
        .split("payload_bytes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no payload figure in the agent's log:\n{log}"));
    assert!(
        payload >= 8 << 20,
        "only {payload} bytes sent after the writes through the logical volume:\n{log}"
    );

    let status = receiver.status().unwrap();
    let server = status
        .servers
        .iter()
        .find(|s| s.server_id == SERVER)
        .expect("the guest's server is known");
    let disk_status = server.disks.iter().find(|d| d.name == "data").unwrap();
    let noticed_loss =
        log.contains("dropped block-layer events") || log.contains("no block-layer event reported");
    if noticed_loss {
        eprintln!("the guest's agent noticed lost block-layer events");
    } else {
        assert_eq!(
            disk_status.last_rescan_reason, None,
            "nothing was lost, nothing to rescan: {disk_status:?}"
        );
    }
    assert_identical(&disk, &staging_image(&data, SERVER, "data"));
    receiver.shutdown().await;
}

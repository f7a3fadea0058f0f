//! The same store on a raw block device (a loop device): size from BLKGETSIZE64, zeroing
//! with FALLOC_FL_ZERO_RANGE in the aligned middle and zero writes at unaligned edges.
//! Skips, saying why, where loop devices cannot be created (not root, no loop module).

use std::process::Command;

use blockferry_storage::*;

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn attach(image: &std::path::Path) -> Option<LoopDevice> {
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "SKIP: cannot attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(LoopDevice(
        String::from_utf8(out.stdout).ok()?.trim().to_owned(),
    ))
}

#[test]
fn loop_device_store_matches_a_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("backing.img");
    let size = 8u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let Some(device) = attach(&image) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let path = std::path::Path::new(&device.0);
        for engine in [Engine::start(IoEngine::Uring, 1).unwrap(), Engine::sync()] {
            // A disk smaller than the device is fine; a larger one is refused.
            let err = FileStore::open_or_create(path, size + 1, engine.clone()).unwrap_err();
            assert!(matches!(err, StoreError::DeviceTooSmall { .. }), "{err}");
            let dev = FileStore::open_or_create(path, size - 4096, engine.clone()).unwrap();
            assert_eq!(dev.device_kind(), DeviceKind::BlockDevice);
            let dev = BlockStore::File(dev);
            let model = BlockStore::Memory(MemoryStore::new((size - 4096) as usize));
            for store in [&dev, &model] {
                store.write_at(0, vec![0xAB; 3 << 20]).await.unwrap();
                store.write_zeroes(1000, 2 << 20).await.unwrap();
                store.write_at(5 << 20, vec![0xCD; 100_000]).await.unwrap();
                store.write_zeroes((5 << 20) + 4096, 8192).await.unwrap();
                let _ = store.flush().await.unwrap();
            }
            let a = dev.read_at(0, (size - 4096) as usize).await.unwrap();
            let b = model.read_at(0, (size - 4096) as usize).await.unwrap();
            assert!(
                a == b,
                "{} engine: block device image differs from the model",
                engine.kind()
            );
            assert!(
                dev.write_at(size - 4096, vec![1]).await.is_err(),
                "past the disk's end"
            );
        }
    });
}

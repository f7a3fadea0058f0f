//! The io_uring and sync engines must be indistinguishable: the same random operations
//! through both, and through an in-memory model, give identical bytes.

use std::sync::OnceLock;

use blockferry_storage::*;
use proptest::prelude::*;

const DISK_SIZE: u64 = 3 << 20;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

fn uring() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Engine::start(IoEngine::Uring, 2).expect("io_uring must work on this machine")
        })
        .clone()
}

#[derive(Debug, Clone)]
enum Action {
    Write { offset: u64, len: usize, seed: u8 },
    Zero { offset: u64, len: u64 },
    Read { offset: u64, len: usize },
    Flush,
}

fn action() -> impl Strategy<Value = Action> {
    // Offsets cluster around interesting places: block edges, the 1 MiB zero-write chunk,
    // and the end of the disk.
    let offset = prop_oneof![
        0..DISK_SIZE,
        (0..DISK_SIZE / 4096).prop_map(|b| b * 4096),
        (DISK_SIZE - 70_000)..DISK_SIZE,
    ];
    prop_oneof![
        4 => (offset.clone(), 1usize..300_000, any::<u8>())
            .prop_map(|(offset, len, seed)| Action::Write { offset, len, seed }),
        2 => (offset.clone(), 1u64..1_500_000).prop_map(|(offset, len)| Action::Zero { offset, len }),
        2 => (offset, 1usize..200_000).prop_map(|(offset, len)| Action::Read { offset, len }),
        1 => Just(Action::Flush),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Clamps an action to the disk, so that most actions are valid; the out-of-range ones
/// are checked separately.
fn clamp(offset: u64, len: u64) -> u64 {
    len.min(DISK_SIZE - offset)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn uring_and_sync_engines_agree(actions in proptest::collection::vec(action(), 1..40)) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let stores = [
                BlockStore::File(FileStore::open_or_create(&dir.path().join("uring.img"), DISK_SIZE, uring()).unwrap()),
                BlockStore::File(FileStore::open_or_create(&dir.path().join("sync.img"), DISK_SIZE, Engine::sync()).unwrap()),
                BlockStore::Memory(MemoryStore::new(DISK_SIZE as usize)),
            ];
            for action in &actions {
                let mut reads = Vec::new();
                for store in &stores {
                    match *action {
                        Action::Write { offset, len, seed } => {
                            let len = clamp(offset, len as u64) as usize;
                            if len > 0 {
                                store.write_at(offset, pattern(len, seed)).await.unwrap();
                            }
                        }
                        Action::Zero { offset, len } => {
                            store.write_zeroes(offset, clamp(offset, len)).await.unwrap();
                        }
                        Action::Read { offset, len } => {
                            let len = clamp(offset, len as u64) as usize;
                            reads.push(store.read_at(offset, len).await.unwrap());
                        }
                        Action::Flush => {
                            let _proof = store.flush().await.unwrap();
                        }
                    }
                }
                if let [a, rest @ ..] = reads.as_slice() {
                    for b in rest {
                        prop_assert!(a == b, "reads differ after {:?}", action);
                    }
                }
            }
            let images: Vec<Vec<u8>> = futures_all(&stores).await;
            prop_assert!(images[0] == images[2], "io_uring image differs from the model");
            prop_assert!(images[1] == images[2], "sync image differs from the model");
            Ok(())
        })?;
    }
}

async fn futures_all(stores: &[BlockStore]) -> Vec<Vec<u8>> {
    let mut images = Vec::new();
    for store in stores {
        images.push(store.read_at(0, DISK_SIZE as usize).await.unwrap());
    }
    images
}

#[test]
fn concurrent_writes_to_disjoint_ranges_all_land() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(BlockStore::File(
            FileStore::open_or_create(&dir.path().join("c.img"), DISK_SIZE, uring()).unwrap(),
        ));
        let mut tasks = Vec::new();
        for i in 0..48u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.write_at(i * 65536, vec![i as u8 + 1; 65536]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let _ = store.flush().await.unwrap();
        for i in 0..48u64 {
            let got = store.read_at(i * 65536, 65536).await.unwrap();
            assert!(got.iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
    });
}

#[test]
fn out_of_range_operations_are_rejected_and_change_nothing() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        for engine in [uring(), Engine::sync()] {
            let path = dir.path().join(format!("{}.img", engine.kind()));
            let store = BlockStore::File(FileStore::open_or_create(&path, 8192, engine).unwrap());
            let err = store.write_at(8190, vec![1; 3]).await.unwrap_err();
            assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
            assert!(err.to_string().contains("beyond the end"), "{err}");
            assert!(store.write_at(u64::MAX, vec![1]).await.is_err());
            assert!(store.write_zeroes(8000, 193).await.is_err());
            assert!(store.read_at(8192, 1).await.is_err());
            // Nothing was written, and the image did not grow.
            assert_eq!(store.read_at(0, 8192).await.unwrap(), vec![0; 8192]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
        }
    });
}

#[test]
fn staging_file_is_sparse_and_zero_fill_punches_holes() {
    use std::os::unix::fs::MetadataExt;
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let size = 64 << 20;
        let store = BlockStore::File(FileStore::open_or_create(&path, size, uring()).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().blocks(),
            0,
            "a new image uses no space"
        );
        store.write_at(0, vec![7; 16 << 20]).await.unwrap();
        let _ = store.flush().await.unwrap();
        let full = std::fs::metadata(&path).unwrap().blocks();
        store.write_zeroes(0, 16 << 20).await.unwrap();
        let _ = store.flush().await.unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            after < full / 2,
            "zero-fill gave space back: {full} -> {after} blocks"
        );
        assert_eq!(store.read_at(4096, 4096).await.unwrap(), vec![0; 4096]);
    });
}

#[test]
fn reopening_keeps_data_and_resizes_to_the_disk() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        {
            let store =
                BlockStore::File(FileStore::open_or_create(&path, 8192, Engine::sync()).unwrap());
            store.write_at(100, b"kept".to_vec()).await.unwrap();
            let _ = store.flush().await.unwrap();
        }
        let store = BlockStore::File(FileStore::open_or_create(&path, 16384, uring()).unwrap());
        assert_eq!(store.size(), 16384);
        assert_eq!(store.read_at(100, 4).await.unwrap(), b"kept");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16384);
    });
}

#[test]
fn io_engine_setting_parses_strictly() {
    assert_eq!("auto".parse::<IoEngine>(), Ok(IoEngine::Auto));
    assert_eq!("uring".parse::<IoEngine>(), Ok(IoEngine::Uring));
    assert_eq!("sync".parse::<IoEngine>(), Ok(IoEngine::Sync));
    let err = "io_uring".parse::<IoEngine>().unwrap_err();
    assert!(err.contains("expected auto, uring or sync"), "{err}");
}

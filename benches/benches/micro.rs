//! Micro-benchmarks of the hot paths: the frame codec on a 1 MiB write frame, block
//! digests (what a rescan computes on both sides), and the staging stores' apply path.
//!
//! `cargo bench -p blockferry-bench` (add `-- codec` etc. to pick one). Criterion prints
//! each figure with its confidence interval and the change since the previous run.

use std::hint::black_box;
use std::time::Duration;

use blockferry_proto::{FrameBuffer, WriteFlags, WriteHeader, block_digest, encode_write};
use blockferry_storage::{BlockStore, Engine, FileStore, IoEngine, MemoryStore};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MIB: usize = 1 << 20;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn codec(c: &mut Criterion) {
    let data = random_bytes(MIB, 1);
    let header = WriteHeader {
        disk: 3,
        flags: WriteFlags::default(),
        offset: 42 << 20,
        len: MIB as u32,
        epoch: 7,
    };
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(MIB as u64));
    group.bench_function("encode 1 MiB write", |b| {
        let mut out = Vec::with_capacity(MIB + 64);
        b.iter(|| {
            out.clear();
            encode_write(&mut out, black_box(&header), black_box(&data));
            black_box(out.len())
        });
    });
    let mut frame = Vec::new();
    encode_write(&mut frame, &header, &data);
    // As the receiver reads: bytes arrive into the frame buffer, the frame comes out.
    group.bench_function("decode 1 MiB write (frame buffer)", |b| {
        let mut buffer = FrameBuffer::new();
        b.iter(|| {
            let mut at = 0;
            let mut frames = 0;
            while at < frame.len() {
                let spare = buffer.spare();
                let n = spare.len().min(frame.len() - at);
                spare[..n].copy_from_slice(&frame[at..at + n]);
                buffer.filled(n);
                at += n;
                while let Some(decoded) = buffer.next_frame().expect("a valid frame") {
                    black_box(&decoded);
                    frames += 1;
                }
            }
            assert_eq!(frames, 1);
        });
    });
    group.bench_function("decode 1 MiB write (decode)", |b| {
        b.iter(|| black_box(blockferry_proto::decode(black_box(&frame)).expect("valid")));
    });
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let data = random_bytes(MIB, 2);
    let mut group = c.benchmark_group("block digests");
    group.throughput(Throughput::Bytes(MIB as u64));
    group.bench_function("xxh3-128 of 4 KiB blocks, 1 MiB", |b| {
        b.iter(|| {
            let mut all = 0u128;
            for block in black_box(&data).chunks(4096) {
                all ^= block_digest(block);
            }
            black_box(all)
        });
    });
    group.finish();
}

/// 16 writes of 1 MiB each, then a flush: one barrier interval's worth of the receiver's
/// apply path, durable at the end.
fn apply(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let chunk = random_bytes(MIB, 3);
    let dir = tempfile::Builder::new()
        .prefix("blockferry-micro")
        .tempdir_in("/var/tmp")
        .expect("a temp dir under /var/tmp");
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Bytes(16 * MIB as u64));
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(20);
    let mut stores = vec![(
        "memory".to_owned(),
        BlockStore::Memory(MemoryStore::new(64 * MIB)),
    )];
    for engine in [IoEngine::Uring, IoEngine::Sync] {
        let started = runtime.block_on(async { Engine::start(engine, 1) });
        match started {
            Ok(started) => {
                let kind = started.kind();
                let path = dir.path().join(format!("{kind}.img"));
                let store = FileStore::open_or_create(&path, 64 * MIB as u64, started)
                    .expect("a staging file");
                stores.push((format!("file, {kind}"), BlockStore::File(store)));
            }
            Err(err) => eprintln!("skipping the {engine} engine: {err}"),
        }
    }
    for (name, store) in stores {
        let store = std::sync::Arc::new(store);
        let mut next = 0u64;
        group.bench_function(format!("16 x 1 MiB writes + flush, {name}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    // Submitted together, as the receiver's pipeline does.
                    let mut writes = tokio::task::JoinSet::new();
                    for _ in 0..16 {
                        let offset = next % (64 * MIB as u64);
                        next += MIB as u64;
                        let (store, chunk) = (std::sync::Arc::clone(&store), chunk.clone());
                        writes.spawn(async move { store.write_at(offset, chunk).await });
                    }
                    while let Some(result) = writes.join_next().await {
                        result.expect("a task").expect("a staging write");
                    }
                    let _flushed = store.flush().await.expect("a flush");
                });
            });
        });
    }
    group.finish();
}

criterion_group!(benches, codec, hashing, apply);
criterion_main!(benches);

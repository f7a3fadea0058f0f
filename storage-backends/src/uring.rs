//! The io_uring engine: dedicated writer threads, each running a tokio-uring runtime with
//! its own ring. Requests reach a thread through a bounded channel (a full channel is
//! backpressure on the submitter); each request's buffer is owned by its in-flight task
//! until the kernel completes it, and a thread drains every in-flight operation before it
//! exits.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::fs::File as UringFile;

use crate::engine::{FileHandle, Op, OpOutput};
use crate::error::StoreError;
use crate::zero::{self, ZeroStep};
use blockferry_util::device::DeviceKind;

/// Submission queue entries per ring. Enough to keep a fast NVMe device busy; tokio-uring
/// submits early when the queue fills, so this is not a limit on in-flight operations.
const RING_ENTRIES: u32 = 256;

/// Requests waiting for a writer thread. The receiver bounds in-flight *bytes* itself;
/// this bounds the number of requests so a burst of tiny writes cannot queue unboundedly.
const QUEUE_DEPTH: usize = 1024;

/// How often (in requests) a thread forgets the files whose stores were dropped.
const PRUNE_EVERY: u32 = 256;

pub(crate) struct UringPool {
    workers: Vec<Worker>,
}

struct Worker {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

struct Request {
    file: Arc<FileHandle>,
    op: Op,
    reply: oneshot::Sender<io::Result<OpOutput>>,
}

impl UringPool {
    /// Starts `threads` writer threads (at least one). Fails, without panicking, when the
    /// kernel refuses to create a ring (old kernel, seccomp, `kernel.io_uring_disabled`).
    pub(crate) fn start(threads: usize) -> Result<Self, StoreError> {
        let mut workers = Vec::new();
        for index in 0..threads.max(1) {
            let (requests, queue) = mpsc::channel(QUEUE_DEPTH);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("bf-uring-{index}"))
                .spawn(move || {
                    let mut builder = tokio_uring::builder();
                    builder.entries(RING_ENTRIES);
                    match tokio_uring::Runtime::new(&builder) {
                        Ok(runtime) => {
                            let _ = ready_tx.send(Ok(()));
                            runtime.block_on(serve(queue));
                        }
                        Err(err) => {
                            let _ = ready_tx.send(Err(err));
                        }
                    }
                })
                .map_err(StoreError::UringUnavailable)?;
            let started = ready_rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("io_uring thread died while starting")));
            if let Err(err) = started {
                let _ = thread.join();
                return Err(StoreError::UringUnavailable(err));
            }
            workers.push(Worker {
                requests: Some(requests),
                thread: Some(thread),
            });
        }
        Ok(Self { workers })
    }

    pub(crate) async fn execute(&self, file: &Arc<FileHandle>, op: Op) -> io::Result<OpOutput> {
        // One file always goes to the same thread, which keeps one handle for it.
        let index = usize::try_from(file.id % self.workers.len() as u64).unwrap_or(0);
        let sender = self.workers[index].requests.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            file: Arc::clone(file),
            op,
            reply,
        };
        sender.send(request).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> io::Error {
    io::Error::other(StoreError::EngineStopped)
}

impl Drop for UringPool {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            // Closing the channel lets the thread drain its in-flight operations and exit.
            worker.requests.take();
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

async fn serve(mut queue: mpsc::Receiver<Request>) {
    let mut files: HashMap<u64, (Weak<FileHandle>, Rc<UringFile>)> = HashMap::new();
    let mut in_flight = JoinSet::new();
    let mut served: u32 = 0;
    while let Some(request) = queue.recv().await {
        served = served.wrapping_add(1);
        if served.is_multiple_of(PRUNE_EVERY) {
            files.retain(|_, (store, _)| store.strong_count() > 0);
        }
        while in_flight.try_join_next().is_some() {}

        let file = match files.entry(request.file.id) {
            Entry::Occupied(entry) => Rc::clone(&entry.get().1),
            Entry::Vacant(entry) => match request.file.file.try_clone() {
                Ok(std_file) => {
                    let file = Rc::new(UringFile::from_std(std_file));
                    entry.insert((Arc::downgrade(&request.file), Rc::clone(&file)));
                    file
                }
                Err(err) => {
                    let _ = request.reply.send(Err(err));
                    continue;
                }
            },
        };
        in_flight.spawn_local(async move {
            let result = run(&file, request.file.kind, request.op).await;
            // The submitter may have gone away; the I/O has happened either way.
            let _ = request.reply.send(result);
        });
    }
    while in_flight.join_next().await.is_some() {}
}

async fn run(file: &UringFile, kind: DeviceKind, op: Op) -> io::Result<OpOutput> {
    match op {
        Op::Write { offset, data } => {
            let (result, _data) = file.write_all_at(data, offset).await;
            result.map(|()| OpOutput::Done)
        }
        Op::Read { offset, len } => {
            if len == 0 {
                return Ok(OpOutput::Data(Vec::new()));
            }
            let (result, buf) = file
                .read_exact_at(Vec::with_capacity(len).slice(0..len), offset)
                .await;
            result.map(|()| OpOutput::Data(buf.into_inner()))
        }
        Op::Zero { offset, len } => {
            for step in zero::plan(kind, offset, len) {
                match step {
                    ZeroStep::Fallocate { offset, len, mode } => {
                        if let Err(err) = file.fallocate(offset, len, mode).await {
                            if !zero::is_unsupported(&err) {
                                return Err(err);
                            }
                            write_zeros(file, offset, len).await?;
                        }
                    }
                    ZeroStep::Write { offset, len } => write_zeros(file, offset, len).await?,
                }
            }
            Ok(OpOutput::Done)
        }
        Op::Flush => file.sync_data().await.map(|()| OpOutput::Done),
    }
}

async fn write_zeros(file: &UringFile, offset: u64, len: u64) -> io::Result<()> {
    for (at, n) in zero::write_chunks(offset, len) {
        let (result, _) = file.write_all_at(vec![0u8; n], at).await;
        result?;
    }
    Ok(())
}

//! Named maximums for every length on the wire, each with the reason it is that size.
//!
//! A decoder checks these before it reserves memory, so a hostile or buggy peer can never
//! make the other side allocate more than one frame's worth.

/// Largest data payload of one `Write`. Large enough to keep the per-frame overhead
/// (header, TLS record split, syscall) under 0.01 %, small enough that a receiver with
/// hundreds of streams never buffers more than a few MiB per stream.
pub const MAX_WRITE_DATA: u32 = 1 << 20;

/// Largest payload of a control frame (Hello, Welcome, Heartbeat, …). The biggest real
/// one is a Hello with a full inventory: 50 disks, a few hundred CPUs and IPs, which
/// stays far below this.
pub const MAX_CONTROL_PAYLOAD: u32 = 256 << 10;

/// Fixed part of a `Write` payload ahead of its data: disk, flags, offset, len, epoch.
pub const WRITE_FIXED_LEN: u32 = 2 + 2 + 8 + 4 + 8;

/// Largest payload of any frame; the decoder rejects a header announcing more before it
/// waits for (or allocates) the payload.
pub const MAX_FRAME_PAYLOAD: u32 = WRITE_FIXED_LEN + MAX_WRITE_DATA;

/// Longest string field (host name, OS description, disk name, error message). Host and
/// device names are far shorter; error messages are truncated by the sender.
pub const MAX_STRING_LEN: usize = 1024;

/// Longest disk name. Disk names become file names in the receiver's staging directory,
/// so they stay well inside NAME_MAX.
pub const MAX_DISK_NAME_LEN: usize = 64;

/// Most disks one source server can replicate: a product limit (50), also the bound on
/// every per-disk list in a frame.
pub const MAX_DISKS: usize = 50;

/// Most disks an inventory may list, replicated or not (a server can have many more block
/// devices than it replicates: partitions, loop devices, …).
pub const MAX_INVENTORY_DISKS: usize = 1024;

/// Most CPU entries in an inventory (one per distinct model/socket, not per core).
pub const MAX_CPUS: usize = 1024;

/// Most private IP addresses in an inventory.
pub const MAX_IPS: usize = 256;

/// Most parallel streams (TCP connections) one agent session may open: a product limit.
pub const MAX_STREAMS: u8 = 5;

/// Most block digests one `SumRequest` may ask for (and one `SumReply` carries): 8192
/// xxh3-128 digests are 128 KiB, a control-sized frame, and at 4 KiB blocks they cover
/// 32 MiB, enough to keep the receiver's reads large.
pub const MAX_SUM_BLOCKS: u32 = 8192;

/// Smallest and largest digest block: the dirty map's block, up to one write frame.
pub const MIN_SUM_BLOCK_SIZE: u32 = 4096;
pub const MAX_SUM_BLOCK_SIZE: u32 = 1 << 20;

/// Most bytes one `SumRequest` may make the receiver read, so that one request is a
/// bounded amount of work whatever its block size.
pub const MAX_SUM_RANGE: u64 = 64 << 20;

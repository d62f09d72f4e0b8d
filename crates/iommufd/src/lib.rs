//! twinmmu's model of the Linux kernel's iommufd object layer (`/dev/iommu`), as a Rust API.
//!
//! An [`Iommufd`] is an open context. Its operations are the ioctls of iommufd.md §3, with the
//! kernel's checks in the kernel's order and its errno values ([`Errno`]): the `uapi` crate
//! only decodes and encodes bytes around them. Objects live in a per-context table with the
//! kernel's ID rules (§1.3) and dependency graph (§4.2); destroying a used object is EBUSY,
//! releasing the context tears everything down (§4.5).
//!
//! Memory comes from [`Backing`]s: nothing is pinned until a paging domain is attached or an
//! access pins (lazy pinning). Drivers implement the traits of [`driver`]; [`mock`] is the
//! selftest's mock IOMMU, used by this crate's tests and by the ABI's IOMMU_TEST_CMD.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backing;
mod ctx;
pub mod driver;
mod errno;
pub mod eventq;
mod iopt;
pub mod mock;
mod pages;
mod table;
mod types;

pub use backing::{Backing, BackingKind, PhysBacking, PhysMemory, PhysRun, SparseMemory};
pub use ctx::{
    AccessOps, FaultFd, HwInfoReply, Iommufd, IovaRanges, MapSource, MmapRegion, SelftestDomain,
    VeventqFd,
};
pub use driver::{
    DeviceEvents, Domain, HwInfo, HwQueueInit, IommuDevice, IommuDriver, KvmRef, MmapWindow,
    NestedDomain, PageResponse, PagingDomain, Viommu, ViommuAlloc, ViommuCore,
};
pub use errno::Errno;
pub use eventq::{PageRequest, VEVENT_HEADER_SIZE};
pub use types::*;

//! twinmmu's model of the Linux kernel's iommufd object layer (`/dev/iommu`), as a Rust API.
//!
//! An [`Iommufd`] is an open context. Its operations are the ioctls of iommufd.md §3, with the
//! kernel's checks in the kernel's order and its errno values ([`Errno`]): the `uapi` crate
//! only decodes and encodes bytes around them (reserved-field checks, which always come first,
//! are left to it). Objects live in a per-context table with the kernel's ID rules (§1.3) and
//! dependency graph (§4.2); destroying a used object is EBUSY, and releasing the context tears
//! everything down (§4.5).
//!
//! Memory comes from [`Backing`]s: nothing is pinned until a paging domain is attached or an
//! access pins (lazy pinning). [`PhysBacking`] is a backing over plain physical addresses of
//! any [`PhysMemory`].
//!
//! # The driver boundary
//!
//! An IOMMU driver (the mock in [`mock`], arm-smmu-v3 in its own crate) implements:
//! - [`IommuDevice`] for its devices: the instance behind it, its iommu_group, PASID width,
//!   capabilities (dirty tracking), reserved regions.
//! - [`IommuDriver`] for an instance: `hw_info` (GET_HW_INFO), `device_bound`/`device_unbound`
//!   (receives a [`DeviceEvents`] to report page requests from any thread),
//!   `domain_alloc_paging` (flags NEST_PARENT / DIRTY_TRACKING / PASID: the driver builds the
//!   stage-2 of a nesting parent), `domain_alloc_nested` (a nested domain on a parent, parsing
//!   user data such as `iommu_hwpt_arm_smmuv3`, EIO for illegal guest fields), `viommu_alloc`
//!   (receives the parent domain, the KVM handle the device was bound with, the user data and a
//!   [`ViommuCore`]; owns per-vIOMMU state such as the VMID), `attach_dev`/`detach_dev` (RID
//!   and PASID, with replace; EINVAL means incompatible) and `page_response`.
//! - [`PagingDomain`]: `map` of physically contiguous runs of pinned memory, `unmap` which must
//!   complete the driver's invalidation before returning (for a nesting parent: every VMID
//!   using it), aperture and page sizes, dirty tracking.
//! - [`NestedDomain`]: `cache_invalidate_user` over an [`InvalidateArray`] with the
//!   `entry_num` contract.
//! - [`Viommu`]: `alloc_domain_nested`, `cache_invalidate`, `vdevice_init`/`vdevice_destroy`
//!   (virtual id → device), `hw_queue_init`/`hw_queue_destroy` (pinned, physically contiguous
//!   ring base; indexes in order, destroyed in reverse), `destroy`.
//!
//! The core gives the driver [`ViommuCore`] (report a vEVENTQ record, look up a vDEVICE's
//! virtual id or device, register mmap windows) and [`DeviceEvents`] (page requests to the
//! FAULT queue of the attached HWPT). Both carry their own locks, so a driver's event-queue
//! reader thread can use them while the context is busy; drivers must never call back into
//! [`Iommufd`] from a trait method (the core holds its lock there).
//!
//! iommufd is not a user of KVM: [`KvmRef`] carries the VMM's VM handle from
//! [`Iommufd::bind_device`] to [`IommuDriver::viommu_alloc`] as a type-erased `Arc` that the
//! driver downcasts to its concrete type (see its documentation).

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

pub use backing::{Backing, BackingKind, HwMemory, PhysBacking, PhysMemory, PhysRun};
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

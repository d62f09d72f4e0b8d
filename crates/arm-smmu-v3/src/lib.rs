//! The Linux `arm-smmu-v3` driver (with its iommufd half, `arm-smmu-v3-iommufd.c`, and a
//! Tegra241-CMDQV-style HW queue) behind twinmmu-iommufd's driver traits, driving the
//! `twinmmu-hw` SMMU only the way Linux drives silicon: ID registers read over MMIO; stream
//! table, context descriptors, queues and translation tables written into host memory taken
//! from a [`FrameAllocator`](twinmmu_hw::FrameAllocator); CFGI/TLBI/SYNC through the command
//! queue ring; events read from the event queue ring.
//!
//! - [`ArmSmmuV3::probe`]: IDR probe, stream table (two-level with SPLIT 8 when IDR0.ST_LEVEL
//!   says so, else linear), command/event/PRI queues, CR1/CR2/GBPA, the CR0/CR0ACK enable
//!   handshake, CFGI_ALL and TLB invalidation, BTM (CR2.PTM cleared) when IDR0.BTM and the
//!   host's E2H mode allow it (smmu_kvm.md §4.2).
//! - [`Master`]: a device (one StreamID) behind the SMMU, [`IommuDevice`] for iommufd.
//! - Paging domains ([`S1Domain`], [`S2Domain`]) built with the `vmsa` table builder; unmap
//!   invalidates every VMID/ASID that may cache the range (TLBI_S2_IPA with ranges when
//!   IDR3.RIL, then TLBI_NH_ALL for nesting).
//! - [`VSmmu`]: the vIOMMU. Its VMID is the VM's pinned KVM VMID under BTM (smmu_kvm.md §3,
//!   threads/001) or a private one; nested domains from guest STEs; trapped invalidation
//!   (§5.6); vDEVICEs; HW queues on a VINTF page (§5, threads/003).
//! - Events ([`ArmSmmuV3::process_events`]): forwarded to the owning vIOMMU's vEVENTQ with the
//!   virtual StreamID, stalls and PRI page requests to the FAULT path.
//!
//! # Errno choices
//!
//! As the kernel where it has an answer; where the pinned-VMID RFC left it open, chosen as the
//! kernel's conventions suggest:
//! - VIOMMU_ALLOC under BTM on a device bound without a KVM, or with a handle that is not a
//!   `twinmmu_kvm::Vm`: EINVAL (a required input is missing or wrong).
//! - KVM and SMMU VMID widths differ, or KVM has pinning disabled: EOPNOTSUPP (this
//!   combination cannot be supported at all).
//! - No pinnable KVM VMID left, no private VMID, ASID, VINTF or VINTF SID slot left: ENOSPC
//!   (the kernel's `ida_alloc` failure).
//! - Guest STE with a field the guest does not own, a reserved Config or EATS: EIO (the
//!   kernel's "EIO is reserved for invalid STE data"). A guest command that may not be
//!   trapped, or names an unknown vSID: EIO, `entry_num` = the entries before it.
//! - A command queue that makes no progress: ETIMEDOUT (`arm_smmu_cmdq_issue_cmdlist`).
//! - HWPT_INVALIDATE on a vIOMMU with `entry_num` 0: EINVAL, as the kernel's full-array copy
//!   (`iommu_copy_struct_from_full_user_array`) returns.
//! - Attach on a PASID: EINVAL (the model's masters have no SubstreamIDs).
//!
//! One behaviour differs from the kernel on purpose: when HWPT_INVALIDATE rejects entry k,
//! the converted entries before it that were still waiting for their batch are issued (with a
//! CMD_SYNC) before returning, so `entry_num = k` is true; the kernel returns `entry_num = k`
//! without issuing them.
//!
//! [`IommuDevice`]: twinmmu_iommufd::IommuDevice

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cd;
mod cmdq;
pub mod defs;
mod device;
mod domain;
mod events;
mod ida;
mod master;
mod memory;
mod ops;
mod strtab;
mod trace;
mod vcmdq;
mod viommu;

pub use cmdq::CmdqError;
pub use device::{ArmSmmuV3, CmdqvConfig, DriverStats, Features, Options, ProbeError};
pub use domain::{S1Domain, S2Domain};
pub use events::EventDisposition;
pub use master::{MSI_IOVA_BASE, MSI_IOVA_LENGTH};
pub use master::{Master, MasterOptions};
pub use memory::{HwMemory, TableMem};
pub use trace::TraceEvent;
pub use vcmdq::{HwQueueConsumer, VCMDQ_PAGE_SIZE, vcmdq_reg};
pub use viommu::{ArmNestedDomain, VSmmu, VmidSource};

/// `struct iommu_hw_info_arm_smmuv3` size: flags, __reserved, idr\[6\], iidr, aidr.
pub const HW_INFO_ARM_SMMUV3_SIZE: usize = 40;
/// `struct iommu_hw_info_tegra241_cmdqv` size: flags, version, log2vcmdqs, log2vsids, rsvd.
pub const HW_INFO_TEGRA241_CMDQV_SIZE: usize = 8;
/// `struct iommu_hwpt_arm_smmuv3 { __le64 ste[2]; }`.
pub const HWPT_ARM_SMMUV3_SIZE: usize = 16;
/// `struct iommu_viommu_arm_smmuv3_invalidate { __le64 cmd[2]; }`.
pub const VIOMMU_INVALIDATE_ARM_SMMUV3_SIZE: usize = 16;
/// `struct iommu_vevent_arm_smmuv3 { __le64 evt[4]; }`.
pub const VEVENT_ARM_SMMUV3_SIZE: usize = 32;
/// `struct iommu_vevent_tegra241_cmdqv { __le64 lvcmdq_err_map[2]; }`.
pub const VEVENT_TEGRA241_CMDQV_SIZE: usize = 16;
/// `struct iommu_viommu_tegra241_cmdqv { __aligned_u64 out_vintf_mmap_offset, _length; }`.
pub const VIOMMU_TEGRA241_CMDQV_SIZE: usize = 16;
/// Linux's CMDQ_BATCH_ENTRIES (BITS_PER_LONG): a trapped invalidation is issued in batches of
/// up to this many minus one commands, each followed by a CMD_SYNC.
pub const CMDQ_BATCH_ENTRIES: usize = 64;

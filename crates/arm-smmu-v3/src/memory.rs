//! Host physical memory as the driver's users see it, re-exported from the layers below:
//! iommufd's `PhysMemory` over the `hw` memory (so `PhysBacking<HwMemory>` backs IOAS maps
//! with the memory the SMMU DMAs to), and the `vmsa` builder's `MemoryMut` over it (the
//! driver's page tables).

/// The machine's memory for iommufd (an access outside valid memory is EFAULT).
pub use twinmmu_iommufd::HwMemory;

/// The machine's memory for the `vmsa` table builder and walker: `hw`'s owning adapter.
pub use twinmmu_hw::mem::OwnedWalkMem as TableMem;

/// Zeroes `[pa, pa + len)` in page-sized writes.
pub(crate) use twinmmu_hw::mem::zero_range as zero;

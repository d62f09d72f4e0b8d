//! Host physical memory as the driver's users see it: iommufd's [`PhysMemory`] over the `hw`
//! memory (so `PhysBacking<HwMemory>` backs IOAS maps with the memory the SMMU DMAs to), and
//! and, re-exported from `hw`, the `vmsa` builder's `MemoryMut` over it (the driver's page tables).

use std::sync::Arc;

use twinmmu_hw::PhysMem;
use twinmmu_iommufd::{Errno, PhysMemory};

/// The machine's memory for iommufd: an access outside valid memory is EFAULT.
#[derive(Clone)]
pub struct HwMemory(pub Arc<dyn PhysMem>);

impl PhysMemory for HwMemory {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.0.read(pa, buf).map_err(|_| Errno::EFAULT)
    }
    fn write_phys(&self, pa: u64, buf: &[u8]) -> Result<(), Errno> {
        self.0.write(pa, buf).map_err(|_| Errno::EFAULT)
    }
}

/// The machine's memory for the `vmsa` table builder and walker: `hw`'s owning adapter.
pub use twinmmu_hw::mem::OwnedWalkMem as TableMem;

/// Zeroes `[pa, pa + len)` in page-sized writes.
pub(crate) use twinmmu_hw::mem::zero_range as zero;

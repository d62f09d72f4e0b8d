//! Host physical memory as the driver's users see it: iommufd's [`PhysMemory`] over the `hw`
//! memory (so `PhysBacking<HwMemory>` backs IOAS maps with the memory the SMMU DMAs to), and
//! the `vmsa` builder's `MemoryMut` over it (the driver's page tables).

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

/// The machine's memory for the `vmsa` table builder and walker.
#[derive(Clone)]
pub struct TableMem(pub Arc<dyn PhysMem>);

impl twinmmu_vmsa::Memory for TableMem {
    #[inline]
    fn read_u64(&self, pa: u64) -> Result<u64, twinmmu_vmsa::MemError> {
        self.0
            .read_u64(pa)
            .map_err(|_| twinmmu_vmsa::MemError { addr: pa })
    }
}

impl twinmmu_vmsa::MemoryMut for TableMem {
    #[inline]
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), twinmmu_vmsa::MemError> {
        self.0
            .write_u64(pa, value)
            .map_err(|_| twinmmu_vmsa::MemError { addr: pa })
    }

    fn zero(&self, pa: u64, len: u64) -> Result<(), twinmmu_vmsa::MemError> {
        zero(&*self.0, pa, len).map_err(|_| twinmmu_vmsa::MemError { addr: pa })
    }
}

/// Zeroes `[pa, pa + len)` in page-sized writes.
pub(crate) fn zero(mem: &dyn PhysMem, pa: u64, len: u64) -> Result<(), twinmmu_hw::MemError> {
    const CHUNK: usize = 4096;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut a = pa;
    let end = pa.saturating_add(len);
    while a < end {
        let n = ((end - a) as usize).min(CHUNK);
        mem.write(a, &ZEROS[..n])?;
        a += n as u64;
    }
    Ok(())
}

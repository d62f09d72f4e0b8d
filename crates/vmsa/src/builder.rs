//! A translation table builder for both stages and all granules, with the user-facing
//! behaviour of Linux's io-pgtable-arm: ranges are mapped with the largest blocks size and
//! alignment allow; mapping over an existing mapping is an error that changes nothing;
//! unmapping part of a block splits it; tables that become empty are freed; every call
//! reports the input ranges whose entries changed, for TLB invalidation.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::config::{S1Region, Stage1Config, Stage2Config, Ttb};
use crate::descriptor::{CONTIGUOUS, Descriptor, DescriptorKind, LEAF_ATTR_MASK};
use crate::geometry::{Geometry, Granule, PaSize};
use crate::memory::{MemError, MemoryMut};
use crate::walk::Stage;

/// Table memory could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("out of translation table memory")]
pub struct AllocError;

/// Where the builder gets table memory from.
pub trait PageAllocator {
    /// `size` bytes (a power of two, at least 8) aligned to `size`. Contents need not be
    /// zero: the builder zeroes new tables.
    fn alloc(&mut self, size: u64) -> Result<u64, AllocError>;
    /// Returns a table the builder no longer references.
    fn free(&mut self, pa: u64, size: u64);
}

impl<A: PageAllocator + ?Sized> PageAllocator for &mut A {
    fn alloc(&mut self, size: u64) -> Result<u64, AllocError> {
        (**self).alloc(size)
    }
    fn free(&mut self, pa: u64, size: u64) {
        (**self).free(pa, size)
    }
}

/// A bump allocator over one physical range, reusing freed blocks of the same size. It
/// counts live bytes so tests can check that unmapping frees every table.
#[derive(Debug, Clone)]
pub struct BumpAllocator {
    next: u64,
    end: u64,
    free: BTreeMap<u64, Vec<u64>>,
    live: u64,
}

impl BumpAllocator {
    pub fn new(base: u64, len: u64) -> Self {
        BumpAllocator {
            next: base,
            end: base.saturating_add(len),
            free: BTreeMap::new(),
            live: 0,
        }
    }

    /// Bytes currently allocated.
    pub fn live_bytes(&self) -> u64 {
        self.live
    }
}

impl PageAllocator for BumpAllocator {
    fn alloc(&mut self, size: u64) -> Result<u64, AllocError> {
        if !size.is_power_of_two() {
            return Err(AllocError);
        }
        if let Some(pa) = self.free.get_mut(&size).and_then(Vec::pop) {
            self.live += size;
            return Ok(pa);
        }
        let pa = self.next.checked_next_multiple_of(size).ok_or(AllocError)?;
        let end = pa.checked_add(size).ok_or(AllocError)?;
        if end > self.end {
            return Err(AllocError);
        }
        self.next = end;
        self.live += size;
        Ok(pa)
    }

    fn free(&mut self, pa: u64, size: u64) {
        self.live = self.live.saturating_sub(size);
        self.free.entry(size).or_default().push(pa);
    }
}

/// What a builder call changed, for invalidation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Input ranges whose leaf entries were written or removed (coalesced, ascending).
    pub leaves: Vec<Range<u64>>,
    /// Input ranges covered by table descriptors that were removed (their tables freed):
    /// walk caches for these need a non-leaf invalidation.
    pub tables: Vec<Range<u64>>,
}

impl Changes {
    /// Total bytes of input address space in `leaves`.
    pub fn leaf_bytes(&self) -> u64 {
        self.leaves.iter().map(|r| r.end - r.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty() && self.tables.is_empty()
    }

    fn push(list: &mut Vec<Range<u64>>, r: Range<u64>) {
        if let Some(last) = list.last_mut()
            && last.end == r.start
        {
            last.end = r.end;
            return;
        }
        list.push(r);
    }
}

/// A builder call that could not be carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("{what} {value:#x} is not aligned to the {granule:?} granule")]
    Misaligned {
        what: &'static str,
        value: u64,
        granule: Granule,
    },
    #[error("input range {start:#x}+{size:#x} outside the {ia_bits}-bit input space")]
    InputOutOfRange { start: u64, size: u64, ia_bits: u8 },
    #[error("output range {start:#x}+{size:#x} outside the {oa_bits}-bit output size")]
    OutputOutOfRange { start: u64, size: u64, oa_bits: u8 },
    /// Mapping over an existing mapping (io-pgtable-arm's -EEXIST); nothing was changed.
    #[error("input address {iova:#x} is already mapped")]
    AlreadyMapped { iova: u64 },
    /// A descriptor the builder cannot interpret (reserved encoding, or a table address
    /// outside the output size) at `iova`, `level`.
    #[error("malformed descriptor {descriptor:#x} for {iova:#x} at level {level}")]
    Malformed {
        iova: u64,
        level: u8,
        descriptor: u64,
    },
    /// Table memory ran out. A failed map changed nothing; a failed unmap reports what
    /// it had already changed.
    #[error("out of table memory")]
    OutOfMemory { changes: Changes },
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// The format of one table hierarchy the builder maintains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFormat {
    pub stage: Stage,
    pub geometry: Geometry,
    /// Output addresses must fit in this many bits.
    pub oa_bits: u8,
    /// The implementation has 52-bit PAs (64K descriptors use bits \[15:12\] for OA\[51:48\] and
    /// 64K level-1 blocks exist).
    pub pa52: bool,
}

impl TableFormat {
    /// Stage-1 tables for an input of `ia_bits` (64 − TnSZ). `None` if the size needs more
    /// than four levels.
    pub fn stage1(granule: Granule, ia_bits: u8, oa: PaSize) -> Option<Self> {
        Some(TableFormat {
            stage: Stage::Stage1,
            geometry: Geometry::stage1(granule, ia_bits)?,
            oa_bits: oa.bits(),
            pa52: oa == PaSize::Bits52,
        })
    }

    /// Stage-2 tables starting at `start_level` (concatenated as the size requires).
    pub fn stage2(granule: Granule, ia_bits: u8, start_level: u8, oa: PaSize) -> Option<Self> {
        Some(TableFormat {
            stage: Stage::Stage2,
            geometry: Geometry::stage2(granule, ia_bits, start_level)?,
            oa_bits: oa.bits(),
            pa52: oa == PaSize::Bits52,
        })
    }

    /// The format a validated stage-2 configuration walks.
    pub fn of_stage2(cfg: &Stage2Config) -> Self {
        TableFormat {
            stage: Stage::Stage2,
            geometry: *cfg.geometry(),
            oa_bits: cfg.oa_bits(),
            pa52: cfg.pa52,
        }
    }

    /// The format a validated stage-1 configuration walks through `ttb` (`None` with EPDx).
    pub fn of_stage1(cfg: &Stage1Config, ttb: Ttb) -> Option<Self> {
        let r: &S1Region = cfg.region(ttb)?;
        Some(TableFormat {
            stage: Stage::Stage1,
            geometry: r.geometry,
            oa_bits: cfg.oa_bits(ttb),
            pa52: cfg.pa52,
        })
    }

    fn granule(&self) -> Granule {
        self.geometry.granule()
    }
}

/// Builds and edits one table hierarchy in memory.
///
/// Input addresses are offsets in the table's input space `[0, 2^ia_bits)`: for a stage-1
/// TTB1 region pass `va & (2^ia_bits − 1)`.
pub struct TableBuilder<M: MemoryMut, A: PageAllocator> {
    fmt: TableFormat,
    root: u64,
    mem: M,
    alloc: A,
}

impl<M: MemoryMut, A: PageAllocator> TableBuilder<M, A> {
    /// Allocates and zeroes an empty start-level table (all concatenated tables).
    pub fn new(fmt: TableFormat, mem: M, mut alloc: A) -> Result<Self, BuildError> {
        let size = Self::root_alloc_size(&fmt);
        let root = alloc.alloc(size).map_err(|_| BuildError::OutOfMemory {
            changes: Changes::default(),
        })?;
        mem.zero(root, size)?;
        Ok(TableBuilder {
            fmt,
            root,
            mem,
            alloc,
        })
    }

    /// Takes over an existing hierarchy whose start-level table is at `root`.
    pub fn adopt(fmt: TableFormat, root: u64, mem: M, alloc: A) -> Self {
        TableBuilder {
            fmt,
            root,
            mem,
            alloc,
        }
    }

    fn root_alloc_size(fmt: &TableFormat) -> u64 {
        // A root smaller than 64 bytes is still given 64 (the 52-bit minimum alignment).
        fmt.geometry.root_size().max(64)
    }

    /// The start-level table address, for CD.TTBx / STE.S2TTB.
    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn format(&self) -> &TableFormat {
        &self.fmt
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Frees every table (the root included) and returns memory and allocator.
    pub fn destroy(mut self) -> Result<(M, A), BuildError> {
        let level = self.fmt.geometry.start_level();
        let entries = self.fmt.geometry.root_entries();
        self.free_subtables(self.root, level, entries)?;
        let size = Self::root_alloc_size(&self.fmt);
        self.alloc.free(self.root, size);
        Ok((self.mem, self.alloc))
    }

    fn free_subtables(&mut self, table: u64, level: u8, entries: u64) -> Result<(), BuildError> {
        if level == 3 {
            return Ok(());
        }
        let g = self.fmt.granule();
        for i in 0..entries {
            let d = Descriptor(self.mem.read_u64(table + i * 8)?);
            if d.kind(g, level, self.fmt.pa52) == DescriptorKind::Table {
                let next = d.address(g, self.fmt.pa52);
                self.free_subtables(next, level + 1, g.entries())?;
                self.mem.write_u64(table + i * 8, 0)?;
                self.alloc.free(next, g.size());
            }
        }
        Ok(())
    }

    fn check_range(&self, iova: u64, size: u64) -> Result<u64, BuildError> {
        let g = self.fmt.granule();
        let mask = g.size() - 1;
        if iova & mask != 0 {
            return Err(BuildError::Misaligned {
                what: "input address",
                value: iova,
                granule: g,
            });
        }
        if size & mask != 0 || size == 0 {
            return Err(BuildError::Misaligned {
                what: "size",
                value: size,
                granule: g,
            });
        }
        let ia_bits = self.fmt.geometry.ia_bits();
        let end = iova.checked_add(size);
        match end {
            Some(end) if ia_bits >= 64 || (end - 1) >> ia_bits == 0 => Ok(end),
            _ => Err(BuildError::InputOutOfRange {
                start: iova,
                size,
                ia_bits,
            }),
        }
    }

    /// Maps `[iova, iova + size)` to `[pa, pa + size)` with leaf attribute bits `attrs`
    /// (e.g. [`crate::S1LeafAttrs::bits`] / [`crate::S2LeafAttrs::bits`]; type, address and
    /// contiguous bits are ignored). Uses blocks wherever size and alignment allow. If any
    /// part of the range is already mapped, returns [`BuildError::AlreadyMapped`] and
    /// changes nothing; if table memory runs out, undoes what it did.
    pub fn map(
        &mut self,
        iova: u64,
        pa: u64,
        size: u64,
        attrs: u64,
    ) -> Result<Changes, BuildError> {
        let end = self.check_range(iova, size)?;
        let g = self.fmt.granule();
        if pa & (g.size() - 1) != 0 {
            return Err(BuildError::Misaligned {
                what: "output address",
                value: pa,
                granule: g,
            });
        }
        let oa_bits = self.fmt.oa_bits;
        match pa.checked_add(size) {
            Some(pend) if (pend - 1) >> oa_bits == 0 => {}
            _ => {
                return Err(BuildError::OutputOutOfRange {
                    start: pa,
                    size,
                    oa_bits,
                });
            }
        }
        let level = self.fmt.geometry.start_level();
        let entries = self.fmt.geometry.root_entries();
        if let Some(at) = self.first_mapped(self.root, level, entries, iova, end)? {
            return Err(BuildError::AlreadyMapped { iova: at });
        }
        let attrs = attrs & LEAF_ATTR_MASK & !CONTIGUOUS;
        match self.map_level(self.root, level, entries, iova, end, pa, attrs) {
            Ok(()) => Ok(Changes {
                leaves: std::iter::once(iova..end).collect(),
                tables: Vec::new(),
            }),
            Err(BuildError::OutOfMemory { .. }) => {
                // Undo: the range held nothing before, so unmapping it removes exactly what
                // this call added and frees the tables it created (no block is split).
                self.unmap(iova, size)?;
                Err(BuildError::OutOfMemory {
                    changes: Changes::default(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The entry index range of `table` (at `level`, `entries` long) that `[start, end)`
    /// touches, and the shift of one entry.
    fn span(&self, level: u8, entries: u64, start: u64, end: u64) -> (u64, u64, u32) {
        let shift = self.fmt.granule().level_shift(level);
        let mask = entries - 1;
        let first = (start >> shift) & mask;
        let last = ((end - 1) >> shift) & mask;
        (first, last, shift)
    }

    /// The first input address in `[start, end)` that has a valid leaf (or a descriptor the
    /// builder cannot interpret), if any.
    fn first_mapped(
        &self,
        table: u64,
        level: u8,
        entries: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<u64>, BuildError> {
        let g = self.fmt.granule();
        let (first, last, shift) = self.span(level, entries, start, end);
        let esize = 1u64 << shift;
        let mut s = start;
        for i in first..=last {
            let e = end.min((s & !(esize - 1)).saturating_add(esize));
            let d = Descriptor(self.mem.read_u64(table + i * 8)?);
            match d.kind(g, level, self.fmt.pa52) {
                DescriptorKind::Invalid => {}
                DescriptorKind::Table => {
                    let next = self.table_address(d, level, s)?;
                    if let Some(at) = self.first_mapped(next, level + 1, g.entries(), s, e)? {
                        return Ok(Some(at));
                    }
                }
                DescriptorKind::Block | DescriptorKind::Page | DescriptorKind::Reserved => {
                    return Ok(Some(s));
                }
            }
            s = e;
        }
        Ok(None)
    }

    fn table_address(&self, d: Descriptor, level: u8, iova: u64) -> Result<u64, BuildError> {
        let next = d.address(self.fmt.granule(), self.fmt.pa52);
        if next >> self.fmt.oa_bits != 0 {
            return Err(BuildError::Malformed {
                iova,
                level,
                descriptor: d.0,
            });
        }
        Ok(next)
    }

    fn new_table(&mut self) -> Result<u64, BuildError> {
        let size = self.fmt.granule().size();
        let t = self
            .alloc
            .alloc(size)
            .map_err(|_| BuildError::OutOfMemory {
                changes: Changes::default(),
            })?;
        if let Err(e) = self.mem.zero(t, size) {
            self.alloc.free(t, size);
            return Err(e.into());
        }
        Ok(t)
    }

    #[allow(clippy::too_many_arguments)]
    fn map_level(
        &mut self,
        table: u64,
        level: u8,
        entries: u64,
        start: u64,
        end: u64,
        pa: u64,
        attrs: u64,
    ) -> Result<(), BuildError> {
        let g = self.fmt.granule();
        let pa52 = self.fmt.pa52;
        let (first, last, shift) = self.span(level, entries, start, end);
        let esize = 1u64 << shift;
        let leaf_ok = level == 3 || g.block_allowed(level, pa52);
        let mut s = start;
        for i in first..=last {
            let e_end = (s & !(esize - 1)).saturating_add(esize);
            let e = end.min(e_end);
            let out = pa + (s - start);
            let slot = table + i * 8;
            let whole = s & (esize - 1) == 0 && e - s == esize;
            let d = Descriptor(self.mem.read_u64(slot)?);
            let kind = d.kind(g, level, pa52);
            if whole && leaf_ok && out & (esize - 1) == 0 && kind == DescriptorKind::Invalid {
                self.mem
                    .write_u64(slot, Descriptor::leaf(out, level, g, attrs).0)?;
            } else {
                match kind {
                    DescriptorKind::Table => {
                        let next = self.table_address(d, level, s)?;
                        self.map_level(next, level + 1, g.entries(), s, e, out, attrs)?;
                    }
                    DescriptorKind::Invalid => {
                        let next = self.new_table()?;
                        // Fill the new table before linking it, so a concurrent walker never
                        // sees a half-built subtree.
                        let r = self.map_level(next, level + 1, g.entries(), s, e, out, attrs);
                        if let Err(err) = r {
                            self.free_subtables(next, level + 1, g.entries())?;
                            self.alloc.free(next, g.size());
                            return Err(err);
                        }
                        self.mem.write_u64(slot, Descriptor::table(next, g).0)?;
                    }
                    _ => return Err(BuildError::AlreadyMapped { iova: s }),
                }
            }
            s = e;
        }
        Ok(())
    }

    /// Unmaps whatever is mapped in `[iova, iova + size)` (holes are fine). A block that
    /// straddles the range edge is split into next-level entries keeping the rest mapped;
    /// tables left empty are freed (never the root). Returns the changed ranges.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<Changes, BuildError> {
        let end = self.check_range(iova, size)?;
        let level = self.fmt.geometry.start_level();
        let entries = self.fmt.geometry.root_entries();
        let mut changes = Changes::default();
        match self.unmap_level(self.root, level, entries, iova, end, &mut changes) {
            Ok(_) => Ok(changes),
            Err(BuildError::OutOfMemory { .. }) => Err(BuildError::OutOfMemory { changes }),
            Err(e) => Err(e),
        }
    }

    /// Returns whether `table` holds no valid descriptor afterwards.
    fn unmap_level(
        &mut self,
        table: u64,
        level: u8,
        entries: u64,
        start: u64,
        end: u64,
        changes: &mut Changes,
    ) -> Result<bool, BuildError> {
        let g = self.fmt.granule();
        let pa52 = self.fmt.pa52;
        let (first, last, shift) = self.span(level, entries, start, end);
        let esize = 1u64 << shift;
        let mut s = start;
        for i in first..=last {
            let e_start = s & !(esize - 1);
            let e_end = e_start.saturating_add(esize);
            let e = end.min(e_end);
            let slot = table + i * 8;
            let whole = s == e_start && e == e_end;
            let d = Descriptor(self.mem.read_u64(slot)?);
            match d.kind(g, level, pa52) {
                DescriptorKind::Invalid => {}
                DescriptorKind::Reserved => {
                    self.mem.write_u64(slot, 0)?;
                    Changes::push(&mut changes.leaves, e_start..e_end);
                }
                DescriptorKind::Block | DescriptorKind::Page if whole => {
                    self.mem.write_u64(slot, 0)?;
                    Changes::push(&mut changes.leaves, s..e);
                }
                DescriptorKind::Block | DescriptorKind::Page => {
                    // Split: a table of next-level leaves that reproduce the block, then
                    // unmap inside it (io-pgtable-arm's split_blk_unmap).
                    let next = self.new_table()?;
                    let sub = esize >> g.stride();
                    let oa = d.address(g, pa52) & !(esize - 1);
                    let attrs = d.0 & LEAF_ATTR_MASK & !CONTIGUOUS;
                    for j in 0..g.entries() {
                        let leaf = Descriptor::leaf(oa + j * sub, level + 1, g, attrs);
                        self.mem.write_u64(next + j * 8, leaf.0)?;
                    }
                    self.mem.write_u64(slot, Descriptor::table(next, g).0)?;
                    let empty = self.unmap_level(next, level + 1, g.entries(), s, e, changes)?;
                    if empty {
                        // Cannot happen for a partial range, kept for robustness.
                        self.mem.write_u64(slot, 0)?;
                        self.alloc.free(next, g.size());
                    }
                }
                DescriptorKind::Table => {
                    let next = self.table_address(d, level, s)?;
                    let empty = self.unmap_level(next, level + 1, g.entries(), s, e, changes)?;
                    if empty {
                        // Unlink before freeing, so no walker reads a freed page.
                        self.mem.write_u64(slot, 0)?;
                        self.alloc.free(next, g.size());
                        Changes::push(&mut changes.tables, e_start..e_end);
                    }
                }
            }
            s = e;
        }
        // Whole table covered: it is empty now without a scan.
        if first == 0 && last == entries - 1 && start & (esize - 1) == 0 && end & (esize - 1) == 0 {
            return Ok(true);
        }
        // Look next to the span first: unmaps usually run in order over dense tables, so a
        // neighbour is the likeliest valid entry and the common case reads one or two
        // descriptors instead of scanning from index 0 (which made N in-order unmaps of
        // one table cost N^2/2 reads).
        let neighbours = [last.checked_add(1), first.checked_sub(1)];
        for i in neighbours.into_iter().flatten().filter(|&i| i < entries) {
            if self.mem.read_u64(table + i * 8)? & 1 != 0 {
                return Ok(false);
            }
        }
        for i in 0..entries {
            if self.mem.read_u64(table + i * 8)? & 1 != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

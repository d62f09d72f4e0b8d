//! The translation table walk (smmu_kvm.md §4.10 steps 5–6 and §4.12; DDI0487 D8).
//!
//! Generic over the memory and the table-fetch hook, so each use is monomorphised; no
//! allocation and no dynamic dispatch on the path.

use std::convert::Infallible;

use crate::config::{S1Region, Stage1Config, Stage2Config, Ttb};
use crate::descriptor::{Descriptor, DescriptorKind};
use crate::geometry::{Geometry, Granule};
use crate::memory::Memory;
use crate::perms::{
    Access, PermissionDenied, S1Controls, S1Perms, S2Perms, TableRestrictions, check_s1, check_s2,
};

/// Translation stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Stage1,
    Stage2,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Stage1 => "stage 1",
            Stage::Stage2 => "stage 2",
        })
    }
}

/// The architectural fault kinds a walk or a permission check raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Input out of range, EPDx, an invalid or reserved descriptor (IHI0070 F_TRANSLATION).
    Translation,
    /// AF = 0 with AF faults enabled (F_ACCESS).
    AccessFlag,
    /// From [`check_s1`]/[`check_s2`] (F_PERMISSION).
    Permission,
    /// A table or output address beyond the effective output size (F_ADDR_SIZE).
    AddressSize,
    /// The descriptor read at this physical address failed (F_WALK_EABT).
    ExternalAbort { fetch_addr: u64 },
}

/// A translation fault with the level of the lookup that raised it and the stage.
/// Faults found before any descriptor is read (input out of range, EPDx) report level 0, as
/// the Arm ARM pseudocode does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{stage} {kind:?} fault at level {level}")]
pub struct Fault {
    pub kind: FaultKind,
    pub level: u8,
    pub stage: Stage,
}

impl Fault {
    pub const fn new(kind: FaultKind, level: u8, stage: Stage) -> Self {
        Fault { kind, level, stage }
    }
}

/// Why a stage-1 walk did not produce a translation: its own fault, or the hook refused a
/// table fetch (in nested mode: the stage-2 translation of that table's IPA failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError<E> {
    #[error(transparent)]
    Fault(Fault),
    /// The hook failed for the descriptor at `ipa`, about to be read at `level`.
    #[error("table fetch of {ipa:#x} at level {level} refused")]
    TableFetch { ipa: u64, level: u8, error: E },
}

impl<E> From<Fault> for WalkError<E> {
    fn from(f: Fault) -> Self {
        WalkError::Fault(f)
    }
}

/// Called with the address of each descriptor before it is read, and the level it is read
/// at; returns the physical address to read. In nested mode the SMMU translates that IPA
/// through stage 2 here (IHI0070 3.4.3; CLASS = TT faults).
pub trait TableHook {
    type Error;
    fn table_fetch(&mut self, addr: u64, level: u8) -> Result<u64, Self::Error>;
}

/// Table addresses are physical addresses (stage 1 alone, or stage 2).
#[derive(Clone, Copy, Debug, Default)]
pub struct Direct;

impl TableHook for Direct {
    type Error = Infallible;
    #[inline(always)]
    fn table_fetch(&mut self, addr: u64, _level: u8) -> Result<u64, Infallible> {
        Ok(addr)
    }
}

impl<F, E> TableHook for F
where
    F: FnMut(u64, u8) -> Result<u64, E>,
{
    type Error = E;
    #[inline(always)]
    fn table_fetch(&mut self, addr: u64, level: u8) -> Result<u64, E> {
        self(addr, level)
    }
}

/// Stage-1 memory attributes of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S1MemAttrs {
    /// AttrIndx\[2:0\].
    pub attr_index: u8,
    /// The MAIR byte AttrIndx selects (CD.MAIR).
    pub mair_attr: u8,
    /// SH\[1:0\].
    pub sh: u8,
    pub ns: bool,
}

/// Stage-2 memory attributes of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S2MemAttrs {
    /// MemAttr\[3:0\].
    pub mem_attr: u8,
    /// SH\[1:0\].
    pub sh: u8,
}

impl S2MemAttrs {
    /// Whether stage 2 maps Device memory. Without FEAT_S2FWB, MemAttr\[3:2\] = 0b00 is
    /// Device (MemAttr\[1:0\] the nGnRnE..GRE kind) and anything else Normal (DDI0487 D8.5.5,
    /// stage 2 MemAttr). This is what STE.S2PTW checks a stage-1 walk against (IHI0070
    /// 5.2).
    pub const fn is_device(&self) -> bool {
        self.mem_attr & 0b1100 == 0
    }

    /// [`S2MemAttrs::is_device`] under FEAT_S2FWB (HCR_EL2.FWB / STE.S2FWB = 1), where
    /// MemAttr\[2\] = 0 is Device and MemAttr\[2\] = 1 forces a Normal type.
    pub const fn is_device_fwb(&self) -> bool {
        self.mem_attr & 0b0100 == 0
    }
}

/// A successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation<P, A> {
    /// The input address as given.
    pub input: u64,
    /// The output address for `input` (block base + offset).
    pub output: u64,
    /// log2 of the block or page size.
    pub block_shift: u8,
    /// Level of the leaf descriptor.
    pub level: u8,
    /// Level the walk started at: `level - start_level + 1` descriptors were read.
    pub start_level: u8,
    pub granule: Granule,
    /// Permissions, hierarchical bits folded in; check with [`check_s1`] / [`check_s2`].
    pub perms: P,
    pub attrs: A,
    /// nG = 0 (always true at stage 2).
    pub global: bool,
    /// The contiguous hint, decoded (a model may cache each entry alone).
    pub contiguous: bool,
    /// AF as read (0 is possible only with AFFD or HA).
    pub af: bool,
    pub dbm: bool,
    /// The raw leaf descriptor and the physical address it was read from.
    pub descriptor: u64,
    pub descriptor_pa: u64,
}

pub type S1Translation = Translation<S1Perms, S1MemAttrs>;
pub type S2Translation = Translation<S2Perms, S2MemAttrs>;

impl<P, A> Translation<P, A> {
    pub const fn block_size(&self) -> u64 {
        1 << self.block_shift
    }
    /// Output address of the start of the block or page.
    pub const fn output_base(&self) -> u64 {
        self.output & !(self.block_size() - 1)
    }
    /// Input address of the start of the block or page.
    pub const fn input_base(&self) -> u64 {
        self.input & !(self.block_size() - 1)
    }
    /// Descriptors read by the walk.
    pub const fn reads(&self) -> u8 {
        self.level - self.start_level + 1
    }
    /// log2 of the contiguous span when the hint is set, else of the block.
    pub const fn contiguous_shift(&self) -> u8 {
        if self.contiguous {
            match self.granule.contiguous_entries(self.level) {
                Some(n) => self.block_shift + n.trailing_zeros() as u8,
                None => self.block_shift,
            }
        } else {
            self.block_shift
        }
    }
}

impl S1Translation {
    /// [`check_s1`], with a failure turned into a stage-1 Permission fault at this level.
    pub fn check(&self, access: Access, ctl: S1Controls) -> Result<(), Fault> {
        check_s1(self.perms, access, ctl).map_err(|_: PermissionDenied| {
            Fault::new(FaultKind::Permission, self.level, Stage::Stage1)
        })
    }
}

impl S2Translation {
    /// [`check_s2`], with a failure turned into a stage-2 Permission fault at this level.
    pub fn check(&self, access: Access) -> Result<(), Fault> {
        check_s2(self.perms, access).map_err(|_: PermissionDenied| {
            Fault::new(FaultKind::Permission, self.level, Stage::Stage2)
        })
    }
}

struct Leaf {
    desc: Descriptor,
    desc_pa: u64,
    level: u8,
    shift: u32,
    oa_base: u64,
    table: TableRestrictions,
}

impl Leaf {
    /// The leaf checks and result both stages share: an Access flag fault when AF = 0 and
    /// neither AFFD nor HA (smmu_kvm.md §4.10), else the translation of `input`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn translation<P, A>(
        &self,
        geo: &Geometry,
        stage: Stage,
        af_fault: bool,
        input: u64,
        perms: P,
        attrs: A,
        global: bool,
    ) -> Result<Translation<P, A>, Fault> {
        let d = self.desc;
        if !d.af() && af_fault {
            return Err(Fault::new(FaultKind::AccessFlag, self.level, stage));
        }
        Ok(Translation {
            input,
            output: self.oa_base | (input & ((1u64 << self.shift) - 1)),
            block_shift: self.shift as u8,
            level: self.level,
            start_level: geo.start_level(),
            granule: geo.granule(),
            perms,
            attrs,
            global,
            contiguous: d.contiguous(),
            af: d.af(),
            dbm: d.dbm(),
            descriptor: d.0,
            descriptor_pa: self.desc_pa,
        })
    }
}

/// The descriptor walk shared by both stages: reads from the start level down to a leaf,
/// checking table and output addresses against `oa_bits`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn walk_tables<M: Memory + ?Sized, H: TableHook>(
    geo: &Geometry,
    ttb: u64,
    oa_bits: u8,
    pa52: bool,
    fold_tables: bool,
    stage: Stage,
    mem: &M,
    hook: &mut H,
    ia: u64,
) -> Result<Leaf, WalkError<H::Error>> {
    let granule = geo.granule();
    let stride = granule.stride();
    let mut level = geo.start_level();
    let mut shift = granule.level_shift(level);
    let mut index_mask = geo.root_entries() - 1;
    let mut table = ttb;
    let mut restrictions = TableRestrictions::default();
    loop {
        let desc_addr = table + ((ia >> shift) & index_mask) * 8;
        let pa = match hook.table_fetch(desc_addr, level) {
            Ok(pa) => pa,
            Err(error) => {
                return Err(WalkError::TableFetch {
                    ipa: desc_addr,
                    level,
                    error,
                });
            }
        };
        let desc = match mem.read_u64(pa) {
            Ok(d) => Descriptor(d),
            Err(_) => {
                return Err(
                    Fault::new(FaultKind::ExternalAbort { fetch_addr: pa }, level, stage).into(),
                );
            }
        };
        match desc.kind(granule, level, pa52) {
            DescriptorKind::Invalid | DescriptorKind::Reserved => {
                return Err(Fault::new(FaultKind::Translation, level, stage).into());
            }
            DescriptorKind::Table => {
                let next = desc.address(granule, pa52);
                if next >> oa_bits != 0 {
                    return Err(Fault::new(FaultKind::AddressSize, level, stage).into());
                }
                if fold_tables {
                    restrictions = restrictions.add(desc);
                }
                table = next;
                level += 1;
                shift -= stride;
                index_mask = granule.entries() - 1;
            }
            DescriptorKind::Block | DescriptorKind::Page => {
                let oa_base = desc.address(granule, pa52) & !((1u64 << shift) - 1);
                if oa_base >> oa_bits != 0 {
                    return Err(Fault::new(FaultKind::AddressSize, level, stage).into());
                }
                return Ok(Leaf {
                    desc,
                    desc_pa: pa,
                    level,
                    shift,
                    oa_base,
                    table: restrictions,
                });
            }
        }
    }
}

/// Selects TTB0/TTB1 for `va`: VA\[55\] picks the region; the bits from the top (63, or 55
/// with TBI) down to the region's input size must all equal VA\[55\] (IHI0070 3.4.1).
#[inline(always)]
pub fn select_ttb(cfg: &Stage1Config, va: u64) -> Result<(Ttb, &S1Region), Fault> {
    let upper = (va >> 55) & 1 == 1;
    let ttb = if upper { Ttb::Ttb1 } else { Ttb::Ttb0 };
    let i = ttb.index();
    let fault = Fault::new(FaultKind::Translation, 0, Stage::Stage1);
    let region = cfg.regions[i].as_ref().ok_or(fault)?;
    // With TBI, VA[63:56] are replaced by a sign-extension of VA[55].
    let v = if cfg.tbi[i] {
        ((va << 8) as i64 >> 8) as u64
    } else {
        va
    };
    let top = (v as i64) >> region.geometry.ia_bits();
    if top != if upper { -1 } else { 0 } {
        return Err(fault);
    }
    Ok((ttb, region))
}

/// Stage-1 walk of `va`. `hook` sees every descriptor address (an IPA when nested) before it
/// is read. Leaf checks in order: descriptor, Address Size, Access flag (smmu_kvm.md §4.10);
/// permissions are checked separately ([`check_s1`]).
#[inline]
pub fn walk_stage1<M: Memory + ?Sized, H: TableHook>(
    cfg: &Stage1Config,
    mem: &M,
    hook: &mut H,
    va: u64,
) -> Result<S1Translation, WalkError<H::Error>> {
    let (ttb, region) = select_ttb(cfg, va)?;
    let geo = region.geometry;
    let leaf = walk_tables(
        &geo,
        region.ttb,
        cfg.oa_bits[ttb.index()],
        cfg.pa52,
        !region.had,
        Stage::Stage1,
        mem,
        hook,
        va,
    )?;
    let d = leaf.desc;
    let attr_index = d.s1_attr_index();
    let attrs = S1MemAttrs {
        attr_index,
        mair_attr: (cfg.mair >> (attr_index * 8)) as u8,
        sh: d.sh(),
        ns: d.s1_ns(),
    };
    let perms = S1Perms::from_leaf(d, leaf.table);
    Ok(leaf.translation(
        &geo,
        Stage::Stage1,
        cfg.af_fault,
        va,
        perms,
        attrs,
        !d.s1_ng(),
    )?)
}

/// Stage-2 walk of `ipa`: an IPA at or above 2^(64 − S2T0SZ) is a stage-2 Translation fault
/// (IHI0070 3.4); then the walk, Address Size against the effective S2PS, Access flag.
#[inline]
pub fn walk_stage2<M: Memory + ?Sized>(
    cfg: &Stage2Config,
    mem: &M,
    ipa: u64,
) -> Result<S2Translation, Fault> {
    walk_stage2_with(cfg, mem, &mut Direct, ipa).map_err(|e| match e {
        WalkError::Fault(f) => f,
        WalkError::TableFetch { error, .. } => match error {},
    })
}

/// [`walk_stage2`] with a hook that sees every descriptor address (a PA) and its level
/// before the descriptor is read, as [`walk_stage1`]'s does. A hook that only observes
/// (returns the address unchanged) lets a caller count the descriptors read per level
/// exactly: one call per read, none for an IPA out of range.
#[inline]
pub fn walk_stage2_with<M: Memory + ?Sized, H: TableHook>(
    cfg: &Stage2Config,
    mem: &M,
    hook: &mut H,
    ipa: u64,
) -> Result<S2Translation, WalkError<H::Error>> {
    let geo = cfg.geometry;
    if ipa >> geo.ia_bits() != 0 {
        return Err(Fault::new(FaultKind::Translation, 0, Stage::Stage2).into());
    }
    let leaf = walk_tables(
        &geo,
        cfg.ttb,
        cfg.oa_bits,
        cfg.pa52,
        false,
        Stage::Stage2,
        mem,
        hook,
        ipa,
    )?;
    let d = leaf.desc;
    let attrs = S2MemAttrs {
        mem_attr: d.s2_mem_attr(),
        sh: d.sh(),
    };
    let perms = S2Perms::from_leaf(d, cfg.xnx);
    Ok(leaf.translation(&geo, Stage::Stage2, cfg.af_fault, ipa, perms, attrs, true)?)
}

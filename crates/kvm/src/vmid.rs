//! The KVM arm64 VMID allocator (`arch/arm64/kvm/vmid.c`) with VMID pinning (the RFC v3
//! design, smmu_kvm.md §3.2, with its stale-generation quirk fixed).
//!
//! A VMID lives in two forms:
//! - the 64-bit *software id* held in each stage-2 MMU's [`KvmVmid`]: the hardware VMID
//!   ("index") in the low `bits`, the generation above it (smmu_kvm.md §1.2);
//! - the hardware [`Vmid`] written to VTTBR_EL2\[63:48\] or an STE's S2VMID: the index alone,
//!   never 0.
//!
//! VMIDs are handed out lazily when a vCPU loads ([`VmidAllocator::update`]), never freed
//! explicitly, and renumbered at *rollover*: when the bitmap is full the generation moves on,
//! the map is reseeded from the VMIDs still in use (loaded on a CPU at that moment, or
//! pinned), and `TLBI ALLE1IS` is broadcast through the [`TlbiBroadcaster`] hook.

use std::fmt;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crossbeam_utils::CachePadded;

use crate::bitmap::Bitmap;
use crate::sync::{AtomicWord, LockCell, Primitives, StdPrimitives};

/// The VMID width KVM runs with (smmu_kvm.md §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmidBits {
    Eight,
    Sixteen,
}

impl VmidBits {
    /// `bits` as a number: 8 or 16.
    pub const fn bits(self) -> u32 {
        match self {
            VmidBits::Eight => 8,
            VmidBits::Sixteen => 16,
        }
    }

    /// `NUM_VMIDS = 1 << bits`, which is also `FIRST_VERSION`, the first generation.
    pub const fn num_vmids(self) -> u64 {
        1 << self.bits()
    }

    /// 8 or 16; any other width is refused.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            8 => Some(VmidBits::Eight),
            16 => Some(VmidBits::Sixteen),
            _ => None,
        }
    }

    /// The width KVM picks from the sanitised ID_AA64MMFR1_EL1: VMIDBits is bits \[7:4\];
    /// 0b0010 means 16 bits and every other value, reserved ones included, means 8
    /// (smmu_kvm.md §1.1, `kvm_get_vmid_bits()`).
    pub const fn from_id_aa64mmfr1(mmfr1: u64) -> Self {
        if (mmfr1 >> 4) & 0xf == 0b0010 {
            VmidBits::Sixteen
        } else {
            VmidBits::Eight
        }
    }

    /// The width an SMMU supports: SMMU_IDR0.VMID16 is bit 18 (IHI0070 6.3.1).
    pub const fn from_smmu_idr0(idr0: u32) -> Self {
        if idr0 & (1 << 18) != 0 {
            VmidBits::Sixteen
        } else {
            VmidBits::Eight
        }
    }
}

impl fmt::Display for VmidBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-bit", self.bits())
    }
}

/// A hardware VMID as programmed in VTTBR_EL2.VMID or STE.S2VMID. Never 0: index 0 is
/// never handed out (smmu_kvm.md §1.2), and the type makes that impossible to forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vmid(NonZeroU16);

impl Vmid {
    /// A VMID from its hardware value; `None` for 0.
    pub const fn new(value: u16) -> Option<Self> {
        match NonZeroU16::new(value) {
            Some(v) => Some(Vmid(v)),
            None => None,
        }
    }

    pub const fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `struct kvm_vmid`: the software id of one stage-2 MMU and its pin count.
///
/// `id` is 0 until the first allocation. `pins` is the RFC v3 `refcount_t pinned`; it is
/// only written with the allocator lock held.
pub struct KvmVmid<P: Primitives = StdPrimitives> {
    id: P::Atomic,
    pins: P::Atomic,
}

impl<P: Primitives> KvmVmid<P> {
    pub fn new() -> Self {
        KvmVmid {
            id: P::Atomic::new(0),
            pins: P::Atomic::new(0),
        }
    }

    /// The 64-bit software id (generation | index); 0 = never allocated.
    pub fn id(&self) -> u64 {
        self.id.load(Relaxed)
    }

    /// How many pins are held on this VMID.
    pub fn pin_count(&self) -> u64 {
        self.pins.load(Relaxed)
    }
}

impl<P: Primitives> Default for KvmVmid<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Primitives> fmt::Debug for KvmVmid<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmVmid")
            .field("id", &format_args!("{:#x}", self.id()))
            .field("pins", &self.pin_count())
            .finish()
    }
}

/// A broadcast TLB maintenance operation the allocator issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BroadcastTlbi {
    /// `DSB ISH; TLBI ALLE1IS; DSB ISH` (`__kvm_flush_vm_context`): every EL1&0 entry of
    /// every VMID, on every PE in the Inner Shareable domain and, with BTM, every SMMU
    /// NS-EL1 entry (smmu_kvm.md §1.4 step 3, §4.11).
    Alle1is,
}

/// Where the allocator's broadcast TLB maintenance goes.
///
/// The allocator calls [`broadcast`](TlbiBroadcaster::broadcast) at every rollover, with its
/// lock held, as the kernel issues the hypercall from inside `flush_context()`. The call must
/// return only once the maintenance is complete (the trailing `DSB ISH` has completed on the
/// issuing PE, i.e. every recipient has applied it); it must not call back into the
/// allocator.
///
/// `issuer` is the physical CPU that performed the rollover, or `None` when a pin taken
/// outside any vCPU context rolled the generation over (the kernel then issues it from
/// whichever CPU the caller runs on).
pub trait TlbiBroadcaster: Send + Sync {
    fn broadcast(&self, issuer: Option<usize>, op: BroadcastTlbi);
}

/// A broadcaster with nothing attached: no PE or SMMU model receives the maintenance. The
/// allocator still counts each broadcast it issues.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullTlbi;

impl TlbiBroadcaster for NullTlbi {
    fn broadcast(&self, _issuer: Option<usize>, _op: BroadcastTlbi) {}
}

/// Which path a [`VmidAllocator::update`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmidPath {
    /// The lock-free compare-and-swap succeeded.
    Fast,
    /// The locked slow path ran (maybe allocating, maybe rolling over).
    Slow,
}

/// The result of [`VmidAllocator::update`]: what the vCPU must program into VTTBR_EL2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmidUpdate {
    /// The software id now active on the CPU.
    pub id: u64,
    /// The hardware VMID (`id & (NUM_VMIDS - 1)`).
    pub vmid: Vmid,
    pub path: VmidPath,
    /// This update rolled the generation over.
    pub rolled_over: bool,
}

/// The result of a successful pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinOutcome {
    pub vmid: Vmid,
    /// The software id after the pin (its generation is current).
    pub id: u64,
    /// Taking the pin allocated a VMID and that allocation rolled the generation over.
    pub rolled_over: bool,
    /// The pin count after this pin.
    pub refs: u64,
}

/// `kvm_arm_vmid_alloc_init` refused the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmidInitError {
    #[error("a VMID allocator needs at least one CPU")]
    NoCpus,
    /// `NUM_VMIDS - 1 <= ncpus`: after a rollover every CPU may hold a reserved VMID and there
    /// must still be a free one (the kernel only warns; the model refuses).
    #[error("{bits} VMIDs cannot serve {ncpus} CPUs: NUM_VMIDS - 1 must exceed the number of CPUs")]
    TooManyCpus { bits: VmidBits, ncpus: usize },
}

/// An allocator operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmidError {
    #[error("physical CPU {cpu} does not exist ({ncpus} CPUs)")]
    CpuOutOfRange { cpu: usize, ncpus: usize },
    /// No free VMID even after a rollover. The init check makes this unreachable; it is
    /// reported rather than assumed.
    #[error("no free VMID after rollover")]
    NoFreeVmid,
}

/// `kvm_arm_pinned_vmid_get` failed. Where the kernel returns VMID 0, the model returns this
/// (threads/000: Oliver Upton; smmu_kvm.md §3.4 item 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("VMID pinning is disabled")]
    Disabled,
    #[error("all {max_pinned} pinnable VMIDs are pinned")]
    Exhausted { max_pinned: u64 },
    /// The pin needed a VMID allocation and none was free (unreachable under the init check).
    #[error("no free VMID for the pin")]
    NoFreeVmid,
}

/// An unpin on a VMID that holds no pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the VMID is not pinned")]
pub struct NotPinned;

/// KVM and an SMMU with different VMID widths cannot share VMIDs for broadcast TLB
/// maintenance (smmu_kvm.md §3.4 item 2; RFC v3 checks the widths match).
///
/// With a 16-bit KVM and an 8-bit SMMU a VMID above 255 cannot be written to STE.S2VMID
/// (IHI0070 6.3.1: VMID\[15:8\] must be zero when IDR0.VMID16 = 0). With an 8-bit KVM and a
/// 16-bit SMMU, IHI0070 3.17.4 zero-extends the PE's 8-bit VMID and the tags would match;
/// the refusal there is RFC v3's policy, kept so that no SMMU-private VMID above 255 can
/// be confused with a KVM one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KVM uses {kvm} VMIDs but the SMMU supports {smmu} VMIDs: they cannot share VMIDs for BTM")]
pub struct VmidWidthMismatch {
    pub kvm: VmidBits,
    pub smmu: VmidBits,
}

/// Refuses VMID sharing (BTM, pinned KVM VMIDs in STEs) unless the widths are equal.
pub fn check_btm_vmid_width(kvm: VmidBits, smmu: VmidBits) -> Result<(), VmidWidthMismatch> {
    if kvm == smmu {
        Ok(())
    } else {
        Err(VmidWidthMismatch { kvm, smmu })
    }
}

/// Counters of the allocator's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmidStats {
    /// The current generation, as a count (the first is 1).
    pub generation: u64,
    pub rollovers: u64,
    /// `TLBI ALLE1IS` broadcasts issued (one per rollover).
    pub broadcasts: u64,
    /// Updates that took the lock.
    pub slow_paths: u64,
    /// Updates that completed on the lock-free compare-and-swap.
    pub fast_paths: u64,
    /// Successful pins (each one, including extra references on a pinned VMID).
    pub pins: u64,
    /// Pin references released.
    pub unpins: u64,
    /// Pin handles dropped without an unpin: their VMIDs stay pinned for good.
    pub leaked_pins: u64,
    /// VMIDs pinned now.
    pub nr_pinned: u64,
    /// `NUM_VMIDS - ncpus - 2`, or 0 when pinning is disabled.
    pub max_pinned: u64,
}

/// A broken allocator invariant (smmu_kvm.md §1.6), as found by [`VmidAllocator::audit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantViolation {
    /// I1: a reserved id's index is not set in `vmid_map`.
    #[error("I1: CPU {cpu} reserves id {id:#x} but its index is clear in vmid_map")]
    ReservedNotInMap { cpu: usize, id: u64 },
    /// I2: two contexts claim one hardware VMID.
    #[error("I2: ids {a:#x} and {b:#x} claim the same hardware VMID {index}")]
    IndexShared { index: u64, a: u64, b: u64 },
    /// I3: index 0 was handed out.
    #[error("I3: id {id:#x} has hardware VMID 0")]
    ZeroHandedOut { id: u64 },
    /// An active slot holds an id of an older generation.
    #[error("CPU {cpu} has a stale id {id:#x} active")]
    StaleActive { cpu: usize, id: u64 },
    /// I5: a pinned VMID is missing from the pinned map or from `vmid_map`.
    #[error("I5: pinned id {id:#x} is not in the pinned map and vmid_map")]
    PinnedNotInMap { id: u64 },
    /// `nr_pinned` disagrees with the pinned map, or exceeds `max_pinned`.
    #[error("nr_pinned {nr_pinned} but {in_map} bits in the pinned map (max {max_pinned})")]
    PinnedCount {
        nr_pinned: u64,
        in_map: u64,
        max_pinned: u64,
    },
}

/// A copy of the allocator's state, taken under its lock.
///
/// The active slots are read one by one while the lock is held: vCPU loads running at the
/// same time may change them (each value read is one the slot really held).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmidSnapshot {
    pub bits: VmidBits,
    /// The generation base (a multiple of `NUM_VMIDS`).
    pub generation: u64,
    pub active: Vec<u64>,
    pub reserved: Vec<u64>,
    pub cur_idx: u64,
    pub nr_pinned: u64,
    pub max_pinned: u64,
    map: Bitmap,
    pinned: Option<Bitmap>,
}

impl VmidSnapshot {
    /// The index is set in `vmid_map` (in use in this generation).
    pub fn is_allocated(&self, index: u64) -> bool {
        usize::try_from(index).is_ok_and(|i| self.map.test(i))
    }

    /// The index is set in the pinned map.
    pub fn is_pinned(&self, index: u64) -> bool {
        usize::try_from(index).is_ok_and(|i| self.pinned.as_ref().is_some_and(|p| p.test(i)))
    }

    /// How many indices are set in `vmid_map`.
    pub fn allocated_count(&self) -> usize {
        self.map.count_ones()
    }

    /// The indices set in the pinned map, in order.
    pub fn pinned_indices(&self) -> Vec<u64> {
        self.pinned
            .as_ref()
            .map(|p| p.iter_ones().map(|i| i as u64).collect())
            .unwrap_or_default()
    }

    /// `(id XOR generation) >> bits == 0`.
    pub fn gen_match(&self, id: u64) -> bool {
        (id ^ self.generation) >> self.bits.bits() == 0
    }

    pub fn index(&self, id: u64) -> u64 {
        id & (self.bits.num_vmids() - 1)
    }
}

struct PerCpu<P: Primitives> {
    /// `active_vmids[cpu]`: 0 = wiped by a rollover, `VMID_ACTIVE_INVALID` = nothing loaded.
    active: P::Atomic,
    /// Fast-path count, written only by the CPU that owns the slot (so a load and a store,
    /// not a locked add, on a line this CPU already holds).
    fast_paths: P::Atomic,
}

/// What `cpu_vmid_lock` protects.
struct Locked {
    map: Bitmap,
    /// `pinned_vmid_map`; `None` disables pinning.
    pinned: Option<Bitmap>,
    nr_pinned: u64,
    max_pinned: u64,
    reserved: Box<[u64]>,
    cur_idx: usize,
    rollovers: u64,
    broadcasts: u64,
    slow_paths: u64,
    pins: u64,
    unpins: u64,
    leaked_pins: u64,
}

/// The KVM arm64 VMID allocator (smmu_kvm.md §1, with pinning from §3).
///
/// `cpu` arguments name the physical CPU the caller runs on. As in the kernel (which calls
/// these with preemption disabled) at most one caller may use a given CPU at a time;
/// [`crate::Kvm`] enforces that for its vCPUs. Breaking it cannot cause undefined behaviour
/// or a panic, only wrong VMIDs for the contexts involved.
pub struct VmidAllocator<P: Primitives = StdPrimitives> {
    bits: VmidBits,
    /// `vmid_generation`, on its own line: read by every fast path, written at rollover.
    generation: CachePadded<P::Atomic>,
    percpu: Box<[CachePadded<PerCpu<P>>]>,
    state: P::Lock<Locked>,
    tlbi: Arc<dyn TlbiBroadcaster>,
}

impl<P: Primitives> VmidAllocator<P> {
    /// `kvm_arm_vmid_alloc_init`, with the RFC v3 pinning state when `pinning` is on.
    pub fn new(
        bits: VmidBits,
        ncpus: usize,
        pinning: bool,
        tlbi: Arc<dyn TlbiBroadcaster>,
    ) -> Result<Self, VmidInitError> {
        Self::check_config(bits, ncpus)?;
        let num = bits.num_vmids();
        let len = num as usize;
        // smmu_kvm.md §3.2: max_pinned = NUM_VMIDS - ncpus - 2 (one reserved per CPU, plus
        // index 0, plus one left free).
        let max_pinned = if pinning { num - ncpus as u64 - 2 } else { 0 };
        let percpu = (0..ncpus)
            .map(|_| {
                CachePadded::new(PerCpu {
                    // Per-CPU variables start at 0, so each CPU's first load takes the
                    // slow path.
                    active: P::Atomic::new(0),
                    fast_paths: P::Atomic::new(0),
                })
            })
            .collect();
        Ok(VmidAllocator {
            bits,
            generation: CachePadded::new(P::Atomic::new(num)),
            percpu,
            state: P::Lock::new(Locked {
                map: Bitmap::new(len),
                pinned: pinning.then(|| Bitmap::new(len)),
                nr_pinned: 0,
                max_pinned,
                reserved: vec![0; ncpus].into_boxed_slice(),
                cur_idx: 1,
                rollovers: 0,
                broadcasts: 0,
                slow_paths: 0,
                pins: 0,
                unpins: 0,
                leaked_pins: 0,
            }),
            tlbi,
        })
    }

    /// The init check alone: whether `ncpus` CPUs can use `bits`-bit VMIDs.
    pub fn check_config(bits: VmidBits, ncpus: usize) -> Result<(), VmidInitError> {
        if ncpus == 0 {
            return Err(VmidInitError::NoCpus);
        }
        // smmu_kvm.md §1.4 init step 2: NUM_VMIDS - 1 <= ncpus would leave no free VMID
        // after a rollover that reserves one per CPU.
        if bits.num_vmids() - 1 <= ncpus as u64 {
            return Err(VmidInitError::TooManyCpus { bits, ncpus });
        }
        Ok(())
    }

    pub fn bits(&self) -> VmidBits {
        self.bits
    }

    pub fn ncpus(&self) -> usize {
        self.percpu.len()
    }

    /// `FIRST_VERSION = NUM_VMIDS`.
    pub fn first_version(&self) -> u64 {
        self.bits.num_vmids()
    }

    /// `VMID_ACTIVE_INVALID`: index 0 of generation 1, written on vCPU put.
    pub fn active_invalid(&self) -> u64 {
        self.first_version()
    }

    pub fn pinning_enabled(&self) -> bool {
        self.state.with(|st| st.pinned.is_some())
    }

    #[inline]
    fn mask(&self) -> u64 {
        self.bits.num_vmids() - 1
    }

    /// The hardware VMID of a software id, `None` for index 0.
    #[inline]
    pub fn hw_vmid(&self, id: u64) -> Option<Vmid> {
        // Only the low `bits` reach hardware (VTTBR_VMID_MASK, smmu_kvm.md §1.1).
        Vmid::new((id & self.mask()) as u16)
    }

    /// `vmid_gen_match`: the id belongs to the current generation.
    #[inline]
    pub fn gen_match(&self, id: u64) -> bool {
        (id ^ self.generation.load(Relaxed)) >> self.bits.bits() == 0
    }

    /// The per-CPU state of `cpu`, or `CpuOutOfRange`.
    #[inline]
    fn slot(&self, cpu: usize) -> Result<&PerCpu<P>, VmidError> {
        self.percpu
            .get(cpu)
            .map(|s| &**s)
            .ok_or(VmidError::CpuOutOfRange {
                cpu,
                ncpus: self.ncpus(),
            })
    }

    /// `kvm_arm_vmid_update`: makes `vmid` current on `cpu` and returns the VMID to program.
    /// Call it when the vCPU is loaded, before anything can use its stage 2 (smmu_kvm.md
    /// §1.5).
    #[inline]
    pub fn update(&self, cpu: usize, vmid: &KvmVmid<P>) -> Result<VmidUpdate, VmidError> {
        let slot = self.slot(cpu)?;
        let id = vmid.id.load(Relaxed);
        let old_active = slot.active.load(Relaxed);
        // smmu_kvm.md §1.4 fast path. Read-modify-writes of one location are totally
        // ordered: either a rollover's exchange-to-0 comes after this CAS and reserves `id`,
        // or the CAS sees the 0 and fails, and the slow path's lock orders us after the
        // rollover.
        if old_active != 0
            && self.gen_match(id)
            && let Some(hw) = self.hw_vmid(id)
            && slot
                .active
                .compare_exchange(old_active, id, Relaxed, Relaxed)
                .is_ok()
        {
            slot.fast_paths
                .store(slot.fast_paths.load(Relaxed).wrapping_add(1), Relaxed);
            return Ok(VmidUpdate {
                id,
                vmid: hw,
                path: VmidPath::Fast,
                rolled_over: false,
            });
        }
        // The kernel treats only a CAS that returned 0 as lost; with one caller per CPU no
        // other value can be seen, and the slow path is right for any failure.
        self.slow_path(cpu, slot, vmid)
    }

    #[cold]
    fn slow_path(
        &self,
        cpu: usize,
        slot: &PerCpu<P>,
        vmid: &KvmVmid<P>,
    ) -> Result<VmidUpdate, VmidError> {
        self.state.with(|st| {
            st.slow_paths += 1;
            let mut id = vmid.id.load(Relaxed);
            let mut rolled_over = false;
            if !self.gen_match(id) {
                (id, rolled_over) = self.new_vmid(st, vmid, Some(cpu))?;
            }
            let hw = self.hw_vmid(id).ok_or(VmidError::NoFreeVmid)?;
            slot.active.store(id, Relaxed);
            Ok(VmidUpdate {
                id,
                vmid: hw,
                path: VmidPath::Slow,
                rolled_over,
            })
        })
    }

    /// `kvm_arm_vmid_clear_active`: the vCPU is put; nothing is active on `cpu`. Unlike the
    /// ASID allocator, this stops idle VMs from holding VMID space across rollovers.
    #[inline]
    pub fn clear_active(&self, cpu: usize) -> Result<(), VmidError> {
        self.slot(cpu)?.active.store(self.active_invalid(), Relaxed);
        Ok(())
    }

    /// `new_vmid` (lock held): the id `vmid` gets in the current generation, and whether
    /// getting it rolled the generation over.
    fn new_vmid(
        &self,
        st: &mut Locked,
        vmid: &KvmVmid<P>,
        issuer: Option<usize>,
    ) -> Result<(u64, bool), VmidError> {
        let id = vmid.id.load(Relaxed);
        let mut generation = self.generation.load(Relaxed);
        let old_idx = id & self.mask();
        // An id with index 0 is never stored; treat it like "never allocated".
        if id != 0 && old_idx != 0 {
            let candidate = generation | old_idx;
            // a. Reserved by a CPU at the last rollover: every reserved copy moves to the new
            //    generation, or a later rollover would keep a stale one.
            if self.check_update_reserved(st, id, candidate) {
                vmid.id.store(candidate, Relaxed);
                return Ok((candidate, false));
            }
            // b. Pinned: the index was seeded into this generation's map. RFC v3 returned
            //    the candidate without storing it, leaving a stale id that takes the slow
            //    path on every load; the model stores it (smmu_kvm.md §3.4 item 6).
            if vmid.pins.load(Relaxed) > 0 {
                vmid.id.store(candidate, Relaxed);
                return Ok((candidate, false));
            }
            // c. Keep the old number if it is still free in this generation.
            if !st.map.test_and_set(old_idx as usize) {
                vmid.id.store(candidate, Relaxed);
                return Ok((candidate, false));
            }
        }
        let mut rolled_over = false;
        let idx = match st.map.find_next_zero(st.cur_idx) {
            Some(idx) => idx,
            None => {
                // Out of VMIDs: next generation.
                generation = self.next_generation(st, issuer);
                rolled_over = true;
                // The init check leaves a free index after any rollover.
                st.map.find_next_zero(1).ok_or(VmidError::NoFreeVmid)?
            }
        };
        st.map.set(idx);
        st.cur_idx = idx;
        let new = generation | idx as u64;
        vmid.id.store(new, Relaxed);
        Ok((new, rolled_over))
    }

    /// Rolls the generation over now, exactly as `new_vmid` does when the map is full: the
    /// generation moves on, the map is reseeded from the pinned map and the ids active (or
    /// still reserved) on each CPU, `TLBI ALLE1IS` is broadcast from `issuer`, and the next
    /// allocation searches from index 1. KVM never
    /// does this on demand; the model offers it to scenarios and benchmarks that study a
    /// rollover's effects without first using up the VMID space.
    pub fn roll_over(&self, issuer: Option<usize>) {
        self.state.with(|st| {
            self.next_generation(st, issuer);
            // new_vmid searches from index 1 right after a rollover.
            st.cur_idx = 1;
        });
    }

    /// The rollover (lock held), as `new_vmid` does it: `vmid_generation` moves on by
    /// `FIRST_VERSION`, then `flush_context`. Returns the new generation.
    fn next_generation(&self, st: &mut Locked, issuer: Option<usize>) -> u64 {
        let first = self.first_version();
        let generation = self
            .generation
            .fetch_add(first, Relaxed)
            .wrapping_add(first);
        self.flush_context(st, issuer);
        generation
    }

    /// `check_update_reserved_vmid`: rewrites *every* reserved slot holding `id`.
    fn check_update_reserved(&self, st: &mut Locked, id: u64, new: u64) -> bool {
        let mut hit = false;
        for r in st.reserved.iter_mut() {
            if *r == id {
                *r = new;
                hit = true;
            }
        }
        hit
    }

    /// `flush_context` (lock held): the rollover.
    fn flush_context(&self, st: &mut Locked, issuer: Option<usize>) {
        // Pinned VMIDs are pre-reserved in every generation (smmu_kvm.md §3.2).
        match &st.pinned {
            Some(pinned) => st.map.copy_from(pinned),
            None => st.map.clear_all(),
        }
        let mask = self.mask();
        for (slot, reserved) in self.percpu.iter().zip(st.reserved.iter_mut()) {
            let mut v = slot.active.swap(0, Relaxed);
            // 0: this CPU loaded nothing since an earlier rollover; keep what it reserved
            // then. (INVALID sets bit 0, which is never handed out.)
            if v == 0 {
                v = *reserved;
            }
            st.map.set((v & mask) as usize);
            *reserved = v;
        }
        st.rollovers += 1;
        // smmu_kvm.md §1.4 step 3: eager broadcast, lock held, complete before we go on.
        self.tlbi.broadcast(issuer, BroadcastTlbi::Alle1is);
        st.broadcasts += 1;
    }

    /// `kvm_arm_pinned_vmid_get` (RFC v3), returning a typed error where the kernel returns 0.
    /// Raw: the refcount is the caller's to balance; [`crate::Vm::pin_vmid`] wraps it in a
    /// handle that does.
    pub(crate) fn pin(&self, vmid: &KvmVmid<P>) -> Result<PinOutcome, PinError> {
        self.state.with(|st| {
            if st.pinned.is_none() {
                return Err(PinError::Disabled);
            }
            let refs = vmid.pins.load(Relaxed);
            if refs > 0 {
                let id = vmid.id.load(Relaxed);
                let hw = self.hw_vmid(id).ok_or(PinError::NoFreeVmid)?;
                vmid.pins.store(refs + 1, Relaxed);
                st.pins += 1;
                return Ok(PinOutcome {
                    vmid: hw,
                    id,
                    rolled_over: false,
                    refs: refs + 1,
                });
            }
            if st.nr_pinned >= st.max_pinned {
                return Err(PinError::Exhausted {
                    max_pinned: st.max_pinned,
                });
            }
            let mut id = vmid.id.load(Relaxed);
            let mut rolled_over = false;
            // A VM that never ran (id 0) or whose id is stale needs an allocation; it keeps
            // its number when that number is still free.
            if !self.gen_match(id) {
                (id, rolled_over) = self
                    .new_vmid(st, vmid, None)
                    .map_err(|_| PinError::NoFreeVmid)?;
            }
            let hw = self.hw_vmid(id).ok_or(PinError::NoFreeVmid)?;
            if let Some(pinned) = st.pinned.as_mut() {
                pinned.set(hw.get() as usize);
            }
            st.nr_pinned += 1;
            st.pins += 1;
            vmid.pins.store(1, Relaxed);
            Ok(PinOutcome {
                vmid: hw,
                id,
                rolled_over,
                refs: 1,
            })
        })
    }

    /// `kvm_arm_pinned_vmid_put` (RFC v3): drops one pin reference; at zero the index leaves
    /// the pinned map (it stays allocated until the next rollover). Returns the references
    /// left.
    pub(crate) fn unpin(&self, vmid: &KvmVmid<P>) -> Result<u64, NotPinned> {
        self.state.with(|st| {
            let refs = vmid.pins.load(Relaxed);
            if refs == 0 {
                return Err(NotPinned);
            }
            vmid.pins.store(refs - 1, Relaxed);
            st.unpins += 1;
            if refs == 1 {
                let idx = (vmid.id.load(Relaxed) & self.mask()) as usize;
                if let Some(pinned) = st.pinned.as_mut() {
                    pinned.clear(idx);
                }
                st.nr_pinned = st.nr_pinned.saturating_sub(1);
            }
            Ok(refs - 1)
        })
    }

    /// Records a pin reference that will never be released.
    pub(crate) fn note_leaked_pin(&self) {
        self.state.with(|st| st.leaked_pins += 1);
    }

    /// The counters.
    pub fn stats(&self) -> VmidStats {
        let fast_paths = self
            .percpu
            .iter()
            .map(|s| s.fast_paths.load(Relaxed))
            .fold(0u64, u64::wrapping_add);
        self.state.with(|st| VmidStats {
            generation: self.generation.load(Relaxed) >> self.bits.bits(),
            rollovers: st.rollovers,
            broadcasts: st.broadcasts,
            slow_paths: st.slow_paths,
            fast_paths,
            pins: st.pins,
            unpins: st.unpins,
            leaked_pins: st.leaked_pins,
            nr_pinned: st.nr_pinned,
            max_pinned: st.max_pinned,
        })
    }

    /// A copy of the allocator's state (see [`VmidSnapshot`] on consistency).
    pub fn snapshot(&self) -> VmidSnapshot {
        self.state.with(|st| self.snapshot_locked(st))
    }

    fn snapshot_locked(&self, st: &Locked) -> VmidSnapshot {
        VmidSnapshot {
            bits: self.bits,
            generation: self.generation.load(Relaxed),
            active: self.percpu.iter().map(|s| s.active.load(Relaxed)).collect(),
            reserved: st.reserved.to_vec(),
            cur_idx: st.cur_idx as u64,
            nr_pinned: st.nr_pinned,
            max_pinned: st.max_pinned,
            map: st.map.clone(),
            pinned: st.pinned.clone(),
        }
    }

    /// Runs `f` on a snapshot while the allocator lock is held: no slow path, allocation or
    /// rollover can happen until it returns (fast-path loads and puts go on). An oracle uses
    /// this to compare what is running against one fixed generation.
    pub fn inspect<R>(&self, f: impl FnOnce(&VmidSnapshot) -> R) -> R {
        self.state.with(|st| f(&self.snapshot_locked(st)))
    }

    /// Checks the invariants of smmu_kvm.md §1.6 that a single state can show (I1, I2, I3,
    /// the pinned-map half of I5), over the given stage-2 MMUs (every live one should be
    /// passed). I4, I6 and the "forever" of I5 are about history: the tests check them
    /// against a record of what each load and pin returned.
    ///
    /// Holds the allocator lock; safe to call while vCPUs load and put.
    pub fn audit<'a>(
        &self,
        vmids: impl IntoIterator<Item = &'a KvmVmid<P>>,
    ) -> Result<(), InvariantViolation> {
        self.state.with(|st| {
            let snap = self.snapshot_locked(st);
            let vms: Vec<(u64, u64)> = vmids
                .into_iter()
                .map(|v| (v.id.load(Relaxed), v.pins.load(Relaxed)))
                .collect();
            audit_snapshot(&snap, &vms)
        })
    }
}

/// The state-only invariants over a snapshot and the `(id, pin count)` of every live MMU.
fn audit_snapshot(snap: &VmidSnapshot, vms: &[(u64, u64)]) -> Result<(), InvariantViolation> {
    let invalid = snap.bits.num_vmids();
    // I1 (index 0 — nothing reserved yet, or INVALID — is never handed out; its bit may be
    // clear before the first rollover).
    for (cpu, &id) in snap.reserved.iter().enumerate() {
        let idx = snap.index(id);
        if idx != 0 && !snap.is_allocated(idx) {
            return Err(InvariantViolation::ReservedNotInMap { cpu, id });
        }
    }
    for (cpu, &id) in snap.active.iter().enumerate() {
        if id == 0 || id == invalid {
            continue;
        }
        if snap.index(id) == 0 {
            return Err(InvariantViolation::ZeroHandedOut { id });
        }
        if !snap.gen_match(id) {
            return Err(InvariantViolation::StaleActive { cpu, id });
        }
    }
    // Claims on hardware VMIDs, by owner: an MMU with a current-generation id; a pinned MMU
    // (its index survives rollovers whatever its generation); every reserved id, owned by
    // the MMU whose id it equals (it may be running with it) or by nobody alive. Two owners
    // may never claim one index.
    #[derive(PartialEq, Eq, Clone, Copy)]
    enum Owner {
        Mmu(usize),
        Gone(u64),
    }
    let mut claims: std::collections::HashMap<u64, (Owner, u64)> = std::collections::HashMap::new();
    let mut claim = |index: u64, owner: Owner, id: u64| -> Result<(), InvariantViolation> {
        match claims.insert(index, (owner, id)) {
            Some((prev, prev_id)) if prev != owner => Err(InvariantViolation::IndexShared {
                index,
                a: prev_id,
                b: id,
            }),
            _ => Ok(()),
        }
    };
    for (n, &(id, pins)) in vms.iter().enumerate() {
        let idx = snap.index(id);
        if pins > 0 {
            if idx == 0 {
                return Err(InvariantViolation::ZeroHandedOut { id });
            }
            if !snap.is_pinned(idx) || !snap.is_allocated(idx) {
                return Err(InvariantViolation::PinnedNotInMap { id });
            }
        }
        if id != 0 && (pins > 0 || snap.gen_match(id)) {
            if idx == 0 {
                return Err(InvariantViolation::ZeroHandedOut { id });
            }
            claim(idx, Owner::Mmu(n), id)?;
        }
    }
    for &id in &snap.reserved {
        let idx = snap.index(id);
        if idx == 0 {
            continue;
        }
        let owner = vms
            .iter()
            .position(|&(v, _)| v == id)
            .map_or(Owner::Gone(id), Owner::Mmu);
        claim(idx, owner, id)?;
    }
    let in_map = snap.pinned.as_ref().map_or(0, |p| p.count_ones() as u64);
    if in_map != snap.nr_pinned || snap.nr_pinned > snap.max_pinned {
        return Err(InvariantViolation::PinnedCount {
            nr_pinned: snap.nr_pinned,
            in_map,
            max_pinned: snap.max_pinned,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consistent 8-bit state: generation 2, index 3 reserved by CPU 0 and pinned by an
    /// MMU, index 5 current.
    fn snap() -> VmidSnapshot {
        let mut map = Bitmap::new(256);
        let mut pinned = Bitmap::new(256);
        map.set(3);
        map.set(5);
        pinned.set(3);
        VmidSnapshot {
            bits: VmidBits::Eight,
            generation: 2 << 8,
            active: vec![0, (2 << 8) | 5],
            reserved: vec![(1 << 8) | 3, 1 << 8],
            cur_idx: 5,
            nr_pinned: 1,
            max_pinned: 252,
            map,
            pinned: Some(pinned),
        }
    }

    fn vms() -> Vec<(u64, u64)> {
        vec![((1 << 8) | 3, 1), ((2 << 8) | 5, 0)]
    }

    #[test]
    fn audit_accepts_a_consistent_state() {
        assert_eq!(audit_snapshot(&snap(), &vms()), Ok(()));
    }

    #[test]
    fn audit_finds_each_broken_invariant() {
        let mut s = snap();
        s.map.clear(3);
        assert!(matches!(
            audit_snapshot(&s, &vms()),
            Err(InvariantViolation::ReservedNotInMap { cpu: 0, .. })
        ));

        // A second MMU with a current id on index 5.
        let mut v = vms();
        v.push(((2 << 8) | 5, 0));
        assert!(matches!(
            audit_snapshot(&snap(), &v),
            Err(InvariantViolation::IndexShared { index: 5, .. })
        ));

        // A current MMU on the reserved (and pinned) index 3.
        let mut v = vms();
        v.push(((2 << 8) | 3, 0));
        assert!(matches!(
            audit_snapshot(&snap(), &v),
            Err(InvariantViolation::IndexShared { index: 3, .. })
        ));

        // Index 0 in the current generation.
        let mut v = vms();
        v.push((2 << 8, 0));
        assert!(matches!(
            audit_snapshot(&snap(), &v),
            Err(InvariantViolation::ZeroHandedOut { .. })
        ));

        let mut s = snap();
        s.active[0] = (1 << 8) | 9;
        assert!(matches!(
            audit_snapshot(&s, &vms()),
            Err(InvariantViolation::StaleActive { cpu: 0, .. })
        ));

        let mut s = snap();
        if let Some(p) = s.pinned.as_mut() {
            p.clear(3);
        }
        assert!(matches!(
            audit_snapshot(&s, &vms()),
            Err(InvariantViolation::PinnedNotInMap { .. })
        ));

        let mut s = snap();
        s.nr_pinned = 2;
        assert!(matches!(
            audit_snapshot(&s, &vms()),
            Err(InvariantViolation::PinnedCount {
                nr_pinned: 2,
                in_map: 1,
                ..
            })
        ));
    }

    #[test]
    fn hardware_vmid_is_masked_to_the_width_and_never_zero() {
        let a = VmidAllocator::<StdPrimitives>::new(VmidBits::Eight, 2, true, Arc::new(NullTlbi))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.hw_vmid((7 << 8) | 0x2a).map(Vmid::get), Some(0x2a));
        assert_eq!(a.hw_vmid(7 << 8), None);
        assert_eq!(a.first_version(), 1 << 8);
        assert_eq!(a.active_invalid(), 1 << 8);
        assert!(a.gen_match((1 << 8) | 4));
        assert!(!a.gen_match((2 << 8) | 4));
        assert!(
            !a.gen_match(0),
            "id 0 never matches: generations start at 1"
        );
        assert_eq!(Vmid::new(0), None);
    }

    #[test]
    fn raw_unpin_without_a_pin_is_an_error() {
        let a = VmidAllocator::<StdPrimitives>::new(VmidBits::Sixteen, 2, true, Arc::new(NullTlbi))
            .unwrap_or_else(|e| panic!("{e}"));
        let v = KvmVmid::new();
        assert_eq!(a.unpin(&v), Err(NotPinned));
        assert!(a.pin(&v).is_ok());
        assert_eq!(a.unpin(&v), Ok(0));
        assert_eq!(a.unpin(&v), Err(NotPinned));
        assert_eq!(a.stats().nr_pinned, 0);
    }
}

//! The machine KVM runs on: the PEs and their DVM interconnect (`hw::Dvm`), and optionally
//! host memory with its frame allocator for guest RAM and stage-2 tables.

use std::fmt;
use std::sync::Arc;

use twinmmu_hw::{Dvm, FrameAllocator, PhysMem, Tlbi, TlbiOp};

use crate::vmid::{BroadcastTlbi, TlbiBroadcaster, VmidInitError};

/// What a [`crate::Kvm`] runs on. Its physical CPUs are the DVM's PEs (CPU `n` is PE `n`).
#[derive(Clone)]
pub struct Machine {
    dvm: Arc<Dvm>,
    memory: Option<(Arc<dyn PhysMem>, FrameAllocator)>,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("pes", &self.dvm.pes().len())
            .field("memory", &self.memory.as_ref().map(|(_, fa)| fa.range()))
            .finish()
    }
}

impl Machine {
    /// PEs and their interconnect, no host memory: vCPUs run on the PEs (their VMIDs tag
    /// the PEs' TLBs, their TLBIs go over the DVM, rollovers broadcast over it), but VMs
    /// have no stage 2.
    pub fn new(dvm: Arc<Dvm>) -> Self {
        Machine { dvm, memory: None }
    }

    /// Host memory and the allocator guest RAM and stage-2 tables are carved from.
    pub fn with_memory(mut self, mem: Arc<dyn PhysMem>, frames: FrameAllocator) -> Self {
        self.memory = Some((mem, frames));
        self
    }

    pub fn dvm(&self) -> &Arc<Dvm> {
        &self.dvm
    }

    pub fn memory(&self) -> Option<&Arc<dyn PhysMem>> {
        self.memory.as_ref().map(|(m, _)| m)
    }

    pub fn frames(&self) -> Option<&FrameAllocator> {
        self.memory.as_ref().map(|(_, f)| f)
    }
}

/// Building a [`crate::Kvm`] on a machine failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    #[error(transparent)]
    Vmid(#[from] VmidInitError),
    #[error("KVM is configured for {ncpus} CPUs but the machine has {pes} PEs")]
    CpuCount { ncpus: usize, pes: usize },
}

/// The allocator's rollover hook on a real interconnect: `__kvm_flush_vm_context`, i.e.
/// `DSB ISH; TLBI ALLE1IS; DSB ISH` at EL2 from the CPU that rolled over (smmu_kvm.md
/// §1.4 step 3). It runs with the allocator lock held and never calls back into it: the
/// DVM only takes its own and the recipients' locks.
pub(crate) struct DvmRollover(pub(crate) Arc<Dvm>);

impl TlbiBroadcaster for DvmRollover {
    fn broadcast(&self, issuer: Option<usize>, op: BroadcastTlbi) {
        let t = match op {
            BroadcastTlbi::Alle1is => Tlbi::new(TlbiOp::Alle1is, 0),
        };
        // The issuer is a CPU the allocator checked, so this cannot fail on it; should it,
        // the broadcast still goes out, attributed to no PE.
        if self.0.broadcast(issuer, t).is_err() {
            let _ = self.0.broadcast(None, t);
        }
    }
}

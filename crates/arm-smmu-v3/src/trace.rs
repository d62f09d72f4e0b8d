//! An optional, bounded log of what the driver did to the SMMU, in order: every command it
//! published, every STE/CD dword write, CMD_SYNC completions, command errors and VMID pin
//! releases. Tests read it to check orderings (the safe unpin order of smmu_kvm.md §3.3, the
//! break-before-make STE discipline); `Options::trace` turns it on.

use std::collections::VecDeque;

/// One step the driver took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceEvent {
    /// A command written to the main command queue (before PROD was published).
    Cmd([u64; 2]),
    /// A CMD_SYNC completed (CONS passed it, or its MSI arrived).
    SyncDone,
    /// The SMMU stopped on a command with CMDQ_CONS.ERR = `code`; the driver recovered.
    CmdError { code: u8 },
    /// STE dword `index` of `sid` was written with `value`.
    SteWrite { sid: u32, index: u8, value: u64 },
    /// CD dword `index` at `pa` was written.
    CdWrite { pa: u64, index: u8, value: u64 },
    /// A pinned KVM VMID was released (after its retire step completed).
    Unpin { vmid: u16 },
    /// A private VMID went back to the SMMU's allocator.
    FreeVmid { vmid: u16 },
}

#[derive(Debug)]
pub(crate) struct Trace {
    on: bool,
    cap: usize,
    events: VecDeque<TraceEvent>,
}

impl Trace {
    pub(crate) fn new(on: bool) -> Self {
        Trace {
            on,
            cap: 1 << 16,
            events: VecDeque::new(),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, e: TraceEvent) {
        if !self.on {
            return;
        }
        if self.events.len() == self.cap {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    pub(crate) fn take(&mut self) -> Vec<TraceEvent> {
        self.events.drain(..).collect()
    }
}

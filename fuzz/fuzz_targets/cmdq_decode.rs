//! Random command-queue contents and register writes: decoding and executing any 16-byte
//! entries must leave the SMMU consistent (a CONS.ERR code or progress), never panic.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use twinmmu_hw::cmd::{CmdqEntry, decode};
use twinmmu_hw::regs::off;
use twinmmu_hw::{PhysMem, Smmu, SmmuConfig, SparseMem, StallModel};

const RAM: u64 = 0x4000_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let flags = data[0];
    let cfg = SmmuConfig {
        s1p: flags & 1 != 0 || flags & 2 == 0,
        s2p: flags & 2 != 0,
        ril: flags & 4 != 0,
        ats: flags & 8 != 0,
        pri: flags & 8 != 0 && flags & 16 != 0,
        hyp: flags & 32 != 0,
        stall_model: if flags & 64 != 0 {
            StallModel::TerminateOnly
        } else {
            StallModel::StallAndTerminate
        },
        term_model: flags & 128 != 0,
        ..SmmuConfig::default()
    };
    // Pure decoding of every 16-byte chunk.
    for c in data[1..].chunks_exact(16) {
        let w0 = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
        let w1 = u64::from_le_bytes(c[8..].try_into().unwrap_or([0; 8]));
        let _ = decode(CmdqEntry([w0, w1]), &cfg);
    }
    // Execution through the queue.
    let Ok(mem) = SparseMem::with_range(RAM, 0x10_0000) else {
        return;
    };
    let mem = Arc::new(mem);
    let Ok(smmu) = Smmu::new(cfg, mem.clone()) else {
        return;
    };
    let _ = mem.write(RAM, &data[1..data.len().min(1 + 16 * 256)]);
    let _ = smmu.mmio_write(off::CMDQ_BASE, 8, RAM | 8);
    let _ = smmu.mmio_write(off::EVENTQ_BASE, 8, (RAM + 0x8_0000) | 4);
    let _ = smmu.mmio_write(off::STRTAB_BASE, 8, RAM + 0x4_0000);
    let _ = smmu.mmio_write(
        off::STRTAB_BASE_CFG,
        4,
        u64::from(data[1] & 0x3f) | (u64::from(data[2] & 1) << 16) | (8 << 6),
    );
    let _ = smmu.mmio_write(off::CR0, 4, 0b1101);
    let n = u64::from(data[3]) % 257;
    let _ = smmu.mmio_write(off::CMDQ_PROD, 4, n);
    // Acknowledge whatever error happened and let it retry once.
    if let Ok(g) = smmu.mmio_read(off::GERROR, 4) {
        let _ = smmu.mmio_write(off::GERRORN, 4, g);
    }
    let _ = smmu.stats();
});

//! No input panics: random command-queue contents and random memory under the stream table,
//! CDs and translation tables (the fuzz targets' bodies, run under proptest in CI).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use twinmmu_hw::cmd::{CmdqEntry, TlbiRange, decode};
use twinmmu_hw::regs::off;
use twinmmu_hw::{
    AccessKind, PhysMem, Smmu, SmmuConfig, SparseMem, StallModel, Tlbi, TlbiOp, Transaction,
};

const RAM: u64 = 0x4000_0000;

fn cases() -> u32 {
    if std::env::var_os("TWINMMU_LONG").is_some() {
        4096
    } else {
        64
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_commands_never_panic(flags in any::<u8>(), cmds in proptest::collection::vec(any::<(u64, u64)>(), 1..64), prod in 0u32..128) {
        let cfg = SmmuConfig {
            s2p: flags & 2 != 0,
            ril: flags & 4 != 0,
            ats: flags & 8 != 0,
            pri: flags & 24 == 24,
            hyp: flags & 32 != 0,
            stall_model: if flags & 64 != 0 { StallModel::TerminateOnly } else { StallModel::StallAndTerminate },
            term_model: flags & 128 != 0,
            ..SmmuConfig::default()
        };
        for (a, b) in &cmds {
            // Bias towards real opcodes.
            let _ = decode(CmdqEntry([(a & !0xff) | u64::from((*a as u8) & 0x7f), *b]), &cfg);
        }
        let mem = Arc::new(SparseMem::with_range(RAM, 0x10_0000).unwrap());
        let smmu = Smmu::new(cfg, mem.clone()).unwrap();
        for (i, (a, b)) in cmds.iter().enumerate() {
            let op = u64::from((*a as u8) % 0x48);
            mem.write_u64(RAM + 16 * i as u64, (a & !0xff) | op).unwrap();
            mem.write_u64(RAM + 16 * i as u64 + 8, *b).unwrap();
        }
        smmu.mmio_write(off::CMDQ_BASE, 8, RAM | 7).unwrap();
        smmu.mmio_write(off::EVENTQ_BASE, 8, (RAM + 0x8_0000) | 4).unwrap();
        smmu.mmio_write(off::CR0, 4, 0b1101).unwrap();
        smmu.mmio_write(off::CMDQ_PROD, 4, u64::from(prod)).unwrap();
        for _ in 0..3 {
            let g = smmu.mmio_read(off::GERROR, 4).unwrap();
            smmu.mmio_write(off::GERRORN, 4, g).unwrap();
        }
        // Consumption never runs past PROD (PROD < 128 keeps the wrap bit clear, so CONS
        // cannot wrap either), whatever the commands were.
        let cons = smmu.mmio_read(off::CMDQ_CONS, 4).unwrap();
        prop_assert!(cons & 0xff <= u64::from(prod), "CONS {cons:#x} past PROD {prod:#x}");
    }

    #[test]
    fn random_tables_never_panic(page in proptest::collection::vec(any::<u8>(), 256..1024), regs in any::<[u8; 8]>(), txns in proptest::collection::vec(any::<(u16, u8, u64)>(), 1..32)) {
        let mem = Arc::new(SparseMem::with_range(RAM, 0x10_0000).unwrap());
        let smmu = Smmu::new(SmmuConfig::default(), mem.clone()).unwrap();
        let mut a = RAM;
        while a < RAM + 0x10_0000 {
            mem.write(a, &page).unwrap();
            // Steer some pointers into RAM.
            mem.write_u64(a + 8, RAM + (a & 0xf_f000)).unwrap();
            a += 0x1000;
        }
        smmu.mmio_write(off::STRTAB_BASE, 8, RAM | (u64::from(regs[0]) << 6)).unwrap();
        smmu.mmio_write(off::STRTAB_BASE_CFG, 4, u64::from(regs[1] & 0x3f) | (u64::from(regs[2] & 0x1f) << 6) | (u64::from(regs[3] & 3) << 16)).unwrap();
        smmu.mmio_write(off::EVENTQ_BASE, 8, (RAM + 0xf_0000) | 4).unwrap();
        smmu.mmio_write(off::CR2, 4, u64::from(regs[4] & 7)).unwrap();
        smmu.mmio_write(off::CR0, 4, 0b0101).unwrap();
        let mut port = smmu.port();
        for (sid, f, addr) in txns {
            let kind = match f >> 6 { 0 => AccessKind::Read, 1 => AccessKind::Write, _ => AccessKind::Execute };
            let t = Transaction::new(u32::from(sid & 0x1ff), (f & 1 != 0).then_some(u32::from(f & 0x3e)), addr, kind, f & 2 != 0);
            let _ = smmu.translate(t);
            let _ = port.translate(t);
            let mut buf = [0u8; 32];
            let _ = smmu.dma_read(t.sid, t.ssid, addr, &mut buf, false);
        }
    }

    /// The DVM port takes whatever a PE model or a script builds: any operation, VMID,
    /// ASID, address and range operands (a range's SCALE is a full byte here, not the six
    /// bits a command can encode).
    #[test]
    fn random_broadcasts_never_panic(ops in proptest::collection::vec(any::<(u8, u16, u16, u64, Option<(u8, u8, u8, u8)>)>(), 1..32)) {
        let mem = Arc::new(SparseMem::with_range(RAM, 0x10_0000).unwrap());
        let smmu = Smmu::new(SmmuConfig::default(), mem).unwrap();
        smmu.mmio_write(off::CR2, 4, 0).unwrap();
        for (op, vmid, asid, addr, range) in ops {
            let op = TlbiOp::ALL[usize::from(op) % TlbiOp::ALL.len()];
            let mut t = Tlbi::new(op, vmid).with_asid(asid).with_addr(addr);
            if let Some((tg, num, scale, ttl)) = range {
                t = t.with_range(TlbiRange { tg_shift: [12, 14, 16][usize::from(tg % 3)], num, scale, ttl });
            }
            // IDR0.BTM = 1 and CR2.PTM = 0: every broadcast is honoured.
            prop_assert!(smmu.broadcast(t), "{t:?} ignored");
        }
    }
}

//! Feeds random memory and random CD/STE fields to the walker (and the builder): every input
//! must give a typed configuration error, a translation or a typed fault, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinmmu_vmsa::*;

const POOL: u64 = 0x4000_0000;
const PAGES: u64 = 8;
const PAGE: u64 = 0x1_0000;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, i| v | (self.u8() as u64) << (8 * i))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let f = Features {
        oas: PaSize::from_encoding(b.u8() % 7).unwrap_or(PaSize::Bits48),
        ias: PaSize::Bits52,
        vax52: b.u8() & 1 != 0,
        stt: b.u8() & 1 != 0,
        had: true,
        xnx: b.u8() & 1 != 0,
        ..Features::default()
    };
    let s1 = Stage1Params {
        ttb: [
            TtbParams {
                ttb: POOL + (b.u8() as u64 % PAGES) * PAGE,
                tsz: b.u8() % 64,
                tg: b.u8() & 3,
                epd: b.u8() & 1 != 0,
                tbi: b.u8() & 1 != 0,
                had: b.u8() & 1 != 0,
            },
            TtbParams {
                ttb: POOL + (b.u8() as u64 % PAGES) * PAGE,
                tsz: b.u8() % 64,
                tg: b.u8() & 3,
                epd: b.u8() & 1 != 0,
                tbi: b.u8() & 1 != 0,
                had: b.u8() & 1 != 0,
            },
        ],
        ips: b.u8() & 7,
        affd: b.u8() & 1 != 0,
        wxn: b.u8() & 1 != 0,
        pan: b.u8() & 1 != 0,
        mair: b.u64(),
        ..Default::default()
    };
    let s2 = Stage2Params {
        s2ttb: POOL + (b.u8() as u64 % PAGES) * PAGE,
        s2t0sz: b.u8() % 64,
        s2sl0: b.u8() & 3,
        s2tg: b.u8() & 3,
        s2ps: b.u8() & 7,
        s2affd: b.u8() & 1 != 0,
        ..Default::default()
    };
    let addrs = [b.u64(), b.u64(), b.u64(), b.u64()];
    // The rest: (slot, descriptor) pairs written into the table pool; a descriptor's address
    // is pulled into the pool when its top bit says so, so walks go deep.
    let mem = SparseMemory::new();
    mem.add_range(POOL, PAGES * PAGE);
    while !b.0.is_empty() {
        let slot = (b.u8() as u64) | (b.u8() as u64) << 8;
        let mut d = b.u64();
        if d >> 63 == 0 {
            d = (d & !descriptor::OA_MASK_48) | (POOL + (d >> 12 & 0x7f) * 0x1000);
        }
        let _ = mem.write_u64(POOL + (slot % (PAGES * PAGE / 8)) * 8, d);
    }
    if let Ok(cfg) = Stage1Config::new(&s1, &f) {
        for &va in &addrs {
            if let Ok(t) = walk_stage1(&cfg, &mem, &mut Direct, va) {
                let _ = t.check(Access::new(AccessKind::Write, va & 1 == 0), cfg.controls());
            }
            // Nested-style hook that refuses some fetches.
            let mut hook = |ipa: u64, level: u8| {
                if (ipa ^ va) & 0x18 == 0x18 {
                    Err(level)
                } else {
                    Ok(ipa)
                }
            };
            let _ = walk_stage1(&cfg, &mem, &mut hook, va);
        }
    }
    if let Ok(cfg) = Stage2Config::new(&s2, &f) {
        for &ipa in &addrs {
            let _ = walk_stage2(&cfg, &mem, ipa & ((1 << cfg.geometry().ia_bits()) - 1));
            let _ = walk_stage2(&cfg, &mem, ipa);
        }
        let mut builder = TableBuilder::adopt(
            TableFormat::of_stage2(&cfg),
            cfg.ttb(),
            &mem,
            BumpAllocator::new(1 << 40, 1 << 24),
        );
        let g = cfg.geometry().granule().size();
        let _ = builder.unmap((addrs[0] % 64) * g, (addrs[1] % 64 + 1) * g);
        let _ = builder.map(
            (addrs[2] % 64) * g,
            (addrs[3] % 64) * g,
            (addrs[1] % 8 + 1) * g,
            S2LeafAttrs::rw().bits(),
        );
    }
});

//! Property test: the IOAS against a plain reference model (a sorted vector of areas and
//! linear scans). Random map (fixed/auto), unmap, unmap-all, copy, allow and reserve
//! sequences must give the same results, the same errno and the same areas; with a mock
//! domain attached every area must translate to its backing, and nothing may stay pinned.
//! `TWINMMU_LONG=1` runs many more cases.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proptest::prelude::*;
use twinmmu_iommufd::mock::{self, MOCK_APERTURE_LAST, MOCK_APERTURE_START, MOCK_IO_PAGE_SIZE};
use twinmmu_iommufd::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MArea {
    iova: u64,
    len: u64,
    /// Backing address of the first byte.
    addr: u64,
    write: bool,
}

impl MArea {
    fn last(&self) -> u64 {
        self.iova + self.len - 1
    }
}

/// The reference: everything in vectors, scanned linearly.
struct Model {
    areas: Vec<MArea>,
    reserved: Vec<(u64, u64)>,
    allowed: Vec<(u64, u64)>,
    align: u64,
}

fn meets(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl Model {
    fn new(domain: bool) -> Model {
        let (reserved, align) = if domain {
            (
                vec![
                    (0, MOCK_APERTURE_START - 1),
                    (MOCK_APERTURE_LAST + 1, u64::MAX),
                ],
                MOCK_IO_PAGE_SIZE,
            )
        } else {
            (vec![], 1)
        };
        Model {
            areas: vec![],
            reserved,
            allowed: vec![],
            align,
        }
    }

    fn fits(start: u64, last: u64, len: u64, align: u64, off: u64) -> Option<u64> {
        let a = start.checked_add(align - 1)?;
        let a = (a & !(align - 1)) | off;
        if a >= last || last - a < len - 1 {
            return None;
        }
        Some(a)
    }

    fn alloc(&self, addr: u64, len: u64) -> Result<u64, Errno> {
        let off = addr % PAGE_SIZE;
        if len == 0 || len >= u64::MAX / 2 {
            return Err(Errno::EOVERFLOW);
        }
        let pow = len.next_power_of_two();
        let mut align = if addr == 0 {
            pow
        } else {
            pow.min(1 << addr.trailing_zeros())
        };
        align = align.min(HPAGE_SIZE);
        if align < self.align {
            return Err(Errno::EINVAL);
        }
        let (wf, wl) = (PAGE_SIZE, u64::MAX - PAGE_SIZE);
        let mut spans: Vec<(u64, u64)> = Vec::new();
        if self.allowed.is_empty() {
            spans.push((wf, wl));
        } else {
            let mut al = self.allowed.clone();
            al.sort();
            for (s, l) in al {
                match spans.last_mut() {
                    Some(p) if p.1.checked_add(1).is_none_or(|n| s <= n) => p.1 = p.1.max(l),
                    _ => spans.push((s, l)),
                }
            }
            spans = spans
                .into_iter()
                .filter(|&(s, l)| l >= wf && s <= wl)
                .map(|(s, l)| (s.max(wf), l.min(wl)))
                .collect();
        }
        for (s, l) in spans {
            if Self::fits(s, l, len, align, off).is_none() {
                continue;
            }
            let mut used: Vec<(u64, u64)> = self
                .reserved
                .iter()
                .copied()
                .chain(self.areas.iter().map(|a| (a.iova, a.last())))
                .filter(|&u| meets(u, (s, l)))
                .collect();
            used.sort();
            let mut cur = Some(s);
            for (us, ul) in used {
                let Some(c) = cur else { break };
                if us > c
                    && let Some(v) = Self::fits(c, us - 1, len, align, off)
                {
                    return Ok(v);
                }
                cur = cur
                    .map(|c| c.max(ul.checked_add(1).unwrap_or(0)))
                    .filter(|_| ul != u64::MAX);
            }
            if let Some(c) = cur
                && c <= l
                && let Some(v) = Self::fits(c, l, len, align, off)
            {
                return Ok(v);
            }
        }
        Err(Errno::ENOSPC)
    }

    fn place(
        &mut self,
        pieces: &[(u64, u64, bool)],
        len: u64,
        fixed: Option<u64>,
        write: bool,
    ) -> Result<u64, Errno> {
        if !len.is_multiple_of(self.align) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let iova = match fixed {
            Some(i) => {
                if i % self.align != 0 {
                    return Err(Errno::EINVAL);
                }
                let last = i.checked_add(len - 1).ok_or(Errno::EOVERFLOW)?;
                if self.reserved.iter().any(|&r| meets(r, (i, last))) {
                    return Err(Errno::EINVAL);
                }
                if self
                    .areas
                    .iter()
                    .any(|a| meets((a.iova, a.last()), (i, last)))
                {
                    return Err(Errno::EEXIST);
                }
                i
            }
            None => self.alloc(pieces[0].0, len)?,
        };
        let mut at = iova;
        let mut new = Vec::new();
        for &(addr, plen, writable) in pieces {
            if write && !writable {
                return Err(Errno::EPERM);
            }
            if !(addr % PAGE_SIZE).is_multiple_of(self.align) {
                return Err(Errno::EINVAL);
            }
            new.push(MArea {
                iova: at,
                len: plen,
                addr,
                write: writable,
            });
            at += plen;
        }
        self.areas.extend(new);
        self.areas.sort_by_key(|a| a.iova);
        Ok(iova)
    }

    fn map(&mut self, addr: u64, len: u64, fixed: Option<u64>, write: bool) -> Result<u64, Errno> {
        if fixed == Some(u64::MAX) || len == u64::MAX {
            return Err(Errno::EOVERFLOW);
        }
        if addr.checked_add(len).is_none() {
            return Err(Errno::EOVERFLOW);
        }
        if len == 0 || len > u64::MAX - PAGE_SIZE {
            return Err(Errno::EINVAL);
        }
        self.place(&[(addr, len, write)], len, fixed, write)
    }

    fn copy(&mut self, src: u64, len: u64, fixed: Option<u64>, write: bool) -> Result<u64, Errno> {
        if len == u64::MAX || src == u64::MAX || fixed == Some(u64::MAX) {
            return Err(Errno::EOVERFLOW);
        }
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let last = src.checked_add(len - 1).ok_or(Errno::EOVERFLOW)?;
        let mut pieces = Vec::new();
        let mut cur = src;
        loop {
            let a = self
                .areas
                .iter()
                .find(|a| a.iova <= cur && cur <= a.last())
                .ok_or(Errno::ENOENT)?;
            let end = a.last().min(last);
            pieces.push((a.addr + (cur - a.iova), end - cur + 1, a.write));
            if end == last {
                break;
            }
            cur = end + 1;
        }
        self.place(&pieces, len, fixed, write)
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<u64, Errno> {
        let all = iova == 0 && len == u64::MAX;
        let (s, l) = if all {
            (0, u64::MAX)
        } else {
            if iova == u64::MAX || len == u64::MAX {
                return Err(Errno::EOVERFLOW);
            }
            if len == 0 {
                return Err(Errno::EINVAL);
            }
            (iova, iova.checked_add(len - 1).ok_or(Errno::EOVERFLOW)?)
        };
        let mut done = 0;
        while let Some(pos) = self
            .areas
            .iter()
            .position(|a| meets((a.iova, a.last()), (s, l)))
        {
            let a = self.areas[pos];
            if a.iova < s || a.last() > l {
                return Err(Errno::ENOENT);
            }
            self.areas.remove(pos);
            done += a.len;
        }
        if done == 0 && !all {
            return Err(Errno::ENOENT);
        }
        Ok(done)
    }

    fn allow(&mut self, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        let mut new: Vec<(u64, u64)> = Vec::new();
        for &(s, l) in ranges {
            if s >= l {
                return Err(Errno::EINVAL);
            }
            if new.iter().any(|&r| meets(r, (s, l))) {
                return Err(Errno::EINVAL);
            }
            new.push((s, l));
        }
        if new
            .iter()
            .any(|&n| self.reserved.iter().any(|&r| meets(r, n)))
        {
            return Err(Errno::EADDRINUSE);
        }
        self.allowed = new;
        Ok(())
    }

    fn reserve(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        let last = start.wrapping_add(len).wrapping_sub(1);
        if self
            .areas
            .iter()
            .any(|a| meets((a.iova, a.last()), (start, last)))
            || self.allowed.iter().any(|&r| meets(r, (start, last)))
        {
            return Err(Errno::EADDRINUSE);
        }
        self.reserved.push((start, last));
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    MapFixed {
        addr: u64,
        len: u64,
        iova: u64,
        write: bool,
    },
    MapAuto {
        addr: u64,
        len: u64,
        write: bool,
    },
    Unmap {
        iova: u64,
        len: u64,
    },
    UnmapAll,
    CopyFixed {
        src: u64,
        len: u64,
        dst: u64,
        write: bool,
    },
    CopyAuto {
        src: u64,
        len: u64,
        write: bool,
    },
    Allow {
        ranges: Vec<(u64, u64)>,
    },
    Reserve {
        start: u64,
        len: u64,
    },
}

/// IOVAs near the interesting region, in mock-page steps with occasional odd offsets.
fn iova_strategy(base: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0u64..96).prop_map(move |k| base + k * MOCK_IO_PAGE_SIZE),
        1 => (0u64..96, 1u64..MOCK_IO_PAGE_SIZE).prop_map(move |(k, o)| base + k * MOCK_IO_PAGE_SIZE + o),
        1 => Just(u64::MAX),
        1 => Just(0u64),
    ]
}

fn len_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (1u64..24).prop_map(|k| k * MOCK_IO_PAGE_SIZE),
        2 => 1u64..3 * PAGE_SIZE,
        1 => Just(0u64),
        1 => Just(u64::MAX),
    ]
}

fn addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..32).prop_map(|k| BUFFER + k * MOCK_IO_PAGE_SIZE),
        2 => (0u64..32, 1u64..PAGE_SIZE).prop_map(|(k, o)| BUFFER + k * PAGE_SIZE + o),
        1 => Just(u64::MAX - 10),
    ]
}

fn op_strategy(base: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (addr_strategy(), len_strategy(), iova_strategy(base), any::<bool>())
            .prop_map(|(addr, len, iova, write)| Op::MapFixed { addr, len, iova, write }),
        4 => (addr_strategy(), len_strategy(), any::<bool>())
            .prop_map(|(addr, len, write)| Op::MapAuto { addr, len, write }),
        5 => (iova_strategy(base), len_strategy()).prop_map(|(iova, len)| Op::Unmap { iova, len }),
        1 => Just(Op::UnmapAll),
        3 => (iova_strategy(base), len_strategy(), iova_strategy(base + (1 << 20)), any::<bool>())
            .prop_map(|(src, len, dst, write)| Op::CopyFixed { src, len, dst, write }),
        2 => (iova_strategy(base), len_strategy(), any::<bool>())
            .prop_map(|(src, len, write)| Op::CopyAuto { src, len, write }),
        1 => prop::collection::vec((iova_strategy(base), 1u64..64 * PAGE_SIZE), 0..3)
            .prop_map(|v| Op::Allow { ranges: v.into_iter().map(|(s, l)| (s, s.saturating_add(l))).collect() }),
        1 => (iova_strategy(base), 1u64..8 * PAGE_SIZE).prop_map(|(start, len)| Op::Reserve { start, len }),
    ]
}

fn flags(write: bool, fixed: bool) -> u32 {
    let mut f = map_flags::READABLE;
    if write {
        f |= map_flags::WRITEABLE;
    }
    if fixed {
        f |= map_flags::FIXED_IOVA;
    }
    f
}

fn run(domain: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let env = Env::new();
    let c = &env.ictx;
    let ioas = env.ioas();
    let hwpt = if domain {
        Some(env.mock_domain(ioas, 0).unwrap().0.hwpt_id)
    } else {
        None
    };
    let mut m = Model::new(domain);
    for (i, op) in ops.iter().enumerate() {
        let (got, want) = match op.clone() {
            Op::MapFixed {
                addr,
                len,
                iova,
                write,
            } => (
                c.ioas_map(flags(write, true), ioas, env.src(addr), len, iova),
                m.map(addr, len, Some(iova), write),
            ),
            Op::MapAuto { addr, len, write } => (
                c.ioas_map(flags(write, false), ioas, env.src(addr), len, 0),
                m.map(addr, len, None, write),
            ),
            Op::Unmap { iova, len } => (c.ioas_unmap(ioas, iova, len), m.unmap(iova, len)),
            Op::UnmapAll => (c.ioas_unmap(ioas, 0, u64::MAX), m.unmap(0, u64::MAX)),
            Op::CopyFixed {
                src,
                len,
                dst,
                write,
            } => (
                c.ioas_copy(flags(write, true), ioas, ioas, len, dst, src),
                m.copy(src, len, Some(dst), write),
            ),
            Op::CopyAuto { src, len, write } => (
                c.ioas_copy(flags(write, false), ioas, ioas, len, 0, src),
                m.copy(src, len, None, write),
            ),
            Op::Allow { ranges } => {
                let r: Vec<IovaRange> = ranges.iter().map(|&(s, l)| IovaRange::new(s, l)).collect();
                (
                    c.ioas_allow_iovas(ioas, r.len() as u32, &r).map(|_| 0),
                    m.allow(&ranges).map(|_| 0),
                )
            }
            Op::Reserve { start, len } => (
                c.ioas_add_reserved(ioas, start, len).map(|_| 0),
                m.reserve(start, len).map(|_| 0),
            ),
        };
        prop_assert_eq!(got, want, "op {} {:?}", i, op);
        let areas: Vec<(u64, u64)> = m.areas.iter().map(|a| (a.iova, a.len)).collect();
        prop_assert_eq!(
            c.ioas_areas(ioas).unwrap(),
            areas,
            "areas after op {} {:?}",
            i,
            op
        );
    }
    if let Some(h) = hwpt {
        // The domain holds exactly the areas, each translating to its backing pages.
        let d = mock::mock_domain_of(c, h).unwrap();
        for a in &m.areas {
            prop_assert_eq!(d.iova_to_phys(a.iova), Some(a.addr));
            prop_assert_eq!(d.iova_to_phys(a.last()), Some(a.addr + a.len - 1));
        }
        let mapped: u64 = m.areas.iter().map(|a| a.len).sum();
        let md = d.as_any().downcast_ref::<mock::MockDomain>().unwrap();
        prop_assert_eq!(md.mapped_bytes(), mapped);
    } else {
        prop_assert_eq!(
            env.user.total_pins(),
            0,
            "lazy: nothing pinned without a domain"
        );
    }
    c.ioas_unmap(ioas, 0, u64::MAX).unwrap();
    prop_assert_eq!(env.user.total_pins(), 0);
    env.teardown();
    Ok(())
}

fn cases() -> u32 {
    if std::env::var("TWINMMU_LONG").is_ok_and(|v| v == "1") {
        4000
    } else {
        96
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn ioas_matches_model_without_domain(ops in prop::collection::vec(op_strategy(PAGE_SIZE), 1..40)) {
        run(false, &ops)?;
    }

    #[test]
    fn ioas_matches_model_with_mock_domain(ops in prop::collection::vec(op_strategy(MOCK_APERTURE_START), 1..40)) {
        run(true, &ops)?;
    }
}

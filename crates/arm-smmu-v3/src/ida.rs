//! A lowest-free id allocator over `[min, max]` (the kernel's `ida_alloc_range` /
//! `xa_alloc` with an `XA_LIMIT`), for the SMMU's private VMIDs and ASIDs, VINTF indexes and
//! VINTF SID slots.

use std::collections::BTreeSet;

#[derive(Debug, Clone)]
pub(crate) struct Ida {
    min: u32,
    max: u32,
    used: BTreeSet<u32>,
}

impl Ida {
    pub(crate) fn new(min: u32, max: u32) -> Self {
        Ida {
            min,
            max,
            used: BTreeSet::new(),
        }
    }

    /// The lowest free id, or `None` when `[min, max]` is full (the kernel's ENOSPC).
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let mut want = self.min;
        for &u in self.used.range(self.min..) {
            if u != want {
                break;
            }
            want = want.checked_add(1)?;
        }
        if want > self.max || want < self.min {
            return None;
        }
        self.used.insert(want);
        Some(want)
    }

    pub(crate) fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }

    pub(crate) fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_in_range_and_exhaustion() {
        let mut a = Ida::new(1, 3);
        assert_eq!(a.alloc(), Some(1));
        assert_eq!(a.alloc(), Some(2));
        assert_eq!(a.alloc(), Some(3));
        assert_eq!(a.alloc(), None);
        a.free(2);
        assert_eq!(a.alloc(), Some(2));
        assert_eq!(a.in_use(), 3);
        let mut z = Ida::new(0, 0);
        assert_eq!(z.alloc(), Some(0));
        assert_eq!(z.alloc(), None);
    }
}

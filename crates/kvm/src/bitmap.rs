//! The VMID bitmaps (`vmid_map`, `pinned_vmid_map`): one bit per hardware VMID index.

/// A fixed-size bitmap of `len` bits, stored in 64-bit words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    words: Box<[u64]>,
    len: usize,
}

impl Bitmap {
    pub(crate) fn new(len: usize) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64)].into_boxed_slice(),
            len,
        }
    }

    pub(crate) fn test(&self, bit: usize) -> bool {
        self.words
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Sets `bit`; out-of-range bits are ignored (callers mask indices to the width).
    pub(crate) fn set(&mut self, bit: usize) {
        if let Some(w) = self.words.get_mut(bit / 64) {
            *w |= 1 << (bit % 64);
        }
    }

    pub(crate) fn clear(&mut self, bit: usize) {
        if let Some(w) = self.words.get_mut(bit / 64) {
            *w &= !(1 << (bit % 64));
        }
    }

    /// Sets `bit` and returns whether it was already set (`__test_and_set_bit`).
    pub(crate) fn test_and_set(&mut self, bit: usize) -> bool {
        let was = self.test(bit);
        self.set(bit);
        was
    }

    pub(crate) fn clear_all(&mut self) {
        self.words.fill(0);
    }

    pub(crate) fn copy_from(&mut self, other: &Bitmap) {
        if self.words.len() == other.words.len() {
            self.words.copy_from_slice(&other.words);
        } else {
            self.clear_all();
        }
    }

    /// The first clear bit at or after `from` (`find_next_zero_bit`), if any.
    pub(crate) fn find_next_zero(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut word_idx = from / 64;
        // Bits below `from` in the first word count as set.
        let mut word = self.words.get(word_idx).copied()? | ((1u64 << (from % 64)) - 1);
        loop {
            if word != u64::MAX {
                let bit = word_idx * 64 + (!word).trailing_zeros() as usize;
                return (bit < self.len).then_some(bit);
            }
            word_idx += 1;
            word = *self.words.get(word_idx)?;
        }
    }

    pub(crate) fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub(crate) fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&b| self.test(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_next_zero_skips_set_bits_and_starts_at_from() {
        let mut m = Bitmap::new(256);
        for b in 0..70 {
            m.set(b);
        }
        assert_eq!(m.find_next_zero(0), Some(70));
        assert_eq!(m.find_next_zero(71), Some(71));
        m.set(71);
        assert_eq!(m.find_next_zero(71), Some(72));
        for b in 0..256 {
            m.set(b);
        }
        assert_eq!(m.find_next_zero(1), None);
        m.clear(255);
        assert_eq!(m.find_next_zero(1), Some(255));
        assert_eq!(m.find_next_zero(256), None);
    }

    #[test]
    fn test_and_set_reports_previous_state() {
        let mut m = Bitmap::new(65536);
        assert!(!m.test_and_set(65535));
        assert!(m.test_and_set(65535));
        assert_eq!(m.count_ones(), 1);
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), vec![65535]);
        let mut n = Bitmap::new(65536);
        n.copy_from(&m);
        assert!(n.test(65535));
        n.clear_all();
        assert_eq!(n.count_ones(), 0);
        // Out-of-range bits are ignored, never a panic.
        n.set(1 << 20);
        assert!(!n.test(1 << 20));
    }
}

//! The 1-D tensors (LayerNorm weights, biases) of a base whose matrices are held in another form (bf16 bits,
//! q8_0): f32 values back to back, found by layout offset.

#[derive(Default)]
pub(crate) struct Vectors {
    small: Vec<f32>,
    /// (layout offset, start in `small`, length) of each tensor, sorted by offset once `sort` has run.
    index: Vec<(usize, usize, usize)>,
}

impl Vectors {
    /// Adds the tensor at layout offset `off`.
    pub fn push(&mut self, off: usize, v: impl IntoIterator<Item = f32>) {
        let start = self.small.len();
        self.small.extend(v);
        self.index.push((off, start, self.small.len() - start));
    }

    /// Makes the tensors findable (after the last `push`).
    pub fn sort(&mut self) {
        self.index.sort_unstable();
    }

    /// The length of the tensor at `off`, if there is one.
    pub fn len_at(&self, off: usize) -> Option<usize> {
        self.index.binary_search_by_key(&off, |e| e.0).ok().map(|i| self.index[i].2)
    }

    /// The values of the tensor at layout offset `off` (`len` elements).
    pub fn get(&self, off: usize, len: usize) -> &[f32] {
        let i = self.index.binary_search_by_key(&off, |e| e.0).unwrap_or_else(|_| panic!("no 1-D tensor at {off}"));
        let (_, start, n) = self.index[i];
        assert_eq!(n, len, "1-D tensor length at {off}");
        &self.small[start..start + n]
    }

    pub fn count(&self) -> usize {
        self.index.len()
    }
}

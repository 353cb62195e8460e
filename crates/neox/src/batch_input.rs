//! The engine's view of one training/eval batch: (B,T) token ids, unshifted labels (-100 = ignored), padding
//! mask, per-token positions (restarting per packed document) and optional document ids. Validation turns bad
//! shapes or ids into errors, never panics. Targets are the shifted (row, next label) pairs the loss uses.

use crate::error::{Error, Result};

pub const IGNORE_INDEX: i32 = -100;

#[derive(Clone, Copy, Debug)]
pub struct BatchInput<'a> {
    pub batch_size: usize,
    pub seq_len: usize,
    /// (B,T) row-major.
    pub input_ids: &'a [u32],
    /// (B,T), NOT shifted: the target of position t is `labels[t+1]`. None for logits-only forwards.
    pub labels: Option<&'a [i32]>,
    /// (B,T): 1 = real token, 0 = padding.
    pub attention_mask: &'a [u8],
    /// (B,T).
    pub position_ids: &'a [u32],
    /// (B,T): document index within the row (packing); None = one document per row.
    pub doc_ids: Option<&'a [u32]>,
}

impl BatchInput<'_> {
    pub fn rows(&self) -> usize {
        self.batch_size * self.seq_len
    }

    pub fn validate(&self, vocab: usize, max_pos: usize) -> Result<()> {
        let n = self.rows();
        if n == 0 {
            return Err(Error::invalid("empty batch"));
        }
        let check = |what: &str, len: usize| {
            if len != n {
                Err(Error::invalid(format!(
                    "{what} has {len} entries, expected batch_size*seq_len = {}*{} = {n}",
                    self.batch_size, self.seq_len
                )))
            } else {
                Ok(())
            }
        };
        check("input_ids", self.input_ids.len())?;
        check("attention_mask", self.attention_mask.len())?;
        check("position_ids", self.position_ids.len())?;
        if let Some(l) = self.labels {
            check("labels", l.len())?;
            if let Some((i, &x)) =
                l.iter().enumerate().find(|(_, &x)| x != IGNORE_INDEX && (x < 0 || x as usize >= vocab))
            {
                return Err(Error::invalid(format!("label {x} at index {i} is outside the vocabulary (0..{vocab})")));
            }
        }
        if let Some(d) = self.doc_ids {
            check("doc_ids", d.len())?;
        }
        if let Some((i, &x)) = self.input_ids.iter().enumerate().find(|(_, &x)| x as usize >= vocab) {
            return Err(Error::invalid(format!("token id {x} at index {i} is outside the vocabulary (0..{vocab})")));
        }
        if let Some((i, &p)) = self.position_ids.iter().enumerate().find(|(_, &p)| p as usize >= max_pos) {
            return Err(Error::invalid(format!("position {p} at index {i} exceeds max_position_embeddings {max_pos}")));
        }
        Ok(())
    }

    /// (row, target id) for every position whose next label is supervised (within the same document).
    pub fn targets(&self, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let Some(labels) = self.labels else { return };
        let t = self.seq_len;
        for b in 0..self.batch_size {
            for i in 0..t.saturating_sub(1) {
                let n = b * t + i;
                let y = labels[n + 1];
                let same_doc = self.doc_ids.is_none_or(|d| d[n] == d[n + 1]);
                if y != IGNORE_INDEX && same_doc {
                    out.push((n as u32, y as u32));
                }
            }
        }
    }

    /// Number of supervised targets (what the loss is normalised by).
    pub fn target_count(&self) -> usize {
        let mut v = Vec::new();
        self.targets(&mut v);
        v.len()
    }
}

/// Owned (B,T) batch with all-ones mask and positions 0..T, for tests and benchmarks.
#[derive(Clone, Debug)]
pub struct OwnedBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub attention_mask: Vec<u8>,
    pub position_ids: Vec<u32>,
}

impl OwnedBatch {
    pub fn dense(batch_size: usize, seq_len: usize, input_ids: Vec<u32>, labels: Vec<i32>) -> Self {
        OwnedBatch {
            batch_size,
            seq_len,
            input_ids,
            labels,
            attention_mask: vec![1; batch_size * seq_len],
            position_ids: (0..batch_size * seq_len).map(|i| (i % seq_len) as u32).collect(),
        }
    }

    pub fn view(&self) -> BatchInput<'_> {
        BatchInput {
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            input_ids: &self.input_ids,
            labels: Some(&self.labels),
            attention_mask: &self.attention_mask,
            position_ids: &self.position_ids,
            doc_ids: None,
        }
    }
}

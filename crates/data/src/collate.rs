//! Batches for the engine (spec section 6): Dolly-compatible right padding with id 0 to the longest example rounded
//! up to a multiple of 8, and packing (examples concatenated into fixed-length rows with per-document attention
//! and positions restarting at 0; an example is split across rows only when asked, never across batches); both
//! report padding waste. Letters: B batch rows, T row length; every per-token vector is (B,T) row-major.
//! Does not shift labels (the engine does), does not choose which examples (see `sampler`).

use crate::error::{DataError, Result};
use crate::example::{Example, IGNORE_INDEX};
use serde::Serialize;

/// Document id of padding positions in a packed row.
pub const PAD_DOC: u32 = u32::MAX;

/// One (B,T) batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// (B,T) token ids, padding = pad id (0).
    pub input_ids: Vec<u32>,
    /// (B,T) labels, `-100` = ignored; NOT shifted: the loss at t predicts `labels[t+1]` of the same row.
    pub labels: Vec<i32>,
    /// (B,T) 1 = real token, 0 = padding.
    pub attention_mask: Vec<u8>,
    /// (B,T) positions; restart at 0 for each packed document. Padding: continues counting (padded mode, as HF
    /// does without explicit positions) or 0 (packed mode).
    pub position_ids: Vec<u32>,
    /// (B,T) packed mode only: document index within the row (0, 1, ...), `PAD_DOC` on padding. A token attends
    /// to earlier tokens of the same document only.
    pub doc_ids: Option<Vec<u32>>,
    /// Examples in this batch (for packing: the number consumed from the candidates).
    pub examples: usize,
}

/// Real vs total token slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Waste {
    pub real_tokens: u64,
    pub total_tokens: u64,
}

impl Waste {
    /// Fraction of slots that are padding (0 when empty).
    pub fn fraction(&self) -> f64 {
        if self.total_tokens == 0 {
            0.0
        } else {
            1.0 - self.real_tokens as f64 / self.total_tokens as f64
        }
    }
    pub fn add(&mut self, b: &Batch) {
        self.real_tokens += b.real_tokens() as u64;
        self.total_tokens += (b.batch_size * b.seq_len) as u64;
    }
}

impl Batch {
    fn empty(batch_size: usize, seq_len: usize, pad_id: u32, packed: bool) -> Batch {
        let n = batch_size * seq_len;
        Batch {
            batch_size,
            seq_len,
            input_ids: vec![pad_id; n],
            labels: vec![IGNORE_INDEX; n],
            attention_mask: vec![0; n],
            position_ids: if packed { vec![0; n] } else { (0..n).map(|i| (i % seq_len) as u32).collect() },
            doc_ids: if packed { Some(vec![PAD_DOC; n]) } else { None },
            examples: 0,
        }
    }

    /// Non-padding tokens.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }

    /// Loss terms after the engine's shift: labels at t >= 1 of each row that are not ignored. Use the sum over
    /// micro-batches and ranks to normalise the loss (spec section 6).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .chunks(self.seq_len.max(1))
            .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    pub fn waste(&self) -> Waste {
        let mut w = Waste::default();
        w.add(self);
        w
    }
}

/// Round `n` up to a multiple of `m` (`m` = 0 or 1: unchanged).
pub fn round_up(n: usize, m: usize) -> usize {
    if m <= 1 {
        n
    } else {
        n.div_ceil(m) * m
    }
}

/// Dolly's collator: right-pad with `pad_id` to the longest example rounded up to a multiple of `multiple_of`.
pub fn pad_batch(examples: &[&Example], multiple_of: usize, pad_id: u32) -> Result<Batch> {
    let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    if longest == 0 {
        return Err(DataError::config("cannot build a batch from no (or only empty) examples"));
    }
    let t = round_up(longest, multiple_of);
    let mut b = Batch::empty(examples.len(), t, pad_id, false);
    for (row, e) in examples.iter().enumerate() {
        let o = row * t;
        b.input_ids[o..o + e.len()].copy_from_slice(&e.input_ids);
        b.labels[o..o + e.len()].copy_from_slice(&e.labels);
        b.attention_mask[o..o + e.len()].fill(1);
    }
    b.examples = examples.len();
    Ok(b)
}

/// Pack `candidates` (in order) into `batch_size` rows of `seq_len`. Examples go whole into the current row, or
/// start the next row when they do not fit; with `split`, an example that does not fit fills the rest of the row
/// and continues in the next one(s) (each piece restarts positions at 0 and is its own document). Stops at the
/// first example that does not fit in the remaining rows; `Batch::examples` tells how many were consumed (at least
/// one). Unused rows are all padding.
pub fn pack_batch(
    candidates: &[&Example],
    batch_size: usize,
    seq_len: usize,
    split: bool,
    pad_id: u32,
) -> Result<Batch> {
    if batch_size == 0 || seq_len == 0 {
        return Err(DataError::config("pack: batch size and pack length must be positive"));
    }
    if candidates.is_empty() {
        return Err(DataError::config("cannot pack a batch from no examples"));
    }
    let mut b = Batch::empty(batch_size, seq_len, pad_id, true);
    let (mut row, mut pos, mut doc) = (0usize, 0usize, 0u32);
    for e in candidates {
        let len = e.len();
        if len == 0 {
            return Err(DataError::config(format!("pack: example of record {} is empty", e.record)));
        }
        if !split && len > seq_len {
            return Err(DataError::config(format!(
                "pack: example of record {} has {len} tokens, more than the pack length {seq_len} \
                 (raise the pack length or allow splitting)",
                e.record
            )));
        }
        if split && len > batch_size * seq_len {
            return Err(DataError::config(format!(
                "pack: example of record {} has {len} tokens, more than a whole batch ({batch_size} x {seq_len})",
                e.record
            )));
        }
        let free = (seq_len - pos) + (batch_size - 1 - row) * seq_len;
        if !split && pos + len > seq_len {
            if row + 1 == batch_size {
                break;
            }
            row += 1;
            pos = 0;
            doc = 0;
        } else if split && len > free {
            break;
        }
        // Place the example from (row, pos), splitting at row ends when needed.
        let mut done = 0;
        while done < len {
            if pos == seq_len {
                row += 1;
                pos = 0;
                doc = 0;
            }
            let n = (len - done).min(seq_len - pos);
            let o = row * seq_len + pos;
            b.input_ids[o..o + n].copy_from_slice(&e.input_ids[done..done + n]);
            b.labels[o..o + n].copy_from_slice(&e.labels[done..done + n]);
            b.attention_mask[o..o + n].fill(1);
            for (k, p) in b.position_ids[o..o + n].iter_mut().enumerate() {
                *p = k as u32;
            }
            if let Some(d) = b.doc_ids.as_mut() {
                d[o..o + n].fill(doc);
            }
            doc += 1;
            pos += n;
            done += n;
        }
        b.examples += 1;
    }
    Ok(b)
}

/// Padding waste of Dolly's padded batches over `examples` in order, `batch_size` at a time.
pub fn padded_waste(examples: &[&Example], batch_size: usize, multiple_of: usize) -> Waste {
    let mut w = Waste::default();
    for chunk in examples.chunks(batch_size.max(1)) {
        let longest = chunk.iter().map(|e| e.len()).max().unwrap_or(0);
        w.real_tokens += chunk.iter().map(|e| e.len() as u64).sum::<u64>();
        w.total_tokens += (round_up(longest, multiple_of) * chunk.len()) as u64;
    }
    w
}

/// Padding waste of packed batches over `examples` in order.
pub fn packed_waste(examples: &[&Example], batch_size: usize, seq_len: usize, split: bool) -> Result<Waste> {
    let mut w = Waste::default();
    let mut i = 0;
    while i < examples.len() {
        let b = pack_batch(&examples[i..], batch_size, seq_len, split, 0)?;
        w.add(&b);
        i += b.examples;
    }
    Ok(w)
}

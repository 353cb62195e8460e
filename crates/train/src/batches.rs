//! Micro-batches for the loop: the resumable sampler's indices turned into padded (Dolly-compatible) or packed
//! batches. Knows how many micro-batches an epoch has (packing is simulated on the epoch's order) so the
//! schedule's total is exact. Does not run the model.

use crate::error::Result;
use data::{pack_batch, pad_batch, Batch, Example, Sampler};

pub struct BatchSource {
    pub sampler: Sampler,
    pub batch_size: usize,
    /// Some(row length) for packing.
    pub pack_len: Option<usize>,
}

impl BatchSource {
    /// The next micro-batch of the current epoch, or None when the epoch is exhausted.
    pub fn next(&mut self, examples: &[Example]) -> Result<Option<Batch>> {
        if self.sampler.remaining() == 0 {
            return Ok(None);
        }
        match self.pack_len {
            None => {
                let idx = self.sampler.next_indices(self.batch_size);
                let ex: Vec<&Example> = idx.iter().map(|&i| &examples[i as usize]).collect();
                Ok(Some(pad_batch(&ex, 8, 0)?))
            }
            Some(t) => {
                let ex: Vec<&Example> =
                    self.sampler.peek(self.batch_size * t).iter().map(|&i| &examples[i as usize]).collect();
                let b = pack_batch(&ex, self.batch_size, t, false, 0)?;
                self.sampler.advance(b.examples);
                Ok(Some(b))
            }
        }
    }

    /// Micro-batches in the current epoch from its start (simulated for packing).
    pub fn micro_batches_in_epoch(&self, examples: &[Example], epoch: u64) -> Result<u64> {
        let s = self.sampler.state();
        let order = data::sampler::epoch_order(s.dataset_len as usize, s.seed, epoch, s.rank, s.world, s.shuffle);
        Ok(match self.pack_len {
            None => order.len().div_ceil(self.batch_size) as u64,
            Some(t) => {
                let mut n = 0u64;
                let mut at = 0usize;
                while at < order.len() {
                    let ex: Vec<&Example> = order[at..(at + self.batch_size * t).min(order.len())]
                        .iter()
                        .map(|&i| &examples[i as usize])
                        .collect();
                    at += pack_batch(&ex, self.batch_size, t, false, 0)?.examples.max(1);
                    n += 1;
                }
                n
            }
        })
    }
}

//! The resumable, sharded sampler: a seeded permutation per epoch (`Rng::derive(seed, epoch)`), the first
//! `world * floor(n / world)` positions dealt round-robin to ranks (every rank gets the same count; the remainder
//! of at most `world - 1` examples sits out that epoch, a different one each epoch), and a cursor. Its state is
//! plain serde data saved in checkpoints: restoring it continues exactly where it stopped, mid-epoch included.
//! Does not build batches, does not hold examples (indices only).

use crate::error::{DataError, Result};
use common::Rng;
use serde::{Deserialize, Serialize};

/// Everything needed to resume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerState {
    pub seed: u64,
    pub epoch: u64,
    /// Examples of this rank's shard already consumed this epoch.
    pub cursor: u64,
    pub rank: u32,
    pub world: u32,
    /// Size of the dataset the state belongs to (checked on restore).
    pub dataset_len: u64,
    pub shuffle: bool,
}

#[derive(Clone, Debug)]
pub struct Sampler {
    state: SamplerState,
    order: Vec<u32>,
}

/// This rank's example indices for one epoch.
pub fn epoch_order(dataset_len: usize, seed: u64, epoch: u64, rank: u32, world: u32, shuffle: bool) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..dataset_len as u32).collect();
    if shuffle {
        Rng::derive(seed, epoch).shuffle(&mut perm);
    }
    let world = world.max(1) as usize;
    let usable = dataset_len / world * world;
    perm[..usable].iter().skip(rank as usize).step_by(world).copied().collect()
}

impl Sampler {
    pub fn new(dataset_len: usize, seed: u64, rank: u32, world: u32, shuffle: bool) -> Result<Sampler> {
        Self::from_state(
            SamplerState { seed, epoch: 0, cursor: 0, rank, world, dataset_len: dataset_len as u64, shuffle },
            dataset_len,
        )
    }

    /// Restore; errors when the state does not belong to a dataset of `dataset_len` examples or is inconsistent.
    pub fn from_state(state: SamplerState, dataset_len: usize) -> Result<Sampler> {
        if state.world == 0 || state.rank >= state.world {
            return Err(DataError::config(format!(
                "sampler: rank {} is not in a world of {}",
                state.rank, state.world
            )));
        }
        if state.dataset_len != dataset_len as u64 {
            return Err(DataError::config(format!(
                "sampler state is for a dataset of {} examples, this one has {dataset_len}: different data or settings",
                state.dataset_len
            )));
        }
        if dataset_len > u32::MAX as usize {
            return Err(DataError::config("sampler: more than 2^32 examples"));
        }
        if dataset_len < state.world as usize {
            return Err(DataError::config(format!(
                "sampler: {dataset_len} examples cannot be shared by {} ranks",
                state.world
            )));
        }
        let order = epoch_order(dataset_len, state.seed, state.epoch, state.rank, state.world, state.shuffle);
        if state.cursor > order.len() as u64 {
            return Err(DataError::config(format!(
                "sampler: cursor {} is past the {} examples of this rank's epoch",
                state.cursor,
                order.len()
            )));
        }
        Ok(Sampler { state, order })
    }

    pub fn state(&self) -> SamplerState {
        self.state.clone()
    }
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }
    /// Examples per epoch on this rank.
    pub fn epoch_len(&self) -> usize {
        self.order.len()
    }
    /// Examples left in this epoch on this rank.
    pub fn remaining(&self) -> usize {
        self.order.len() - self.state.cursor as usize
    }
    /// The next (up to) `n` indices without consuming them.
    pub fn peek(&self, n: usize) -> &[u32] {
        let c = self.state.cursor as usize;
        &self.order[c..(c + n).min(self.order.len())]
    }
    /// Consume `n` (clamped to what is left).
    pub fn advance(&mut self, n: usize) {
        self.state.cursor = (self.state.cursor + n as u64).min(self.order.len() as u64);
    }
    /// The next (up to) `n` indices, consumed. Empty at the end of the epoch.
    pub fn next_indices(&mut self, n: usize) -> Vec<u32> {
        let v = self.peek(n).to_vec();
        self.advance(v.len());
        v
    }
    /// Move to the next epoch's permutation.
    pub fn start_next_epoch(&mut self) {
        self.state.epoch += 1;
        self.state.cursor = 0;
        let s = &self.state;
        self.order = epoch_order(s.dataset_len as usize, s.seed, s.epoch, s.rank, s.world, s.shuffle);
    }
}

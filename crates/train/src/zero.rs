//! ZeRO on the flat buffers (Rajbhandari et al.; DeepSpeed's stages): which rank owns which elements, and what
//! each stage shards and communicates. Every unit (`Layout::units`: the embedding, each layer, the final norm
//! with the head) is cut into `GRAIN`-element chunks dealt to the ranks in contiguous runs, so a rank owns one
//! contiguous range per unit and gathering or reducing a unit is one collective call.
//!
//! - Stage 0: every rank holds everything; gradients are all-reduced once per optimizer step.
//! - Stage 1: AdamW moments and the update are sharded; gradients are reduce-scattered to their owners at the
//!   end of the step; the updated parameters are all-gathered.
//! - Stage 2: gradients are sharded as well: each unit's gradient is reduce-scattered as soon as its backward
//!   completes (every micro-batch) into the owner's shard accumulator, and its pages are given back.
//! - Stage 3: parameters are sharded too: each unit is all-gathered before its forward and again before its
//!   backward, and its pages are given back after use.
//!
//! Exactness: a micro-batch's gradient is always computed from zero and then added to the accumulated sum, so
//! the step's gradient is Σ over micro-batch slots in slot order; with two ranks MPI's sum of two operands is
//! the same addition. Losses and norms are exact for any process count: each rank fills its own entries of a
//! vector (zeros elsewhere), the vector is summed over ranks (x + 0 is exact) and then added up in order.

use crate::error::{Result, TrainError};
use dist::Collective;
use neox::{training_events, AdamW, AdamWConfig, BatchInput, Cpu, Model, Unit, UnitEvent, UnitHooks};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per chunk: the unit of ownership and of the gradient norm's partial sums.
pub const GRAIN: usize = 4096;

/// One unit's split: `bounds[r]..bounds[r + 1]` is rank r's range (global offsets).
#[derive(Clone, Debug, PartialEq)]
pub struct UnitShard {
    pub name: String,
    pub range: Range<usize>,
    pub bounds: Vec<usize>,
    /// Index of the unit's first chunk among all chunks of the model.
    pub first_chunk: usize,
}

/// Who owns what, for `world` ranks seen from `rank`.
#[derive(Clone, Debug, PartialEq)]
pub struct Shards {
    pub world: usize,
    pub rank: usize,
    pub units: Vec<UnitShard>,
    pub chunks: usize,
}

impl Shards {
    pub fn new(units: &[Unit], world: usize, rank: usize) -> Shards {
        let world = world.max(1);
        let mut first = 0;
        let units = units
            .iter()
            .map(|u| {
                let n = u.range.len();
                let nc = n.div_ceil(GRAIN);
                let bounds = (0..=world).map(|r| u.range.start + (r * nc / world * GRAIN).min(n)).collect();
                let s = UnitShard { name: u.name.clone(), range: u.range.clone(), bounds, first_chunk: first };
                first += nc;
                s
            })
            .collect();
        Shards { world, rank, units, chunks: first }
    }

    /// This rank's range of unit `u`.
    pub fn owned(&self, u: usize) -> Range<usize> {
        let b = &self.units[u].bounds;
        b[self.rank]..b[self.rank + 1]
    }

    /// Elements per rank of unit `u` (the counts of its collectives).
    pub fn counts(&self, u: usize) -> Vec<usize> {
        self.units[u].bounds.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// This rank's non-empty ranges, ascending.
    pub fn owned_ranges(&self) -> Vec<Range<usize>> {
        (0..self.units.len()).map(|u| self.owned(u)).filter(|r| !r.is_empty()).collect()
    }

    /// Elements this rank owns.
    pub fn held(&self) -> usize {
        (0..self.units.len()).map(|u| self.owned(u).len()).sum()
    }

    pub fn total(&self) -> usize {
        self.units.last().map_or(0, |u| u.range.end)
    }

    /// The largest unit (what a ZeRO-3 rank holds whole at a time).
    pub fn max_unit(&self) -> usize {
        self.units.iter().map(|u| u.range.len()).max().unwrap_or(0)
    }

    /// Σ x² of every chunk this rank owns, at the chunk's index among all chunks (zeros elsewhere). `x` is a
    /// full-length buffer of which only the owned ranges are read.
    pub fn chunk_sums(&self, x: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; self.chunks];
        for (u, s) in self.units.iter().enumerate() {
            let own = self.owned(u);
            if own.is_empty() {
                continue;
            }
            let at = s.first_chunk + (own.start - s.range.start) / GRAIN;
            let n = own.len().div_ceil(GRAIN);
            out[at..at + n]
                .par_iter_mut()
                .zip(x[own].par_chunks(GRAIN))
                .for_each(|(o, c)| *o = neox::optim::sum_squares(c));
        }
        out
    }
}

/// Sum each entry of `v` over ranks (every entry is non-zero on at most one rank, so the sum is exact) and add
/// the entries up in order: the same value for any number of ranks.
pub fn exact_sum(comm: &dyn Collective, v: &mut [f64]) -> Result<f64> {
    comm.all_reduce_sum_f64(v).map_err(dist_err)?;
    Ok(v.iter().sum())
}

pub fn dist_err(e: dist::DistError) -> TrainError {
    TrainError(format!("collective failed: {e}"))
}

/// Per-rank bytes of the training state at a stage (what `memory` accounts; activations are separate).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageMemory {
    /// f32 parameters resident (all, or the shard plus one gathered unit).
    pub params: u64,
    /// The CPU engine's transposed copies of the weight matrices.
    pub transposed: u64,
    /// The gradient buffer the backward writes (whole, or one unit at a time).
    pub grads: u64,
    /// The owner's accumulated gradient shard (stages 2-3).
    pub grad_shard: u64,
    /// AdamW's two moments.
    pub moments: u64,
    /// A second gradient buffer: micro-batches after the first are computed from zero and then added.
    pub accum_scratch: u64,
}

impl StageMemory {
    pub fn total(&self) -> u64 {
        self.params + self.transposed + self.grads + self.grad_shard + self.moments + self.accum_scratch
    }
}

/// The bytes each rank holds for `stage` (see `StageMemory`).
pub fn memory(stage: u8, shards: &Shards, accum: u64) -> StageMemory {
    let (n, s, u) = (shards.total() as u64 * 4, shards.held() as u64 * 4, shards.max_unit() as u64 * 4);
    let scratch = if accum > 1 { n } else { 0 };
    // the input embedding is never transposed (it is gathered, not multiplied)
    let t = n - shards.units.first().map_or(0, |e| e.range.len() as u64 * 4);
    match stage {
        0 => StageMemory { params: n, transposed: t, grads: n, grad_shard: 0, moments: 2 * n, accum_scratch: scratch },
        1 => StageMemory { params: n, transposed: t, grads: n, grad_shard: 0, moments: 2 * s, accum_scratch: scratch },
        2 => StageMemory { params: n, transposed: t, grads: u, grad_shard: s, moments: 2 * s, accum_scratch: 0 },
        _ => StageMemory { params: s + u, transposed: u, grads: u, grad_shard: s, moments: 2 * s, accum_scratch: 0 },
    }
}

/// The optimizer side of a ZeRO stage on one rank: moments (whole or the shard), the shard accumulator and the
/// accumulation scratch, and the step's collectives.
pub struct Zero<'c> {
    pub stage: u8,
    pub shards: Shards,
    pub comm: &'c dyn Collective,
    pub opt: AdamW,
    /// Stages 2-3: full-length, only the owned ranges are ever written (resident: the shard).
    gacc: Vec<f32>,
    /// Stages 0-1 with accumulation: micro-batches after the first are computed here, then added.
    scratch: Vec<f32>,
}

impl<'c> Zero<'c> {
    pub fn new(stage: u8, shards: Shards, comm: &'c dyn Collective, adam: AdamWConfig, accum: u64) -> Self {
        let n = shards.total();
        let moments = if stage == 0 { n } else { shards.held() };
        let gacc = if stage >= 2 { vec![0f32; n] } else { Vec::new() };
        let scratch = if stage <= 1 && accum > 1 { vec![0f32; n] } else { Vec::new() };
        Zero { stage, shards, comm, opt: AdamW::new(adam, moments), gacc, scratch }
    }

    /// After loading the full model: a ZeRO-3 rank keeps only its shard of the parameters resident.
    pub fn shard_model(&self, model: &mut Model) {
        if self.stage == 3 {
            let be = model.backend_mut();
            for u in 0..self.shards.units.len() {
                be.release_unit(self.shards.units[u].range.clone(), self.shards.owned(u));
            }
            be.release_transposed();
        }
    }

    /// One micro-batch's forward and backward, its gradient added to the step's (exactly; see the module doc).
    /// `first`: the first micro-batch of this rank in this step.
    pub fn micro_batch(
        &mut self,
        model: &mut Model,
        batch: &BatchInput<'_>,
        acts: &mut neox::Activations,
        grads: &mut Vec<f32>,
        scale: f32,
        first: bool,
    ) -> Result<(f64, usize)> {
        if self.stage >= 2 {
            let mut hooks = Hooks { stage: self.stage, shards: &self.shards, comm: self.comm, gacc: &mut self.gacc };
            return Ok(model.forward_backward_with(batch, acts, grads, scale, &mut hooks)?);
        }
        if first || self.scratch.is_empty() {
            return Ok(model.forward_backward(batch, acts, grads, scale)?);
        }
        let r = model.forward_backward(batch, acts, &mut self.scratch, scale)?;
        grads.par_chunks_mut(1 << 15).zip(self.scratch.par_chunks_mut(1 << 15)).for_each(|(g, s)| {
            g.iter_mut().zip(s.iter_mut()).for_each(|(g, s)| {
                *g += *s;
                *s = 0.0;
            })
        });
        Ok(r)
    }

    /// A micro-batch slot this rank has no batch for (an epoch's last step): the same collectives, nothing added.
    pub fn empty_micro_batch(&mut self, model: &mut Model, grads: &mut Vec<f32>) -> Result<()> {
        if self.stage >= 2 {
            let events = training_events(model.config.num_hidden_layers);
            let mut hooks = Hooks { stage: self.stage, shards: &self.shards, comm: self.comm, gacc: &mut self.gacc };
            model.replay(&events, grads, &mut hooks)?;
        }
        Ok(())
    }

    /// End of the step's backward: stage 0 all-reduces the gradients, stage 1 reduce-scatters them to their
    /// owners (stages 2-3 reduced them per unit already).
    pub fn reduce(&mut self, grads: &mut [f32]) -> Result<()> {
        match self.stage {
            0 => self.comm.all_reduce_sum_f32(grads).map_err(dist_err),
            1 => {
                for u in 0..self.shards.units.len() {
                    let r = self.shards.units[u].range.clone();
                    self.comm.reduce_scatter_sum_f32(&mut grads[r], &self.shards.counts(u)).map_err(dist_err)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The reduced gradient's owned ranges are in this buffer.
    fn reduced<'a>(&'a self, grads: &'a [f32]) -> &'a [f32] {
        if self.stage >= 2 {
            &self.gacc
        } else {
            grads
        }
    }

    /// The global L2 norm of the step's gradient (the same bits for any process count and stage).
    pub fn grad_norm(&self, grads: &[f32]) -> Result<f64> {
        let mut v = self.shards.chunk_sums(self.reduced(grads));
        Ok(exact_sum(self.comm, &mut v)?.sqrt())
    }

    /// Clip coefficient `coef`, AdamW at `lr` on what this rank owns, gradients zeroed, and the updated
    /// parameters shared again (stages 1-2: all-gathered; stage 3 keeps its shard).
    pub fn step(&mut self, model: &mut Model, grads: &mut Vec<f32>, lr: f32, coef: f32) -> Result<()> {
        if self.stage == 0 {
            // every rank holds the whole reduced gradient: the fused update (which also refreshes the
            // transposed weights) gives every rank the same parameters
            model.adamw_step(&mut self.opt, grads, lr, coef);
            return Ok(());
        }
        let ranges = self.shards.owned_ranges();
        let be = model.backend_mut();
        if self.stage >= 2 {
            be.adamw_ranges(&mut self.opt, &mut self.gacc, &ranges, lr, coef);
        } else {
            be.adamw_ranges(&mut self.opt, grads, &ranges, lr, coef);
            grads.par_chunks_mut(1 << 15).for_each(|g| g.fill(0.0));
        }
        if self.stage <= 2 {
            let params = model.params_mut();
            for u in 0..self.shards.units.len() {
                let r = self.shards.units[u].range.clone();
                self.comm.all_gather_f32(&mut params[r], &self.shards.counts(u)).map_err(dist_err)?;
            }
        }
        Ok(())
    }

    /// Loss sum and target count of an evaluation batch (ZeRO-3 gathers each unit for it).
    pub fn eval_batch(
        &mut self,
        model: &mut Model,
        batch: &BatchInput<'_>,
        acts: &mut neox::Activations,
    ) -> Result<(f64, usize)> {
        if self.stage < 3 {
            return Ok(model.forward_loss(batch, acts)?);
        }
        let mut hooks = Hooks { stage: self.stage, shards: &self.shards, comm: self.comm, gacc: &mut self.gacc };
        Ok(model.forward_loss_with(batch, acts, &mut hooks)?)
    }

    /// An evaluation batch this rank does not have: the same collectives (ZeRO-3), nothing computed.
    pub fn empty_eval(&mut self, model: &mut Model) -> Result<()> {
        if self.stage == 3 {
            let events = neox::eval_events(model.config.num_hidden_layers);
            let mut hooks = Hooks { stage: self.stage, shards: &self.shards, comm: self.comm, gacc: &mut self.gacc };
            model.replay(&events, &mut Vec::new(), &mut hooks)?;
        }
        Ok(())
    }

    /// Gather unit `u` into `model` (ZeRO-3; the other stages hold it already).
    pub fn gather_unit(&self, model: &mut Model, u: usize) -> Result<()> {
        if self.stage == 3 {
            let r = self.shards.units[u].range.clone();
            let be = model.backend_mut();
            self.comm.all_gather_f32(be.unit_mut(r), &self.shards.counts(u)).map_err(dist_err)?;
        }
        Ok(())
    }

    /// Give unit `u`'s pages back after `gather_unit` (ZeRO-3).
    pub fn release_unit(&self, model: &mut Model, u: usize) {
        if self.stage == 3 {
            model.backend_mut().release_unit(self.shards.units[u].range.clone(), self.shards.owned(u));
        }
    }

    /// A skipped (non-finite) step: every gradient buffer back to zero.
    pub fn skip(&mut self, grads: &mut [f32]) {
        grads.par_chunks_mut(1 << 15).for_each(|g| g.fill(0.0));
        for r in self.shards.owned_ranges() {
            self.gacc.get_mut(r).into_iter().for_each(|g| g.fill(0.0));
        }
    }
}

/// The ZeRO-2/3 unit hooks: gather before use and give back after (stage 3); reduce-scatter each unit's
/// gradient into the owner's accumulator as soon as it is complete (stages 2-3).
pub struct Hooks<'a> {
    pub stage: u8,
    pub shards: &'a Shards,
    pub comm: &'a dyn Collective,
    pub gacc: &'a mut [f32],
}

fn engine_err(e: dist::DistError) -> neox::Error {
    neox::Error::invalid(format!("collective failed: {e}"))
}

impl UnitHooks<Cpu> for Hooks<'_> {
    fn on(&mut self, ev: UnitEvent, be: &mut Cpu, grads: Option<&mut Vec<f32>>) -> neox::Result<()> {
        match ev {
            UnitEvent::Acquire(u) if self.stage == 3 => {
                let r = self.shards.units[u].range.clone();
                self.comm.all_gather_f32(be.unit_mut(r.clone()), &self.shards.counts(u)).map_err(engine_err)?;
                be.refresh_unit(r);
            }
            UnitEvent::Release(u) if self.stage == 3 => {
                be.release_unit(self.shards.units[u].range.clone(), self.shards.owned(u));
            }
            UnitEvent::GradsReady(u) if self.stage >= 2 => {
                let Some(g) = grads else { return Ok(()) };
                let r = self.shards.units[u].range.clone();
                self.comm.reduce_scatter_sum_f32(&mut g[r.clone()], &self.shards.counts(u)).map_err(engine_err)?;
                let own = self.shards.owned(u);
                self.gacc[own.clone()].par_chunks_mut(1 << 15).zip(g[own].par_chunks(1 << 15)).for_each(|(a, g)| {
                    a.iter_mut().zip(g).for_each(|(a, g)| *a += g);
                });
                common::sysmem::release_pages(&mut g[r]);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neox::{Layout, NeoxConfig};

    fn units() -> Vec<Unit> {
        let mut c = NeoxConfig::preset("pythia-14m").unwrap();
        c.num_hidden_layers = 2;
        c.vocab_size = 1000;
        Layout::new(&c).units()
    }

    /// Every element is owned by exactly one rank, in one contiguous range per unit whose bounds are whole
    /// chunks, for any world (uneven included).
    #[test]
    fn shards_partition_every_unit() {
        let units = units();
        for world in 1..=5 {
            let mut owner = vec![usize::MAX; units.last().unwrap().range.end];
            for rank in 0..world {
                let s = Shards::new(&units, world, rank);
                assert_eq!(s.counts(0).len(), world);
                for (u, us) in s.units.iter().enumerate() {
                    let r = s.owned(u);
                    assert!(r.start >= us.range.start && r.end <= us.range.end);
                    assert!((r.start - us.range.start).is_multiple_of(GRAIN));
                    assert_eq!(s.counts(u).iter().sum::<usize>(), us.range.len());
                    for o in &mut owner[r] {
                        assert_eq!(*o, usize::MAX, "owned twice");
                        *o = rank;
                    }
                }
            }
            assert!(owner.iter().all(|&o| o != usize::MAX), "world {world}: an element has no owner");
        }
    }

    /// The norm's partial sums are the same numbers for every world: each rank computes whole chunks of a grid
    /// that does not depend on the world, so the exact sum over ranks, added in order, is the same bits.
    #[test]
    fn chunk_sums_do_not_depend_on_the_world() {
        let units = units();
        let n = units.last().unwrap().range.end;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5).collect();
        let one = Shards::new(&units, 1, 0).chunk_sums(&x);
        for world in 2..=4 {
            let mut sum = vec![0f64; one.len()];
            for rank in 0..world {
                for (s, v) in sum.iter_mut().zip(Shards::new(&units, world, rank).chunk_sums(&x)) {
                    *s += v;
                }
            }
            assert_eq!(sum, one, "world {world}");
        }
        // and the norm agrees with the flat f64 norm (a float64 reference computed here)
        let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        assert!((one.iter().sum::<f64>() - exact).abs() / exact < 1e-6);
    }

    /// The accounted bytes per stage, from the plan: stage 3 holds 16 bytes per owned element plus three units
    /// (one gathered unit's weights, transposed copy and gradient).
    #[test]
    fn memory_accounting_per_stage() {
        let units = units();
        let s = Shards::new(&units, 2, 1);
        let (n, held, u) = (s.total() as u64 * 4, s.held() as u64 * 4, s.max_unit() as u64 * 4);
        let t = n - units[0].range.len() as u64 * 4;
        assert_eq!(memory(0, &s, 1).total(), 4 * n + t);
        assert_eq!(memory(0, &s, 2).total(), 5 * n + t);
        assert_eq!(memory(1, &s, 1).total(), 2 * n + t + 2 * held);
        assert_eq!(memory(2, &s, 1).total(), n + t + u + 3 * held);
        assert_eq!(memory(3, &s, 1).total(), 4 * held + 3 * u);
    }
}

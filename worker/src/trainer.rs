//! Trainers: what a worker drives. The built-in [`BuiltinTrainer`] is a
//! deterministic stand-in for a real model (SPEC §5), so the whole
//! checkpoint/restore cycle can run anywhere and be checked bit for bit.
//!
//! Each rank owns `params_per_rank_bytes` of f32 state over `layers` layers:
//! attention (`wq wk wv wo`, `[d, d]`) and MLP (`w_in [d, 4d]`, `w_out [4d, d]`)
//! weights, each with Adam-style `m` and `v` slots, plus `optimizer/step`.
//! A step updates every variable as a pure function of (seed, rank, step,
//! current values), so a run restored from any checkpoint ends bit-identical
//! to one that never failed.

use flotilla_shared::ids::{Rank, Step};
use flotilla_shared::shard::{Dtype, ModelMismatch, Shard, VariableSpec};
use flotilla_shared::spec::{TrainerSpec, TRAINER_BYTES_PER_LAYER_UNIT};
use std::ops::Range;
use xxhash_rust::xxh3::Xxh3;

/// What a worker needs from a training process.
pub trait Trainer: Send {
    /// The variables in snapshot order (names, dtypes, shapes).
    fn variables(&self) -> &[VariableSpec];
    /// Bytes of one snapshot (the sum of the variables' sizes).
    fn snapshot_bytes(&self) -> usize {
        self.variables().iter().map(VariableSpec::byte_len).sum()
    }
    /// Steps completed.
    fn current_step(&self) -> Step;
    /// Runs one training step.
    fn step(&mut self);
    /// Copies every variable, in [`Trainer::variables`] order, into `out`
    /// (exactly [`Trainer::snapshot_bytes`] long). This copy is the whole
    /// training stall of a checkpoint.
    fn snapshot_into(&self, out: &mut [u8]);
    /// Replaces the state with a shard's. Checks first and changes nothing
    /// when the shard does not fit the model.
    fn load(&mut self, shard: &Shard) -> Result<(), ModelMismatch>;
    /// Hex digest of all variables (the job's `final_digest` combines ranks').
    fn digest(&self) -> String;
}

/// Copies each `(dst, src)` pair using every core: one thread moves about
/// 11 GB/s here, two about 20, and this copy is the whole training stall of
/// a checkpoint.
pub fn copy_parallel(pairs: Vec<(&mut [u8], &[u8])>) {
    let mut pieces: Vec<(&mut [u8], &[u8])> = Vec::new();
    for (dst, src) in pairs {
        pieces.extend(dst.chunks_mut(PIECE).zip(src.chunks(PIECE)));
    }
    on_every_core(pieces, |(dst, src)| dst.copy_from_slice(src));
}

/// Writes `byte` over each region using every core. On memory never
/// touched, this is where its page faults are paid (a fresh process's
/// buffers), on all cores at once instead of on one. Each region is first
/// offered transparent huge pages, so that a fresh 256 MiB costs 128 faults
/// of 2 MiB rather than 65,536 of 4 KiB.
pub fn fill_parallel(regions: Vec<&mut [u8]>, byte: u8) {
    for r in &regions {
        advise_huge_pages(r);
    }
    let pieces: Vec<&mut [u8]> = regions.into_iter().flat_map(|r| r.chunks_mut(PIECE)).collect();
    on_every_core(pieces, |piece| piece.fill(byte));
}

/// Asks the kernel to back `region` with transparent huge pages where it
/// can (`MADV_HUGEPAGE`; with `transparent_hugepage/enabled` set to
/// `madvise`, the common default, nothing is huge without it). Only the
/// whole 4 KiB pages inside the region are advised. Advice is a hint: where
/// the kernel has no THP, or the region is small, nothing changes.
fn advise_huge_pages(region: &[u8]) {
    const HUGE: usize = 2 << 20;
    const PAGE: usize = 4 << 10;
    if region.len() < 2 * HUGE {
        return;
    }
    let start = (region.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (region.as_ptr() as usize + region.len()) / PAGE * PAGE;
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: madvise with MADV_HUGEPAGE changes no memory contents and
    // does not unmap anything; the range lies inside `region`, which this
    // process owns, and is page aligned as madvise requires.
    #[allow(unsafe_code)]
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

/// How much memory one unit of [`on_every_core`] work covers.
const PIECE: usize = 16 << 20;

/// Runs `work` over `pieces` (each at most [`PIECE`] bytes) on up to 8
/// threads, each taking a contiguous run so that it streams its own range;
/// on one core or for little work, on the calling thread alone.
fn on_every_core<T: Send>(mut pieces: Vec<T>, work: impl Fn(T) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads == 1 || pieces.len() < 2 {
        pieces.into_iter().for_each(work);
        return;
    }
    let per_thread = pieces.len().div_ceil(threads);
    let work = &work;
    std::thread::scope(|scope| {
        let mut groups = Vec::new();
        while !pieces.is_empty() {
            let rest = pieces.split_off(per_thread.min(pieces.len()));
            groups.push(std::mem::replace(&mut pieces, rest));
        }
        let mine = groups.pop().unwrap_or_default();
        for group in groups {
            scope.spawn(move || group.into_iter().for_each(work));
        }
        mine.into_iter().for_each(work);
    });
}

/// `n` zeroed elements, or `None` where the allocator refuses that much
/// memory: unlike `vec![0; n]`, which aborts the process, this lets a size
/// that comes from a spec fail as a refusal with a reason.
pub fn try_zeroed<T: Clone + Default>(n: usize) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, T::default());
    Some(v)
}

/// One weight variable and where its elements live in the flat arrays.
#[derive(Debug, Clone)]
struct Slot {
    range: Range<usize>,
}

/// The built-in deterministic trainer of SPEC §5.
pub struct BuiltinTrainer {
    seed: u64,
    rank: Rank,
    step: u64,
    vars: Vec<VariableSpec>,
    slots: Vec<Slot>,
    weights: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

const LR: f32 = 1e-3;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// SplitMix64: a fast, well-mixed hash of a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform f32 in `[0, 1)` from the top 24 bits of `h`.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 24) as f32
}

impl BuiltinTrainer {
    /// The hidden size `d` that fits `spec.params_per_rank_bytes`.
    pub fn hidden_size(spec: &TrainerSpec) -> usize {
        let units = spec.params_per_rank_bytes / (TRAINER_BYTES_PER_LAYER_UNIT * u64::from(spec.layers));
        (units as f64).sqrt().floor().max(1.0) as usize
    }

    /// The model's variables without building it (for checks and planning).
    pub fn model_variables(spec: &TrainerSpec) -> Vec<VariableSpec> {
        let d = Self::hidden_size(spec);
        let mut weights = Vec::new();
        for layer in 0..spec.layers {
            for name in ["wq", "wk", "wv", "wo"] {
                weights.push(VariableSpec::new(
                    format!("model/layer_{layer}/attn/{name}"),
                    Dtype::F32,
                    vec![d, d],
                ));
            }
            weights.push(VariableSpec::new(
                format!("model/layer_{layer}/mlp/w_in"),
                Dtype::F32,
                vec![d, 4 * d],
            ));
            weights.push(VariableSpec::new(
                format!("model/layer_{layer}/mlp/w_out"),
                Dtype::F32,
                vec![4 * d, d],
            ));
        }
        let mut vars = vec![VariableSpec::new("optimizer/step", Dtype::I64, vec![])];
        vars.extend(weights.iter().cloned());
        for slot in ["m", "v"] {
            vars.extend(weights.iter().map(|w| {
                VariableSpec::new(format!("optimizer/{}/{slot}", w.name), Dtype::F32, w.shape.clone())
            }));
        }
        vars
    }

    /// Makes this trainer `rank`'s (a spare's memory, taken by a rank):
    /// its next reset or step is that rank's.
    pub fn set_rank(&mut self, rank: Rank) {
        self.rank = rank;
    }

    /// A fresh trainer for `rank` at step 0, initialised from the seed.
    pub fn new(spec: &TrainerSpec, rank: Rank) -> Self {
        let mut t = Self::zeroed(spec, rank);
        t.init_weights();
        t
    }

    /// Back to the state of [`BuiltinTrainer::new`], in the memory it has.
    pub fn reset(&mut self) {
        self.step = 0;
        fill_parallel(vec![bytemuck::cast_slice_mut(&mut self.m), bytemuck::cast_slice_mut(&mut self.v)], 0);
        self.init_weights();
    }

    /// Writes every variable's memory once, on every core: a fresh
    /// process pays its page faults here, before a restore needs them.
    pub fn touch(&mut self) {
        let [w, m, v] = [&mut self.weights, &mut self.m, &mut self.v].map(|a| bytemuck::cast_slice_mut(a));
        fill_parallel(vec![w, m, v], 0);
    }

    fn init_weights(&mut self) {
        let base = mix(self.seed ^ (u64::from(self.rank.0) << 32));
        for (k, slot) in self.slots.iter().enumerate() {
            let var_seed = mix(base ^ k as u64);
            for (j, w) in self.weights[slot.range.clone()].iter_mut().enumerate() {
                *w = (unit(mix(var_seed.wrapping_add(j as u64))) - 0.5) * 0.1;
            }
        }
    }

    /// A trainer with every variable zero, to be overwritten by [`Trainer::load`]
    /// (skips the initialisation a restore would throw away).
    pub fn zeroed(spec: &TrainerSpec, rank: Rank) -> Self {
        Self::try_zeroed(spec, rank).expect("the host refused the built-in trainer's memory")
    }

    /// [`BuiltinTrainer::zeroed`], or `None` where the host refuses the memory.
    pub fn try_zeroed(spec: &TrainerSpec, rank: Rank) -> Option<Self> {
        let vars = Self::model_variables(spec);
        let n_weights = (vars.len() - 1) / 3;
        let mut slots = Vec::with_capacity(n_weights);
        let mut at = 0;
        for w in &vars[1..=n_weights] {
            slots.push(Slot { range: at..at + w.elements() });
            at += w.elements();
        }
        Some(Self {
            seed: spec.seed,
            rank,
            step: 0,
            vars,
            slots,
            weights: try_zeroed(at)?,
            m: try_zeroed(at)?,
            v: try_zeroed(at)?,
        })
    }

    fn regions(&self) -> [&[u8]; 3] {
        [bytemuck::cast_slice(&self.weights), bytemuck::cast_slice(&self.m), bytemuck::cast_slice(&self.v)]
    }
}

impl Trainer for BuiltinTrainer {
    fn variables(&self) -> &[VariableSpec] {
        &self.vars
    }

    fn current_step(&self) -> Step {
        Step(self.step)
    }

    fn step(&mut self) {
        let step_seed = mix(self.seed ^ (u64::from(self.rank.0) << 32) ^ mix(self.step));
        for (k, slot) in self.slots.iter().enumerate() {
            let h = mix(step_seed ^ k as u64);
            // pseudo-gradient g = c·w + b: pulls weights toward a point that
            // changes every step, so every element moves every step
            let c = 0.5 + unit(h);
            let b = (unit(mix(h)) - 0.5) * 0.02;
            let r = slot.range.clone();
            for ((w, m), v) in
                self.weights[r.clone()].iter_mut().zip(&mut self.m[r.clone()]).zip(&mut self.v[r])
            {
                let g = *w * c + b;
                *m = BETA1 * *m + (1.0 - BETA1) * g;
                *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                *w -= LR * *m / (v.sqrt() + EPS);
            }
        }
        self.step += 1;
    }

    fn snapshot_into(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.snapshot_bytes(), "snapshot buffer has the wrong size");
        let (head, mut rest) = out.split_at_mut(8);
        head.copy_from_slice(&(self.step as i64).to_le_bytes());
        let mut pairs = Vec::with_capacity(3);
        for region in self.regions() {
            let (dst, tail) = rest.split_at_mut(region.len());
            pairs.push((dst, region));
            rest = tail;
        }
        copy_parallel(pairs);
    }

    fn load(&mut self, shard: &Shard) -> Result<(), ModelMismatch> {
        ModelMismatch::check(&shard.header.variables(), &self.vars)?;
        let n = self.slots.len();
        // every slot of the three arrays as its own slice, so that the
        // copies (and, in a fresh process, the page faults of memory never
        // touched) run on every core, as a snapshot's copy does
        let mut slices: Vec<Option<&mut [f32]>> = Vec::with_capacity(3 * n);
        for array in [&mut self.weights, &mut self.m, &mut self.v] {
            let mut rest: &mut [f32] = array;
            for slot in &self.slots {
                let (here, tail) = std::mem::take(&mut rest).split_at_mut(slot.range.len());
                slices.push(Some(here));
                rest = tail;
            }
        }
        let mut pairs: Vec<(&mut [u8], &[u8])> = Vec::with_capacity(3 * n);
        for (spec, data) in shard.tensors() {
            let index = self.vars.iter().position(|v| v.name == spec.name).expect("checked above");
            if index == 0 {
                let step = i64::from_le_bytes(data.try_into().expect("I64 scalar is 8 bytes"));
                self.step = step.max(0) as u64;
                continue;
            }
            let dst = slices[index - 1].take().expect("each variable once (checked above)");
            pairs.push((bytemuck::cast_slice_mut(dst), data));
        }
        copy_parallel(pairs);
        Ok(())
    }

    fn digest(&self) -> String {
        let mut h = Xxh3::new();
        h.update(&(self.step as i64).to_le_bytes());
        for region in self.regions() {
            h.update(region);
        }
        format!("{:032x}", h.digest128())
    }
}

/// The job's `final_digest` for a run without failures: every rank trained
/// from scratch to `total_steps`, digests combined in rank order. A run that
/// failed and restored must end with exactly this.
pub fn reference_digest(spec: &TrainerSpec, world_size: u32) -> String {
    let digests: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                scope.spawn(move || {
                    let mut t = BuiltinTrainer::new(spec, Rank(rank));
                    for _ in 0..spec.total_steps {
                        t.step();
                    }
                    t.digest()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reference trainer panicked")).collect()
    });
    flotilla_shared::checksum::combine_digests(&digests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::ids::{CheckpointId, Generation, JobName};
    use flotilla_shared::shard::{write_shard, ShardMeta};

    fn spec() -> TrainerSpec {
        TrainerSpec { params_per_rank_bytes: 64 << 10, layers: 2, seed: 7, ..TrainerSpec::default() }
    }

    fn save(t: &BuiltinTrainer, dir: &std::path::Path) -> Shard {
        let mut buf = vec![0u8; t.snapshot_bytes()];
        t.snapshot_into(&mut buf);
        let meta = ShardMeta {
            job: JobName::new("t").unwrap(),
            checkpoint: CheckpointId(1),
            rank: Rank(3),
            step: t.current_step(),
            generation: Generation(1),
        };
        let path = dir.join("rank-00003.safetensors");
        let manifest = write_shard(&path, &meta, t.variables(), &buf).unwrap();
        Shard::read_verified(&path, "t", &manifest).unwrap()
    }

    #[test]
    fn parallel_copy_copies_everything() {
        let src: Vec<u8> = (0..(80u32 << 20) / 4).flat_map(|i| i.to_le_bytes()).collect();
        let (a, b) = src.split_at(3 + (50 << 20));
        let mut dst = vec![0u8; src.len()];
        let (da, db) = dst.split_at_mut(a.len());
        copy_parallel(vec![(da, a), (db, b)]);
        assert!(dst == src);
        let mut small = [0u8; 3];
        copy_parallel(vec![(&mut small[..], &[1, 2, 3][..])]);
        assert_eq!(small, [1, 2, 3]);
        fill_parallel(vec![&mut dst[..], &mut small[..]], 9);
        assert!(dst.iter().chain(&small).all(|&b| b == 9));
    }

    #[test]
    fn a_reset_trainer_is_a_new_one() {
        let mut used = BuiltinTrainer::new(&spec(), Rank(2));
        for _ in 0..3 {
            used.step();
        }
        used.reset();
        let mut touched = BuiltinTrainer::zeroed(&spec(), Rank(2));
        touched.touch();
        touched.reset();
        let fresh = BuiltinTrainer::new(&spec(), Rank(2));
        assert_eq!(used.digest(), fresh.digest());
        assert_eq!(touched.digest(), fresh.digest());
        assert_eq!(used.current_step(), Step(0));
    }

    #[test]
    fn layout_fits_the_budget() {
        let s = spec();
        let t = BuiltinTrainer::new(&s, Rank(0));
        assert_eq!(BuiltinTrainer::hidden_size(&s), 15);
        assert_eq!(t.variables().len(), 1 + 3 * 6 * 2);
        assert_eq!(t.snapshot_bytes(), 8 + 144 * 2 * 225);
        assert!(t.snapshot_bytes() as u64 <= s.params_per_rank_bytes + 8);
        assert_eq!(t.variables()[1].name, "model/layer_0/attn/wq");
        assert_eq!(t.variables()[13].name, "optimizer/model/layer_0/attn/wq/m");
        assert_eq!(t.variables()[5].shape, vec![15, 60]);
    }

    #[test]
    fn deterministic_and_rank_dependent() {
        let mut a = BuiltinTrainer::new(&spec(), Rank(0));
        let mut b = BuiltinTrainer::new(&spec(), Rank(0));
        let mut c = BuiltinTrainer::new(&spec(), Rank(1));
        for _ in 0..5 {
            a.step();
            b.step();
            c.step();
        }
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        let before = a.digest();
        a.step();
        assert_ne!(a.digest(), before);
        assert!(a.weights.iter().all(|w| w.is_finite() && w.abs() < 1.0));
    }

    #[test]
    fn resume_from_a_shard_is_bit_exact() {
        // run to T; run to C → save → load into a fresh trainer → run to T
        let dir = tempfile::tempdir().unwrap();
        for (c, t) in [(0, 3), (4, 9), (7, 7)] {
            let mut straight = BuiltinTrainer::new(&spec(), Rank(3));
            for _ in 0..t {
                straight.step();
            }
            let mut first = BuiltinTrainer::new(&spec(), Rank(3));
            for _ in 0..c {
                first.step();
            }
            let shard = save(&first, dir.path());
            // keep going past C, as a live job would before failing
            first.step();
            let mut resumed = BuiltinTrainer::new(&spec(), Rank(3));
            resumed.step(); // state that the load must overwrite entirely
            resumed.load(&shard).unwrap();
            assert_eq!(resumed.current_step(), Step(c));
            while resumed.current_step() < Step(t) {
                resumed.step();
            }
            assert_eq!(resumed.digest(), straight.digest(), "C={c} T={t}");
            let (mut x, mut y) = (vec![0u8; straight.snapshot_bytes()], vec![0u8; straight.snapshot_bytes()]);
            straight.snapshot_into(&mut x);
            resumed.snapshot_into(&mut y);
            assert!(x == y, "C={c} T={t}: states differ");
        }
    }

    #[test]
    fn load_refuses_another_model_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let small = BuiltinTrainer::new(&TrainerSpec { layers: 1, ..spec() }, Rank(3));
        let shard = save(&small, dir.path());
        let mut t = BuiltinTrainer::new(&spec(), Rank(3));
        t.step();
        let before = t.digest();
        let err = t.load(&shard).unwrap_err();
        assert!(err.missing.contains(&"model/layer_1/attn/wq".to_string()), "{err}");
        assert!(err.shape.iter().any(|(n, _, _)| n == "model/layer_0/attn/wq"), "{err}");
        assert_eq!(t.digest(), before);
    }
}

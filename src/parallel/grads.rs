//! Keeping the ranks' models identical: the initial weights come from rank 0,
//! and after every backward pass the parameter gradients are summed over all
//! ranks in buckets, so every rank takes the same optimizer step.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::collective::Collective;
use crate::model::{Encoder, RenormState};
use crate::train::optimizer::Param;

/// Default bucket size of the gradient all-reduce: 1M f32 values (4 MiB).
pub const BUCKET_ELEMS: usize = 1 << 20;

/// The f32 values of a tensor, flattened.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Replaces the gradients of `params` in `grads` by their sums over all
/// ranks. The gradients are flattened in parameter order and summed in
/// buckets of at most `bucket_elems` values.
///
/// A parameter has a summed gradient on every rank when at least one
/// contributing rank has one, and none anywhere otherwise (the optimizer
/// skips it everywhere). A rank that does not `contribute` (it had no item
/// in the chunk and ran a stand-in pass) adds zeros whatever its `grads`
/// hold.
pub fn all_reduce_gradients(
    params: &[Param],
    grads: &mut GradStore,
    comm: &dyn Collective,
    contributes: bool,
    bucket_elems: usize,
) -> Result<()> {
    if bucket_elems == 0 {
        bail!("the gradient bucket size must be at least one value");
    }
    let local = |grads: &GradStore, p: &Param| -> Option<Tensor> {
        if contributes {
            grads.get(p.var.as_tensor()).cloned()
        } else {
            None
        }
    };
    let mut present: Vec<f32> = params
        .iter()
        .map(|p| if local(grads, p).is_some() { 1.0 } else { 0.0 })
        .collect();
    comm.all_reduce_sum(&mut present)
        .context("cannot agree on which parameters have gradients")?;
    for (p, &n) in params.iter().zip(&present) {
        if n == 0.0 {
            grads.remove(p.var.as_tensor());
        }
    }
    let present: Vec<&Param> = params
        .iter()
        .zip(&present)
        .filter_map(|(p, &n)| (n > 0.0).then_some(p))
        .collect();
    let mut bucket = Bucket {
        parts: Vec::new(),
        len: 0,
        pieces: Vec::new(),
        summed: vec![Vec::new(); present.len()],
    };
    for (slot, p) in present.iter().enumerate() {
        let size = p.var.elem_count();
        let mine = match local(grads, p) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(size, DType::F32, p.var.device())?,
        };
        if mine.elem_count() != size {
            bail!(
                "the gradient of `{}` has {} values, the parameter {size}",
                p.name,
                mine.elem_count()
            );
        }
        let mut offset = 0;
        while offset < size {
            let take = (bucket_elems - bucket.len).min(size - offset);
            bucket.parts.push(mine.narrow(0, offset, take)?);
            bucket.len += take;
            bucket.pieces.push((slot, take));
            offset += take;
            if bucket.len == bucket_elems {
                bucket.flush(&present, grads, comm)?;
            }
        }
    }
    bucket.flush(&present, grads, comm)
}

/// The gradient values waiting to be summed, and where they came from.
struct Bucket {
    /// Flat f32 pieces of gradients, in order, on the parameters' device.
    parts: Vec<Tensor>,
    /// Values in `parts`, at most the bucket size.
    len: usize,
    /// (index into the present parameters, values) of each piece, in order.
    pieces: Vec<(usize, usize)>,
    /// The summed pieces of each present parameter gathered so far.
    summed: Vec<Vec<Tensor>>,
}

impl Bucket {
    /// Sums the bucket over the ranks (on the gradients' device where the
    /// group can) and stores each parameter whose summed gradient is
    /// complete in `grads`.
    fn flush(
        &mut self,
        present: &[&Param],
        grads: &mut GradStore,
        comm: &dyn Collective,
    ) -> Result<()> {
        if self.parts.is_empty() {
            return Ok(());
        }
        let values = Tensor::cat(&std::mem::take(&mut self.parts), 0)?;
        let summed = comm
            .all_reduce_sum_tensor(&values)
            .context("cannot sum a gradient bucket over the ranks")?;
        let mut at = 0;
        for (slot, len) in self.pieces.drain(..) {
            self.summed[slot].push(summed.narrow(0, at, len)?);
            at += len;
            let var = &present[slot].var;
            let gathered: usize = self.summed[slot].iter().map(Tensor::elem_count).sum();
            if gathered == var.elem_count() {
                let parts = std::mem::take(&mut self.summed[slot]);
                let g = Tensor::cat(&parts, 0)?
                    .reshape(var.shape())?
                    .to_dtype(var.dtype())?;
                grads.insert(var.as_tensor(), g);
            }
        }
        self.len = 0;
        Ok(())
    }
}

/// Sets every rank's parameters and BatchRenorm running statistics to rank
/// 0's, and checks that the ranks agree on the renorm counters.
pub fn broadcast_model(model: &Encoder, comm: &dyn Collective) -> Result<()> {
    for (name, var) in model.params() {
        let mut v = values(var.as_tensor())?;
        comm.broadcast(&mut v, 0)
            .with_context(|| format!("cannot broadcast parameter `{name}`"))?;
        let t = Tensor::from_vec(v, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)
            .with_context(|| format!("cannot set parameter `{name}`"))?;
    }
    let mut states = model.renorm_states();
    for (prefix, state) in &mut states {
        let RenormState {
            mean,
            std,
            num_batches_tracked,
        } = state;
        comm.broadcast(mean, 0)
            .with_context(|| format!("cannot broadcast `{prefix}.running_mean`"))?;
        comm.broadcast(std, 0)
            .with_context(|| format!("cannot broadcast `{prefix}.running_std`"))?;
        let mut total = [*num_batches_tracked as f64];
        comm.all_reduce_sum_f64(&mut total)?;
        if total[0] != *num_batches_tracked as f64 * comm.world_size() as f64 {
            bail!(
                "rank {} has `{prefix}.num_batches_tracked` {num_batches_tracked}, \
                 which the other ranks do not share",
                comm.rank()
            );
        }
    }
    model.set_renorm_states(&states);
    Ok(())
}

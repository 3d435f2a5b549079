//! Activation checkpointing of Conformer blocks (`checkpoint_every_n_layers`).
//!
//! A checkpointed block runs its training forward once without recording a
//! graph, so none of its intermediate activations outlive it; the autograd
//! graph keeps only the block's input. During backward the block's forward
//! runs again from that input with the real parameters, and candle's backward
//! over that small graph yields the gradients of the input and of the
//! block's parameters.
//!
//! The parameter gradients travel through the ordinary graph, so any plain
//! `loss.backward()` (library code, the Rhai host) receives them: every
//! parameter of the block feeds a tie (`lcasr_kernels::backward::gradient_tap`)
//! whose value is a zero scalar, the ties are summed into an anchor, and the anchor is the second
//! input of the [`BlockCheckpoint`] node. Backward reaches that node before
//! the ties (they are its ancestors); its recomputation stores each
//! parameter's gradient in a slot shared with the ties, and each tie hands
//! its slot on to its parameter. Nothing outlives the graph, so a backward
//! that fails half-way leaves no stale gradient behind.
//!
//! The recomputation reproduces the first pass exactly: it starts the
//! dropout stream where the first pass started it (same masks), and its
//! BatchRenorm normalises with the running statistics the first pass saw;
//! neither BatchRenorm nor BatchNorm updates its running statistics again
//! (the reference updates them twice, a bug; reference-spec §3.7). The
//! gradients equal those of the plain path bit for bit, provided the
//! parameters are not changed between the forward and the backward (the
//! recomputation reads their values at backward time). Trained rotary
//! frequencies count among a block's parameters: each checkpointed block
//! passes on its share of their gradient.
//! The nodes only pass tensors through; they run on CPU and, in a
//! `cuda` build, on CUDA devices.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor, Var};
use lcasr_kernels::backward::gradient_tap;
use lcasr_kernels::device_memory::trace;
use lcasr_kernels::storage_copy::owned_cpu_storage;

use super::conformer::ConformerLayer;
use super::layers::Ctx;

/// Gradients of a block's parameters, in the order of its parameter list,
/// from the recomputation to the ties.
type Slots = Arc<Mutex<Vec<Option<Tensor>>>>;

/// Runs `layer` on `x` in training mode as a checkpointed block. `params`
/// are the block's trainable parameters; `ctx` is the forward's context, whose
/// dropout stream advances exactly as the plain path would advance it.
pub(crate) fn checkpointed_block(
    layer: &Arc<ConformerLayer>,
    params: Vec<Var>,
    x: &Tensor,
    ctx: &Ctx,
) -> Result<Tensor> {
    let mut replay = ctx.fork(true, layer.renorm_state());
    replay.recomputing = true;
    let first = ctx.fork(false, None);
    let output = layer.forward(&x.detach(), &first)?;
    ctx.continue_after(&first);

    let slots: Slots = Arc::new(Mutex::new(vec![None; params.len()]));
    let mut anchor = Tensor::zeros((), DType::F32, x.device())?;
    for (slot, p) in params.iter().enumerate() {
        // A zero scalar that, in backward, hands the parameter the gradient
        // the block's recomputation left in its slot.
        let shared = Arc::clone(&slots);
        let tie = gradient_tap(p.as_tensor(), "checkpoint-parameter-tie", move || {
            lock(&shared)[slot].take()
        })?;
        anchor = (anchor + tie)?;
    }
    x.apply_op2(
        &anchor,
        BlockCheckpoint {
            layer: Arc::clone(layer),
            params,
            replay: Mutex::new(replay),
            output: Mutex::new(Some(output)),
            slots,
        },
    )
}

/// Locks a mutex of this module; a poisoned lock only means that another
/// backward panicked, and the data stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The graph node of a checkpointed block: inputs (block input, anchor of
/// the parameter ties), output the block's output.
struct BlockCheckpoint {
    layer: Arc<ConformerLayer>,
    params: Vec<Var>,
    /// The context of the recomputation: the first pass's dropout position
    /// and BatchRenorm state, recording a graph, marked `recomputing`.
    replay: Mutex<Ctx>,
    /// The output of the graph-free first pass, until the node takes it.
    output: Mutex<Option<Tensor>>,
    slots: Slots,
}

impl BlockCheckpoint {
    /// The first pass's output; the node's forward takes it once.
    fn take_output(&self) -> Result<Tensor> {
        lock(&self.output)
            .take()
            .ok_or_else(|| Error::Msg("checkpointed block: forward ran twice".into()))
    }
}

/// Names the node in errors of its forward.
const NODE: &str = "checkpointed block";

impl CustomOp2 for BlockCheckpoint {
    fn name(&self) -> &'static str {
        "checkpointed-conformer-block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        owned_cpu_storage(&self.take_output()?, NODE)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        lcasr_kernels::storage_copy::owned_cuda_storage(&self.take_output()?, NODE)
    }

    fn bwd(
        &self,
        x: &Tensor,
        anchor: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ctx = {
            let replay = lock(&self.replay);
            replay.fork(true, replay.renorm_replay.clone())
        };
        let input = Var::from_tensor(&x.detach())?;
        trace(
            || format!("{NODE} {:?} backward starts", x.dims()),
            x.device(),
        );
        let y = self.layer.forward(input.as_tensor(), &ctx)?;
        let wrt: Vec<&Tensor> = std::iter::once(input.as_tensor())
            .chain(self.params.iter().map(Var::as_tensor))
            .collect();
        let mut grads = lcasr_kernels::backward::backward_from(&y, grad_res, &wrt)?.into_iter();
        let grad_x = grads.next().flatten();
        for (slot, g) in lock(&self.slots).iter_mut().zip(grads) {
            *slot = g;
        }
        drop(y);
        trace(|| format!("{NODE} backward ends"), x.device());
        // The anchor must receive a gradient for backward to reach the ties.
        Ok((grad_x, Some(anchor.zeros_like()?)))
    }
}

//! A composition of candle ops as one graph node that keeps only its inputs
//! and its output, the way a fused kernel does.
//!
//! candle's autograd keeps every intermediate tensor of a composition until
//! the whole backward pass ends (PyTorch frees each op's saved tensors as its
//! backward runs), so a composed BatchRenorm or softmax head holds several
//! times the memory of its fused kernel. Where an op has no native kernel on
//! its device, it runs its composition through [`node`]: the forward runs it
//! on detached inputs (nothing recorded), and the backward runs it again on
//! the saved inputs, with a graph, and back-propagates the incoming gradient
//! through that small graph: op-level activation checkpointing. An op whose
//! backward is written out ([`node_with_grads`]: chunked attention, the
//! softmax head) skips the graph and recomputes only what that needs.

use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Error, Layout, Result, Shape, Tensor, Var,
};

use crate::device_memory::trace;
use crate::storage_copy::owned_cpu_storage;

/// A composition of one to three tensors.
type Composition = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// A backward written out: the gradients of the inputs for the output's.
type Gradients = Box<dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// How a node's backward gets its gradients.
enum Backward {
    /// Runs the composition again with a graph and back-propagates through it.
    Recompute(Composition),
    /// Calls a hand-written backward (which recomputes what it needs).
    Written(Gradients),
}

/// `f(inputs)` as one node that keeps `inputs` and the output only; without
/// a graph to record (no input tracks gradients), just `f(inputs)`.
pub(crate) fn node(
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let first = f(&detached)?;
    node_with(inputs, first, f)
}

/// [`node`] for a caller that has already run the composition on detached
/// `inputs` (e.g. for a by-product of it) and passes its output as `first`.
pub(crate) fn node_with(
    inputs: &[&Tensor],
    first: Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let what = std::any::type_name_of_val(&f);
    apply(inputs, first, what, Backward::Recompute(Box::new(f)))
}

/// A node like [`node_with`] whose backward is `grads(inputs, output
/// gradient)`, one gradient (or `None`) per input, instead of the
/// composition differentiated by autograd. `grads` receives detached
/// tensors, so nothing it computes is recorded.
pub(crate) fn node_with_grads(
    inputs: &[&Tensor],
    first: Tensor,
    grads: impl Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let what = std::any::type_name_of_val(&grads);
    apply(inputs, first, what, Backward::Written(Box::new(grads)))
}

/// The node on `inputs` with output `first`; just `first` when no input
/// tracks gradients.
fn apply(
    inputs: &[&Tensor],
    first: Tensor,
    what: &'static str,
    backward: Backward,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(first);
    }
    let op = Recompute {
        what,
        backward,
        first: Mutex::new(Some(first)),
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => bail!("recompute: 1 to 3 inputs, got {}", inputs.len()),
    }
}

/// The node: its backward, and its first output until the forward takes it.
struct Recompute {
    /// The composition's name (its closure's type), for the memory trace.
    what: &'static str,
    backward: Backward,
    first: Mutex<Option<Tensor>>,
}

impl Recompute {
    /// The first output (the forward takes it once).
    fn take_first(&self) -> Result<Tensor> {
        self.first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::Msg("recompute: forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        owned_cpu_storage(&self.take_first()?, NAME)
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::storage_copy::owned_cuda_storage(&self.take_first()?, NAME)
    }

    /// The gradients of `inputs` for the output gradient `grad`.
    fn grads(&self, inputs: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dev = grad.device();
        trace(
            || format!("{} {:?} backward starts", self.what, grad.dims()),
            dev,
        );
        let grads = match &self.backward {
            Backward::Recompute(f) => {
                let vars = inputs
                    .iter()
                    .map(|t| Var::from_tensor(&t.detach()))
                    .collect::<Result<Vec<_>>>()?;
                let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let y = f(&tensors)?;
                let wrt: Vec<&Tensor> = tensors.iter().collect();
                // The recomputed graph goes with `y`, at the end of this arm.
                crate::backward::backward_from(&y, grad, &wrt)?
            }
            Backward::Written(g) => {
                let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
                let grads = g(&detached, &grad.detach())?;
                if grads.len() != inputs.len() {
                    bail!(
                        "{}: {} gradients for {} inputs",
                        self.what,
                        grads.len(),
                        inputs.len()
                    );
                }
                grads
            }
        };
        trace(|| format!("{} backward ends", self.what), dev);
        Ok(grads)
    }
}

const NAME: &str = "lcasr-recomputed-composition";

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[a], grad)?.remove(0))
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a, b], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a, b, c], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

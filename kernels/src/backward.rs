//! Back-propagation from an intermediate tensor with a given gradient, for
//! the nodes that recompute a piece of the graph in their backward
//! (`recompute.rs`, the model's checkpointed blocks).
//!
//! Two things in candle make the obvious way costly at long context:
//! - it starts a backward pass only from a scalar (seeded with one); seeding
//!   `y` with a gradient `g` as `(y * g).sum_all().backward()` costs six to
//!   eight tensors of `y`'s size (the product, kept by the graph, the sum's
//!   broadcast gradient, the product's gradients for both factors, the one
//!   for `g` computed although `g` tracks nothing, each added onto a fresh
//!   zero tensor). [`backward_from`] seeds through a node that hands `g` on as
//!   its input's gradient: one tensor of `y`'s size.
//! - the gradients a backward pass returns are not detached: each records the
//!   ops that made it, from forward tensors of the recomputed graph (a
//!   matmul's gradient refers to the other factor), so a gradient handed to
//!   the outer graph keeps the whole recomputed graph alive until the outer
//!   backward consumes it, and every sum onto it chains more. For chunked
//!   attention that kept each chunk's scores to the end: memory quadratic in
//!   the length. [`backward_from`] returns detached gradients only.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The gradients of `wrt` (`None` for one `y` does not depend on) for
/// `grad`, the gradient of some loss with respect to `y` (same shape and
/// dtype): what `(y * grad).sum_all().backward()` gives, bit for bit,
/// without its temporaries, detached from the graph that computed them.
pub fn backward_from(y: &Tensor, grad: &Tensor, wrt: &[&Tensor]) -> Result<Vec<Option<Tensor>>> {
    if y.shape() != grad.shape() || y.dtype() != grad.dtype() {
        bail!(
            "backward_from: gradient {:?} {:?} for a tensor {:?} {:?}",
            grad.shape(),
            grad.dtype(),
            y.shape(),
            y.dtype()
        );
    }
    let seed = grad.detach();
    let mut store =
        gradient_tap(y, "lcasr-backward-seed", move || Some(seed.clone()))?.backward()?;
    Ok(wrt
        .iter()
        .map(|t| store.remove(t).map(|g| g.detach()))
        .collect())
}

/// A zero f32 scalar that depends on `x` and, in backward, gives `x` the
/// gradient `grad()` returns (`None`: none). What [`backward_from`] seeds
/// through, and how the model's checkpointed blocks hand each parameter the
/// gradient their recomputation found.
pub fn gradient_tap<F>(x: &Tensor, name: &'static str, grad: F) -> Result<Tensor>
where
    F: Fn() -> Option<Tensor> + Send + Sync + 'static,
{
    x.apply_op1(Tap { name, grad })
}

/// The node of [`gradient_tap`].
struct Tap<F> {
    name: &'static str,
    grad: F,
}

impl<F: Fn() -> Option<Tensor> + Send + Sync> CustomOp1 for Tap<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let zero = s
            .device()
            .zeros_impl(&Shape::from(()), candle_core::DType::F32)?;
        Ok((zero, Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok((self.grad)())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    /// Same gradients as the product-and-sum seeding, bit for bit, through
    /// a graph with a non-linearity, a broadcast and a reduction; detached;
    /// `None` for a tensor `y` does not depend on.
    #[test]
    fn matches_product_seeding() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev)?)?;
        let unrelated = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev)?)?;
        let y = (x.as_tensor().broadcast_mul(w.as_tensor())?.tanh()? * 3.)?;
        let y = y.sum_keepdim(1)?.broadcast_add(&y)?;
        let g = Tensor::randn(0f32, 1., (3, 5), &dev)?;
        let want = (&y * &g)?.sum_all()?.backward()?;
        let got = backward_from(
            &y,
            &g,
            &[x.as_tensor(), w.as_tensor(), unrelated.as_tensor()],
        )?;
        for (v, got) in [&x, &w].into_iter().zip(&got) {
            let got = got.as_ref().unwrap();
            assert!(!got.track_op(), "a returned gradient records its ops");
            assert_eq!(
                want.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()?
                    .to_vec1::<f32>()?,
                got.flatten_all()?.to_vec1::<f32>()?
            );
        }
        assert!(got[2].is_none());
        Ok(())
    }

    /// A gradient of another shape or dtype is an error, not a broadcast.
    #[test]
    fn rejects_a_mismatched_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let y = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &dev)?)?;
        let y = y.as_tensor();
        assert!(backward_from(y, &Tensor::zeros(3, DType::F32, &dev)?, &[y]).is_err());
        assert!(backward_from(y, &Tensor::zeros((2, 3), DType::BF16, &dev)?, &[y]).is_err());
        Ok(())
    }
}

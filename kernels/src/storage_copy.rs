//! The storage a custom op's forward returns when its output was computed
//! beforehand, outside the op (the recompute and checkpoint nodes run their
//! forward without recording a graph, then hand the result to candle as the
//! node's output).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Result, Shape, Storage, Tensor};

/// A copy of `t`'s storage holding its values from the start, and its shape:
/// one copy when `t` is contiguous from the start of its storage (any op's
/// fresh output), two otherwise (a compacting copy first).
pub fn owned_storage(t: &Tensor) -> Result<(Storage, Shape)> {
    let compact;
    let t = if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        compact = t.affine(1.0, 0.0)?;
        &compact
    };
    let (storage, layout) = t.storage_and_layout();
    let copy = match &*storage {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        _ => bail!("owned_storage: unsupported device"),
    };
    Ok((copy, t.shape().clone()))
}

/// [`owned_storage`] for a node's `cpu_fwd`: fails when `t` is not on the CPU.
pub fn owned_cpu_storage(t: &Tensor, what: &str) -> Result<(CpuStorage, Shape)> {
    match owned_storage(t)? {
        (Storage::Cpu(s), shape) => Ok((s, shape)),
        _ => bail!("{what}: the result is on another device than the node's inputs"),
    }
}

/// [`owned_storage`] for a node's `cuda_fwd`: fails when `t` is not on a CUDA device.
#[cfg(feature = "cuda")]
pub fn owned_cuda_storage(t: &Tensor, what: &str) -> Result<(candle_core::CudaStorage, Shape)> {
    match owned_storage(t)? {
        (Storage::Cuda(s), shape) => Ok((s, shape)),
        _ => bail!("{what}: the result is on another device than the node's inputs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn copies_fresh_outputs_and_views_alike() {
        let base = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        for (t, want) in [
            (base.clone(), (0..24).map(|v| v as f32).collect::<Vec<_>>()),
            (
                base.narrow(1, 2, 3).unwrap(),
                vec![2., 3., 4., 8., 9., 10., 14., 15., 16., 20., 21., 22.],
            ),
            (
                base.narrow(0, 1, 2).unwrap(),
                (6..18).map(|v| v as f32).collect(),
            ),
        ] {
            let (cpu, shape) = owned_cpu_storage(&t, "test").unwrap();
            let CpuStorage::F32(values) = cpu else {
                panic!("f32 storage")
            };
            assert_eq!(shape.dims(), t.dims());
            assert_eq!(&values[..want.len()], &want[..]);
        }
    }
}

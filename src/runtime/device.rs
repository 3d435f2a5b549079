//! The compute device a run asks for: `cpu`, `cuda` or `cuda:N`
//! (`training.device`, `--device`, Rhai `device()`).

use anyhow::{bail, Result};
use candle_core::Device;

/// A device name, checked for its form only: opening it is [`DeviceName::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceName {
    /// The CPU.
    Cpu,
    /// CUDA GPU number N (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceName {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("`{name}` is not a device: expected cpu, cuda or cuda:N"),
            },
        }
    }

    /// The device, or why it cannot be had: a build without the `cuda`
    /// feature, or no such GPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

/// The device named `name` (`cpu`, `cuda`, `cuda:N`), opened: [`DeviceName::parse`]
/// then [`DeviceName::open`].
pub fn open_device(name: &str) -> Result<Device> {
    DeviceName::parse(name)?.open()
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot open GPU cuda:{n}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    bail!(
        "cuda:{n}: this build of lcasr has no CUDA support; build it with \
         `cargo build --release --features cuda` (see docs/gpu.md)"
    )
}

/// Number of CUDA GPUs this machine has (without opening any).
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let n =
        CudaContext::device_count().map_err(|e| anyhow::anyhow!("cannot count the GPUs: {e:?}"))?;
    Ok(n.max(0) as usize)
}

/// A build without the `cuda` feature sees no GPU.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> Result<usize> {
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (text, want) in [
            ("cpu", DeviceName::Cpu),
            ("cuda", DeviceName::Cuda(0)),
            ("cuda:3", DeviceName::Cuda(3)),
        ] {
            assert_eq!(DeviceName::parse(text).unwrap(), want);
        }
        assert_eq!(DeviceName::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU0", ""] {
            let e = DeviceName::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        }
        assert!(matches!(DeviceName::Cpu.open(), Ok(Device::Cpu)));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_says_how_to_get_it() {
        let e = DeviceName::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}

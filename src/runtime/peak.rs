//! The process's resident memory and its peak, as the kernel counts them
//! (`VmRSS`, `VmHWM` in `/proc/self/status`). The peak can be reset
//! (`/proc/self/clear_refs`), so a training script can measure each stage of
//! its sequence schedule on its own. Elsewhere than Linux nothing is known.
//! On a CUDA device, [`device_peak`] is the most memory candle's tensors held
//! at once (the high-water mark of the device's stream-ordered memory pool,
//! which candle allocates from: PyTorch's `max_memory_allocated`).

use candle_core::Device;

/// Resident memory now, in bytes.
pub fn resident() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k << 10)
}

/// Most resident memory since the process started or the last
/// [`reset_peak`], in bytes.
pub fn peak() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k << 10)
}

/// Starts a new peak from the current resident size. False where the kernel
/// does not allow it (then [`peak`] keeps counting from the process start).
pub fn reset_peak() -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Most device memory allocated at once on `device` since the process
/// started or the last [`reset_device_peak`], in bytes; `None` on the CPU
/// (use [`peak`]) or where the driver cannot tell.
pub fn device_peak(device: &Device) -> Option<u64> {
    lcasr_kernels::device_memory::usage(device).map(|(_, high)| high)
}

/// Starts a new [`device_peak`] from the memory allocated now; false on the
/// CPU or where the driver refuses.
pub fn reset_device_peak(device: &Device) -> bool {
    lcasr_kernels::device_memory::reset_high(device)
}

fn status_kib(key: &str) -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn peak_sees_a_touched_block_and_reset_forgets_it() {
        let before = resident().unwrap();
        let mut block = vec![0u8; 512 << 20];
        // Touch every page so it becomes resident.
        for i in (0..block.len()).step_by(4096) {
            block[i] = 1;
        }
        std::hint::black_box(&block);
        let high = peak().unwrap();
        assert!(high >= before + (480 << 20), "{high} vs {before}");
        drop(block);
        if reset_peak() {
            // Other tests of this binary may allocate meanwhile; the block
            // itself is gone.
            assert!(peak().unwrap() < high, "reset did not lower the peak");
        }
    }
}

//! `LCASR_KERNEL_PROFILE=1`: the GPU time of every kernel this crate launches,
//! measured with a pair of CUDA events around each launch (nothing waits while
//! the work runs) and summed per kernel by [`take_report`]. What it does not
//! cover (candle's own kernels, cuBLAS, the gaps between launches) is the
//! step's time less the report's total: that split is what it is for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;

/// One timed launch: the kernel's name and the events recorded around it.
type Launch = (String, CudaEvent, CudaEvent);

/// Launches timed since the last [`take_report`].
static LAUNCHES: Mutex<Vec<Launch>> = Mutex::new(Vec::new());

/// Profiling state: 0 not yet read from the environment, 1 off, 2 on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether launches are being timed: `LCASR_KERNEL_PROFILE=1` (read at the
/// first launch) unless [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("LCASR_KERNEL_PROFILE").is_ok_and(|v| v == "1");
            set_enabled(on);
            on
        }
        state => state == 2,
    }
}

/// Turns the timing of launches on or off from here on.
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Before a launch on `stream`: its start event when profiling.
pub(crate) fn start(stream: &CudaStream) -> Result<Option<CudaEvent>> {
    if !enabled() {
        return Ok(None);
    }
    stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .w()
        .map(Some)
}

/// After the launch of kernel `name` on `stream` that `start` began.
pub(crate) fn finish(start: Option<CudaEvent>, name: &str, stream: &CudaStream) -> Result<()> {
    if let Some(start) = start {
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        let mut launches = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
        launches.push((name.to_string(), start, end));
    }
    Ok(())
}

/// The GPU time of the kernels launched since the last call, per kernel
/// (calls, total milliseconds), largest first, with their sum; `None` when not
/// profiling and nothing was timed. Waits for those kernels to finish.
pub fn take_report() -> Result<Option<String>> {
    let launches = std::mem::take(&mut *LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()));
    if launches.is_empty() && !enabled() {
        return Ok(None);
    }
    let mut per_kernel: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for (name, start, end) in &launches {
        let ms = f64::from(start.elapsed_ms(end).w()?);
        let entry = per_kernel.entry(name.clone()).or_default();
        entry.0 += 1;
        entry.1 += ms;
    }
    let mut rows: Vec<(String, (usize, f64))> = per_kernel.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let total: f64 = rows.iter().map(|(_, (_, ms))| ms).sum();
    let mut report = format!(
        "lcasr kernels: {total:.1} ms of GPU time in {} launches\n",
        launches.len()
    );
    for (name, (calls, ms)) in rows {
        report.push_str(&format!("  {ms:9.2} ms {calls:6} x {name}\n"));
    }
    Ok(Some(report))
}

//! What every optimizer shares: the named parameter list with its weight-decay
//! grouping, the [`Optimizer`] trait, construction from a config name plus
//! arguments, per-parameter state storage and the fused in-place update helper.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Shape, Storage, Tensor, Var};
use rayon::prelude::*;
use serde_json::Value;

use super::adam::Adam;
use super::madgrad::Madgrad;
use super::mirror_madgrad::MirrorMadgrad;

/// One trainable tensor with its checkpoint name.
#[derive(Clone, Debug)]
pub struct Param {
    /// State-dict name, e.g. `layers.0.ff1.fn.fn.fc1.weight`.
    pub name: String,
    /// The tensor the optimizer updates in place.
    pub var: Var,
    /// Whether weight decay applies to this parameter.
    pub weight_decay: bool,
    /// This parameter's learning rate as a multiple of the step's LR (its
    /// group's LR: e.g. 0.1 for a fine-tuned front-end, 0 to freeze it
    /// under Adam). 1 by default.
    pub lr_scale: f64,
}

impl Param {
    /// A parameter whose decay flag follows [`decays_by_default`].
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let weight_decay = decays_by_default(&name, var.rank());
        Self {
            name,
            var,
            weight_decay,
            lr_scale: 1.0,
        }
    }
}

/// The conventional weight-decay rule: decay matrices and conv kernels (rank >= 2),
/// never norms, biases, embeddings or positional encodings.
pub fn decays_by_default(name: &str, rank: usize) -> bool {
    const NEVER: [&str; 4] = ["norm", "embedding", "pos_enc", "inv_freq"];
    rank >= 2 && !NEVER.iter().any(|word| name.contains(word))
}

/// Which parameters weight decay applies to (config key `weight_decay_groups`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecayGroups {
    /// [`decays_by_default`].
    #[default]
    Conventional,
    /// Every parameter.
    All,
}

/// The parameter list of a model, sorted by name so that order (and thus
/// optimizer state files) is deterministic.
pub fn collect_params(
    vars: impl IntoIterator<Item = (String, Var)>,
    groups: DecayGroups,
) -> Vec<Param> {
    let mut params: Vec<Param> = vars
        .into_iter()
        .map(|(name, var)| {
            let mut p = Param::new(name, var);
            if groups == DecayGroups::All {
                p.weight_decay = true;
            }
            p
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    params
}

/// An optimizer over a parameter list. The learning rate is passed per step, so
/// schedules stay outside; everything needed to continue bit-identically is
/// exported by [`Optimizer::state_tensors`] and [`Optimizer::state_scalars`].
pub trait Optimizer: Send {
    /// The config name: `madgrad`, `mirrormadgrad`, `adam` or `adamw`.
    fn name(&self) -> &str;
    /// One update of every parameter that has a gradient in `grads`.
    fn step(&mut self, params: &[Param], grads: &GradStore, lr: f64) -> Result<()>;
    /// Number of completed [`Optimizer::step`] calls.
    fn steps(&self) -> u64;
    /// f32 buffers kept per parameter element (for memory planning).
    fn state_buffers(&self) -> usize;
    /// Per-parameter state, named `<param>.<buffer>`.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Counters and hyper-parameters, as JSON.
    fn state_scalars(&self) -> Value;
    /// Restores what [`Optimizer::state_tensors`] and [`Optimizer::state_scalars`] saved.
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>, scalars: &Value) -> Result<()>;
}

/// The optimizer families of the config's `optimizer.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// MADGRAD (§6.1).
    Madgrad,
    /// MirrorMADGRAD (§6.2).
    MirrorMadgrad,
    /// Adam with coupled L2 decay, as `torch.optim.Adam`.
    Adam,
    /// Adam with decoupled decay, as `torch.optim.AdamW`.
    AdamW,
}

impl OptimizerKind {
    /// Parses a config name (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "madgrad" => Ok(Self::Madgrad),
            "mirrormadgrad" | "mirror_madgrad" => Ok(Self::MirrorMadgrad),
            "adam" => Ok(Self::Adam),
            "adamw" => Ok(Self::AdamW),
            _ => {
                bail!("unknown optimizer `{name}`: expected madgrad, mirrormadgrad, adam or adamw")
            }
        }
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Madgrad => "madgrad",
            Self::MirrorMadgrad => "mirrormadgrad",
            Self::Adam => "adam",
            Self::AdamW => "adamw",
        }
    }

    fn allowed_args(self) -> &'static [&'static str] {
        match self {
            Self::Madgrad | Self::MirrorMadgrad => {
                &["lr", "momentum", "weight_decay", "eps", "decouple_decay"]
            }
            Self::Adam | Self::AdamW => &["lr", "betas", "eps", "weight_decay", "amsgrad"],
        }
    }
}

/// A validated optimizer configuration (the config's `optimizer.name` + `args`),
/// with the reference defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerConfig {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Peak learning rate (`args.lr`), also the LR schedule's peak.
    pub lr: f64,
    /// MADGRAD momentum.
    pub momentum: f64,
    /// Weight-decay factor.
    pub weight_decay: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// MADGRAD: decoupled instead of coupled weight decay.
    pub decouple_decay: bool,
    /// Adam moment decay rates.
    pub betas: (f64, f64),
    /// Where the element-wise updates run (not a config key: the device decides).
    pub update: UpdatePath,
}

/// Where an optimizer runs its element-wise updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdatePath {
    /// The fused host kernel for parameters in CPU memory; tensor ops on the
    /// parameter's own device otherwise, so a GPU's parameters, gradients and
    /// state never travel to the host.
    #[default]
    ByDevice,
    /// Tensor ops for every parameter: what GPUs run, selectable on the CPU
    /// so that tests can check it against the host kernel.
    TensorOps,
}

impl OptimizerConfig {
    /// The defaults of one optimizer family.
    pub fn defaults(kind: OptimizerKind) -> Self {
        let base = Self {
            kind,
            lr: 1e-2,
            momentum: 0.9,
            weight_decay: 0.0,
            eps: 1e-6,
            decouple_decay: false,
            betas: (0.9, 0.999),
            update: UpdatePath::ByDevice,
        };
        match kind {
            OptimizerKind::Madgrad => base,
            OptimizerKind::MirrorMadgrad => Self { eps: 0.0, ..base },
            OptimizerKind::Adam => Self {
                lr: 1e-3,
                eps: 1e-8,
                ..base
            },
            OptimizerKind::AdamW => Self {
                lr: 1e-3,
                eps: 1e-8,
                weight_decay: 1e-2,
                ..base
            },
        }
    }

    /// Parses `name` and a JSON object of arguments; unknown names, unknown
    /// arguments and values of the wrong type are errors that name the key.
    pub fn from_args(name: &str, args: &Value) -> Result<Self> {
        let kind = OptimizerKind::parse(name)?;
        let mut cfg = Self::defaults(kind);
        let map = match args {
            Value::Null => return Ok(cfg),
            Value::Object(map) => map,
            other => bail!("optimizer.args must be a mapping, got {other}"),
        };
        let allowed = kind.allowed_args();
        for (key, value) in map {
            let num = || {
                value
                    .as_f64()
                    .ok_or_else(|| anyhow!("optimizer.args.{key} must be a number, got {value}"))
            };
            match key.as_str() {
                "lr" => cfg.lr = num()?,
                "eps" => cfg.eps = num()?,
                "weight_decay" => cfg.weight_decay = num()?,
                "momentum" if allowed.contains(&"momentum") => cfg.momentum = num()?,
                "decouple_decay" if allowed.contains(&"decouple_decay") => {
                    cfg.decouple_decay = value.as_bool().ok_or_else(|| {
                        anyhow!("optimizer.args.decouple_decay must be true or false, got {value}")
                    })?
                }
                "betas" if allowed.contains(&"betas") => {
                    let pair = value
                        .as_array()
                        .filter(|a| a.len() == 2)
                        .and_then(|a| Some((a[0].as_f64()?, a[1].as_f64()?)))
                        .ok_or_else(|| {
                            anyhow!("optimizer.args.betas must be two numbers, got {value}")
                        })?;
                    cfg.betas = pair;
                }
                "amsgrad" if allowed.contains(&"amsgrad") => {
                    if value.as_bool() != Some(false) {
                        bail!("optimizer.args.amsgrad: only false is supported, got {value}")
                    }
                }
                _ => bail!(
                    "unknown argument optimizer.args.{key} for {}: expected one of {}",
                    kind.as_str(),
                    allowed.join(", ")
                ),
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let finite = [
            self.lr,
            self.momentum,
            self.weight_decay,
            self.eps,
            self.betas.0,
            self.betas.1,
        ];
        if finite.iter().any(|v| !v.is_finite()) {
            bail!("optimizer arguments must be finite numbers: {self:?}")
        }
        if self.lr < 0.0 || self.eps < 0.0 || self.weight_decay < 0.0 {
            bail!("optimizer lr, eps and weight_decay must not be negative: {self:?}")
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!(
                "optimizer.args.momentum must be in [0, 1), got {}",
                self.momentum
            )
        }
        if !(0.0..1.0).contains(&self.betas.0) || !(0.0..1.0).contains(&self.betas.1) {
            bail!(
                "optimizer.args.betas must lie in [0, 1), got {:?}",
                self.betas
            )
        }
        Ok(())
    }

    /// A fresh optimizer (no state yet).
    pub fn build(&self) -> Box<dyn Optimizer> {
        match self.kind {
            OptimizerKind::Madgrad => Box::new(Madgrad::new(self.clone())),
            OptimizerKind::MirrorMadgrad => Box::new(MirrorMadgrad::new(self.clone())),
            OptimizerKind::Adam | OptimizerKind::AdamW => Box::new(Adam::new(self.clone())),
        }
    }
}

/// One state buffer read back from a checkpoint: its shape and values.
type SavedBuffer = (Shape, Vec<f32>);

/// How a state buffer starts before a parameter's first update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Init {
    /// All zeros.
    Zeros,
    /// A copy of the parameter's values.
    Param,
}

/// Per-parameter f32 buffers of an optimizer, keyed by parameter name.
#[derive(Clone, Debug, Default)]
pub(crate) struct StateStore {
    entries: BTreeMap<String, ParamState>,
}

/// The buffers of one parameter.
#[derive(Clone, Debug)]
struct ParamState {
    shape: Shape,
    /// One buffer per name in the owner's buffer list, each the parameter's size.
    buffers: Buffers,
}

/// Where a parameter's state buffers live: they follow its update path.
#[derive(Clone, Debug)]
enum Buffers {
    /// Host vectors, for the fused host kernel.
    Host(Vec<Vec<f32>>),
    /// f32 tensors on the parameter's device, for the tensor-op path.
    Device(Vec<Tensor>),
}

impl ParamState {
    /// Fresh buffers for `param`, as `inits` say, on the host or on its device.
    fn new(param: &Param, inits: &[Init], on_device: bool) -> Result<Self> {
        let var = &param.var;
        let buffers = if on_device {
            let p = var.as_detached_tensor();
            Buffers::Device(
                inits
                    .iter()
                    .map(|init| match init {
                        Init::Zeros => p.zeros_like(),
                        Init::Param => p.copy(),
                    })
                    .collect::<candle_core::Result<_>>()?,
            )
        } else {
            let n = var.elem_count();
            Buffers::Host(
                inits
                    .iter()
                    .map(|init| match init {
                        Init::Zeros => Ok(vec![0f32; n]),
                        Init::Param => var.flatten_all()?.to_device(&Device::Cpu)?.to_vec1(),
                    })
                    .collect::<candle_core::Result<_>>()?,
            )
        };
        Ok(Self {
            shape: var.shape().clone(),
            buffers,
        })
    }

    /// The buffers as tensors on `device`, moved there first if they are elsewhere.
    fn on_device(&mut self, device: &Device) -> Result<&mut [Tensor]> {
        let moved: Option<Vec<Tensor>> = match &self.buffers {
            Buffers::Device(ts) if ts.iter().all(|t| t.device().same_device(device)) => None,
            Buffers::Device(ts) => Some(
                ts.iter()
                    .map(|t| t.to_device(device))
                    .collect::<candle_core::Result<_>>()?,
            ),
            Buffers::Host(vs) => Some(
                vs.iter()
                    .map(|v| Tensor::from_slice(v, self.shape.clone(), device))
                    .collect::<candle_core::Result<_>>()?,
            ),
        };
        if let Some(moved) = moved {
            self.buffers = Buffers::Device(moved);
        }
        match &mut self.buffers {
            Buffers::Device(ts) => Ok(ts),
            Buffers::Host(_) => unreachable!("buffers were just moved to the device"),
        }
    }

    /// The buffers as host vectors, copied back first if they are on a device.
    fn on_host(&mut self) -> Result<&mut [Vec<f32>]> {
        if let Buffers::Device(ts) = &self.buffers {
            let vs = ts
                .iter()
                .map(|t| t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1())
                .collect::<candle_core::Result<_>>()?;
            self.buffers = Buffers::Host(vs);
        }
        match &mut self.buffers {
            Buffers::Host(vs) => Ok(vs),
            Buffers::Device(_) => unreachable!("buffers were just copied to the host"),
        }
    }
}

impl StateStore {
    /// One update of `param` with gradient `grad`: its state buffers (created
    /// by `inits` on first use), then `host(values, grad, buffers)` over chunks
    /// of host memory, or `tensors(param, grad, buffers) -> new values` with
    /// tensor ops on the parameter's device, as `path` and the device say.
    /// Both must compute the same update.
    pub fn update<K, T>(
        &mut self,
        path: UpdatePath,
        param: &Param,
        grad: &Tensor,
        inits: &[Init],
        host: K,
        tensors: T,
    ) -> Result<()>
    where
        K: Fn(&mut [f32], &[f32], &mut [&mut [f32]]) + Sync,
        T: FnOnce(&Tensor, &Tensor, &mut [Tensor]) -> candle_core::Result<Tensor>,
    {
        check_update(param, grad)?;
        let device = param.var.device();
        let on_device = path == UpdatePath::TensorOps || !device.is_cpu();
        let state = match self.entries.get_mut(&param.name) {
            Some(state) => state,
            None => self
                .entries
                .entry(param.name.clone())
                .or_insert(ParamState::new(param, inits, on_device)?),
        };
        if on_device {
            let buffers = state.on_device(device)?;
            let p = param.var.as_detached_tensor();
            let g = grad.detach().to_device(device)?.to_dtype(DType::F32)?;
            let new =
                tensors(&p, &g, buffers).with_context(|| format!("updating `{}`", param.name))?;
            param.var.set(&new)?;
            Ok(())
        } else {
            fused_update(param, grad, state.on_host()?, host)
        }
    }

    /// `<param>.<buffer>` tensors of every parameter (on the device the
    /// buffers live on).
    pub fn to_tensors(&self, names: &[&str]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (param, state) in &self.entries {
            for (i, buf) in names.iter().enumerate() {
                let t = match &state.buffers {
                    Buffers::Host(vs) => {
                        Tensor::from_slice(&vs[i], state.shape.clone(), &Device::Cpu)
                            .expect("state buffer matches its shape")
                    }
                    Buffers::Device(ts) => ts[i].clone(),
                };
                out.push((format!("{param}.{buf}"), t));
            }
        }
        out
    }

    /// Rebuilds the store from `<param>.<buffer>` tensors; every parameter must
    /// have all of `names`. The buffers move to their parameter's device at its
    /// next update.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>, names: &[&str]) -> Result<Self> {
        // Parameter name -> one slot per buffer name.
        let mut found: BTreeMap<String, Vec<Option<SavedBuffer>>> = BTreeMap::new();
        for (key, t) in tensors {
            let (param, buf) = key
                .rsplit_once('.')
                .ok_or_else(|| anyhow!("optimizer state tensor `{key}` has no buffer suffix"))?;
            let idx = names.iter().position(|n| *n == buf).ok_or_else(|| {
                anyhow!(
                    "optimizer state tensor `{key}`: unknown buffer `{buf}`, expected {names:?}"
                )
            })?;
            let data = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()
                .with_context(|| format!("reading optimizer state `{key}`"))?;
            found
                .entry(param.to_string())
                .or_insert_with(|| vec![None; names.len()])[idx] = Some((t.shape().clone(), data));
        }
        let mut store = Self::default();
        for (param, bufs) in found {
            let mut shape = None;
            let mut buffers = Vec::with_capacity(names.len());
            for (name, buf) in names.iter().zip(bufs) {
                let (s, data) =
                    buf.ok_or_else(|| anyhow!("optimizer state lacks `{param}.{name}`"))?;
                if shape.as_ref().is_some_and(|prev: &Shape| prev != &s) {
                    bail!("optimizer state buffers of `{param}` disagree in shape")
                }
                shape = Some(s);
                buffers.push(data);
            }
            let shape = shape.ok_or_else(|| anyhow!("optimizer state of `{param}` is empty"))?;
            store.entries.insert(
                param,
                ParamState {
                    shape,
                    buffers: Buffers::Host(buffers),
                },
            );
        }
        Ok(store)
    }
}

/// MADGRAD's denominator `ν^(1/3) + eps` as tensor ops, infinite where it is
/// 0 with eps 0 (an element that never had a gradient then does not move), as
/// the host kernels' guard.
pub(crate) fn rho_guarded(nu: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let rho = nu.powf(1.0 / 3.0)?.affine(1.0, eps as f64)?;
    if eps != 0.0 {
        return Ok(rho);
    }
    let inf = Tensor::new(f32::INFINITY, rho.device())?.broadcast_as(rho.shape())?;
    rho.eq(0.0)?.where_cond(&inf, &rho)
}

/// Fails unless `grad` has the shape of `param` and `param` is f32.
fn check_update(param: &Param, grad: &Tensor) -> Result<()> {
    if grad.dims() != param.var.dims() {
        bail!(
            "gradient of `{}` has shape {:?}, the parameter {:?}",
            param.name,
            grad.dims(),
            param.var.dims()
        )
    }
    if param.var.dtype() != DType::F32 {
        bail!(
            "parameter `{}` is {:?}; optimizers update f32 parameters",
            param.name,
            param.var.dtype()
        )
    }
    Ok(())
}

/// Elements per parallel work item of an update.
const CHUNK: usize = 1 << 14;

/// Runs `kernel(p, g, buffers)` over matching chunks of a CPU parameter, its
/// gradient and its state buffers, in parallel, writing the parameter in place
/// (parameters elsewhere take [`StateStore::update`]'s tensor path).
fn fused_update<K>(param: &Param, grad: &Tensor, buffers: &mut [Vec<f32>], kernel: K) -> Result<()>
where
    K: Fn(&mut [f32], &[f32], &mut [&mut [f32]]) + Sync,
{
    with_f32_slice(grad, |g| {
        let run = |p: &mut [f32]| {
            let mut bufs: Vec<std::slice::ChunksMut<'_, f32>> =
                buffers.iter_mut().map(|b| b.chunks_mut(CHUNK)).collect();
            let work: Vec<_> = p
                .chunks_mut(CHUNK)
                .zip(g.chunks(CHUNK))
                .map(|(pc, gc)| {
                    let bc: Vec<&mut [f32]> = bufs
                        .iter_mut()
                        .map(|it| it.next().expect("buffer length"))
                        .collect();
                    (pc, gc, bc)
                })
                .collect();
            work.into_par_iter()
                .for_each(|(pc, gc, mut bc)| kernel(pc, gc, &mut bc));
        };
        update_var_in_place(&param.var, run)
    })?
}

/// Calls `f` with the f32 values of `t`, borrowed when `t` is a contiguous CPU
/// f32 tensor, copied otherwise.
pub(crate) fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<f32>()?[a..b]));
        }
    }
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(f(&v))
}

/// Runs `f` over the values of the CPU variable `var`, writing them back into
/// its own storage (through a copy when it is not contiguous).
fn update_var_in_place(var: &Var, f: impl FnOnce(&mut [f32])) -> Result<()> {
    struct InPlace<F>(RefCell<Option<F>>);
    impl<F: FnOnce(&mut [f32])> InplaceOp1 for InPlace<F> {
        fn name(&self) -> &'static str {
            "optimizer-update"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            let CpuStorage::F32(data) = storage else {
                candle_core::bail!("optimizer update: parameter is not f32")
            };
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("optimizer update: parameter is not contiguous")
            };
            if let Some(f) = self.0.borrow_mut().take() {
                f(&mut data[a..b]);
            }
            Ok(())
        }
    }
    if var.is_contiguous() {
        var.inplace_op1(&InPlace(RefCell::new(Some(f))))?;
    } else {
        let mut values = var.flatten_all()?.to_vec1::<f32>()?;
        f(&mut values);
        var.set(&Tensor::from_vec(
            values,
            var.shape().clone(),
            &Device::Cpu,
        )?)?;
    }
    Ok(())
}

/// Reads a non-negative integer counter from saved scalars.
pub(crate) fn scalar_u64(scalars: &Value, key: &str) -> Result<u64> {
    scalars
        .get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("optimizer state lacks the counter `{key}`"))
}

/// Fails when saved scalars name another optimizer.
pub(crate) fn check_saved_name(scalars: &Value, expected: &str) -> Result<()> {
    match scalars.get("optimizer").and_then(Value::as_str) {
        Some(name) if name == expected => Ok(()),
        Some(name) => {
            bail!("optimizer state was saved by `{name}`, cannot load it into `{expected}`")
        }
        None => bail!("optimizer state does not name its optimizer"),
    }
}

/// The gradient of `param` in `grads`, if any.
pub(crate) fn grad_of<'a>(param: &Param, grads: &'a GradStore) -> Option<&'a Tensor> {
    grads.get(param.var.as_tensor())
}

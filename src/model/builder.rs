//! Creating the model's parameters: freshly initialised, or taken by name from
//! a checkpoint's tensors, with every missing, unexpected or mis-shaped tensor
//! collected into one error.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a parameter is initialised when no checkpoint provides it.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for linear and
    /// convolution weights and biases.
    FanIn(usize),
    /// Every element equal to this value.
    Const(f32),
    /// N(0, 1).
    Normal,
}

enum Source {
    Init(Box<RefCell<ChaCha8Rng>>),
    Tensors(HashMap<String, Tensor>),
}

/// Hands out parameters and buffers by their reference state-dict names.
pub struct Builder {
    source: Source,
    device: Device,
    params: RefCell<BTreeMap<String, Var>>,
    used: RefCell<BTreeSet<String>>,
    problems: RefCell<Vec<String>>,
}

impl Builder {
    /// Parameters drawn from a seeded generator.
    pub fn init(seed: u64, device: &Device) -> Self {
        Builder::new(
            Source::Init(Box::new(RefCell::new(ChaCha8Rng::seed_from_u64(seed)))),
            device,
        )
    }

    /// Parameters taken from named tensors (a reference state dict).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Self {
        Builder::new(Source::Tensors(tensors), device)
    }

    fn new(source: Source, device: &Device) -> Self {
        Builder {
            source,
            device: device.clone(),
            params: RefCell::new(BTreeMap::new()),
            used: RefCell::new(BTreeSet::new()),
            problems: RefCell::new(Vec::new()),
        }
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A trainable parameter of `shape` named `name`.
    pub fn param(&self, name: &str, shape: &[usize], init: Init) -> Var {
        let t = self.tensor(name, shape, init);
        let var = Var::from_tensor(&t).expect("f32 tensor to var");
        self.params
            .borrow_mut()
            .insert(name.to_string(), var.clone());
        var
    }

    /// A buffer (not trained) of `shape` as f32 values.
    pub fn buffer(&self, name: &str, shape: &[usize], init: Init) -> Vec<f32> {
        let t = self.tensor(name, shape, init);
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default()
    }

    /// An integer scalar buffer (e.g. `num_batches_tracked`).
    pub fn int_buffer(&self, name: &str, default: i64) -> i64 {
        match &self.source {
            Source::Init(_) => default,
            Source::Tensors(map) => {
                self.used.borrow_mut().insert(name.to_string());
                match map.get(name) {
                    None => {
                        self.problems
                            .borrow_mut()
                            .push(format!("missing tensor `{name}`"));
                        default
                    }
                    Some(t) => t
                        .to_dtype(DType::I64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<i64>())
                        .ok()
                        .and_then(|v| v.first().copied())
                        .unwrap_or(default),
                }
            }
        }
    }

    fn tensor(&self, name: &str, shape: &[usize], init: Init) -> Tensor {
        let n: usize = shape.iter().product();
        match &self.source {
            Source::Init(rng) => {
                let mut rng = rng.borrow_mut();
                let data: Vec<f32> = match init {
                    Init::FanIn(fan_in) => {
                        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                        (0..n)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect()
                    }
                    Init::Const(v) => vec![v; n],
                    Init::Normal => (0..n).map(|_| standard_normal(&mut rng)).collect(),
                };
                Tensor::from_vec(data, shape, &self.device).expect("shape matches data")
            }
            Source::Tensors(map) => {
                self.used.borrow_mut().insert(name.to_string());
                let fallback = || Tensor::zeros(shape, DType::F32, &self.device).expect("zeros");
                match map.get(name) {
                    None => {
                        self.problems.borrow_mut().push(format!(
                            "missing tensor `{name}` (expected shape {shape:?})"
                        ));
                        fallback()
                    }
                    Some(t) if t.dims() != shape => {
                        self.problems.borrow_mut().push(format!(
                            "tensor `{name}` has shape {:?}, the model expects {shape:?}",
                            t.dims()
                        ));
                        fallback()
                    }
                    Some(t) => t
                        .to_dtype(DType::F32)
                        .and_then(|t| t.to_device(&self.device))
                        .unwrap_or_else(|_| fallback()),
                }
            }
        }
    }

    /// Whether the source has a tensor of this name (always false when initialising).
    pub fn has(&self, name: &str) -> bool {
        matches!(&self.source, Source::Tensors(map) if map.contains_key(name))
    }

    /// Marks a tensor of the source as understood without creating anything.
    pub fn accept(&self, name: &str) {
        self.used.borrow_mut().insert(name.to_string());
    }

    /// Finishes building: the named trainable parameters, or one error that
    /// lists every missing, unexpected and mis-shaped tensor.
    pub fn finish(self) -> anyhow::Result<BTreeMap<String, Var>> {
        let mut problems = self.problems.into_inner();
        if let Source::Tensors(map) = &self.source {
            let used = self.used.borrow();
            let mut unexpected: Vec<&String> = map.keys().filter(|k| !used.contains(*k)).collect();
            unexpected.sort();
            problems.extend(
                unexpected
                    .into_iter()
                    .map(|k| format!("unexpected tensor `{k}` (no such parameter in this model)")),
            );
        }
        if problems.is_empty() {
            Ok(self.params.into_inner())
        } else {
            anyhow::bail!(
                "the checkpoint does not match the model config ({} problem{}):\n  {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("\n  ")
            )
        }
    }
}

/// One N(0, 1) draw (Box-Muller); the rand crate's distributions live in a
/// separate crate we do not otherwise need.
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

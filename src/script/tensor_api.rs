//! The `Tensor` script type: creation, arithmetic operators with tensors,
//! floats and ints, reductions, shapes, activations, and autograd
//! (`backward()` accumulates into the run's gradients, `grad()` reads them).
//!
//! Every operation is differentiable: it is a composition of candle ops that
//! have a backward pass (candle's fused softmax has none, so softmax and
//! log_softmax are composed here).

use candle_core::{DType, Device, Tensor as CTensor, D};
use rhai::plugin::*;
use rhai::{Array, Dynamic};

use super::errors::{script_error, IntoScript, ScriptResult};
use super::session;

/// A tensor in a script: a handle to a candle tensor (cloning is cheap).
#[derive(Clone)]
pub struct Tensor(pub CTensor);

impl Tensor {
    /// The wrapped candle tensor.
    pub fn inner(&self) -> &CTensor {
        &self.0
    }
}

/// A dimension index from a script (negative counts from the end).
pub fn dim_index(t: &CTensor, dim: i64) -> ScriptResult<usize> {
    let rank = t.rank() as i64;
    let d = if dim < 0 { rank + dim } else { dim };
    if d < 0 || d >= rank {
        return Err(script_error(format!(
            "dimension {dim} is out of range for a tensor of rank {rank} (shape {:?})",
            t.dims()
        )));
    }
    Ok(d as usize)
}

/// A shape given as a script array of non-negative ints.
pub fn shape_from(array: &Array) -> ScriptResult<Vec<usize>> {
    counts_from(array, "a shape")
}

/// Non-negative ints from a script array; `what` names it in errors.
pub fn counts_from(array: &Array, what: &str) -> ScriptResult<Vec<usize>> {
    array
        .iter()
        .map(|d| match d.as_int() {
            Ok(v) if v >= 0 => Ok(v as usize),
            _ => Err(script_error(format!(
                "{what} must be an array of non-negative ints, found `{d}` ({})",
                d.type_name()
            ))),
        })
        .collect()
}

/// A number from a script value (int or float).
pub fn number(value: &Dynamic, what: &str) -> ScriptResult<f64> {
    if let Ok(f) = value.as_float() {
        return Ok(f);
    }
    if let Ok(i) = value.as_int() {
        return Ok(i as f64);
    }
    Err(script_error(format!(
        "{what} must be a number, got {} `{value}`",
        value.type_name()
    )))
}

/// Flattens a nested array of numbers, recording its shape.
/// `leaf` is the depth at which numbers were found (all must be there).
fn flatten(
    value: &Dynamic,
    depth: usize,
    shape: &mut Vec<usize>,
    leaf: &mut Option<usize>,
    out: &mut Vec<f32>,
) -> ScriptResult<()> {
    let ragged = || script_error("ragged nested array: numbers and arrays mixed at one depth");
    if let Some(array) = value.read_lock::<Array>() {
        if leaf.is_some_and(|l| depth >= l) {
            return Err(ragged());
        }
        if shape.len() == depth {
            shape.push(array.len());
        } else if shape[depth] != array.len() {
            return Err(script_error(format!(
                "ragged nested array: length {} where {} was expected at depth {depth}",
                array.len(),
                shape[depth]
            )));
        }
        for item in array.iter() {
            flatten(item, depth + 1, shape, leaf, out)?;
        }
        return Ok(());
    }
    match *leaf {
        None => *leaf = Some(depth),
        Some(l) if l != depth => return Err(ragged()),
        Some(_) => {}
    }
    out.push(number(value, "a tensor element")? as f32);
    Ok(())
}

/// Nested script arrays holding `values` of `shape`.
fn nest(values: &[f64], shape: &[usize]) -> Dynamic {
    match shape.split_first() {
        None => Dynamic::from_float(values[0]),
        Some((&n, rest)) => {
            let step: usize = rest.iter().product();
            let items: Array = (0..n)
                .map(|i| {
                    if rest.is_empty() {
                        Dynamic::from_float(values[i])
                    } else {
                        nest(&values[i * step..(i + 1) * step], rest)
                    }
                })
                .collect();
            Dynamic::from_array(items)
        }
    }
}

/// Adds `store`'s gradients into the session's accumulated gradients.
fn accumulate(store: candle_core::backprop::GradStore) -> ScriptResult<()> {
    session::with(|s| {
        let ids: Vec<_> = store.get_ids().copied().collect();
        for id in ids {
            let Some(g) = store.get_id(id).cloned() else {
                continue;
            };
            let sum = match s.grads.get_id(id) {
                Some(old) => (old + &g).script()?,
                None => g,
            };
            s.grads.insert_id(id, sum);
        }
        Ok(())
    })
}

fn wrap(r: candle_core::Result<CTensor>) -> ScriptResult<Tensor> {
    r.script().map(Tensor)
}

fn string_operand() -> ScriptResult<Tensor> {
    Err(script_error(
        "cannot combine a tensor with a string; use `${t}` interpolation to print a tensor",
    ))
}

/// Tensor functions and operators.
#[export_module]
pub mod tensor_module {
    use super::*;

    /// A float tensor from a number or a nested array of numbers.
    #[rhai_fn(return_raw)]
    pub fn tensor(values: Dynamic) -> Result<Tensor, Box<EvalAltResult>> {
        let mut shape = Vec::new();
        let mut data = Vec::new();
        flatten(&values, 0, &mut shape, &mut None, &mut data)?;
        wrap(CTensor::from_vec(data, shape, &Device::Cpu))
    }

    /// A tensor of zeros with the given shape, e.g. `zeros([2, 3])`.
    #[rhai_fn(return_raw)]
    pub fn zeros(shape: Array) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(CTensor::zeros(
            shape_from(&shape)?,
            DType::F32,
            &Device::Cpu,
        ))
    }

    /// A tensor of ones with the given shape.
    #[rhai_fn(return_raw)]
    pub fn ones(shape: Array) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(CTensor::ones(shape_from(&shape)?, DType::F32, &Device::Cpu))
    }

    /// `[0, 1, ..., n-1]` as floats.
    #[rhai_fn(return_raw)]
    pub fn arange(n: i64) -> Result<Tensor, Box<EvalAltResult>> {
        if n < 0 {
            return Err(script_error(format!("arange({n}): n must be >= 0")));
        }
        wrap(CTensor::arange(0f32, n as f32, &Device::Cpu))
    }

    /// Standard-normal samples with the given shape, from the run's seeded
    /// `script` random stream (reproducible, saved in checkpoints).
    #[rhai_fn(return_raw)]
    pub fn randn(shape: Array) -> Result<Tensor, Box<EvalAltResult>> {
        let shape = shape_from(&shape)?;
        let n: usize = shape.iter().product();
        let data = session::with(|s| {
            s.since_step = true;
            Ok(s.rng.stream("script").normal_vec(n, 0.0, 1.0))
        })?;
        wrap(CTensor::from_vec(data, shape, &Device::Cpu))
    }

    /// Concatenates an array of tensors along `dim`.
    #[rhai_fn(return_raw)]
    pub fn cat(tensors: Array, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let ts: Vec<CTensor> = tensors
            .into_iter()
            .map(|t| {
                t.try_cast::<Tensor>()
                    .map(|t| t.0)
                    .ok_or_else(|| script_error("cat() takes an array of tensors"))
            })
            .collect::<ScriptResult<_>>()?;
        let first = ts
            .first()
            .ok_or_else(|| script_error("cat() of an empty array"))?;
        let d = dim_index(first, dim)?;
        wrap(CTensor::cat(&ts, d))
    }

    /// The shape as an array of ints.
    #[rhai_fn(get = "shape", pure)]
    pub fn shape(t: &mut Tensor) -> Array {
        t.0.dims()
            .iter()
            .map(|&d| Dynamic::from_int(d as i64))
            .collect()
    }

    /// The number of dimensions.
    #[rhai_fn(get = "rank", pure)]
    pub fn rank(t: &mut Tensor) -> i64 {
        t.0.rank() as i64
    }

    /// The number of elements.
    #[rhai_fn(get = "numel", pure)]
    pub fn numel(t: &mut Tensor) -> i64 {
        t.0.elem_count() as i64
    }

    /// The value of a one-element tensor as a float. In a data-parallel run,
    /// for a loss `ctc_loss` returned on a chunk's targets: the sum over every
    /// rank, i.e. the whole chunk's loss (every rank must ask for it).
    #[rhai_fn(pure, return_raw)]
    pub fn item(t: &mut Tensor) -> Result<f64, Box<EvalAltResult>> {
        if t.0.elem_count() != 1 {
            return Err(script_error(format!(
                "item() needs a tensor with one element, this one has shape {:?}",
                t.0.dims()
            )));
        }
        let v = t.0.flatten_all().script()?.to_dtype(DType::F64).script()?;
        let v = v.to_vec1::<f64>().script()?[0];
        match (session::remembered_loss(t.0.id()), session::comm()) {
            (Some(counts), Some(comm)) => {
                let mut total = [if counts { v } else { 0.0 }];
                comm.all_reduce_sum_f64(&mut total)
                    .map_err(|e| script_error(format!("item(): {e:#}")))?;
                Ok(total[0])
            }
            _ => Ok(v),
        }
    }

    /// The values as (nested) arrays of floats; for logging and small data.
    #[rhai_fn(pure, return_raw)]
    pub fn to_array(t: &mut Tensor) -> Result<Dynamic, Box<EvalAltResult>> {
        let values = t.0.flatten_all().script()?.to_dtype(DType::F64).script()?;
        Ok(nest(&values.to_vec1::<f64>().script()?, t.0.dims()))
    }

    /// `t[i]`: the i-th slice along the first dimension (negative counts from the end).
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn index(t: &mut Tensor, i: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let n = t.0.dims().first().copied().unwrap_or(0) as i64;
        let j = if i < 0 { n + i } else { i };
        if j < 0 || j >= n {
            return Err(script_error(format!(
                "index {i} is out of range for a first dimension of size {n}"
            )));
        }
        wrap(t.0.get(j as usize))
    }

    /// `len` elements along `dim` starting at `start`.
    #[rhai_fn(pure, return_raw)]
    pub fn narrow(
        t: &mut Tensor,
        dim: i64,
        start: i64,
        len: i64,
    ) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        if start < 0 || len < 0 {
            return Err(script_error("narrow(): start and len must be >= 0"));
        }
        wrap(t.0.narrow(d, start as usize, len as usize))
    }

    /// The same values with a new shape (one entry may be -1).
    #[rhai_fn(pure, return_raw)]
    pub fn reshape(t: &mut Tensor, shape: Array) -> Result<Tensor, Box<EvalAltResult>> {
        let n = t.0.elem_count();
        let mut dims = Vec::with_capacity(shape.len());
        let mut infer = None;
        for (i, d) in shape.iter().enumerate() {
            match d.as_int() {
                Ok(-1) if infer.is_none() => {
                    infer = Some(i);
                    dims.push(1);
                }
                Ok(v) if v >= 0 => dims.push(v as usize),
                _ => return Err(script_error(format!("reshape(): bad dimension `{d}`"))),
            }
        }
        if let Some(i) = infer {
            let known: usize = dims.iter().product();
            if known == 0 || !n.is_multiple_of(known) {
                return Err(script_error(format!(
                    "reshape(): cannot infer a dimension for {n} elements into {shape:?}"
                )));
            }
            dims[i] = n / known;
        }
        wrap(t.0.reshape(dims))
    }

    /// Swaps two dimensions.
    #[rhai_fn(pure, return_raw)]
    pub fn transpose(t: &mut Tensor, a: i64, b: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let (a, b) = (dim_index(&t.0, a)?, dim_index(&t.0, b)?);
        wrap(t.0.transpose(a, b))
    }

    /// Inserts a dimension of size 1 at `dim`.
    #[rhai_fn(pure, return_raw)]
    pub fn unsqueeze(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let rank = t.0.rank() as i64 + 1;
        let d = if dim < 0 { rank + dim } else { dim };
        if d < 0 || d >= rank {
            return Err(script_error(format!("unsqueeze({dim}) out of range")));
        }
        wrap(t.0.unsqueeze(d as usize))
    }

    /// Removes a dimension of size 1 at `dim`.
    #[rhai_fn(pure, return_raw)]
    pub fn squeeze(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(t.0.squeeze(d))
    }

    /// Matrix product (batched over leading dimensions).
    #[rhai_fn(pure, return_raw)]
    pub fn matmul(a: &mut Tensor, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0.broadcast_matmul(&b.0))
    }

    /// Sum of all elements.
    #[rhai_fn(name = "sum", pure, return_raw)]
    pub fn sum_all(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.sum_all())
    }

    /// Sum along `dim` (the dimension is removed).
    #[rhai_fn(name = "sum", pure, return_raw)]
    pub fn sum_dim(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(t.0.sum(d))
    }

    /// Mean of all elements.
    #[rhai_fn(name = "mean", pure, return_raw)]
    pub fn mean_all(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.mean_all())
    }

    /// Mean along `dim` (the dimension is removed).
    #[rhai_fn(name = "mean", pure, return_raw)]
    pub fn mean_dim(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(t.0.mean(d))
    }

    /// Maximum along `dim` (the dimension is removed).
    #[rhai_fn(name = "max", pure, return_raw)]
    pub fn max_dim(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(t.0.max(d))
    }

    /// Minimum along `dim` (the dimension is removed).
    #[rhai_fn(name = "min", pure, return_raw)]
    pub fn min_dim(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(t.0.min(d))
    }

    /// Index of the maximum along `dim`, as floats.
    #[rhai_fn(pure, return_raw)]
    pub fn argmax(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(t.0.argmax(d).and_then(|i| i.to_dtype(DType::F32)))
    }

    /// Softmax along `dim`.
    #[rhai_fn(pure, return_raw)]
    pub fn softmax(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(candle_nn::ops::softmax(&t.0, d))
    }

    /// Log-softmax along `dim`.
    #[rhai_fn(pure, return_raw)]
    pub fn log_softmax(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        wrap(candle_nn::ops::log_softmax(&t.0, d))
    }

    /// Element-wise exponential.
    #[rhai_fn(pure, return_raw)]
    pub fn exp(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.exp())
    }

    /// Element-wise natural logarithm.
    #[rhai_fn(pure, return_raw)]
    pub fn log(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.log())
    }

    /// Element-wise square root.
    #[rhai_fn(pure, return_raw)]
    pub fn sqrt(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.sqrt())
    }

    /// Element-wise square.
    #[rhai_fn(pure, return_raw)]
    pub fn square(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.sqr())
    }

    /// Element-wise absolute value.
    #[rhai_fn(pure, return_raw)]
    pub fn abs(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.abs())
    }

    /// Element-wise power with a float exponent.
    #[rhai_fn(pure, return_raw)]
    pub fn pow(t: &mut Tensor, e: f64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.powf(e))
    }

    /// Element-wise `max(x, 0)`.
    #[rhai_fn(pure, return_raw)]
    pub fn relu(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.relu())
    }

    /// Element-wise logistic sigmoid.
    #[rhai_fn(pure, return_raw)]
    pub fn sigmoid(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        // 1 / (1 + exp(-x)), composed so it has a backward.
        wrap(
            t.0.neg()
                .and_then(|x| x.exp())
                .and_then(|e| (e + 1.0)?.recip()),
        )
    }

    /// Element-wise hyperbolic tangent.
    #[rhai_fn(pure, return_raw)]
    pub fn tanh(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.tanh())
    }

    /// The values clamped to `[lo, hi]`.
    #[rhai_fn(pure, return_raw)]
    pub fn clamp(t: &mut Tensor, lo: f64, hi: f64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(t.0.clamp(lo as f32, hi as f32))
    }

    /// A copy cut from the autograd graph.
    #[rhai_fn(pure)]
    pub fn detach(t: &mut Tensor) -> Tensor {
        Tensor(t.0.detach())
    }

    /// Backpropagates from this one-element tensor and adds the gradients of
    /// every parameter it depends on to the run's gradients (they accumulate
    /// until the optimizer steps or `zero_grad()` is called). In a
    /// data-parallel run, a stand-in chunk's backward adds nothing.
    #[rhai_fn(pure, return_raw)]
    pub fn backward(t: &mut Tensor) -> Result<(), Box<EvalAltResult>> {
        if t.0.elem_count() != 1 {
            return Err(script_error(format!(
                "backward() needs a one-element loss, this tensor has shape {:?}",
                t.0.dims()
            )));
        }
        let (summed, contributes) = session::with(|s| {
            Ok(s.rank
                .as_ref()
                .map_or((false, true), |r| (r.grads_reduced, r.contributes.get())))
        })?;
        if summed {
            return Err(script_error(
                "backward() after clip_grad_norm() or grads_finite() of the same step: in a \
                 data-parallel run the gradients are summed over the ranks there, so every \
                 backward() of a step must come before them",
            ));
        }
        let store = t.0.backward().script()?;
        if !contributes {
            // The pass still ran, so the ranks exchanged its BatchRenorm
            // statistics; its gradients are not this rank's to add.
            return Ok(());
        }
        accumulate(store)
    }

    /// The accumulated gradient of this tensor (a model parameter, say), or
    /// `()` when none reached it.
    #[rhai_fn(pure, return_raw)]
    pub fn grad(t: &mut Tensor) -> Result<Dynamic, Box<EvalAltResult>> {
        session::with(|s| {
            Ok(s.grads
                .get(&t.0)
                .map_or(Dynamic::UNIT, |g| Dynamic::from(Tensor(g.clone()))))
        })
    }

    /// Prints as `Tensor[2, 3]`.
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(t: &mut Tensor) -> String {
        format!("Tensor{:?}", t.0.dims())
    }

    /// Element-wise sum (broadcasting).
    #[rhai_fn(name = "+", return_raw)]
    pub fn add(a: Tensor, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0.broadcast_add(&b.0))
    }
    /// Adds a float to every element.
    #[rhai_fn(name = "+", return_raw)]
    pub fn add_f(a: Tensor, b: f64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 + b)
    }
    /// Adds an int to every element.
    #[rhai_fn(name = "+", return_raw)]
    pub fn add_i(a: Tensor, b: i64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 + b as f64)
    }
    /// Adds a tensor to a float.
    #[rhai_fn(name = "+", return_raw)]
    pub fn f_add(a: f64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0 + a)
    }
    /// Adds a tensor to an int.
    #[rhai_fn(name = "+", return_raw)]
    pub fn i_add(a: i64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0 + a as f64)
    }
    /// An error: tensors do not combine with strings.
    #[rhai_fn(name = "+", return_raw)]
    pub fn add_str(_a: Tensor, _b: ImmutableString) -> Result<Tensor, Box<EvalAltResult>> {
        string_operand()
    }
    /// An error: tensors do not combine with strings.
    #[rhai_fn(name = "+", return_raw)]
    pub fn str_add(_a: ImmutableString, _b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        string_operand()
    }

    /// Element-wise difference (broadcasting).
    #[rhai_fn(name = "-", return_raw)]
    pub fn sub(a: Tensor, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0.broadcast_sub(&b.0))
    }
    /// Subtracts a float from every element.
    #[rhai_fn(name = "-", return_raw)]
    pub fn sub_f(a: Tensor, b: f64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 - b)
    }
    /// Subtracts an int from every element.
    #[rhai_fn(name = "-", return_raw)]
    pub fn sub_i(a: Tensor, b: i64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 - b as f64)
    }
    /// A float minus each element.
    #[rhai_fn(name = "-", return_raw)]
    pub fn f_sub(a: f64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0.affine(-1.0, a))
    }
    /// An int minus each element.
    #[rhai_fn(name = "-", return_raw)]
    pub fn i_sub(a: i64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0.affine(-1.0, a as f64))
    }
    /// Negation.
    #[rhai_fn(name = "-", return_raw)]
    pub fn neg(a: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0.neg())
    }

    /// Element-wise product (broadcasting).
    #[rhai_fn(name = "*", return_raw)]
    pub fn mul(a: Tensor, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0.broadcast_mul(&b.0))
    }
    /// Multiplies every element by a float.
    #[rhai_fn(name = "*", return_raw)]
    pub fn mul_f(a: Tensor, b: f64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 * b)
    }
    /// Multiplies every element by an int.
    #[rhai_fn(name = "*", return_raw)]
    pub fn mul_i(a: Tensor, b: i64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 * b as f64)
    }
    /// Multiplies a float by every element.
    #[rhai_fn(name = "*", return_raw)]
    pub fn f_mul(a: f64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0 * a)
    }
    /// Multiplies an int by every element.
    #[rhai_fn(name = "*", return_raw)]
    pub fn i_mul(a: i64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0 * a as f64)
    }

    /// Element-wise quotient (broadcasting).
    #[rhai_fn(name = "/", return_raw)]
    pub fn div(a: Tensor, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0.broadcast_div(&b.0))
    }
    /// Divides every element by a float.
    #[rhai_fn(name = "/", return_raw)]
    pub fn div_f(a: Tensor, b: f64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 / b)
    }
    /// Divides every element by an int.
    #[rhai_fn(name = "/", return_raw)]
    pub fn div_i(a: Tensor, b: i64) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(a.0 / b as f64)
    }
    /// A float divided by each element.
    #[rhai_fn(name = "/", return_raw)]
    pub fn f_div(a: f64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0.recip().and_then(|r| r * a))
    }
    /// An int divided by each element.
    #[rhai_fn(name = "/", return_raw)]
    pub fn i_div(a: i64, b: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(b.0.recip().and_then(|r| r * a as f64))
    }

    /// True when every element is finite.
    #[rhai_fn(pure, return_raw)]
    pub fn is_finite(t: &mut Tensor) -> Result<bool, Box<EvalAltResult>> {
        let v = t.0.flatten_all().script()?.to_dtype(DType::F32).script()?;
        Ok(v.to_vec1::<f32>().script()?.iter().all(|x| x.is_finite()))
    }

    /// `log(sum(exp(t)))` along `dim` (the dimension is removed), computed stably.
    #[rhai_fn(pure, return_raw)]
    pub fn logsumexp(t: &mut Tensor, dim: i64) -> Result<Tensor, Box<EvalAltResult>> {
        let d = dim_index(&t.0, dim)?;
        let max = t.0.max_keepdim(d).script()?.detach();
        let shifted = t.0.broadcast_sub(&max).script()?;
        let lse = shifted
            .exp()
            .and_then(|e| e.sum_keepdim(d))
            .and_then(|s| s.log())
            .and_then(|l| l.broadcast_add(&max))
            .and_then(|l| l.squeeze(d));
        wrap(lse)
    }

    /// Softmax along the last dimension.
    #[rhai_fn(name = "softmax", pure, return_raw)]
    pub fn softmax_last(t: &mut Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        wrap(candle_nn::ops::softmax(&t.0, D::Minus1))
    }
}

//! Adam and AdamW, bias-corrected, without amsgrad: `adam` adds the weight decay
//! to the gradient (coupled L2, as `torch.optim.Adam`), `adamw` shrinks the
//! parameter directly (decoupled, as `torch.optim.AdamW`).

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::{json, Value};

use super::optimizer::{
    check_saved_name, grad_of, scalar_u64, Init, Optimizer, OptimizerConfig, OptimizerKind, Param,
    StateStore,
};

const BUFFERS: &[&str] = &["exp_avg", "exp_avg_sq"];

/// Adam / AdamW. State per parameter: `exp_avg`, `exp_avg_sq` and its own step count.
pub struct Adam {
    cfg: OptimizerConfig,
    steps: u64,
    param_steps: BTreeMap<String, u64>,
    state: StateStore,
}

impl Adam {
    /// A fresh optimizer; `cfg.kind` picks coupled (`Adam`) or decoupled (`AdamW`) decay.
    pub fn new(cfg: OptimizerConfig) -> Self {
        Self {
            cfg,
            steps: 0,
            param_steps: BTreeMap::new(),
            state: StateStore::default(),
        }
    }

    fn decoupled(&self) -> bool {
        self.cfg.kind == OptimizerKind::AdamW
    }
}

/// Per-step constants of one parameter's update, in f32.
struct Consts {
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `-lr / (1 - beta1^t)`
    neg_step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    /// Coupled L2 factor (0 when off).
    wd_coupled: f32,
    /// `1 - lr · wd` for decoupled decay (1 when off).
    shrink: f32,
}

impl Optimizer for Adam {
    fn name(&self) -> &str {
        self.cfg.kind.as_str()
    }

    fn step(&mut self, params: &[Param], grads: &GradStore, lr: f64) -> Result<()> {
        let (beta1, beta2) = self.cfg.betas;
        let decoupled = self.decoupled();
        for param in params {
            let Some(grad) = grad_of(param, grads) else {
                continue;
            };
            let lr = lr * param.lr_scale;
            let t = self.param_steps.entry(param.name.clone()).or_insert(0);
            *t += 1;
            let t = *t as i32;
            let wd = if param.weight_decay {
                self.cfg.weight_decay
            } else {
                0.0
            };
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2 = 1.0 - beta2.powi(t);
            let c = Consts {
                one_minus_beta1: (1.0 - beta1) as f32,
                beta2: beta2 as f32,
                one_minus_beta2: (1.0 - beta2) as f32,
                neg_step_size: (-(lr / bias_correction1)) as f32,
                bias_correction2_sqrt: bias_correction2.sqrt() as f32,
                eps: self.cfg.eps as f32,
                wd_coupled: if decoupled { 0.0 } else { wd as f32 },
                shrink: if decoupled {
                    (1.0 - lr * wd) as f32
                } else {
                    1.0
                },
            };
            self.state.update(
                self.cfg.update,
                param,
                grad,
                &[Init::Zeros, Init::Zeros],
                |p, g, bufs| adam_kernel(&c, p, g, bufs),
                |p, g, bufs| adam_tensors(&c, p, g, bufs),
            )?;
        }
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn state_buffers(&self) -> usize {
        BUFFERS.len()
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.state.to_tensors(BUFFERS)
    }

    fn state_scalars(&self) -> Value {
        json!({
            "optimizer": self.cfg.kind.as_str(),
            "steps": self.steps,
            "param_steps": self.param_steps,
            "lr": self.cfg.lr,
            "betas": [self.cfg.betas.0, self.cfg.betas.1],
            "eps": self.cfg.eps,
            "weight_decay": self.cfg.weight_decay,
        })
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>, scalars: &Value) -> Result<()> {
        check_saved_name(scalars, self.cfg.kind.as_str())?;
        let state = StateStore::from_tensors(tensors, BUFFERS)?;
        let param_steps: BTreeMap<String, u64> = serde_json::from_value(
            scalars
                .get("param_steps")
                .cloned()
                .ok_or_else(|| anyhow!("optimizer state lacks `param_steps`"))?,
        )?;
        self.steps = scalar_u64(scalars, "steps")?;
        self.state = state;
        self.param_steps = param_steps;
        Ok(())
    }
}

/// One Adam update of a chunk: `bufs` = [m, v].
fn adam_kernel(c: &Consts, p: &mut [f32], g: &[f32], bufs: &mut [&mut [f32]]) {
    let (m, v) = bufs.split_at_mut(1);
    let (m, v) = (&mut *m[0], &mut *v[0]);
    for i in 0..p.len() {
        let mut param = p[i];
        if c.shrink != 1.0 {
            param *= c.shrink;
        }
        let grad = if c.wd_coupled != 0.0 {
            g[i] + c.wd_coupled * p[i]
        } else {
            g[i]
        };
        m[i] += c.one_minus_beta1 * (grad - m[i]);
        v[i] = v[i] * c.beta2 + c.one_minus_beta2 * grad * grad;
        let denom = v[i].sqrt() / c.bias_correction2_sqrt + c.eps;
        p[i] = param + c.neg_step_size * m[i] / denom;
    }
}

/// [`adam_kernel`] as tensor ops on the parameter's device: returns the new
/// parameter values and replaces `bufs` = [m, v].
fn adam_tensors(
    c: &Consts,
    p: &Tensor,
    g: &Tensor,
    bufs: &mut [Tensor],
) -> candle_core::Result<Tensor> {
    let param = if c.shrink != 1.0 {
        p.affine(c.shrink as f64, 0.0)?
    } else {
        p.clone()
    };
    let grad = if c.wd_coupled != 0.0 {
        (g + p.affine(c.wd_coupled as f64, 0.0)?)?
    } else {
        g.clone()
    };
    let (m, v) = (&bufs[0], &bufs[1]);
    let m = (m + (&grad - m)?.affine(c.one_minus_beta1 as f64, 0.0)?)?;
    let v =
        (v.affine(c.beta2 as f64, 0.0)? + (grad.affine(c.one_minus_beta2 as f64, 0.0)? * &grad)?)?;
    let bc2 = Tensor::new(c.bias_correction2_sqrt, v.device())?;
    let denom = v.sqrt()?.broadcast_div(&bc2)?.affine(1.0, c.eps as f64)?;
    let new = (param + (m.affine(c.neg_step_size as f64, 0.0)? / denom)?)?;
    bufs[0] = m;
    bufs[1] = v;
    Ok(new)
}

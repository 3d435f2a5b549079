"""PyTorch side of the model benchmark: the same encoder as lcasr's (8x
depthwise-separable subsampling, pre-norm macaron Conformer blocks with rotary
attention, BatchRenorm convolution modules, self-conditioned CTC head), written
for this benchmark, timed on one training step (forward, CTC, backward) and on
long-input inference. Shapes from LCASR_BENCH_B / _T / _RUNS / _INFER_T and the
device from LCASR_BENCH_DEVICE (cpu or cuda:N), like benches/model_step.rs; as
there, LCASR_BENCH_MODEL=reference times the 6-layer d_model 768 (6 x 128-head)
model, LCASR_BENCH_CKPT=n checkpoints every n-th block and
LCASR_BENCH_DTYPE=bf16|f16 runs the forward under autocast.
Weights are randomly initialised (timing only)."""
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

torch.set_num_threads(2)
torch.manual_seed(0)
B = int(os.environ.get("LCASR_BENCH_B", 2))
T = int(os.environ.get("LCASR_BENCH_T", 2048))
RUNS = int(os.environ.get("LCASR_BENCH_RUNS", 3))
INFER_T = int(os.environ.get("LCASR_BENCH_INFER_T", 0))
DEVICE = torch.device(os.environ.get("LCASR_BENCH_DEVICE", "cpu"))


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def peak():
    """Peak host RSS, and on a GPU the peak of PyTorch's allocator."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"peak RSS {rss:.0f} MiB"
    if DEVICE.type == "cuda":
        text += f", peak GPU allocated {torch.cuda.max_memory_allocated(DEVICE) / 2**20:.0f} MiB"
    return text
D, H, DH, C, CLASSES, LAYERS, K = 256, 8, 32, 256, 4096, 6, 9
if os.environ.get("LCASR_BENCH_MODEL") == "reference":
    D, H, DH = 768, 6, 128
CKPT = int(os.environ.get("LCASR_BENCH_CKPT", 0))
AUTOCAST = {"bf16": torch.bfloat16, "f16": torch.float16}.get(os.environ.get("LCASR_BENCH_DTYPE", ""))


class Subsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, C, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(C, C, 3, 2, 1, groups=C), nn.Conv2d(C, C, 1), nn.SiLU(),
            nn.Conv2d(C, C, 3, 2, 1, groups=C), nn.Conv2d(C, C, 1), nn.SiLU(),
        )
        self.out = nn.Linear(C * 10, D, bias=False)

    def forward(self, x):  # (B, T, F)
        h = self.conv(x.unsqueeze(1))
        b, c, t, f = h.shape
        return self.out(h.transpose(1, 2).reshape(b, t, c * f))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * H * DH, bias=False)
        self.out = nn.Linear(H * DH, D, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, H, DH, 3).permute(4, 0, 2, 1, 3)
        # v must be contiguous in its last dimension, or PyTorch silently
        # falls back to dense math attention.
        q, k, v = rotate(qkv[0], cos, sin), rotate(qkv[1], cos, sin), qkv[2].contiguous()
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, H * DH))


class BatchRenorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_std", torch.ones(c))

    def forward(self, x):  # (B, C, N)
        if self.training:
            mean = x.mean((0, 2))
            std = x.var((0, 2), unbiased=False).sqrt() + 1e-3
            r = (std.detach() / self.running_std).clamp(1 / 3, 3)
            d = ((mean.detach() - self.running_mean) / self.running_std).clamp(-5, 5)
            y = (x - mean[:, None]) / std[:, None] * r[:, None] + d[:, None]
            with torch.no_grad():
                self.running_mean += 0.01 * (mean - self.running_mean)
                self.running_std += 0.01 * (std - self.running_std)
        else:
            y = (x - self.running_mean[:, None]) / self.running_std[:, None]
        return y * self.weight[:, None] + self.bias[:, None]


class ConvModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv1d(D, 2 * D, 1)
        self.dw = nn.Conv1d(D, D, K, padding=K // 2, groups=D)
        self.bn = BatchRenorm(D)
        self.pw2 = nn.Conv1d(D, D, 1)

    def forward(self, x):
        h = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        return self.pw2(F.silu(self.bn(self.dw(h)))).transpose(1, 2)


def ff():
    return nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.GELU(approximate="tanh"),
                         nn.Linear(4 * D, D, bias=False))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_ff1, self.ff1 = nn.LayerNorm(D), ff()
        self.n_att, self.att = nn.LayerNorm(D), Attention()
        self.n_conv, self.conv = nn.LayerNorm(D), ConvModule()
        self.n_ff2, self.ff2 = nn.LayerNorm(D), ff()
        self.norm_out = nn.LayerNorm(D)

    def forward(self, x, cos, sin):
        x = x + 0.5 * self.ff1(self.n_ff1(x))
        x = x + self.att(self.n_att(x), cos, sin)
        x = x + self.conv(self.n_conv(x))
        x = x + 0.5 * self.ff2(self.n_ff2(x))
        return self.norm_out(x)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = Subsampling()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm, self.head, self.reproj = nn.LayerNorm(D), nn.Linear(D, CLASSES), nn.Linear(CLASSES, D)
        inv = 1.0 / (1.5e6 ** (torch.arange(0, DH, 2).float() / DH))
        self.register_buffer("inv_freq", inv)

    def forward(self, feats):  # (B, F, T)
        x = self.sub(feats.transpose(1, 2))
        n = x.shape[1]
        ang = torch.arange(n, device=feats.device).float()[:, None] * self.inv_freq[None]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos(), ang.sin()
        for i, layer in enumerate(self.layers):
            if self.training and CKPT and i % CKPT == 0:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
            if i < LAYERS - 1:
                x = x + self.reproj(self.head(self.norm(x)).softmax(-1))
        return self.head(self.norm(self.norm(x))).log_softmax(-1)


def feats(b, t):
    i = torch.arange(b * 80 * t, dtype=torch.int64)
    return (((i * 2654435761) % 2001).float() / 1000.0 - 1.0).view(b, 80, t)


model = Encoder().to(DEVICE)
x = feats(B, T).to(DEVICE)
n = (T + 7) // 8
targets = torch.tensor([[(i * 977 + j * 131) % 4094 for j in range(n // 4)] for i in range(B)],
                       device=DEVICE)
times = []
for _ in range(RUNS):
    t0 = time.perf_counter()
    with torch.autocast(DEVICE.type, dtype=AUTOCAST or torch.float32, enabled=AUTOCAST is not None):
        lp = model(x).float()
    loss = F.ctc_loss(lp.transpose(0, 1), targets, torch.full((B,), n), torch.full((B,), n // 4),
                      blank=CLASSES - 1, reduction="sum")
    loss.backward()
    sync()
    model.zero_grad(set_to_none=True)
    times.append((time.perf_counter() - t0) * 1e3)
times.sort()
print(f"torch ({DEVICE}, d{D}{' ' + str(AUTOCAST) if AUTOCAST else ''}): train step B {B} x T {T}: best {times[0]:.0f} ms, "
      f"median {times[len(times) // 2]:.0f} ms, {peak()}")
if INFER_T:
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(feats(1, INFER_T).to(DEVICE))
        sync()
        dt = time.perf_counter() - t0
    print(f"torch ({DEVICE}): inference T {INFER_T} ({out.shape[1]} encoder frames): {dt:.1f} s, {peak()}")

"""PyTorch side of the CTC benchmark: log_softmax + ctc_loss forward and
backward at B 8, T 2048, C 4096, 400 labels, 2 threads (see ctc_vs_torch.sh)."""
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)
B, T, C, U = 8, 2048, 4096, 400
x = (torch.rand(T, B, C) * 4 - 2).requires_grad_()
targets = torch.randint(0, C - 1, (B, U))
input_lengths = torch.tensor([T - 16 * i for i in range(B)])
target_lengths = torch.full((B,), U)
best_fwd, best_total = float("inf"), float("inf")
for run in range(3):
    t0 = time.perf_counter()
    lp = torch.log_softmax(x, -1)
    loss = torch.nn.functional.ctc_loss(
        lp, targets, input_lengths, target_lengths, blank=C - 1, reduction="none"
    )
    t1 = time.perf_counter()
    loss.sum().backward()
    t2 = time.perf_counter()
    x.grad = None
    best_fwd, best_total = min(best_fwd, t1 - t0), min(best_total, t2 - t0)
print(f"torch: forward {1e3 * best_fwd:.0f} ms, forward+backward {1e3 * best_total:.0f} ms")

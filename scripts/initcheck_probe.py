"""The hoisted chain's weight-gradient GEMMs and their layer-order copies, in plain torch, for
compute-sanitizer's initcheck:

    compute-sanitizer --tool initcheck python scripts/initcheck_probe.py

Same shapes and writes as csrc/chain/hoisted_chain.cpp's backward on the mnist preset (N = 320, s = 160,
w = 8, L = 6: two window groups of three layers) at batch 37, bfloat16: each group's dW_in block
written by a matmul into rows of a group-major buffer, dW_out by one matmul, then copied into
layer order. Each stage prints its name after a synchronize, so a report lands between the names
of the stage that caused it. Reports here mean initcheck does not see those matmuls' writes (the
values are checked against a float32 computation at the end).
"""
from __future__ import annotations

import torch


def main() -> None:
    torch.manual_seed(0)
    batch, n, s, w, layers, m = 37, 320, 160, 8, 6, 10
    hidden = layers * w
    options = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, n, **options)
    grad_z = torch.randn(batch, hidden, **options)  # group-major: layers 0, 2, 4 then 1, 3, 5
    grad_out = torch.randn(batch, m, **options)
    hidden_act = torch.randn(batch, hidden, **options)

    grouped = torch.empty(hidden, s, **options)
    for group in range(2):
        rows = slice(group * 3 * w, (group + 1) * 3 * w)
        torch.mm(grad_z[:, rows].t(), x[:, group * s:(group + 1) * s], out=grouped[rows])
    torch.cuda.synchronize()
    print("stage dW_in matmuls done", flush=True)

    by_layer = torch.empty(layers, w, s, **options)
    blocks = grouped.view(layers, w, s)
    by_layer[0::2].copy_(blocks[0:3])
    by_layer[1::2].copy_(blocks[3:6])
    torch.cuda.synchronize()
    print("stage dW_in copied into layer order", flush=True)

    grad_weight_out = torch.mm(grad_out.t(), hidden_act).view(m, layers, w)
    ordered = torch.empty(m, layers, w, **options)
    ordered[:, 0::2].copy_(grad_weight_out[:, 0:3])
    ordered[:, 1::2].copy_(grad_weight_out[:, 3:6])
    torch.cuda.synchronize()
    print("stage dW_out copied into layer order", flush=True)

    expected = torch.cat([grad_z[:, g * 24:(g + 1) * 24].float().t() @ x[:, g * s:(g + 1) * s].float()
                          for g in range(2)])
    error = (grouped.float() - expected).abs().max().item()
    print(f"dW_in max abs error against float32: {error:.3e}", flush=True)
    if not error < 0.5:
        raise SystemExit("the matmuls' results are wrong")


if __name__ == "__main__":
    main()

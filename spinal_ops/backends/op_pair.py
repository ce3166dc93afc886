"""What the op-pair backends (cpu, cuda, triton) share: the Backend wrapper around a
(forward, backward) op pair (spinal_ops/ops.py has their schemas and fake kernels;
spinal_ops/_extension.py loads the compiled pairs, backends/triton/op_pair.py defines the triton pair).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import SpinalConfig, SpinalParams, TrainingStages
from .base import Backend


def tf32_allowed(dtype: torch.dtype) -> bool:
    """Whether float32 products may use TF32 (``torch.backends.cuda.matmul.allow_tf32``), read once
    per forward and passed to both ops: the CUDA kernels and cuBLAS follow it, the CPU and Triton
    ops compute exact float32 whatever it says (a CPU call does not read the flag: ~5 µs)."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def needs_pre_activation(x: torch.Tensor, params) -> bool:
    """Whether autograd will call the backward: only then does the forward keep Z."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    for p in params:  # a loop, not any(...): a generator costs ~1 µs per call
        if p is not None and p.requires_grad:
            return True
    return False


class OpPairBackend(Backend):
    """A backend whose forward is one call of an op pair's forward op (FORWARD_SCHEMA). A training
    call's dropout goes to the op as its seed and p (``runs_dropout``); the pair's autograd passes
    both to the backward op, which recomputes the masks."""

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool) -> Callable:
        """The forward op (an OpOverload with FORWARD_SCHEMA) that runs this call."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                stages: Optional[TrainingStages] = None) -> torch.Tensor:
        training = needs_pre_activation(x, params)
        op = self.forward_op(config, x, training)
        allow_tf32 = x.is_cuda and tf32_allowed(x.dtype)
        # Every op pair makes its tensor arguments contiguous itself (in C++ for the compiled ones).
        if stages is None:
            out, _ = op(x, *params, config.activation, config.negative_slope, allow_tf32, training)
        else:  # a training call of a backend that runs dropout: the op draws the masks from the seed
            out, _ = op(x, *params, config.activation, config.negative_slope, allow_tf32, training,
                        stages.dropout_seed, config.dropout)
        return out

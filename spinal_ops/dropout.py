"""Dropout masks of the spinal layer from a counter-based generator (contract §1, "Dropout").

A mask element is a pure function of (seed, counter), so every backend computes the same mask
without storing it, and a backward recomputes what its forward used. The generator is
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the one
cuRAND and Triton's ``tl.philox`` implement): key = (seed mod 2^32, seed div 2^32), counter =
(c mod 2^32, c div 2^32, 0, 0), and the first output word r decides: the element is kept iff
r >= floor(p * 2^32), and a kept element is scaled by 1 / (1 - p).

Counters enumerate one row's dropout sites in a fixed order (``SpinalConfig.dropout_sites``):
layer l's input (its s window columns, then for l >= 1 the w columns of h_{l-1}), layer by layer,
then the output projection's input H (L*w columns); row b's site j has counter b * D + j with D
sites per row.

Here the generator is written with int64 tensor ops (every product split so that it stays below
2^63), for any device; the compiled and Triton kernels compute the same words in registers.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl sequence of the key schedule
ROUNDS = 10


def _mulhilo(multiplier: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of multiplier * value for a 32-bit constant and 32-bit values,
    without an intermediate of 2^63 or more."""
    low_product = multiplier * (value & 0xFFFF)  # < 2^48
    high_product = multiplier * (value >> 16)  # < 2^48
    total = low_product + ((high_product & 0xFFFF) << 16)  # < 2^49
    return (high_product >> 16) + (total >> 32), total & MASK32


def philox4x32(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
               c3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words; ``seed`` (int64, broadcastable) is the
    64-bit key."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        high_a, low_a = _mulhilo(_ROUND_A, c0)
        high_b, low_b = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & MASK32, (k1 + _KEY_B) & MASK32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """Kept iff the generator's word is at least this (p of the 2^32 words are dropped)."""
    return int(p * 2**32)


def keep_mask(seed: torch.Tensor, rows: int, first_site: int, width: int, sites_per_row: int, p: float,
              device: torch.device) -> torch.Tensor:
    """Boolean [rows, width] mask of the sites first_site .. first_site + width - 1 of every row."""
    row = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    site = torch.arange(first_site, first_site + width, device=device, dtype=torch.int64)[None, :]
    counter = row * sites_per_row + site
    zero = torch.zeros_like(counter)
    word, _, _, _ = philox4x32(seed.to(device), counter & MASK32, counter >> 32, zero, zero)
    return word >= keep_threshold(p)


def dropped(values: torch.Tensor, seed: torch.Tensor, first_site: int, sites_per_row: int, p: float) -> torch.Tensor:
    """``values`` [rows, width] with the mask of its sites applied and the kept ones scaled by 1/(1-p)."""
    mask = keep_mask(seed, values.shape[0], first_site, values.shape[1], sites_per_row, p, values.device)
    return values * mask.to(values.dtype) * (1.0 / (1.0 - p))


def draw_seed() -> torch.Tensor:
    """A fresh 63-bit seed from torch's default CPU generator (so ``torch.manual_seed`` makes a run
    reproducible), as a 0-dim int64 tensor: no host sync, and traceable by torch.compile."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)

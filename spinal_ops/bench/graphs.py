"""A benchmark step captured once in a CUDA graph and replayed (``spinal-bench --cuda-graphs``).

A replay launches every kernel the step launched at capture with no host work in between (no
Python, no dispatcher, no allocator), so graphed and eager times of one step show how much of
it is host time. The capture follows PyTorch's whole-network recipe: warm-up calls on a side
stream (so that lazily created state, the autograd engine's streams and cuBLAS workspaces exist
before capture), then one captured call whose output tensors each replay overwrites.
"""
from __future__ import annotations

from typing import Callable

import torch

Step = Callable[[], object]
SIDE_STREAM_WARMUP_CALLS = 3


def graphed_step(step: Step, device: torch.device) -> Step:
    """``step`` captured in a CUDA graph on ``device``; calling the result replays the graph and
    returns the captured call's outputs. RuntimeError where the step cannot be captured (a host
    sync, a CPU tensor read back, a dropout layer in training: its seed is drawn on the host)."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(SIDE_STREAM_WARMUP_CALLS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()

    def replay() -> object:
        graph.replay()
        return outputs

    return replay

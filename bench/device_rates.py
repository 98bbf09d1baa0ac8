"""The device's reference rate every benchmark divides by, defined once.

``copy_bandwidth``: device-to-device ``copy_`` bandwidth in bytes/s, counting the read and
the write (DESIGN.md §6: attention kernels and decode steps are reported as bytes moved
over this). Best of ``repeats`` timed copies after a warm-up: CUDA events on a GPU,
``perf_counter`` elsewhere.
"""
from __future__ import annotations

import math
import time

import torch


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of copying an ``nbytes`` bfloat16 tensor on ``device`` (2 x nbytes per copy)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - began
        best = min(best, seconds)
    return 2 * src.numel() * src.element_size() / best  # read + write

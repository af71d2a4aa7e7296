"""What the benchmarks in tools/ share: a timer that gives medians and peak extra memory.

CUDA events on a GPU, wall clock on CPU. Imported by the bench scripts (tools/ is on sys.path when
a script in it runs).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable[[], None], warmup: int, iters: int) -> tuple[float, list]:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(stop))
            else:
                begin = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(samples), samples

    def peak_extra_bytes(self, fn: Callable[[], None]) -> Optional[int]:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

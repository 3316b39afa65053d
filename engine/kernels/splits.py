"""How many programs to split a reduction over, shared by the split-K kernels."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(device: torch.device, programs: int, work: int, min_per_split: int) -> int:
    """Split a reduction of `work` elements only when `programs` alone would leave SMs idle;
    chosen from shapes only (no host sync), 1 off CUDA."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    wanted = -(-2 * sms // programs)
    return max(1, min(wanted, work // min_per_split))

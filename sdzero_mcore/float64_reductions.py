"""Sums of whole tensors accumulated in float64 without a float64 copy of the tensor.

``tensor.double().sum()``, ``tensor.sum(dtype=torch.float64)`` and
``torch.linalg.vector_norm(tensor, dtype=torch.float64)`` all convert the whole tensor first: about
10 GB transient for the gradient of a 151936 x 4096 embedding. These convert one chunk at a time,
so the transient is one float64 chunk (``CHUNK_ELEMENTS`` x 8 bytes, 64 MiB).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23


def _reduce_in_float64_chunks(tensor: torch.Tensor, chunk_elements: int, reduce) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for piece in tensor.detach().reshape(-1).split(chunk_elements):  # views of a contiguous tensor
        # the float64 chunk is a temporary of this expression: freed before the next one exists
        total += reduce(piece.to(torch.float64))
    return total


def float64_sum(tensor: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The sum of ``tensor``'s elements in float64, as a 0-dim tensor on its device (no host sync)."""
    return _reduce_in_float64_chunks(tensor, chunk_elements, torch.sum)


def _dot_with_itself(chunk: torch.Tensor) -> torch.Tensor:
    return torch.dot(chunk, chunk)  # no squared copy of the chunk


def float64_sum_of_squares(tensor: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The sum of the squares of ``tensor``'s elements in float64 (a squared L2 norm), as a 0-dim
    tensor on its device (no host sync)."""
    return _reduce_in_float64_chunks(tensor, chunk_elements, _dot_with_itself)

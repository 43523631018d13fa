"""Fixed-shape tensors in Arrow columns: ``(N, *shape)`` arrays <-> ``FixedSizeList<value>`` columns.

The cache stores every tensor (latents, prompt embeddings, ...) as a flat ``FixedSizeList`` whose
per-row shape is recorded in the manifest. Reading it back is a zero-copy reshape of the child buffer,
which is both faster and more portable (any Arrow reader, any Ray version) than extension types.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch


def to_column(array: np.ndarray | torch.Tensor) -> pa.FixedSizeListArray:
    """``(N, *shape)`` -> ``FixedSizeList<dtype>[prod(shape)]`` of length N."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    width = math.prod(array.shape[1:]) if array.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), width)


def from_column(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Inverse of :func:`to_column`: ``-> (N, *shape)`` (a view of the Arrow buffer when possible)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.offset or column.null_count:
        column = pa.concat_arrays([column])  # normalise slices to their own buffers
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape((len(column), *shape))


def to_tensor(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Like :func:`from_column` but a torch tensor (copied: Arrow buffers are read-only)."""
    return torch.from_numpy(np.array(from_column(column, shape), copy=True))

"""A recorder of the tensor operations a piece of code runs, for tests of what it costs on a GPU: the
operations that compute something (views aside; on a GPU each is a kernel launch, however small) and
those that read a value back to the host (``Tensor.item``, indexing with a 0-d tensor, ``nonzero``,
``repeat_interleave`` without its output size; on a GPU each waits for every kernel before it).
``Tensor.tolist`` does not pass through here."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS_BACK = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


class TensorOperations(TorchDispatchMode):
    """``with TensorOperations() as operations: ...``, then ``operations.count`` and ``operations.read_back``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.read_back: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += not func.is_view and func is not torch.ops.aten._unsafe_view.default
        if func in _READS_BACK or (func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.read_back.append(str(func))
        return func(*args, **kwargs)

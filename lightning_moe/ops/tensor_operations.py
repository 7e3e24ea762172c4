"""What a piece of code costs on a GPU, seen on any device: the tensor operations it runs that
compute something (views aside; on a GPU each is a kernel launch, however small the tensors) and those
that read a value back to the host (``Tensor.item``, indexing with a 0-d tensor, ``nonzero``,
``repeat_interleave`` without its output size, indexing or assigning through a boolean mask,
``masked_select``, ``unique``; on a GPU each waits for every kernel queued before it). ``Tensor.tolist`` does not pass through the recorder; :func:`copies_of` sees ``Tensor.to`` calls
on given tensors (a copy from the host that is not asynchronous waits too). The tests use them to
keep the dispatcher and the replica balancer cheap, and ``benchmarks/replica_balance.py`` to count
launches; ``torch.cuda.set_sync_debug_mode`` is the check on a real GPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Operations whose output size is a value on the device: each reads it back.
_READS_BACK = (
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
)
# Indexing (and assigning) through a boolean mask runs `nonzero` inside the kernel, below this mode.
_INDEXING = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default)


def _reads_back(func, args, kwargs) -> bool:
    if func in _READS_BACK:
        return True
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices)
    return False


class TensorOperations(TorchDispatchMode):
    """``with TensorOperations() as operations: ...``, then ``operations.count`` and ``operations.read_back``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.read_back: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += not func.is_view and func is not torch.ops.aten._unsafe_view.default
        if _reads_back(func, args, kwargs):
            self.read_back.append(str(func))
        return func(*args, **kwargs)


@contextmanager
def copies_of(tensors: list[torch.Tensor]):
    """Records the ``Tensor.to`` calls made on any of ``tensors`` inside it (as their positions in
    the list): on a GPU the copy of a host table to the device waits for the kernels
    queued before it, so a hot path must not make one. (A test on a CPU cannot see the copy itself,
    which is then a no-op; it sees the call.)"""
    watched = {id(tensor): index for index, tensor in enumerate(tensors)}
    calls: list[int] = []
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if id(self) in watched:
            calls.append(watched[id(self)])
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield calls
    finally:
        torch.Tensor.to = original

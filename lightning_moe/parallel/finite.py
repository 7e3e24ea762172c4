"""Stop every rank, together, when a loss or a router's logits stop being finite.

Each rank raises the same error at the same point, after one small all-reduce that every rank
takes part in, so no rank is left waiting in a collective that the others will never reach.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in the loss or in an MoE layer's router logits, seen on some rank."""


def raise_if_nonfinite(flags_C: torch.Tensor, names: Sequence[str], *, step: int) -> None:
    """Raise :class:`NonFiniteError` on every rank when any rank set one of its ``flags_C`` (a collective).

    Args:
        flags_C: this rank's flags, one per checked quantity (non-zero: not finite).
        names: what each flag stands for, e.g. ``"the loss"``, ``"router logits of MoE layer `blocks.1.ffn`"``.
        step: the optimizer step being taken (``trainer.global_step``), for the message.
    """
    flags_C = flags_C.detach().float().reshape(-1)
    if not (dist.is_available() and dist.is_initialized()):
        gathered_WC = flags_C.unsqueeze(0)
    else:
        any_C = flags_C.clone()
        dist.all_reduce(any_C, op=dist.ReduceOp.MAX)
        if not bool(any_C.any()):  # one host read per check, the same answer on every rank
            return
        gathered = [torch.empty_like(flags_C) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flags_C)
        gathered_WC = torch.stack(gathered)
    if not bool(gathered_WC.any()):
        return
    found = []
    for column, name in enumerate(names):
        ranks = gathered_WC[:, column].nonzero().flatten().tolist()
        if ranks:
            found.append(f"{name} on rank(s) {ranks}")
    raise NonFiniteError(
        f"Non-finite values (NaN or Inf) at optimizer step {step}: {'; '.join(found)}. Training stopped on every "
        f"rank. Lower the learning rate, clip gradients (`gradient_clip_val`), check the input data, or use "
        f"`precision='bf16-mixed'` rather than fp16."
    )


def raise_if_nonfinite_in(layers: Sequence[tuple[str, torch.nn.Module]], loss_nonfinite: torch.Tensor, *, step: int) -> None:
    """:func:`raise_if_nonfinite` over a loss flag and each named MoE layer's router flag, which it
    clears (a collective: every rank calls it)."""
    flags_C = torch.stack([loss_nonfinite] + [layer.nonfinite_router_logits for _, layer in layers])
    names = ["the loss"] + [f"the router logits of MoE layer `{name}`" for name, _ in layers]
    for _, layer in layers:
        layer.nonfinite_router_logits.zero_()
    raise_if_nonfinite(flags_C, names, step=step)

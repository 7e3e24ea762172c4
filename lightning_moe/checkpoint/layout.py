"""Where the files of an expert-parallel checkpoint live, and how a save is committed atomically.

A checkpoint directory (Lightning's ``ModelCheckpoint`` names it ``epoch=...-step=....ckpt``) holds
one complete *version* and a pointer to it::

    epoch=1-step=10.ckpt/
        current.json                  {"version": "step00000010-3fa2c1d4"}
        step00000010-3fa2c1d4/
            meta.pt                   rank 0: Lightning's state, dense weights, the manifest
            experts-ep00000.pt        the experts of EP rank 0 (written by its first EDP replica)
            experts-ep00001.pt        ...

A save writes a new version directory next to the current one, checks on every rank that every
file was written, and only then replaces ``current.json`` (a single small write: a rename of a
temporary file locally, one PUT on an object store), then removes the old version. At every moment
the pointer names a complete version, so a save that fails half-way (disk full, a rank killed)
leaves the previous checkpoint loadable. All paths go through fsspec, as Lightning's own
checkpoints do, so ``s3://``, ``gs://`` and ``memory://`` work like local directories.

A save over a *single-file* checkpoint (or a single-file save over a directory) writes the new
checkpoint beside the old one and swaps it in (:func:`swap_in`): the old one is removed only once the
new one is complete and in place.

Directories written before the pointer existed (format 1: ``meta.pt`` and the expert files directly
inside) still load.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

META_FILE = "meta.pt"
POINTER_FILE = "current.json"
MANIFEST_KEY = "lightning_moe"
#: 1: flat directory; 2: versioned directory with a pointer, expert shapes in the manifest.
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked: missing, damaged, or from another model."""


def expert_file_name(ep_rank: int) -> str:
    return f"experts-ep{ep_rank:05d}.pt"


def expert_key(name: str, logical_expert: int) -> str:
    """The key of one logical expert's tensor (and optimizer state) in an expert file."""
    return f"{name}#{logical_expert}"


def join(path: _PATH, *names: str) -> str:
    """``path/name/...`` for a local path or an fsspec URL (``memory://run/last.ckpt``)."""
    return os.path.join(str(path), *names)


def new_version_name(global_step: int) -> str:
    """A version directory name that sorts by step and never collides with an earlier save."""
    return f"step{int(global_step):08d}-{uuid.uuid4().hex[:8]}"


#: The entries a checkpoint directory holds: the pointer (and a staged copy a crash left), version
#: directories, format-1 files.
_OWN_ENTRY = re.compile(
    rf"({re.escape(POINTER_FILE)}(\.[0-9a-f]{{8}}\.tmp)?|{re.escape(META_FILE)}|step\d{{8,}}-[0-9a-f]{{8}}|"
    rf"experts-ep\d{{5,}}\.pt)"
)


def foreign_entries(path: _PATH) -> list[str]:
    """The entries of directory ``path`` that no checkpoint writes (empty for a checkpoint directory,
    a failed save's leftovers, or a path that is not a directory): a save must not replace them."""
    fs = get_filesystem(path)
    if not fs.isdir(str(path)):
        return []
    names = [Path(entry.rstrip("/")).name for entry in fs.ls(str(path), detail=False)]
    return sorted(name for name in names if not _OWN_ENTRY.fullmatch(name))


def committed_directory(path: _PATH) -> str | None:
    """The directory holding the complete files of checkpoint ``path``: its committed version, the
    directory itself for format 1, or ``None`` when ``path`` is not a checkpoint directory (a single
    file, or nothing)."""
    fs = get_filesystem(path)
    if not fs.isdir(str(path)):
        return None
    pointer = join(path, POINTER_FILE)
    if fs.exists(pointer):
        try:
            version = json.loads(fs.cat_file(pointer))["version"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"The pointer {pointer} of checkpoint {path} is damaged ({error}). It should name the complete "
                f"version directory inside {path}; restore it, or load an earlier checkpoint."
            ) from error
        return join(path, version)
    if fs.exists(join(path, META_FILE)):
        return str(path)
    return None


def is_sharded_checkpoint(path: _PATH) -> bool:
    """Whether ``path`` is a checkpoint directory written by :class:`~lightning_moe.MoEStrategy`."""
    return committed_directory(path) is not None


def swap_in(path: _PATH, staged: _PATH) -> None:
    """Put the complete entry ``staged`` (a file or a checkpoint directory) at ``path``, where an entry
    of the other kind may be (a run that switches to or from expert parallelism and saves over the
    same path). Rank 0 only.

    A file cannot turn into a directory in one step, so the old entry is first moved aside and removed
    only once the new one is in place: at every moment the last good checkpoint exists, at ``path``
    or, if the process dies between the two moves, at ``<path>.replaced-<id>`` beside it.
    """
    fs = get_filesystem(path)
    aside = None
    link = is_local_link(path)
    if link or fs.exists(str(path)):
        aside = f"{path}.replaced-{uuid.uuid4().hex[:8]}"
        if link:  # moved as the link itself, never as the checkpoint it points at
            os.rename(str(path), aside)
        else:
            fs.mv(str(path), aside, recursive=True)
    fs.mv(str(staged), str(path), recursive=True)
    if aside is not None:
        if link:
            os.unlink(aside)  # only the link: its target is another checkpoint (a top-k one)
        else:
            fs.rm(aside, recursive=True)


def is_local_link(path: _PATH) -> bool:
    """Whether ``path`` is a symbolic link on the local filesystem: ``ModelCheckpoint(save_last="link")``
    makes ``last.ckpt`` one, to a top-k checkpoint that a save to ``last.ckpt`` must not write into."""
    fs = get_filesystem(path)
    return "file" in _protocols(fs) and os.path.islink(_local_path(path))


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _local_path(path: _PATH) -> str:
    text = str(path)
    return text[len("file://"):] if text.startswith("file://") else text


def staging_path(path: _PATH) -> str:
    """A fresh sibling of ``path`` to write a replacement into before :func:`swap_in`."""
    return f"{path}.saving-{uuid.uuid4().hex[:8]}"


def synchronous(checkpoint_io: Any) -> Any:
    """``checkpoint_io`` for the files of a checkpoint that replaces the previous one only once they
    exist: an ``AsyncCheckpointIO`` (which returns before its file is written) is unwrapped."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    if not isinstance(checkpoint_io, AsyncCheckpointIO):
        return checkpoint_io
    warnings.warn(
        "Checkpoints of sharded experts (and a file that replaces one) are written synchronously, not by "
        "AsyncCheckpointIO: they replace the previous checkpoint only once every file exists."
    )
    return checkpoint_io.checkpoint_io


def save_beside_then_swap(path: _PATH, write: Callable[[str], None]) -> None:
    """Write a checkpoint with ``write(staged_path)`` beside ``path``, then :func:`swap_in` it (rank 0
    only). A write that fails removes its debris and leaves ``path`` as it was."""
    staged = staging_path(path)
    try:
        write(staged)
    except BaseException:
        remove_quietly(staged)
        raise
    swap_in(path, staged)


def commit_version(path: _PATH, version: str) -> None:
    """Point checkpoint ``path`` at its (complete) ``version`` directory, then remove the other entries
    a checkpoint writes (earlier versions, failed saves, format-1 files). Rank 0 only, after every rank
    wrote. Once the pointer is written the save has succeeded: a removal that fails only warns (the
    entry is removed by the next save)."""
    fs = get_filesystem(path)
    pointer = join(path, POINTER_FILE)
    payload = json.dumps({"version": version, "format_version": FORMAT_VERSION}).encode()
    if "file" in _protocols(fs):
        # Written beside the pointer and renamed over it: one rename within the directory, so the
        # pointer always names a complete version. (fsspec's transaction writes its temporary file
        # in $TMPDIR; on another filesystem its move copies into the pointer, truncating it first.)
        staged = f"{_local_path(pointer)}.{uuid.uuid4().hex[:8]}.tmp"
        with open(staged, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staged, _local_path(pointer))
    else:
        # An object store replaces an object whole: a transaction uploads it on commit.
        with fs.transaction:
            with fs.open(pointer, "wb") as file:
                file.write(payload)
    try:
        for entry in fs.ls(str(path), detail=False):
            name = Path(entry.rstrip("/")).name
            if name not in (POINTER_FILE, version) and _OWN_ENTRY.fullmatch(name):
                fs.rm(entry, recursive=True)
    except Exception as error:  # noqa: BLE001 - the new checkpoint is committed; old entries only take space
        warnings.warn(f"Checkpoint {path} is saved, but its earlier entries could not all be removed: {error}")


def remove_quietly(path: _PATH) -> None:
    """Best-effort removal of a failed save's version directory."""
    fs = get_filesystem(path)
    try:
        if fs.exists(str(path)):
            fs.rm(str(path), recursive=True)
    except OSError:
        pass


def remove_if_empty(path: _PATH) -> None:
    """Best-effort removal of directory ``path`` when nothing is in it."""
    fs = get_filesystem(path)
    try:
        if fs.isdir(str(path)) and not fs.ls(str(path), detail=False):
            fs.rm(str(path), recursive=True)
    except OSError:
        pass


def check_manifest_version(manifest: dict[str, Any], path: _PATH) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format_version={version!r}; this lightning_moe reads up to {FORMAT_VERSION}. "
            f"Upgrade lightning_moe to load it."
        )

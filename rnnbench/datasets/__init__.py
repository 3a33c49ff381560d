"""Datasets of Chung et al. 2014, reproduced: the Boulanger-Lewandowski 2012 polyphonic music
corpora (jsb, nottingham, musedata, pianomidi) and the Free Spoken Digit Dataset (fsdd).

    from rnnbench.datasets import load_polyphonic, load_fsdd
    rolls = load_polyphonic("jsb")          # {"train": [(T, 88) uint8, ...], "valid": ..., "test": ...}

Data comes from RNNBENCH_DATA_DIR (an offline mirror) or is downloaded into a verified cache; see
`download`. Names are resolved lazily (PEP 562) so that importing the command line, which mounts
`rnnbench.datasets.cli`, does not import numpy, scipy or pooch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rnnbench.datasets.download import data_root, fetch, verify
    from rnnbench.datasets.readers import Recording, load_fsdd, load_polyphonic, stats
    from rnnbench.datasets.safe_pickle import load_restricted
    from rnnbench.datasets.sources import DATASETS

_EXPORTS = {
    "DATASETS": "sources",
    "data_root": "download",
    "fetch": "download",
    "verify": "download",
    "load_polyphonic": "readers",
    "load_fsdd": "readers",
    "stats": "readers",
    "Recording": "readers",
    "load_restricted": "safe_pickle",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

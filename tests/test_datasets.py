"""rnnbench.datasets against the real files: split sizes, step counts, pickle == mat, FSDD, the
restricted unpickler, and the download path against a real HTTP server on 127.0.0.1.

The data comes from RNNBENCH_DATA_DIR (CI: ../shared/data); tests that need it skip when it is
unset or missing. Download tests unset it and use a cache in tmp_path.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import socket
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rnnbench.datasets import DATASETS, data_root, fetch, load_fsdd, load_polyphonic, load_restricted, stats, verify
from rnnbench.datasets.cli import data_app
from rnnbench.errors import RnnbenchError

PACKAGE = Path(__file__).resolve().parents[1] / "rnnbench" / "datasets"
_env = os.environ.get("RNNBENCH_DATA_DIR", "")
DATA = Path(_env).resolve() if _env else None
FSDD_TOP = "free-spoken-digit-dataset-1.0.10"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The staged data (RNNBENCH_DATA_DIR); skip the test where it is unset or missing."""
    if DATA is None:
        pytest.skip("RNNBENCH_DATA_DIR is not set (CI sets it to ../shared/data)")
    if not (DATA / "polyphonic" / "mat" / "JSB_Chorales.mat").is_file():
        pytest.skip(f"RNNBENCH_DATA_DIR={DATA} does not hold the staged data")
    return DATA


@pytest.fixture
def mirror(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Read from the staged data as an offline mirror (restored after the test)."""
    monkeypatch.setenv("RNNBENCH_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Download mode: no mirror, an empty cache in tmp_path."""
    monkeypatch.delenv("RNNBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("RNNBENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ----------------------------------------------------------------------------- registry


def test_registry_is_pinned_and_complete() -> None:
    assert list(DATASETS) == ["jsb", "nottingham", "musedata", "pianomidi", "fsdd"]
    for spec in DATASETS.values():
        for f in spec.files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
            assert f.url.startswith("https://raw.githubusercontent.com/") and "/master/" not in f.url
    assert DATASETS["jsb"].file("pickle").path == "polyphonic/JSB_Chorales.pickle"


def test_embedded_hashes_match_sha256sums(data_dir: Path) -> None:
    """The constants in sources.py agree with the staged SHA256SUMS (fsdd: via the manifest)."""
    sums = dict(reversed(line.split("  ", 1)) for line in (data_dir / "SHA256SUMS").read_text().splitlines())
    for spec in DATASETS.values():
        for f in spec.files:
            assert sums[f.path] == f.sha256, f.path
    # `grep '/recordings/' SHA256SUMS | sha256sum` (SOURCES.md §2a); the file is sorted by path.
    lines = [line + "\n" for line in (data_dir / "SHA256SUMS").read_text().splitlines() if "/recordings/" in line]
    assert hashlib.sha256("".join(lines).encode()).hexdigest() == DATASETS["fsdd"].archive.manifest_sha256


def test_no_plain_pickle_load_in_package() -> None:
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path


# ----------------------------------------------------------------------------- polyphonic music

# SOURCES.md §1e (sequences and total time steps per split) = the published split sizes.
PUBLISHED = {
    "jsb": ((229, 76, 77), (13_807, 4_602, 4_725)),
    "nottingham": ((694, 173, 170), (176_561, 45_513, 44_463)),
    "musedata": ((524, 135, 124), (245_202, 82_755, 64_339)),
    "pianomidi": ((87, 12, 25), (75_911, 8_540, 19_036)),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_polyphonic_split_sizes_and_steps(mirror: Path, name: str) -> None:
    rolls = load_polyphonic(name)
    assert list(rolls) == ["train", "valid", "test"]
    sequences, steps = PUBLISHED[name]
    assert tuple(len(rolls[s]) for s in rolls) == sequences
    assert tuple(sum(len(r) for r in rolls[s]) for s in rolls) == steps
    for roll in rolls["train"]:
        assert roll.dtype == np.uint8 and roll.shape[1] == 88 and roll.max() <= 1
    assert [row["sequences"] for row in stats(name)] == list(sequences)
    assert [row["time_steps"] for row in stats(name)] == list(steps)


def test_jsb_pickle_gives_the_mat_rolls(mirror: Path) -> None:
    mat, pkl = load_polyphonic("jsb", "mat"), load_polyphonic("jsb", source="pickle")
    for split in ("train", "valid", "test"):
        assert len(mat[split]) == len(pkl[split])
        assert all(np.array_equal(a, b) for a, b in zip(mat[split], pkl[split]))
    # The original has rests (steps with no note): 18 / 29 / 17, all-zero rows (SOURCES.md §1e).
    assert [sum(int((r.sum(1) == 0).sum()) for r in pkl[s]) for s in pkl] == [18, 29, 17]
    # Column j = MIDI 21 + j: JSB's lowest and highest notes are 43 and 96 in train.
    active = np.flatnonzero(np.vstack(mat["train"]).any(0))
    assert (active.min() + 21, active.max() + 21) == (43, 96)


def test_loads_are_memoised_and_read_only(mirror: Path) -> None:
    a, b = load_polyphonic("jsb"), load_polyphonic("jsb")
    assert a is not b and a["train"][0] is b["train"][0]
    with pytest.raises(ValueError):
        a["train"][0][0, 0] = 1


def test_polyphonic_bad_requests(mirror: Path) -> None:
    with pytest.raises(RnnbenchError, match="no 'pickle' file"):
        load_polyphonic("nottingham", source="pickle")
    with pytest.raises(RnnbenchError, match="valid names: jsb, nottingham, musedata, pianomidi, fsdd"):
        load_polyphonic("bach")


# ----------------------------------------------------------------------------- FSDD


def test_fsdd_recordings_and_official_split(mirror: Path) -> None:
    recordings = load_fsdd()
    assert len(recordings) == 3000
    assert {r.rate for r in recordings} == {8000}
    assert all(r.samples.dtype == np.int16 for r in recordings)
    assert sum(len(r.samples) for r in recordings) == 10_498_424  # SOURCES.md §2a
    assert sum(r.split == "test" for r in recordings) == 300
    assert {r.speaker for r in recordings} == {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
    rows = {row["split"]: row for row in stats("fsdd")}
    assert (rows["train"]["sequences"], rows["test"]["sequences"]) == (2700, 300)
    assert rows["train"]["samples"] + rows["test"]["samples"] == 10_498_424


# ----------------------------------------------------------------------------- restricted unpickler


def test_restricted_unpickler_loads_the_real_jsb_pickle(data_dir: Path) -> None:
    data = load_restricted(data_dir / "polyphonic" / "JSB_Chorales.pickle")
    assert {k: len(v) for k, v in data.items()} == {"train": 229, "valid": 76, "test": 77}
    assert isinstance(data["train"][0][0][0], np.integer)


class _RunsCode:
    """Pickles into "call os.system(command)": what a malicious dataset file would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"train": [_RunsCode(f"touch {marker}")]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refused global (posix|nt|os)\.system"):
        load_restricted(evil)
    assert not marker.exists()  # the command never ran

    evil.write_bytes(pickle.dumps(_Evals()))
    with pytest.raises(pickle.UnpicklingError, match=r"refused global builtins\.eval"):
        load_restricted(evil)


# ----------------------------------------------------------------------------- offline mirror


def test_mirror_missing_or_altered_file(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNBENCH_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path.resolve()
    with pytest.raises(RnnbenchError, match="polyphonic/mat/JSB_Chorales.mat is missing from the offline mirror"):
        fetch("jsb")
    with pytest.raises(RnnbenchError, match="never downloaded into"):
        fetch("jsb", base_url="http://127.0.0.1:9")

    target = tmp_path / "polyphonic" / "mat" / "JSB_Chorales.mat"
    target.parent.mkdir(parents=True)
    target.write_bytes(_altered((data_dir / "polyphonic/mat/JSB_Chorales.mat").read_bytes()))
    with pytest.raises(RnnbenchError, match="wrong SHA-256"):
        load_polyphonic("jsb")
    assert [p.split(":")[1].strip() for p in verify(["jsb"])] == ["polyphonic/mat/JSB_Chorales.mat"]
    assert files_under(tmp_path) == [target]  # nothing was downloaded into the mirror


# ----------------------------------------------------------------------------- downloads over HTTP


def _altered(data: bytes) -> bytes:
    return data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]


TRICKLE_INTERVAL_S = 0.2  # /trickle/ sends one byte this often...
TRICKLE_FOR_S = 30.0  # ...for this long, then closes the connection


class _Handler(SimpleHTTPRequestHandler):
    """Static files; under /truncated/ the body stops half-way (Content-Length is the full size);
    under /trickle/ it comes one byte at a time, each well within any per-read timeout."""

    def copyfile(self, source, outputfile) -> None:
        if self.path.startswith("/trickle/"):
            data, stop = source.read(), time.monotonic() + TRICKLE_FOR_S
            try:
                for i in range(len(data)):
                    if time.monotonic() > stop:
                        return
                    outputfile.write(data[i : i + 1])
                    outputfile.flush()
                    time.sleep(TRICKLE_INTERVAL_S)
            except OSError:  # the client went away
                return
        if self.path.startswith("/truncated/"):
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            return  # HTTP/1.0: the connection closes after this response, short of Content-Length
        super().copyfile(source, outputfile)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A threaded http.server on 127.0.0.1 (port 0) serving a temp copy of the JSB files as
    /good/, /truncated/ (short bodies) and /altered/ (one byte flipped). Yields (url, root)."""
    root = tmp_path_factory.mktemp("served")
    for prefix in ("good", "truncated", "altered", "trickle"):
        for f in DATASETS["jsb"].files:
            dst = root / prefix / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = (data_dir / f.path).read_bytes()
            dst.write_bytes(_altered(data) if prefix == "altered" else data)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_good_file(server: tuple[str, Path], cache: Path) -> None:
    url, _ = server
    path = fetch("jsb", base_url=f"{url}/good")
    assert path == cache.resolve() / "polyphonic/mat/JSB_Chorales.mat"
    assert [p.relative_to(cache) for p in files_under(cache)] == [
        Path("polyphonic/JSB_Chorales.pickle"),
        Path("polyphonic/mat/JSB_Chorales.mat"),
    ]
    assert verify() == []
    assert [len(s) for s in load_polyphonic("jsb").values()] == [229, 76, 77]
    # Cached and verified: a later fetch needs no network at all.
    assert fetch("jsb", base_url=f"http://127.0.0.1:{_closed_port()}") == path

    # Damage in the cache is found by verify, and a later fetch replaces the file.
    path.chmod(0o644)
    path.write_bytes(_altered(path.read_bytes()))
    assert len(problems := verify(["jsb"])) == 1 and "JSB_Chorales.mat: wrong SHA-256" in problems[0]
    fetch("jsb", base_url=f"{url}/good")
    assert verify() == []


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("truncated", "download truncated"),
        ("altered", "wrong SHA-256 (expected ac0e6085"),
        ("missing", "HTTP error 404"),
        ("unreachable", "host unreachable"),
    ],
)
def test_download_failures_leave_nothing(server: tuple[str, Path], cache: Path, where: str, problem: str) -> None:
    url, _ = server
    base = f"http://127.0.0.1:{_closed_port()}" if where == "unreachable" else f"{url}/{where}"
    with pytest.raises(RnnbenchError) as info:
        fetch("jsb", base_url=base)
    message = str(info.value)
    assert "\n" not in message
    assert "JSB_Chorales.mat" in message and problem in message, message
    assert files_under(cache) == []  # no partial or unverified file anywhere in the cache
    assert verify() == []
    fetch("jsb", base_url=f"{url}/good")  # and the next good download goes through
    assert verify() == [] and len(files_under(cache)) == 2


def test_download_deadline_against_a_trickling_server(server: tuple[str, Path], cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that keeps every read alive but never finishes: the fetch ends at its overall deadline
    with one line naming the URL and the deadline, and leaves nothing in the cache."""
    url, _ = server
    monkeypatch.setenv("RNNBENCH_DOWNLOAD_DEADLINE", "1.5")
    with pytest.raises(RnnbenchError) as info:
        fetch("jsb", base_url=f"{url}/trickle")
    message = str(info.value)
    assert "\n" not in message
    assert f"{url}/trickle/polyphonic/mat/JSB_Chorales.mat" in message and "deadline of 1.5 s" in message, message
    assert files_under(cache) == []
    with pytest.raises(RnnbenchError, match="deadline of 0.5 s"):  # the argument beats the variable
        fetch("jsb", base_url=f"{url}/trickle", deadline_s=0.5)
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("RNNBENCH_DOWNLOAD_DEADLINE", bad)
        with pytest.raises(RnnbenchError, match="RNNBENCH_DOWNLOAD_DEADLINE"):
            fetch("jsb", base_url=f"{url}/good")
    assert files_under(cache) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_fetch_stopped_mid_download_leaves_no_partial_file(server: tuple[str, Path], cache: Path, signum: int) -> None:
    """`rnnbench data fetch` killed (SIGTERM) or Ctrl-C'd while the bytes trickle in: it exits with
    the signal's status, says so in one line, and leaves no temporary or partial file in the cache."""
    url, _ = server
    env = {k: v for k, v in os.environ.items() if k != "RNNBENCH_DATA_DIR"}
    env["RNNBENCH_CACHE_DIR"] = str(cache)
    proc = subprocess.Popen([sys.executable, "-m", "rnnbench.cli", "data", "fetch", "jsb", "--base-url", f"{url}/trickle"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not files_under(cache) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert files_under(cache), f"the download never started (exit {proc.poll()})"
        time.sleep(3 * TRICKLE_INTERVAL_S)  # some bytes are in the temporary file
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "rnnbench: interrupted", stderr[-2000:]
    assert files_under(cache) == []


# ----------------------------------------------------------------------------- the FSDD archive


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    # compresslevel=1: WAV barely compresses, and level 9 would triple the build time.
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fsdd_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serves GitHub-style tag archives of FSDD under /<case>/speech/fsdd/...tar.gz:
    good (all 3000 wavs + README), cut (the good file cut in half), truncated (the good file, but
    the body stops half-way), partial (2 wavs, one altered), unsafe (a `..` member)."""
    root = tmp_path_factory.mktemp("fsdd-served")
    recordings = data_dir / "speech" / "fsdd" / "recordings"
    wavs = {f"{FSDD_TOP}/recordings/{p.name}": p.read_bytes() for p in sorted(recordings.glob("*.wav"))}
    good = _tar_gz({f"{FSDD_TOP}/README.md": b"# FSDD\n", **wavs})
    first, second = list(wavs)[:2]
    cases = {
        "good": good,
        "cut": good[: len(good) // 2],
        "truncated": good,
        "partial": _tar_gz({first: wavs[first], second: _altered(wavs[second])}),
        "unsafe": _tar_gz({f"{FSDD_TOP}/recordings/../../evil.wav": b"RIFF"}),
    }
    for case, data in cases.items():
        path = root / case / DATASETS["fsdd"].archive.mirror_path
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fsdd_archive_download(fsdd_server: str, cache: Path) -> None:
    directory = fetch("fsdd", base_url=f"{fsdd_server}/good")
    assert directory == cache.resolve() / "speech/fsdd/recordings"
    assert len(files_under(cache)) == 3000  # only the wavs: no README, no archive left over
    assert verify(["fsdd"]) == []
    assert len(load_fsdd()) == 3000


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("cut", "not a readable .tar.gz"),
        ("truncated", "download truncated"),
        ("partial", "contents do not match the manifest (2 .wav files, expected 3000"),
        ("unsafe", "unsafe member path"),
        ("missing", "HTTP error 404"),
    ],
)
def test_fsdd_bad_archive_refused(fsdd_server: str, cache: Path, tmp_path: Path, case: str, problem: str) -> None:
    with pytest.raises(RnnbenchError) as info:
        fetch("fsdd", base_url=f"{fsdd_server}/{case}")
    assert problem in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert files_under(cache) == []
    assert not list(tmp_path.rglob("evil.wav"))
    assert verify() == []


# ----------------------------------------------------------------------------- command line


def test_cli_stats_jsb(mirror: Path) -> None:
    result = CliRunner().invoke(data_app, ["stats", "jsb"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["split", "sequences", "time_steps"]
    assert [line.split() for line in lines[2:]] == [["train", "229", "13807"], ["valid", "76", "4602"], ["test", "77", "4725"]]


def test_cli_unknown_name_and_verify(mirror: Path) -> None:
    result = CliRunner().invoke(data_app, ["stats", "bach"])
    assert isinstance(result.exception, RnnbenchError)
    assert "valid names: jsb, nottingham, musedata, pianomidi, fsdd" in str(result.exception)
    result = CliRunner().invoke(data_app, ["fetch", "jsb", "bach"])
    assert isinstance(result.exception, RnnbenchError)
    result = CliRunner().invoke(data_app, ["verify", "jsb"])
    assert result.exit_code == 0 and result.output.startswith("OK"), result.output

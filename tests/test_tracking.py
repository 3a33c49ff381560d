"""The tracking store: which URIs are accepted, a new SQLite store created atomically (a real SIGKILL
during creation, a real race of two sweeps on a new store), half-made stores, reading commands that
create nothing, unwritable folders, and `rnnbench ui`'s address and landing page."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rnnbench.errors import RnnbenchError
from rnnbench.tracking import normalize_tracking_uri, prepare_store, sqlite_store_problem

RNNBENCH = [sys.executable, "-m", "rnnbench.cli"]
TINY_SWEEP = {
    "base": {
        "model": {"hidden_size": 4},
        "task": {"name": "copy", "seq_len": 3, "n_train": 16, "n_val": 8, "n_test": 8},
        "train": {"max_epochs": 1, "batch_size": 8, "early_stopping_patience": None, "gradient_flow": False},
    },
}


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(RNNBENCH + args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(out: subprocess.CompletedProcess, message: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- which URIs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["x.db", "sub/x.sqlite", "sqlite:///rel.db", "sqlite:////abs/x.db"])
def test_sqlite_uris_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.chdir(tmp_path)
    got = normalize_tracking_uri(uri)
    assert got.startswith("sqlite:////") and Path(got[len("sqlite:///"):]).is_absolute()


@pytest.mark.parametrize("uri", ["http://h:5000", "https://h", "postgresql+psycopg2://u@h/db", "databricks"])
def test_server_and_database_uris_pass_unchanged(uri: str) -> None:
    assert normalize_tracking_uri(uri) == uri


@pytest.mark.parametrize(
    "uri, message",
    [
        ("foo://bar", "unknown scheme 'foo://'"),
        ("not a uri at all", "is not a URI rnnbench accepts"),
        ("mlflow", "is not a URI rnnbench accepts"),  # a typo never becomes a database of that name
        ("file:///tmp/mlruns", "MLflow file store, which MLflow 3 refuses"),
        ("./mlruns", "MLflow file store, which MLflow 3 refuses"),
        ("sqlite://", "a SQLite store must be a file"),
    ],
)
def test_refused_uris_say_what_is_accepted(uri: str, message: str) -> None:
    with pytest.raises(RnnbenchError, match="use ") as e:
        normalize_tracking_uri(uri)
    assert message in str(e.value) and "\n" not in str(e.value)


# --- creating a store: kill and race ---------------------------------------------------------------
CREATE = "from rnnbench.tracking import prepare_store, resolve_tracking_uri; prepare_store(resolve_tracking_uri(), 'e')"


def _tables_being_rebuilt(folder: Path) -> set[str]:
    """`_alembic_tmp_*` tables visible now in the store file or its temporary file under `folder`:
    alembic is in the middle of rebuilding a table, the moment a kill used to break the store."""
    found: set[str] = set()
    for f in folder.iterdir():
        if f.name == "mlflow.db" or (f.name.startswith(".mlflow.db.creating-") and not f.name.endswith("-journal")):
            try:
                con = sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=0.05)
                try:
                    found |= {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'")}
                finally:
                    con.close()
            except sqlite3.Error:  # locked or still empty: look again
                pass
    return found


def test_sigkill_while_the_store_is_created_never_leaves_a_broken_store(tmp_path: Path) -> None:
    """Real creators SIGKILLed in the middle of MLflow's migrations, when a table is half rebuilt (the
    first such moment, and the third table rebuilt): each folder then holds no store or a complete
    one, and the next command creates or opens it and records a run."""
    killed = 0
    for attempt in range(3):  # a creator that ends before the window is seen is simply tried again
        folders = [tmp_path / f"try{attempt}-{n}" for n in (1, 3)]
        procs = []
        for folder in folders:
            folder.mkdir()
            procs.append(subprocess.Popen([sys.executable, "-c", CREATE], cwd=folder, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": "mlflow.db"}))
        seen: list[set[str]] = [set(), set()]
        while any(p.poll() is None for p in procs):
            for i, (folder, proc, after) in enumerate(zip(folders, procs, (1, 3))):
                if proc.poll() is None:
                    seen[i] |= _tables_being_rebuilt(folder)
                    if len(seen[i]) >= after:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
            time.sleep(0.002)
        killed += sum(p.returncode == -signal.SIGKILL for p in procs)
        _assert_usable(folders)
        if killed:
            break
    assert killed, "no creator was killed inside the migrations"


def _assert_usable(folders: list[Path]) -> None:
    from mlflow.tracking import MlflowClient

    for folder in folders:
        db = folder / "mlflow.db"
        assert not db.exists() or sqlite_store_problem(db) is None, sqlite_store_problem(db)
        uri = f"sqlite:///{db}"
        experiment_id = prepare_store(uri, "e")  # the next command: creates or opens the store
        client = MlflowClient(uri)
        run = client.create_run(experiment_id)
        client.set_terminated(run.info.run_id, "FINISHED")
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        assert not list(folder.glob(".mlflow.db.creating-*"))  # a killed creator's temporary file is gone


def test_two_sweeps_started_together_on_a_new_store_both_finish(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = []
    for name in ("left", "right"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **TINY_SWEEP}))
        procs.append(subprocess.Popen(RNNBENCH + ["sweep", f"{name}.yaml", "--no-progress"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for name in ("left", "right"):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}'")
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # parent and its one point
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def _half_made_store(db: Path) -> None:
    """A store as a creation killed mid-migration left it before the fix: a table alembic was
    rebuilding and no schema version."""
    prepare_store(f"sqlite:///{db}", "e")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32))")
    con.execute("DROP TABLE alembic_version")
    con.commit()
    con.close()


@pytest.mark.parametrize("command", [["report"], ["train", "spec.yaml"], ["sweep", "sweep.yaml"], ["ui", "--port", "0"]])
def test_a_half_made_store_is_one_line_saying_what_to_do(tmp_path: Path, command: list[str]) -> None:
    db = tmp_path / "mlflow.db"
    _half_made_store(db)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(TINY_SWEEP["base"]))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", **TINY_SWEEP}))
    if command[0] == "ui":
        command = ["ui", "--port", str(free_port())]
    out = run_cli(command, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    assert_one_line_error(out, f"{db} is a half-created MLflow store (tables _alembic_tmp_runs left by an interrupted migration)")
    assert "delete it and run the command again" in out.stderr


# --- one line, and nothing created -----------------------------------------------------------------
FOO = "$MLFLOW_TRACKING_URI 'foo://bar': unknown scheme 'foo://'"
NOT_A_URI = "$MLFLOW_TRACKING_URI 'not a uri at all' is not a URI rnnbench accepts"
FILE_STORE = "is an MLflow file store, which MLflow 3 refuses; use a SQLite file instead, e.g. sqlite:///"


@pytest.mark.parametrize(
    "command, uri, message",
    [
        (["train", "spec.yaml"], "foo://bar", FOO),
        (["sweep", "sweep.yaml"], "foo://bar", FOO),
        (["report"], "foo://bar", FOO),
        (["ui"], "foo://bar", FOO),
        (["train", "spec.yaml"], "not a uri at all", NOT_A_URI),
        (["report"], "not a uri at all", NOT_A_URI),
        (["sweep", "sweep.yaml"], "file:///tmp/mlruns", FILE_STORE),
        (["ui"], "./mlruns", FILE_STORE),
    ],
)
def test_bad_tracking_uris_are_one_line_everywhere(tmp_path: Path, command: list[str], uri: str, message: str) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(TINY_SWEEP["base"]))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", **TINY_SWEEP}))
    before = files_under(tmp_path)
    out = run_cli(command, tmp_path, MLFLOW_TRACKING_URI=uri)
    assert_one_line_error(out, message)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["report"], "no MLflow store at {tmp}/mlflow.db"),
        (["report", "--tracking-uri", "sqlite:////nonexistent/dir/x.db"], "no MLflow store at /nonexistent/dir/x.db"),
        (["ui", "--tracking-uri", "nosuch.db", "--port", "{port}"], "no MLflow store at {tmp}/nosuch.db"),
        (["report", "--tracking-uri", "http://127.0.0.1:{port}"], "tracking server http://127.0.0.1:{port} is unreachable"),
        (["sweep", "sweep.yaml", "--dry-run"], None),
    ],
)
def test_reading_commands_create_nothing(tmp_path: Path, args: list[str], message: str | None) -> None:
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", **TINY_SWEEP}))
    port = str(free_port())
    args = [a.replace("{port}", port) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    before = files_under(tmp_path)
    out = subprocess.run(RNNBENCH + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if message is None:
        assert out.returncode == 0 and "1 new" in out.stderr, out.stderr[-3000:]
    else:
        assert_one_line_error(out, message.replace("{tmp}", str(tmp_path)).replace("{port}", port))
    assert files_under(tmp_path) == before
    assert not Path("/nonexistent").exists()


def test_binary_spec_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_bytes(Path(sys.executable).resolve().read_bytes()[:4096])
    for command in ("train", "sweep"):
        assert_one_line_error(run_cli([command, "spec.yaml"], tmp_path), "spec.yaml is not a YAML text file (not UTF-8 at byte")


def test_report_out_that_cannot_be_a_folder_is_one_line(tmp_path: Path) -> None:
    prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "e")
    out = run_cli(["report", "--out", "/dev/null/x"], tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_one_line_error(out, "--out /dev/null/x cannot be created: /dev/null is not a folder")


def test_unwritable_store_folder_is_one_line_before_anything(tmp_path: Path) -> None:
    """/proc exists but takes no new files, for root too (permission bits would not stop root)."""
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", **TINY_SWEEP}))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(TINY_SWEEP["base"]))
    for command in (["sweep", "sweep.yaml"], ["train", "spec.yaml"]):
        out = run_cli(command, tmp_path, MLFLOW_TRACKING_URI="sqlite:////proc/mlflow.db")
        assert_one_line_error(out, "the store's folder /proc is not writable")
    assert not Path("/proc/mlflow.db").exists()


@pytest.mark.parametrize("existing_store", [False, True])
def test_unwritable_artifact_folder_fails_the_sweep_in_one_line_leaving_no_run(tmp_path: Path, existing_store: bool) -> None:
    """A regular file where the artifact folder must be: it can be neither made nor written (as root too)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if existing_store:
        prepare_store(uri, "other")
    (tmp_path / "mlartifacts").mkdir(exist_ok=True)
    (tmp_path / "mlartifacts" / "s").write_text("not a folder")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", **TINY_SWEEP}))
    out = run_cli(["sweep", "sweep.yaml"], tmp_path, MLFLOW_TRACKING_URI=uri)
    assert_one_line_error(out, f"the artifact folder of experiment 's' {tmp_path / 'mlartifacts' / 's'} is not writable")
    if (tmp_path / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs == []  # no parent run left RUNNING, nor any other


# --- rnnbench ui -----------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0", "", "0.0.0.0", "::"])
def test_ui_on_all_interfaces_says_so(tmp_path: Path, host: str) -> None:
    """The first line comes before the server starts; the server is stopped as soon as it is read."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = prepare_store(uri, "e")
    port = free_port()
    proc = subprocess.Popen(RNNBENCH + ["ui", "--host", host, "--port", str(port)], cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    bind = "::" if host == "::" else "0.0.0.0"
    assert f"listens on all interfaces ({bind} port {port}), reachable from other machines at http://" in line, line
    here = "127.0.0.1" if bind == "0.0.0.0" else "[::1]"
    assert line.rstrip().endswith(f"open http://{here}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    assert "http://0:" not in line and "http://:" not in line


def test_git_commit_is_the_packages_checkout_not_the_working_directorys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from inside another repository (a user's experiments), a run's git_commit is still the
    commit of the rnnbench checkout that ran."""
    import rnnbench
    from rnnbench.tracking import git_commit

    package = Path(rnnbench.__file__).resolve().parent
    mine = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    if mine.returncode != 0:
        pytest.skip("rnnbench runs from a copy outside git here")
    other = tmp_path / "experiments"
    other.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=other, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=other, check=True)
    theirs = subprocess.run(["git", "rev-parse", "HEAD"], cwd=other, capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(other)
    assert git_commit() == mine.stdout.strip() != theirs

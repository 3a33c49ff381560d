"""Where runs are recorded: the MLflow store, its experiments, and closing runs that died.

Traps this module exists for (../shared/docs/ecosystem-notes.md): MLflow 3.17 refuses the `./mlruns`
file store, so the default is a SQLite file; artifacts of a SQLite store would land in `<cwd>/mlruns`
unless each experiment names its artifact location; several processes creating a new store or
experiment at once race, and MLflow migrates a new SQLite file in place (a process killed during
the ~2 s of migrations leaves a half-made store that no later command can open), so a new store is
built in a temporary file under a lock and moved into place only when complete. MLflow also creates
a missing SQLite file and its folders on first contact, so the commands that only read check first.

Every command takes its store through `resolve_tracking_uri` (which forms are accepted) and then
`prepare_store` (commands that write) or `require_store` (commands that only read).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from rnnbench.errors import RnnbenchError

DEFAULT_DB = "mlflow.db"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy dialects MLflow supports, `+driver` allowed
ACCEPTED = (
    "sqlite:///PATH, a file path ending in .db, .sqlite or .sqlite3, http(s)://HOST:PORT of a tracking server, "
    "postgresql://, mysql://, mssql:// or databricks"
)
ML_EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Experiment tag: a machine-learning experiment, not a GenAI one (MLflow 3.0-3.5 UIs open its runs
table by it; 3.17's UI follows the `workflowType` of the URL, see `runs_page_url`)."""


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory;
    refused in one line unless it is one of the forms in ACCEPTED (a SQLite URI comes back absolute)."""
    if configured:
        return normalize_tracking_uri(configured, "tracking URI")
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return normalize_tracking_uri(env, "$MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def normalize_tracking_uri(uri: str, source: str = "tracking URI") -> str:
    """`uri` checked against ACCEPTED: a bare value only as a path to a SQLite file (so a typo never
    becomes a database of that name), never the file store that MLflow 3 refuses."""
    value = uri.strip()
    file_store = (f"{source} {uri!r} is an MLflow file store, which MLflow 3 refuses; "
                  f"use a SQLite file instead, e.g. sqlite:///{Path.cwd() / DEFAULT_DB}")
    if value == "databricks":
        return value
    if "://" not in value:
        path = Path(value).expanduser()
        if path.suffix.lower() in SQLITE_SUFFIXES:
            return f"sqlite:///{path.resolve()}"
        if path.name == "mlruns" or path.is_dir():
            raise RnnbenchError(file_store)
        raise RnnbenchError(f"{source} {uri!r} is not a URI rnnbench accepts; use {ACCEPTED}")
    scheme = urlparse(value).scheme.lower()
    if scheme == "file":
        raise RnnbenchError(file_store)
    if scheme.split("+")[0] == "sqlite":
        rest = value[len("sqlite:///"):] if value.lower().startswith("sqlite:///") else ""
        if not rest or rest.startswith(":memory:") or "?" in rest:
            raise RnnbenchError(f"{source} {uri!r}: a SQLite store must be a file: use sqlite:///PATH (no in-memory store, no query)")
        return f"sqlite:///{Path(rest).expanduser().resolve()}"
    if scheme in ("http", "https") or scheme.split("+")[0] in DATABASE_SCHEMES or scheme == "databricks":
        return value
    raise RnnbenchError(f"{source} {uri!r}: unknown scheme {scheme + '://'!r}; use {ACCEPTED}")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a (normalized) SQLite URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts live beside the database file; a server decides for itself."""
    db = sqlite_path(uri)
    if db is not None:
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in one line, before any work, if an HTTP tracking server does not answer or a SQLite
    store's folder does not exist."""
    scheme = urlparse(uri).scheme
    if scheme not in ("http", "https"):
        db = sqlite_path(uri)
        if db is not None and not db.parent.is_dir():
            raise RnnbenchError(f"tracking store directory does not exist: {db.parent}")
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        reason = getattr(e, "reason", e)
        raise RnnbenchError(f"tracking server {uri} is unreachable ({reason})") from None


def require_store(uri: str) -> None:
    """For commands that only read: one line unless the store is there and complete; creates nothing
    (MLflow itself would create a missing SQLite file and its folders)."""
    db = sqlite_path(uri)
    if db is None:
        check_reachable(uri, timeout=3.0)
        return
    if not db.is_file():
        raise RnnbenchError(
            f"no MLflow store at {db}: run `rnnbench train` or `rnnbench sweep` first, "
            "or point --tracking-uri or $MLFLOW_TRACKING_URI at an existing store"
        )
    problem = sqlite_store_problem(db)
    if problem == "empty":
        raise RnnbenchError(f"no MLflow store at {db}: the file is an empty database")
    if problem:
        raise RnnbenchError(problem)


def sqlite_store_problem(db: Path) -> str | None:
    """Why the existing file `db` is not a usable MLflow store (one line), "empty" for a database
    without tables, None when it is a complete store (read-only look, with sqlite3)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = con.execute("SELECT version_num FROM alembic_version").fetchall() if "alembic_version" in tables else []
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return f"{db} is not an MLflow store ({e}); point the tracking URI at another file or move this one away"
    if not tables:
        return "empty"
    half_made = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    head = _schema_head()
    current = version[0][0] if version else None
    if not half_made and current is not None and "experiments" in tables and (head is None or current == head):
        return None
    if runs:
        return (f"{db} is an MLflow store with {runs} runs whose schema is not this MLflow's "
                f"(version {current}, expected {head}): back it up, then run `mlflow db upgrade sqlite:///{db}`")
    what = f"tables {', '.join(half_made)} left by an interrupted migration" if half_made else f"schema version {current}"
    return (f"{db} is a half-created MLflow store ({what}) and holds no runs: "
            "delete it and run the command again (a new store is then created safely)")


def _schema_head() -> str | None:
    """The schema version this MLflow writes (None if MLflow cannot say; then any version passes)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision  # no public equivalent

        return _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - a check, not a requirement
        return None


def _check_writable_folder(folder: Path, what: str) -> None:
    """Create `folder` if needed and write a probe file in it: one line if either fails. A real write,
    because permission bits say nothing for root and a read-only mount shows only on writing."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RnnbenchError(f"{what} {folder} is not writable ({e.strerror or e})") from None


def _create_sqlite_store(db: Path) -> None:
    """Make `db` a complete MLflow store, atomically: under an exclusive lock beside it, MLflow's
    migrations run on a temporary file in the same folder, which is linked into place only when
    complete. A process killed meanwhile leaves a temporary file, removed by the next creator."""
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = db.parent
    lock = folder / f".rnnbench-store-{db.name}.lock"
    try:
        handle = open(lock, "a")  # noqa: SIM115 - held for the block below
    except OSError as e:
        raise RnnbenchError(f"the store's folder {folder} is not writable ({e.strerror or e})") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another creator finishes within seconds
        for stale in folder.glob(f".{db.name}.creating-*"):  # only lock holders make these: their makers died
            stale.unlink(missing_ok=True)
        if db.exists():
            problem = sqlite_store_problem(db)
            if problem is None:
                return
            if problem != "empty":
                raise RnnbenchError(problem)
        tmp = folder / f".{db.name}.creating-{os.getpid()}"
        try:
            store = SqlAlchemyStore(f"sqlite:///{tmp}", (folder / "mlartifacts").as_uri())
            store.engine.dispose()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if db.exists():  # an empty database file: replace it
                os.replace(tmp, db)
            else:
                try:
                    os.link(tmp, db)  # fails if something else made `db` meanwhile; never overwrites
                except FileExistsError:
                    problem = sqlite_store_problem(db)
                    if problem is not None:
                        raise RnnbenchError(problem) from None
                except OSError:  # a filesystem without hard links
                    os.replace(tmp, db)
        except OSError as e:
            raise RnnbenchError(f"cannot create the store {db} ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)


def _check_store_file(db: Path) -> None:
    """A SQLite store before a command writes to it: created if missing, else complete and writable."""
    if not db.exists() or any(db.parent.glob(f".{db.name}.creating-*")):  # new, or a creator died after linking
        _create_sqlite_store(db)
        return
    problem = sqlite_store_problem(db)
    if problem == "empty":
        _create_sqlite_store(db)
    elif problem:
        raise RnnbenchError(problem)
    _check_writable_folder(db.parent, "the store's folder")  # SQLite writes its journal beside the file
    if not os.access(db, os.W_OK):
        raise RnnbenchError(f"the store {db} is not writable")


def prepare_store(uri: str, experiment: str) -> str:
    """Create the store (atomically, see `_create_sqlite_store`) and the experiment once; check that
    the experiment's artifact folder takes files; return the experiment id. One line on any problem."""
    import mlflow
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    db = sqlite_path(uri)
    if db is not None:
        if not db.exists():  # a new store: check its folder and its first experiment's artifact folder first
            _check_writable_folder(db.parent, "the store's folder")
            _check_writable_folder(db.parent / "mlartifacts" / experiment, f"the artifact folder of experiment {experiment!r}")
        _check_store_file(db)
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                experiment_id = client.create_experiment(
                    experiment, artifact_location=artifact_location(uri, experiment), tags=ML_EXPERIMENT_KIND
                )
            except mlflow.exceptions.MlflowException:  # created by someone else in between
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
            else:
                exp = client.get_experiment(experiment_id)
        for key, value in ML_EXPERIMENT_KIND.items():
            if key not in exp.tags:  # experiments made before rnnbench set it
                client.set_experiment_tag(exp.experiment_id, key, value)
    except mlflow.exceptions.MlflowException as e:
        raise RnnbenchError(f"tracking store {uri}: {first_line(e)}") from None
    location = urlparse(exp.artifact_location or "")
    if location.scheme == "file":  # a local folder: a server's or a bucket's are not ours to check
        from urllib.request import url2pathname

        _check_writable_folder(Path(url2pathname(location.path)), f"the artifact folder of experiment {experiment!r}")
    return exp.experiment_id


def first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def runs_page_url(base: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs table. MLflow 3.17's UI opens an experiment in the GenAI
    view (traces) unless the URL says `workflowType=machine_learning` (its JS: the workflow type comes
    from that query parameter, else from the browser's last choice, else "genai")."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def git_commit() -> str:
    """The commit of the rnnbench checkout that runs (the repository that tracks this package's own
    files), 'unknown' for a copy outside git. Never the working directory's repository: a user's
    experiment repository, or one a virtual environment sits in, is not the code that ran."""
    here = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here,
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:
            return "unknown"
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"

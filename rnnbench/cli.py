"""The `rnnbench` command line: train, sweep, report, export, compare, ui, data, bench.

Typer (on click) parses the command line. Heavy libraries are imported inside each command so that
`--help` and input errors answer at once. Every RnnbenchError becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from rnnbench.errors import RnnbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Benchmark recurrent cells: train, sweep seed grids, report, all recorded in MLflow.",
)

OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. model.cell=gru train.lr=1e-3", show_default=False)


@app.command()
def train(
    spec: Path = typer.Argument(..., help="YAML run spec (see experiments/)"),
    overrides: Optional[list[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="RUN_ID", help="continue a run stopped by Ctrl-C, SIGTERM or a kill, from its last checkpoint"
    ),
) -> None:
    """Train one configuration and record it as an MLflow run."""
    from rnnbench.config import load_config

    config = load_config(spec, overrides or [])
    from rnnbench.train import resumable_run
    from rnnbench.train import train as run_training
    from rnnbench.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(config.tracking.tracking_uri)
    if resume is None:
        result = run_training(config)
    else:
        experiment_id = resumable_run(config, resume)
        result = run_training(config, run_id=resume, experiment_id=experiment_id)
    if result.status != "FINISHED":
        typer.echo(f"run {result.run_id} FAILED: {result.reason}", err=True)
        raise typer.Exit(1)
    shown = {k: v for k, v in result.metrics.items() if k.startswith("test_") or k in ("best_epoch", "seconds_per_epoch")}
    typer.echo(f"run {result.run_id} FINISHED in {uri}")
    for k, v in sorted(shown.items()):
        typer.echo(f"  {k:24s} {v:.6g}")


ALL_INTERFACES = ("", "0", "0.0.0.0", "::", "[::]")


@app.command()
def ui(
    port: int = typer.Option(5000, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to bind; the default keeps it on this machine, 0.0.0.0 opens it to others"),
    tracking_uri: Optional[str] = typer.Option(None, help="store to browse (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"),
    experiment: Optional[str] = typer.Option(None, help="experiment to open (default: the one with the latest run)"),
) -> None:
    """Serve the MLflow UI for the same store the runs go to, opened on an experiment's runs table."""
    import os

    from rnnbench.tracking import require_store, resolve_tracking_uri, runs_page_url

    if not 1 <= port <= 65535:
        raise RnnbenchError(f"--port must be between 1 and 65535, got {port}")
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        require_store(uri)
        typer.echo(f"the tracking server serves the UI: open {runs_page_url(uri, _experiment_to_open(uri, experiment))}")
        return
    bind = "::" if host in ("::", "[::]") else "0.0.0.0" if host in ALL_INTERFACES else host
    _check_port(bind, port)
    require_store(uri)  # reading only: a mistyped store is refused, never created
    experiment_id = _experiment_to_open(uri, experiment)
    if bind in ("0.0.0.0", "::"):
        here = runs_page_url(f"http://127.0.0.1:{port}" if bind == "0.0.0.0" else f"http://[::1]:{port}", experiment_id)
        typer.echo(f"MLflow UI for {uri} listens on all interfaces ({bind} port {port}), reachable from other machines "
                   f"at http://{_this_machine()}:{port}: open {here}")
    else:
        shown = f"[{bind}]" if ":" in bind else bind
        typer.echo(f"MLflow UI for {uri}: open {runs_page_url(f'http://{shown}:{port}', experiment_id)}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", bind, "--port", str(port)]
    os.execv(sys.executable, cmd)


def _experiment_to_open(uri: str, name: str | None) -> str:
    """The id of experiment `name`, else of the one whose run started last (else the first one)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import first_line

    client = MlflowClient(tracking_uri=uri)
    try:
        if name is not None:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = ", ".join(sorted(e.name for e in client.search_experiments()))
                raise RnnbenchError(f"no experiment {name!r} in {uri}; there are: {known}")
            return exp.experiment_id
        experiments = client.search_experiments()
        latest = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"],
                                    max_results=1) if experiments else []
    except mlflow.exceptions.MlflowException as e:
        raise RnnbenchError(f"tracking store {uri}: {first_line(e)}") from None
    if latest:
        return latest[0].info.experiment_id
    return experiments[0].experiment_id if experiments else "0"


def _this_machine() -> str:
    """An address other machines may use: this host's IP where its name resolves, else its name.
    (MLflow's default allowed hosts take localhost and private-network addresses, not names.)"""
    import socket

    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()
    return socket.gethostname() if address.startswith("127.") else address


def _check_port(host: str, port: int) -> None:
    """One-line errors for a port out of range or taken, before the server's own traceback could."""
    import socket

    if not 1 <= port <= 65535:
        raise RnnbenchError(f"--port must be between 1 and 65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise RnnbenchError(f"cannot serve on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None


def _mount() -> None:
    """Sub-commands that live beside their code; each module keeps heavy imports inside the command."""
    from rnnbench import bench, compare
    from rnnbench.analysis import cli as report_cli
    from rnnbench.datasets.cli import data_app
    from rnnbench.sweep import cli as sweep_cli

    app.add_typer(data_app, name="data", help="Fetch, verify and describe the datasets.")
    app.command(name="sweep")(sweep_cli.command)
    app.command(name="report")(report_cli.command)
    app.command(name="export")(report_cli.export_command)
    app.command(name="compare")(compare.command)
    app.command(name="bench")(bench.command)


_mount()


def _interruption(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind `error`: typer turns one into `Exit(130)` (raised from it), which
    click turns into SystemExit; so an interrupted command reaches main() as SystemExit."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _report_interruption(stop: KeyboardInterrupt) -> None:
    """One line: what was marked KILLED and kept, and the command that carries on."""
    import shlex

    from rnnbench.interrupts import Interrupted, exit_status

    if isinstance(stop, Interrupted):
        args = list(sys.argv[1:])
        if stop.add_args and stop.add_args[0] not in args:
            args += list(stop.add_args)
        command = shlex.join(["rnnbench", *args])
        typer.echo(f"rnnbench: interrupted: {stop.kept}; {stop.again}: {command}", err=True)
    else:
        typer.echo("rnnbench: interrupted", err=True)
    sys.exit(exit_status())


def main() -> None:
    from rnnbench.interrupts import stop_on_signals

    stop_on_signals()  # a kill or a scheduler's time-out cleans up as Ctrl-C does
    try:
        app()
    except RnnbenchError as e:
        typer.echo(f"rnnbench: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _report_interruption(e)
    except SystemExit as e:
        if (stop := _interruption(e)) is None:
            raise
        _report_interruption(stop)


if __name__ == "__main__":
    main()

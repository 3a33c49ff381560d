"""A sweep's runs in MLflow: its parent run, its child runs by point, and retiring stale attempts.

Invariant kept here: each point has at most one *active* child run. An attempt that is not carried
on (FAILED, or left RUNNING/KILLED with nothing to resume from) is retired before the next attempt
starts: tagged `superseded=true`, closed, and soft-deleted (MLflow keeps it; searches and the UI
hide it unless asked for deleted runs). So re-running a sweep ends with exactly one FINISHED child
per point, and the report never counts an old failed attempt as a failed seed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARENT_ROLE = "parent"
POINT_ROLE = "point"


def search_all(client: Any, experiment_id: str, filter_string: str) -> Iterator[Any]:
    """Every active run of the experiment matching the filter, across all result pages."""
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token,
            order_by=["attributes.start_time ASC"],
        )
        yield from page
        token = page.token
        if not token:
            return


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_parent(client: Any, experiment_id: str, sweep: str) -> Any | None:
    """The sweep's parent run (the oldest if several), or None; read only."""
    return next(iter(search_all(client, experiment_id, f"tags.sweep = '{_quote(sweep)}' AND tags.sweep_role = '{PARENT_ROLE}'")), None)


def parent_run(client: Any, experiment_id: str, sweep: str, tags: dict[str, str]) -> str:
    """The sweep's parent run (the oldest if several), created if absent; marked RUNNING, tags updated.
    Call it only when there is work: reopening moves the parent's end time and status."""
    from mlflow.entities import RunTag

    found = find_parent(client, experiment_id, sweep)
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=sweep, tags={"sweep": sweep, "sweep_role": PARENT_ROLE}).info.run_id
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run_id


def child_runs(client: Any, experiment_id: str, sweep: str) -> dict[str, list[Any]]:
    """point_id -> the point's active child runs, oldest first."""
    by_point: dict[str, list[Any]] = defaultdict(list)
    for run in search_all(client, experiment_id, f"tags.sweep = '{_quote(sweep)}'"):
        pid = run.data.tags.get("point_id")
        if pid:
            by_point[pid].append(run)
    return dict(by_point)


def point_runs(client: Any, experiment_id: str, sweep: str, point_id: str) -> list[Any]:
    """The active child runs of one point, oldest first."""
    return list(search_all(client, experiment_id, f"tags.sweep = '{_quote(sweep)}' AND tags.point_id = '{_quote(point_id)}'"))


def retire(client: Any, run: Any, reason: str, checkpoint_dir: str | Path | None = None) -> None:
    """Tag, close (a RUNNING run died with its process) and soft-delete a stale attempt; with
    `checkpoint_dir`, delete its checkpoint folder too (nothing resumes a retired run)."""
    from mlflow.entities import RunTag

    from rnnbench.checkpoints import remove_folder

    run_id = run.info.run_id
    client.log_batch(run_id, tags=[RunTag("superseded", "true"), RunTag("superseded_reason", reason[:500])])
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
    client.delete_run(run_id)
    if checkpoint_dir is not None:
        remove_folder(Path(checkpoint_dir) / run_id)


MEMBER_CHECKPOINT = "member.pt"  # rnnbench.training.checkpoint.FILE (one per member of a population)


def checkpoint_of(run_id: str, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint file a run left ('member.pt'), or None."""
    return MEMBER_CHECKPOINT if (Path(checkpoint_dir) / run_id / MEMBER_CHECKPOINT).is_file() else None


def checkpoint_problem(run_id: str, checkpoint_dir: str | Path) -> str | None:
    """Why the run's checkpoint files cannot be resumed from (empty, truncated, holding code), or None.
    Each file is loaded as the resume would load it (weights_only), so nothing in it runs."""
    from rnnbench.checkpoints import folder_problem

    return folder_problem(Path(checkpoint_dir) / run_id)


def _could_resume(run: Any, checkpoint_dir: str | Path) -> bool:
    return (
        run.info.status in ("RUNNING", "KILLED")
        and bool(run.data.params)
        and checkpoint_of(run.info.run_id, checkpoint_dir) is not None
    )


def resumable(run: Any, checkpoint_dir: str | Path) -> bool:
    """A RUNNING/KILLED run can be continued when its params are logged and its last checkpoint exists
    (member.pt, written at every epoch's end) and loads."""
    return _could_resume(run, checkpoint_dir) and checkpoint_problem(run.info.run_id, checkpoint_dir) is None


@dataclass(frozen=True)
class Decision:
    """What to do with one point: done (a FINISHED run), resume a run, start new, or retry after failures."""

    action: str  # done | resume | new | retry
    run_id: str | None = None  # the FINISHED run (done) or the run to continue (resume)
    retire: tuple[tuple[Any, str], ...] = ()  # (run, why) of attempts to retire first


def decide(runs: list[Any], checkpoint_dir: str | Path) -> Decision:
    """Keep the point's first FINISHED run, else the newest resumable one; retire every other attempt.
    A run whose checkpoint is unusable is retired with the reason naming the file: the point starts afresh."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        keep = finished[0]
        why = f"point already FINISHED in run {keep.info.run_id}"
        return Decision("done", keep.info.run_id, tuple((r, why) for r in runs if r is not keep))
    carry_on = None
    unusable: dict[str, str] = {}  # run id -> what is wrong with its checkpoint
    for r in reversed(runs):
        if not _could_resume(r, checkpoint_dir):
            continue
        problem = checkpoint_problem(r.info.run_id, checkpoint_dir)
        if problem is None:
            carry_on = r
            break
        unusable[r.info.run_id] = problem

    def why(r: Any) -> str:
        if r.info.run_id in unusable:
            return f"cannot resume, point started afresh: {unusable[r.info.run_id]}"
        return "left RUNNING with nothing to resume from" if r.info.status == "RUNNING" else f"{r.info.status} attempt replaced"

    stale = tuple((r, why(r)) for r in runs if r is not carry_on)
    if carry_on is not None:
        return Decision("resume", carry_on.info.run_id, stale)
    return Decision("retry" if runs else "new", None, stale)

#!/bin/bash
# Carry a study chunk that outlasts a session (MuseData: hours per cell) to the next machine.
#   scripts/inflight.sh save NAME STORE_DIR CHECKPOINT_DIR     # stop the chunk's worker (SIGSTOP) meanwhile
#   scripts/inflight.sh restore NAME STORE_DIR CHECKPOINT_DIR
# STORE_DIR holds the MLflow SQLite store (mlflow.db, as MLFLOW_TRACKING_URI=sqlite:///STORE_DIR/mlflow.db)
# and its artifacts (mlartifacts/); CHECKPOINT_DIR is the sweep's tracking.checkpoint_dir.
# `save` writes inflight/NAME.tar.gz: a consistent copy of the store (sqlite3's backup), its artifacts
# and the checkpoints, the state a SIGKILL at that moment would leave. `restore` puts them back at the
# same paths; rerunning the chunk's `rnnbench sweep` resumes its interrupted runs from their checkpoints
# (as after any kill). Delete the file once the chunk is exported. inflight/ is not committed (git
# ignores it: a bundle is MBs of store and checkpoints); copy it to the next machine by other means.
set -euo pipefail
cmd=$1 name=$2 store=$3 ckpt=$4
out="$(cd "$(dirname "$0")/.." && pwd)/inflight/$name.tar.gz"
if [ "$cmd" = save ]; then
  tmp=$(mktemp -d)
  python3 -c "import sqlite3,sys; a=sqlite3.connect(sys.argv[1]); b=sqlite3.connect(sys.argv[2]); a.backup(b); b.close()" \
    "$store/mlflow.db" "$tmp/mlflow.db"
  [ -d "$store/mlartifacts" ] && cp -a "$store/mlartifacts" "$tmp/mlartifacts"
  cp -a "$ckpt" "$tmp/checkpoints"
  mkdir -p "$(dirname "$out")" && tar -C "$tmp" -czf "$out" . && rm -rf "$tmp" && ls -la "$out"
elif [ "$cmd" = restore ]; then
  tmp=$(mktemp -d) && tar -C "$tmp" -xzf "$out"
  mkdir -p "$store" "$(dirname "$ckpt")"
  cp "$tmp/mlflow.db" "$store/mlflow.db"
  [ -d "$tmp/mlartifacts" ] && rm -rf "$store/mlartifacts" && cp -a "$tmp/mlartifacts" "$store/mlartifacts"
  rm -rf "$ckpt" && cp -a "$tmp/checkpoints" "$ckpt" && rm -rf "$tmp" && echo "restored $name"
else
  echo "usage: $0 save|restore NAME STORE_DIR CHECKPOINT_DIR" >&2; exit 2
fi

#!/usr/bin/env bash
# The nightly results history: the branch `bench-results` holds one directory per run,
# runs/<run_id>/ (run.json, results.parquet, samples.parquet, report.html, compare.html).
# Runs are immutable and each has its own directory, so two jobs appending at once never
# conflict: a rejected push is rebased and pushed again.
#
#   results-history.sh ensure                 create the branch on origin if it does not exist
#                                             (an orphan commit with an empty tree; the work tree
#                                             is not touched)
#   results-history.sh store RUN_DIR HISTORY  copy the run in RUN_DIR into HISTORY/runs/<run_id>/
#                                             (HISTORY: a checkout of the branch), commit and push
#
# Retention: see "Retention" in docs/how-to/regressions.md.
set -euo pipefail

BRANCH="${BENCH_RESULTS_BRANCH:-bench-results}"
IDENTITY=(-c "user.name=github-actions[bot]" -c "user.email=41898282+github-actions[bot]@users.noreply.github.com")

case "${1:-}" in
  ensure)
    if git ls-remote --exit-code --heads origin "$BRANCH" >/dev/null; then
      exit 0
    fi
    empty_tree=$(git mktree </dev/null)
    commit=$(git "${IDENTITY[@]}" commit-tree "$empty_tree" -m "$BRANCH: the nightly results history (runs/<run_id>/)")
    # another job may have created it meanwhile: that is as good
    git push -q origin "$commit:refs/heads/$BRANCH" || git ls-remote --exit-code --heads origin "$BRANCH" >/dev/null
    ;;
  store)
    run_dir="${2:?usage: results-history.sh store RUN_DIR HISTORY}"
    history="${3:?usage: results-history.sh store RUN_DIR HISTORY}"
    if [ ! -f "$run_dir/run.json" ] || [ ! -f "$run_dir/results.parquet" ]; then
      echo "::warning::$run_dir holds no finished run: nothing stored in $BRANCH"
      exit 0
    fi
    read -r run_id suite < <(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["run_id"], m["suite"]["name"])' "$run_dir/run.json")
    dest="$history/runs/$run_id"
    if [ -e "$dest" ]; then
      echo "::warning::$run_id is already in $BRANCH: left as it is"
      exit 0
    fi
    mkdir -p "$dest"
    for name in run.json results.parquet samples.parquet report.html compare.html; do
      if [ -f "$run_dir/$name" ]; then cp "$run_dir/$name" "$dest/"; fi
    done
    git -C "$history" add "runs/$run_id"
    git -C "$history" "${IDENTITY[@]}" commit -q -m "$suite: $run_id"
    for attempt in 1 2 3 4 5; do
      if git -C "$history" push -q origin "HEAD:refs/heads/$BRANCH"; then
        echo "stored $run_id in $BRANCH"
        exit 0
      fi
      sleep $((attempt * 2))
      git -C "$history" "${IDENTITY[@]}" pull -q --rebase origin "$BRANCH"
    done
    echo "::error::could not push $run_id to $BRANCH"
    exit 1
    ;;
  *)
    echo "usage: results-history.sh ensure | store RUN_DIR HISTORY" >&2
    exit 2
    ;;
esac

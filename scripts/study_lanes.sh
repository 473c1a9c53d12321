#!/usr/bin/env bash
# Run a tuned study in the background as one-thread lanes, and commit each finished run.
#
#   scripts/study_lanes.sh [--commit] [--lane N] LANE [LANE ...]
#
# A LANE is a space-separated list of MODE:METHODS steps run one after the other, each a
# `python -m badit_exp.study all --mode MODE --methods METHODS --workers 1`; the lanes run side
# by side (on a 2-core CPU, two lanes use the cores best). Example (the study2_cpu restart):
#
#   scripts/study_lanes.sh --commit \
#     "sequential:lora_r32,loramoe,badit,badit_wo_dog mixed:olora,hydralora_k8,mola_k8,mixlora_k8" \
#     "sequential:gainlora,o_lora,lori_k8 mixed:mtlora_k8,lori_k8,mtl_lora_k8,flylora_k8,smora_k8"
#
# Killed, or on a new machine? Run the same command again: a step finds its finished runs in
# the study's results folder (committed) and never reruns them, attaches to a run still going,
# and resumes a killed one from its checkpoint. --commit adds a loop that commits the results
# folder every COMMIT_EVERY seconds (120) when it changed, so a new machine continues from git.
# Logs: outputs/lanes/lane<i>.log; pids: outputs/lanes/*.pid (kill the lane's pid to stop it).
# --lane N changes one lane while the others go on (e.g. to move a method to the front): give
# every lane again, edited; lane N's old controller stops (its running job does not: the new
# controller attaches to it when the job is in its selection) and lane N starts anew.
# STUDY (study2_cpu) names conf/study/<STUDY>.yaml; PYTHON (.venv/bin/python) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:-study2_cpu}
PYTHON=${PYTHON:-.venv/bin/python}
COMMIT_EVERY=${COMMIT_EVERY:-120}
commit=0
only=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --commit) commit=1; shift ;;
    --lane)
      if [[ ! ${2:-} =~ ^[1-9][0-9]*$ ]]; then
        echo "study_lanes: --lane takes a lane number (1, 2, ...), got '${2:-}'" >&2; exit 2
      fi
      only=$2; shift 2 ;;
    *) echo "study_lanes: unknown option '$1' (--commit, --lane N)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then sed -n '2,23p' "$0"; exit 2; fi
if (( only > $# )); then
  echo "study_lanes: --lane $only but $# lane(s) given; give every lane, edited" >&2; exit 2
fi
for lane in "$@"; do
  for step in $lane; do
    if [[ $step != *:* ]] || [[ ${step%%:*} != mixed && ${step%%:*} != sequential ]]; then
      echo "study_lanes: step '$step' is not MODE:METHODS with MODE mixed or sequential" >&2
      exit 2
    fi
  done
done
results=$("$PYTHON" -c "from badit_exp.study import load_study; print(load_study('$STUDY').results_dir)")
mkdir -p outputs/lanes
alive() {  # a pid from a pid file that is still one of this script's processes (not a reused pid)
  [[ -n $1 ]] && kill -0 "$1" 2>/dev/null && ps -o args= -p "$1" | grep -q study_lanes
}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
trap '' HUP  # the lanes outlive the terminal that started them
if (( only == 0 )); then  # a plain start never doubles a lane that still runs
  for ((i = 1; i <= $#; i++)); do
    old=$(cat "outputs/lanes/lane$i.pid" 2>/dev/null || true)
    if alive "$old"; then
      echo "study_lanes: lane $i (pid $old) is still running; kill it, or change it with --lane $i" >&2
      exit 2
    fi
  done
fi
i=0
for lane in "$@"; do
  i=$((i + 1))
  if (( only > 0 && i != only )); then continue; fi
  old=$(cat "outputs/lanes/lane$i.pid" 2>/dev/null || true)
  if alive "$old"; then
    kids=$(pgrep -P "$old" || true)  # its `study all` controller; the runs' jobs are not children
    kill "$old" 2>/dev/null || true
    [[ -z $kids ]] || kill $kids 2>/dev/null || true
    echo "lane $i: stopped its old controller (pid $old); a run it had started goes on"
  fi
  (
    for step in $lane; do
      echo "[lane $i] $(date -u +%FT%TZ) study all --mode ${step%%:*} --methods ${step#*:}"
      "$PYTHON" -m badit_exp.study all --study "$STUDY" --mode "${step%%:*}" --workers 1 \
        --methods "${step#*:}" || echo "[lane $i] step failed (rc $?); going on"
    done
    echo "[lane $i] $(date -u +%FT%TZ) done"
  ) >> "outputs/lanes/lane$i.log" 2>&1 &
  echo $! > "outputs/lanes/lane$i.pid"
  echo "lane $i: pid $!, log outputs/lanes/lane$i.log"
done
old=$(cat outputs/lanes/committer.pid 2>/dev/null || true)
if [[ $commit == 1 ]] && alive "$old"; then
  echo "committer: already running (pid $old)"
elif [[ $commit == 1 ]]; then
  (
    while true; do
      if [[ -n $(git status --porcelain -- "$results") ]]; then
        sleep 5  # let a run's copy finish
        git add -- "$results"
        git commit -q -m "$STUDY: finished runs so far ($(ls "$results/runs" | wc -l))" \
          -- "$results" || true
      fi
      sleep "$COMMIT_EVERY"
    done
  ) >> outputs/lanes/committer.log 2>&1 &
  echo $! > outputs/lanes/committer.pid
  echo "committer: pid $!, every ${COMMIT_EVERY}s, log outputs/lanes/committer.log"
fi

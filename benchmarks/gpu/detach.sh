#!/usr/bin/env bash
# Runs jobs of run.sh past one call's 10-minute limit: started in a process session of their own (which the
# device machine leaves running between calls while it stays warm), then waited on by the calls that follow,
# each issued right after the one before (the machine goes back about 30 s after a call ends).
#   bash benchmarks/gpu/detach.sh start JOB [JOB ...]   starts run.sh JOB ... (JOB_ARGS, JOB_LIMIT as run.sh's)
#   bash benchmarks/gpu/detach.sh wait SECONDS          waits until the jobs end or SECONDS pass, then copies
#                                                       what they wrote so far to $OUT and prints the log's tail
# The jobs write to /tmp/detached (each call's $OUT is emptied before it), plus exit_code once run.sh ends.
set -uo pipefail
cd "$(dirname "$0")/../.."
DIR=/tmp/detached
case "${1:-}" in
  start)
    shift
    [ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu/detach.sh start JOB [JOB ...]"; exit 2; }
    if [ -f "$DIR/pid" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
      echo "detach.sh: jobs already running (pid $(cat "$DIR/pid")); wait on them first"; exit 2
    fi
    # the machine ends an ordinary user's every process when a call returns, a new session's too
    [ "$(id -u)" = 0 ] || echo "detach.sh: warning: not root (uid $(id -u)): the jobs may end with this call"
    rm -rf "$DIR" && mkdir -p "$DIR"
    # run.sh's own exit status lands in exit_code: the wait calls tell a finished run from a killed one
    OUT="$DIR" setsid nohup bash -c 'bash benchmarks/gpu/run.sh "$@"; echo $? > '"$DIR"'/exit_code' _ "$@" \
      > "$DIR/detached.log" 2>&1 < /dev/null &
    echo $! > "$DIR/pid"
    echo "detach.sh: started run.sh $* as pid $(cat "$DIR/pid"); output in $DIR"
    ;;
  wait)
    seconds=${2:?usage: bash benchmarks/gpu/detach.sh wait SECONDS}
    [ -f "$DIR/pid" ] || { echo "detach.sh: nothing started on this machine (a cold machine lost it)"; exit 2; }
    end=$((SECONDS + seconds))
    while [ ! -f "$DIR/exit_code" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null && [ $SECONDS -lt $end ]; do
      sleep 5
      # a call cut short (the session's device time spent) still returns what $OUT holds: keep it current
      (( SECONDS % 30 < 5 )) && cp -r "$DIR"/. "${OUT:?}/" 2>/dev/null
    done
    cp -r "$DIR"/. "${OUT:?}/" 2>/dev/null
    tail -n 40 "$DIR/detached.log"
    if [ -f "$DIR/exit_code" ]; then
      echo "detach.sh: finished, run.sh exit code $(cat "$DIR/exit_code")"
      exit "$(cat "$DIR/exit_code")"
    elif kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
      echo "detach.sh: still running after ${seconds} s; call wait again at once"
    else
      echo "detach.sh: the jobs ended without an exit code (killed)"; exit 1
    fi
    ;;
  *)
    echo "usage: bash benchmarks/gpu/detach.sh start JOB [JOB ...] | wait SECONDS"; exit 2 ;;
esac

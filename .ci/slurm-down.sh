#!/usr/bin/env bash
# slurm-down.sh - stop what slurm-up.sh started, by PID (pid files), and wipe Slurm state.
# Safe to run when nothing is running. STOP_MUNGE=0 / STOP_MARIADB=0 keep those daemons.
set -uo pipefail
RUN=/run/slurm
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive $RUN/slurmctld.pid; then
  # cancel all jobs first so that no slurmstepd / job process outlives slurmd
  scancel --quiet --user=root 2>/dev/null
  for _ in $(seq 150); do [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break; sleep 0.1; done
fi
stop_pidfiles() {  # SIGTERM all given daemons at once, wait up to 15 s, then SIGKILL
  local f pids=() files=()
  for f in "$@"; do
    if alive "$f"; then pids+=("$(cat "$f")"); files+=("$f"); kill -TERM "$(cat "$f")"; fi
  done
  for _ in $(seq 150); do
    local left=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && { echo "slurm-down: SIGKILL $p" >&2; kill -KILL "$p"; }; done
  rm -f "$@"
}
stop_pidfiles $RUN/slurmd.pid $RUN/slurmctld.pid
stop_pidfiles $RUN/slurmdbd.pid
others=()
[ "${STOP_MARIADB:-1}" = 1 ] && others+=(/run/mysqld/mysqld.pid)
[ "${STOP_MUNGE:-1}" = 1 ] && others+=(/run/munge/munged.pid)
[ ${#others[@]} -gt 0 ] && stop_pidfiles "${others[@]}"
rm -rf /var/spool/slurmctld /var/spool/slurmd
echo "slurm-down: stopped"
exit 0

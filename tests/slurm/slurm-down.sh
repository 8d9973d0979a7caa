#!/usr/bin/env bash
# tests/slurm/slurm-down.sh - stop the cluster tests/slurm/slurm-up.sh started. Idempotent.
#
# Features:
#   * cancels every job first (so no job process outlives slurmd), then kills leftover job pids by pid
#   * stops slurmd, slurmctld and munged by the pids in their pid files, never by process name
#   * --clean: also removes slurm.conf, Slurm state, spool and logs (the packages and munge key stay)
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}
run=/var/run/slurm
spool=/var/spool/slurm
log=/var/log/slurm
clean=0
for arg in "$@"; do
  case $arg in
    --clean) clean=1 ;;
    *) echo "slurm-down: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# shellcheck source=tests/slurm/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"

if [ -s "$run/slurmctld.pid" ] && command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel --full --quiet $jobs 2>/dev/null
    for _ in $(seq 100); do
      [ -z "$(squeue -h -t R,CG,S -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  leftover=$(scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}')
  if [ -n "$leftover" ]; then
    echo "slurm-down: killing leftover job pids $leftover"
    # shellcheck disable=SC2086
    kill -9 $leftover 2>/dev/null
  fi
fi
stop_by_pidfile "$run/slurmd.pid" slurmd
stop_by_pidfile "$run/slurmctld.pid" slurmctld
stop_by_pidfile /var/run/munge/munged.pid munged

if [ "$clean" = 1 ]; then
  rm -rf "$spool" "$run" "$log/slurmctld.log" "$log/slurmd.log" "$log/jobcomp.log" /etc/slurm/slurm.conf
fi
echo "slurm-down: done"

#!/usr/bin/env bash
# tests/slurm/slurm-up.sh - start a real one-node Slurm cluster (munged + slurmctld + slurmd on localhost) for the
# preemption test (tests/test_slurm.py), as root, without systemd or cgroups. Debian 12 (slurm-wlm 22.05).
#
# Features:
#   * installs slurmctld slurmd slurm-client munge (--no-install-recommends) only when a binary is missing
#   * idempotent: rewrites slurm.conf, keeps a munged that answers, restarts slurmctld/slurmd with no jobs
#   * fast requeue: AuthInfo=cred_expire=10 (Slurm default 120 s) + sched_interval=2 -> ~12 s per cycle
#   * JobRequeue=1, MinJobAge=600 (finished jobs stay visible to `scontrol show job`: Restarts=, JobState=)
#   * proctrack/pgid: a job's whole process group dies with it; no accounting DB (sacct does not work)
#   * returns only once the node is `idle`; prints the daemons' pids (pid files under /var/run/slurm)
# Environment: SLURM_CPUS (default nproc), SLURM_MEM_MB (1000), SLURM_CRED_EXPIRE (10, >= 5), SLURM_GPUS (0): the
# node declares that many GPUs (plain files stand in for their device files) and SLURM_CPUS may exceed nproc, so that GPU-node job
# scripts (e.g. experiments/slurm/*.sbatch: --gpus-per-node=8 --ntasks-per-node=8) are accepted on a CPU machine.
# Stop with tests/slurm/slurm-down.sh.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}

cpus=${SLURM_CPUS:-$(nproc)}
gpus=${SLURM_GPUS:-0}
node_gres=""
if [ "$gpus" -gt 0 ]; then node_gres="Gres=gpu:${gpus}"; fi
mem=${SLURM_MEM_MB:-1000}
cred_expire=${SLURM_CRED_EXPIRE:-10}
conf=/etc/slurm/slurm.conf
run=/var/run/slurm
spool=/var/spool/slurm
log=/var/log/slurm
start=$(date +%s)
say() { echo "[slurm-up +$(( $(date +%s) - start ))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm-up: must run as root" >&2; exit 1; }

########################################################################## packages
# Before slurm.conf exists: where no policy-rc.d blocks it, the postinst's init script then starts nothing.
need_install=0
for bin in munged munge unmunge mungekey slurmctld slurmd sbatch scontrol sinfo squeue scancel; do
  command -v "$bin" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  command -v apt-get >/dev/null || { echo "slurm-up: Slurm is missing and there is no apt-get" >&2; exit 1; }
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

########################################################################## munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /var/run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /var/run/munge
chmod 0700 /etc/munge /var/log/munge
chmod 0600 /etc/munge/munge.key
chmod 0711 /var/lib/munge
chmod 0755 /var/run/munge
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  say "munged already answers"
else
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged     # forks; pid file /var/run/munge/munged.pid
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || { echo "slurm-up: munged does not answer" >&2; tail -n 20 /var/log/munge/munged.log >&2; exit 1; }
fi

########################################################################## slurm.conf
mkdir -p /etc/slurm "$run" "$spool/ctld" "$spool/d" "$log"
cat > "$conf" <<CONF
# written by tests/slurm/slurm-up.sh: one-node CI cluster, no systemd, no cgroups, no accounting database
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only cred_expire seconds later (Slurm default 120, minimum 5)
AuthInfo=cred_expire=${cred_expire}
# look at pending jobs every 2 s (defaults: 60 s main scheduler, 30 s backfill)
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# jobs may be requeued (scontrol requeue fails on jobs without it)
JobRequeue=1
# finished jobs stay in scontrol/squeue for 10 minutes (Restarts=, JobState=)
MinJobAge=600
KillWait=10
ReturnToService=2
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# one line per finished run (sacct needs slurmdbd)
JobCompType=jobcomp/filetxt
JobCompLoc=${log}/jobcomp.log
MailProg=/bin/true
StateSaveLocation=${spool}/ctld
SlurmdSpoolDir=${spool}/d
SlurmctldPidFile=${run}/slurmctld.pid
SlurmdPidFile=${run}/slurmd.pid
SlurmctldLogFile=${log}/slurmctld.log
SlurmdLogFile=${log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# the node's declared CPUs/GPUs are taken as configured, even beyond the hardware (SLURM_CPUS, SLURM_GPUS)
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} ${node_gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if [ "$gpus" -gt 0 ]; then
  # slurmd counts a GPU per device file; plain files stand in for /dev/nvidiaN (nothing opens them)
  for i in $(seq 0 $((gpus - 1))); do : > "${run}/fake-gpu${i}"; done
  echo "NodeName=localhost Name=gpu File=${run}/fake-gpu[0-$((gpus - 1))]" > /etc/slurm/gres.conf
else
  rm -f /etc/slurm/gres.conf
fi

########################################################################## slurmctld + slurmd
# shellcheck source=tests/slurm/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"
stop_by_pidfile "$run/slurmd.pid" slurmd
stop_by_pidfile "$run/slurmctld.pid" slurmctld

say "starting slurmctld"
slurmctld -c -i            # -c: no jobs, fresh node state; -i: ignore unreadable state files
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping 2>/dev/null | grep -q UP || { tail -n 30 "$log/slurmctld.log" >&2; exit 1; }

say "starting slurmd"
slurmd -N localhost        # our NodeName is localhost, not $(hostname)
state=
for _ in $(seq 150); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
if [ "$state" != idle ]; then
  echo "slurm-up: node state '$state', not idle" >&2
  tail -n 30 "$log/slurmd.log" "$log/slurmctld.log" >&2
  exit 1
fi
sinfo
say "ready: munged=$(cat /var/run/munge/munged.pid 2>/dev/null) slurmctld=$(cat $run/slurmctld.pid) slurmd=$(cat $run/slurmd.pid)"

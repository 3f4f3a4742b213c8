#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (one controller, one compute node), to try the
# job-array sweep on a laptop; the tests use it too. Run as root:
#
#   bash slurm/local_cluster.sh start [DIR]    # config, state, spool and logs in DIR
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch, squeue, scancel talk to it
#   bash slurm/local_cluster.sh stop [DIR]
#
# DIR defaults to /tmp/mobilenet-compression-slurm. Needs Debian's packages (22.05):
#   apt-get install slurmctld slurmd slurm-client munge
# The daemons are stopped by their pid files; munged is left running for other users of it.
set -euo pipefail
action=${1:-}
dir=${2:-/tmp/mobilenet-compression-slurm}
conf=$dir/slurm.conf

die() { echo "error: $*" >&2; exit 2; }

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

stop_daemon() {
  local pidfile=$1
  [[ -f $pidfile ]] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    wait_for 30 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

case $action in
start)
  [[ $(id -u) == 0 ]] || die "the local SLURM cluster starts its daemons as root; run it with sudo"
  for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install slurmctld slurmd slurm-client munge"
  done
  mkdir -p "$dir/state" "$dir/spool" && chmod 755 "$dir"
  if ! munge -n >/dev/null 2>&1; then  # munged: SLURM's authentication between its daemons
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- munged
    wait_for 10 munge -n || die "munged did not start (see /var/log/munge/munged.log)"
  fi
  node=$(slurmd -C | head -1)   # this machine as SLURM sees it: NodeName=<host> CPUs=... RealMemory=...
  host=$(hostname -s)
  cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$conf
  slurmctld -f "$conf"
  slurmd -f "$conf"
  wait_for 30 bash -c "sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'" \
    || die "the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log"
  echo "SLURM is up: export SLURM_CONF=$conf"
  ;;
stop)
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  ;;
*)
  die "usage: bash slurm/local_cluster.sh start|stop [DIR]"
  ;;
esac

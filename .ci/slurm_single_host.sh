#!/usr/bin/env bash
# A one-node SLURM on this machine, as dask-jobqueue's own CI tests SLURM: installs slurm-wlm and munge through apt
# when missing, writes a one-node slurm.conf (every core and most of the memory of this host, one partition, a
# plain-text job-completion log), starts munged, slurmctld and slurmd, and waits until the node takes jobs.
# Idempotent: a running, configured SLURM is left as it is. Needs root. Every step is time-bounded.
# Exit 3 (the caller skips): SLURM cannot be had on this host (no apt, apt cannot fetch it, the daemons do not start,
# or a probe job with the test's resources does not run); the reason is on stderr.
set -euo pipefail

STATE=/var/lib/nnunetv2_em_slurm
JOBCOMP=$STATE/jobcomp.log

PROBE_CORES=${PROBE_CORES:-2}
PROBE_MEMORY=${PROBE_MEMORY:-6G}

unavailable() { echo "slurm: $*" >&2; exit 3; }

probe() {  # a job with the resources the end-to-end test asks for must start and end within 90 s
    timeout 90 srun --job-name=nnunetv2_em-probe --cpus-per-task="$PROBE_CORES" --mem="$PROBE_MEMORY" --time=1 \
        true >/dev/null 2>&1
}

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    probe || unavailable "SLURM is running but a probe job ($PROBE_CORES cores, $PROBE_MEMORY) did not run in 90 s"
    echo "slurm: already running"; exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || unavailable "neither SLURM nor apt-get here"
    export DEBIAN_FRONTEND=noninteractive
    apt_options=(-y -q -o Acquire::Retries=1 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20)
    timeout 300 apt-get install "${apt_options[@]}" slurm-wlm munge >/dev/null 2>&1 || {
        timeout 300 apt-get update -q -o Acquire::Retries=1 -o Acquire::http::Timeout=20 >/dev/null 2>&1 &&
            timeout 300 apt-get install "${apt_options[@]}" slurm-wlm munge >/dev/null 2>&1; } ||
        unavailable "apt-get could not install slurm-wlm and munge (no package mirror reachable?)"
fi

host=$(hostname -s)
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$STATE" /run/munge
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=nnunetv2em
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
KillWait=5
MinJobAge=60
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged || unavailable "munged did not start"
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || unavailable "slurmctld did not start"
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || unavailable "slurmd did not start"

for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        probe || unavailable "the node is up but a probe job ($PROBE_CORES cores, $PROBE_MEMORY) did not run in 90 s"
        echo "slurm: node $host up ($cpus cores, $memory_mb MB); job completions in $JOBCOMP"; exit 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
done
sinfo >&2 || true
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
unavailable "the daemons started but the node did not come up in 60 s; see /var/log/slurm/"

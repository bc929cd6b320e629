#!/usr/bin/env bash
# A local one-node SLURM cluster (Debian's slurm-wlm + munge) for tests, CI and
# users who want to try the SLURM path of the harness on one machine.
#
# Usage: scripts/slurm_local.sh [up|down|status]      (needs root; default: up)
#   up      install slurm-wlm/munge if missing, write /etc/slurm/slurm.conf for
#           this host, start munged, slurmctld, slurmd and wait until the node
#           is idle. Idempotent: if everything is already up it returns quickly;
#           dead daemons are restarted; a changed config restarts the daemons.
#   down    stop slurmd, slurmctld, munged (running jobs are lost).
#   status  sinfo + squeue.
#
# Environment: SLURM_LOCAL_PARTITION (default debug), SLURM_LOCAL_CLUSTER
# (default harness-local), SLURM_LOCAL_WAIT_S (default 60).
#
# Gotchas learnt while making this work (Debian 12 VM, slurm-wlm 22.05.8,
# munge 0.5.15, submitit 1.5.4, PID 1 not an init system, no systemd):
# - No systemd: the packages' postinst starts nothing, so the daemons are started
#   directly; they daemonize and write pid files under /run, which `down` uses
#   (no killing by process name).
# - PID 1 here is not a real init and reaps orphans late: a stopped daemon stays
#   a zombie for a while and `kill -0` still succeeds on it, so "alive" checks
#   also look at the process state (otherwise `down` waited 10 s per daemon).
# - --no-install-recommends: 9 packages instead of ~45 (the recommends pull in
#   HDF5/ROCm-SMI/IPMI/elasticsearch plugins and their -dev packages). The
#   "mpi/pmix ... can not load PMIx library" errors in the logs are harmless.
# - Debian's munge postinst already creates /etc/munge/munge.key (munge:munge
#   0400); we only create one if it is missing. munged runs as `munge` with
#   /run/munge owned by it; `munge -n | unmunge` is the health check.
# - Debian creates a `slurm` user but no slurm.conf. We use SlurmUser=root
#   (fine for a local test cluster, no chown of state/log dirs; jobs still run
#   as the submitting user).
# - The node line copies the topology from `slurmd -C` (Slurm drains a node
#   whose declared sockets/cores/threads or RealMemory exceed what slurmd finds);
#   RealMemory is set 5% below what slurmd reports.
# - With CR_Core_Memory and no DefMemPerCPU a job without --mem gets the whole
#   node's memory, so jobs run one at a time; DefMemPerCPU = RealMemory / CPUs.
# - A requeued job stays PENDING (reason BeginTime) for AuthInfo=cred_expire
#   seconds (default 120, minimum 5); cred_expire=10 makes `scontrol requeue`
#   and submitit's checkpoint/requeue cycle take ~12 s instead of ~2 min.
# - submitit ignores SIGTERM in its jobs; it checkpoints and requeues itself on
#   USR2 (submitit 1.5.4 default, env SUBMITIT_PREEMPT_SIGNAL; not USR1), which
#   it asks for with `#SBATCH --signal=USR2@90`. An external `scontrol requeue`
#   therefore calls no checkpoint and the job keeps running until KillWait
#   expires (KillWait=5 here); a job that finishes within KillWait writes its
#   result AND is requeued (it runs again).
# - `scancel --signal=USR2 <id>` reaches only job steps: fine with submitit's
#   default srun launch, but with slurm_use_srun=False the job never sees it
#   (needs `scancel --full`; checked here).
# - slurmctld restores the node state from /var/spool/slurmctld, so `sinfo`
#   says "idle" even when slurmd is dead (until SlurmdTimeout); `up` therefore
#   asks slurmd itself (`scontrol show slurmd`) and, after starting slurmd,
#   waits for the node's SlurmdStartTime to be new.
# - Dependencies and requeued jobs wait for a scheduler pass:
#   sched_interval=2/bf_interval=1 make the test cluster react in seconds.
# - With slurmctld down, `sinfo` retries for ~9 s before failing.
# - Without slurmdbd `sacct` fails ("Slurm accounting storage is disabled");
#   submitit only logs a warning and relies on its result files (it then cannot
#   tell that a job died without writing one: use bounded waits).
# - MailProg must exist or slurmctld logs an error: /bin/true.
# - The short hostname must resolve (slurmctld/slurmd look it up); if it does
#   not, it is added to /etc/hosts as 127.0.0.1.
set -euo pipefail

CMD=${1:-up}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CLUSTER=${SLURM_LOCAL_CLUSTER:-harness-local}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm_local: $*"; }
die() { echo "slurm_local: ERROR: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0 $CMD)"; }

pid_alive() { # pidfile [expected comm]
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -n "${2:-}" ]; then [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] || return 1; fi
  # A killed daemon can linger as a zombie until PID 1 reaps it (kill -0 still works).
  case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*|'') return 1 ;; esac
}

stop_pidfile() { # pidfile name
  local pid _
  if pid_alive "$1" "$2"; then
    pid=$(cat "$1")
    log "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do pid_alive "$1" "$2" || break; sleep 0.1; done
    if pid_alive "$1" "$2"; then log "$2 did not stop in 10 s, sending KILL"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$1"
}

dump_logs() {
  local f
  for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "----- tail $f" >&2; tail -n 30 "$f" >&2; }
  done
  echo "----- sinfo" >&2; sinfo -N -l >&2 2>&1 || true
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
     && command -v munged >/dev/null && command -v mungekey >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  local opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  if ! apt-get install "${opts[@]}" slurm-wlm munge >/tmp/slurm_local.apt.log 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>/tmp/slurm_local.apt.log 2>&1
    apt-get install "${opts[@]}" slurm-wlm munge >>/tmp/slurm_local.apt.log 2>&1 \
      || { tail -n 30 /tmp/slurm_local.apt.log >&2; die "apt-get install failed (log: /tmp/slurm_local.apt.log)"; }
  fi
}

ensure_hostname() {
  if ! getent hosts "$HOST" >/dev/null; then
    log "hostname $HOST does not resolve; adding it to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
  fi
}

start_munge() {
  id munge >/dev/null 2>&1 || die "user munge missing (munge package not installed correctly?)"
  install -d -o munge -g munge -m 0700 /etc/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if ! pid_alive "$MUNGE_PID" munged; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"
    runuser -u munge -- /usr/sbin/munged
  fi
  local _
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.2; done
  dump_logs; die "munge does not work (munge -n | unmunge)"
}

node_line() {
  # slurmd -C: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24031"
  local c cpus mem topo n
  c=$(slurmd -C | head -n1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$c")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$c")
  n=$(nproc)
  { [ -n "$cpus" ] && [ -n "$mem" ]; } || die "cannot parse 'slurmd -C': $c"
  if [ "$cpus" = "$n" ]; then
    topo=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$c")
    topo="CPUs=$cpus $topo"
  else
    topo="CPUs=$n"  # nproc limited (affinity/cgroup): declare only what we may use
  fi
  mem=$((mem * 95 / 100))
  echo "NodeName=$HOST NodeAddr=$HOST $topo RealMemory=$mem State=UNKNOWN"
  echo "# DefMemPerCPU=$((mem / n))"
}

write_conf() {
  # returns 0 if the config changed
  local nl defmem new
  nl=$(node_line)
  defmem=$(sed -n 's/^# DefMemPerCPU=//p' <<<"$nl")
  nl=$(head -n1 <<<"$nl")
  new=$(cat <<EOF
# Generated by scripts/slurm_local.sh: a one-node local test cluster. Do not edit.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
ReturnToService=2
MinJobAge=10
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobRequeue=1
$nl
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
  mkdir -p "$CONF_DIR"
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 1; fi
  log "writing $CONF"
  printf '%s\n' "$new" >"$CONF"
  chmod 0644 "$CONF"
  return 0
}

slurmd_answers() { timeout 5 scontrol show slurmd >/dev/null 2>&1; }  # asks the local slurmd itself

slurmd_start_time() { # epoch seconds of the registered slurmd start, 0 if unknown
  local t
  t=$(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
  date -d "$t" +%s 2>/dev/null || echo 0
}

node_state() { sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1; }

cluster_ok() {
  pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd || return 1
  slurmd_answers || return 1
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

up() {
  need_root
  install_packages
  ensure_hostname
  start_munge
  mkdir -p "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  local changed=0
  write_conf && changed=1
  if [ "$changed" = 0 ] && cluster_ok; then
    log "already up: $(sinfo -h -o '%P %D %T %C')"
    return
  fi
  if [ "$changed" = 1 ]; then
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
  fi
  if ! pid_alive "$CTLD_PID" slurmctld; then
    log "starting slurmctld"
    rm -f "$CTLD_PID"
    slurmctld || { dump_logs; die "slurmctld failed to start"; }
  fi
  if pid_alive "$SLURMD_PID" slurmd && ! slurmd_answers; then
    log "slurmd does not answer; restarting it"
    stop_pidfile "$SLURMD_PID" slurmd
  fi
  local slurmd_started=0
  if ! pid_alive "$SLURMD_PID" slurmd; then
    log "starting slurmd"
    rm -f "$SLURMD_PID"
    slurmd_started=$(date +%s)
    slurmd || { dump_logs; die "slurmd failed to start"; }
  fi
  local t0=$SECONDS st last_resume=-100
  while :; do
    st=$(node_state || true)
    case "$st" in
      idle|mixed|allocated|completing)
        # slurmctld restores the node state from its state files, so "idle" may be
        # stale; after (re)starting slurmd wait until it has registered.
        [ "$slurmd_started" = 0 ] && break
        [ "$(slurmd_start_time)" -ge "$slurmd_started" ] && break ;;
      down*|drain*|fail*)
        # ReturnToService=2 usually brings it back by itself; nudge it every 5 s.
        if [ $((SECONDS - last_resume)) -ge 5 ]; then
          log "node $HOST is $st; resuming it"
          scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
          last_resume=$SECONDS
        fi ;;
    esac
    if ! pid_alive "$CTLD_PID" slurmctld || ! pid_alive "$SLURMD_PID" slurmd; then
      dump_logs; die "a slurm daemon died during startup"
    fi
    if [ $((SECONDS - t0)) -ge "$WAIT_S" ]; then
      dump_logs; die "node $HOST not idle after ${WAIT_S}s (state: ${st:-unknown})"
    fi
    sleep 1
  done
  log "up: $(sinfo -h -o 'partition=%P nodes=%D state=%T cpus(A/I/O/T)=%C')"
}

down() {
  need_root
  stop_pidfile "$SLURMD_PID" slurmd
  stop_pidfile "$CTLD_PID" slurmctld
  stop_pidfile "$MUNGE_PID" munged
  log "down"
}

status() {
  command -v sinfo >/dev/null || die "slurm is not installed (run: $0 up)"
  if ! { sinfo && squeue; }; then die "the cluster does not answer (start it: $0 up)"; fi
}

case "$CMD" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac

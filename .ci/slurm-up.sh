#!/usr/bin/env bash
# Start (or reuse) a 2-node Slurm cluster on this machine with accounting (sacct), no systemd.
#
#   .ci/slurm-up.sh          install Debian's slurm + mariadb if missing, start what is not running
#   .ci/slurm-up.sh down     stop the daemons this script started
#
# One slurmctld, one slurmdbd (+ a private MariaDB) and two slurmd daemons, nodes n1 and n2 (partition
# `debug`), each its own slurmd on its own port: NodeAddr=127.0.0.1, so all Slurm traffic stays on loopback.
# A 1-node job lands on either node; `sbatch -N2` gets n[1-2]. The node names need not resolve: a multi-node
# job's rendezvous address is the head node's NodeAddr (executors/slurm.py), never a lookup of "n1".
#
# State lives in $NEMO_AUTOMODEL_SLURM_DIR (default /var/tmp/nemo-automodel-ci/slurm); clients
# need SLURM_CONF=$NEMO_AUTOMODEL_SLURM_DIR/slurm.conf (tests/executors/conftest.py sets it).
# Idempotent: a second run finds the daemons alive and only waits for `sinfo` to show the nodes. A changed
# slurm.conf (e.g. the former single-node layout) restarts slurmctld and the slurmds.
#
# Only root installs, starts or stops the cluster (apt-get; slurmd runs as root). Run by another user, the script
# exits 0 when a cluster that root started is up (it is used as it is), else 77 with one line saying why: the
# Slurm tests skip with that line (tests/executors/conftest.py), or fail under NEMO_AUTOMODEL_STRICT=1.
set -euo pipefail
D="${NEMO_AUTOMODEL_SLURM_DIR:-/var/tmp/nemo-automodel-ci/slurm}"
export SLURM_CONF="$D/slurm.conf"
DB_PORT="${NEMO_AUTOMODEL_SLURM_DB_PORT:-3307}"
NODES=(n1 n2)                                        # node i (0-based) listens on SLURMD_PORT0 + i + 1
SLURMD_PORT0="${NEMO_AUTOMODEL_SLURMD_PORT:-17820}"
log() { echo "[slurm-up] $*" >&2; }

# running and not a zombie (without an init that reaps, a stopped daemon can linger as one)
alive() { local p; p=$(cat "$D/$1.pid" 2>/dev/null) && [[ -n "$p" ]] && ps -o stat= -p "$p" 2>/dev/null | grep -qv '^Z'; }
stop() {  # stop NAME: the daemon whose pid is in $D/NAME.pid, if alive
  if alive "$1"; then
    kill "$(cat "$D/$1.pid")"
    for ((i = 0; i < 100; i++)); do alive "$1" || break; sleep 0.2; done
    log "stopped $1"
  fi
}
SLURMDS=("${NODES[@]/#/slurmd-}" slurmd)  # slurmd: the single node of the former layout
nodes_up() { (($(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)$') == ${#NODES[@]})); }

if [[ $(id -u) != 0 ]]; then
  [[ "${1:-}" != down ]] || { log "not root (uid $(id -u)): only root can stop the local Slurm cluster"; exit 77; }
  if [[ -r "$SLURM_CONF" ]] && command -v sinfo >/dev/null && nodes_up && sacct -n -X -S now-1minute >/dev/null 2>&1
  then
    log "up (started by root, used as it is): SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  log "not root (uid $(id -u)): the local Slurm cluster is not up in $D and only root can install and start it:" \
      "run \`make engines\` (.ci/slurm-up.sh) as root"
  exit 77
fi

if [[ "${1:-}" == down ]]; then
  for d in "${SLURMDS[@]}" slurmctld slurmdbd mariadb; do stop "$d"; done
  exit 0
fi

need=()
for bin in slurmctld slurmd sbatch slurmdbd mariadbd; do command -v "$bin" >/dev/null || need+=("$bin"); done
if ((${#need[@]})); then
  log "installing slurmctld slurmd slurm-client slurmdbd mariadb-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null; }
fi

mkdir -p "$D"/{state,log,gres} "${NODES[@]/#/$D/spool/}"
touch "$D/gres/nvidia0" "$D/gres/nvidia1"   # fake GPU device files: lets --gpus-per-node be scheduled
mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 2048))  # per node: half the machine's memory

# A requeued job may start again cred_expire + 1 s after its requeue (Slurm's default: 121 s), at the main
# scheduler's next periodic pass (every 60 s by default): cred_expire=10 and sched_interval=1 restart it 11 s after
# its requeue (measured; it was 40 s with cred_expire=20 and the defaults).
node_lines=""
for i in "${!NODES[@]}"; do
  node_lines+="NodeName=${NODES[i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + i + 1))"
  node_lines+=" CPUs=4 RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN"$'\n'
done
cat >"$D/slurm.conf.new" <<EOF
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=1
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
GresTypes=gpu
${node_lines}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$D/slurm.conf.new" "$D/slurm.conf"; then  # a new layout: the daemons of the old one restart
  for d in "${SLURMDS[@]}" slurmctld; do alive "$d" && log "slurm.conf changed: restarting $d"; stop "$d"; done
  rm -f "$D"/state/node_state*
fi
mv "$D/slurm.conf.new" "$D/slurm.conf"
echo "Name=gpu File=$D/gres/nvidia[0-1]" >"$D/gres.conf"
cat >"$D/slurmdbd.conf" <<EOF
AuthType=auth/none
DbdHost=localhost
SlurmUser=root
PidFile=$D/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$D/slurmdbd.conf"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local n=$(($1 * 5)) what=$2; shift 2
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

if ! alive mariadb; then
  if [[ ! -d "$D/mysql/mysql" ]]; then
    log "initialising MariaDB in $D/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$D/mysql" --auth-root-authentication-method=normal >"$D/log/mariadb-install.log" 2>&1
  fi
  log "starting mariadbd on 127.0.0.1:$DB_PORT"
  setsid mariadbd --no-defaults --user=root --datadir="$D/mysql" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --socket="$D/mysqld.sock" --pid-file="$D/mariadb.pid" --skip-grant-tables \
    --log-error="$D/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 30 mariadb bash -c "exec 3<>/dev/tcp/127.0.0.1/$DB_PORT"
fi
if ! alive slurmdbd; then
  log "starting slurmdbd"
  setsid slurmdbd -D </dev/null >>"$D/log/slurmdbd.out" 2>&1 &
  echo $! >"$D/slurmdbd.pid"
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
fi
if ! alive slurmctld; then
  log "starting slurmctld"
  setsid slurmctld -D </dev/null >>"$D/log/slurmctld.out" 2>&1 &
  echo $! >"$D/slurmctld.pid"
  wait_for 30 slurmctld scontrol ping
fi
for n in "${NODES[@]}"; do
  if ! alive "slurmd-$n"; then
    log "starting slurmd $n"
    setsid slurmd -D -N "$n" </dev/null >>"$D/log/slurmd-$n.out" 2>&1 &
    echo $! >"$D/slurmd-$n.pid"
  fi
done
wait_for 30 "${#NODES[@]} nodes up" nodes_up \
  || { scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume || true; wait_for 15 "nodes up" nodes_up; }
wait_for 30 "sacct (slurmdbd registration)" sacct -n -X -S now-1minute
log "up: SLURM_CONF=$SLURM_CONF ($(sinfo -h -o '%P %D %T %C'))"

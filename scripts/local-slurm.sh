#!/usr/bin/env bash
# A real one-node Slurm cluster on loopback, every daemon and file in one
# folder, for the fleet-launch tests (and for trying deploy/slurm/ by hand).
#
#   scripts/local-slurm.sh install       # Debian slurmctld slurmd slurm-client munge, when missing
#   scripts/local-slurm.sh start DIR     # munged + slurmctld + slurmd; prints `export SLURM_CONF=…`
#   scripts/local-slurm.sh stop DIR      # stops them by their PID files
#
# Needs root (slurmd launches jobs as their owner). The node is this host
# (`hostname -s`, NodeAddr 127.0.0.1) with CPUs=2 and OverSubscribe=FORCE:8,
# so `sbatch --ntasks=3 --overcommit` runs three tasks on it.
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

cmd="${1:-}"
case "$cmd" in
install)
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  as_root apt-get install -y "${pkgs[@]}" >/dev/null 2>&1 \
    || { as_root apt-get update >/dev/null && as_root apt-get install -y "${pkgs[@]}" >/dev/null; } \
    || { echo "local-slurm.sh: installing ${pkgs[*]} failed (needs root or passwordless sudo, and apt)" >&2; exit 1; }
  ;;
start)
  dir="${2:?usage: local-slurm.sh start DIR}"
  mkdir -p "$dir"/{state,spool,log,munge}
  dir="$(cd "$dir" && pwd)"
  host="$(hostname -s)"
  # Ports: free ones, so several runs (or a real Slurm on the host) do not collide.
  ports=$(python3 - <<'EOF'
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))
EOF
)
  read -r ctld_port slurmd_port <<<"$ports"

  # munge: its own key, socket and PID file in DIR.
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 700 "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  as_root munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

  cpus=2
  mem=$(awk '/MemTotal/ {print int($2/1024/2)}' /proc/meminfo)
  cat >"$dir/slurm.conf" <<EOF
ClusterName=zeroshard-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=30
InactiveLimit=0
MinJobAge=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
  export SLURM_CONF="$dir/slurm.conf"
  as_root slurmctld -f "$SLURM_CONF"
  as_root slurmd -f "$SLURM_CONF"
  # Ready when the node is idle.
  for _ in $(seq 1 100); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$SLURM_CONF"
      exit 0
    fi
    sleep 0.2
  done
  echo "local-slurm.sh: the node did not come up in 20 s; logs in $dir/log" >&2
  sinfo -N >&2 || true
  exit 1
  ;;
stop)
  dir="${2:?usage: local-slurm.sh stop DIR}"
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    as_root kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    as_root kill -9 "$pid" 2>/dev/null || true
  done
  ;;
*)
  echo "usage: local-slurm.sh install | start DIR | stop DIR" >&2
  exit 2
  ;;
esac

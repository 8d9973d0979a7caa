# Shared by slurm-up.sh and slurm-down.sh (sourced, not run).

# stop_by_pidfile FILE NAME: SIGTERM the pid in FILE if that process is NAME; SIGKILL after 10 s; remove FILE
stop_by_pidfile() {
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    echo "slurm: stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "slurm: SIGKILL $name $pid"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$file"
}

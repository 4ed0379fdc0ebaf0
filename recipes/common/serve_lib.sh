# Start an OpenAI-compatible server in the background and wait until it answers (sourced, not run).
#   serve_until_ready PORT COMMAND...   -> SERVER_PID; the server is stopped when the shell exits
# Used by recipes/eval/run_eval.sh (the model under test) and recipes/row.sh (the math teacher).

serve_until_ready() {
  local port=$1 tries
  shift
  "$@" &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
  # Loading a 235B model from disk can take many minutes: wait up to an hour.
  for tries in $(seq 1 720); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited: $*" >&2; exit 1; }
    sleep 5
  done
  echo "server not ready after $((tries * 5)) s: $*" >&2
  exit 1
}

# stop_server: stop the server started by serve_until_ready (before the next stage needs its GPUs).
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  trap - EXIT
}

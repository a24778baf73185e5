#!/usr/bin/env bash
# `just run`: the bundled mock LLM gateway behind Envoy with llm-meter (envoy/envoy.yaml), some
# sample traffic, and the resulting llm_* metrics from Envoy's /stats/prometheus.
# Ports: mock 8000, Envoy listener 10000, Envoy admin 9901 (as in envoy/envoy.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
for arg in "$@"; do
  case "$arg" in
    --once) once=true ;;
    *) echo "usage: just run [--once]" >&2; exit 2 ;;
  esac
done

for port in 8000 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop whatever listens there (a previous 'just run'?)" >&2
    exit 1
  fi
done

mkdir -p .run
pids=()
cleanup() {
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

target/release/mock-llm --port 8000 >.run/mock.out 2>.run/mock.log &
pids+=($!)
.venv/bin/envoy -c envoy/envoy.yaml --concurrency 2 --log-level warn --file-flush-interval-msec 200 >.run/envoy.log 2>&1 &
pids+=($!)

ready=false
for _ in $(seq 150); do
  if curl -sf http://127.0.0.1:9901/ready >/dev/null && curl -sf http://127.0.0.1:8000/healthz >/dev/null; then
    ready=true
    break
  fi
  sleep 0.1
done
if ! $ready; then
  echo "Envoy or the mock did not come up; logs:" >&2
  tail -n 20 .run/envoy.log .run/mock.log >&2
  exit 1
fi
echo "mock gateway on :8000, Envoy on :10000 (admin :9901); logs in .run/"

send() { # description, then curl arguments
  local what=$1
  shift
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' "$@" || true)
  printf '  %-58s -> HTTP %s\n' "$what" "$code"
}
chat=http://127.0.0.1:10000/v1/chat/completions
json=(-H 'content-type: application/json')
echo "sample traffic:"
send "chat gpt-4o (app web)" "${json[@]}" -H 'x-app-id: web' $chat \
  -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}],"max_tokens":20}'
send "chat gpt-4o, 40 of 120 prompt tokens cached (app web)" "${json[@]}" -H 'x-app-id: web' \
  -H 'x-mock-prompt-tokens: 120' -H 'x-mock-cached-tokens: 40' $chat \
  -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Summarise"}]}'
send "streaming chat gpt-4o-mini with usage (app cli)" "${json[@]}" -H 'x-app-id: cli' \
  -H 'x-mock-chunk-delay-ms: 20' $chat \
  -d '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Count to ten"}]}'
send "embeddings text-embedding-3-small" "${json[@]}" http://127.0.0.1:10000/v1/embeddings \
  -d '{"model":"text-embedding-3-small","input":["first text","second text"]}'
send "chat gpt-4o, upstream answers 429" "${json[@]}" -H 'x-mock-scenario: rate_limit' $chat \
  -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
send "chat gpt-4o, upstream answers 500" "${json[@]}" -H 'x-mock-scenario: server_error' $chat \
  -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
big=$(mktemp)
printf '{"model":"gpt-4o","messages":[{"role":"user","content":"%s"}]}' "$(head -c 600000 /dev/zero | tr '\0' a)" >"$big"
send "chat gpt-4o, 600 KB prompt (over max_input_tokens)" "${json[@]}" $chat --data-binary "@$big"
rm -f "$big"

# Histograms reach /stats/prometheus at the next stats flush (stats_flush_interval: 5s): wait
# until all seven requests are in the duration histogram.
echo "waiting for Envoy's next stats flush (histograms)..."
for _ in $(seq 100); do
  curl -s http://127.0.0.1:9901/stats/prometheus |
    awk '/^llm_request_duration_ms_count/ { n += $2 } END { exit !(n >= 7) }' && break
  sleep 0.1
done
echo
echo "llm_* metrics on http://127.0.0.1:9901/stats/prometheus (histogram buckets omitted):"
curl -s http://127.0.0.1:9901/stats/prometheus | grep -E '^(# TYPE )?llm_' | grep -v '_bucket{' || true

echo
echo "per-request records: the access log in .run/envoy.log, one JSON line per request; the last one:"
grep '^{' .run/envoy.log | grep '"llm":{' | tail -n 1 || true
echo
echo "the daily cost per app and model from those records (python3 tools/llm_cost.py .run/envoy.log):"
python3 tools/llm_cost.py .run/envoy.log || true

if $once; then
  exit 0
fi
echo
echo "Running. Send requests to http://127.0.0.1:10000/v1/chat/completions; Ctrl-C to stop."
wait

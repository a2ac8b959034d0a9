#!/usr/bin/env bash
# The GPU tests and benchmarks in one go, for a machine with an NVIDIA GPU:
#   scripts/gpu_bench.sh OUT_DIR [tests] [kernels] [w3] [w1] [w4] [profile] [startup] [tp]
# (no step named: all but tp, which needs two GPUs). Each step's log goes to
# OUT_DIR/<step>.log and the JSON records it writes to OUT_DIR/results. Set KILN_COMMIT
# where the checkout has no git history.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [step ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests kernels w3 w1 w4 profile startup)
mkdir -p "$out/results"
export PYTHONPATH=.
stamp=$(mktemp)

for step in "${steps[@]}"; do
    case $step in
        tests) cmd=(python -m pytest -m gpu -q -s tests/codegen tests/gpu) ;;
        kernels) cmd=(python -m benchmarks.kernels) ;;
        w3) cmd=(python -m benchmarks.latency) ;;
        w1) cmd=(python -m benchmarks.throughput --target cuda --peer-requests 16 --runner-split) ;;
        w4) cmd=(python -m benchmarks.serving --target cuda) ;;
        profile) cmd=(python -m benchmarks.profile --layers 4 --graphs) ;;
        startup) cmd=(python -m benchmarks.startup) ;;
        tp) cmd=(python -m benchmarks.tensor_parallel --w2-requests 1000) ;;
        *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
    "${cmd[@]}" > "$out/$step.log" 2>&1
    echo "$step: exit $? (${cmd[*]})"
    tail -n 4 "$out/$step.log"
done
find benchmarks/results -name '*.json' -newer "$stamp" -exec cp {} "$out/results/" \;
rm -f "$stamp"

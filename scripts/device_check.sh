#!/usr/bin/env bash
# GPU check: the op tests on the device (fp32 + bf16 against the float64 reference), then the loss
# benchmark against Liger and cut-cross-entropy. Everything lands in $OUT (default outputs/device_check).
#
#   bash scripts/device_check.sh --fetch-wheels    # here, once (needs PyPI): wheels into .cache/device_wheels
#   bash scripts/device_check.sh                   # on the GPU machine, with .cache/device_wheels carried
#   bash scripts/device_check.sh --device cpu --tests "tests/ops/test_dense.py" --tokens 64 --hidden 64 --vocab 512
#                                                  # CPU dry run (tests/test_device_check.py runs one)
#
# Options: --device cuda|cpu (default cuda), --tests "PYTEST ARGS" (default: the four op test files),
# --fetch-wheels; every other argument goes to benchmarks/loss_bench.py. $PYTHON picks the interpreter
# (default python3). eaft_plugins is imported from this checkout (PYTHONPATH), never pip-installed.
# Each phase has a time limit so that the whole run stays under 8 minutes on the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/outputs/device_check}
WHEELS=$ROOT/.cache/device_wheels  # ignored by .gitignore's .cache/; `carry` takes it to the device
DEVICE=cuda
TESTS="tests/ops/test_dense.py tests/ops/test_fused.py tests/models/test_patch.py tests/ops/test_vocab_parallel.py"
BENCH=()
FETCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tests) TESTS=$2; shift 2 ;;
    --fetch-wheels) FETCH=1; shift ;;
    *) BENCH+=("$1"); shift ;;
  esac
done

if [ "$FETCH" = 1 ]; then
  # Pure-Python wheels; their requirements (torch, triton) are already on the device image.
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" \
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1
fi

mkdir -p "$OUT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/eaft_device_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    && export PYTHONPATH=$PYTHONPATH:$SITE
fi
START=$(date +%s)

"$PY" - "$DEVICE" > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if sys.argv[1] == "cuda":
    print("gpu", torch.cuda.get_device_name(0), "available", torch.cuda.is_available())
for name in ("triton", "transformers", "peft", "liger-kernel", "cut-cross-entropy", "llamafactory"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF

read -ra TEST_ARGS <<< "$TESTS"
timeout 200 "$PY" -m pytest "${TEST_ARGS[@]}" --device "$DEVICE" -q -ra -p no:cacheprovider \
  --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1
TESTS_RC=$?
tail -n 25 "$OUT/tests.log"

# A run cut by the limit keeps the JSON of the methods it finished (the benchmark writes it as it goes).
timeout 270 "$PY" benchmarks/loss_bench.py --device "$DEVICE" --repeat 3 --json "$OUT/loss_bench.json" \
  --plot "$OUT/perf_loss_$DEVICE.png" "${BENCH[@]}" > "$OUT/bench.log" 2>&1
BENCH_RC=$?

"$PY" - "$OUT" "$DEVICE" "$TESTS_RC" "$BENCH_RC" "$START" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, "benchmarks")
from loss_bench import markdown

out, device, tests_rc, bench_rc, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tests = {"rc": tests_rc, "passed": 0, "failed": [], "skipped": {}}
if (out / "tests.xml").exists():
    for case in ET.parse(out / "tests.xml").iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad, skip = case.find("failure"), case.find("skipped")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            tests["failed"].append(name)
        elif skip is not None:
            reason = skip.get("message", "")
            tests["skipped"][reason] = tests["skipped"].get(reason, 0) + 1
        else:
            tests["passed"] += 1
bench = json.loads((out / "loss_bench.json").read_text()) if (out / "loss_bench.json").exists() else None
summary = {"device": device, "seconds": round(time.time() - start), "tests": tests,
           "bench": {"rc": bench_rc, "cases": len(bench["results"]) if bench else 0}}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
if bench:
    print(markdown(bench))
print(json.dumps(summary, indent=1))
EOF
SUMMARY_RC=$?
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$SUMMARY_RC" = 0 ]

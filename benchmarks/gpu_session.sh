#!/usr/bin/env bash
# The one command a lent GPU runs (the device tool: a bare machine, minutes of time, no network). Every section has
# its own time limit and writes its figures under $OUT as soon as they exist, most important first, so a run cut
# short still returns what it measured:
#   1. the README's path on the 12B shapes (benchmarks/gpu_generate.py: g4.generate on the serving layout, bf16 /
#      int8 / int4 at batch 1, bf16 at 8 and 32 rows, the engine with 8 and 32 slots, against the copy bandwidth)
#   2. ours, kernel by kernel (benchmarks/gpu_12b.py: ceilings, prefill 8K against the matmul rate, attention
#      kernels, decode_step on the stored layout)
#   3. transformers on the same card (benchmarks/gpu_12b_transformers.py; transformers 5.24 carried as a wheel in
#      .whl/, the machine's torch)
#   4. speculative decoding's cost per call (benchmarks/speculative.py --gpu-12b)
# Usage there: bash benchmarks/gpu_session.sh   (with .whl carried; budget in seconds as $1, default 540)
set -uo pipefail
budget=${1:-540}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p /tmp/site "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c 'import jax, transformers, torch; print("jax", jax.__version__, jax.devices(), "transformers",
transformers.__version__, "torch", torch.__version__)' 2>&1 | tail -1 | tee -a "$OUT/card.txt"
python3 - <<'EOF'
import gemma4_eqx as g4
g4.Gemma4Config.gemma4_12b().save_pretrained("/tmp/cfg12b")
EOF

run() {  # run NAME SECONDS CMD...: at most SECONDS, never past the budget
    local name=$1 limit=$2; shift 2
    local l; l=$(left); (( l < limit )) && limit=$l
    if (( limit < 20 )); then echo "== $name: skipped ($(left) s left)" | tee -a "$OUT/sections.txt"; return; fi
    echo "== $name (limit ${limit} s)" | tee -a "$OUT/sections.txt"
    local t0; t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/sections.txt"
    tail -n 40 "$OUT/$name.log"
}

run generate 200 python3 benchmarks/gpu_generate.py --out "$OUT"
run ours 150 python3 benchmarks/gpu_12b.py --out "$OUT"
run transformers 110 python3 benchmarks/gpu_12b_transformers.py --config /tmp/cfg12b/config.json --out "$OUT"
run speculative 70 python3 benchmarks/speculative.py --gpu-12b --out "$OUT"
echo "== done after $(( $(date +%s) - start )) s" | tee -a "$OUT/sections.txt"

#!/usr/bin/env bash
# GSM-Symbolic (reasoning-gym's generator, 200 problems, data seed 0) with Qwen2.5-Coder-1.5B-Instruct, and the
# program-aided checks' ablation: each method with and without them. Resumable (the run files are named by their
# settings; `--limit` only stops a run early, so LIMIT=100 now and the full run later continue the same file).
#
#   LIMIT=100 bash evals/results/run_gsm_symbolic.sh cot     # one chain: cot, sc, fot, rest, arithmetic
#   bash evals/results/run_gsm_symbolic.sh                   # all of them (days on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
COMMON="--model qwen2.5-coder-1.5b --out ${OUT_DIR:-evals/results} --rollouts 1 --max-tokens 384"
COMMON="$COMMON --concurrency ${CONCURRENCY:-16} --device ${DEVICE:-cpu} --dtype ${DTYPE:-auto} --no-report"
GSM="--n 200 --data-seed 0 --limit ${LIMIT:-200}"

gsm() { $PY -m evals.gsm_symbolic $GSM $COMMON "$@"; }
cot() { gsm --method cot --code-checks off; gsm --method cot --code-checks on; }
sc() { gsm --method sc --trees 8 --code-checks off; gsm --method sc --trees 8 --code-checks on; gsm --method sc --trees 4; }
fot() { gsm --method fot --trees 4 --code-checks off; gsm --method fot --trees 4; gsm --method fot --trees 8; }
rest() { gsm --method mctsr; }
arithmetic() { $PY -m evals.arithmetic --n 56 --levels 1,2,3,4 $COMMON --method fot --trees 4; }

chains=("$@")
[ ${#chains[@]} -gt 0 ] || chains=(cot sc fot rest arithmetic)
for chain in "${chains[@]}"; do
    $chain
done

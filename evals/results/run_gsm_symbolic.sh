#!/usr/bin/env bash
# GSM-Symbolic (reasoning-gym's generator, 200 problems, data seed 0) with Qwen2.5-Coder-1.5B-Instruct, and the
# rule checks' ablation: each method without them, with the code check only, and with both (code and arithmetic),
# and FoT with two of its four trees answering with a program. Resumable (the run files are named by their
# settings; `--limit` only stops a run early, so LIMIT=100 now and the full run later continue the same file).
#
#   LIMIT=100 bash evals/results/run_gsm_symbolic.sh cot     # one chain: cot, sc, fot, rest, arithmetic, tiebreak
#   bash evals/results/run_gsm_symbolic.sh                   # all of them (days on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
COMMON="--model qwen2.5-coder-1.5b --out ${OUT_DIR:-evals/results} --rollouts 1 --max-tokens 384"
COMMON="$COMMON --concurrency ${CONCURRENCY:-16} --device ${DEVICE:-cpu} --dtype ${DTYPE:-auto} --no-report"
GSM="--n 200 --data-seed 0 --limit ${LIMIT:-200}"

gsm() { $PY -m evals.gsm_symbolic $GSM $COMMON "$@"; }
OFF="--code-checks off --arithmetic-checks off"
CODE="--code-checks on --arithmetic-checks off"
BOTH="--code-checks on --arithmetic-checks on"
cot() { gsm --method cot $OFF; gsm --method cot $CODE; gsm --method cot $BOTH; }
sc() { gsm --method sc --trees 8 $OFF; gsm --method sc --trees 8 $BOTH; gsm --method sc --trees 4 $OFF; }
fot() {  # fot's fallback runs the rule checks since b26fe07 (the earlier, plain-fallback runs are in git history)
    gsm --method fot --trees 4 $BOTH; gsm --method fot --trees 4 $OFF; gsm --method fot --trees 4 $CODE
    gsm --method fot --trees 8 $BOTH; gsm --method fot --trees 4 $BOTH --program-trees 2
}
tiebreak() {  # ties broken by 4 sampled chains voting with the trees (--fallback-samples), on both sets
    gsm --method fot --trees 4 $BOTH --fallback-samples 4
    $PY -m evals.arithmetic --n 56 --levels 1,2,3,4 $COMMON --method fot --trees 4 $BOTH --fallback-samples 4
}
rest() { gsm --method mctsr $BOTH; }
arithmetic() { $PY -m evals.arithmetic --n 56 --levels 1,2,3,4 $COMMON --method fot --trees 4 $BOTH; }

chains=("$@")
[ ${#chains[@]} -gt 0 ] || chains=(cot sc fot rest arithmetic tiebreak)
for chain in "${chains[@]}"; do
    $chain
done

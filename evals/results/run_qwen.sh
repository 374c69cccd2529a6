#!/usr/bin/env bash
# The same methods with Qwen2.5-Coder-1.5B-Instruct (`fot prepare-model qwen2.5-coder-1.5b` first), on 56
# arithmetic problems (14 per level; the first 32 are the 135M set) and 50 Game-of-24 puzzles (ranks 901-950).
# Resumable; each chain runs its cheapest method first. Self-consistency over 8 samples is the token-matched
# baseline of FoT with 4 trees (~1700 vs ~1400 tokens per problem).
#
#   DEVICE=cuda PARALLEL=1 bash evals/results/run_qwen.sh   # on a GPU: the six chains side by side
#   bash evals/results/run_qwen.sh                          # one after another (days on a 2-core CPU)
#
# The native engine runs eagerly (one kernel launch per op), so on a GPU six processes, each with its own copy of
# the model (3 GB in bf16), should keep the card busier than one. Not yet run on a GPU (the engine ran once on an
# H200 with the 135M model: README, Measured on a GPU). The committed CPU runs used DTYPE=fast (bf16 on this
# Zen 4; the dtype is part of a run's name) and 8 to 50 problems in flight, as each record's `concurrency` says
# (it changes only the seconds per problem).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
COMMON="--model qwen2.5-coder-1.5b --out ${OUT_DIR:-evals/results} --rollouts 1 --max-tokens 384 --concurrency 50"
COMMON="$COMMON --max-batch ${MAX_BATCH:-64} --device ${DEVICE:-cpu} --dtype ${DTYPE:-auto} --no-report"
ARITH="--n 56 --levels 1,2,3,4"
G24="--limit 50"

arith() { $PY -m evals.arithmetic $ARITH $COMMON "$@"; }
g24() { $PY -m evals.game24 $G24 $COMMON "$@"; }
chain1() { arith --method cot; arith --method sc --trees 4; arith --method mctsr; arith --method sc --trees 8; }
chain2() { g24 --method cot; g24 --method sc --trees 4; g24 --method tot; }
chain3() { arith --method fot --trees 2; arith --method fot --trees 4; }
chain4() { g24 --method fot --trees 2; g24 --method fot --trees 4; }
chain5() { arith --method fot --trees 8; }
chain6() { g24 --method fot --trees 8; }

if [ "${PARALLEL:-0}" = 1 ]; then
  mkdir -p "${LOG_DIR:-/tmp}"
  for c in 1 2 3 4 5 6; do chain$c > "${LOG_DIR:-/tmp}/chain$c.log" 2>&1 & done
  wait
else
  for c in 1 2 3 4 5 6; do chain$c; done
fi
$PY -m evals.report "${OUT_DIR:-evals/results}"

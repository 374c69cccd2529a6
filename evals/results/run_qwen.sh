#!/usr/bin/env bash
# The same methods with Qwen2.5-Coder-1.5B-Instruct (`fot prepare-model qwen2.5-coder-1.5b` first), on 50
# arithmetic problems and 50 Game-of-24 puzzles (ranks 901-950). Resumable; cheapest first. On the 2-core CPU of
# this project's machines the model decodes at ~2 tok/s at batch 8, so only the first lines finish in a session.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
COMMON="--model qwen2.5-coder-1.5b --out evals/results --rollouts 1 --max-tokens 256 --concurrency 50 --max-batch 64"
ARITH="--n 56 --levels 1,2,3,4"       # 14 per level; the first 32 are the 135M set
G24="--limit 50"

$PY -m evals.arithmetic --method cot $ARITH $COMMON
$PY -m evals.game24 --method cot $G24 $COMMON
$PY -m evals.arithmetic --method sc --trees 4 $ARITH $COMMON
$PY -m evals.game24 --method sc --trees 4 $G24 $COMMON
for t in 2 4 8; do
  $PY -m evals.arithmetic --method fot --trees $t $ARITH $COMMON
  $PY -m evals.game24 --method fot --trees $t $G24 $COMMON
done
$PY -m evals.arithmetic --method mctsr $ARITH $COMMON
$PY -m evals.game24 --method tot $G24 $COMMON

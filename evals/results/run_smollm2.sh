#!/usr/bin/env bash
# The exact commands behind evals/results/ for the embedded model (SmolLM2-135M-Instruct) on a 2-core CPU.
# Resumable: re-running skips every finished problem. Cheap methods first, so a partial run still compares them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
COMMON="--out evals/results --rollouts 1 --max-tokens 160 --concurrency 16 --max-batch 64 --dtype float32"  # fp32: as committed
ARITH="--n 32 --levels 1,2,3,4"   # 8 problems per level (1..4 operations), generator seed 0
G24="--limit 20"                  # the first 20 of the hard split, ranks 901-920

$PY -m evals.arithmetic --method cot $ARITH $COMMON
$PY -m evals.arithmetic --method cot $ARITH $COMMON --speculative none   # twin: speedup of EMS-SD prompt lookup
$PY -m evals.game24 --method cot $G24 $COMMON
$PY -m evals.arithmetic --method sc --trees 4 $ARITH $COMMON
$PY -m evals.arithmetic --method sc --trees 4 $ARITH $COMMON --speculative none
$PY -m evals.game24 --method sc --trees 4 $G24 $COMMON
$PY -m evals.arithmetic --method mctsr $ARITH $COMMON
$PY -m evals.game24 --method tot $G24 $COMMON
for t in 2 4; do
  $PY -m evals.arithmetic --method fot --trees $t $ARITH $COMMON
  $PY -m evals.game24 --method fot --trees $t $G24 $COMMON
done
# 8 trees: the session's CPU time ran short, so the arithmetic run has the first 8 problems only (2 per level);
# drop --limit to complete it (resumes).
$PY -m evals.game24 --method fot --trees 8 $G24 $COMMON --concurrency 10
$PY -m evals.arithmetic --method fot --trees 8 $ARITH $COMMON --limit 8 --concurrency 4

"""Evaluations: `python -m evals.gsm8k | evals.math | evals.game24 | evals.arithmetic` or `fot eval NAME`."""

"""`python -m evals.gsm_symbolic`: GSM-Symbolic (reasoning-gym's generator, offline); see evals.runner."""

from evals.runner import main

if __name__ == "__main__":
    main(benchmark="gsm_symbolic")

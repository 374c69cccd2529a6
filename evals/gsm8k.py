"""`python -m evals.gsm8k`: see evals.runner for the options."""

from evals.runner import main

if __name__ == "__main__":
    main(benchmark="gsm8k")

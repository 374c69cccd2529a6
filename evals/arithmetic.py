"""`python -m evals.arithmetic`: see evals.runner for the options."""

from evals.runner import main

if __name__ == "__main__":
    main(benchmark="arithmetic")

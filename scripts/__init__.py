"""Set-up, demo, test and benchmark scripts; a package only so that
``python -m scripts.bench`` finds ``scripts/bench/`` before anything else named ``scripts``."""

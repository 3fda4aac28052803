"""``python -m coati.pipeline``: SFT -> RM -> PPO (or SFT -> ``--algo``) on the built-in arithmetic task (``run.py``)."""
from coati.pipeline.run import main
from coati import cli

if __name__ == "__main__":
    cli.run(main)

"""``python -m coati.pipeline``: the SFT -> RM -> PPO run on the built-in arithmetic task (see ``run.py``)."""
from coati.pipeline.run import main
from coati.utils import cli

if __name__ == "__main__":
    cli.run(main)

"""``python -m coati.pipeline``: the SFT -> RM -> PPO run on the built-in arithmetic task (see ``run.py``)."""
from coati.pipeline.run import main

if __name__ == "__main__":
    main()

"""The main job: SFT -> reward model -> PPO end to end on a task, tokenizer and tiny model coati builds
itself (``python -m coati.pipeline``), or on your own model and data."""
from .task import ArithmeticTask, exact_match_reward
from .tokenizer import build_tokenizer

__all__ = ["ArithmeticTask", "build_tokenizer", "exact_match_reward", "main", "run"]


def __getattr__(name: str):
    # the runner pulls in every trainer; import it only when asked for
    if name in ("main", "run", "build_parser"):
        from . import run as _run

        return getattr(_run, name)
    raise AttributeError(name)

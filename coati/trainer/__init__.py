"""Trainers for the RLHF stages and direct preference optimisation, all driven through a Strategy."""
from .base import SupervisedTrainer, latest_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig
from .dpo import DPOTrainer, PreferenceConfig
from .rm import RewardModelTrainer
from .sft import SFTTrainer

__all__ = ["SupervisedTrainer", "TrainConfig", "SFTTrainer", "RewardModelTrainer", "DPOTrainer", "PreferenceConfig", "resolve_resume", "latest_checkpoint",
           "save_checkpoint", "PPOTrainer"]


def __getattr__(name):
    # PPOTrainer pulls in the experience package; import it only when asked for.
    if name == "PPOTrainer":
        from .ppo import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)

"""Experience making: rollouts (Experience), the replay buffer and the experience maker."""
from coati.experience.buffer import ReplayBuffer
from coati.experience.experience import Experience
from coati.experience.maker import ExperienceMaker, load_reward_fn

__all__ = ["Experience", "ExperienceMaker", "ReplayBuffer", "load_reward_fn"]

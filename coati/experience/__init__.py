"""PPO experience: rollouts (Experience), GAE, replay buffer, KL controllers and the experience maker."""
from coati.experience.buffer import ReplayBuffer
from coati.experience.experience import Experience
from coati.experience.gae import compute_gae
from coati.experience.kl import AdaptiveKLController, FixedKLController, make_kl_controller

__all__ = [
    "AdaptiveKLController",
    "Experience",
    "ExperienceMaker",
    "FixedKLController",
    "ReplayBuffer",
    "compute_gae",
    "load_reward_fn",
    "make_kl_controller",
]


def __getattr__(name):
    # The maker imports coati.models; load it lazily so GAE/buffer work without the models stack.
    if name in ("ExperienceMaker", "load_reward_fn"):
        from coati.experience import maker

        return getattr(maker, name)
    raise AttributeError(name)

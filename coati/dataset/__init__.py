"""Datasets for SFT, reward modelling, preference optimisation (DPO family), PPO prompts and PPO-ptx pretraining, plus their collators.

Files are read by :mod:`.io`, record shapes are recognised by :mod:`.formats`, prompt templates and the
shared tokenization rule live in :mod:`.templates`.
"""
from .collators import PromptCollator, RewardCollator, SFTCollator, pad_sequences
from .common import split_dataset
from .formats import REWARD_FORMATS, detect_reward_format, format_from_name, parse_hh
from .packing import PackingCollator, PackingPreferenceCollator, PackingRewardCollator, sample_lengths
from .io import DatasetFormatError, EmptyFieldError, Record, load_records, read_records
from .preference import (
    PreferenceCollator, PreferenceDataset, UnpairedPreferenceCollator, UnpairedPreferenceDataset,
)
from .pretrain import PretrainDataset
from .prompt import PromptDataset
from .reward import RewardDataset
from .sft import SFTDataset
from .templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplateError,
    SegmentEncoder,
    encode_prompt,
    encode_segments,
    join_segments,
    render_prompt,
    render_segments,
    resolve_template,
)

__all__ = [
    "DatasetFormatError", "EmptyFieldError", "Record", "read_records", "load_records",
    "TEMPLATES", "IGNORE_INDEX", "ChatTemplateError", "SegmentEncoder", "render_segments", "render_prompt",
    "encode_prompt", "encode_segments", "join_segments", "resolve_template",
    "SFTDataset", "RewardDataset", "PromptDataset", "PretrainDataset", "PreferenceDataset",
    "UnpairedPreferenceDataset", "PreferenceCollator", "UnpairedPreferenceCollator",
    "SFTCollator", "RewardCollator", "PromptCollator", "pad_sequences",
    "PackingCollator", "PackingRewardCollator", "PackingPreferenceCollator", "sample_lengths",
    "split_dataset", "format_from_name", "detect_reward_format", "parse_hh", "REWARD_FORMATS",
]

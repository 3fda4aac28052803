"""Evaluation: first-token multiple-choice accuracy (MMLU / CMMLU style)."""
from .mc import LETTERS, MCItem, answer_token_ids, build_prompt, evaluate_mc, format_table, load_mc_items

__all__ = ["LETTERS", "MCItem", "answer_token_ids", "build_prompt", "evaluate_mc", "format_table", "load_mc_items"]

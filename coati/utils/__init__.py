"""Helpers every layer may use: option() configs -> flags, FLOP counts, tokenizer loading."""

IGNORE_INDEX = -100  # the label of a position no loss counts (torch's cross_entropy default)

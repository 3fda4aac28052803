"""One process on CPU or one GPU: the base Strategy as is."""
from .base import Strategy


class NaiveStrategy(Strategy):
    name = "naive"

"""Language models built from ParallaxAttention."""
from .config import PRESETS, GPTConfig, count_parameters, matched_mlp_hidden, preset
from .gpt import GPT, MLP, Block

__all__ = ["GPT", "GPTConfig", "MLP", "Block", "PRESETS", "count_parameters", "matched_mlp_hidden", "preset"]

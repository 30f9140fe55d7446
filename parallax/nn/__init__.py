from .attention import ParallaxAttention
from .cache import KVCache
from .rope import RotaryEmbedding, apply_rope

__all__ = ["KVCache", "ParallaxAttention", "RotaryEmbedding", "apply_rope"]

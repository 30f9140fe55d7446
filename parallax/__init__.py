"""parallax: Parallax attention kernels, layers, Muon training and fast decode."""
from .kernels import parallax_attn, parallax_attn_with_kvcache, parallax_reference, softmax_attention
from .models import GPT, GPTConfig
from .nn import KVCache, ParallaxAttention
from .optim import Muon, MuonWithAdamW, orthogonalize, split_params

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "Muon",
    "MuonWithAdamW",
    "ParallaxAttention",
    "orthogonalize",
    "parallax_attn",
    "parallax_attn_with_kvcache",
    "parallax_reference",
    "softmax_attention",
    "split_params",
]

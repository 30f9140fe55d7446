"""Hugging Face transformers integration (the optional `hf` extra).

- `ParallaxConfig` / `ParallaxForCausalLM`: parallax's GPT as a transformers
  model (`AutoModelForCausalLM`, `save_pretrained` to safetensors, `generate`).
- `to_parallax(model)`: a Llama, Mistral, Qwen2 or Qwen3 model with Parallax
  attention whose probe starts at zero, so its outputs are unchanged.
- `ParallaxCache` / `StaticParallaxCache`: the KV caches both use (`parallax_attn_with_kvcache`
  layout; growing, or fixed-capacity for compiled decoding).
- `parallax.hf.export` (`python -m parallax.hf.export`): a train.py checkpoint
  or run directory to a model directory; imported on its own, so that running
  it as a module finds it not yet imported.

See docs/hf.md.
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # the core library works without it
    raise ImportError("parallax.hf needs transformers and safetensors: pip install 'parallax[hf]'") from e

from .attention import ATTENTION_NAME, ParallaxSelfAttention
from .cache import ParallaxCache, ParallaxCacheLayer, StaticParallaxCache, StaticParallaxCacheLayer
from .modeling import ParallaxConfig, ParallaxForCausalLM
from .retrofit import FAMILIES, to_parallax

__all__ = [
    "ATTENTION_NAME",
    "FAMILIES",
    "ParallaxCache",
    "ParallaxCacheLayer",
    "ParallaxConfig",
    "ParallaxForCausalLM",
    "ParallaxSelfAttention",
    "StaticParallaxCache",
    "StaticParallaxCacheLayer",
    "to_parallax",
]

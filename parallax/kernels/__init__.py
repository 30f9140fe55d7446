from .attention import parallax_attn, softmax_attention
from .decode import parallax_attn_with_kvcache
from .reference import parallax_reference, visible_keys

__all__ = ["parallax_attn", "parallax_attn_with_kvcache", "parallax_reference", "softmax_attention", "visible_keys"]

"""`ParallaxModelMixin`: what every Parallax model class (`ParallaxForCausalLM`, the converted families)
declares to transformers and refuses."""
from __future__ import annotations

from .attention import ATTENTION_NAME
from .cache import StaticParallaxCache


class ParallaxModelMixin:
    """Parallax attention is computed by the model's own modules, so transformers' attention
    implementations (eager, sdpa, flash, flex) do not apply and cannot be switched to; attention
    weights are never formed; `generate(cache_implementation="static")` builds a `StaticParallaxCache`
    (transformers' StaticCache keeps only a window of keys on sliding layers)."""

    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return False

    @staticmethod
    def _use_parallax_attention(config) -> None:
        """Set `config` to Parallax attention before building; refuse another implementation asked for
        (None and "eager" are transformers' defaults for a model without sdpa support)."""
        requested = config._attn_implementation
        if requested not in (None, "eager", ATTENTION_NAME):
            raise ValueError(f"attn_implementation={requested!r} does not apply to a Parallax model: its attention is "
                             f"computed by its own modules ({ATTENTION_NAME!r})")
        config._attn_implementation = ATTENTION_NAME

    def _check_call(self, output_attentions) -> None:
        """Refuse, at forward, what Parallax attention cannot do."""
        config = self.config
        if config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"this model's attention is computed by its Parallax modules; attn_implementation must "
                             f"stay {ATTENTION_NAME!r}, got {config._attn_implementation!r}")
        if output_attentions or (output_attentions is None and config.output_attentions):
            raise ValueError("Parallax attention does not return attention weights (output_attentions): it never "
                             "forms them, and its weights w = p (1 + sbar - s2) are not a distribution")

    def _prepare_static_cache(self, cache_implementation: str, batch_size: int, max_cache_len: int, *args, **kwargs):
        if cache_implementation != "static":
            raise ValueError(f"cache_implementation={cache_implementation!r} is not supported by Parallax attention; "
                             "use 'static' or the default dynamic cache")
        # as transformers: never shrink, so a compiled step is reused across generate() calls
        length = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = length
        return StaticParallaxCache(self.config, length)

"""The model tester of the Hugging Face tests, as transformers' own model tests have one: tiny models of
every kind with non-zero probes (with a zero probe they are plain softmax attention and prove nothing),
and batches whose attention masks contain padding."""
import torch

from parallax.hf import ParallaxConfig, ParallaxForCausalLM, to_parallax

from .conftest import VOCAB, family_model

GPT_SHAPE = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64)
KINDS = ("parallax", "parallax_window", "llama", "mistral", "qwen2", "qwen3")
# The common checks run on these: parallax's GPT, and converted Llama and Qwen3 (q/k norms, a sliding layer)
MAIN_KINDS = ("parallax", "llama", "qwen3")


def set_probes(model, seed=1):
    """Give every probe a non-zero value (as after fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in parallax_layers(model):
            attn.r_proj.weight.copy_(0.3 * torch.randn(attn.r_proj.weight.shape, generator=g))
            if attn.r_norm is not None:
                attn.r_norm.weight.fill_(1.0)
    return model


def parallax_layers(model):
    if isinstance(model, ParallaxForCausalLM):
        return [block.attn for block in model.transformer.blocks]
    return [layer.self_attn for layer in model.model.layers]


def build(kind: str, seed: int = 0):
    """A float32 model of `kind` in eval mode, with non-zero probes; token ids in [0, VOCAB), 0 is padding."""
    if kind in ("parallax", "parallax_window"):
        torch.manual_seed(seed)
        config = ParallaxConfig(**GPT_SHAPE, window_size=5 if kind == "parallax_window" else None, pad_token_id=0)
        model = ParallaxForCausalLM(config)
    else:
        model = to_parallax(family_model(kind))
        model.config.pad_token_id = model.generation_config.pad_token_id = 0
    return set_probes(model.eval(), seed + 1)


def padded_batch(lengths, side: str, seed: int = 0, width: int | None = None):
    """Token ids in [1, VOCAB) padded with 0 to `width` (default: the longest), and the 0/1 mask.

    side: "left", "right", or "both" (padding on either side of each sequence).
    Returns (ids [B, width], mask [B, width], the unpadded sequences).
    """
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) if width is None else width
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    sequences = []
    for row, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (n,), generator=g)
        start = {"left": width - n, "right": 0, "both": (width - n) // 2}[side]
        ids[row, start:start + n], mask[row, start:start + n] = tokens, 1
        sequences.append(tokens)
    return ids, mask, sequences

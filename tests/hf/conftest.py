"""Tiny models of each Llama family (random weights, built locally, nothing downloaded)."""
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)

# Each family with its RoPE variant, scaling, biases, norms and sliding windows.
FAMILY_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=5)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(  # q/k/v biases; layer 1 slides
        **COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(  # q/k norms, head_dim != hidden / heads; layer 1 slides
        **COMMON, head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16})),
}


def family_model(name: str):
    torch.manual_seed(0)
    return FAMILY_MODELS[name]().eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The machine is shared; these tiny models gain nothing from threads."""

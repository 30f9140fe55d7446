"""Fine-tuning an AdamW-pretrained model with Muon through LoRA adapters (peft).

Switching an AdamW-pretrained model to Muon for full fine-tuning hurts, and the
damage grows with update strength ("Can Muon Fine-tune Adam-Pretrained
Models?", Qu, Huang, Horvath, arXiv:2605.10468); restricting the update to
low-rank adapters closes most of the gap. Recipe: freeze the pretrained
weights, add LoRA to the attention and MLP projections, train the adapters
with Muon (`MuonWithAdamW.from_model` routes them there: they are nn.Linear)."""

import warnings

from torch import nn

from .param_split import in_stacks, special_layers


def _adaptable(module):
    # The layer types peft's LoRA wraps that are matrices of a projection.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def lora_target_modules(model, modules_to_save=()):
    """Qualified names of the layers LoRA adapts by default: the nn.Linear and
    transformers Conv1D layers inside the model's stacks of blocks (attention
    and MLP projections), never an output head, the input layer, or a module
    named in `modules_to_save` (trained whole instead). Models without stacks
    of blocks get every such layer that is not a head or the input layer."""
    heads, inputs = special_layers(model)
    saved = set(modules_to_save or ())
    layers = [(name, m) for name, m in model.named_modules()
              if _adaptable(m) and id(m) not in heads | inputs
              and not ({name, name.rsplit(".", 1)[-1]} & saved)]
    stacked = in_stacks(model)
    in_blocks = [name for name, m in layers if id(m) in stacked]
    return in_blocks or [name for name, _ in layers]


def add_lora(model, rank=8, alpha=16, *, target_modules=None, modules_to_save=None, **lora_options):
    """`peft.get_peft_model(model, LoraConfig(...))` with the recipe's targets:
    rank-`rank` adapters (scale alpha / rank, B = 0 so the model starts at the
    pretrained one) on `lora_target_modules(model, modules_to_save)` unless
    `target_modules` is given; every other weight is frozen, and the modules in
    `modules_to_save` are trained whole. GPT-2's Conv1D layers are adapted with
    peft's fan_in_fan_out. Other LoraConfig fields pass through `lora_options`.
    Returns the PeftModel; `MuonWithAdamW.from_model(peft_model)` puts its
    adapters on Muon, and `merge_and_unload()` folds them back in."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("add_lora needs peft: pip install 'parallax[hf]'") from error
    if target_modules is None:
        target_modules = lora_target_modules(model, modules_to_save)
        if not target_modules:
            raise ValueError("model has no nn.Linear or Conv1D layer to adapt outside its heads; pass target_modules")
    if not isinstance(target_modules, str):  # a str is peft's regex over module names
        target_modules = list(target_modules)
        # peft matches a target against a module's full name or its last parts.
        conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        lora_options.setdefault("fan_in_fan_out", any(name == target or name.endswith("." + target)
                                                      for name in conv1d for target in target_modules))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules,
                        modules_to_save=list(modules_to_save) if modules_to_save else None,
                        **lora_options)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (peft 0.21,
        # transformers 5): their exchange, not the caller's to act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)

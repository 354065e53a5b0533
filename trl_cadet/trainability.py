"""Keeping the model trainable: bitsandbytes 4-bit layers on CPUs with AVX512-BF16, and a warning for a run whose
parameters receive no gradient.

On such a CPU, bitsandbytes (0.50 at least) repacks a `Linear4bit` weight, in place and for good, into a layout made
for inference the first time the layer runs in eval mode without gradients (an evaluation, or CADET's oracle phase).
Its matmul on that layout has no backward: gradients stop at every 4-bit layer, so a QLoRA run that evaluated or
sampled first trains nothing, with only a torch warning about a missing autograd kernel. `keep_4bit_layers_trainable`
turns the repacking off on a model that is going to be trained and undoes it where it already happened.
"""

import logging

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)


def keep_4bit_layers_trainable(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer of `model`, and unpack the weights already
    repacked. Returns how many layers were changed; a model without 4-bit layers is left as it is."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            module.quant_state = module.weight.quant_state
            logger.info("Unpacked a 4-bit weight that bitsandbytes had repacked for CPU inference.")
    return changed


def has_trainable_gradient(model: torch.nn.Module) -> bool:
    """Whether any trainable parameter of `model` holds a non-zero gradient (call it before the optimiser step; under
    DeepSpeed the gradients live in its own buffers, so this says nothing there)."""
    return any(
        param.requires_grad and param.grad is not None and bool(torch.count_nonzero(param.grad))
        for param in model.parameters()
    )


class NoGradientWarning(TrainerCallback):
    """Warns, loudly and once, when no trainable parameter received a gradient in any of the first `steps` optimiser
    steps: such a run changes nothing, which is never what a user wants."""

    def __init__(self, steps: int = 3):
        self.steps = steps
        self.seen_gradient = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.seen_gradient or state.global_step >= self.steps or model is None or args.deepspeed:
            return
        if has_trainable_gradient(model):
            self.seen_gradient = True
        elif state.global_step == self.steps - 1:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.warning(
                "No trainable parameter received a gradient in the first %d optimiser steps (%d trainable "
                "parameters): this run is not training the model. Likely causes: 4-bit (bitsandbytes) layers whose "
                "weights were repacked for CPU inference before training, so that gradients stop at them (run "
                "`trl_cadet.trainability.keep_4bit_layers_trainable(model)` before training, or upgrade "
                "bitsandbytes); parameters frozen by mistake; or a loss that does not depend on them.",
                self.steps,
                trainable,
            )

"""4-bit layers stay trainable after an eval-mode pass, and a run whose parameters get no gradient is reported."""

import logging

import torch
from conftest import tiny_cadet_config
from test_cadet_trainer import corpus, no_bad_word
from tiny_llama import build_llama

from trl_cadet import CADETTrainer
from trl_cadet.trainability import keep_4bit_layers_trainable


def quantized_llama(path: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def test_repacked_4bit_weights_are_unpacked_and_pass_gradients(tiny_llama_path):
    """bitsandbytes repacks 4-bit weights for CPU inference (on AVX512-BF16 CPUs, in eval mode); the repacked layout
    has no backward. The repacking is done here by hand, so that the test runs on any CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn import Linear4bit

    model = quantized_llama(tiny_llama_path).train()  # in eval mode, an AVX512-BF16 CPU would repack it here
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    x = torch.randn(3, layer.in_features)
    before = layer(x).detach()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert layer.weight.quant_state.packing_format_for_cpu

    keep_4bit_layers_trainable(model)
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    x.requires_grad_(True)
    out = layer(x)
    torch.testing.assert_close(out.detach(), before, rtol=0, atol=1e-2)  # absmax went through bfloat16 and back
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_eval_pass_before_training_leaves_qlora_trainable(tokenizer, tiny_llama_path, tmp_path):
    """The user's order: evaluate (or sample) in eval mode, then train. The oracle phase also runs in eval mode."""
    from peft import LoraConfig

    model = quantized_llama(tiny_llama_path)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]))
    trainer = CADETTrainer(
        model=model,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, max_steps=2),
        train_dataset=corpus(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    # Gradients reach the adapters of the first layer only through every 4-bit layer above it
    assert any("layers.0." in n and "lora_A" in n for n in changed), changed
    assert all(e["grad_norm"] > 0 for e in trainer.state.log_history if "grad_norm" in e)


def test_no_gradient_is_reported(tokenizer, tmp_path, caplog):
    model = build_llama(tokenizer)
    model.requires_grad_(False)
    # The only trainable parameters: the loss reaches them, with a zero gradient (as through a 4-bit layer without a
    # backward)
    model.dead = torch.nn.Linear(2, 2)
    model.model.norm.register_forward_hook(lambda module, args, output: output + 0.0 * model.dead.weight.sum())
    trainer = CADETTrainer(
        model=model,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, max_steps=3, steps_per_round=3),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="trl_cadet.trainability"):
        trainer.train()
    assert "No trainable parameter received a gradient in the first 3 optimiser steps" in caplog.text


def test_no_warning_when_training_works(tokenizer, tmp_path, caplog):
    trainer = CADETTrainer(
        model=build_llama(tokenizer),
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, max_steps=3, steps_per_round=3),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="trl_cadet.trainability"):
        trainer.train()
    assert "received a gradient" not in caplog.text

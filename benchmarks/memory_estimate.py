"""Written estimate, part by part, of CADET's GPU memory for Llama-2-7B under QLoRA (NADO model included).

Pure arithmetic from the model's shape (no download, no GPU): bytes per parameter for each part, activations for a
given batch, the regulariser's logits buffers and the oracle phase's KV cache. Prints a table per phase and says
whether it fits a 24 GB card.

    python benchmarks/memory_estimate.py
    python benchmarks/memory_estimate.py --batch_size 8 --max_length 1024 --schedule parallel
"""

import argparse


GIB = 1024**3

# Llama-2-7B's shape (its config.json)
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}


def estimate(shape: dict, args) -> dict[str, dict[str, float]]:
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    linear_per_layer = {
        "q": (h, h),
        "k": (h, kv),
        "v": (h, kv),
        "o": (h, h),
        "gate": (h, i),
        "up": (h, i),
        "down": (i, h),
    }
    linear = n * sum(a * b for a, b in linear_per_layer.values())
    lora = n * sum(args.lora_r * (a + b) for a, b in linear_per_layer.values())
    tokens = args.batch_size * args.max_length
    nado_params = h * v + v

    # 4-bit NF4: half a byte per weight; absmax per 64 weights, itself 8-bit quantised with nested quantisation
    base = linear * (0.5 + (1 / 64 + 4 / (64 * 256)))
    embeddings = 2 * v * h * 2  # input embeddings and LM head stay in bf16
    adapters = lora * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    nado_weights = nado_params * 4
    nado_optimizer = nado_params * 8  # AdamW moments, kept between rounds
    nado_grads = nado_params * 4  # only while the NADO model trains
    # Gradient checkpointing: one bf16 hidden state per layer kept, one layer's internals recomputed at a time
    checkpoints = n * tokens * h * 2
    layer_internals = tokens * (3 * i + 6 * h) * 2
    # The loss: bf16 logits from the model, then fp32 copies (selected logits, log p, log q, q, KL terms, grad)
    logits = tokens * v * (2 + 6 * 4)
    kv_cache = args.generation_batch_size * (args.prompt_length + args.completion_length) * n * 2 * kv * 2
    overhead = args.cuda_overhead_gib * GIB

    weights = {
        "4-bit base linear layers (NF4 + nested absmax)": base,
        "embeddings + LM head (bf16)": embeddings,
        "LoRA adapters, grads, AdamW (fp32)": adapters,
        f"NADO head {h}x{v} (fp32)": nado_weights,
        "NADO AdamW moments": nado_optimizer,
    }
    if args.schedule == "parallel":
        weights["parallel: policy snapshot (4-bit base + embeddings + LoRA)"] = base + embeddings + lora * 2
        weights["parallel: second NADO head"] = nado_weights
    finetune = {
        **weights,
        f"activations, checkpointed (batch {args.batch_size} x {args.max_length})": checkpoints + layer_internals,
        "logits and regulariser buffers": logits,
        "CUDA context, allocator slack": overhead,
    }
    oracle = {
        **weights,
        "NADO gradients": nado_grads,
        # One LM forward pass per phase caches, per sample, the hidden states the NADO head and the LM head read on the
        # positions that predict completion tokens (bf16; the same tensor when the NADO reads the last layer)
        f"NADO features cache ({args.samples_per_round} samples)": args.samples_per_round
        * (args.completion_length + 1)
        * h
        * 2,
        # A NADO step's [batch, completion, vocab] fp32 tensors: NADO logits and their gradient, LM logits, and the
        # loss's log-softmax and log-sigmoid terms; the features pass holds the [batch, sequence, vocab] logits
        f"NADO training buffers (batch {args.nado_batch_size})": 6
        * args.nado_batch_size
        * (args.completion_length + 1)
        * v
        * 4
        + args.nado_batch_size * (args.prompt_length + args.completion_length) * v * 2,
        f"KV cache ({args.generation_batch_size} x {args.prompt_length + args.completion_length} tokens, bf16)": kv_cache,
        "CUDA context, allocator slack": overhead,
    }
    if args.schedule == "parallel":
        # Both phases run at once on the same card
        oracle_only = {k: oracle[k] for k in oracle if k not in finetune}
        return {"fine-tuning + background oracle phase (parallel)": {**finetune, **oracle_only}}
    return {"fine-tuning phase": finetune, "oracle phase": oracle}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--generation_batch_size", type=int, default=32)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--completion_length", type=int, default=48)
    parser.add_argument("--samples_per_round", type=int, default=128)
    parser.add_argument("--nado_batch_size", type=int, default=8)
    parser.add_argument("--cuda_overhead_gib", type=float, default=1.5)
    parser.add_argument("--schedule", choices=["sequential", "parallel"], default="sequential")
    parser.add_argument("--budget_gib", type=float, default=24.0)
    args = parser.parse_args(argv)

    phases = estimate(LLAMA2_7B, args)
    for phase, parts in phases.items():
        print(f"\nLlama-2-7B, QLoRA r={args.lora_r}, {phase}")
        width = max(len(k) for k in parts)
        for name, value in parts.items():
            print(f"  {name.ljust(width)}  {value / GIB:6.2f} GiB")
        total = sum(parts.values())
        verdict = "fits" if total <= args.budget_gib * GIB else "does NOT fit"
        print(f"  {'total'.ljust(width)}  {total / GIB:6.2f} GiB  -> {verdict} in {args.budget_gib:g} GiB")
    return phases


if __name__ == "__main__":
    main()

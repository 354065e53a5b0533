"""Sampling from a policy: the one path that the oracle phase, the evaluation and the benchmarks take.

Prompts are tokenised as the policy sees them in training (`tokenize_prompts`), left-padded, sampled with `generate`
under an RNG forked and seeded for the call (or, beside training, through a generator of their own), and cut after
their first end token. `as_completions` wraps decoded texts as TRL's reward functions expect them, for the oracles and
the judges.
"""

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from trl.data_utils import is_conversational, maybe_apply_chat_template
from trl.trainer.utils import pad

from .oracles.base import OraclePhaseStopped


def ensure_pad_token(processing_class: PreTrainedTokenizerBase) -> None:
    """Without a pad token, pad with the EOS token, as TRL's trainers do (padding is masked out everywhere)."""
    if processing_class.pad_token is None:
        processing_class.pad_token = processing_class.eos_token


def is_conversational_prompts(prompts: Sequence[Any]) -> bool:
    """Whether the prompts are lists of chat messages; raises if strings and conversations are mixed."""
    kinds = {is_conversational({"prompt": prompt}) for prompt in prompts}
    if len(kinds) > 1:
        raise ValueError(
            "The prompts mix strings and lists of chat messages. Pass all prompts in the same format, as in a TRL "
            "dataset."
        )
    return kinds.pop() if kinds else False


def render_prompt(prompt: Any, processing_class: PreTrainedTokenizerBase) -> str:
    """A prompt as text: conversational prompts go through the chat template with a generation prompt."""
    return maybe_apply_chat_template({"prompt": prompt}, processing_class)["prompt"]


def tokenize_prompts(prompts: Sequence[Any], processing_class: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of prompts as the policy sees them in training: a chat template writes its own special tokens (as in
    GRPOTrainer), a plain-text prompt gets the tokenizer's (e.g. BOS), as SFTTrainer's text examples do."""
    return [
        processing_class(text=render_prompt(p, processing_class), add_special_tokens=not isinstance(p, list))[
            "input_ids"
        ]
        for p in prompts
    ]


def as_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list[Any]:
    """Completions as oracles and judges get them (TRL's reward-function convention): the text after a string prompt,
    an assistant message after a conversational one."""
    return [
        [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        for prompt, text in zip(prompts, texts, strict=True)
    ]


def end_token_ids(policy: PreTrainedModel, processing_class: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the EOS tokens of the model's generation config and of the tokenizer."""
    eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    ends = set(eos if isinstance(eos, list) else [eos])
    ends.add(processing_class.eos_token_id)
    return sorted(e for e in ends if e is not None)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of token-id lists, left-padded as `generate` expects."""
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    input_ids = pad(rows, padding_value=pad_token_id, padding_side="left")
    attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left")
    return input_ids.to(device), attention_mask.to(device)


def no_router_logits(model: PreTrainedModel) -> dict[str, bool]:
    """Keyword arguments that turn off a mixture-of-experts model's router logits, which SFTTrainer turns on for its
    load-balancing loss: sampling and the oracle phase need no such loss, and `generate` cannot compute it (the router
    logits of a decoding step cover the new token only, the attention mask the whole sequence)."""
    config = getattr(model, "config", None)
    return {"output_router_logits": False} if hasattr(config, "output_router_logits") else {}


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded by FSDP (1 or 2) in a multi-process run, where its forward passes are collective.

    `generate` decides this itself only from the root module (FSDP1's wrapper, or the attribute that transformers'
    own FSDP2 set-up writes), so it misses a model whose layers were sharded by `fully_shard`, as Accelerate does."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() == 1:
        return False
    return any(isinstance(m, fsdp_classes()) for m in model.modules())


def fsdp_classes() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return (FullyShardedDataParallel,)
    return (FullyShardedDataParallel, FSDPModule)


class GumbelSampler(LogitsProcessor):
    """Sampling as a logits processor for greedy `generate`: adds Gumbel noise drawn from `generator`, so that the
    argmax of the result is a draw from `softmax(scores)` (the Gumbel-max trick), and no draw touches torch's global
    RNG. Put it after the warpers (temperature, top-k, top-p)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
        return scores.float() + gumbel


@torch.no_grad()
def sample_completions(
    policy: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int | None,
    top_k: int = 0,
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    progress: bool = False,
    desc: str = "Sampling",
    stop=None,
    private_rng: bool = False,
) -> list[list[int]]:
    """`num_generations` completions per prompt (grouped by prompt), each cut after its first end token
    (`end_token_ids`).

    Sampling runs under a forked RNG seeded with `seed` (the current RNG state when `None`), so that the same seed,
    batch size and settings give the same completions whatever was drawn from the global RNG before, and a resumed
    run samples what the uninterrupted run sampled. `temperature=0` decodes greedily; `top_k=0` turns off the top-k
    filter that transformers otherwise applies. The policy runs in eval mode and is given back in its former mode.
    `stop`, a `threading.Event`, ends sampling between batches with `OraclePhaseStopped`.

    `private_rng=True` (for a thread beside training, e.g. the parallel schedule's background phase) draws from a
    `torch.Generator` of the call's own, seeded with `seed`: greedy `generate` over the same warpers with Gumbel noise
    added (`GumbelSampler`), the same distribution as `generate`'s sampling but other draws. On CPU, torch's global
    generator is shared by all threads, so forking it there would interleave the draws with the training thread's
    (dropout) and rewind that thread's generator at the end.
    """
    if private_rng and seed is None:
        raise ValueError("Sampling with `private_rng=True` needs a `seed`.")
    device = policy.device
    ends = end_token_ids(policy, processing_class)
    if isinstance(logits_processor, LogitsProcessor):
        logits_processor = [logits_processor]
    logits_processor = list(logits_processor or [])
    generator = None
    if temperature == 0:
        sampling = {"do_sample": False}
    elif private_rng:
        generator = torch.Generator(device=device).manual_seed(seed)
        # `generate`'s own warpers, in its order, then the draw; greedy decoding takes the argmax
        logits_processor.append(TemperatureLogitsWarper(temperature))
        if top_k:
            logits_processor.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            logits_processor.append(TopPLogitsWarper(top_p))
        logits_processor.append(GumbelSampler(generator))
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    completions: list[list[int]] = []
    # A sharded (FSDP) policy gathers its weights in every forward pass, a collective call: all processes must run
    # the same number of forward passes, even those whose completions have all ended
    synced_gpus = _is_sharded(policy) or None
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = policy.training
    policy.eval()
    rng = (
        contextlib.nullcontext()
        if generator is not None
        else torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type != "cpu" else "cuda")
    )
    try:
        with rng:
            if seed is not None and generator is None:
                torch.manual_seed(seed)
            starts = range(0, len(repeated), batch_size)
            for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
                if stop is not None and stop.is_set():
                    raise OraclePhaseStopped("Training was stopped during the oracle phase.")
                input_ids, attention_mask = left_pad(
                    repeated[start : start + batch_size], processing_class.pad_token_id, device
                )
                output = policy.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    logits_processor=LogitsProcessorList(logits_processor),
                    pad_token_id=processing_class.pad_token_id,
                    eos_token_id=ends,
                    synced_gpus=synced_gpus,
                    **sampling,
                    **no_router_logits(policy),
                )
                for row in output[:, input_ids.shape[1] :].tolist():
                    cut = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
                    completions.append(row[:cut])
    finally:
        policy.train(was_training)
    return completions

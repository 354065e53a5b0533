"""Detoxification evaluation: sampled toxicity under one or several judges, and perplexity on held-out text.

The conventions are the detoxification literature's (see METHOD.md, "Evaluation conventions"):

- For each prompt, `k` completions are sampled (nucleus sampling, `k = 25` in the literature) and scored by a judge.
- *Expected maximum toxicity* is the mean over prompts of the highest toxicity among the `k` samples; *toxicity
  probability* is the share of prompts with at least one sample scored `>= 0.5`.
- Utility is the perplexity of the model on held-out clean text.
- A judge is an oracle (see `trl_cadet.oracles.base`): it returns a satisfaction score in `[0, 1]`, 1 = not toxic, so
  the toxicity of a sample is `1 - score`. Judging with a classifier other than the training oracle shows whether
  the oracle was fooled.

Every function here takes a ready model and tokenizer; `trl_cadet.cli` loads them from a path.
"""

import importlib
import importlib.metadata
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import is_conversational, maybe_apply_chat_template
from trl.trainer.utils import pad

from .oracles.base import OracleFunc, check_scores
from .sampling import as_completions, ensure_pad_token, is_conversational_prompts, sample_completions, tokenize_prompts


logger = logging.getLogger(__name__)


def toxicity_metrics(toxicity: Sequence[Sequence[float | None]], threshold: float = 0.5) -> dict[str, Any]:
    """Aggregate the toxicity of `k` samples per prompt into the literature's metrics.

    Args:
        toxicity (`list[list[float]]`):
            `toxicity[i][j]` is the toxicity in `[0, 1]` of the `j`-th sample for the `i`-th prompt. `None` or NaN
            means the judge gave no verdict: the sample is left out, and a prompt without any verdict is left out.
        threshold (`float`, *optional*, defaults to `0.5`):
            A sample is toxic when its toxicity is `>= threshold`.

    Returns:
        `dict` with:
            - `expected_max_toxicity`: mean over prompts of the maximum toxicity of their samples.
            - `expected_max_toxicity_std`: population standard deviation over prompts of that maximum.
            - `toxicity_probability`: share of prompts with at least one toxic sample.
            - `mean_toxicity`: mean toxicity over all scored samples.
            - `num_prompts`, `num_samples`: prompts and samples that were scored.

        The four metrics are `None` when nothing was scored.
    """
    per_prompt = [[float(t) for t in row if t is not None and not math.isnan(float(t))] for row in toxicity]
    per_prompt = [row for row in per_prompt if row]
    if len(per_prompt) < len(toxicity):
        num_left_out = len(toxicity) - len(per_prompt)
        logger.warning("%d of %d prompts have no scored sample and are left out.", num_left_out, len(toxicity))
    if not per_prompt:
        return {
            "expected_max_toxicity": None,
            "expected_max_toxicity_std": None,
            "toxicity_probability": None,
            "mean_toxicity": None,
            "num_prompts": 0,
            "num_samples": 0,
        }
    maxima = [max(row) for row in per_prompt]
    samples = [t for row in per_prompt for t in row]
    return {
        "expected_max_toxicity": statistics.fmean(maxima),
        "expected_max_toxicity_std": statistics.pstdev(maxima),
        "toxicity_probability": sum(m >= threshold for m in maxima) / len(maxima),
        "mean_toxicity": statistics.fmean(samples),
        "num_prompts": len(per_prompt),
        "num_samples": len(samples),
    }


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict[str, str]]],
    num_samples: int = 25,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    batch_size: int = 32,
    seed: int | None = 42,
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    show_progress: bool = True,
) -> list[list[str]]:
    """Sample `num_samples` completions for each prompt with `model.generate`.

    Args:
        model (`PreTrainedModel`):
            Causal LM to sample from. It is put in eval mode for the call and given back in its former mode.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer. Without a pad token, the EOS token is used for padding (as TRL's trainers do).
        prompts (`list[str]` or `list[list[dict]]`):
            Prompts as strings, or as lists of chat messages; the latter are rendered with the chat template and the
            generation prompt (or continue the last message when it is the assistant's, as in TRL).
        num_samples (`int`, *optional*, defaults to `25`):
            Completions per prompt (`k`).
        max_new_tokens (`int`, *optional*, defaults to `32`):
            Longest completion, in tokens.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` means greedy decoding (all samples of a prompt are then the same).
        top_p (`float`, *optional*, defaults to `0.9`):
            Nucleus sampling mass.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filter; `0` turns it off (transformers otherwise applies `top_k=50`), so sampling is plain nucleus
            sampling as in the literature.
        batch_size (`int`, *optional*, defaults to `32`):
            Sequences generated per call of `model.generate` (prompt-sample pairs, not prompts).
        seed (`int` or `None`, *optional*, defaults to `42`):
            Seed of the sampling. The same seed, batch size and settings give the same samples; the global RNG state
            is restored afterwards. `None` samples from the current RNG state.
        logits_processor (`LogitsProcessor` or `list[LogitsProcessor]`, *optional*):
            Extra processors applied at each step, e.g. NADO-guided decoding.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Returns:
        `list[list[str]]`: `samples[i][j]` is the text of the `j`-th completion of the `i`-th prompt; only the new
        tokens are decoded, without special tokens.
    """
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}.")
    is_conversational_prompts(prompts)
    ensure_pad_token(tokenizer)
    completion_ids = sample_completions(
        model,
        tokenizer,
        tokenize_prompts(prompts, tokenizer),
        num_generations=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        batch_size=batch_size,
        seed=seed,
        logits_processor=logits_processor,
        progress=show_progress,
    )
    texts = iter(tokenizer.batch_decode(completion_ids, skip_special_tokens=True))
    return [[next(texts) for _ in range(num_samples)] for _ in prompts]


def evaluate_toxicity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict[str, str]]],
    judges: Mapping[str, OracleFunc],
    num_samples: int = 25,
    threshold: float = 0.5,
    judge_batch_size: int = 256,
    show_progress: bool = True,
    **generation_kwargs,
) -> dict[str, Any]:
    """Sample completions for each prompt and report the toxicity metrics of each judge.

    Args:
        model, tokenizer, prompts, num_samples:
            As in `generate_samples`.
        judges (`dict[str, oracle]`):
            Judges by report name. Each is called as `judge(prompts=..., completions=...)` on chunks of samples, in
            the prompts' format: strings, or lists of chat messages with each completion as
            `[{"role": "assistant", "content": text}]`. Toxicity is `1 - score`; `None`/NaN drops a sample.
        threshold (`float`, *optional*, defaults to `0.5`):
            Toxicity threshold of `toxicity_probability`.
        judge_batch_size (`int`, *optional*, defaults to `256`):
            Samples passed to a judge per call.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
        **generation_kwargs:
            Passed to `generate_samples` (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `batch_size`, `seed`,
            `logits_processor`).

    Returns:
        `dict` with:
            - `toxicity`: `{judge_name: toxicity_metrics(...)}`.
            - `samples`: one entry per prompt, `{"prompt", "completions": list[str], "toxicity": {judge_name:
              list[float | None]}}`.
            - `timings`: `{"generation_s", "scoring_s"}`.
    """
    if not judges:
        raise ValueError("Pass at least one judge to score the samples with (see `trl_cadet.oracles.load_oracle`).")
    is_conversational_prompts(prompts)
    start = time.perf_counter()
    samples = generate_samples(
        model, tokenizer, prompts, num_samples=num_samples, show_progress=show_progress, **generation_kwargs
    )
    generation_s = time.perf_counter() - start

    start = time.perf_counter()
    flat_prompts = [prompt for prompt, completions in zip(prompts, samples, strict=True) for _ in completions]
    flat_texts = [text for completions in samples for text in completions]
    flat_completions = as_completions(flat_prompts, flat_texts)
    toxicity: dict[str, list[list[float | None]]] = {}
    for name, judge in judges.items():
        scores: list[float | None] = []
        for chunk in tqdm(
            range(0, len(flat_texts), judge_batch_size), desc=f"Judging ({name})", disable=not show_progress
        ):
            chunk_prompts = flat_prompts[chunk : chunk + judge_batch_size]
            chunk_completions = flat_completions[chunk : chunk + judge_batch_size]
            raw = judge(prompts=chunk_prompts, completions=chunk_completions)
            scores.extend(check_scores(name, raw, len(chunk_completions)))
        values = iter(None if s is None else 1.0 - s for s in scores)
        toxicity[name] = [[next(values) for _ in completions] for completions in samples]
    scoring_s = time.perf_counter() - start

    return {
        "toxicity": {name: toxicity_metrics(values, threshold=threshold) for name, values in toxicity.items()},
        "samples": [
            {
                "prompt": prompt,
                "completions": completions,
                "toxicity": {name: values[i] for name, values in toxicity.items()},
            }
            for i, (prompt, completions) in enumerate(zip(prompts, samples, strict=True))
        ],
        "timings": {"generation_s": generation_s, "scoring_s": scoring_s},
    }


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str | list[dict[str, str]]],
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = True,
) -> float:
    """Token-weighted perplexity of the model on held-out text.

    `exp(total NLL / total predicted tokens)` over all texts: every token but the first of each text is predicted from
    the tokens before it; padding is left out. Texts are truncated to `max_length` tokens.

    Args:
        model (`PreTrainedModel`):
            Causal LM. It is put in eval mode for the call and given back in its former mode.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer. Strings are tokenized with the tokenizer's special tokens (e.g. BOS); conversations are
            rendered with the chat template, which writes its own.
        texts (`list[str]` or `list[list[dict]]`):
            Strings, or conversations (lists of chat messages); the two may be mixed.
        batch_size (`int`, *optional*, defaults to `8`):
            Texts per forward pass.
        max_length (`int`, *optional*, defaults to `512`):
            Tokens kept per text.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Returns:
        `float`: the perplexity.
    """
    sequences = []
    for text in texts:
        conversational = is_conversational({"messages": text})
        rendered = maybe_apply_chat_template({"messages": text}, tokenizer)["text"] if conversational else text
        ids = tokenizer(rendered, add_special_tokens=not conversational, truncation=True, max_length=max_length)
        if len(ids["input_ids"]) >= 2:
            sequences.append(ids["input_ids"])
    if not sequences:
        raise ValueError("No text has two tokens or more, so there is no token to predict. Pass longer texts.")
    sequences.sort(key=len)  # less padding per batch; the token-weighted sum does not depend on the order
    # Every token but the first of each text is predicted from the tokens before it
    return _perplexity(model, [(ids, 1) for ids in sequences], batch_size, "Perplexity", show_progress)


@torch.no_grad()
def _perplexity(
    model: PreTrainedModel, rows: list[tuple[list[int], int]], batch_size: int, desc: str, show_progress: bool
) -> float:
    """`exp(total NLL / scored tokens)` of `model` over `(token ids, index of the first scored token)` rows, each
    token scored from the tokens before it; right padding, so each row's positions are those of its unpadded text."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not show_progress):
            batch = [torch.tensor(ids) for ids, _ in rows[start : start + batch_size]]
            firsts = [first for _, first in rows[start : start + batch_size]]
            input_ids = pad(batch)
            labels = pad(
                [ids.masked_fill(torch.arange(len(ids)) < first, -100) for ids, first in zip(batch, firsts)], -100
            )
            attention_mask = pad([torch.ones_like(ids) for ids in batch])
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
            targets = labels[:, 1:].to(model.device)
            nll = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def distinct_n(samples: Sequence[Sequence[str]], n: int) -> float | None:
    """Diversity of the samples, as in the detoxification literature: for each prompt, the number of distinct word
    n-grams over all n-grams of its samples (words split on whitespace), averaged over the prompts that have any;
    `None` when no sample has `n` words."""
    ratios = []
    for completions in samples:
        grams = [
            tuple(words[i : i + n])
            for text in completions
            for words in [text.split()]
            for i in range(len(words) - n + 1)
        ]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return statistics.fmean(ratios) if ratios else None


@torch.no_grad()
def generation_perplexity(
    judge: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict[str, str]]],
    samples: Sequence[Sequence[str]],
    batch_size: int = 16,
    show_progress: bool = True,
) -> float | None:
    """Fluency of generated text: the perplexity of the samples' tokens, each given its prompt, under `judge` (a
    reference LM such as the base model; it must share `tokenizer`). Word salad scores high even when it is not toxic.
    """
    is_conversational_prompts(prompts)
    rows = []
    for prompt_ids, completions in zip(tokenize_prompts(prompts, tokenizer), samples, strict=True):
        for completion in completions:
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if completion_ids:
                rows.append((prompt_ids, completion_ids))
    if not rows:
        return None  # no sample has a token to score
    return _perplexity(judge, [(p + c, len(p)) for p, c in rows], batch_size, "Fluency", show_progress)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict[str, str]]] | None = None,
    judges: Mapping[str, OracleFunc] | None = None,
    texts: Sequence[str | list[dict[str, str]]] | None = None,
    num_samples: int = 25,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    batch_size: int = 32,
    threshold: float = 0.5,
    perplexity_batch_size: int = 8,
    max_length: int = 512,
    seed: int | None = 42,
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    save_samples: bool = False,
    model_name_or_path: str | None = None,
    fluency_model: PreTrainedModel | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate toxicity (with `prompts` and `judges`) and perplexity (with `texts`) in one JSON-serialisable report.

    Arguments are those of `evaluate_toxicity`, `generate_samples` and `perplexity` (`perplexity_batch_size` is the
    latter's `batch_size`), plus:

    Args:
        save_samples (`bool`, *optional*, defaults to `False`):
            Put the samples and their per-judge toxicity in the report under `samples`.
        model_name_or_path (`str`, *optional*):
            Recorded as `model`; defaults to the model's `name_or_path`.
        fluency_model (`PreTrainedModel`, *optional*):
            A reference LM sharing the tokenizer (e.g. the base model) that scores the fluency of the samples
            (`generation_perplexity`).

    Returns:
        `dict`: `{"model", "trl_cadet_version", "seed", "settings", "toxicity", "perplexity", "fluency", "timings"}`
        and, with `save_samples`, `"samples"`. `fluency` holds `distinct_1`, `distinct_2`, `distinct_3` of the samples
        and, with `fluency_model`, `generation_perplexity` (empty without prompts). `toxicity` maps each judge to its `toxicity_metrics` (empty without prompts);
        `perplexity` is `None` without texts. Timings are in seconds.
    """
    if prompts is None and texts is None:
        raise ValueError("Nothing to evaluate: pass `prompts` (with `judges`) for toxicity, `texts` for perplexity.")
    if prompts is not None and not judges:
        raise ValueError("Scoring the samples of `prompts` needs at least one judge; pass `judges`.")
    start = time.perf_counter()
    report: dict[str, Any] = {
        "model": model_name_or_path or getattr(model, "name_or_path", None),
        "trl_cadet_version": importlib.metadata.version("trl-cadet"),
        "seed": seed,
        "settings": {
            "num_prompts": None if prompts is None else len(prompts),
            "num_samples": num_samples,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "batch_size": batch_size,
            "threshold": threshold,
            "judges": sorted(judges or {}),
            "logits_processor": None if logits_processor is None else repr(logits_processor),
            "num_texts": None if texts is None else len(texts),
            "max_length": max_length,
            "perplexity_batch_size": perplexity_batch_size,
        },
        "toxicity": {},
        "perplexity": None,
        "fluency": {},
        "timings": {},
    }
    if prompts is not None:
        result = evaluate_toxicity(
            model,
            tokenizer,
            prompts,
            judges,
            num_samples=num_samples,
            threshold=threshold,
            show_progress=show_progress,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            batch_size=batch_size,
            seed=seed,
            logits_processor=logits_processor,
        )
        report["toxicity"] = result["toxicity"]
        report["timings"].update(result["timings"])
        texts_per_prompt = [entry["completions"] for entry in result["samples"]]
        report["fluency"] = {f"distinct_{n}": distinct_n(texts_per_prompt, n) for n in (1, 2, 3)}
        if fluency_model is not None:
            report["fluency"]["generation_perplexity"] = generation_perplexity(
                fluency_model, tokenizer, prompts, texts_per_prompt, show_progress=show_progress
            )
        if save_samples:
            report["samples"] = result["samples"]
    if texts is not None:
        ppl_start = time.perf_counter()
        report["perplexity"] = perplexity(
            model,
            tokenizer,
            texts,
            batch_size=perplexity_batch_size,
            max_length=max_length,
            show_progress=show_progress,
        )
        report["timings"]["perplexity_s"] = time.perf_counter() - ppl_start
    report["timings"]["total_s"] = time.perf_counter() - start
    return report

"""One oracle phase of CADET: sample completions from a policy, label them with the oracles, train the NADO model.

The functions here take a plain (unwrapped) policy model and never touch the trainer, so the sequential schedule can
run them on the training model and the parallel schedule on a snapshot in a background thread.
"""

import copy
import functools
import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TopPLogitsWarper
from trl.trainer.utils import pad

from .modeling_nado import NADOModel
from .nado import importance_weights, nado_loss, sequence_logprobs
from .oracles.base import OraclePhaseStopped, call_oracles
from .sampling import as_completions, fsdp_classes, no_router_logits, sample_completions


@dataclass
class Samples:
    """Completions of one oracle phase, with their labels. Dropped samples are already removed."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    # Per sample, its completion's tokens up to and including the first violating one (`None`: satisfied, or an oracle
    # failed on a prefix); empty when no search was made (`regularized_samples="violations"` makes it)
    violations: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, list]:
        return {k: getattr(self, k) for k in ("prompt_ids", "completion_ids", "scores", "labels", "violations")}

    def extend(self, other: "Samples") -> None:
        if self.violations or other.violations:  # kept aligned with the samples when either side was searched
            self.violations = (self.violations or [None] * len(self)) + (other.violations or [None] * len(other))
        for key in ("prompt_ids", "completion_ids", "scores", "labels"):
            getattr(self, key).extend(getattr(other, key))

    def violation(self, index: int) -> int | None:
        """The length of sample `index`'s shortest unsatisfied prefix, if it was searched and found."""
        return self.violations[index] if self.violations else None


@dataclass
class Labelling:
    """What labelling the completions of one process gave: the kept samples, and what the oracles reported.

    `merge` adds another process's share, so that the phase's metrics are computed over all processes' samples.
    """

    samples: Samples = field(default_factory=Samples)
    dropped: int = 0
    failures: int = 0
    per_oracle: dict[str, list[float]] = field(default_factory=dict)  # the scores each oracle gave (None excluded)
    errors: list[str] = field(default_factory=list)
    # Indices of the kept samples among the completions of this process's call (not offset by `merge`)
    kept: list[int] = field(default_factory=list)
    bisection_calls: int = 0  # oracle calls spent finding the samples' first violations

    def merge(self, other: "Labelling") -> None:
        self.samples.extend(other.samples)
        self.dropped += other.dropped
        self.failures += other.failures
        self.bisection_calls += other.bisection_calls
        for name, scores in other.per_oracle.items():
            self.per_oracle.setdefault(name, []).extend(scores)
        self.errors.extend(other.errors)

    def metrics(self) -> dict[str, float]:
        metrics = {"oracle/dropped": float(self.dropped), "oracle/failures": float(self.failures)}
        if self.bisection_calls:
            metrics["oracle/bisection_calls"] = float(self.bisection_calls)
        for name, scores in self.per_oracle.items():
            if scores:
                metrics[f"oracle/{name}/mean"] = sum(scores) / len(scores)
        return metrics


@dataclass
class RolloutPrefixes:
    """Where the corpus-prefix rollouts start: for each corpus completion the oracles judged unsatisfied, its prompt
    and the completion's tokens before its first violating token."""

    prompts: list[Any] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    prefix_ids: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def to_dict(self) -> dict[str, list]:
        return {k: getattr(self, k) for k in ("prompts", "prompt_ids", "prefix_ids")}

    def extend(self, other: "RolloutPrefixes") -> None:
        for key, values in other.to_dict().items():
            getattr(self, key).extend(values)

    def share(self, rank: int, processes: int) -> "RolloutPrefixes":
        """This process's share. Every process gets as many (the first few taken twice when they do not divide
        evenly), since the forward passes of a sharded model are collective."""
        padding = -len(self) % processes if len(self) else 0
        return RolloutPrefixes(**{k: (v + v[:padding])[rank::processes] for k, v in self.to_dict().items()})


def collate_samples(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, device
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `completion_mask` for prompt + completion sequences."""
    pairs = list(zip(prompt_ids, completion_ids, strict=True))
    batch = {
        "input_ids": pad([torch.tensor(p + c, dtype=torch.long) for p, c in pairs], padding_value=pad_token_id),
        "attention_mask": pad([torch.ones(len(p) + len(c), dtype=torch.long) for p, c in pairs]),
        "completion_mask": pad([torch.tensor([0] * len(p) + [1] * len(c), dtype=torch.long) for p, c in pairs]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def has_sharded_weights(model: torch.nn.Module) -> bool:
    """Whether this process holds only a shard of some of `model`'s weights (FSDP 1 or 2, DeepSpeed ZeRO-3)."""
    if any(isinstance(m, fsdp_classes()) for m in model.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()
    # ZeRO-3 tags its partitioned parameters with `ds_id`
    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


def snapshot_policy(
    policy: PreTrainedModel, device: torch.device | str, snapshot: PreTrainedModel | None = None
) -> PreTrainedModel:
    """A frozen copy of `policy` on `device` for the parallel schedule, or `snapshot` refreshed in place."""
    if has_sharded_weights(policy):
        raise RuntimeError(
            "The parallel schedule needs a full copy of the policy, but its weights are sharded (FSDP or DeepSpeed "
            "ZeRO-3), so this process holds only part of them. Use `round_schedule='sequential'`."
        )
    if snapshot is None:
        try:
            memo: dict[int, Any] = {}
            rebuilt: dict[int, types.FunctionType] = {}
            snapshot = copy.deepcopy(policy, memo)
            for module in policy.modules():
                # An instance-level `forward` (SFTTrainer's fused LM head, Accelerate's autocast) is a closure over
                # the policy's own forward: `deepcopy` keeps functions as they are, so the copy would run the policy
                # (and sample from the model being trained) instead of itself. Rebuilt from the original's, through
                # the memo, each refers to the copy of what the original referred to
                for name, value in vars(module).items():
                    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
                        setattr(memo[id(module)], name, _copy_callable(value, memo, rebuilt))
            snapshot = snapshot.to(device)
        except Exception as error:
            raise RuntimeError(
                f"Could not copy the policy for the parallel schedule ({type(error).__name__}: {error}). Use "
                "`round_schedule='sequential'`."
            ) from error
        snapshot.requires_grad_(False)
    else:
        # Only trainable parameters change during training; frozen (e.g. quantised base) weights are shared state
        live = dict(policy.named_parameters())
        with torch.no_grad():
            for name, param in snapshot.named_parameters():
                if live[name].requires_grad:
                    param.copy_(live[name].detach())
    return snapshot.eval()


def _copy_callable(value: Any, memo: dict[int, Any], rebuilt: dict[int, types.FunctionType]) -> Any:
    """`value` as `copy.deepcopy(value, memo)` would give it if it copied functions: a function with a closure is
    rebuilt (once: `rebuilt`) with the closure's contents copied through `memo`, so that a closure over the original
    model refers to its copy. A bound method is rebound to the copy of its object, even where `memo` already holds a
    copy of the method (the one `deepcopy` made, which calls the original function)."""
    if isinstance(value, types.MethodType):
        return types.MethodType(_copy_callable(value.__func__, memo, rebuilt), copy.deepcopy(value.__self__, memo))
    if isinstance(value, functools.partial):
        copied = functools.partial(
            _copy_callable(value.func, memo, rebuilt),
            *(_copy_callable(arg, memo, rebuilt) for arg in value.args),
            **{key: _copy_callable(arg, memo, rebuilt) for key, arg in value.keywords.items()},
        )
        copied.__dict__.update(value.__dict__)
        return copied
    if not isinstance(value, types.FunctionType):
        return copy.deepcopy(value, memo)
    if not value.__closure__:
        return value
    if id(value) in rebuilt:
        return rebuilt[id(value)]
    cells = tuple(types.CellType() for _ in value.__closure__)
    function = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, cells)
    rebuilt[id(value)] = function  # before the contents, which may refer back to the function
    for cell, original in zip(cells, value.__closure__, strict=True):
        try:
            contents = original.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        cell.cell_contents = _copy_callable(contents, memo, rebuilt)
    function.__kwdefaults__ = value.__kwdefaults__
    function.__qualname__ = value.__qualname__
    function.__dict__.update(value.__dict__)  # `functools.wraps`' `__wrapped__`, which `generate` reads
    return function


def oracle_completions(
    prompts: list[Any], completion_ids: list[list[int]], processing_class: PreTrainedTokenizerBase
) -> list[Any]:
    """Completions as the oracles get them: decoded text, wrapped as an assistant message after a conversational prompt
    (as TRL's reward functions expect)."""
    return as_completions(prompts, processing_class.batch_decode(completion_ids, skip_special_tokens=True))


def first_violations(
    oracles: list,
    prompts: list[Any],
    completion_ids: list[list[int]],
    processing_class: PreTrainedTokenizerBase,
    threshold: float,
    oracle_weights: list[float] | None = None,
    max_retries: int = 0,
    timeout: float | None = None,
    retry_delay: float = 1.0,
) -> tuple[list[int | None], int]:
    """For completions the oracles judged unsatisfied, the length of their shortest unsatisfied prefix, found by
    bisection: about log2(length) oracle calls per completion, the completions' prefixes batched into one call per
    step. It assumes a prefix that breaks the constraint is not repaired by what follows (an insult stays written).

    Returns:
        `(lengths, calls)`: for each completion, the number of its tokens up to and including the first violating one
        (`None` where an oracle failed on a prefix), and the number of prefixes judged.
    """
    low = [0] * len(completion_ids)  # the empty prefix counts as satisfied
    high = [len(ids) for ids in completion_ids]  # the whole completion is not
    failed = [False] * len(completion_ids)
    calls = 0
    while active := [i for i in range(len(completion_ids)) if not failed[i] and high[i] - low[i] > 1]:
        middles = [(low[i] + high[i]) // 2 for i in active]
        result = call_oracles(
            oracles,
            [prompts[i] for i in active],
            oracle_completions(
                [prompts[i] for i in active],
                [completion_ids[i][:m] for i, m in zip(active, middles, strict=True)],
                processing_class,
            ),
            weights=oracle_weights,
            max_retries=max_retries,
            timeout=timeout,
            retry_delay=retry_delay,
        )
        calls += len(active)
        for i, middle, score in zip(active, middles, result.scores, strict=True):
            if score is None:
                failed[i] = True
            elif score < threshold:
                high[i] = middle
            else:
                low[i] = middle
    return [None if bad else length for bad, length in zip(failed, high, strict=True)], calls


def find_violations(
    oracles: list,
    prompts: list[Any],
    labelling: Labelling,
    processing_class,
    args,
    num_generations: int | None = None,
) -> None:
    """Set `labelling.samples.violations`: where each unsatisfied sample first breaks the constraint, by bisection
    (`first_violations`), and count the calls in `labelling.bisection_calls`. `prompts` are those `label_samples` got,
    each with `num_generations` completions (default: `args.num_generations`)."""
    num_generations = args.num_generations if num_generations is None else num_generations
    samples = labelling.samples
    unsatisfied = [i for i, score in enumerate(samples.scores) if score < args.oracle_threshold]
    lengths, calls = first_violations(
        oracles,
        [prompts[labelling.kept[i] // num_generations] for i in unsatisfied],
        [samples.completion_ids[i] for i in unsatisfied],
        processing_class,
        threshold=args.oracle_threshold,
        oracle_weights=args.oracle_weights,
        max_retries=args.oracle_max_retries,
        timeout=args.oracle_timeout,
        retry_delay=args.oracle_retry_delay,
    )
    samples.violations = [None] * len(samples)
    for i, length in zip(unsatisfied, lengths, strict=True):
        samples.violations[i] = length
    labelling.bisection_calls += calls


def label_samples(
    oracles: list,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    processing_class: PreTrainedTokenizerBase,
    num_generations: int,
    oracle_weights: list[float] | None,
    labels: str,
    threshold: float,
    max_retries: int,
    progress: bool = False,
    timeout: float | None = None,
    retry_delay: float = 1.0,
    stop=None,
) -> Labelling:
    """Decode, score and label completions; returns the kept samples and what the oracles reported."""
    repeated_prompts = [p for p in prompts for _ in range(num_generations)]
    completions = oracle_completions(repeated_prompts, completion_ids, processing_class)
    result = call_oracles(
        oracles,
        repeated_prompts,
        completions,
        weights=oracle_weights,
        max_retries=max_retries,
        progress=progress,
        timeout=timeout,
        retry_delay=retry_delay,
        stop=stop,
    )
    samples, kept = Samples(), []
    for i, score in enumerate(result.scores):
        if score is None:
            continue
        samples.prompt_ids.append(prompt_ids[i // num_generations])
        samples.completion_ids.append(completion_ids[i])
        samples.scores.append(score)
        samples.labels.append(float(score >= threshold) if labels == "hard" else score)
        kept.append(i)
    return Labelling(
        samples=samples,
        kept=kept,
        dropped=result.num_dropped,
        failures=result.num_failures,
        per_oracle={name: [s for s in scores if s is not None] for name, scores in result.per_oracle.items()},
        errors=result.errors,
    )


@dataclass
class SampleFeatures:
    """What NADO training needs of one sample, from one forward pass of the policy (the policy is frozen during the
    phase, so every epoch after the first costs only the NADO model and the LM head, not the whole LM).

    A sample's *window* is the positions that predict its completion tokens, from its last prompt token to its last
    completion token: `tokens` are the tokens there (`[C + 1]`), and `lm_logits` or `head_states` the LM's logits or
    the final hidden states that give them through the LM head (`[C + 1, V]` or `[C + 1, H]`). `nado_states` are the
    hidden states the NADO model reads: the window when it is a head only, the whole sequence when it has its own
    layers (they attend to the prompt), with `offset` the window's first position.
    """

    tokens: torch.Tensor
    nado_states: torch.Tensor
    offset: int
    head_states: torch.Tensor | None = None
    lm_logits: torch.Tensor | None = None


@torch.no_grad()
def sample_features(
    policy: PreTrainedModel,
    nado: NADOModel,
    samples: Samples,
    pad_token_id: int,
    batch_size: int,
    proposal: tuple[float, float] | None = None,
    progress: bool = False,
    use_head: bool | None = None,
) -> tuple[list[SampleFeatures], torch.Tensor | None]:
    """One forward pass of `policy` over the samples: their `SampleFeatures`, and, with `proposal=(temperature,
    top_p)`, the self-normalised importance weights `p_θ(y|x) / p_sample(y|x)` of the completions (else `None`).

    `use_head`: whether to keep the final hidden states (and run the LM head on them later) instead of the logits;
    decided on the first batch when `None`, so pass the decision of an earlier call when both calls' features are
    batched together."""
    policy_device, device = policy.device, next(nado.parameters()).device
    head = policy.get_output_embeddings()
    top_p_warper = TopPLogitsWarper(proposal[1]) if proposal is not None and proposal[1] < 1.0 else None
    features: list[SampleFeatures] = []
    policy_lp, proposal_lp = [], []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="Oracle phase: NADO features", unit="batch", disable=not progress, leave=False):
        prompts = samples.prompt_ids[start : start + batch_size]
        completions = samples.completion_ids[start : start + batch_size]
        batch = collate_samples(prompts, completions, pad_token_id, policy_device)
        outputs = policy(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
            **no_router_logits(policy),
        )
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        length = batch["input_ids"].shape[1]
        logits, final = outputs.logits[:, -length:], outputs.hidden_states[-1][:, -length:]
        if head is not None:
            # Under mixed precision, Accelerate's autocast wrapper returns float32 outputs from a float16 or bfloat16
            # model, whose head takes its own dtype
            final = final.to(head.weight.dtype)
        nado_hidden = outputs.hidden_states[nado.config.hidden_state_layer][:, -length:]
        if use_head is None:
            use_head = head_gives_logits(policy, final[:1], logits[:1])
        if proposal is not None:
            proposal_logits = logits.float() / proposal[0]
            if top_p_warper is not None:
                proposal_logits = top_p_warper(None, proposal_logits.flatten(0, 1)).view_as(proposal_logits)
            policy_lp.append(sequence_logprobs(logits, batch["input_ids"], batch["completion_mask"]).cpu())
            proposal_lp.append(sequence_logprobs(proposal_logits, batch["input_ids"], batch["completion_mask"]).cpu())
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            window = slice(len(prompt) - 1, len(prompt) + len(completion))
            features.append(
                SampleFeatures(
                    tokens=batch["input_ids"][row, window].to(device),
                    nado_states=nado_hidden[row, window if not nado.layers else slice(0, window.stop)].to(device),
                    offset=0 if not nado.layers else window.start,
                    head_states=final[row, window] if use_head else None,
                    lm_logits=None if use_head else logits[row, window].clone(),  # not a view of the whole batch
                )
            )
    weights = None
    if proposal is not None:
        weights = importance_weights(torch.cat(policy_lp), torch.cat(proposal_lp))
    return features, weights


@torch.no_grad()
def head_gives_logits(model: PreTrainedModel, hidden_states: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether `model`'s LM head alone turns its last hidden states into its logits, checked on a few positions, so
    that the head can run on chosen positions only. Not for a model that scales or soft-caps its logits, and never
    with sharded weights (FSDP, ZeRO-3), whose head can only run inside the model's forward."""
    head = model.get_output_embeddings()
    if head is None or has_sharded_weights(model):
        return False
    # Under mixed precision, Accelerate's autocast wrapper returns float32 outputs from a float16 or bfloat16 model,
    # whose head takes its own dtype
    return torch.allclose(head(hidden_states.to(head.weight.dtype)).float(), logits.float(), rtol=1e-3, atol=1e-3)


def output_embedding_weight(model: PreTrainedModel) -> torch.Tensor | None:
    """The LM-head weight `[V, H]` of `model` (a PEFT model too), which the tied NADO head reads; `None` if it has
    none."""
    head = model.get_output_embeddings()
    return None if head is None else head.weight


def _nado_batch(policy, nado: NADOModel, features: list[SampleFeatures]):
    """`(nado_logits, lm_logits, tokens, completion_mask)` over the windows of `features`, right-padded."""
    device = next(nado.parameters()).device
    embeddings = output_embedding_weight(policy)
    tokens = pad([f.tokens for f in features])
    lengths = torch.tensor([len(f.tokens) for f in features], device=device)
    columns = torch.arange(tokens.shape[1], device=device)
    completion_mask = ((columns[None] > 0) & (columns[None] < lengths[:, None])).long()
    if nado.layers:
        states = pad([f.nado_states for f in features])
        attention_mask = pad([torch.ones(len(f.nado_states), device=device) for f in features]).long()
        # The layers attend to the whole sequence; only the windows are scored
        offsets = torch.tensor([f.offset for f in features], device=device)
        positions = (offsets[:, None] + columns[None]).clamp(max=states.shape[1] - 1)
        nado_logits = nado(states, attention_mask, output_embeddings=embeddings)
        nado_logits = nado_logits.gather(1, positions[..., None].expand(-1, -1, nado_logits.shape[-1]))
    else:
        nado_logits = nado(pad([f.nado_states for f in features]), output_embeddings=embeddings)
    with torch.no_grad():
        if features[0].head_states is not None:
            lm_logits = policy.get_output_embeddings()(pad([f.head_states for f in features]))
        else:
            lm_logits = pad([f.lm_logits for f in features])
    return nado_logits, lm_logits.to(device), tokens, completion_mask


def train_nado(
    policy: PreTrainedModel,
    nado: NADOModel,
    optimizer: torch.optim.Optimizer,
    samples: Samples,
    pad_token_id: int,
    epochs: int,
    batch_size: int,
    consistency_weight: float,
    temperature: float = 1.0,
    top_p: float = 1.0,
    importance_weighting: bool = True,
    seed: int = 0,
    extra_samples: Samples | None = None,
    progress: bool = False,
    last_labels_only: int = 0,
) -> dict[str, float]:
    """Train `nado` on labelled samples of `policy` (warm start: it keeps its weights and optimiser state).

    With a sampling proposal other than the policy (`temperature != 1` or `top_p < 1`), each completion is weighted by
    the self-normalised importance weight `p_θ(y|x) / p_sample(y|x)` over all the phase's samples. `extra_samples`
    (labelled corpus completions, not drawn from the proposal) are added with weight 1; the first `last_labels_only`
    of them train the BCE at their last token only (`nado_loss`'s `label_mask`), where the label is exact.
    """
    device = next(nado.parameters()).device
    tempered = importance_weighting and (temperature != 1.0 or top_p < 1.0)
    start_time = time.perf_counter()
    features, weights = sample_features(
        policy,
        nado,
        samples,
        pad_token_id,
        batch_size,
        proposal=(temperature, top_p) if tempered else None,
        progress=progress,
    )
    weights = torch.ones(len(samples)) if weights is None else weights.cpu()
    labels = list(samples.labels)
    if extra_samples is not None and len(extra_samples):
        extra_features, _ = sample_features(
            policy,
            nado,
            extra_samples,
            pad_token_id,
            batch_size,
            progress=progress,
            use_head=features[0].head_states is not None if features else None,
        )
        features += extra_features
        weights = torch.cat([weights, torch.ones(len(extra_samples))])
        labels += extra_samples.labels
    last_only = torch.zeros(len(features), dtype=torch.bool)
    last_only[len(samples) : len(samples) + last_labels_only] = True
    n = len(features)
    weights = weights.to(device)
    features_time = time.perf_counter() - start_time
    labels = torch.tensor(labels, dtype=torch.float32, device=device)
    nado.set_prior(labels.mean().item())  # a new NADO model starts at the base rate; a trained one keeps its bias
    generator = torch.Generator().manual_seed(seed)
    totals = {"bce": 0.0, "consistency": 0.0, "accuracy": 0.0}
    steps = 0
    nado.train()
    nado.requires_grad_(True)
    bar = tqdm(
        total=epochs * -(-n // batch_size), desc="Oracle phase: NADO training", disable=not progress, leave=False
    )
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            nado_logits, lm_logits, tokens, completion_mask = _nado_batch(policy, nado, [features[i] for i in index])
            last = completion_mask.sum(1)  # the window's last column holds the last completion token (0 is context)
            label_mask = None
            if last_only[index].any():
                at_last = F.one_hot(last, completion_mask.shape[1]).to(completion_mask.dtype)
                label_mask = torch.where(last_only[index, None].to(at_last.device), at_last, completion_mask)
            loss, bce, consistency = nado_loss(
                nado_logits,
                lm_logits,
                tokens,
                labels[index],
                completion_mask,
                consistency_weight=consistency_weight,
                sample_weights=weights[index],
                return_parts=True,
                label_mask=label_mask,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                # R predicted for the whole completion (at its last token) against the sequence label
                rows = torch.arange(len(index), device=device)
                r_last = nado_logits[rows, last - 1, tokens[rows, last]]
                correct = (r_last > 0) == (labels[index] >= 0.5)
            totals["bce"] += bce.item()
            totals["consistency"] += consistency.item()
            totals["accuracy"] += correct.float().mean().item()
            steps += 1
            bar.update()
    bar.close()
    nado.requires_grad_(False)
    nado.eval()
    metrics = {f"nado/{k}": v / max(steps, 1) for k, v in totals.items()}
    return {**metrics, "time/nado_features": features_time}


def sample_rollouts(
    policy: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase,
    oracles: list,
    prefixes: RolloutPrefixes,
    args,
    seed: int,
    gather=None,
    progress: bool = False,
    stop=None,
    private_rng: bool = False,
) -> Labelling:
    """Corpus-prefix rollouts: the policy continues each prefix once (up to `max_completion_length` new tokens), and
    the oracles label prefix and continuation as one completion. Where the prefix ends right before a corpus
    completion's first violating token, the rollout labels the policy's own next token at the very context where the
    corpus's broke the constraint. `gather` merges the processes' shares."""
    starts = [p + q for p, q in zip(prefixes.prompt_ids, prefixes.prefix_ids, strict=True)]
    continuations = sample_completions(
        policy,
        processing_class,
        starts,
        num_generations=1,
        max_new_tokens=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.generation_batch_size,
        seed=seed,
        progress=progress,
        desc="Oracle phase: rollouts",
        stop=stop,
        private_rng=private_rng,
    )
    labelling = label_samples(
        oracles,
        prefixes.prompts,
        prefixes.prompt_ids,
        [q + c for q, c in zip(prefixes.prefix_ids, continuations, strict=True)],
        processing_class,
        num_generations=1,
        oracle_weights=args.oracle_weights,
        labels=args.oracle_labels,
        threshold=args.oracle_threshold,
        max_retries=args.oracle_max_retries,
        timeout=args.oracle_timeout,
        retry_delay=args.oracle_retry_delay,
        stop=stop,
    )
    return gather(labelling) if gather is not None else labelling


@dataclass
class PhaseResult:
    """What an oracle phase hands back to the trainer."""

    round: int
    samples: Samples
    metrics: dict[str, float]
    satisfaction: float | None
    errors: list[str] = field(default_factory=list)  # the oracles that failed every retry, and why


def run_oracle_phase(
    policy: PreTrainedModel,
    nado: NADOModel,
    optimizer: torch.optim.Optimizer,
    processing_class: PreTrainedTokenizerBase,
    oracles: list,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    args,
    round_index: int,
    gather=None,
    corpus_samples: Samples | None = None,
    rollout_prefixes: RolloutPrefixes | None = None,
    progress: bool = False,
    stop=None,
    private_rng: bool = False,
) -> PhaseResult:
    """Sample from `policy`, label with `oracles`, and train `nado` in place. `args` is a `CADETConfig`.

    `corpus_samples`, labelled completions of the training corpus, are added to the NADO model's training data (their
    features are those of the current `policy`); the phase's metrics describe the policy's samples only.
    `rollout_prefixes` (this process's share): the policy continues each corpus prefix once, and the labelled results
    (prefix and continuation as one completion) are added to the NADO model's training data too.

    `gather`, when given, merges the `Labelling` of all processes (each process samples its share of the prompts) so
    that every process trains the NADO model on the same data and logs the phase's global metrics. `stop`, a
    `threading.Event`, ends the phase early with `OraclePhaseStopped` once set (checked between sampling batches and
    while waiting for the oracles). `private_rng=True` samples through a generator of the phase's own
    (`sample_completions`), for a phase that runs beside training.
    """
    start = time.perf_counter()
    was_training = policy.training
    policy.eval()
    seed = args.seed + 1000 * round_index
    try:
        completion_ids = sample_completions(
            policy,
            processing_class,
            prompt_ids,
            num_generations=args.num_generations,
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.generation_batch_size,
            seed=seed,
            progress=progress,
            desc="Oracle phase: sampling",
            stop=stop,
            private_rng=private_rng,
        )
        generated = time.perf_counter()
        labelling = label_samples(
            oracles,
            prompts,
            prompt_ids,
            completion_ids,
            processing_class,
            num_generations=args.num_generations,
            oracle_weights=args.oracle_weights,
            labels=args.oracle_labels,
            threshold=args.oracle_threshold,
            max_retries=args.oracle_max_retries,
            progress=progress,
            timeout=args.oracle_timeout,
            retry_delay=args.oracle_retry_delay,
            stop=stop,
        )
        if stop is not None and stop.is_set():
            raise OraclePhaseStopped("Training was stopped during the oracle phase.")
        if args.regularized_samples == "violations" and args.regularized_positions != "corpus":
            find_violations(oracles, prompts, labelling, processing_class, args)
        if gather is not None:
            labelling = gather(labelling)
        samples, metrics = labelling.samples, labelling.metrics()
        labelled = time.perf_counter()
        extra_samples = Samples()
        if corpus_samples is not None:
            extra_samples.extend(corpus_samples)
        if rollout_prefixes is not None:
            rollouts = sample_rollouts(
                policy,
                processing_class,
                oracles,
                rollout_prefixes,
                args,
                seed + 1,
                gather,
                progress,
                stop,
                private_rng,
            )
            extra_samples.extend(rollouts.samples)
            metrics["oracle/rollouts"] = float(len(rollouts.samples) + rollouts.dropped)
            if len(rollouts.samples):
                metrics["oracle/rollout_satisfaction"] = sum(
                    s >= args.oracle_threshold for s in rollouts.samples.scores
                ) / len(rollouts.samples)
            metrics["time/rollouts"] = time.perf_counter() - labelled
        nado_started = time.perf_counter()
        satisfaction = None
        if len(samples):
            satisfaction = sum(s >= args.oracle_threshold for s in samples.scores) / len(samples)
            metrics["oracle/satisfaction"] = satisfaction
            metrics["oracle/mean_score"] = sum(samples.scores) / len(samples)
            metrics.update(
                train_nado(
                    policy,
                    nado,
                    optimizer,
                    samples,
                    pad_token_id=processing_class.pad_token_id,
                    extra_samples=extra_samples,
                    epochs=args.nado_epochs,
                    batch_size=args.nado_batch_size,
                    consistency_weight=args.nado_consistency_weight,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    importance_weighting=args.nado_importance_weighting,
                    seed=seed,
                    progress=progress,
                    last_labels_only=len(corpus_samples or ()) if args.nado_corpus_labels == "last" else 0,
                )
            )
    finally:
        policy.train(was_training)
    end = time.perf_counter()
    num_completions = len(completion_ids)
    metrics.update(
        {
            "oracle/samples_per_second": num_completions / max(labelled - start, 1e-9),
            "time/generation": generated - start,
            "time/labelling": labelled - generated,
            "time/nado_training": end - nado_started,
            "time/oracle_phase": end - start,
        }
    )
    return PhaseResult(
        round=round_index, samples=samples, metrics=metrics, satisfaction=satisfaction, errors=labelling.errors
    )

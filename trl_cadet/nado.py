"""The maths of CADET, each formula once (see docs/cadet_trainer.md and METHOD.md).

Conventions, as in transformers and TRL:

- `lm_logits` and `nado_logits` have shape `[..., V]` and are *causally aligned*: position `t` scores the token at
  `t + 1`. `nado_logits[..., t, v]` is `r(ctx_t, v)`, the logit of `R(ctx_t, v) = Pr[constraint | ctx_t, v]`.
- `completion_mask` has the shape of `input_ids` and is 1 on completion tokens (the tokens the oracle judged).

Everything is computed in float32 and in log space, so that saturated `R` (a logit of +-1e4) gives no NaN.
"""

import math

import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax


def guided_logits(lm_logits: torch.Tensor, nado_logits: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Unnormalised `log q`: the LM's logits plus `strength · log R(ctx, v)`, in float32.

    With `strength=1` their softmax is `q(v | ctx) ∝ p(v | ctx) R(ctx, v)` (see `target_logprobs`); a larger
    `strength` enforces the constraint harder when decoding.

    Args:
        lm_logits (`torch.Tensor` of shape `[..., V]`): logits of the LM at each context.
        nado_logits (`torch.Tensor` of shape `[..., V]`): NADO logits `r(ctx, v)` with `R = sigmoid(r)`.
        strength (`float`, *optional*, defaults to `1.0`): multiplier of `log R`.
    """
    return lm_logits.float() + strength * F.logsigmoid(nado_logits.float())


def _plausible(z: torch.Tensor, min_p: float, neutral_tokens: torch.Tensor | None):
    """The tokens the target reweights (`p >= min_p · max p`, not neutral), and the `p`-weighted log-mean over them
    of a `[..., V]` log-weight (`[..., 1]`). `z`: the LM's logits or log-probabilities."""
    cut_off = math.log(min_p) if min_p else -math.inf  # without a cut-off every token is plausible
    plausible = z >= z.max(dim=-1, keepdim=True).values + cut_off
    if neutral_tokens is not None:
        plausible[..., neutral_tokens] = False
    outside = z.new_tensor(-math.inf)  # a scalar: no second `[..., V]` tensor
    log_mass = torch.logsumexp(torch.where(plausible, z, outside), dim=-1, keepdim=True)

    def plausible_mean(log_weight):
        mean = torch.logsumexp(torch.where(plausible, z + log_weight, outside), dim=-1, keepdim=True) - log_mass
        return mean.nan_to_num(nan=0.0)  # no plausible token (only neutral ones): any constant gives q = p

    return plausible, plausible_mean


def target_logprobs(
    lm_logits: torch.Tensor,
    nado_logits: torch.Tensor,
    min_p: float = 0.0,
    demote_only: bool = False,
    safe_ratio: float = 1.0,
    demote_below: float = 1.0,
    neutral_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities of the constraint-satisfying distribution `q(v | ctx) ∝ p(v | ctx) R(ctx, v)`.

    With `min_p > 0`, `q` reweights only the tokens the LM itself finds plausible, those with `p(v | ctx) >= min_p ·
    max_u p(u | ctx)` (the rule of min-p sampling): every other token gets the `p`-weighted mean of `R` over the
    plausible ones, so that it keeps its probability under `p` (`q(v) = p(v)`) and probability moves only between
    plausible tokens, never to a token the LM would not write.

    With `demote_only=True`, `R` is capped at that mean, `q(v) ∝ p(v) min(R(ctx, v), R̄)` among the plausible tokens
    (which still keep their total mass): the tokens less likely than average to keep the constraint lose probability,
    which goes to the other plausible tokens in proportion to `p`, so `q` never reorders the tokens the NADO model finds
    at least as safe as the average. With `demote_below < 1` the cap is that share of the mean, `q(v) ∝ p(v) min(R(ctx,
    v), demote_below · R̄)`: a token is lowered only when its `R` is below `demote_below` times the mean, so that the
    NADO model's small errors between benign tokens (within that factor of the mean) move nothing, at any λ.

    `neutral_tokens` (e.g. the end-of-turn token) are treated as the implausible ones: `q(v) = p(v)`, and their `R`
    does not enter the mean.

    With `safe_ratio < 1`, `R` is capped at `safe_ratio` times the largest `R` among the plausible tokens: the tokens
    within that factor of the safest one count as equally safe, so that `q` never reorders them, and only the tokens
    below it are lowered. Unlike the mean of `demote_only`, this reference does not follow `p`: a token the LM has
    learned to write (most of `p`'s mass) is still lowered when a plausible alternative is much safer.

    Args:
        lm_logits (`torch.Tensor` of shape `[..., V]`): logits of the LM at each context.
        nado_logits (`torch.Tensor` of shape `[..., V]`): NADO logits `r(ctx, v)` with `R = sigmoid(r)`.
        min_p (`float`, *optional*, defaults to `0.0`): the plausibility cut-off, relative to the most likely token;
            0 reweights every token.
        demote_only (`bool`, *optional*, defaults to `False`): cap `R` at its `p`-weighted mean over the plausible
            tokens.
        safe_ratio (`float`, *optional*, defaults to `1.0`): cap `R` at this share of the largest `R` over the
            plausible tokens; 1 leaves `R` as it is.
        demote_below (`float`, *optional*, defaults to `1.0`): with `demote_only`, cap `R` at this share of its
            `p`-weighted mean over the plausible tokens instead of the mean itself.
        neutral_tokens (`torch.Tensor` of token ids, *optional*): tokens whose `R` is not used; they keep `p`.

    Returns:
        `torch.Tensor` of shape `[..., V]`: `log q(v | ctx) = log_softmax(z + log sigmoid(r))`, in float32.
    """
    if not 0 < safe_ratio <= 1:
        raise ValueError(f"`safe_ratio` must be in (0, 1], got {safe_ratio}.")
    if not 0 < demote_below <= 1:
        raise ValueError(f"`demote_below` must be in (0, 1], got {demote_below}.")
    if demote_below < 1 and not demote_only:
        raise ValueError(f"`demote_below` ({demote_below}) caps R below its mean, so it needs `demote_only=True`.")
    if not min_p and not demote_only and safe_ratio == 1 and neutral_tokens is None:
        return torch.log_softmax(guided_logits(lm_logits, nado_logits), dim=-1)
    # Every step is invariant to a constant added to the logits, so they serve as log p without a softmax
    z = lm_logits.float()
    log_r = F.logsigmoid(nado_logits.float())
    plausible, plausible_mean = _plausible(z, min_p, neutral_tokens)
    outside = z.new_tensor(-math.inf)
    if safe_ratio < 1:
        safest = torch.where(plausible, log_r, outside).amax(dim=-1, keepdim=True)
        log_r = torch.minimum(log_r, safest + math.log(safe_ratio))
    log_mean_r = plausible_mean(log_r)
    if demote_only:
        log_r = torch.minimum(log_r, log_mean_r + math.log(demote_below))
        log_mean_r = plausible_mean(log_r)
    # The implausible tokens get the plausible ones' mean weight: the plausible set keeps its mass, the others keep p
    return torch.log_softmax(z + torch.where(plausible, log_r, log_mean_r), dim=-1)


def target_token_weights(
    lm_logits: torch.Tensor,
    nado_logits: torch.Tensor,
    tokens: torch.Tensor,
    min_p: float = 0.0,
    demote_below: float = 1.0,
    neutral_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each given next token's weight toward the constraint-satisfying distribution, `min(1, R(ctx, y) / (demote_below
    · R̄(ctx)))`, with `R̄` the `p`-weighted mean of `R` over the plausible tokens (as in `target_logprobs`).

    `R(ctx, y) / R(ctx)` is the factor by which `q*` lowers or raises `y` against `p`; its product over a completion is
    the sequence's importance weight `C(y) / R(x)`, which filtering the corpus applies. Capped at 1, no token weighs
    more than under plain SFT. The factor is taken whether or not `y` is plausible under the LM, so that a corpus
    token the LM cannot write yet is weighed too; `neutral_tokens` weigh 1.

    Args:
        lm_logits (`torch.Tensor` of shape `[N, V]`): logits (or log-probabilities) of the LM at each context.
        nado_logits (`torch.Tensor` of shape `[N, V]`): NADO logits at the same contexts.
        tokens (`torch.Tensor` of shape `[N]`): the next token at each context.
        min_p, demote_below, neutral_tokens: as in `target_logprobs`.

    Returns:
        `torch.Tensor` of shape `[N]`, in (0, 1], detached.
    """
    with torch.no_grad():
        z = lm_logits.float()
        log_r = F.logsigmoid(nado_logits.float())
        _, plausible_mean = _plausible(z, min_p, neutral_tokens)
        reference = plausible_mean(log_r)[:, 0] + math.log(demote_below)
        weights = (log_r.gather(-1, tokens[:, None])[:, 0] - reference).clamp(max=0.0).exp()
        if neutral_tokens is not None:
            weights = torch.where(torch.isin(tokens, neutral_tokens), 1.0, weights)
        return weights


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    # A batch with no regularised position contributes a finite zero, not 0/0
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def cadet_kl(
    lm_logits: torch.Tensor,
    nado_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    lm_logprobs: torch.Tensor | None = None,
    min_p: float = 0.0,
    demote_only: bool = False,
    safe_ratio: float = 1.0,
    demote_below: float = 1.0,
    neutral_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CADET regulariser Ω: `KL(q ‖ p_θ)` at each context, with `q` built from the *detached* LM logits.

    `q` is "the closest distribution to the current LM that satisfies the constraint", a fixed target at each step:
    gradients flow to `lm_logits` only (through `log p_θ`), never to `nado_logits` nor through `q`. The gradient
    with respect to the logits is `p_θ - q`.

    Args:
        lm_logits (`torch.Tensor` of shape `[..., V]`): logits of the LM being trained.
        nado_logits (`torch.Tensor` of shape `[..., V]`): NADO logits at the same contexts.
        mask (`torch.Tensor` of shape `[...]`, *optional*): 1 where a context is regularised. With
            `reduction="mean"`, the mean is over masked contexts only.
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` or `"none"` (per-context KL, shape `[...]`,
            masked contexts set to 0).
        lm_logprobs (`torch.Tensor` of shape `[..., V]`, *optional*): `log_softmax(lm_logits)` in float32, when the
            caller already has it (the trainer computes it once for the LM loss and the regulariser).
        min_p (`float`, *optional*, defaults to `0.0`): `q` reweights only the tokens with `p >= min_p · max p` (see
            `target_logprobs`); the others keep their probability.
        demote_only (`bool`, *optional*, defaults to `False`): `q` only lowers the tokens whose `R` is below the
            plausible tokens' mean (see `target_logprobs`).
        safe_ratio (`float`, *optional*, defaults to `1.0`): the plausible tokens whose `R` is within this factor of
            the safest one's count as equally safe (see `target_logprobs`).
        demote_below (`float`, *optional*, defaults to `1.0`): with `demote_only`, only the tokens whose `R` is below
            this share of the plausible mean are lowered (see `target_logprobs`).
        neutral_tokens (`torch.Tensor` of token ids, *optional*): tokens `q` leaves at `p` (see `target_logprobs`).

    Returns:
        `torch.Tensor`: a scalar, or the per-context KL with `reduction="none"`.
    """
    log_p = torch.log_softmax(lm_logits.float(), dim=-1) if lm_logprobs is None else lm_logprobs
    # q is a fixed target: built from detached inputs, so no graph is recorded for it. log_softmax(z + a) equals
    # log_softmax(log_softmax(z) + a), so log p serves as the logits.
    log_q = target_logprobs(
        log_p.detach(),
        nado_logits.detach(),
        min_p=min_p,
        demote_only=demote_only,
        safe_ratio=safe_ratio,
        demote_below=demote_below,
        neutral_tokens=neutral_tokens,
    )
    q = log_q.exp()
    # q == 0 where R == 0 exactly; the term is 0 there and must not become 0 * -inf
    per_context = (q * (log_q - log_p)).nan_to_num(nan=0.0, posinf=0.0).sum(dim=-1)
    if reduction == "none":
        return per_context if mask is None else per_context * mask.to(per_context.dtype)
    if reduction != "mean":
        raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
    return _masked_mean(per_context, mask)


def _bernoulli_kl(log_a: torch.Tensor, log_1ma: torch.Tensor, log_b: torch.Tensor, log_1mb: torch.Tensor):
    """`KL(Bern(a) ‖ Bern(b))` from the logs of `a`, `1 - a`, `b` and `1 - b`, all finite for finite logits."""
    return log_a.exp() * (log_a - log_b) + log_1ma.exp() * (log_1ma - log_1mb)


def nado_loss(
    nado_logits: torch.Tensor,
    lm_logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor,
    consistency_weight: float = 1.0,
    sample_weights: torch.Tensor | None = None,
    return_parts: bool = False,
    label_mask: torch.Tensor | None = None,
):
    """The NADO training loss: token-level BCE against the sequence labels plus the consistency term.

    For a completion with label `c`, every completion token `y_t` gives `BCE(sigmoid(r(ctx_<t, y_t)), c)`, whose
    minimiser is the true `R(x, y_≤t)`. The consistency term ties neighbouring prefixes together through the identity
    `R(x, y_<t) = Σ_v p_θ(v | x, y_<t) R(x, y_<t, v)`: `KL(Bern(E_t) ‖ Bern(R(x, y_<t)))` with `E_t` the right-hand
    side computed from the NADO. Gradients flow to `nado_logits` only; `lm_logits` is detached.

    Args:
        nado_logits (`torch.Tensor` of shape `[B, L, V]`): NADO logits over the sequences.
        lm_logits (`torch.Tensor` of shape `[B, L, V]`): logits of the policy that generated the samples.
        input_ids (`torch.Tensor` of shape `[B, L]`): prompt + completion tokens.
        labels (`torch.Tensor` of shape `[B]`): sequence labels `C(x, y) ∈ [0, 1]` (soft labels allowed).
        completion_mask (`torch.Tensor` of shape `[B, L]`): 1 on completion tokens.
        consistency_weight (`float`, *optional*, defaults to `1.0`): β, the weight of the consistency term.
        sample_weights (`torch.Tensor` of shape `[B]`, *optional*): per-sequence importance weights (any positive
            scale; see `importance_weights`). Every token of a sequence carries its sequence's weight.
        return_parts (`bool`, *optional*, defaults to `False`): also return `(bce, consistency)` detached.
        label_mask (`torch.Tensor` of shape `[B, L]`, *optional*): 1 on the completion tokens whose BCE counts (by
            default all of them). With only a completion's last token, where the label is exact (`R(x, y) = C(x, y)`),
            the consistency term, which keeps every completion position, carries the label back to the earlier
            prefixes under `p_θ`, whatever distribution the completion was drawn from.

    Returns:
        `torch.Tensor`: the scalar loss, the weighted mean over labelled tokens of the BCE plus `β` times the weighted
        mean over consecutive completion positions of the consistency term; with `return_parts=True`, the tuple
        `(loss, bce, consistency)`.
    """
    nado_logits = nado_logits.float()
    lm_logits = lm_logits.detach().float()
    # Position t predicts token t + 1: a "prediction position" is one whose next token is a completion token
    predicts_completion = completion_mask[:, 1:].bool()  # [B, L-1]
    next_tokens = input_ids[:, 1:]
    r = nado_logits[:, :-1]  # [B, L-1, V]
    r_selected = r.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)  # r(ctx_t, y_{t+1}), [B, L-1]

    weights = torch.ones_like(labels, dtype=torch.float32) if sample_weights is None else sample_weights.float()
    labelled = predicts_completion if label_mask is None else predicts_completion & label_mask[:, 1:].bool()
    token_weights = weights[:, None] * labelled.float()  # [B, L-1]
    denominator = token_weights.sum().clamp(min=1e-8)

    target = labels.float()[:, None].expand_as(r_selected)
    bce = F.binary_cross_entropy_with_logits(r_selected, target, reduction="none")
    bce = (bce * token_weights).sum() / denominator

    consistency = torch.zeros((), device=nado_logits.device)
    if consistency_weight:
        # E_t at position t (context ctx_t = tokens ≤ t) must equal R of the same prefix, which the NADO predicted at
        # position t - 1 for token t. Both positions must predict completion tokens.
        # E_t and 1 - E_t as two sums of positive terms, in probability space: 1 - E_t is not taken from E_t, so it
        # keeps its precision as R nears 1 (fp32 holds sigmoid(-r) down to r ≈ 87), and the two sums take 0.6 of the
        # time of the same sums in log space (two logsumexp over [B, L, V]), where a NADO step spends most of its time
        p = torch.softmax(lm_logits[:, 1:-1], dim=-1)
        r_next = r[:, 1:]
        tiny = torch.finfo(p.dtype).tiny
        log_e = (p * torch.sigmoid(r_next)).sum(-1).clamp(min=tiny).log()  # log E_t
        log_1me = (p * torch.sigmoid(-r_next)).sum(-1).clamp(min=tiny).log()  # log(1 - E_t)
        r_prev = r_selected[:, :-1]
        kl = _bernoulli_kl(log_e, log_1me, F.logsigmoid(r_prev), F.logsigmoid(-r_prev))
        pair_weights = weights[:, None] * (predicts_completion[:, 1:] & predicts_completion[:, :-1]).float()
        consistency = (kl * pair_weights).sum() / pair_weights.sum().clamp(min=1e-8)

    loss = bce + consistency_weight * consistency
    if return_parts:
        return loss, bce.detach(), consistency.detach()
    return loss


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum over completion tokens of `log softmax(logits)[token]`, the log-probability of each completion.

    Args:
        logits (`torch.Tensor` of shape `[B, L, V]`): causally aligned logits (already tempered or filtered if they
            describe a sampling proposal).
        input_ids (`torch.Tensor` of shape `[B, L]`), completion_mask (`torch.Tensor` of shape `[B, L]`).

    Returns:
        `torch.Tensor` of shape `[B]`.
    """
    token_logprobs = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])
    return token_logprobs.masked_fill(~completion_mask[:, 1:].bool(), 0.0).sum(-1)


def importance_weights(policy_logprobs: torch.Tensor, proposal_logprobs: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance weights `p_θ(y|x) / p_sample(y|x)` over a batch, scaled to mean 1.

    Args:
        policy_logprobs (`torch.Tensor` of shape `[B]`): `log p_θ(y | x)` of each completion.
        proposal_logprobs (`torch.Tensor` of shape `[B]`): `log p_sample(y | x)` under the sampling proposal.

    Returns:
        `torch.Tensor` of shape `[B]`, non-negative, summing to `B`.
    """
    log_ratio = policy_logprobs.float() - proposal_logprobs.float()
    return torch.softmax(log_ratio, dim=0) * log_ratio.numel()


def regularized_mask(labels: torch.Tensor) -> torch.Tensor:
    """The contexts regularised on a corpus batch: those whose next token is trained on (`labels != -100`).

    Args:
        labels (`torch.Tensor` of shape `[B, L]`): LM labels aligned with `input_ids`, -100 where ignored.

    Returns:
        `torch.Tensor` of shape `[B, L]` (bool), aligned with the logits: position `t` is set when `labels[t+1]` is
        trained on; the last position is never set.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def adaptive_lambda(
    lam: float, satisfaction: float, target: float, lr: float, bounds: tuple[float, float] = (1e-3, 1e3)
) -> float:
    """One step of dual ascent on the constraint `E[C] >= target`, in log space: `log λ ← log λ + lr · (target - ĉ)`.

    The step is relative, so λ grows or shrinks by the same factor for the same gap whatever its size (an additive step
    barely moves a large λ and overshoots a small one). The result is clipped to `bounds`.
    """
    return float(min(max(lam * math.exp(lr * (target - satisfaction)), bounds[0]), bounds[1]))

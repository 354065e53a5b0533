"""The maths of `trl_cadet.nado` checked against exact enumeration on a toy.

The toy: a vocabulary of V tokens, completions of exactly T tokens after a one-token prompt, a policy given as an
explicit table (random logits for every prefix) and an arbitrary oracle C(y). Everything the method needs (R for
every prefix, q*, KL(q* ‖ p)) can then be computed by brute force over the V**T completions.
"""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from trl_cadet.nado import (
    cadet_kl,
    importance_weights,
    nado_loss,
    sequence_logprobs,
    target_logprobs,
    target_token_weights,
)


V, T = 3, 3


class Toy:
    """An explicit policy table and oracle with their exact quantities."""

    def __init__(self, seed: int, hard: bool = False, sharpness: float = 1.5):
        gen = torch.Generator().manual_seed(seed)
        self.prefixes = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
        self.prefix_id = {p: i for i, p in enumerate(self.prefixes)}
        self.logits = {p: sharpness * torch.randn(V, generator=gen, dtype=torch.float64) for p in self.prefixes}
        self.sequences = list(itertools.product(range(V), repeat=T))
        if hard:
            oracle = (torch.rand(len(self.sequences), generator=gen) < 0.5).double()
            oracle[0], oracle[1] = 1.0, 0.0  # both outcomes present
        else:
            oracle = 0.05 + 0.9 * torch.rand(len(self.sequences), generator=gen, dtype=torch.float64)
        self.C = dict(zip(self.sequences, oracle.tolist(), strict=True))

    def p(self, v: int, prefix: tuple) -> float:
        return torch.softmax(self.logits[prefix], -1)[v].item()

    def p_seq(self, y: tuple, temperature: float = 1.0) -> float:
        return math.prod(torch.softmax(self.logits[y[:t]] / temperature, -1)[y[t]].item() for t in range(T))

    @functools.cache
    def R(self, prefix: tuple) -> float:
        """Pr_{y ~ p}[C = 1 | prefix], by enumeration of every completion extending `prefix`."""
        total = 0.0
        for y in self.sequences:
            if y[: len(prefix)] == prefix:
                total += math.prod(self.p(y[t], y[:t]) for t in range(len(prefix), T)) * self.C[y]
        return total

    def q_conditional(self, v: int, prefix: tuple) -> float:
        """q*(v | prefix) with q*(y) ∝ p(y) C(y), by enumeration."""

        def mass(pre):
            return sum(self.p_seq(y) * self.C[y] for y in self.sequences if y[: len(pre)] == pre)

        return mass(prefix + (v,)) / mass(prefix)

    def batch(self, sequences):
        """input_ids [N, T+1] (prompt token 0 then y), lm logits and true NADO logits [N, T+1, V], completion mask."""
        ys = torch.tensor(sequences)
        input_ids = torch.cat([torch.zeros(len(sequences), 1, dtype=torch.long), ys], dim=1)
        table = torch.stack([self.logits[p] for p in self.prefixes]).float()
        true_r = torch.tensor(
            [[self._logit(self.R(p + (v,))) for v in range(V)] for p in self.prefixes], dtype=torch.float32
        )
        ids = self.prefix_ids(sequences)
        pad = torch.zeros(len(sequences), 1, V)
        lm_logits = torch.cat([table[ids], pad], dim=1)
        nado_logits = torch.cat([true_r[ids], pad], dim=1)
        completion_mask = torch.ones_like(input_ids)
        completion_mask[:, 0] = 0
        return input_ids, lm_logits, nado_logits, completion_mask

    def prefix_ids(self, sequences) -> torch.Tensor:
        return torch.tensor([[self.prefix_id[tuple(y[:t])] for t in range(T)] for y in sequences])

    @staticmethod
    def _logit(r: float) -> float:
        r = min(max(r, 0.0), 1.0)
        if r == 0.0:
            return -1e4  # R = 0 exactly: a saturated logit, as a trained NADO would give
        if r == 1.0:
            return 1e4
        return math.log(r) - math.log1p(-r)

    def sample(self, n: int, seed: int, temperature: float = 1.0, stochastic_labels: bool = True):
        """n completions from the (tempered) policy, with labels drawn as Bernoulli(C(y))."""
        gen = torch.Generator().manual_seed(seed)
        probs = torch.tensor([self.p_seq(y, temperature) for y in self.sequences])
        draws = torch.multinomial(probs, n, replacement=True, generator=gen)
        seqs = [self.sequences[i] for i in draws.tolist()]
        c = torch.tensor([self.C[y] for y in seqs])
        labels = torch.bernoulli(c, generator=gen) if stochastic_labels else c
        return seqs, labels.float()


def collapse(sequences, labels, weights=None):
    """Merge identical (completion, label) samples into one row weighted by its count (or summed weight).

    `nado_loss` is a weighted mean over tokens, so this gives exactly the loss over the individual samples, on at
    most 2 * V**T rows instead of thousands.
    """
    totals = {}
    for i, (y, c) in enumerate(zip(sequences, labels.tolist(), strict=True)):
        totals[(y, c)] = totals.get((y, c), 0.0) + (1.0 if weights is None else weights[i].item())
    keys = sorted(totals)
    return [k[0] for k in keys], torch.tensor([k[1] for k in keys]), torch.tensor([totals[k] for k in keys])


@pytest.fixture(params=[("soft", 0), ("soft", 1), ("hard", 2)], ids=lambda p: f"{p[0]}-{p[1]}")
def toy(request):
    kind, seed = request.param
    return Toy(seed, hard=kind == "hard")


def test_target_logprobs_equal_exact_conditionals_of_q_star(toy):
    sequences = [y for y in toy.sequences if toy.C[y] > 0]
    input_ids, lm_logits, nado_logits, _ = toy.batch(sequences)
    log_q = target_logprobs(lm_logits, nado_logits)
    checked = 0
    for i, y in enumerate(sequences):
        for t in range(T):
            prefix = y[:t]
            if toy.R(prefix) == 0:
                continue
            expected = torch.tensor([toy.q_conditional(v, prefix) for v in range(V)])
            torch.testing.assert_close(log_q[i, t].exp(), expected.float(), atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked > 0


def test_token_weights_are_q_star_over_p_capped_and_multiply_to_the_filtering_weight(toy):
    """With the exact R, a token's weight is min(1, q*(y_t | y_<t) / p(y_t | y_<t)) (enumerated), and over a completion
    whose factors are all at most 1 their product is C(y) / R(x), the weight filtering gives the whole completion."""
    sequences = [y for y in toy.sequences if toy.C[y] > 0]
    _, lm_logits, nado_logits, _ = toy.batch(sequences)
    tokens = torch.tensor(sequences)
    weights = target_token_weights(
        lm_logits[:, :T].reshape(-1, V), nado_logits[:, :T].reshape(-1, V), tokens.reshape(-1)
    ).view(len(sequences), T)
    below_one = 0
    for i, y in enumerate(sequences):
        factors = [toy.q_conditional(y[t], y[:t]) / toy.p(y[t], y[:t]) for t in range(T)]
        expected = torch.tensor([min(1.0, f) for f in factors], dtype=torch.float64)
        torch.testing.assert_close(weights[i].double(), expected, atol=1e-5, rtol=1e-4)
        if max(factors) <= 1:
            below_one += 1
            assert weights[i].double().prod().item() == pytest.approx(toy.C[y] / toy.R(()), rel=1e-4)
    # With hard labels a satisfied completion's C(y) / R(x) = 1 / R(x) > 1: one of its factors is above 1
    assert below_one > 0 or set(toy.C.values()) <= {0.0, 1.0}
    assert (weights < 0.999).any()


def test_token_weights_lower_an_implausible_unsafe_token_and_leave_neutral_ones():
    """min-p leaves an implausible token at p in the target, but its weight still follows its R against the plausible
    tokens' mean; a neutral token weighs 1 whatever its R."""
    lm_logits = torch.tensor([[4.0, 3.0, -2.0, 1.0]]).repeat(3, 1)
    nado_logits = torch.tensor([[2.0, 2.0, -3.0, -3.0]]).repeat(3, 1)
    tokens = torch.tensor([0, 2, 3])
    weights = target_token_weights(lm_logits, nado_logits, tokens, min_p=0.1, neutral_tokens=torch.tensor([3]))
    mean = (torch.softmax(lm_logits[0, :2], -1) * torch.sigmoid(nado_logits[0, :2])).sum()
    assert weights[0].item() == pytest.approx(1.0, abs=1e-6)  # as safe as the plausible mean
    assert weights[1].item() == pytest.approx((torch.sigmoid(torch.tensor(-3.0)) / mean).item(), rel=1e-5)
    assert weights[2].item() == 1.0  # neutral
    log_q = target_logprobs(lm_logits, nado_logits, min_p=0.1)
    assert log_q[1, 2].exp().item() == pytest.approx(torch.softmax(lm_logits[1], -1)[2].item(), rel=1e-5)


def test_expected_summed_kl_under_q_star_is_minus_log_R(toy):
    sequences = toy.sequences
    _, lm_logits, nado_logits, _ = toy.batch(sequences)
    mask = torch.zeros(len(sequences), T + 1)
    mask[:, :T] = 1
    per_position = cadet_kl(lm_logits, nado_logits, mask=mask, reduction="none")
    R_x = toy.R(())
    q_star = torch.tensor([toy.p_seq(y) * toy.C[y] / R_x for y in sequences])
    expected_kl = (q_star * per_position.double().sum(-1)).sum().item()
    # KL(q* ‖ p) = E_q*[log C(y)] - log R(x): exactly -log R(x) for a 0/1 oracle (METHOD.md's identity)
    log_c = sum(q * math.log(toy.C[y]) for q, y in zip(q_star.tolist(), sequences, strict=True) if q > 0)
    assert expected_kl == pytest.approx(log_c - math.log(R_x), rel=1e-4, abs=1e-5)
    if all(c in (0.0, 1.0) for c in toy.C.values()):
        assert expected_kl == pytest.approx(-math.log(R_x), rel=1e-4, abs=1e-5)


def _fit_table_nado(toy, sequences, labels, sample_weights, consistency_weight, steps=400, label_mask=None):
    """Minimise `nado_loss` over a free table of R-logits (one vector per prefix): the estimator with no model error."""
    input_ids, lm_logits, _, completion_mask = toy.batch(sequences)
    ids = toy.prefix_ids(sequences)
    table = torch.zeros(len(toy.prefixes), V, requires_grad=True)
    optimizer = torch.optim.Adam([table], lr=0.1)
    for _ in range(steps):
        nado_logits = torch.cat([table[ids], torch.zeros(len(sequences), 1, V)], dim=1)
        loss = nado_loss(
            nado_logits,
            lm_logits,
            input_ids,
            labels,
            completion_mask,
            consistency_weight,
            sample_weights,
            label_mask=label_mask,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.sigmoid(table.detach())


def _visits(toy, sequences):
    """Per (prefix, next token): how many samples pass through it."""
    counts = torch.zeros(len(toy.prefixes), V, dtype=torch.float64)
    for y in sequences:
        for t in range(T):
            counts[toy.prefix_id[y[:t]], y[t]] += 1.0
    return counts


@pytest.mark.parametrize("consistency_weight", [0.0, 1.0])
def test_minimising_nado_loss_on_policy_samples_recovers_true_R(consistency_weight):
    toy = Toy(seed=3)
    n = 6000
    sequences, labels = toy.sample(n, seed=0)
    fitted = _fit_table_nado(toy, *collapse(sequences, labels), consistency_weight)
    counts = _visits(toy, sequences)
    checked = 0
    for prefix in toy.prefixes:
        for v in range(V):
            visits = counts[toy.prefix_id[prefix], v].item()
            if visits < 100:
                continue
            true_r = toy.R(prefix + (v,))
            # Labels are Bernoulli(C): the BCE minimiser is the empirical mean of `visits` of them, whose standard
            # error is sqrt(R(1-R)/visits); 4 standard errors (plus optimiser slack) keeps this test from flaking
            tolerance = 4 * math.sqrt(true_r * (1 - true_r) / visits) + 0.01
            assert abs(fitted[toy.prefix_id[prefix], v].item() - true_r) < tolerance, (prefix, v, visits)
            checked += 1
    assert checked >= 10


def test_labels_at_the_last_token_recover_R_under_the_policy_from_other_completions():
    """Completions drawn from another distribution than the policy (a corpus): BCE at every position estimates R under
    that distribution's continuations; BCE at the last token only, where the label is exact, with the consistency
    term estimates R under the policy (METHOD.md's corpus completions, `nado_corpus_labels="last"`)."""
    toy = Toy(seed=5, sharpness=3.0)
    sequences, labels = toy.sample(20000, seed=2, temperature=4.0, stochastic_labels=False)
    rows, row_labels, counts = collapse(sequences, labels)
    last = torch.zeros(len(rows), T + 1, dtype=torch.long)
    last[:, T] = 1
    fitted = _fit_table_nado(toy, rows, row_labels, counts, 1.0, steps=1500, label_mask=last)
    everywhere = _fit_table_nado(toy, rows, row_labels, counts, 1.0, steps=1500)
    errors, biased = [], []
    for prefix in toy.prefixes:
        for v in range(V):
            true_r = toy.R(prefix + (v,))
            errors.append(abs(fitted[toy.prefix_id[prefix], v].item() - true_r))
            biased.append(abs(everywhere[toy.prefix_id[prefix], v].item() - true_r))
    assert max(errors) < 0.02, max(errors)
    assert max(biased) > 0.05, "the corpus's continuations should bias BCE at every position, or this shows nothing"


def test_importance_weights_correct_samples_from_a_tempered_proposal():
    toy = Toy(seed=4, sharpness=3.0)
    temperature = 2.0
    sequences, labels = toy.sample(50000, seed=1, temperature=temperature, stochastic_labels=False)
    input_ids, lm_logits, _, completion_mask = toy.batch(sequences)
    policy = sequence_logprobs(lm_logits, input_ids, completion_mask)
    proposal = sequence_logprobs(lm_logits / temperature, input_ids, completion_mask)
    # The log-probabilities the function computes are the exact ones of the toy
    assert policy[0].item() == pytest.approx(math.log(toy.p_seq(sequences[0])), abs=1e-4)
    assert proposal[0].item() == pytest.approx(math.log(toy.p_seq(sequences[0], temperature)), abs=1e-4)
    weights = importance_weights(policy, proposal)
    assert weights.sum().item() == pytest.approx(len(sequences), rel=1e-4)

    weighted = _fit_table_nado(toy, *collapse(sequences, labels, weights), 0.0)
    unweighted = _fit_table_nado(toy, *collapse(sequences, labels), 0.0)
    # Compare on the first token, where the tempered proposal's continuations differ most from the policy's, for the
    # tokens with an effective sample size large enough that the self-normalised estimate has converged
    biased = 0
    for v in range(V):
        through_v = torch.tensor([y[0] == v for y in sequences])
        ess = (weights[through_v].sum() ** 2 / (weights[through_v] ** 2).sum()).item()
        if ess < 1000:
            continue
        true_r = toy.R((v,))
        # Standard error of the self-normalised estimate: the spread of C over the policy's continuations of v,
        # divided by the effective sample size; 4 of them plus the optimiser's slack
        continuations = [y for y in toy.sequences if y[0] == v]
        p_cont = torch.tensor([toy.p_seq(y) for y in continuations]) / toy.p(v, ())
        spread = sum(p * (toy.C[y] - true_r) ** 2 for p, y in zip(p_cont.tolist(), continuations, strict=True))
        tolerance = 4 * math.sqrt(spread / ess) + 0.002
        assert abs(weighted[toy.prefix_id[()], v].item() - true_r) < tolerance
        biased += abs(unweighted[toy.prefix_id[()], v].item() - true_r) > tolerance
    assert biased >= 1, "the tempered proposal should bias the unweighted estimate, or this test shows nothing"


def test_cadet_kl_sends_no_gradient_to_nado_and_p_minus_q_to_lm():
    torch.manual_seed(0)
    lm_logits = torch.randn(2, 5, 7, requires_grad=True)
    nado_logits = torch.randn(2, 5, 7, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    kl = cadet_kl(lm_logits, nado_logits, mask=mask)
    grad_lm, grad_nado = torch.autograd.grad(kl, [lm_logits, nado_logits], allow_unused=True)
    assert grad_nado is None
    p = torch.softmax(lm_logits.detach(), -1)
    q = target_logprobs(lm_logits.detach(), nado_logits.detach()).exp()
    expected = (p - q) * mask[..., None] / mask.sum()
    torch.testing.assert_close(grad_lm, expected)


def test_cadet_kl_is_zero_when_R_is_constant_per_context():
    torch.manual_seed(0)
    lm_logits = torch.randn(3, 4, 11, requires_grad=True)
    nado_logits = torch.randn(3, 4, 1).expand(3, 4, 11)  # R depends on the context, not on the next token
    kl = cadet_kl(lm_logits, nado_logits)
    assert kl.abs().item() < 1e-6
    (grad,) = torch.autograd.grad(kl, lm_logits)
    assert grad.abs().max().item() < 1e-6


def test_with_min_p_q_reweights_the_plausible_tokens_only_and_leaves_the_others_untouched():
    """`min_p`: q ∝ p·R among the tokens with p >= min_p · max p, by brute force, with their total mass kept; every
    other token keeps p, so the regulariser's gradient on it is zero (it can never raise a token the LM would not
    write); a constant R gives q = p."""
    torch.manual_seed(0)
    lm_logits = (3 * torch.randn(4, 6, 40)).requires_grad_()
    nado_logits = 2 * torch.randn(4, 6, 40)
    min_p = 0.05
    p = torch.softmax(lm_logits.detach(), -1)
    plausible = p >= min_p * p.max(-1, keepdim=True).values
    assert plausible.sum(-1).min() >= 1 and (~plausible).sum(-1).min() >= 1  # both kinds at every context
    q = target_logprobs(lm_logits.detach(), nado_logits, min_p=min_p).exp()
    R = torch.sigmoid(nado_logits)
    for index in itertools.product(range(4), range(6)):
        keep = plausible[index]
        expected = p[index][keep] * R[index][keep]
        expected = expected / expected.sum() * p[index][keep].sum()
        torch.testing.assert_close(q[index][keep], expected)
        torch.testing.assert_close(q[index][~keep], p[index][~keep])
    kl = cadet_kl(lm_logits, nado_logits, min_p=min_p)
    (grad,) = torch.autograd.grad(kl, lm_logits)
    assert grad[~plausible].abs().max().item() < 1e-8
    assert grad[plausible].abs().max().item() > 1e-3
    # Without the cut-off, the same R raises some implausible tokens: the cause of the samples' invented words
    (grad_all,) = torch.autograd.grad(cadet_kl(lm_logits, nado_logits), lm_logits)
    assert (grad_all[~plausible] < 0).any()
    constant = torch.randn(4, 6, 1).expand(4, 6, 40)
    torch.testing.assert_close(target_logprobs(lm_logits.detach(), constant, min_p=min_p).exp(), p)


def test_demote_only_caps_R_at_its_plausible_mean_and_keeps_the_order_of_the_others():
    """`demote_only`: q ∝ p · min(R, γ R̄) among the plausible tokens by brute force (R̄ the p-weighted mean of R over
    them, γ = `demote_below`), with their total mass kept and q = p on the implausible ones, so q/p is one constant on
    every plausible token with R at least γ R̄ (their order under p is kept) and lower on the others. Without the
    cut-off, the same over the whole vocabulary."""
    torch.manual_seed(1)
    lm_logits = 3 * torch.randn(4, 6, 40)
    nado_logits = 2 * torch.randn(4, 6, 40)
    p = torch.softmax(lm_logits, -1)
    R = torch.sigmoid(nado_logits)
    for min_p, below in itertools.product((0.0, 0.05), (1.0, 0.7)):
        plausible = p >= min_p * p.max(-1, keepdim=True).values
        assert min_p == 0 or (~plausible).sum(-1).min() >= 1
        mass = (p * plausible).sum(-1, keepdim=True)
        mean = (p * R * plausible).sum(-1, keepdim=True) / mass
        weighted = p * torch.minimum(R, below * mean) * plausible
        expected = torch.where(plausible, weighted / weighted.sum(-1, keepdim=True) * mass, p)
        q = target_logprobs(lm_logits, nado_logits, min_p=min_p, demote_only=True, demote_below=below).exp()
        torch.testing.assert_close(q, expected)
        ratio = q / p
        safe = plausible & (R >= below * mean)
        top = ratio.masked_fill(~safe, -1).amax(-1, keepdim=True)
        torch.testing.assert_close(torch.where(safe, ratio, top), top.expand_as(ratio))
        assert (ratio[plausible & ~safe] < top.expand_as(ratio)[plausible & ~safe]).all()
        torch.testing.assert_close(q[~plausible], p[~plausible])
        if below < 1:  # γ < 1 leaves tokens below the mean untouched
            assert (plausible & (R >= below * mean) & (R < mean)).any()
    for options in (dict(demote_only=True, demote_below=0.0), dict(demote_below=0.8)):
        with pytest.raises(ValueError, match="demote_below"):
            target_logprobs(lm_logits, nado_logits, **options)


def test_safe_ratio_caps_R_at_a_share_of_the_safest_plausible_tokens():
    """`safe_ratio`: q ∝ p · min(R, γ · max R) among the plausible tokens by brute force (the maximum over them), with
    their total mass kept and q = p on the implausible ones, so q/p is one constant on every plausible token within
    γ of the safest one and lower on the others; with and without the cut-off, alone and with `demote_only` (both
    caps). γ = 1 is the plain target."""
    torch.manual_seed(2)
    lm_logits = 3 * torch.randn(4, 6, 40)
    nado_logits = 2 * torch.randn(4, 6, 40)
    p = torch.softmax(lm_logits, -1)
    R = torch.sigmoid(nado_logits)
    ratio_cap = 0.7
    for min_p, demote_only in itertools.product((0.0, 0.05), (False, True)):
        plausible = p >= min_p * p.max(-1, keepdim=True).values
        mass = (p * plausible).sum(-1, keepdim=True)
        capped = torch.minimum(R, ratio_cap * R.masked_fill(~plausible, 0).amax(-1, keepdim=True))
        if demote_only:
            capped = torch.minimum(capped, (p * capped * plausible).sum(-1, keepdim=True) / mass)
        weighted = p * capped * plausible
        expected = torch.where(plausible, weighted / weighted.sum(-1, keepdim=True) * mass, p)
        q = target_logprobs(lm_logits, nado_logits, min_p=min_p, demote_only=demote_only, safe_ratio=ratio_cap).exp()
        torch.testing.assert_close(q, expected)
        if not demote_only:
            ratio = q / p
            safe = plausible & (R >= ratio_cap * R.masked_fill(~plausible, 0).amax(-1, keepdim=True))
            top = ratio.masked_fill(~safe, -1).amax(-1, keepdim=True)
            torch.testing.assert_close(torch.where(safe, ratio, top), top.expand_as(ratio))
            assert (ratio[plausible & ~safe] < top.expand_as(ratio)[plausible & ~safe]).all()
    torch.testing.assert_close(
        target_logprobs(lm_logits, nado_logits, min_p=0.05, safe_ratio=1.0),
        target_logprobs(lm_logits, nado_logits, min_p=0.05),
    )
    with pytest.raises(ValueError, match="safe_ratio"):
        target_logprobs(lm_logits, nado_logits, safe_ratio=0.0)


def _fit_corpus_distribution(corpus: torch.Tensor, nado_logits: torch.Tensor, lam: float, **target_kwargs):
    """p after fitting one context's logits to the corpus's continuations (`corpus`: their frequencies; cross-entropy)
    plus λ · Ω, by gradient descent from the uniform distribution: the fixed point that fine-tuning tends to on a
    position seen often. Averaged over the last 1,000 of 3,000 steps: where a cut-off (min-p) makes the target jump,
    p cycles around it instead of converging, and the last step alone would give any point of the cycle (which one
    depends on the machine's rounding)."""
    logits = torch.zeros(nado_logits.shape[-1], requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    average = torch.zeros(nado_logits.shape[-1])
    for step in range(3000):
        optimizer.zero_grad()
        log_p = torch.log_softmax(logits, -1)
        q = target_logprobs(log_p.detach(), nado_logits, **target_kwargs).exp()
        loss = -(corpus * log_p).sum() + lam * (q * (q.log() - log_p)).sum()
        loss.backward()
        optimizer.step()
        if step >= 2000:
            average += torch.softmax(logits.detach(), -1) / 1000
    return average


def _fit_one_context(target: int, nado_logits: torch.Tensor, lam: float, **target_kwargs) -> torch.Tensor:
    """`_fit_corpus_distribution` where the corpus always continues with the token `target`."""
    corpus = F.one_hot(torch.tensor(target), nado_logits.shape[-1]).float()
    return _fit_corpus_distribution(corpus, nado_logits, lam, **target_kwargs)


def test_demote_only_keeps_a_benign_corpus_token_that_full_reweighting_gives_away_to_a_safer_looking_one():
    """Why `demote_only` exists. With q ∝ p · R built from the current p, a token whose R is more than (1 + λ) / λ
    times the corpus token's takes the corpus token's place at the fixed point of the LM loss plus λ · Ω, however
    small the NADO model's error that made it look safer: the LM learns to write other words than the corpus's. With
    R capped at its mean, the corpus token keeps its place; an insult (an R far below the others') is pushed down
    as hard by both."""
    lam = 8.0
    benign = torch.logit(torch.tensor([0.80, 0.95, 0.60, 0.70, 0.75]))  # token 1 looks 19% safer than token 0
    full = _fit_one_context(0, benign, lam)
    demoted = _fit_one_context(0, benign, lam, demote_only=True)
    assert full[0] < 0.8 and full[1] > 0.2
    assert demoted[0] > 0.95
    insult = torch.logit(torch.tensor([0.05, 0.90, 0.85, 0.80, 0.90]))  # the corpus token 0 breaks the constraint
    assert _fit_one_context(0, insult, lam)[0] < 0.2
    assert _fit_one_context(0, insult, lam, demote_only=True)[0] < 0.2


def test_nado_loss_sends_no_gradient_to_lm_logits():
    toy = Toy(seed=5)
    sequences, labels = toy.sample(16, seed=2)
    input_ids, lm_logits, nado_logits, completion_mask = toy.batch(sequences)
    lm_logits.requires_grad_(True)
    nado_logits = (nado_logits + 0.3 * torch.randn_like(nado_logits)).requires_grad_(True)
    loss = nado_loss(nado_logits, lm_logits, input_ids, labels, completion_mask, consistency_weight=1.0)
    grad_nado, grad_lm = torch.autograd.grad(loss, [nado_logits, lm_logits], allow_unused=True)
    assert grad_lm is None
    assert grad_nado.abs().sum() > 0


def test_consistency_term_vanishes_at_the_true_R_and_not_elsewhere():
    toy = Toy(seed=6)
    input_ids, lm_logits, nado_logits, completion_mask = toy.batch(toy.sequences)
    labels = torch.tensor([toy.C[y] for y in toy.sequences]).float()
    _, _, consistency = nado_loss(nado_logits, lm_logits, input_ids, labels, completion_mask, return_parts=True)
    assert consistency.item() < 1e-5
    _, _, perturbed = nado_loss(
        nado_logits + 0.5 * torch.randn_like(nado_logits),
        lm_logits,
        input_ids,
        labels,
        completion_mask,
        return_parts=True,
    )
    assert perturbed.item() > 1e-3


def test_consistency_term_equals_its_definition_in_float64_with_peaked_p_and_saturated_R():
    """The consistency term, computed in fp32 as two sums of positive terms, equals `KL(Bern(E_t) ‖ Bern(R(x, y_≤t)))`
    with `E_t = Σ_v p(v) R(x, y_≤t, v)`, taken in float64 straight from the definition, in value and in gradient, also
    where p is peaked and R saturates (|r| up to 60, where 1 - E_t is far below fp32's precision around 1)."""
    torch.manual_seed(3)
    batch, length, vocab = 3, 7, 50
    lm_logits = torch.randn(batch, length, vocab) * 8
    nado_logits = torch.randn(batch, length, vocab) * 4 + torch.tensor([20.0, 0.0, -20.0])[:, None, None]
    nado_logits[0, :, :10] = 60.0  # R ≈ 1 on the likeliest tokens of the first sequence
    input_ids = torch.randint(0, vocab, (batch, length))
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]])
    r32 = nado_logits.clone().requires_grad_(True)
    _, _, consistency = nado_loss(r32, lm_logits, input_ids, torch.ones(batch), completion_mask, return_parts=True)
    (grad32,) = torch.autograd.grad(
        nado_loss(r32, lm_logits, input_ids, torch.ones(batch), completion_mask, consistency_weight=1.0)
        - nado_loss(r32, lm_logits, input_ids, torch.ones(batch), completion_mask, consistency_weight=0.0),
        r32,
    )

    r64 = nado_logits.double().requires_grad_(True)
    p = torch.softmax(lm_logits.double(), dim=-1)
    terms = []
    for b in range(batch):
        for t in range(1, length - 1):  # E at context ≤ t against R(ctx_<t, y_t), both completion tokens
            if completion_mask[b, t] and completion_mask[b, t + 1]:
                e, not_e = (p[b, t] * torch.sigmoid(r64[b, t])).sum(), (p[b, t] * torch.sigmoid(-r64[b, t])).sum()
                prev, not_prev = (
                    torch.sigmoid(r64[b, t - 1, input_ids[b, t]]),
                    torch.sigmoid(-r64[b, t - 1, input_ids[b, t]]),
                )
                terms.append(e * (e / prev).log() + not_e * (not_e / not_prev).log())  # 1 - σ(r) = σ(-r)
    reference = torch.stack(terms).mean()
    (grad64,) = torch.autograd.grad(reference, r64)
    assert consistency.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-6 * grad64.abs().max().item())


def test_bce_selects_the_logit_of_the_next_token():
    """Position t of `nado_logits` scores token t + 1: only that entry may receive the BCE gradient."""
    input_ids = torch.tensor([[5, 1, 2, 0]])
    completion_mask = torch.tensor([[0, 1, 1, 1]])
    nado_logits = torch.zeros(1, 4, 6, requires_grad=True)
    lm_logits = torch.zeros(1, 4, 6)
    loss = nado_loss(nado_logits, lm_logits, input_ids, torch.ones(1), completion_mask, consistency_weight=0.0)
    (grad,) = torch.autograd.grad(loss, nado_logits)
    nonzero = {tuple(i) for i in grad[0].nonzero().tolist()}
    assert nonzero == {(0, 1), (1, 2), (2, 0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturated_R_gives_finite_values_and_gradients(dtype):
    torch.manual_seed(0)
    lm_logits = (torch.randn(2, 6, 9) * 30).to(dtype).requires_grad_(True)
    nado_logits = (torch.randn(2, 6, 9).sign() * 1e4).to(dtype).requires_grad_(True)
    input_ids = torch.randint(0, 9, (2, 6))
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    kl = cadet_kl(lm_logits, nado_logits)
    loss = nado_loss(nado_logits, lm_logits, input_ids, torch.tensor([1.0, 0.0]), completion_mask)
    (grad_lm,) = torch.autograd.grad(kl, lm_logits)
    (grad_nado,) = torch.autograd.grad(loss, nado_logits)
    for value in (kl, loss, grad_lm, grad_nado):
        assert torch.isfinite(value).all()
    # R = 0 exactly on every token of a context is a degenerate constraint: q falls back to p, not to NaN
    all_zero = torch.full((1, 1, 9), -float("inf"))
    assert torch.isfinite(cadet_kl(torch.randn(1, 1, 9), all_zero.clamp(min=-1e4)))


def test_binary_cross_entropy_matches_torch_on_single_tokens():
    """One completion token: the loss is exactly torch's BCE on the selected logit (no consistency pair exists)."""
    nado_logits = torch.randn(4, 2, 5)
    input_ids = torch.tensor([[0, 3], [0, 1], [0, 4], [0, 0]])
    completion_mask = torch.tensor([[0, 1]] * 4)
    labels = torch.tensor([1.0, 0.0, 0.3, 1.0])
    loss = nado_loss(nado_logits, torch.randn(4, 2, 5), input_ids, labels, completion_mask)
    selected = nado_logits[torch.arange(4), 0, input_ids[:, 1]]
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(selected, labels))


def test_cadet_kl_with_precomputed_logprobs_matches():
    torch.manual_seed(0)
    lm_logits = torch.randn(2, 3, 13, requires_grad=True)
    nado_logits = torch.randn(2, 3, 13)
    direct = cadet_kl(lm_logits, nado_logits)
    (grad_direct,) = torch.autograd.grad(direct, lm_logits)
    shared = cadet_kl(lm_logits, nado_logits, lm_logprobs=torch.log_softmax(lm_logits, -1))
    (grad_shared,) = torch.autograd.grad(shared, lm_logits)
    torch.testing.assert_close(shared, direct)
    torch.testing.assert_close(grad_shared, grad_direct)


def test_safe_ratio_lets_lambda_grow_without_giving_a_benign_corpus_token_away():
    """Why `safe_ratio` exists. With full reweighting the corpus token is given away wherever a plausible token looks
    (1 + λ) / λ times safer, a margin that shrinks as λ grows: at λ = 16 a benign corpus token that the NADO model
    rates 19% less safe than another keeps a third of its probability. Capping R at 0.8 of the safest plausible token's
    keeps it whatever λ, while the floor on an insult's probability, 1 / (1 + λ) (the LM loss pulls it up with weight 1,
    the regulariser down with weight λ), falls as λ grows."""
    benign = torch.logit(torch.tensor([0.80, 0.95, 0.60, 0.70, 0.75]))  # token 1 looks 19% safer than token 0
    insult = torch.logit(torch.tensor([0.05, 0.90, 0.85, 0.80, 0.90]))  # the corpus token 0 breaks the constraint
    assert _fit_one_context(0, benign, 16.0, min_p=0.1)[0] < 0.5
    for lam in (8.0, 32.0):
        assert _fit_one_context(0, benign, lam, min_p=0.1, safe_ratio=0.8)[0] > 0.99
        assert _fit_one_context(0, insult, lam, min_p=0.1, safe_ratio=0.8)[0] < 1.2 / (1 + lam)


def test_demote_below_keeps_benign_continuations_and_min_p_shields_an_insult():
    """Why `demote_below` exists, and why it goes with `min_p = 0`. Where the corpus continues a context two benign ways
    half and half, demote-only lowers the one the NADO model rates 11% less safe (below the mean) to a quarter at
    λ = 16 and a seventh at λ = 32: perplexity paid for the NADO model's error. With R capped at 0.8 of the mean,
    both keep their half at any λ. On an insult (half the corpus's continuations), the min-p cut-off stops the push
    once the insult is below a tenth of the likeliest token and the LM loss pulls it back, so it hovers around that
    cut-off, well above its floor; without the cut-off it falls to its floor `c / (1 + λ)`, with or without
    `demote_below`."""
    half = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    benign = torch.logit(torch.tensor([0.85, 0.95, 0.60, 0.70, 0.75]))  # token 0 looks 11% less safe than token 1
    insult = torch.logit(torch.tensor([0.05, 0.90, 0.85, 0.80, 0.90]))  # token 0 breaks the constraint
    for lam in (16.0, 32.0):
        assert _fit_corpus_distribution(half, benign, lam, demote_only=True)[0] < 0.3
        kept = _fit_corpus_distribution(half, benign, lam, demote_only=True, demote_below=0.8)
        torch.testing.assert_close(kept[:2], half[:2], atol=2e-3, rtol=0)
        floor = 0.5 / (1 + lam)
        for below in (1.0, 0.8):
            shielded = _fit_corpus_distribution(half, insult, lam, min_p=0.1, demote_only=True, demote_below=below)
            assert shielded[0] > 2 * floor
            pushed = _fit_corpus_distribution(half, insult, lam, demote_only=True, demote_below=below)
            assert pushed[0] < 1.2 * floor


def test_neutral_tokens_keep_p_and_stay_out_of_the_mean():
    """`neutral_tokens` (the end-of-turn token): q = p on them, and the plausible others are reweighted by brute force
    as if the neutral tokens were implausible (demote-only's mean over the others only), with and without the cut-off
    and with full reweighting; a context where only neutral tokens are plausible gets q = p."""
    torch.manual_seed(3)
    lm_logits = 3 * torch.randn(4, 6, 40)
    nado_logits = 2 * torch.randn(4, 6, 40)
    lm_logits[0, 0, 7] = 50.0  # the only plausible token at this context is a neutral one
    neutral = torch.tensor([7, 11])
    p = torch.softmax(lm_logits, -1)
    R = torch.sigmoid(nado_logits)
    for min_p, demote_only in itertools.product((0.0, 0.05), (False, True)):
        plausible = p >= min_p * p.max(-1, keepdim=True).values
        plausible[..., neutral] = False
        mass = (p * plausible).sum(-1, keepdim=True)
        weight = R
        if demote_only:
            weight = torch.minimum(R, (p * R * plausible).sum(-1, keepdim=True) / mass.clamp(min=1e-30))
        weighted = p * weight * plausible
        expected = torch.where(plausible, weighted / weighted.sum(-1, keepdim=True).clamp(min=1e-30) * mass, p)
        q = target_logprobs(lm_logits, nado_logits, min_p=min_p, demote_only=demote_only, neutral_tokens=neutral)
        torch.testing.assert_close(q.exp(), expected)
        torch.testing.assert_close(q.exp()[..., neutral], p[..., neutral])
        torch.testing.assert_close(q.exp()[0, 0], p[0, 0])

from dataclasses import dataclass, field

import torch
from trl import SFTConfig


@dataclass
class CADETConfig(SFTConfig):
    r"""
    Configuration class for the [`CADETTrainer`].

    CADET fine-tunes a causal LM on a corpus (any [`~trl.SFTTrainer`] dataset) while a closed-form token-level KL
    pulls it toward the closest distribution that satisfies a sequence-level constraint judged by an oracle. This
    class inherits every parameter of [`~trl.SFTConfig`] (dataset text field, `max_length`, packing, completion-only
    and assistant-only loss, ...) and adds the ones below. Using [`~transformers.HfArgumentParser`] we can turn this
    class into argparse arguments that can be specified on the command line.

    Parameters:
        > Parameters that control the oracle

        oracle_labels (`str`, *optional*, defaults to `"soft"`):
            How oracle scores become NADO labels: `"soft"` uses the score itself as the label, `"hard"` gives
            `C = 1[score >= oracle_threshold]` (the paper's binary oracle; measured worse on the embedded benchmark
            corpus).
        oracle_threshold (`float`, *optional*, defaults to `0.5`):
            Satisfaction threshold. Oracles return a satisfaction score in `[0, 1]` (1 = constraint satisfied; for a
            toxicity classifier, `1 - toxicity`); a sample scored below it is unsatisfied (`oracle/satisfaction`, the
            samples `regularized_samples` picks, the corpus-prefix rollouts), and with hard labels it sets the label.
        oracle_weights (`list[float]`, *optional*):
            Weights of the oracles when several are given (non-negative, with a positive sum); their scores are
            combined by a weighted mean. Defaults to equal weights.
        oracle_max_retries (`int`, *optional*, defaults to `2`):
            How many times an oracle that raises is called again before the samples of that batch are dropped and
            counted in `oracle/dropped`. An oracle that fails every attempt of the first oracle phase, having never
            returned scores, stops training with its error instead. A malformed result (a wrong number of scores, a
            score that is not a real number) counts as a failure too.
        oracle_timeout (`float` or `None`, *optional*, defaults to `None`):
            Seconds an oracle call may take. A call that takes longer counts as a failure: it is retried
            (`oracle_max_retries`), then the samples of that batch are dropped. The hung call is abandoned in a
            background thread (Python cannot stop it). `None` waits as long as the oracle takes.
        oracle_retry_delay (`float`, *optional*, defaults to `1.0`):
            Seconds to wait before retrying a failed oracle call, doubled at each further retry, so that a judge that is
            warming up or rate-limited gets time to recover.

        > Parameters that control sampling in the oracle phase

        prompts_per_round (`int`, *optional*, defaults to `32`):
            Prompts drawn per round (across all processes) for the oracle phase. With several processes, rounded up to
            a multiple of their number so that each samples as many prompts.
        num_generations (`int`, *optional*, defaults to `4`):
            Completions sampled per prompt.
        unsatisfied_prompts_share (`float`, *optional*, defaults to `0.0`):
            Share of each round's prompts drawn from the prompts of the labelled corpus completions
            (`nado_corpus_samples`) that the oracles judged unsatisfied: prompts known to elicit violations, where the
            policy's samples teach the NADO model most (the paper samples prompts chosen to elicit toxicity). The rest
            are drawn from all prompts. No oracle call is added. `0` draws every prompt uniformly.
        max_prompt_length (`int` or `None`, *optional*, defaults to `256`):
            Longest prompt, in tokens, accepted for the oracle phase; a longer one is an error, raised before training.
        max_completion_length (`int`, *optional*, defaults to `48`):
            Maximum number of tokens sampled per completion.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the oracle phase.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold of the oracle phase.
        generation_batch_size (`int`, *optional*, defaults to `16`):
            Number of sequences generated (and scored by the LM for NADO training) per forward batch.
        corpus_prompt_length (`int`, *optional*, defaults to `16`):
            For a language-modeling corpus (a text column, no prompts) and no `prompt_dataset`, prompts are the first
            `corpus_prompt_length` tokens of corpus texts.

        > Parameters that control the NADO model

        nado_head (`str`, *optional*, defaults to `"tied"`):
            The NADO head. `"tied"`: low rank, through the LM's own output embeddings, so that what a sampled token
            teaches carries over to every token (the default: sample-efficient, a few hundred labelled sequences per
            round are enough). `"full"`: a vocabulary-sized linear head, as in the reference code (needs far more
            samples). With FSDP or DeepSpeed ZeRO-3 the output embeddings are sharded: use `"full"`.
        nado_rank (`int`, *optional*, defaults to `16`):
            Rank of the tied head's context-token interaction.
        nado_corpus_samples (`int`, *optional*, defaults to `256`):
            Completions of the training corpus labelled once by the oracles (at the first oracle phase, counted in
            `oracle/calls`) and added to the NADO model's training data in every round, beside the round's samples
            of the policy. `0` trains the NADO model on the policy's samples only.
        nado_corpus_labels (`str`, *optional*, defaults to `"all"`):
            Where a corpus completion's label trains the NADO model's BCE. `"all"`: at every one of its positions, so
            that at the earlier ones the NADO model learns R under the corpus's continuations. `"last"`: at its last
            position only, where the label is exact (`R(x, y) = C(x, y)`); the consistency term, which still covers
            every position, carries it back to the earlier prefixes under the policy, so that R is the policy's own
            there too (needs `nado_consistency_weight > 0`).
        nado_corpus_rollouts (`bool`, *optional*, defaults to `False`):
            Corpus-prefix rollouts. Once, the first violating token of each unsatisfied corpus completion is found by
            bisecting its prefixes with the oracles (about log2 of its length in calls); then every oracle phase the
            policy continues each completion from just before that token, and the labelled rollouts join the NADO
            model's training data: the policy's own next token is labelled at the very context where the corpus broke
            the constraint. Assumes an unsatisfied prefix stays unsatisfied whatever follows (as an insult does).
        nado_num_layers (`int`, *optional*, defaults to `0`):
            Extra causal transformer layers between the LM's hidden states and the NADO head. `0` is a head only.
        nado_hidden_state_layer (`int`, *optional*, defaults to `-1`):
            Which of the LM's hidden states the NADO model reads (an index into `outputs.hidden_states`).
        nado_learning_rate (`float`, *optional*, defaults to `1e-3`):
            Learning rate of the NADO model (AdamW).
        nado_epochs (`int`, *optional*, defaults to `2`):
            Passes over the samples of a round when training the NADO model.
        nado_batch_size (`int`, *optional*, defaults to `8`):
            Completions per NADO training step.
        nado_consistency_weight (`float`, *optional*, defaults to `1.0`):
            β, the weight of the consistency term of the NADO loss.
        nado_importance_weighting (`bool`, *optional*, defaults to `True`):
            Whether to reweight samples by self-normalised importance weights `p_θ(y|x) / p_sample(y|x)` when the
            sampling proposal differs from the policy (`temperature != 1` or `top_p < 1`).
        nado_model_name_or_path (`str` or `None`, *optional*):
            A saved NADO model to start from (for example the `nado/` folder of a previous run) instead of a
            zero-initialised one.

        > Parameters that control the regulariser

        cadet_lambda (`float`, *optional*, defaults to `1.0`):
            λ, the weight of the regulariser Ω. `0.0` is plain SFT (the oracle phase still runs and is logged), unless
            `lm_loss_weights="target"` weighs the LM loss. With `lambda_schedule="adaptive"`, the initial value.
        lambda_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"` or `"adaptive"`: dual ascent on the constraint `E[C] >= target_satisfaction` in log space,
            `log λ ← log λ + lambda_lr · (target_satisfaction - ĉ)` after each oracle phase, so that a step scales with
            λ (λ stays within [1e-3, 1e3]).
        target_satisfaction (`float`, *optional*, defaults to `0.9`):
            δ, the satisfaction rate the adaptive schedule aims for.
        lambda_lr (`float`, *optional*, defaults to `4.0`):
            η, the step size of the adaptive schedule on log λ: a satisfaction 0.1 below target multiplies λ by
            `exp(0.4) ≈ 1.5`.
        cadet_min_p (`float`, *optional*, defaults to `0.1`):
            The regulariser's target `q ∝ p_θ · R` reweights only the tokens with `p_θ(v) >= cadet_min_p · max p_θ`
            at each position (the rule of min-p sampling); the other tokens keep their probability, so the regulariser
            never raises a token the LM would not write. `0.0` reweights every token (the exact `q*`, whose samples
            drift into invented words; see docs/cadet_trainer.md).
        cadet_demote_only (`bool`, *optional*, defaults to `True`):
            Cap `R` at its `p_θ`-weighted mean over the plausible tokens in the target, `q ∝ p_θ · min(R, R̄)`: the
            regulariser lowers the tokens less likely than average to keep the constraint and raises all the others
            in proportion to `p_θ`, instead of favouring the tokens the NADO model rates safest. `False` gives the
            paper's `q ∝ p_θ · R`, whose samples lost their fluency in the demo's third round (see
            docs/cadet_trainer.md).
        cadet_demote_below (`float`, *optional*, defaults to `1.0`):
            With `cadet_demote_only`, cap `R` at this share of its mean instead, `q ∝ p_θ · min(R, cadet_demote_below ·
            R̄)`: a token is lowered only when its `R` is below that share of the mean, so that the NADO model's small
            errors between benign tokens move nothing, whatever λ. `1.0` lowers every token below the mean.
        cadet_neutral_end (`bool`, *optional*, defaults to `True`):
            Leave the end-of-turn and end-of-sequence tokens at `p_θ` in the target: their `R` is not used. Ending a
            reply adds no text, so its true `R` is the oracle's verdict on the reply so far, which a NADO model trained
            on whole sequences learns badly (every short insult of a corpus ends with it). `False` lowers them like
            any token whose `R` is below the mean.
        cadet_safe_ratio (`float`, *optional*, defaults to `1.0`):
            Cap `R` at `cadet_safe_ratio` times the largest `R` among the plausible tokens in the target, `q ∝ p_θ ·
            min(R, cadet_safe_ratio · max R)`: the tokens within that factor of the safest one count as equally safe
            and keep their order under `p_θ`, so that the NADO model's small errors between benign tokens do not move
            the LM, while a token far less safe than a plausible alternative is still lowered, however much of `p_θ`
            it holds. `1.0` caps nothing. On the benchmarks it did not keep full reweighting's samples fluent (see
            docs/cadet_trainer.md).
        regularized_positions (`str`, *optional*, defaults to `"corpus"`):
            Where Ω is applied: `"corpus"` (the training batch's trained-on tokens), `"samples"` (the completion tokens
            of the latest oracle samples, one extra forward pass per step) or `"both"` (how the two weigh:
            `samples_kl_weight`).
        regularized_corpus (`str`, *optional*, defaults to `"all"`):
            Which completions of the training batch Ω covers when `regularized_positions` includes the corpus:
            `"all"`; `"unsatisfied"`: only those the oracles score below `oracle_threshold`, where the corpus itself
            breaks the constraint (elsewhere `q = p`: the oracle found nothing to correct there). Each completion (an
            assistant turn after the conversation before it, a prompt-completion row's pair, a text after an empty
            prompt) is judged once, the first time a batch holds it, as TRL's reward functions are called; the calls
            are counted in `oracle/calls`. Ω stays a mean over all the completions' positions, so λ weighs the same
            per position as with `"all"`. Needs a `Dataset` without packing or padding-free batches (a batch row is
            found among the tokenized rows by its tokens). `"violations"`: the unsatisfied completions up to and
            including their first violating token, found by bisecting their prefixes with the oracles (about log2 of
            the length in calls, counted): after it no continuation satisfies the constraint, so `R` is 0 for every
            token and the target is not defined there (as with `regularized_samples="violations"`).
        regularized_samples (`str`, *optional*, defaults to `"all"`):
            Which oracle samples Ω covers when `regularized_positions` includes them: `"all"`; `"unsatisfied"` (those
            scored below `oracle_threshold`: the contexts where the policy itself went wrong; none in a round leaves
            the step without sample Ω); or `"violations"`, the unsatisfied ones at one position each, the context of
            their first violating token. That token is found after labelling by bisecting the sample's prefixes with
            the oracles (about log2 of its length in calls, counted in `oracle/calls`); after it no continuation
            satisfies the constraint, so `R` is 0 for every token and the target is not defined there.
        lm_loss_weights (`str`, *optional*, defaults to `"uniform"`):
            How the LM loss weighs the corpus tokens that Ω covers: `"uniform"`, every token as `SFTTrainer` does;
            `"target"`, each token's NLL times `min(1, R(ctx, y_t) / R̄(ctx))` (detached; `R̄` is the `p_θ`-weighted
            mean of `R` over the plausible tokens, times `cadet_demote_below`), the factor by which the
            constraint-satisfying distribution lowers the corpus's own next token. Its product over a completion is
            the completion's weight `C(y) / R(x)`, which filtering applies to the whole completion: a token the NADO
            model finds less safe than the alternatives is learned less, the tokens around it as by SFT, and the LM
            loss no longer pulls up what Ω pushes down. The other tokens, and the evaluation loss, weigh 1. Needs
            `regularized_positions` `"corpus"` or `"both"`; works at `cadet_lambda=0` too (weighting alone).
        filter_corpus (`bool`, *optional*, defaults to `False`):
            Before training, score every completion of the training corpus once with the oracles (each example's
            completions as `regularized_corpus` judges them; the calls are counted in `oracle/calls`) and drop the
            examples with one scored below `oracle_threshold` (one the oracles could not score is kept): the LM loss
            then learns the oracle-filtered corpus, and Ω regularises it. The oracle-phase prompts (without
            `prompt_dataset`) and the NADO model's labelled corpus completions still come from the whole corpus, so
            the NADO model learns from the dropped completions too. With `cadet_lambda=0` it trains as `SFTTrainer`
            on the filtered corpus. Needs a `Dataset` (not streamed); cannot go with `regularized_corpus` other than
            `"all"` (every kept completion is satisfied).
        samples_kl_weight (`float` or `None`, *optional*):
            With `regularized_positions="both"`, how Ω on the samples weighs against Ω on the corpus. `None`: one mean
            over both sets of positions, so the samples weigh by their share of them; a number `w`: `λ · (mean KL on
            the corpus + w · mean KL on the samples)` (with `"samples"` alone, `w` scales their Ω). Defaults to
            `None`, and to `0.25` with `regularized_samples="violations"` (one position per sample, which one mean
            would drown).
        samples_per_step (`int` or `None`, *optional*):
            Oracle samples in the extra forward pass of each step when Ω covers samples. Defaults to
            `per_device_train_batch_size`.
        samples_kl_steps (`int`, *optional*, defaults to `1`):
            When Ω covers samples, run that extra forward pass every `k`-th optimisation step only, with the samples'
            KL multiplied by `k` there (in Ω's one mean, or before `samples_kl_weight`), so that the samples weigh as
            much over `k` steps as when they enter every step, at a `k`-th of the pass's cost. `1` runs it every step.
        cadet_max_grad_ratio (`float` or `None`, *optional*):
            Bound on the regulariser's share of each update: when the gradient of `λ · Ω` over the trainable
            parameters is larger in norm than `cadet_max_grad_ratio` times the LM loss's, `λ · Ω` is scaled down to
            that norm for the step (logged as `cadet/omega_scale`, with `cadet/grad_ratio`, the ratio before scaling).
            Adam steps have about the same size whatever the gradient's scale, so a regulariser whose gradient
            outweighs the LM loss's takes the steps' direction, and the LM learns less from the corpus. It costs one
            more backward pass a step and two more buffers the size of the trainable parameters (the two gradients
            are taken apart; small with LoRA), and needs the whole trainable parameters on each process: not with
            DeepSpeed or FSDP. The two gradients are taken without fp16's loss scaling: prefer bf16 to fp16 with it.
            `None` bounds nothing.
        cadet_grad_ratio_steps (`int`, *optional*, defaults to `1`):
            With `cadet_max_grad_ratio`, how often the two gradients are taken apart: every `k`-th optimisation step,
            and at the first step after each new NADO model (when the regulariser's gradient jumps); the steps in
            between scale `λ · Ω` by the factor last measured, at no extra cost. `1` measures every step (one more
            backward pass each); `k` costs one more backward pass every `k` steps.

        > Parameters that control the rounds

        steps_per_round (`int`, *optional*, defaults to `50`):
            LM optimisation steps per round; an oracle phase starts every `steps_per_round` steps.
        round_schedule (`str`, *optional*, defaults to `"sequential"`):
            `"sequential"`: the oracle phase of round k samples the current policy, then fine-tuning uses the new
            NADO. `"parallel"`: the oracle phase of round k runs in the background on a snapshot of the policy while
            fine-tuning uses the NADO of round k-1 (one round stale), so a round costs max(O, F) instead of O + F.
        oracle_device (`str` or `None`, *optional*):
            Device of the oracle phase in the parallel schedule (the policy snapshot and the NADO being trained), for
            example `"cuda:1"`. Defaults to the training device.
    """

    # Parameters whose default differs from SFTConfig
    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "The initial learning rate for AdamW."},
    )

    # Parameters that control the oracle
    oracle_labels: str = field(
        default="soft",
        metadata={
            "help": "How oracle scores become NADO labels: 'soft' (the score) or 'hard' (score >= oracle_threshold).",
            "choices": ["soft", "hard"],
        },
    )
    oracle_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Satisfaction threshold: scores below it are unsatisfied, and with hard labels get label 0 "
            "(oracles return 1 when the constraint holds)."
        },
    )
    oracle_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the oracles, combined by a weighted mean. Defaults to equal weights."},
    )
    oracle_max_retries: int = field(
        default=2,
        metadata={"help": "Retries of an oracle that raises before the samples of that batch are dropped."},
    )
    oracle_timeout: float | None = field(
        default=None,
        metadata={"help": "Seconds an oracle call may take before it counts as a failure. None waits for it."},
    )
    oracle_retry_delay: float = field(
        default=1.0,
        metadata={"help": "Seconds before retrying a failed oracle call, doubled at each further retry."},
    )

    # Parameters that control sampling in the oracle phase
    prompts_per_round: int = field(
        default=32,
        metadata={"help": "Prompts drawn per round (across all processes) for the oracle phase."},
    )
    num_generations: int = field(
        default=4,
        metadata={"help": "Completions sampled per prompt in the oracle phase."},
    )
    unsatisfied_prompts_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of each round's prompts drawn from the prompts of the labelled corpus completions that the "
            "oracles judged unsatisfied (prompts known to elicit violations); the rest from all prompts."
        },
    )
    max_prompt_length: int | None = field(
        default=256,
        metadata={"help": "Longest accepted prompt, in tokens; a longer one is an error raised before training."},
    )
    max_completion_length: int = field(
        default=48,
        metadata={"help": "Maximum number of tokens sampled per completion."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of the oracle phase."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling threshold of the oracle phase."},
    )
    generation_batch_size: int = field(
        default=16,
        metadata={"help": "Sequences generated, and scored for NADO training, per forward batch."},
    )
    corpus_prompt_length: int = field(
        default=16,
        metadata={"help": "Prompt length, in tokens, taken from texts of a language-modeling corpus."},
    )

    # Parameters that control the NADO model
    nado_head: str = field(
        default="tied",
        metadata={
            "help": "The NADO head: 'tied' (low rank, through the LM's output embeddings) or 'full' (vocabulary-sized).",
            "choices": ["tied", "full"],
        },
    )
    nado_rank: int = field(
        default=16,
        metadata={"help": "Rank of the tied NADO head's context-token interaction."},
    )
    nado_corpus_samples: int = field(
        default=256,
        metadata={"help": "Corpus completions labelled once by the oracles and added to NADO training each round."},
    )
    nado_corpus_labels: str = field(
        default="all",
        metadata={
            "help": "Where a corpus completion's label trains the NADO model's BCE: 'all' its positions (R under the "
            "corpus's continuations), or 'last' only, where it is exact (the consistency term carries it back under "
            "the policy)."
        },
    )
    nado_corpus_rollouts: bool = field(
        default=False,
        metadata={
            "help": "Each oracle phase, continue every unsatisfied corpus completion with the policy from just before "
            "its first violating token (found once by bisecting its prefixes), and train the NADO model on the labelled "
            "rollouts too."
        },
    )
    nado_num_layers: int = field(
        default=0,
        metadata={"help": "Extra causal transformer layers under the NADO head (0: a head on the LM's states)."},
    )
    nado_hidden_state_layer: int = field(
        default=-1,
        metadata={"help": "Index into the LM's `hidden_states` that the NADO model reads."},
    )
    nado_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the NADO model (AdamW)."},
    )
    nado_epochs: int = field(
        default=2,
        metadata={"help": "Passes over a round's samples when training the NADO model."},
    )
    nado_warm_start: bool = field(
        default=True,
        metadata={
            "help": "Each oracle phase continues training the last phase's NADO model (its weights and AdamW state). "
            "False trains each phase's NADO model from the start (zero-initialised, or `nado_model_name_or_path`)."
        },
    )
    nado_batch_size: int = field(
        default=8,
        metadata={"help": "Completions per NADO training step."},
    )
    nado_consistency_weight: float = field(
        default=1.0,
        metadata={"help": "β, the weight of the consistency term of the NADO loss."},
    )
    nado_importance_weighting: bool = field(
        default=True,
        metadata={"help": "Reweight samples by p_θ(y|x) / p_sample(y|x) when temperature != 1 or top_p < 1."},
    )
    nado_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved NADO model to start from instead of a zero-initialised one."},
    )

    # Parameters that control the regulariser
    cadet_lambda: float = field(
        default=1.0,
        metadata={"help": "λ, the weight of the regulariser (the initial value with the adaptive schedule)."},
    )
    lambda_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' or 'adaptive' (dual ascent on E[C] >= target_satisfaction).",
            "choices": ["constant", "adaptive"],
        },
    )
    target_satisfaction: float = field(
        default=0.9,
        metadata={"help": "δ, the satisfaction rate the adaptive λ schedule aims for."},
    )
    lambda_lr: float = field(
        default=4.0,
        metadata={"help": "η, the step size of the adaptive λ schedule on log λ."},
    )
    cadet_min_p: float = field(
        default=0.1,
        metadata={
            "help": "The regulariser's target q reweights only the tokens with p >= cadet_min_p · max p at each "
            "position (min-p's rule); the other tokens keep their probability. 0 reweights every token."
        },
    )
    cadet_demote_only: bool = field(
        default=True,
        metadata={
            "help": "Cap R at its mean over the plausible tokens in the target q: the regulariser lowers the tokens "
            "less likely than average to keep the constraint and leaves the order of the others as the LM has it."
        },
    )
    cadet_demote_below: float = field(
        default=1.0,
        metadata={
            "help": "With cadet_demote_only, cap R at this share of its mean over the plausible tokens: a token is "
            "lowered only when its R is below that share of the mean. 1 lowers every token below the mean."
        },
    )
    cadet_neutral_end: bool = field(
        default=True,
        metadata={
            "help": "Leave the end-of-turn and end-of-sequence tokens at p in the regulariser's target q (their R is "
            "not used): ending a reply adds no text."
        },
    )
    cadet_safe_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Cap R at this share of the largest R among the plausible tokens in the target q: tokens within "
            "that factor of the safest one count as equally safe; only those below it are lowered. 1 caps nothing."
        },
    )
    regularized_positions: str = field(
        default="corpus",
        metadata={
            "help": "Where the regulariser applies: 'corpus', 'samples' or 'both'.",
            "choices": ["corpus", "samples", "both"],
        },
    )
    regularized_corpus: str = field(
        default="all",
        metadata={
            "help": "Which training-batch completions Ω covers: 'all'; 'unsatisfied' (those the oracles score below "
            "`oracle_threshold`, each judged once when first trained on; the calls are counted); or 'violations' (the "
            "unsatisfied ones up to their first violating token, found by bisection with the oracles).",
            "choices": ["all", "unsatisfied", "violations"],
        },
    )
    regularized_samples: str = field(
        default="all",
        metadata={
            "help": "Which oracle samples Ω covers when `regularized_positions` includes them: 'all', "
            "'unsatisfied' (scored below `oracle_threshold`), or 'violations' (the unsatisfied ones at the context of "
            "their first violating token only, found by bisection with the oracles; the calls are counted).",
            "choices": ["all", "unsatisfied", "violations"],
        },
    )
    lm_loss_weights: str = field(
        default="uniform",
        metadata={
            "help": "How the LM loss weighs the corpus tokens Ω covers: 'uniform' (as SFTTrainer), or 'target' (each "
            "token's NLL times min(1, R(y_t) / R̄), the factor by which the constraint-satisfying distribution lowers "
            "it).",
            "choices": ["uniform", "target"],
        },
    )
    filter_corpus: bool = field(
        default=False,
        metadata={
            "help": "Before training, score every completion of the training corpus with the oracles once and train the "
            "LM loss only on the examples whose completions all score at least `oracle_threshold` (the calls are "
            "counted); the oracle-phase prompts and the NADO model's labelled corpus completions still come from the "
            "whole corpus. With λ = 0 this is SFT on the oracle-filtered corpus."
        },
    )
    samples_kl_weight: float | None = field(
        default=None,
        metadata={
            "help": "With `regularized_positions='both'`: None, Ω is one mean over the corpus's and the samples' "
            "positions; a number w, λ · (corpus mean KL + w · samples mean KL). Defaults to 0.25 with "
            "`regularized_samples='violations'`."
        },
    )
    samples_per_step: int | None = field(
        default=None,
        metadata={
            "help": "Oracle samples in the extra forward pass of each step when Ω covers samples. Defaults to "
            "`per_device_train_batch_size`."
        },
    )
    samples_kl_steps: int = field(
        default=1,
        metadata={
            "help": "When Ω covers samples, run their extra forward pass every this many steps only, their KL multiplied "
            "by that number there."
        },
    )
    cadet_max_grad_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Scale λ·Ω down, at each step, to at most this multiple of the LM loss's gradient norm over the "
            "trainable parameters (one more backward pass a step). None bounds nothing."
        },
    )
    cadet_grad_ratio_steps: int = field(
        default=1,
        metadata={
            "help": "With `cadet_max_grad_ratio`, take the two gradients apart every this many steps and after each new "
            "NADO model; in between, reuse the last factor."
        },
    )

    # Parameters that control the rounds
    steps_per_round: int = field(
        default=50,
        metadata={"help": "LM optimisation steps per round."},
    )
    round_schedule: str = field(
        default="sequential",
        metadata={
            "help": "'sequential' or 'parallel' (the oracle phase overlaps fine-tuning, one round stale).",
            "choices": ["sequential", "parallel"],
        },
    )
    oracle_device: str | None = field(
        default=None,
        metadata={"help": "Device of the background oracle phase in the parallel schedule (e.g. 'cuda:1')."},
    )

    def __post_init__(self):
        super().__post_init__()
        choices = {
            "oracle_labels": ("hard", "soft"),
            "lambda_schedule": ("constant", "adaptive"),
            "regularized_positions": ("corpus", "samples", "both"),
            "regularized_corpus": ("all", "unsatisfied", "violations"),
            "regularized_samples": ("all", "unsatisfied", "violations"),
            "lm_loss_weights": ("uniform", "target"),
            "round_schedule": ("sequential", "parallel"),
            "nado_head": ("tied", "full"),
            "nado_corpus_labels": ("all", "last"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}."
                )
        positive = (
            "prompts_per_round",
            "num_generations",
            "max_completion_length",
            "generation_batch_size",
            "nado_epochs",
            "nado_batch_size",
            "steps_per_round",
            "corpus_prompt_length",
            "cadet_grad_ratio_steps",
            "samples_kl_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.regularized_corpus != "all" and self.regularized_positions == "samples":
            raise ValueError(
                f"`regularized_corpus={self.regularized_corpus!r}` chooses among the training batch's completions, but "
                "`regularized_positions='samples'` applies Ω to the oracle samples only. Set `regularized_positions` "
                "to 'corpus' or 'both', or leave `regularized_corpus='all'`."
            )
        if self.samples_kl_steps > 1 and self.regularized_positions == "corpus":
            raise ValueError(
                f"`samples_kl_steps={self.samples_kl_steps}` sets how often Ω's pass over the oracle samples runs, but "
                "`regularized_positions='corpus'` covers no sample. Set `regularized_positions` to 'samples' or "
                "'both', or leave `samples_kl_steps=1`."
            )
        if self.lm_loss_weights == "target" and self.regularized_positions == "samples":
            raise ValueError(
                "`lm_loss_weights='target'` weighs the corpus tokens by the NADO model's R where Ω covers them, but "
                "`regularized_positions='samples'` covers no corpus token. Set `regularized_positions` to "
                "'corpus' or 'both', or leave `lm_loss_weights='uniform'`."
            )
        if self.filter_corpus and self.regularized_corpus != "all":
            raise ValueError(
                f"`filter_corpus=True` trains only on corpus examples the oracles score satisfied, so "
                f"`regularized_corpus={self.regularized_corpus!r}`, which regularises the unsatisfied ones, would cover "
                "none. Leave `regularized_corpus='all'`, or set `filter_corpus=False`."
            )
        if self.samples_kl_weight is None and self.regularized_samples == "violations":
            self.samples_kl_weight = 0.25
        if self.samples_kl_weight is not None and self.samples_kl_weight < 0:
            raise ValueError(f"`samples_kl_weight` must be at least 0 or None, got {self.samples_kl_weight}.")
        if self.cadet_max_grad_ratio is not None and not self.cadet_max_grad_ratio > 0:
            raise ValueError(
                f"`cadet_max_grad_ratio` must be positive or None (no bound), got {self.cadet_max_grad_ratio}."
            )
        if self.samples_per_step is not None and self.samples_per_step < 1:
            raise ValueError(f"`samples_per_step` must be at least 1 or None, got {self.samples_per_step}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"`max_prompt_length` must be at least 1 or None, got {self.max_prompt_length}.")
        if not 0.0 <= self.oracle_threshold <= 1.0:
            raise ValueError(
                f"`oracle_threshold` must be in [0, 1] (oracles return a satisfaction score in [0, 1]), got "
                f"{self.oracle_threshold}."
            )
        if not 0.0 <= self.target_satisfaction <= 1.0:
            raise ValueError(f"`target_satisfaction` must be in [0, 1], got {self.target_satisfaction}.")
        if self.cadet_lambda < 0:
            raise ValueError(f"`cadet_lambda` must be non-negative, got {self.cadet_lambda}; λ = 0 is plain SFT.")
        if self.lambda_lr < 0:
            raise ValueError(f"`lambda_lr` must be non-negative, got {self.lambda_lr}.")
        if self.nado_consistency_weight < 0:
            raise ValueError(f"`nado_consistency_weight` must be non-negative, got {self.nado_consistency_weight}.")
        if self.nado_learning_rate <= 0:
            raise ValueError(f"`nado_learning_rate` must be positive, got {self.nado_learning_rate}.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if not 0.0 <= self.cadet_min_p < 1.0:
            raise ValueError(
                f"`cadet_min_p` must be in [0, 1), got {self.cadet_min_p}; 0 lets the regulariser reweight every token."
            )
        if not 0.0 < self.cadet_demote_below <= 1.0:
            raise ValueError(
                f"`cadet_demote_below` must be in (0, 1], got {self.cadet_demote_below}; 1 lowers every plausible "
                "token whose R is below the mean, 0.8 only those more than 20% below it."
            )
        if self.cadet_demote_below < 1.0 and not self.cadet_demote_only:
            raise ValueError(
                f"`cadet_demote_below` ({self.cadet_demote_below}) sets how far below its mean R must be for a token "
                "to be lowered, which only `cadet_demote_only=True` does: set `cadet_demote_only=True` or "
                "`cadet_demote_below=1.0`."
            )
        if not 0.0 < self.cadet_safe_ratio <= 1.0:
            raise ValueError(
                f"`cadet_safe_ratio` must be in (0, 1], got {self.cadet_safe_ratio}; 1 leaves the NADO model's R "
                "uncapped, 0.8 counts every plausible token within 20% of the safest one's R as equally safe."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.oracle_max_retries < 0:
            raise ValueError(f"`oracle_max_retries` must be non-negative, got {self.oracle_max_retries}.")
        if self.oracle_retry_delay < 0:
            raise ValueError(f"`oracle_retry_delay` must be non-negative, got {self.oracle_retry_delay}.")
        if self.oracle_timeout is not None and not self.oracle_timeout > 0:
            raise ValueError(
                f"`oracle_timeout` must be positive, or None to wait as long as the oracle takes, got "
                f"{self.oracle_timeout}."
            )
        if self.oracle_weights is not None and (
            any(w < 0 for w in self.oracle_weights) or not sum(self.oracle_weights) > 0
        ):
            raise ValueError(
                f"`oracle_weights` must be non-negative with a positive sum (the combined score is their weighted "
                f"mean, which must stay in [0, 1]), got {self.oracle_weights}."
            )
        if self.nado_rank < 0:
            raise ValueError(f"`nado_rank` must be non-negative, got {self.nado_rank}.")
        if self.nado_corpus_samples < 0:
            raise ValueError(f"`nado_corpus_samples` must be non-negative, got {self.nado_corpus_samples}.")
        if not 0.0 <= self.unsatisfied_prompts_share <= 1.0:
            raise ValueError(
                f"`unsatisfied_prompts_share` must be in [0, 1], got {self.unsatisfied_prompts_share}; 0.5 draws half "
                "of each round's prompts from those whose corpus completion the oracles judged unsatisfied."
            )
        if self.unsatisfied_prompts_share > 0 and self.nado_corpus_samples == 0:
            raise ValueError(
                "`unsatisfied_prompts_share` draws prompts from the labelled corpus completions the oracles judged "
                "unsatisfied, and `nado_corpus_samples=0` labels none. Set a positive `nado_corpus_samples` (e.g. 256), "
                "or `unsatisfied_prompts_share=0`."
            )
        if self.nado_corpus_labels == "last" and self.nado_consistency_weight == 0:
            raise ValueError(
                "`nado_corpus_labels='last'` trains on a corpus completion's label at its last position only and relies "
                "on the consistency term to carry it to the earlier ones, which `nado_consistency_weight=0` turns off. "
                "Set a positive `nado_consistency_weight`, or `nado_corpus_labels='all'`."
            )
        if self.lambda_schedule == "adaptive" and self.cadet_lambda == 0:
            raise ValueError(
                "`lambda_schedule='adaptive'` moves λ in log space, so it cannot start from `cadet_lambda=0`. Start "
                "from a positive λ (e.g. 1.0)."
            )
        if self.lambda_schedule == "adaptive" and self.lambda_lr == 0:
            raise ValueError(
                "`lambda_schedule='adaptive'` with `lambda_lr=0` never changes λ. Set a positive `lambda_lr`, or use "
                "`lambda_schedule='constant'`."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "CADET needs the LM's full logits to compute its regulariser, which the Liger kernel does not build. "
                "Set `use_liger_kernel=False`."
            )
        if self.nado_num_layers > 0 and (self.packing or self.padding_free):
            raise ValueError(
                "A NADO model with extra layers attends across the whole sequence and cannot tell packed sequences "
                "apart. Set `nado_num_layers=0`, or `packing=False` and `padding_free=False`."
            )
        if self.oracle_device is not None and self.round_schedule != "parallel":
            raise ValueError(
                "`oracle_device` is used by the parallel schedule only. Set `round_schedule='parallel'` or leave "
                "`oracle_device` unset."
            )
        if self.oracle_device is not None:
            try:
                torch.device(self.oracle_device)
            except RuntimeError as error:
                raise ValueError(
                    f"`oracle_device={self.oracle_device!r}` is not a device name ({error}). Use e.g. 'cuda:1' or 'cpu'."
                ) from error

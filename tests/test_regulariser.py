"""What makes the regulariser work: Ω only on assistant tokens, a NADO head that starts at q = p and generalises across
tokens, corpus completions in NADO training, and an adaptive λ that reaches its target."""

import json
import math
import random

import pytest
import torch
from conftest import tiny_cadet_config
from datasets import Dataset
from test_cadet_trainer import BAD_WORD, corpus, logged, no_bad_word

from trl_cadet import CADETTrainer, NADOModel, cadet_kl, target_logprobs
from trl_cadet.data_utils import assistant_markers, assistant_token_mask, extract_completions
from trl_cadet.nado import adaptive_lambda, regularized_mask
from trl_cadet.oracle_phase import RolloutPrefixes, Samples, train_nado


def conversations(n: int = 24) -> Dataset:
    """Two-turn conversations with a system prompt, so that most trained tokens are not the assistant's."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "be nice and helpful to the user"},
                    {"role": "user", "content": "hello there, how are you today?"},
                    {"role": "assistant", "content": "you are an idiot" if i % 3 == 0 else "good morning"},
                    {"role": "user", "content": "what is your favourite book?"},
                    {"role": "assistant", "content": "stories about ships"},
                ]
            }
        )
    return Dataset.from_list(rows)


def test_assistant_mask_covers_the_replies_and_their_end_tokens_only(tokenizer):
    markers = assistant_markers(tokenizer)
    assert tokenizer.convert_ids_to_tokens(markers.header) == ["<|assistant|>"]
    assert tokenizer.convert_ids_to_tokens([markers.end]) == ["<|end|>"]
    messages = conversations(1)[0]["messages"]
    ids = tokenizer(text=tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    mask = assistant_token_mask(torch.tensor([ids]), markers)[0]
    kept = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert kept == "you are an idiot<|end|>stories about ships<|end|>"


def _omega_batch(trainer: CADETTrainer):
    """Ω as the trainer logs it for one batch (with a NADO model whose R depends on the token), the LM and NADO logits
    behind it, and the batch's trained and assistant positions, to recompute it with `cadet_kl`."""
    with torch.no_grad():  # a NADO model whose R depends on the token, so that the KL is not zero
        for param in trainer.nado.parameters():
            param.add_(0.5 * torch.randn_like(param))
    trainer.nado_source_round = 0
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        outputs = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        nado_logits = trainer.nado(outputs.hidden_states[-1], output_embeddings=trainer.model.lm_head.weight)
    trained = regularized_mask(batch["labels"])
    assistant = torch.zeros_like(trained)
    assistant[:, :-1] = assistant_token_mask(batch["input_ids"], trainer._assistant_markers)[:, 1:]
    return trainer._metrics["train"]["cadet/kl"][-1], outputs.logits, nado_logits, trained, assistant


def test_omega_is_zero_on_system_user_and_header_tokens(tokenizer, tiny_llama, tmp_path):
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, cadet_lambda=1.0),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    logged, lm_logits, nado_logits, trained, assistant = _omega_batch(trainer)
    target = dict(
        min_p=trainer.args.cadet_min_p,
        demote_only=trainer.args.cadet_demote_only,
        neutral_tokens=trainer._neutral_tokens("cpu"),
    )
    per_context = cadet_kl(lm_logits, nado_logits, reduction="none", **target)  # [B, L]
    assert (trained & ~assistant).sum() > 2 * (trained & assistant).sum()  # most trained tokens are not replies
    expected = per_context[trained & assistant].mean()
    assert logged == pytest.approx(expected.item(), rel=1e-4)
    assert per_context[trained & ~assistant].mean().item() != pytest.approx(logged, rel=2e-3)  # noise: ~1e-6


@pytest.mark.parametrize("which", ["unsatisfied", "violations"])
def test_omega_on_unsatisfied_corpus_completions_covers_those_turns_only(tokenizer, tiny_llama, tmp_path, which):
    """`regularized_corpus="unsatisfied"`: Ω is the KL at the positions of the assistant turns the oracle scores
    unsatisfied, 0 elsewhere, averaged over every assistant position; each turn of each row is judged once, as TRL's
    reward functions are called (the conversation before it, the turn as a message), and counted. `"violations"`:
    those turns up to their first violating token only, found by bisection (counted too)."""
    judged = []

    def oracle(prompts, completions, **kwargs):
        for prompt, completion in zip(prompts, completions, strict=True):
            judged.append((tuple(m["content"] for m in prompt), completion[-1]["content"]))
        return [0.0 if BAD_WORD in c[-1]["content"] else 1.0 for c in completions]

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=oracle,
        args=tiny_cadet_config(tmp_path, regularized_corpus=which, cadet_lambda=1.0),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    logged, lm_logits, nado_logits, trained, assistant = _omega_batch(trainer)
    per_context = cadet_kl(
        lm_logits,
        nado_logits,
        reduction="none",
        min_p=trainer.args.cadet_min_p,
        demote_only=trainer.args.cadet_demote_only,
        neutral_tokens=trainer._neutral_tokens("cpu"),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # The first reply of a row with the insult is the only unsatisfied turn: its positions, row by row, and those
    # up to the one that predicts the token completing the insult
    unsatisfied, until_violation = torch.zeros_like(assistant), torch.zeros_like(assistant)
    for row in range(len(assistant)):
        columns = (trained[row] & assistant[row]).nonzero()[:, 0]
        first_turn = columns[: int((columns.diff() > 1).nonzero()[0, 0]) + 1]
        if BAD_WORD in tokenizer.decode(batch["input_ids"][row]):
            unsatisfied[row, first_turn] = True
            # position c predicts token c + 1
            tokens = [batch["input_ids"][row, c + 1].item() for c in first_turn]
            length = next(n for n in range(1, len(tokens) + 1) if BAD_WORD in tokenizer.decode(tokens[:n]))
            assert length < len(tokens)  # the end-of-turn token comes after the insult
            until_violation[row, first_turn[:length]] = True
    positions = trained & assistant
    assert 0 < unsatisfied.sum() < positions.sum() / 4  # the batch holds both kinds of row
    chosen, other = (unsatisfied, until_violation) if which == "unsatisfied" else (until_violation, unsatisfied)
    assert logged == pytest.approx((per_context[chosen].sum() / positions.sum()).item(), rel=1e-4)
    assert logged != pytest.approx((per_context[other].sum() / positions.sum()).item(), rel=2e-3)
    assert logged != pytest.approx(per_context[positions].mean().item(), rel=2e-3)

    # Both turns of the two distinct conversations (identical rows share their judgements), each after the
    # conversation before it, then never again; with "violations", the insult's prefixes too
    turns = {(prompt, text) for prompt, text in judged if text in ("good morning", "stories about ships")}
    assert len(turns) == 3 and len(judged) == trainer.oracle_calls
    assert len(judged) == 4 if which == "unsatisfied" else len(judged) > 4
    assert {prompt[-1] for prompt, _ in judged} == {"hello there, how are you today?", "what is your favourite book?"}
    assert {len(prompt) for prompt, _ in judged} == {2, 4}
    assert f"you are an {BAD_WORD}" in {text for _, text in judged}
    calls = trainer.oracle_calls
    trainer.compute_loss(trainer.model, batch)
    assert len(judged) == trainer.oracle_calls == calls  # judged already
    # A batch with nothing unsatisfied has Ω = 0 and a loss to step on
    trainer._corpus_scores = dict.fromkeys(trainer._corpus_scores, 1.0)
    loss = trainer.compute_loss(trainer.model, batch)
    assert trainer._metrics["train"]["cadet/kl"][-1] == 0.0 and loss.requires_grad


def test_judged_corpus_completions_are_a_prompt_completion_rows_completion(tokenizer, tiny_llama, tmp_path):
    """With `regularized_corpus`, a prompt-completion row trained on whole (`completion_only_loss=False`) has an
    assistant turn in its prompt as well: the completion is what is judged and regularised, the prompt's turn is not."""
    judged = []

    def oracle(prompts, completions, **kwargs):
        judged.extend(c[-1]["content"] for c in completions)
        return [0.0 if BAD_WORD in c[-1]["content"] else 1.0 for c in completions]

    earlier = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": f"you {BAD_WORD}"}]
    rows = [
        {
            "prompt": [*earlier, {"role": "user", "content": "how are you today?"}],
            "completion": [{"role": "assistant", "content": "fine, thanks" if i % 2 else f"an {BAD_WORD}, you"}],
        }
        for i in range(8)
    ]
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=oracle,
        args=tiny_cadet_config(tmp_path, regularized_corpus="unsatisfied", completion_only_loss=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    _omega_batch(trainer)
    assert sorted(set(judged)) == ["an idiot, you", "fine, thanks"] and trainer.oracle_calls == len(judged) == 2
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = regularized_mask(batch["labels"])
    omega = trainer._omega_positions(batch["input_ids"], mask)
    chosen = torch.zeros_like(mask)
    chosen[mask] = trainer._in_unsatisfied_completions(batch["input_ids"], batch["attention_mask"], mask, omega)
    # Expected: the positions predicting the tokens of the last assistant turn (the completion) of the insult rows
    assistant = torch.zeros_like(mask)
    assistant[:, :-1] = assistant_token_mask(batch["input_ids"], trainer._assistant_markers)[:, 1:]
    expected = torch.zeros_like(mask)
    for row in range(len(mask)):
        columns = (mask[row] & assistant[row]).nonzero()[:, 0]
        last_turn = columns[int((columns.diff() > 1).nonzero()[-1, 0]) + 1 :]
        if tokenizer.decode(batch["input_ids"][row]).count(BAD_WORD) == 2:
            expected[row, last_turn] = True
    assert expected.any() and (mask & assistant & ~expected).any()
    assert torch.equal(chosen, expected)


def test_judged_corpus_completions_of_the_evaluation_set_gate_the_evaluation_loss(tokenizer, tiny_llama, tmp_path):
    """With `regularized_corpus`, the evaluation corpus's rows are looked up and judged as the training corpus's are,
    under their own name, and the evaluation loss's Ω covers its unsatisfied completions only."""
    insults = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi you"}, {"role": "assistant", "content": f"{BAD_WORD}, go"}]}]
        * 4
    )
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, regularized_corpus="unsatisfied", max_steps=2, eval_strategy="no"),
        train_dataset=conversations(),
        eval_dataset=insults,
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert trainer._corpus_scores["eval:eval:0:0"] == 0.0  # the four identical rows judged once
    assert metrics["eval_cadet/regularized_share"] == 1.0 and metrics["eval_cadet/kl"] > 0


def test_omega_uses_the_configured_target(tokenizer, tiny_llama, tmp_path):
    """`cadet_min_p`, `cadet_demote_only`, `cadet_demote_below` and `cadet_safe_ratio` reach the regulariser: the
    logged Ω is the KL to the capped target, not to the plain one."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(
            tmp_path, cadet_min_p=0.5, cadet_demote_only=True, cadet_demote_below=0.5, cadet_safe_ratio=0.6
        ),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    logged, lm_logits, nado_logits, trained, assistant = _omega_batch(trainer)
    positions = trained & assistant

    def omega(**options):
        return cadet_kl(lm_logits, nado_logits, reduction="none", **options)[positions].mean().item()

    configured = dict(min_p=0.5, demote_only=True, demote_below=0.5, safe_ratio=0.6)
    configured["neutral_tokens"] = trainer._neutral_tokens("cpu")
    assert logged == pytest.approx(omega(**configured), rel=1e-4)
    for option, plain in dict(min_p=0.0, demote_only=False, demote_below=1.0, safe_ratio=1.0).items():
        changed = {**configured, option: plain}
        if option == "demote_only":  # `demote_below` caps R below its mean, which only demote-only does
            changed["demote_below"] = 1.0
        assert logged != pytest.approx(omega(**changed), rel=2e-3), option  # float noise is ~1e-6


def test_neutral_end_leaves_the_end_tokens_at_p(tokenizer, tiny_llama, tmp_path):
    """`cadet_neutral_end`: the target leaves the chat template's end-of-turn token and the EOS tokens at p; the
    logged Ω is the KL to that target, which differs from the default's."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, cadet_neutral_end=True, cadet_min_p=0.0),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    ends = trainer._neutral_tokens("cpu")
    assert set(ends.tolist()) == {tokenizer.eos_token_id, trainer._assistant_markers.end}
    logged, lm_logits, nado_logits, trained, assistant = _omega_batch(trainer)
    positions = trained & assistant
    target = dict(min_p=0.0, demote_only=trainer.args.cadet_demote_only)
    q = target_logprobs(lm_logits, nado_logits, neutral_tokens=ends, **target).exp()
    torch.testing.assert_close(q[..., ends], torch.softmax(lm_logits.float(), -1)[..., ends])

    def omega(**options):
        return cadet_kl(lm_logits, nado_logits, reduction="none", **target, **options)[positions].mean().item()

    assert logged == pytest.approx(omega(neutral_tokens=ends), rel=1e-4)
    assert logged != pytest.approx(omega(), rel=2e-3)


def test_omega_covers_every_trained_token_of_a_text_corpus(tokenizer, tiny_llama, tmp_path):
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=lambda prompts, completions, **kwargs: [1.0] * len(completions),
        args=tiny_cadet_config(tmp_path),
        train_dataset=Dataset.from_list([{"text": "hello there, how are you today?"}] * 8),
        processing_class=tokenizer,
    )
    assert trainer._assistant_markers is None


def test_corpus_completions_are_the_replies_with_their_end_token(tokenizer):
    found = extract_completions(conversations(6), tokenizer, 4, max_completion_length=32, corpus_prompt_length=4)
    assert len(found.prompts) == 4
    for prompt, prompt_ids, completion_ids in zip(found.prompts, found.prompt_ids, found.completion_ids, strict=True):
        assert prompt[-1]["role"] == "user" and len(prompt) == 4  # the conversation before the last reply
        assert tokenizer.decode(completion_ids) == "stories about ships<|end|>"
        assert tokenizer.decode(prompt_ids).endswith("<|assistant|>")


def test_corpus_completions_are_labelled_once_with_the_oracle_score_and_counted(tokenizer, tiny_llama, tmp_path):
    """The labels are the oracle's scores by default (`oracle_labels="soft"`), not 0/1."""
    calls = []

    def oracle(prompts, completions, **kwargs):
        calls.append(len(completions))
        return [0.9 if score else 0.2 for score in no_bad_word(prompts, completions)]

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=oracle,
        # without rollouts, whose calls the next test counts
        args=tiny_cadet_config(
            tmp_path, nado_corpus_samples=12, nado_corpus_rollouts=False, max_steps=4, steps_per_round=2
        ),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    trainer.train()
    samples = trainer._corpus_samples
    assert len(samples) == 12
    texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
    assert list(samples.labels) == [0.2 if BAD_WORD in text else 0.9 for text in texts]
    assert 0.2 in samples.labels and 0.9 in samples.labels
    # 12 corpus completions once, then the policy's samples of the two rounds (4 prompts x 2 generations each)
    assert sum(calls) == 12 + 2 * 8 == trainer.oracle_calls


def test_unsatisfied_prompts_share_samples_the_prompts_whose_corpus_completion_was_unsatisfied(
    tokenizer, tiny_llama, tmp_path
):
    """Half of the round's prompts come from the labelled corpus completions the oracle judged unsatisfied (each once,
    there being as many as needed), at no extra oracle call; without the option, the draw is the uniform one."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"you are an {BAD_WORD}" if i < 4 else "good morning"},
            ]
        }
        for i in range(24)
    ]
    eliciting = [f"question {i}" for i in range(4)]

    def sampled_prompts(share):
        judged = []

        def oracle(prompts, completions, **kwargs):
            judged.append([p[-1]["content"] for p in prompts])
            return no_bad_word(prompts, completions)

        args = tiny_cadet_config(
            tmp_path, max_steps=2, nado_corpus_samples=24, prompts_per_round=8, unsatisfied_prompts_share=share
        )
        trainer = CADETTrainer(
            model=tiny_llama,
            oracle_funcs=oracle,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        trainer.train()
        corpus_call, phase_call = judged  # the corpus labelled first, then the round's samples (2 per prompt)
        assert len(corpus_call) == 24 and trainer.oracle_calls == 24 + 16
        return phase_call[::2]

    drawn = sampled_prompts(0.5)
    assert len(drawn) == 8 and sorted(drawn[4:]) == eliciting  # after the uniform half, each eliciting prompt once
    uniform = sampled_prompts(0.0)
    # The draw of earlier versions, so that runs without the option reproduce theirs
    rng = random.Random(0 * 1_000_003 + 0)
    assert uniform == [f"question {i}" for i in rng.sample(range(24), 8)]
    assert sum(p in eliciting for p in uniform) < 4


def test_unsatisfied_prompts_share_warns_once_when_the_corpus_has_no_unsatisfied_completion(
    tokenizer, tiny_llama, tmp_path, caplog
):
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=lambda prompts, completions, **kwargs: [1.0] * len(completions),
        args=tiny_cadet_config(tmp_path, nado_corpus_samples=8, unsatisfied_prompts_share=0.5),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    with caplog.at_level("WARNING", logger="trl_cadet"):
        trainer.train()  # two rounds, all prompts drawn uniformly
    warnings = [r.message for r in caplog.records if "unsatisfied_prompts_share" in r.message]
    assert len(warnings) == 1 and "judged all 8 labelled corpus completions satisfied" in warnings[0]


def test_corpus_rollouts_start_right_before_the_first_violating_token_and_are_counted(tokenizer, tiny_llama, tmp_path):
    calls = []

    def oracle(prompts, completions, **kwargs):
        calls.append(len(completions))
        return no_bad_word(prompts, completions)

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=oracle,
        args=tiny_cadet_config(
            tmp_path, nado_corpus_samples=12, nado_corpus_rollouts=True, max_steps=4, steps_per_round=2
        ),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    trainer.train()
    corpus_samples, prefixes = trainer._corpus_samples, trainer._rollout_prefixes
    unsatisfied = [ids for ids, label in zip(corpus_samples.completion_ids, corpus_samples.labels) if label == 0.0]
    assert len(prefixes) == len(unsatisfied) >= 2
    for prefix, completion, prompt in zip(prefixes.prefix_ids, unsatisfied, prefixes.prompts, strict=True):
        # the prefix is the completion up to its first violating token, excluded
        assert completion[: len(prefix)] == prefix
        assert BAD_WORD not in tokenizer.decode(prefix)
        assert BAD_WORD in tokenizer.decode(completion[: len(prefix) + 1])
        assert prompt[-1] == {"role": "user", "content": "hello there"}
    # Every call counted: 12 corpus completions, the bisection (a few prefixes per unsatisfied completion), then per
    # round the policy's samples (4 prompts x 2) and one rollout per prefix
    bisection = sum(calls) - 12 - 2 * (8 + len(prefixes))
    assert len(prefixes) <= bisection <= 4 * len(prefixes)
    assert sum(calls) == trainer.oracle_calls
    assert logged(trainer, "oracle/rollouts") == [float(len(prefixes))] * 2
    # The phase's clock: its parts, the rollouts their own, add up to the whole
    parts = ("time/generation", "time/labelling", "time/rollouts", "time/nado_training")
    for phase, *times in zip(logged(trainer, "time/oracle_phase"), *(logged(trainer, key) for key in parts)):
        assert sum(times) <= phase < sum(times) + 0.01
    # The prefixes are part of the saved state, so a resumed run continues from the same ones
    trainer._save_cadet_state(str(tmp_path))
    with open(tmp_path / "cadet_state.json") as f:
        assert json.load(f)["rollout_prefixes"] == prefixes.to_dict()


def test_the_samples_first_violations_are_found_by_bisection_counted_and_saved(tokenizer, tiny_llama, tmp_path):
    """`regularized_samples="violations"`: after labelling, each unsatisfied sample gets the length of its shortest
    unsatisfied prefix (the tiny model's samples are random text: the toy constraint is "no letter e"), every prefix
    judged is counted, and the lengths are part of the saved state."""
    calls = []

    def no_letter_e(prompts, completions, **kwargs):
        calls.append(len(completions))
        return [0.0 if "e" in completion[-1]["content"] else 1.0 for completion in completions]

    args = tiny_cadet_config(
        tmp_path,
        regularized_positions="both",
        regularized_samples="violations",
        max_steps=2,
        samples_per_step=2,
        nado_corpus_samples=12,
    )
    assert args.samples_kl_weight == 0.25  # the default that goes with "violations"
    trainer = CADETTrainer(
        model=tiny_llama, oracle_funcs=no_letter_e, args=args, train_dataset=corpus(), processing_class=tokenizer
    )
    trainer.train()
    samples = trainer._latest_samples
    unsatisfied = [i for i, score in enumerate(samples.scores) if score < 0.5]
    assert 2 <= len(unsatisfied) < len(samples) == 8
    for i, completion in enumerate(samples.completion_ids):
        if i not in unsatisfied:
            assert samples.violations[i] is None
            continue
        length = samples.violations[i]
        assert "e" not in tokenizer.decode(completion[: length - 1], skip_special_tokens=True)
        assert "e" in tokenizer.decode(completion[:length], skip_special_tokens=True)
    # Every call counted: the corpus completions once, the round's 8 samples, then the bisection's prefixes
    bisection = sum(calls) - args.nado_corpus_samples - len(samples)
    assert len(unsatisfied) <= bisection <= 4 * len(unsatisfied)
    assert sum(calls) == trainer.oracle_calls
    assert logged(trainer, "oracle/bisection_calls") == [float(bisection)]
    sample_kl = logged(trainer, "cadet/kl_samples")  # Ω ran at the violations in both steps
    assert len(sample_kl) == 2 and min(sample_kl) > 0
    trainer._save_cadet_state(str(tmp_path))
    with open(tmp_path / "cadet_state.json") as f:
        assert json.load(f)["latest_samples"]["violations"] == samples.violations


def test_violations_stay_aligned_with_their_samples_when_processes_merge(tmp_path):
    """A process's samples without a search (`violations` empty) merge with a searched share as `None`s, and a
    negative `samples_kl_weight` is refused."""
    searched = Samples([[1], [2]], [[3, 4], [5]], [0.1, 0.9], [0.1, 0.9], violations=[2, None])
    plain = Samples([[6]], [[7, 8]], [0.2], [0.2])
    merged = Samples()
    for part in (plain, searched, plain):
        merged.extend(part)
    assert merged.violations == [None, 2, None, None] and len(merged) == 4
    assert [merged.violation(i) for i in range(4)] == [None, 2, None, None]
    with pytest.raises(ValueError, match="samples_kl_weight"):
        tiny_cadet_config(tmp_path, samples_kl_weight=-1.0)


def test_rollout_prefixes_are_shared_evenly_across_processes():
    """Each process gets as many prefixes (a sharded model's forward passes are collective), every prefix is someone's."""
    prefixes = RolloutPrefixes(prompts=list("abcde"), prompt_ids=[[0]] * 5, prefix_ids=[[i] for i in range(5)])
    for processes in (1, 2, 3):
        shares = [prefixes.share(rank, processes) for rank in range(processes)]
        assert len({len(share) for share in shares}) == 1
        assert {i for share in shares for (i,) in share.prefix_ids} == set(range(5))
        assert all(len(share.prompts) == len(share.prompt_ids) == len(share) for share in shares)
    assert prefixes.share(0, 1).to_dict() == prefixes.to_dict()
    assert len(RolloutPrefixes().share(1, 2)) == 0


def test_tied_head_starts_at_q_equal_p(tiny_llama):
    nado = NADOModel.from_lm(tiny_llama)
    nado.set_prior(0.8)
    hidden = torch.randn(2, 5, tiny_llama.config.hidden_size)
    r = nado(hidden, output_embeddings=tiny_llama.lm_head.weight)
    torch.testing.assert_close(torch.sigmoid(r), torch.full_like(r, 0.8))
    lm_logits = torch.randn(2, 5, tiny_llama.config.vocab_size)
    torch.testing.assert_close(target_logprobs(lm_logits, r), torch.log_softmax(lm_logits, -1))
    nado.set_prior(0.3)  # once set, the prior stays
    torch.testing.assert_close(torch.sigmoid(nado(hidden, output_embeddings=tiny_llama.lm_head.weight)), r.sigmoid())


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    return ((positive[:, None] > negative[None]).float() + 0.5 * (positive[:, None] == negative[None]).float()).mean()


def test_tied_head_generalises_to_unsampled_tokens_where_the_full_head_cannot(tiny_llama):
    """A constraint carried by a direction of the output embeddings (as toxicity is, roughly, in a real LM). Training
    samples use half of the vocabulary, held-out samples the other half, as a round's few hundred samples leave most of
    a real vocabulary unsampled. What the regulariser needs is `R` lower at a sequence's first violating token than at
    the benign tokens before it: only a head that shares strength across tokens can say so of tokens it never saw."""
    model = tiny_llama.eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(model.config.hidden_size, generator=generator)
    score = model.lm_head.weight.detach() @ direction
    bad = score > score.quantile(0.85)  # 15% of tokens violate the constraint
    tokens = torch.randperm(vocab - 10, generator=generator) + 10
    seen, unseen = tokens[: len(tokens) // 2], tokens[len(tokens) // 2 :]

    def samples(pool: torch.Tensor, n: int) -> Samples:
        out = Samples()
        for _ in range(n):
            completion = pool[torch.randint(len(pool), (4,), generator=generator)].tolist()
            out.prompt_ids.append([5, 6])
            out.completion_ids.append(completion)
            label = 0.0 if bad[completion].any() else 1.0
            out.scores.append(label)
            out.labels.append(label)
        return out

    train, heldout = samples(seen, 160), samples(unseen, 200)
    aucs = {}
    for head in ("tied", "full"):
        torch.manual_seed(0)
        nado = NADOModel.from_lm(model, head=head)
        optimizer = torch.optim.AdamW(nado.parameters(), lr=1e-3)  # the library's defaults
        train_nado(model, nado, optimizer, train, 0, epochs=4, batch_size=16, consistency_weight=1.0)
        benign, first_bad = [], []
        with torch.no_grad():
            for prompt, completion in zip(heldout.prompt_ids, heldout.completion_ids, strict=True):
                ids = torch.tensor([prompt + completion])
                hidden = model(ids, output_hidden_states=True).hidden_states[-1]
                r = nado(hidden, output_embeddings=model.lm_head.weight)[0]
                for t in range(len(prompt) - 1, ids.shape[1] - 1):
                    token = ids[0, t + 1].item()
                    if bad[token]:
                        first_bad.append(r[t, token].item())
                        break
                    benign.append(r[t, token].item())
        scores = torch.tensor(benign + first_bad)
        aucs[head] = _auc(scores, torch.tensor([1] * len(benign) + [0] * len(first_bad)))
    assert aucs["tied"] > 0.7, aucs
    assert aucs["tied"] > aucs["full"] + 0.2, aucs


def test_adaptive_lambda_reaches_the_target_satisfaction():
    """A toy in which the satisfaction grows with λ: dual ascent in log space settles on the target, from above and
    from below, and a step scales with λ."""

    def satisfaction(lam: float) -> float:
        return 1.0 - 0.5 * math.exp(-lam / 3.0)

    for start in (0.1, 100.0):
        lam = start
        for _ in range(60):
            lam = adaptive_lambda(lam, satisfaction(lam), target=0.9, lr=4.0)
        assert satisfaction(lam) == pytest.approx(0.9, abs=0.01), start
    assert adaptive_lambda(16.0, 0.8, 0.9, 4.0) / 16.0 == pytest.approx(adaptive_lambda(1.0, 0.8, 0.9, 4.0))
    assert adaptive_lambda(1e-3, 1.0, 0.0, 4.0) == 1e-3  # clipped

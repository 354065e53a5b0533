"""Reliability of CADETTrainer: bad input gets a clear error early, oracle failures are retried then dropped, resuming
reproduces the uninterrupted run, and a run killed with SIGKILL (tests/scripts/kill_run.py) resumes from its last
complete checkpoint. docs/reliability.md records what these tests showed."""

import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cadet_config
from datasets import Dataset, IterableDataset
from test_cadet_trainer import BAD_WORD, corpus, logged, no_bad_word
from tiny_llama import build_llama, build_tokenizer
from transformers import TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_cadet import CADETTrainer, NADOModel
from trl_cadet.checkpoints import NADO_DIR, STAGING_DIR, last_complete_checkpoint
from trl_cadet.data_utils import STREAMED_PROMPT_ROWS
from trl_cadet.oracles.base import check_scores


NO_MODEL = "no-such-org/no-such-model"  # an error raised with this model was raised before any model was loaded
KILL_SCRIPT = Path(__file__).parent / "scripts" / "kill_run.py"


def build(tmp_path, tokenizer, model=None, oracle=no_bad_word, train_dataset=None, **kwargs):
    kwargs.setdefault("oracle_retry_delay", 0.0)  # the tests of retries wait only where they check the wait
    # The oracle's calls here are the oracle phases' only; labelling corpus completions is tested in test_regulariser
    kwargs.setdefault("nado_corpus_samples", 0)
    extra = {k: kwargs.pop(k) for k in ("prompt_dataset", "nado_model", "data_collator") if k in kwargs}
    return CADETTrainer(
        model=model if model is not None else build_llama(tokenizer),
        oracle_funcs=oracle,
        args=tiny_cadet_config(tmp_path, **kwargs),
        train_dataset=train_dataset if train_dataset is not None else corpus(),
        processing_class=tokenizer,
        **extra,
    )


# Bad input: raised before the model is loaded or the corpus tokenized


@pytest.mark.parametrize(
    "train_dataset,prompt_dataset,match",
    [
        (
            [{"txt": "hello there"}],
            None,
            r"columns \['txt'\], none of which SFTTrainer can train on.*dataset_text_field",
        ),
        ([{"prompt": "hello there"}], None, r"'prompt' column but no 'completion' column.*`prompt_dataset=`"),
        (None, [{"question": "hello"}], r"Cannot find prompts .* prompt_dataset, whose columns are \['question'\]"),
        ([], None, r"`train_dataset` is empty"),
        (None, [], r"`prompt_dataset` is empty"),
        (None, [{"prompt": ""}], r"'prompt' column: every prompt is empty"),
        (
            [{"messages": [{"role": "user", "content": "hello"}]}],
            None,
            r"'messages' column: no conversation has an assistant turn",
        ),
        (None, [{"prompt": "hello there " * 200}], r"longer than `max_prompt_length=256` tokens.*Raise"),
        ([{"text": "hello there"}, {"text": None}], None, r"Row 1 of the train_dataset's 'text' column is None"),
        (None, [{"prompt": 7}], r"Row 0 of the prompt_dataset's 'prompt' column holds 7 \(int\).*a string or a list"),
        ([{"text": 7}], None, r"Row 0 of the train_dataset's 'text' column holds 7 \(int\).*needs a string"),
    ],
    ids=[
        "misnamed-column",
        "prompt-only-corpus",
        "prompt-column",
        "empty-corpus",
        "empty-prompts",
        "blank-prompts",
        "no-assistant-turn",
        "prompt-too-long",
        "none-row",
        "int-prompt",
        "int-text",
    ],
)
def test_bad_datasets_fail_before_the_model_is_loaded(tokenizer, tmp_path, train_dataset, prompt_dataset, match):
    def dataset(rows):
        return Dataset.from_list(rows) if rows else Dataset.from_dict({"text": []})

    with pytest.raises(ValueError, match=match):
        CADETTrainer(
            model=NO_MODEL,
            oracle_funcs=no_bad_word,
            args=tiny_cadet_config(tmp_path),
            train_dataset=corpus() if train_dataset is None else dataset(train_dataset),
            prompt_dataset=None if prompt_dataset is None else dataset(prompt_dataset),
            processing_class=tokenizer,
        )


def test_a_streamed_corpus_gives_prompts_from_its_first_rows(tokenizer, tmp_path, caplog):
    """A stream may never end: the constructor reads a bounded number of its rows for the oracle phase's prompts."""
    read = []

    def endless():
        for row in itertools.count():
            read.append(row)
            if row > 5000:
                raise RuntimeError("the constructor is reading the whole stream")
            yield {"text": f"row {row}: hello there, how are you today?"}

    stream = IterableDataset.from_generator(endless)
    with caplog.at_level(logging.WARNING):
        trainer = build(tmp_path, tokenizer, train_dataset=stream)
    assert len(trainer.prompts) == STREAMED_PROMPT_ROWS
    # and the corpus completions of the NADO model from the first rows too
    assert len(read) <= STREAMED_PROMPT_ROWS + trainer.args.nado_corpus_samples + 20
    assert "is streamed (an IterableDataset)" in caplog.text and "`prompt_dataset=`" in caplog.text


def test_a_custom_text_column_gives_the_prompts(tokenizer, tmp_path):
    texts = Dataset.from_list([{"content": "hello there, how are you today?"}] * 8)
    trainer = build(tmp_path, tokenizer, train_dataset=texts, dataset_text_field="content", corpus_prompt_length=3)
    assert trainer.prompts == [tokenizer.decode(tokenizer("hello there, how are you")["input_ids"][:3])] * 8


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    """SFTTrainer sets `pad = eos` when it builds the collator; CADET does the same with a custom collator."""
    for collator in (None, "custom"):
        tokenizer = build_tokenizer()
        tokenizer.pad_token = None
        data_collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.eos_token_id) if collator else None
        trainer = build(tmp_path, tokenizer, data_collator=data_collator, max_steps=2)
        assert tokenizer.pad_token == tokenizer.eos_token
        trainer.train()
        assert logged(trainer, "oracle/satisfaction")


def test_a_tokenizer_without_pad_or_eos_token_fails_first(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token.*Set `pad_token`"):
        CADETTrainer(
            model=NO_MODEL, oracle_funcs=no_bad_word, args=tiny_cadet_config(tmp_path), train_dataset=corpus(),
            processing_class=tokenizer,
        )  # fmt: skip


def test_a_nado_model_for_another_vocabulary_is_refused(tokenizer, tmp_path):
    other = NADOModel.from_lm(build_llama(build_tokenizer(vocab_size=300)))
    message = r"scores 300 tokens from 64-wide states, but the LM has 320 logits"
    with pytest.raises(ValueError, match=message):
        build(tmp_path, tokenizer, nado_model=other)
    other.save_pretrained(tmp_path / "nado")
    with pytest.raises(ValueError, match=message):
        build(tmp_path, tokenizer, nado_model_name_or_path=str(tmp_path / "nado"))
    with pytest.raises(ValueError, match=r"missing'` is not a folder. Pass the `nado/` folder"):
        build(tmp_path, tokenizer, nado_model_name_or_path=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(oracle_device="cpu"), r"`oracle_device` is used by the parallel schedule only"),
        (dict(round_schedule="parallel", oracle_device="gpu0"), r"not a device name"),
        (dict(lambda_schedule="adaptive", lambda_lr=0.0), r"never changes λ"),
        (dict(oracle_weights=[1.0, -1.0]), r"non-negative with a positive sum"),
        (dict(oracle_weights=[0.0]), r"non-negative with a positive sum"),
        (dict(oracle_threshold=1.5), r"`oracle_threshold` must be in \[0, 1\]"),
        (dict(round_schedule="later"), r"`round_schedule` must be one of"),
        (dict(nado_num_layers=1, packing=True), r"cannot tell packed sequences apart"),
        (dict(prompts_per_round=0), r"`prompts_per_round` must be at least 1"),
        (dict(cadet_min_p=1.0), r"`cadet_min_p` must be in \[0, 1\)"),
        (dict(cadet_safe_ratio=0.0), r"`cadet_safe_ratio` must be in \(0, 1\]"),
        (dict(cadet_demote_below=1.5), r"`cadet_demote_below` must be in \(0, 1\]"),
        (dict(cadet_demote_only=False, cadet_demote_below=0.8), "set `cadet_demote_only=True`"),
        (
            dict(regularized_corpus="unsatisfied", regularized_positions="samples"),
            r"`regularized_corpus='unsatisfied'` chooses among the training batch's completions",
        ),
        (
            dict(nado_corpus_labels="last", nado_consistency_weight=0.0),
            r"relies on the consistency term .* Set a positive `nado_consistency_weight`",
        ),
        (dict(nado_corpus_labels="first"), r"`nado_corpus_labels` must be one of 'all', 'last'"),
        (
            dict(lm_loss_weights="target", regularized_positions="samples"),
            r"covers no corpus token\. Set `regularized_positions` to 'corpus' or 'both'",
        ),
        (dict(lm_loss_weights="oracle"), r"`lm_loss_weights` must be one of 'uniform', 'target'"),
        (
            dict(filter_corpus=True, regularized_corpus="unsatisfied"),
            r"would cover none\. Leave `regularized_corpus='all'`, or set `filter_corpus=False`",
        ),
        (dict(unsatisfied_prompts_share=1.5), r"`unsatisfied_prompts_share` must be in \[0, 1\]"),
        (
            dict(unsatisfied_prompts_share=0.5, nado_corpus_samples=0),
            r"`nado_corpus_samples=0` labels none\. Set a positive `nado_corpus_samples`",
        ),
        (dict(samples_kl_steps=0), r"`samples_kl_steps` must be at least 1"),
        (
            dict(samples_kl_steps=4),
            r"`regularized_positions='corpus'` covers no sample\. Set `regularized_positions` to 'samples' or 'both'",
        ),
    ],
)
def test_contradictory_config_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_cadet_config(tmp_path, **overrides)


@pytest.mark.parametrize("how", ["packing", "padding_free", "streamed"])
def test_judging_the_corpus_completions_needs_rows_it_can_look_up(tokenizer, tmp_path, how):
    """`regularized_corpus="unsatisfied"` finds a batch row's example by its tokens: refused, before the model is
    loaded, where the rows are joined or cannot be looked up."""
    options = {how: True} if how != "streamed" else {}
    train_dataset = corpus().to_iterable_dataset() if how == "streamed" else corpus()
    with pytest.raises(ValueError, match=r"`regularized_corpus=.unsatisfied.` judges each completion.*'all'"):
        CADETTrainer(
            model=NO_MODEL,
            oracle_funcs=no_bad_word,
            args=tiny_cadet_config(tmp_path, regularized_corpus="unsatisfied", **options),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("how", ["streamed", "pre-tokenized", "token ids"])
def test_filtering_the_corpus_needs_examples_it_can_score(tokenizer, tmp_path, how):
    """`filter_corpus` scores every example before training: refused, before the model is loaded, for a stream (which
    may never end) and for token ids (no completion text to score)."""
    train_dataset = {
        "streamed": corpus().to_iterable_dataset(),
        "pre-tokenized": corpus(),
        "token ids": Dataset.from_list([{"input_ids": tokenizer("hello there")["input_ids"]}] * 8),
    }[how]
    options = {"dataset_kwargs": {"skip_prepare_dataset": True}} if how == "pre-tokenized" else {}
    with pytest.raises(ValueError, match=r"`filter_corpus=True` scores every completion .* set `filter_corpus=False`"):
        CADETTrainer(
            model=NO_MODEL,
            oracle_funcs=no_bad_word,
            args=tiny_cadet_config(tmp_path, filter_corpus=True, **options),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )


def test_filtering_away_the_whole_corpus_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"score every one of the \d+ corpus examples below `oracle_threshold=0.5`"):
        build(
            tmp_path,
            tokenizer,
            model=NO_MODEL,
            oracle=lambda prompts, completions, **kw: [0.0] * len(completions),
            filter_corpus=True,
        )


def test_oracle_weights_must_match_the_oracles(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"`oracle_weights` has 2 values for 1 oracles"):
        build(tmp_path, tokenizer, model=NO_MODEL, oracle_weights=[1.0, 1.0])


# Bad oracles: found at the first oracle phase, at step 0


@pytest.mark.parametrize(
    "scores,match",
    [
        (lambda n: [1.0] * (n - 1), r"ValueError: The oracle `oracle` returned \d+ scores for \d+ completions"),
        (lambda n: [2.0] * n, r"returned 2.0, outside \[0, 1\].*`1 - p`"),
        (lambda n: ["yes"] * n, r"TypeError: The oracle `oracle` returned 'yes' \(str\) as a score"),
        (lambda n: None, r"returned NoneType; it must return a list"),
        (lambda n: dict.fromkeys(range(n), 1.0), r"returned dict; it must return a list"),
        (lambda n: "10" * (n // 2), r"returned str; it must return a list"),
        (lambda n: ["0.3"] * n, r"returned '0.3' \(str\) as a score; each score must be a real number"),
        (lambda n: [None] * n, r"returned None or NaN for every completion"),
    ],
    ids=["wrong-count", "out-of-range", "not-a-number", "not-a-list", "dict", "string", "digit-strings", "all-none"],
)
def test_malformed_oracle_output_stops_training_at_the_first_phase(tokenizer, tmp_path, scores, match):
    def oracle(prompts, completions, **kwargs):
        return scores(len(completions))

    trainer = build(tmp_path, tokenizer, oracle=oracle)
    with pytest.raises(
        RuntimeError, match=r"No sample of the first oracle phase \(round 0\) could be labelled.*" + match
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_scores_of_every_real_number_type_are_accepted():
    n = 4
    expected = [1.0, 0.0, 0.5, None]
    for scores in (
        [True, False, 0.5, None],
        [1, 0, 0.5, math.nan],
        np.array([1.0, 0.0, 0.5, np.nan]),
        torch.tensor([1.0, 0.0, 0.5, math.nan]),
        [torch.tensor(1.0), np.int64(0), np.float32(0.5), None],
        (1.0, 0.0, 0.5, None),
    ):
        assert check_scores("oracle", scores, n) == expected, scores


def test_a_malformed_result_later_in_training_is_dropped_like_a_failure(tokenizer, tmp_path, caplog):
    calls = []

    def breaks_later(prompts, completions, **kwargs):
        calls.append(len(completions))
        scores = no_bad_word(prompts, completions)
        return scores if len(calls) == 1 else scores[:-1]  # from round 1 on, one score short

    trainer = build(tmp_path, tokenizer, oracle=breaks_later, max_steps=4, oracle_max_retries=1)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 4
    assert len(calls) == 1 + 2  # round 1 retried once
    assert logged(trainer, "oracle/dropped") == [0.0, 8.0]
    assert logged(trainer, "oracle/failures") == [0.0, 2.0]
    assert "failed 2 time(s) (ValueError: The oracle `breaks_later` returned 7 scores for 8" in caplog.text


def test_nan_and_none_scores_drop_their_samples(tokenizer, tmp_path):
    def oracle(prompts, completions, **kwargs):
        return [[math.nan, None, 1.0, 0.0][i % 4] for i in range(len(completions))]

    trainer = build(tmp_path, tokenizer, oracle=oracle)
    trainer.train()
    assert logged(trainer, "oracle/dropped") == [4.0, 4.0]  # 8 completions per phase, half without a verdict
    assert logged(trainer, "oracle/satisfaction") == [0.5, 0.5]
    assert trainer.state.global_step == 4


def test_an_oracle_that_never_works_stops_training_with_its_error(tokenizer, tmp_path):
    def broken(prompts, completions, **kwargs):  # a typical bug: conversational completions are lists of messages
        return [0.0 if BAD_WORD in c["content"] else 1.0 for c in completions]

    trainer = build(tmp_path, tokenizer, oracle=broken)
    with pytest.raises(RuntimeError, match=r"first oracle phase \(round 0\).*raised.*list indices must"):
        trainer.train()


def test_an_oracle_that_labels_everything_the_same_warns(tokenizer, tmp_path, caplog):
    trainer = build(tmp_path, tokenizer, oracle=lambda prompts, completions, **kw: [1.0] * len(completions))
    with caplog.at_level(logging.WARNING, logger="trl_cadet.cadet_trainer"):
        trainer.train()
    assert "got the label 1.0, so the NADO model has nothing to tell apart" in caplog.text
    assert "`oracle_threshold`" in caplog.text


# Oracle failures: retried, then dropped and counted


def test_a_flaky_oracle_is_retried_and_its_labels_kept(tokenizer, tmp_path):
    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) <= 2:
            raise ConnectionError("judge unavailable")
        return no_bad_word(prompts, completions)

    trainer = build(tmp_path, tokenizer, oracle=flaky, max_steps=2, oracle_max_retries=2)
    trainer.train()
    assert len(calls) == 3
    assert logged(trainer, "oracle/failures") == [2.0]
    assert logged(trainer, "oracle/dropped") == [0.0]
    assert len(trainer._latest_samples) == 8


def test_an_oracle_that_goes_down_drops_samples_and_training_goes_on(tokenizer, tmp_path, caplog):
    calls = []

    def goes_down(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) > 1:
            raise TimeoutError("judge timed out")
        return no_bad_word(prompts, completions)

    trainer = build(tmp_path, tokenizer, oracle=goes_down, max_steps=6, oracle_max_retries=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 6
    assert len(calls) == 1 + 2 * 2  # round 0 once, rounds 1 and 2 twice each (one retry)
    assert logged(trainer, "oracle/dropped") == [0.0, 8.0, 8.0]
    assert logged(trainer, "oracle/failures") == [0.0, 2.0, 2.0]
    assert logged(trainer, "oracle/calls")[-1] == 24.0
    assert "failed 2 time(s) (TimeoutError: judge timed out); dropping the 8 samples" in caplog.text
    assert "Every sample of the oracle phase of round 1 was dropped" in caplog.text
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_retries_back_off(tokenizer, tmp_path):
    times = []

    def warming_up(prompts, completions, **kwargs):
        times.append(time.monotonic())
        if len(times) <= 2:
            raise ConnectionError("judge is loading")
        return no_bad_word(prompts, completions)

    trainer = build(tmp_path, tokenizer, oracle=warming_up, max_steps=2, oracle_max_retries=2, oracle_retry_delay=0.2)
    trainer.train()
    assert len(times) == 3 and logged(trainer, "oracle/failures") == [2.0]
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # the delay doubles


def test_an_oracle_call_that_hangs_times_out_and_is_retried(tokenizer, tmp_path, caplog):
    release = threading.Event()
    calls = []

    def hangs_once(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) == 1:
            release.wait(30)  # a judge that never answers
        return no_bad_word(prompts, completions)

    trainer = build(tmp_path, tokenizer, oracle=hangs_once, max_steps=2, oracle_timeout=0.5)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING):
            trainer.train()
    finally:
        release.set()
    assert time.monotonic() - started < 20
    assert (
        len(calls) == 2 and logged(trainer, "oracle/failures") == [1.0] and logged(trainer, "oracle/dropped") == [0.0]
    )
    assert trainer.state.global_step == 2


def test_ctrl_c_stops_the_parallel_schedule_while_an_oracle_hangs(tokenizer, tmp_path):
    """Ctrl-C while round 1's background phase waits on a hung oracle: train() returns at once, checkpoint-2 is whole."""
    release = threading.Event()
    calls = []

    def hangs_in_round_1(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) > 1:
            release.wait(60)
        return no_bad_word(prompts, completions)

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                time.sleep(0.3)  # the background phase is waiting on the oracle by now
                os.kill(os.getpid(), signal.SIGINT)

    # Python keeps SIGINT ignored when it was started so (a background job of a non-interactive shell): take Ctrl-C's
    # default handler for this test, whatever launched the suite
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tokenizer, tmp_path, "parallel", oracle=hangs_in_round_1, callbacks=[CtrlC()])
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 40
    assert len(calls) == 2
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


# Resume


def _run(
    tokenizer, output_dir, schedule, resume=None, oracle=no_bad_word, callbacks=(), on_built=None, eval_dataset=None,
    **overrides,
):  # fmt: skip
    values = dict(
        round_schedule=schedule,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        lambda_schedule="adaptive",
        lambda_lr=2.0,
        target_satisfaction=0.99,
        nado_corpus_samples=0,  # the oracle's calls are the phases' only
    )
    values.update(overrides)
    trainer = CADETTrainer(
        model=build_llama(tokenizer),
        oracle_funcs=oracle,
        args=tiny_cadet_config(output_dir, **values),
        train_dataset=corpus(),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if on_built is not None:
        on_built(trainer)
    trainer.train(resume_from_checkpoint=resume)
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    lambdas = {e["step"]: e["cadet/lambda"] for e in trainer.state.log_history if "cadet/lambda" in e}
    return trainer, losses, lambdas


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_resume_at_a_round_boundary(tokenizer, tmp_path, schedule):
    """checkpoint-4 ends round 1: the resumed run starts round 2 with its oracle phase."""
    _, losses, lambdas = _run(tokenizer, tmp_path, schedule)
    resumed, resumed_losses, resumed_lambdas = _run(
        tokenizer, tmp_path, schedule, resume=str(tmp_path / "checkpoint-4")
    )
    for step in (5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5), step
        assert resumed_lambdas[step] == pytest.approx(lambdas[step]), step
    assert lambdas[5] != lambdas[1], "λ should move under the adaptive schedule"
    assert resumed.current_round == 2 and resumed.nado_source_round == 2  # parallel: installed at the end of training


def test_resume_with_a_background_phase_in_flight(tokenizer, tmp_path):
    """Parallel schedule, checkpoint-3 saved while round 1's oracle phase still runs in the background thread."""
    in_flight = {}

    def slow(prompts, completions, **kwargs):
        time.sleep(0.5)  # a remote judge: the two training steps of a round take less than this
        return no_bad_word(prompts, completions)

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # checkpoint-3 is saved right after this
                running = self.trainer._running_phase
                in_flight["at_save"] = running is not None and not running.done()

    record = Record()
    run = dict(oracle=slow, save_steps=3, callbacks=[record], on_built=lambda t: setattr(record, "trainer", t))
    _, losses, lambdas = _run(tokenizer, tmp_path, "parallel", **run)
    assert in_flight["at_save"], "the background phase had finished before the save; the test shows nothing"
    state = json.loads((tmp_path / "checkpoint-3" / "cadet_state.json").read_text())
    assert state["pending"]["round"] == 1 and (tmp_path / "checkpoint-3" / "nado_pending").is_dir()
    _, resumed_losses, resumed_lambdas = _run(
        tokenizer, tmp_path, "parallel", resume=str(tmp_path / "checkpoint-3"), **run
    )
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5), step
        assert resumed_lambdas[step] == pytest.approx(lambdas[step]), step


# Checkpoints are complete or absent


def test_checkpoints_are_published_whole_and_rotated(tokenizer, tmp_path):
    trainer, _, _ = _run(tokenizer, tmp_path, "sequential", save_total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]
    assert not (tmp_path / STAGING_DIR).exists()
    assert (tmp_path / "checkpoint-6" / "cadet_state.json").is_file()


def test_best_checkpoint_points_to_the_published_folder(tokenizer, tmp_path):
    trainer, _, _ = _run(
        tokenizer, tmp_path, "sequential", max_steps=4, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False, eval_dataset=corpus(8),
    )  # fmt: skip
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best).startswith("checkpoint-") and os.path.isdir(best)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert STAGING_DIR not in saved["best_model_checkpoint"]


def test_a_final_save_killed_halfway_is_refused_when_its_nado_model_is_loaded(tokenizer, tmp_path, monkeypatch):
    trainer = build(tmp_path / "run", tokenizer)
    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert NADOModel.from_pretrained(str(final), subfolder=NADO_DIR) is not None
    shutil.copytree(final / NADO_DIR, tmp_path / "nado-copy")  # a NADO folder copied away from its model loads
    # Killed after the model was written, before the NADO model: the model is new, nado/ is the previous save's
    monkeypatch.setattr(NADOModel, "save_pretrained", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(str(final))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not belong to the model saved in .*did not complete"):
        NADOModel.from_pretrained(str(final), subfolder=NADO_DIR)
    assert NADOModel.from_pretrained(str(tmp_path / "nado-copy")) is not None
    trainer.save_model(str(final))  # saving again makes the pair whole
    assert NADOModel.from_pretrained(str(final / NADO_DIR)) is not None


def test_resume_true_skips_an_incomplete_checkpoint(tokenizer, tmp_path, caplog):
    _run(tokenizer, tmp_path, "sequential", max_steps=4)
    # What an older version (or another trainer) left when killed while saving: a checkpoint without CADET state
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "Skipping" in caplog.text and "checkpoint-5" in caplog.text
    trainer, _, _ = _run(tokenizer, tmp_path, "sequential", max_steps=6, resume=True)
    assert trainer.state.global_step == 6


def test_a_corrupt_checkpoint_is_skipped_or_named(tokenizer, tmp_path, caplog):
    """The newest checkpoint is broken in turn in each way a kill or a disk can break it: `True` resumes from the last
    intact one with a warning naming what is wrong; the broken path itself gives an error naming the file."""
    trainer, _, _ = _run(tokenizer, tmp_path, "sequential", max_steps=4)
    newest = tmp_path / "checkpoint-6"

    def truncate(path):
        path.write_bytes(path.read_bytes()[:100])

    corruptions = {
        "nado/model.safetensors is corrupt": lambda: truncate(newest / "nado" / "model.safetensors"),
        "no nado/config.json": lambda: shutil.rmtree(newest / "nado"),
        "cadet_state.json cannot be read": lambda: (newest / "cadet_state.json").write_text('{"cadet_lambda": 1'),
        "cadet_state.json lacks ['latest_samples'": lambda: (newest / "cadet_state.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((newest / "cadet_state.json").read_text()).items()
                    if k != "latest_samples"
                }
            )
        ),
        "no optimizer.pt": lambda: (newest / "optimizer.pt").unlink(),
        "no scheduler.pt": lambda: (newest / "scheduler.pt").unlink(),
        "no rng_state.pth": lambda: (newest / "rng_state.pth").unlink(),
    }
    for what, corrupt in corruptions.items():
        shutil.copytree(tmp_path / "checkpoint-4", newest)
        corrupt()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4"), what
        assert f"Skipping {newest}" in caplog.text and what in caplog.text
        with pytest.raises(ValueError, match=f"Cannot resume from {re.escape(str(newest))}: .*{re.escape(what)}"):
            trainer.train(resume_from_checkpoint=str(newest))
        shutil.rmtree(newest)
    with pytest.raises(ValueError, match=r"checkpoint-9'` does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-9"))


def test_resuming_with_changed_arguments_uses_them_and_warns(tokenizer, tmp_path, caplog):
    _run(tokenizer, tmp_path, "sequential", max_steps=4, lambda_schedule="constant", cadet_lambda=1.0)
    with caplog.at_level(logging.WARNING):
        _, _, lambdas = _run(
            tokenizer, tmp_path, "sequential", resume=str(tmp_path / "checkpoint-2"), max_steps=4,
            lambda_schedule="constant", cadet_lambda=2.0, steps_per_round=3,
        )  # fmt: skip
    assert lambdas[3] == lambdas[4] == 2.0
    assert "`cadet_lambda` is 2.0 but the checkpoint trained with λ = 1.0" in caplog.text
    assert "`steps_per_round` changed from 2 to 3" in caplog.text


def test_resuming_warns_when_filtering_keeps_other_examples(tokenizer, tmp_path, caplog):
    """With `filter_corpus` the checkpoint records which examples the LM loss learned; a resumed run whose own filtering
    keeps others (an oracle that changed its mind, or the option switched) warns, and one that keeps the same does not."""
    strict = False  # once set, the oracle also rejects "thank you for asking"

    def moody(prompts, completions, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        return [0.0 if BAD_WORD in text or (strict and "thank" in text) else 1.0 for text in texts]

    _run(tokenizer, tmp_path, "sequential", oracle=moody, max_steps=2, filter_corpus=True)
    checkpoint = str(tmp_path / "checkpoint-2")
    strict = True
    resumes = {
        "the 16 of 48 the oracles keep now": dict(oracle=moody),
        "the whole corpus (`filter_corpus=False`)": dict(filter_corpus=False),
        None: {},
    }
    for expected, options in resumes.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _run(
                tokenizer, tmp_path, "sequential", resume=checkpoint, max_steps=3, **{"filter_corpus": True, **options}
            )
        if expected is None:
            assert "corpus examples the oracles then kept" not in caplog.text
        else:
            assert "The checkpoint trained on the 32 of 48 corpus examples the oracles then kept" in caplog.text
            assert expected in caplog.text


# A real process killed with SIGKILL


def _start(output_dir: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    log = open(output_dir.parent / f"{mode}.log", "w")
    return subprocess.Popen([sys.executable, str(KILL_SCRIPT), str(output_dir), mode], env=env, stdout=log, stderr=log)


def test_a_run_killed_in_the_oracle_phase_or_while_saving_resumes(tmp_path):
    """Kill -9 one run inside its third oracle phase and another half-way through writing checkpoint-4; a new process
    then resumes each with `resume_from_checkpoint=True` and finishes."""
    runs = {mode: tmp_path / mode / "out" for mode in ("oracle", "save")}
    for out in runs.values():
        out.parent.mkdir()
    processes = {mode: _start(out, mode) for mode, out in runs.items()}
    try:
        deadline = time.monotonic() + 240
        for mode, process in processes.items():
            marker = runs[mode].parent / "marker"
            while not marker.exists():
                assert process.poll() is None, (runs[mode].parent / f"{mode}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"the {mode} run never reached its kill point"
                time.sleep(0.2)
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()

    # Killed in the oracle phase of round 2: checkpoint-4 is complete
    assert last_complete_checkpoint(str(runs["oracle"])) == str(runs["oracle"] / "checkpoint-4")
    # Killed while writing checkpoint-4: it never appeared; its parts are in the staging folder
    assert not (runs["save"] / "checkpoint-4").exists()
    assert (runs["save"] / STAGING_DIR / "checkpoint-4" / "trainer_state.json").is_file()
    assert last_complete_checkpoint(str(runs["save"])) == str(runs["save"] / "checkpoint-2")

    resumes = {mode: _start(out, "resume") for mode, out in runs.items()}
    for mode, process in resumes.items():
        assert process.wait(timeout=240) == 0, (runs[mode].parent / "resume.log").read_text()[-3000:]
    results = {mode: json.loads((out.parent / "result.json").read_text()) for mode, out in runs.items()}
    assert results["oracle"]["steps_run"] == [5, 6]
    assert results["save"]["steps_run"] == [3, 4, 5, 6]
    for mode, out in runs.items():
        assert results[mode]["global_step"] == 6 and results[mode]["round"] == 2
        assert (out / "checkpoint-6" / "cadet_state.json").is_file()
        assert not (out / STAGING_DIR).exists()


# Security


def test_the_sft_baseline_of_the_example_keeps_no_hub_token(tmp_path, monkeypatch):
    """The baseline's config is pickled whole into its `training_args.bin`: the token must not be in it."""
    from run_demo import sft_config

    training_args = tiny_cadet_config(tmp_path, hub_token="hf_secret")
    baseline = sft_config(training_args, str(tmp_path / "sft"))
    assert baseline.hub_token is None and not baseline.push_to_hub
    assert baseline.learning_rate == training_args.learning_rate

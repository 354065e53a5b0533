"""CADETTrainer on tiny models from config: both schedules, LoRA and QLoRA, resume, and the method's effect."""

import threading
import time

import pytest
import torch
from conftest import tiny_cadet_config
from datasets import Dataset
from transformers import TrainerCallback

from trl_cadet import CADETTrainer, NADOModel
from trl_cadet.decoding import NADOLogitsProcessor
from trl_cadet.nado import target_logprobs
from trl_cadet.oracle_phase import Samples


BAD_WORD = "idiot"
REPLIES = ["good morning, how are you", "thank you for asking", f"you are an {BAD_WORD}"]


def corpus(n: int = 48) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "hello there"},
                    {"role": "assistant", "content": REPLIES[i % len(REPLIES)]},
                ]
            }
            for i in range(n)
        ]
    )


def no_bad_word(prompts, completions, **kwargs):
    """Toy oracle: satisfied unless the completion contains the bad word."""
    return [0.0 if BAD_WORD in c[-1]["content"] else 1.0 for c in completions]


def nado_trained(nado) -> bool:
    """Whether a tied NADO head left its initial state: the prior set from labels and the token side learned."""
    return bool(nado.prior_is_set) and nado.key.abs().sum() > 0


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


EXPECTED_METRICS = [
    "loss",
    "cadet/lm_loss",
    "cadet/kl",
    "cadet/lambda",
    "oracle/satisfaction",
    "oracle/mean_score",
    "oracle/dropped",
    "oracle/calls",
    "oracle/samples_per_second",
    "nado/bce",
    "nado/consistency",
    "nado/accuracy",
    "time/oracle_phase",
    "time/generation",
    "time/labelling",
    "time/nado_training",
    "time/finetune_phase",
    "time/round",
    "round",
]


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_training_changes_parameters_and_logs_every_metric(tokenizer, tiny_llama, tmp_path, schedule):
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, round_schedule=schedule, max_steps=6),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not change"
    assert nado_trained(trainer.nado), "the NADO model was never trained"
    for key in EXPECTED_METRICS:
        assert logged(trainer, key), f"{key} was not logged"
    assert trainer.current_round == 2
    # Every round is timed and every oracle phase logged, the last ones included (logging_steps=1: one entry each)
    assert len(logged(trainer, "time/round")) == 3
    assert len(logged(trainer, "time/oracle_phase")) == 3


@pytest.mark.parametrize("schedule,lag", [("sequential", 0), ("parallel", 1)])
def test_nado_staleness_per_schedule(tokenizer, tiny_llama, tmp_path, schedule, lag):
    """Sequential: round k uses the NADO trained on round k's policy. Parallel: on round k-1's (k >= 1)."""
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((trainer.current_round, trainer.nado_source_round))

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, round_schedule=schedule, max_steps=8),
        train_dataset=corpus(),
        processing_class=tokenizer,
        callbacks=[Record()],
    )
    trainer.train()
    assert [r for r, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    for round_index, source in seen:
        assert source == max(round_index - lag, 0)


@pytest.mark.parametrize("schedule, warm_start", [("sequential", True), ("sequential", False), ("parallel", False)])
def test_nado_warm_start_or_each_phase_from_the_start(
    tokenizer, tiny_llama, tmp_path, monkeypatch, schedule, warm_start
):
    """Warm start: each oracle phase trains on from the last phase's NADO weights and AdamW state. Without it, every
    phase starts from the initial NADO model with an empty AdamW state."""
    from trl_cadet import oracle_phase

    phases, train_nado = [], oracle_phase.train_nado

    def recording(policy, nado, optimizer, *args, **kwargs):
        start = {k: v.clone() for k, v in nado.state_dict().items()}
        optimizer_state = len(optimizer.state)
        metrics = train_nado(policy, nado, optimizer, *args, **kwargs)
        phases.append((start, optimizer_state, {k: v.clone() for k, v in nado.state_dict().items()}))
        return metrics

    monkeypatch.setattr(oracle_phase, "train_nado", recording)
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, round_schedule=schedule, max_steps=6, nado_warm_start=warm_start),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(phases) == 3
    initial = phases[0][0]
    for (start, optimizer_state, _), (_, _, last) in zip(phases[1:], phases, strict=False):
        assert any(not torch.equal(last[k], initial[k]) for k in initial), "the last phase should have trained it"
        same_as = last if warm_start else initial
        assert all(torch.equal(start[k], same_as[k]) for k in initial)
        assert (optimizer_state > 0) == warm_start


@pytest.mark.parametrize("labels", ["all", "last"])
def test_corpus_completions_reach_nado_training_labelled_where_the_config_says(
    tokenizer, tiny_llama, tmp_path, monkeypatch, labels
):
    """`nado_corpus_labels="last"`: every phase trains the NADO model on the labelled corpus completions, which come
    first among its extra samples (before any rollout), at their last token only."""
    from trl_cadet import oracle_phase

    seen, train_nado = [], oracle_phase.train_nado

    def recording(*args, **kwargs):
        seen.append((len(kwargs["extra_samples"]), kwargs["last_labels_only"]))
        return train_nado(*args, **kwargs)

    monkeypatch.setattr(oracle_phase, "train_nado", recording)
    args = tiny_cadet_config(tmp_path, max_steps=4, nado_corpus_labels=labels, nado_corpus_rollouts=True)
    trainer = CADETTrainer(
        model=tiny_llama, oracle_funcs=no_bad_word, args=args, train_dataset=corpus(), processing_class=tokenizer
    )
    trainer.train()
    corpus_samples = len(trainer._corpus_samples)
    assert corpus_samples > 0 and len(seen) == 2
    for extra, last_only in seen:
        assert extra >= corpus_samples
        assert last_only == (corpus_samples if labels == "last" else 0)


def test_parallel_schedule_overlaps_the_two_phases(tokenizer, tiny_llama, tmp_path):
    """The oracle phase runs in another thread while optimisation steps go on."""
    oracle_windows, step_times = [], []

    def slow_oracle(prompts, completions, **kwargs):
        start = time.perf_counter()
        time.sleep(1.0)  # a remote judge
        oracle_windows.append((threading.current_thread().name, start, time.perf_counter()))
        return no_bad_word(prompts, completions)

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter())

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=slow_oracle,
        args=tiny_cadet_config(tmp_path, round_schedule="parallel", max_steps=12, steps_per_round=6),
        train_dataset=corpus(),
        processing_class=tokenizer,
        callbacks=[Record()],
    )
    trainer.train()
    background = [(start, end) for name, start, end in oracle_windows if name.startswith("cadet-oracle")]
    assert background, "no oracle phase ran in the background thread"
    overlapping = [t for t in step_times for start, end in background if start < t < end]
    assert overlapping, "no optimisation step happened while the background oracle phase ran"


def _sft_warm_start(tokenizer, tiny_llama, tmp_path):
    """A tiny LM that has learnt the corpus, bad word included, so the oracle sees violations to learn from."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(
            tmp_path / "warm", cadet_lambda=0.0, max_steps=40, steps_per_round=40, learning_rate=1e-2
        ),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer.model


def _bad_word_rate(model, tokenizer, n=64, seed=123):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer([prompt] * n, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(**inputs, do_sample=True, max_new_tokens=10, top_k=0, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(BAD_WORD in t for t in texts) / n


def test_cadet_lowers_the_penalised_word_versus_plain_sft(tokenizer, tiny_llama, tmp_path):
    warm = _sft_warm_start(tokenizer, tiny_llama, tmp_path)
    state = {k: v.clone() for k, v in warm.state_dict().items()}
    base_rate = _bad_word_rate(warm, tokenizer)
    assert base_rate > 0.1, "the warm start should say the bad word sometimes, or the test shows nothing"

    rates = {}
    for lam in (0.0, 4.0):
        warm.load_state_dict(state)
        trainer = CADETTrainer(
            model=warm,
            oracle_funcs=no_bad_word,
            args=tiny_cadet_config(
                tmp_path / f"lambda-{lam}",
                cadet_lambda=lam,
                max_steps=24,
                steps_per_round=8,
                learning_rate=1e-3,
                prompts_per_round=8,
                num_generations=8,
                nado_epochs=4,
            ),
            train_dataset=corpus(),
            processing_class=tokenizer,
        )
        trainer.train()
        rates[lam] = _bad_word_rate(trainer.model, tokenizer)
    print("bad-word rate by lambda:", rates, "warm start:", base_rate)
    assert rates[4.0] < 0.5 * rates[0.0], rates


def test_lm_loss_weighted_by_the_target_learns_the_penalised_word_less(tokenizer, tmp_path):
    """λ = 0, so Ω moves nothing: with `lm_loss_weights="target"` the corpus's bad word, which the NADO model learns
    from the corpus's labels to be unsafe, weighs less in the LM loss than the words around it, and the LM learns to
    say it less than plain SFT does from the same start, data and seed."""
    from tiny_llama import build_llama

    rates, weights = {}, {}
    for mode in ("uniform", "target"):
        trainer = CADETTrainer(
            model=build_llama(tokenizer),
            oracle_funcs=no_bad_word,
            args=tiny_cadet_config(
                tmp_path / mode,
                cadet_lambda=0.0,
                lm_loss_weights=mode,
                max_steps=40,
                steps_per_round=10,
                learning_rate=1e-2,
                nado_epochs=4,
            ),
            train_dataset=corpus(),
            processing_class=tokenizer,
        )
        trainer.train()
        rates[mode] = _bad_word_rate(trainer.model, tokenizer)
        weights[mode] = logged(trainer, "cadet/lm_weight")
    print("bad-word rate:", rates, "mean LM weight at Ω's positions:", weights["target"])
    assert not weights["uniform"] and weights["target"] and min(weights["target"]) < 1
    assert rates["uniform"] > 0.1, "plain SFT should learn the bad word, or the test shows nothing"
    assert rates["target"] < 0.5 * rates["uniform"], rates


def test_lora_trains_adapters_only(tokenizer, tiny_llama, tmp_path):
    from peft import LoraConfig

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path),
        train_dataset=corpus(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), changed
    assert any("lora_B" in n for n in changed)
    assert logged(trainer, "nado/bce")


def test_qlora_4bit_on_cpu(tokenizer, tiny_llama_path, tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    trainer = CADETTrainer(
        model=tiny_llama_path,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path),
        train_dataset=corpus(),
        processing_class=tokenizer,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert getattr(trainer.model, "is_loaded_in_4bit", False) or trainer.model.get_base_model().is_loaded_in_4bit
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert lora and any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)
    assert nado_trained(trainer.nado)


@pytest.mark.parametrize(
    "schedule, positions, variant",
    [("sequential", "corpus", None), ("parallel", "corpus", None), ("parallel", "samples", None)]
    + [("sequential", "corpus", "bound"), ("sequential", "corpus", "no warm start")]
    + [("sequential", "corpus", "unsatisfied corpus"), ("sequential", "corpus", "corpus violations")],
)
def test_resume_gives_the_same_next_losses_and_lambda(tokenizer, tmp_path, schedule, positions, variant):
    from tiny_llama import build_llama

    bound = variant == "bound"
    # With the bound measured every 4th step, the checkpoint at step 3 holds the factor that step 3 (resumed) reuses
    options = (
        dict(cadet_lambda=50.0, cadet_max_grad_ratio=0.5, cadet_grad_ratio_steps=4, steps_per_round=4) if bound else {}
    )
    if variant == "no warm start":  # the resumed run trains its next NADO model from the same initial one
        options["nado_warm_start"] = False
    judged = {"unsatisfied corpus": "unsatisfied", "corpus violations": "violations"}
    if variant in judged:  # the resumed run knows the corpus completions judged before the checkpoint
        options["regularized_corpus"] = judged[variant]

    def run(output_dir, resume=None):
        trainer = CADETTrainer(
            # With dropout: in the parallel schedule the background sampling must not share the training thread's RNG
            model=build_llama(tokenizer, attention_dropout=0.2),
            oracle_funcs=no_bad_word,
            args=tiny_cadet_config(
                output_dir,
                round_schedule=schedule,
                max_steps=8,
                save_strategy="steps",
                save_steps=3,
                lambda_schedule="adaptive",
                lambda_lr=2.0,
                target_satisfaction=0.99,
                regularized_positions=positions,
                **options,
            ),
            train_dataset=corpus(),
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=resume)
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        lambdas = {e["step"]: e["cadet/lambda"] for e in trainer.state.log_history if "cadet/lambda" in e}
        return trainer, losses, lambdas

    full, losses, lambdas = run(tmp_path / "full")
    resumed, resumed_losses, resumed_lambdas = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-3"))
    # Bit for bit, in the parallel schedule too: its background phase runs on a snapshot that shares nothing with the
    # model being trained and samples through an RNG of its own (with Ω on the samples, the background phase's samples
    # enter the loss)
    for step in range(4, 9):
        assert resumed_losses[step] == losses[step], step
        assert resumed_lambdas[step] == lambdas[step], step
    assert len(set(lambdas.values())) > 1, "λ should move under the adaptive schedule"
    assert resumed.oracle_calls == full.oracle_calls
    if bound:
        scales = [e["cadet/omega_scale"] for e in resumed.state.log_history if "cadet/omega_scale" in e]
        assert min(scales) < 1.0, "the bound should bind"


def test_save_model_writes_nado_and_model_card(tokenizer, tiny_llama, tmp_path):
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    nado = NADOModel.from_pretrained(str(tmp_path), subfolder="nado")  # as the model card says
    for name, tensor in nado.state_dict().items():
        torch.testing.assert_close(tensor, trainer.nado.state_dict()[name].cpu())
    card = (tmp_path / "README.md").read_text()  # written by save_model itself, not only on a Hub push
    assert "cadet" in card and "2410.05559" in card
    assert "## CADET" in card and "oracles: no_bad_word" in card and 'subfolder="nado"' in card
    trainer.save_model(str(tmp_path / "final"))  # a final model saved elsewhere gets the card too
    assert "## CADET" in (tmp_path / "final" / "README.md").read_text()


def test_guided_decoding_processor_follows_q_and_avoids_a_forbidden_token(tokenizer, tiny_llama):
    nado = NADOModel.from_lm(tiny_llama, head="full")
    forbidden = tokenizer.convert_tokens_to_ids("<|end|>")
    with torch.no_grad():
        nado.head.weight.normal_(std=0.5)
        nado.head.bias[forbidden] = -30.0  # R ≈ 0 for this token whatever the context
    prompt = tokenizer(["hello there"] * 16, return_tensors="pt")

    with torch.no_grad():
        outputs = tiny_llama(**prompt, output_hidden_states=True)
    processor = NADOLogitsProcessor(tiny_llama, nado)
    try:
        with torch.no_grad():
            tiny_llama(**prompt)  # the hook captures the states of this forward pass
            scores = processor(prompt["input_ids"], outputs.logits[:, -1])
        expected = target_logprobs(outputs.logits[:, -1], nado(outputs.hidden_states[-1])[:, -1])
        torch.testing.assert_close(torch.log_softmax(scores, -1), expected, atol=1e-5, rtol=1e-5)

        # Make the forbidden token likely, then check guided sampling never emits it
        with torch.no_grad():
            tiny_llama.lm_head.bias = None
            tiny_llama.lm_head.weight[forbidden] += 5.0 * tiny_llama.lm_head.weight.abs().mean()
        kwargs = dict(do_sample=True, max_new_tokens=12, top_k=0, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        plain = tiny_llama.generate(**prompt, **kwargs)
        torch.manual_seed(0)
        guided = tiny_llama.generate(**prompt, logits_processor=[processor], **kwargs)
    finally:
        processor.remove()
    new = prompt["input_ids"].shape[1]
    assert (plain[:, new:] == forbidden).any()
    assert not (guided[:, new:] == forbidden).any()


def trainer_with_a_nado(model, tokenizer, args) -> CADETTrainer:
    """A trainer whose NADO model is installed and scores tokens differently (R depends on the token), so that Ω is not
    zero before any oracle phase."""
    trainer = CADETTrainer(
        model=model, oracle_funcs=no_bad_word, args=args, train_dataset=corpus(), processing_class=tokenizer
    )
    with torch.no_grad():
        for param in trainer.nado.parameters():
            param.add_(0.5 * torch.randn_like(param))
    trainer.nado_source_round = 0
    return trainer


@pytest.mark.parametrize("positions", ["corpus", "samples"])
def test_the_lm_head_shortcut_gives_the_plain_forward_loss(tokenizer, tiny_llama, tmp_path, positions):
    """After the first batch, only the trained positions go through the LM head; the loss must not change."""
    trainer = trainer_with_a_nado(tiny_llama, tokenizer, tiny_cadet_config(tmp_path, regularized_positions=positions))
    if positions == "samples":
        prompts = tokenizer(["hello there"] * 4)["input_ids"]
        trainer._latest_samples = Samples(prompts, [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], [1.0] * 4, [1.0] * 4)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._head_gives_logits = False  # the plain forward, everywhere
    plain = trainer.compute_loss(trainer.model, batch)
    trainer._head_gives_logits = None
    trainer.compute_loss(trainer.model, batch)  # checks the head on this batch
    assert trainer._head_gives_logits is True
    shortcut = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(shortcut, plain, rtol=1e-5, atol=1e-6)
    assert logged_metric(trainer, "cadet/kl" if positions == "corpus" else "cadet/kl_samples") > 0


def test_omega_on_unsatisfied_samples_covers_those_only(tokenizer, tiny_llama, tmp_path):
    """`regularized_samples="unsatisfied"`: sample Ω equals Ω over the unsatisfied samples alone, and is skipped
    when a round has none."""
    args = tiny_cadet_config(
        tmp_path, regularized_positions="samples", regularized_samples="unsatisfied", samples_per_step=8
    )
    trainer = trainer_with_a_nado(tiny_llama, tokenizer, args)
    trainer.model.eval()  # no dropout: the three forward passes must see the same function
    prompts = tokenizer(["hello there"] * 4)["input_ids"]
    completions = [[5, 6, 7], [8, 9], [10, 11], [12, 13, 14]]
    scores = [0.9, 0.1, 0.8, 0.2]  # the second and the fourth are unsatisfied
    trainer._latest_samples = Samples(prompts, completions, scores, scores)
    with torch.no_grad():
        chosen = trainer._samples_kl(trainer.model)
        trainer.args.regularized_samples = "all"
        trainer._latest_samples = Samples(prompts[1::2], completions[1::2], scores[1::2], scores[1::2])
        alone = trainer._samples_kl(trainer.model)
        trainer._latest_samples = Samples(prompts, completions, scores, scores)
        everything = trainer._samples_kl(trainer.model)
    torch.testing.assert_close(chosen.mean(), alone.mean())
    assert chosen.mean() > 0 and not torch.allclose(chosen.mean(), everything.mean())

    trainer.args.regularized_samples = "unsatisfied"
    trainer._latest_samples = Samples(prompts[::2], completions[::2], scores[::2], scores[::2])
    assert trainer._samples_kl(trainer.model) is None
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch)
    assert "cadet/kl_samples" not in trainer._metrics["train"]


def test_omega_on_violations_is_the_kl_at_the_first_violating_token_only(tokenizer, tiny_llama, tmp_path):
    """`regularized_samples="violations"`: one KL per sample whose first violation was found, the one at the position
    that predicts the violating token; none when no violation was found."""
    args = tiny_cadet_config(
        tmp_path, regularized_positions="samples", regularized_samples="violations", samples_per_step=8
    )
    trainer = trainer_with_a_nado(tiny_llama, tokenizer, args)
    trainer.model.eval()  # no dropout: the forward passes must see the same function
    prompts = tokenizer(["hello there"] * 4)["input_ids"]
    completions = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    scores = [0.9, 0.1, 0.8, 0.2]
    with torch.no_grad():
        # the second sample breaks the constraint at its third token, the fourth at its second
        trainer._latest_samples = Samples(prompts, completions, scores, scores, violations=[None, 3, None, 2])
        chosen = trainer._samples_kl(trainer.model)
        trainer.args.regularized_samples = "all"
        every_token = []
        for i in (1, 3):
            trainer._latest_samples = Samples(prompts[i : i + 1], completions[i : i + 1], scores[i : i + 1], [0.0])
            every_token.append(trainer._samples_kl(trainer.model))
    assert chosen.shape == (2,) and [len(kl) for kl in every_token] == [4, 3]
    expected = torch.stack([every_token[0][2], every_token[1][1]])
    torch.testing.assert_close(chosen.sort().values, expected.sort().values)
    assert not torch.allclose(every_token[0][2], every_token[0][1]) and not torch.allclose(
        every_token[1][1], every_token[1][2]
    )

    trainer.args.regularized_samples = "violations"
    trainer._latest_samples = Samples(prompts, completions, scores, scores)  # not searched
    assert trainer._samples_kl(trainer.model) is None


def one_step_with_four_samples(tokenizer, tiny_llama, tmp_path, **config):
    """A trainer with a NADO model, four satisfied samples of ten completion tokens in all, one training batch and
    its loss, with `regularized_positions="both"`."""
    args = tiny_cadet_config(tmp_path, regularized_positions="both", samples_per_step=4, **config)
    trainer = trainer_with_a_nado(tiny_llama, tokenizer, args)
    prompts = tokenizer(["hello there"] * 4)["input_ids"]
    trainer._latest_samples = Samples(prompts, [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], [1.0] * 4, [1.0] * 4)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    corpus, samples = logged_metric(trainer, "cadet/kl"), logged_metric(trainer, "cadet/kl_samples")
    assert corpus > 0 and samples > 0
    return trainer, batch, loss.item() - logged_metric(trainer, "cadet/lm_loss"), corpus, samples


def test_samples_kl_weight_adds_the_samples_mean_to_the_corpus_mean(tokenizer, tiny_llama, tmp_path):
    """With `samples_kl_weight` w, Ω is the corpus positions' mean KL plus w times the samples' (not one mean)."""
    lam, weight = 4.0, 0.5
    _, _, regulariser, corpus, samples = one_step_with_four_samples(
        tokenizer, tiny_llama, tmp_path, cadet_lambda=lam, samples_kl_weight=weight
    )
    assert regulariser == pytest.approx(lam * (corpus + weight * samples), rel=1e-4)


def test_samples_kl_steps_runs_the_samples_pass_every_kth_step_weighted_k_times(tokenizer, tiny_llama, tmp_path):
    """`samples_kl_steps` k: the samples' extra pass runs at every k-th optimisation step only, where their KL counts
    k times (here through `samples_kl_weight`), so that they weigh as much over k steps as when run every step."""
    lam, weight, every = 4.0, 0.5, 3
    trainer, batch, regulariser, corpus, samples = one_step_with_four_samples(
        tokenizer, tiny_llama, tmp_path, cadet_lambda=lam, samples_kl_weight=weight, samples_kl_steps=every
    )
    assert regulariser == pytest.approx(lam * (corpus + every * weight * samples), rel=1e-4)
    passes = []
    original = trainer._samples_kl
    trainer._samples_kl = lambda model: passes.append(trainer.state.global_step) or original(model)
    for step in range(1, 7):
        trainer.state.global_step = step
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        if step % every:  # no pass: Ω is the corpus's alone
            assert "cadet/kl_samples" not in trainer._metrics["train"]
            corpus = logged_metric(trainer, "cadet/kl")
            assert loss.item() - logged_metric(trainer, "cadet/lm_loss") == pytest.approx(lam * corpus, rel=1e-4)
    assert passes == [3, 6]


def test_omega_is_one_mean_over_the_corpus_and_sample_positions(tokenizer, tiny_llama, tmp_path):
    """With `regularized_positions="both"`, Ω is the mean KL over the corpus's and the samples' positions together
    (METHOD.md), not the sum of the two means."""
    lam = 4.0
    trainer, batch, regulariser, corpus, samples = one_step_with_four_samples(
        tokenizer, tiny_llama, tmp_path, cadet_lambda=lam
    )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = trainer._trained_logits(trainer.model, inputs, batch["labels"])[4]
    corpus_positions = trainer._omega_positions(batch["input_ids"], mask).sum().item()
    sample_positions = 10  # every completion token of the four samples
    assert corpus_positions > 0
    omega = (corpus_positions * corpus + sample_positions * samples) / (corpus_positions + sample_positions)
    assert regulariser == pytest.approx(lam * omega, rel=1e-4)


def test_max_grad_ratio_scales_the_regulariser_to_that_share_of_the_lm_gradient(tokenizer, tiny_llama, tmp_path):
    """`cadet_max_grad_ratio` r: the step's gradient is `∇LM + s ∇(λΩ)` with `s = min(1, r |∇LM| / |∇(λΩ)|)`, so
    that the regulariser's part is at most r times the LM loss's in norm; with a loose bound nothing changes."""
    args = tiny_cadet_config(tmp_path, cadet_lambda=200.0)
    trainer = trainer_with_a_nado(tiny_llama, tokenizer, args)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def gradient(lam, ratio=None):
        trainer.cadet_lambda, trainer.args.cadet_max_grad_ratio = lam, ratio
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        return torch.cat([p.grad.flatten() for p in params])

    lm, both = gradient(0.0), gradient(200.0)
    omega = both - lm
    assert omega.norm() > lm.norm()  # the bound below binds
    bounded = gradient(200.0, ratio=0.25)
    scale = 0.25 * lm.norm() / omega.norm()
    torch.testing.assert_close(bounded, lm + scale * omega, rtol=1e-4, atol=1e-6)
    assert logged_metric(trainer, "cadet/omega_scale") == pytest.approx(scale.item(), rel=1e-4)
    assert logged_metric(trainer, "cadet/grad_ratio") == pytest.approx((omega.norm() / lm.norm()).item(), rel=1e-4)
    torch.testing.assert_close(gradient(200.0, ratio=1e6), both, rtol=1e-4, atol=1e-6)
    assert logged_metric(trainer, "cadet/omega_scale") == 1.0
    with pytest.raises(ValueError, match="cadet_max_grad_ratio"):
        tiny_cadet_config(tmp_path, cadet_max_grad_ratio=0.0)


def test_max_grad_ratio_trains_lora_adapters_under_gradient_checkpointing(tokenizer, tiny_llama, tmp_path):
    """The two gradients are taken apart through PEFT's adapters and recomputed activations too; the bound binds."""
    from peft import LoraConfig

    args = tiny_cadet_config(tmp_path, cadet_max_grad_ratio=0.5, cadet_lambda=50.0, gradient_checkpointing=True)
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=args,
        train_dataset=corpus(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    scales = [log["cadet/omega_scale"] for log in trainer.state.log_history if "cadet/omega_scale" in log]
    assert len(scales) == args.max_steps and min(scales) < 1.0
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


def test_grad_ratio_steps_measures_every_kth_step_and_after_each_new_nado(
    tokenizer, tiny_llama, tmp_path, monkeypatch
):
    """With `cadet_grad_ratio_steps` k, the two gradients are taken apart (two backward passes) at every k-th step and
    at the first step after a new NADO model; the steps in between scale λ·Ω by the factor last measured."""
    args = tiny_cadet_config(
        tmp_path,
        max_steps=8,
        steps_per_round=4,
        cadet_lambda=50.0,
        cadet_max_grad_ratio=0.5,
        cadet_grad_ratio_steps=3,
    )
    trainer = CADETTrainer(
        model=tiny_llama, oracle_funcs=no_bad_word, args=args, train_dataset=corpus(), processing_class=tokenizer
    )
    grad, calls = torch.autograd.grad, []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: calls.append(1) or grad(*a, **kw))
    trainer.train()
    logs = {e["step"]: e for e in trainer.state.log_history if "cadet/omega_scale" in e}
    assert sorted(logs) == list(range(1, 9))
    # Steps 0 and 3 (every third), 4 (a new round's NADO) and 7; logged as steps 1, 4, 5 and 8
    assert [step for step, e in logs.items() if "cadet/grad_ratio" in e] == [1, 4, 5, 8]
    assert len(calls) == 2 * 4
    for reused, measured in ((2, 1), (3, 1), (6, 5), (7, 5)):
        assert logs[reused]["cadet/omega_scale"] == logs[measured]["cadet/omega_scale"]
    assert min(e["cadet/omega_scale"] for e in logs.values()) < 1.0  # the bound binds
    with pytest.raises(ValueError, match="cadet_grad_ratio_steps"):
        tiny_cadet_config(tmp_path, cadet_grad_ratio_steps=0)


def logged_metric(trainer, key):
    return trainer._metrics["train"][key][-1]


def test_the_progress_bar_counts_the_oracle_phases_to_come_once_each(tokenizer, tiny_llama, tmp_path):
    """Trainer's bar would spread the oracle phase over every remaining step; this one adds the phases to come."""
    from types import SimpleNamespace

    from trl_cadet.progress import RoundProgressCallback

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_bad_word,
        args=tiny_cadet_config(tmp_path, disable_tqdm=False),
        train_dataset=corpus(),
        processing_class=tokenizer,
    )
    assert [type(c) for c in trainer.callback_handler.callbacks].count(RoundProgressCallback) == 1
    trainer.train()
    assert trainer.oracle_blocking_s > 0 and trainer.last_oracle_blocking_s > 0

    # 100 s so far, 80 of them in oracle phases: 2 steps of 10 s. Steps 2 to 10 left, and rounds start at 4 and 8
    timed = SimpleNamespace(oracle_blocking_s=80.0, last_oracle_blocking_s=40.0)
    callback = RoundProgressCallback(timed)
    callback.start_step, callback.started_at, callback.blocked_at_start = 0, time.perf_counter() - 100.0, 0.0
    callback.training_bar = SimpleNamespace(format_interval=lambda s: f"{s:.0f}s")
    left_s, pace = callback.time_left(step=2, max_steps=10, steps_per_round=4)
    assert left_s == pytest.approx(8 * 10 + 2 * 40, abs=1.0)  # Trainer's rate (50 s/step) would say 400
    assert pace.startswith("10.00s/step") and "x 2 left" in pace
    # Step 4 done: round 1's phase, at step 4, has not run yet
    assert "x 2 left" in callback.time_left(step=4, max_steps=10, steps_per_round=4)[1]
    assert "x 1 left" in callback.time_left(step=5, max_steps=10, steps_per_round=4)[1]
    assert callback.time_left(step=9, max_steps=10, steps_per_round=4)[0] == pytest.approx(
        20 / 9, abs=0.1
    )  # no phase left

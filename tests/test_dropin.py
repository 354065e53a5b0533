"""The drop-in contract: what works with TRL's `SFTTrainer` works with `CADETTrainer`.

Each test takes one behaviour a TRL user relies on with `SFTTrainer` and checks it on `CADETTrainer` with the
regulariser on (λ = 1), on tiny models built from config. Where CADET must differ, the test checks the documented
exception (see "Drop-in for SFTTrainer" in docs/cadet_trainer.md).
"""

import pytest
import torch
from conftest import tiny_cadet_config
from datasets import Dataset
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother
from trl import SFTConfig

from trl_cadet import CADETConfig, CADETTrainer
from trl_cadet.oracle_phase import sample_features


REPLIES = ["good morning, how are you", "thank you for asking", "you are an idiot"]


def conversations(n: int = 16, users: tuple[str, ...] = ("hello there",)) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": users[i % len(users)]},
                    {"role": "assistant", "content": REPLIES[i % len(REPLIES)]},
                ]
            }
            for i in range(n)
        ]
    )


def no_idiot(prompts, completions, **kwargs):
    return [0.0 if "idiot" in (c if isinstance(c, str) else c[-1]["content"]) else 1.0 for c in completions]


def one_round(tmp_path, **overrides):
    """Two optimisation steps in one round (one oracle phase), λ = 1."""
    values = dict(max_steps=2, steps_per_round=2, cadet_lambda=1.0)
    values.update(overrides)
    return tiny_cadet_config(tmp_path, **values)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def assert_changed(trainer, before: dict[str, torch.Tensor]) -> None:
    assert before, "the model has no trainable parameter"
    for name, param in trainer.model.named_parameters():
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not change"


def a_batch(trainer) -> dict[str, torch.Tensor]:
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def assert_trains_as_sft_trainer(cadet, data, tokenizer, tmp_path) -> list[float]:
    """Train `SFTTrainer` on `data` from a fresh tiny Llama with `cadet`'s training arguments and check that `cadet`,
    trained already, logged the same LM losses and ended with the same weights, to float rounding; SFT's losses."""
    from tiny_llama import build_llama
    from trl import SFTTrainer

    shared = ("use_cpu", "bf16", "gradient_checkpointing", "report_to", "max_steps", "per_device_train_batch_size")
    shared += ("learning_rate", "logging_steps", "save_strategy", "seed", "disable_tqdm")
    sft = SFTTrainer(
        model=build_llama(tokenizer),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), **{name: getattr(cadet.args, name) for name in shared}),
        train_dataset=data,
        processing_class=tokenizer,
    )
    sft.train()
    sft_losses = [entry["loss"] for entry in sft.state.log_history if "loss" in entry]
    assert [entry["cadet/lm_loss"] for entry in cadet.state.log_history if "cadet/lm_loss" in entry] == pytest.approx(
        sft_losses, abs=1e-5
    )
    for (name, ours), (_, theirs) in zip(cadet.model.named_parameters(), sft.model.named_parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=name)
    return sft_losses


def test_lambda_zero_trains_as_sft_trainer(tokenizer, tmp_path):
    """λ = 0 is plain SFT: from the same model, data and seed, CADET's LM loss (its own, beside the regulariser)
    and updates are `SFTTrainer`'s, up to float rounding, although its oracle phases sample and train a NADO model."""
    from tiny_llama import build_llama

    data = conversations(24, users=("hello there", "how are you"))
    args = one_round(tmp_path / "cadet", cadet_lambda=0.0, max_steps=6, steps_per_round=3)
    cadet = CADETTrainer(
        model=build_llama(tokenizer), oracle_funcs=no_idiot, args=args, train_dataset=data, processing_class=tokenizer
    )
    cadet.train()
    sft_losses = assert_trains_as_sft_trainer(cadet, data, tokenizer, tmp_path)
    assert len(sft_losses) == 6
    assert sft_losses[-1] < sft_losses[0] - 0.05  # it trained


def test_filter_corpus_at_lambda_zero_trains_as_sft_trainer_on_the_filtered_corpus(tokenizer, tmp_path):
    """`filter_corpus` scores every corpus example once and trains on those the oracle finds satisfied: at λ = 0,
    `SFTTrainer` on the corpus filtered by the same oracle, while the NADO model's labelled corpus completions still
    come from the whole corpus (the dropped insults among them) and the scoring calls are counted."""
    from tiny_llama import build_llama

    data = conversations(24, users=("hello there", "how are you"))
    args = one_round(tmp_path / "cadet", cadet_lambda=0.0, max_steps=4, steps_per_round=4, filter_corpus=True)
    cadet = CADETTrainer(
        model=build_llama(tokenizer), oracle_funcs=no_idiot, args=args, train_dataset=data, processing_class=tokenizer
    )
    assert len(cadet.train_dataset) == 16 and cadet.oracle_calls == 24
    nado_completions = tokenizer.batch_decode(cadet._corpus_completions.completion_ids)
    assert any("idiot" in text for text in nado_completions)
    cadet.train()
    filtered = data.filter(lambda row: "idiot" not in row["messages"][-1]["content"])
    assert len(assert_trains_as_sft_trainer(cadet, filtered, tokenizer, tmp_path)) == 4
    assert cadet.oracle_calls > 24 + len(cadet._corpus_completions.prompts)  # the phase's samples counted on top


# Logging


def test_last_log_entry_is_the_training_summary(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer: `log_history[-1]` is the training summary (`train_loss`), `[-2]` the last evaluation. CADET's last
    round is timed and logged in the summary instead of an entry of its own after it."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
        train_dataset=conversations(),
        eval_dataset=conversations(4),
        processing_class=tokenizer,
    )
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)
    history = trainer.state.log_history
    assert "train_loss" in history[-1]
    assert "time/round" in history[-1]  # the last round, closed by the summary
    assert "eval_loss" in history[-2]
    assert "loss" in history[-3]


# Arguments


def test_plain_training_arguments_are_converted(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer converts `TrainingArguments` (and here an `SFTConfig`) to its config, keeping every value."""
    for args in (
        TrainingArguments(str(tmp_path), learning_rate=3e-4, use_cpu=True, report_to="none"),
        SFTConfig(
            str(tmp_path),
            learning_rate=3e-4,
            use_cpu=True,
            bf16=False,
            report_to="none",
            max_length=64,
            pad_token="<|pad|>",
        ),
    ):
        trainer = CADETTrainer(
            model=tiny_llama,
            oracle_funcs=no_idiot,
            args=args,
            train_dataset=conversations(),
            processing_class=tokenizer,
        )
        assert isinstance(trainer.args, CADETConfig)
        assert trainer.args.learning_rate == 3e-4
        assert trainer.args.cadet_lambda == CADETConfig.cadet_lambda  # CADET's default
    assert trainer.args.max_length == 64
    assert trainer.args.pad_token == "<|pad|>"  # `to_dict` hides the `*_token` values


def test_model_init_kwargs_float16(tiny_llama_path, tmp_path):
    """SFTTrainer loads a model path with `model_init_kwargs`, e.g. in float16, and trains it in its default mixed
    precision (bf16 autocast, whose forward returns float32 outputs); the oracle phase and the regulariser must work
    with the model's dtype."""
    trainer = CADETTrainer(
        model=tiny_llama_path,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, model_init_kwargs={"dtype": torch.float16}, bf16=True, learning_rate=1e-2),
        train_dataset=conversations(),
    )
    assert trainer.model.dtype == torch.float16
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)
    assert trainer.nado_source_round == 0


# Data


def test_formatting_func_without_text_columns(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer trains on any columns through `formatting_func`; the oracle phase takes its prompts from the
    formatted text."""
    dataset = Dataset.from_list([{"question": "hello there", "answer": REPLIES[i % 3]} for i in range(16)])
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, corpus_prompt_length=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        formatting_func=lambda example: f"{example['question']} {example['answer']}",
    )
    assert trainer.prompts and all("hello there".startswith(p) for p in trainer.prompts)
    # The corpus completions labelled for the NADO model: the formatted text after the prompt
    assert trainer._corpus_completions.completion_ids
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)
    assert trainer.nado_source_round == 0


# Loss


def test_dft_loss_is_the_lm_loss_beside_the_regulariser(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer's `loss_type='dft'` weighs each token's NLL by its (detached) probability; CADET adds its
    regulariser to that loss as it does to the NLL."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, loss_type="dft"),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    batch = a_batch(trainer)
    trainer.cadet_lambda = 0.0
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    log_p = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    trained = targets != -100
    expected = -(log_p * log_p.exp())[trained].sum() / trained.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"]["cadet/lm_loss"][-1] == pytest.approx(expected.item(), rel=1e-5)

    trainer.cadet_lambda = 1.0
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)


@pytest.mark.parametrize(
    "argument,match",
    [
        ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.loss}, "compute_loss_func"),
        ({"args": "liger"}, "use_liger_kernel=False"),
    ],
    ids=["compute_loss_func", "liger"],
)
def test_refused_sft_options_say_why(tokenizer, tiny_llama, tmp_path, argument, match):
    """The SFTTrainer options CADET cannot honour fail before training, with an error that says why and what to do."""
    kwargs = dict(argument)
    if kwargs.get("args") == "liger":
        kwargs["args"] = SFTConfig(str(tmp_path), use_cpu=True, bf16=False)
        kwargs["args"].use_liger_kernel = True  # SFTConfig itself would look for the kernels
    with pytest.raises(ValueError, match=match):
        CADETTrainer(
            model=tiny_llama,
            oracle_funcs=no_idiot,
            train_dataset=conversations(),
            processing_class=tokenizer,
            **kwargs,
        )


def test_label_smoothing_is_the_lm_loss_beside_the_regulariser(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer smooths the labels with `label_smoothing_factor` (transformers' `LabelSmoother`); CADET's LM loss is
    the same smoothed loss, and its regulariser is added to it."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, label_smoothing_factor=0.2),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    batch = a_batch(trainer)
    trainer.cadet_lambda = 0.0
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = LabelSmoother(epsilon=0.2)(outputs, batch["labels"], shift_labels=True)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    trainer.cadet_lambda = 1.0
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)


def test_model_card_tags(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer tags its models `trl` and `sft`, which the Hub searches by; a CADET model is fine-tuned on a corpus
    too, so it keeps both tags and adds `cadet`."""
    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    assert {"trl", "sft", "cadet"} <= set(trainer.model.model_tags)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    for tag in ("trl", "sft", "cadet"):
        assert f"- {tag}\n" in card


# Evaluation


def test_compute_metrics_gets_the_full_logits_with_the_lm_head_shortcut(tokenizer, tiny_llama, tmp_path):
    """SFTTrainer hands `compute_metrics` logits `[B, L, V]`; CADET's LM-head shortcut (on after the first batch) must
    not hand it the `[B, 1, V]` logits of its own forward."""
    shapes = []

    def compute_metrics(prediction):
        shapes.append((prediction.predictions.shape, prediction.label_ids.shape))
        return {"seen": 1.0}

    trainer = CADETTrainer(
        model=tiny_llama,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, per_device_eval_batch_size=4),
        train_dataset=conversations(),
        eval_dataset=conversations(4),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)
    assert trainer._head_gives_logits is True
    metrics = trainer.evaluate()
    assert metrics["eval_seen"] == 1.0
    (predictions, labels), *_ = shapes
    assert predictions == (*labels, len(tokenizer))


# Models


def tiny_moe(tokenizer, **overrides) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **overrides,
    )
    model = Qwen3MoeForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.mark.parametrize("lora_on_experts", [False, True])
def test_mixture_of_experts_adds_and_logs_the_router_loss(tokenizer, tmp_path, lora_on_experts):
    """SFTTrainer turns on a mixture-of-experts model's router logits, adds `router_aux_loss_coef · aux_loss` to the
    loss and logs `aux_loss`, with or without LoRA on the experts; the oracle phase samples (prompts of different
    lengths, so padded) and scores with the same model."""
    peft_config = None
    if lora_on_experts:
        from peft import LoraConfig

        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        peft_config = LoraConfig(r=4, target_modules=[], target_parameters=experts)
    trainer = CADETTrainer(
        model=tiny_moe(tokenizer, router_aux_loss_coef=0.5),
        oracle_funcs=no_idiot,
        args=one_round(tmp_path),
        train_dataset=conversations(users=("hello there", "good morning, can you help me with my homework?")),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)
    assert trainer.nado_source_round == 0
    assert any("aux_loss" in entry for entry in trainer.state.log_history)

    batch = a_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
    regularised = metrics["cadet/lm_loss"] + trainer.cadet_lambda * metrics["cadet/kl"]
    assert metrics["aux_loss"] > 0
    assert loss.item() == pytest.approx(regularised + 0.5 * metrics["aux_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prebuilt_peft_model"])
def test_virtual_tokens(tokenizer, tiny_llama, tmp_path, method):
    """SFTTrainer trains PEFT prompt tuning and p-tuning, whose model outputs start with virtual tokens that have no
    label; CADET aligns the logits and hidden states with the labels, so its LM loss is the model's own."""
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model

    if method == "p_tuning":
        peft_config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)
    else:
        peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = tiny_llama
    if method == "prebuilt_peft_model":
        model, peft_config = get_peft_model(tiny_llama, peft_config), None
    trainer = CADETTrainer(
        model=model,
        oracle_funcs=no_idiot,
        args=one_round(tmp_path, learning_rate=1e-2),
        train_dataset=conversations(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = trainable(trainer)
    trainer.train()
    assert_changed(trainer, before)
    assert trainer.nado_source_round == 0

    assert trainer._head_gives_logits is True
    # The oracle phase reads the model's logits at the real tokens' positions
    samples = trainer._latest_samples
    features, _ = sample_features(trainer.model, trainer.nado, samples, tokenizer.pad_token_id, 1, use_head=False)
    prompt, completion = samples.prompt_ids[0], samples.completion_ids[0]
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([prompt + completion])).logits[0, 4:]  # 4 virtual tokens
    torch.testing.assert_close(features[0].lm_logits, logits[len(prompt) - 1 :])

    batch = a_batch(trainer)
    trainer.cadet_lambda = 0.0
    for shortcut in (False, True):  # the plain forward, then the LM-head shortcut
        trainer._head_gives_logits = shortcut
        loss = trainer.compute_loss(trainer.model, batch)
        with torch.no_grad():
            # PEFT labels the virtual tokens -100, so the last one predicts the first real token
            expected = trainer.model(**batch).loss
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

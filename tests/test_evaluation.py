import importlib
import json
import math
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import build_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LogitsProcessor,
    PreTrainedTokenizerFast,
)

from trl_cadet.cli import main
from trl_cadet.evaluation import (
    distinct_n,
    evaluate_model,
    evaluate_toxicity,
    generate_samples,
    generation_perplexity,
    perplexity,
    toxicity_metrics,
)
from trl_cadet.oracles.base import completion_text
from trl_cadet.oracles.registry import BUILTIN_ORACLES, load_oracle


# A tokenizer of its own: it adds BOS to plain text, which the perplexity tests need

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small language model writes a short answer.",
    "Hello there, how are you doing today?",
    "Be kind and polite when you talk to people.",
    "Thanks a lot, that was a great idea!",
] * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, adding BOS to plain text, with a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", backend.token_to_id("<|bos|>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer) -> LlamaForCausalLM:
    """The tests' tiny Llama (`conftest.build_llama`) on this file's tokenizer, in eval mode."""
    return build_llama(tokenizer).eval()


def save_tiny_classifier(path) -> str:
    """A randomly initialised 2-label Llama classifier ("non-toxic", "toxic") with its tokenizer."""
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "non-toxic", 1: "toxic"},
        label2id={"non-toxic": 0, "toxic": 1},
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_model(path) -> str:
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class SubstringJudge:
    """Scores 0 (toxic) when a completion contains `substring`, else 1. Records what it was called with."""

    def __init__(self, substring: str = "e"):
        self.substring = substring
        self.calls = []
        self.__name__ = f"contains_{substring}"

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append((list(prompts), list(completions)))
        texts = [completion_text(c) for c in completions]
        return [0.0 if self.substring in text else 1.0 for text in texts]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run far faster on one thread, above all on a busy machine (threads spin waiting for each other)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    return make_model(tokenizer), tokenizer


# Metrics


@pytest.mark.parametrize(
    "toxicity, threshold, expected",
    [
        (
            [[0.1, 0.7], [0.2, 0.3], [0.9, 0.4]],
            0.5,
            {
                "expected_max_toxicity": (0.7 + 0.3 + 0.9) / 3,
                # Population std of the maxima 0.7, 0.3, 0.9 around their mean 1.9 / 3
                "expected_max_toxicity_std": math.sqrt(
                    ((0.7 - 1.9 / 3) ** 2 + (0.3 - 1.9 / 3) ** 2 + (0.9 - 1.9 / 3) ** 2) / 3
                ),
                "toxicity_probability": 2 / 3,
                "mean_toxicity": (0.1 + 0.7 + 0.2 + 0.3 + 0.9 + 0.4) / 6,
                "num_prompts": 3,
                "num_samples": 6,
            },
        ),
        # The threshold is inclusive
        ([[0.5], [0.49]], 0.5, {"expected_max_toxicity": 0.495, "toxicity_probability": 0.5, "num_prompts": 2}),
        ([[0.1, 0.2]], 0.15, {"toxicity_probability": 1.0, "expected_max_toxicity_std": 0.0}),
        # Dropped verdicts are left out, and so is a prompt without any verdict
        (
            [[None, 0.8], [float("nan"), None], [0.2, 0.0]],
            0.5,
            {"expected_max_toxicity": 0.5, "toxicity_probability": 0.5, "num_prompts": 2, "num_samples": 3},
        ),
    ],
)
def test_toxicity_metrics(toxicity, threshold, expected):
    metrics = toxicity_metrics(toxicity, threshold=threshold)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_toxicity_metrics_nothing_scored():
    metrics = toxicity_metrics([[None, None]])
    assert metrics["expected_max_toxicity"] is None and metrics["num_prompts"] == 0


# Perplexity


def test_perplexity_matches_manual_computation(tiny):
    model, tokenizer = tiny
    conversation = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "How are you?"}]
    texts = ["The quick brown fox jumps over the lazy dog.", "Be kind.", conversation]

    total_nll, total_tokens = 0.0, 0
    rendered = [
        tokenizer(texts[0])["input_ids"],
        tokenizer(texts[1])["input_ids"],
        tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"],
    ]
    assert rendered[0][0] == tokenizer.bos_token_id and rendered[2].count(tokenizer.bos_token_id) == 1
    assert len(rendered[0]) != len(rendered[1])  # so that the batch is padded
    with torch.no_grad():
        for ids in rendered:
            ids = torch.tensor([ids])
            logits = model(input_ids=ids).logits[0, :-1]
            total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            total_tokens += ids.shape[1] - 1
    expected = math.exp(total_nll / total_tokens)

    assert perplexity(model, tokenizer, texts, batch_size=3, show_progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tokenizer, texts, batch_size=1, show_progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_truncates(tiny):
    model, tokenizer = tiny
    text = "The quick brown fox jumps over the lazy dog."
    ids = torch.tensor([tokenizer(text)["input_ids"][:4]])
    with torch.no_grad():
        nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
    assert perplexity(model, tokenizer, [text], max_length=4, show_progress=False) == pytest.approx(math.exp(nll))


def test_distinct_n_by_hand():
    samples = [["a b a b", "a b c"], ["x"], []]
    # prompt 1: unigrams a b a b a b c -> 3 distinct of 7; bigrams ab ba ab ab bc -> 3 of 5; prompt 2: x -> 1 of 1
    assert distinct_n(samples, 1) == pytest.approx((3 / 7 + 1) / 2)
    assert distinct_n(samples, 2) == pytest.approx(3 / 5)  # prompt 2 has no bigram and is left out
    assert distinct_n([["a"]], 3) is None  # no trigram at all: no figure (the report stays valid JSON)


def test_generation_perplexity_scores_the_completion_tokens_given_the_prompt(tiny):
    model, tokenizer = tiny
    prompts, samples = ["The quick brown fox", "Be"], [["jumps over", "runs"], ["kind."]]
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for prompt, completions in zip(prompts, samples, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            for completion in completions:
                completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt_ids + completion_ids])
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
                total_nll += F.cross_entropy(logits, torch.tensor(completion_ids), reduction="sum").item()
                total_tokens += len(completion_ids)
    expected = math.exp(total_nll / total_tokens)
    got = generation_perplexity(model, tokenizer, prompts, samples, batch_size=2, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


# Generation


def test_generate_samples_shape_and_determinism(tiny):
    model, tokenizer = tiny
    prompts = ["Hello there", "The quick brown fox", "Be"]
    state = torch.get_rng_state()
    samples = generate_samples(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=6, batch_size=4, seed=0, show_progress=False
    )
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    assert len(samples) == 3 and all(len(row) == 3 and all(isinstance(s, str) for s in row) for row in samples)
    assert all("<|" not in s for row in samples for s in row)  # special tokens are skipped, prompts not echoed
    again = generate_samples(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=6, batch_size=4, seed=0, show_progress=False
    )
    assert again == samples
    other = generate_samples(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=6, batch_size=4, seed=1, show_progress=False
    )
    assert other != samples


def test_generate_samples_conversational_and_logits_processor(tiny):
    model, tokenizer = tiny
    forced = tokenizer.convert_tokens_to_ids("a")

    class ForceToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced_scores = torch.full_like(scores, -math.inf)
            forced_scores[:, forced] = 0.0
            return forced_scores

    prompts = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Be kind"}]]
    samples = generate_samples(
        model, tokenizer, prompts, num_samples=2, max_new_tokens=5, logits_processor=ForceToken(), show_progress=False
    )
    assert samples == [["aaaaa"] * 2] * 2


# Toxicity evaluation


def test_evaluate_toxicity_with_substring_judge(tiny):
    model, tokenizer = tiny
    prompts = ["Hello there", "The quick brown fox", "Be kind", "Thanks"]
    judge, other = SubstringJudge("e"), SubstringJudge("zzz")
    result = evaluate_toxicity(
        model,
        tokenizer,
        prompts,
        {"e": judge, "never": other},
        num_samples=4,
        max_new_tokens=8,
        batch_size=8,
        judge_batch_size=5,
        seed=0,
        show_progress=False,
    )
    samples = result["samples"]
    assert [s["prompt"] for s in samples] == prompts
    toxicity = [[1.0 if "e" in text else 0.0 for text in s["completions"]] for s in samples]
    assert [s["toxicity"]["e"] for s in samples] == toxicity
    assert result["toxicity"]["e"] == pytest.approx(toxicity_metrics(toxicity))
    expected_emt = sum(max(row) for row in toxicity) / len(toxicity)
    assert result["toxicity"]["e"]["expected_max_toxicity"] == pytest.approx(expected_emt)
    assert result["toxicity"]["never"]["expected_max_toxicity"] == 0.0
    assert result["toxicity"]["never"]["toxicity_probability"] == 0.0
    # Judges see strings for string prompts, each prompt repeated for each of its samples, in chunks
    assert [len(c) for _, c in judge.calls] == [5, 5, 5, 1]
    assert judge.calls[0][0] == ["Hello there"] * 4 + ["The quick brown fox"]
    assert all(isinstance(c, str) for _, chunk in judge.calls for c in chunk)


def test_evaluate_toxicity_conversational_judge_format(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": "Hello there"}]]
    judge = SubstringJudge("e")
    result = evaluate_toxicity(
        model, tokenizer, prompts, {"e": judge}, num_samples=2, max_new_tokens=4, show_progress=False
    )
    ((call_prompts, call_completions),) = judge.calls
    assert call_prompts == prompts * 2
    assert call_completions == [[{"role": "assistant", "content": t}] for t in result["samples"][0]["completions"]]


def test_evaluate_toxicity_rejects_out_of_range_judge(tiny):
    model, tokenizer = tiny

    def out_of_range(prompts, completions, **kwargs):
        return [2.0] * len(completions)

    with pytest.raises(ValueError, match="outside"):
        evaluate_toxicity(
            model, tokenizer, ["Hi"], {"bad": out_of_range}, num_samples=1, max_new_tokens=2, show_progress=False
        )


def test_evaluate_model_report_is_json(tiny):
    model, tokenizer = tiny
    report = evaluate_model(
        model,
        tokenizer,
        prompts=["Hello there"],
        judges={"e": SubstringJudge("e")},
        texts=["Be kind and polite."],
        num_samples=2,
        max_new_tokens=4,
        save_samples=True,
        model_name_or_path="tiny",
        show_progress=False,
    )
    assert json.loads(json.dumps(report)) == report
    assert report["model"] == "tiny" and report["seed"] == 42
    assert set(report["timings"]) == {"generation_s", "scoring_s", "perplexity_s", "total_s"}
    assert report["perplexity"] > 1 and len(report["samples"]) == 1


def test_load_judge_unknown_name():
    with pytest.raises(ValueError, match="Unknown oracle or judge"):
        load_oracle("no-such-judge")


@pytest.mark.parametrize("name", sorted(BUILTIN_ORACLES))
def test_judge_registry_names_resolve(name):
    # Resolve without instantiating: the judges load their weights when built
    module_name, class_name = BUILTIN_ORACLES[name].split(":")
    assert callable(getattr(importlib.import_module(module_name), class_name))


# Command line


def test_cli_evaluate_and_plot(tmp_path, monkeypatch):
    model_path = save_tiny_model(tmp_path / "model")
    classifier_path = save_tiny_classifier(tmp_path / "classifier")
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps(p) for p in [{"prompt": {"text": "Hello there"}}, "Be kind", {"prompt": "Thanks"}])
    )
    (tmp_path / "texts.txt").write_text("The quick brown fox jumps over the lazy dog.\nBe kind and polite.\n")
    monkeypatch.setitem(BUILTIN_ORACLES, "contains_e", f"{__name__}:SubstringJudge")

    reports = []
    for lambda_ in (0.0, 1.0):
        output = tmp_path / f"report_{lambda_}.json"
        args = ["evaluate", "--model", model_path, "--prompts", str(tmp_path / "prompts.jsonl")]
        args += ["--texts", str(tmp_path / "texts.txt"), "--judges", f"contains_e,{classifier_path}"]
        args += ["--num_samples", "3", "--max_new_tokens", "4", "--seed", "1", "--lambda", str(lambda_)]
        args += ["--output", str(output)]
        assert main(args) == 0
        report = json.loads(output.read_text())
        assert report["model"] == model_path and report["lambda"] == lambda_ and report["seed"] == 1
        assert report["settings"]["num_prompts"] == 3 and report["settings"]["num_samples"] == 3
        assert report["toxicity"]["contains_e"]["num_samples"] == 9
        assert 0 <= report["toxicity"][classifier_path]["expected_max_toxicity"] <= 1
        assert report["perplexity"] > 1
        reports.append(report)
    assert reports[0]["toxicity"] == reports[1]["toxicity"]  # same seed, same samples

    sweep = [{"label": f"λ={r['lambda']}", "lambda": r["lambda"], "report": r} for r in reports]
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    # A report file and a list of `{label, lambda, report}` entries, in one plot
    png = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path / "report_0.0.json"), str(tmp_path / "sweep.json"), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("perplexities, scale", [((3.75, 5.9), "linear"), ((3.75, 89.5), "log")])
def test_plot_reports_puts_perplexities_an_order_apart_on_a_log_axis(tmp_path, monkeypatch, perplexities, scale):
    import matplotlib.pyplot as plt

    from trl_cadet.plotting import plot_reports

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    entries = [
        {
            "label": f"m{i}",
            "lambda": None,
            "report": {"toxicity": {"j": {"expected_max_toxicity": 0.1}}, "perplexity": p},
        }
        for i, p in enumerate(perplexities)
    ]
    plot_reports(entries, str(tmp_path / "plot.png"))
    (figure,) = figures
    axis = figure.axes[0]
    assert axis.get_xscale() == scale
    assert "lower left is better" in axis.get_title()
    if scale == "log":  # labelled ticks between the decades, so that close perplexities can be told apart
        figure.canvas.draw()
        labels = {tick.get_text() for tick in axis.get_xticklabels() if tick.get_text()}
        assert {"5", "10", "20", "50"} <= labels, labels
    assert (tmp_path / "plot.png").is_file()


def test_the_cli_reads_back_the_evaluation_sets_the_demo_writes(tmp_path):
    from demo import DEMO_CORPUS_KWARGS, build_detox_corpus
    from run_demo import write_eval_sets

    from trl_cadet.cli import load_prompts, load_texts

    corpus = build_detox_corpus(**DEMO_CORPUS_KWARGS)
    prompts, texts = corpus["eval"]["prompt"], corpus["heldout"]["messages"]
    prompts_path, texts_path = write_eval_sets(prompts, texts, str(tmp_path))
    assert load_prompts(prompts_path) == prompts and len(prompts) == 48
    assert load_texts(texts_path) == texts and len(texts) == 100


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["evaluate", "--model", str(tmp_path), "--texts", "nowhere.txt"])
    assert error.value.code == 2 and "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main(["evaluate", "--model", str(tmp_path), "--prompts", "nowhere.jsonl", "--judges", "jigsaw"])
    assert error.value.code == 2 and "is not a file" in capsys.readouterr().err


def test_module_entry_point_with_peft_adapter(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base_path = save_tiny_model(tmp_path / "base")
    tokenizer = make_tokenizer()
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_path), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")  # no tokenizer: the base model's is used
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "Be kind and polite."}) + "\n")

    output = tmp_path / "report.json"
    argv = ["python -m trl_cadet", "evaluate", "--model", str(tmp_path / "adapter"), "--texts"]
    monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path / "texts.jsonl"), "--output", str(output)])
    with pytest.raises(SystemExit) as exit_info:  # as `python -m trl_cadet evaluate ...`, in this process
        runpy.run_module("trl_cadet", run_name="__main__")
    assert exit_info.value.code == 0
    report = json.loads(output.read_text())
    # LoRA starts as the identity, so the adapter's perplexity is the base model's
    expected = perplexity(LlamaForCausalLM.from_pretrained(base_path), tokenizer, ["Be kind and polite."])
    assert report["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert report["toxicity"] == {}

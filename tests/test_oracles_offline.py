"""Tests of the offline toxicity oracles: the torch port of the Jigsaw BiLSTM and the alt-profanity-check judge."""

import importlib.util
import io
import pickle

import numpy as np
import pytest


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("toxic_classifier") is None
    or importlib.util.find_spec("h5py") is None
    or importlib.util.find_spec("profanity_check") is None,
    reason="needs the offline oracle packages: pip install --no-deps toxic-comment-classifier h5py alt-profanity-check",
)

TOXIC = [
    "you are a stupid idiot, I hate you",
    "shut up you worthless piece of shit",
    "You are so dumb and stupid!",
    "fuck off, you pathetic loser",
]
BENIGN = [
    "thank you for your help, have a nice day",
    "the weather is lovely today",
    "This is wonderful news.",
    "I am cooking pasta for dinner tonight.",
]


@pytest.fixture(scope="module")
def jigsaw():
    import torch

    from trl_cadet.oracles.jigsaw import JigsawOracle

    # The LSTM steps are tiny matmuls: intra-op threads only add synchronisation, which stalls for seconds when the CI
    # cores are shared with other jobs.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield JigsawOracle()
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def profanity():
    from trl_cadet.oracles.profanity import ProfanityCheckOracle

    return ProfanityCheckOracle()


@pytest.fixture(params=["jigsaw", "profanity"])
def oracle(request):
    return request.getfixturevalue(request.param)


# Both oracles


def test_toxic_scores_above_benign(oracle):
    toxic = oracle.toxicity(TOXIC)
    benign = oracle.toxicity(BENIGN)
    assert min(toxic) > max(benign)
    assert min(toxic) > 0.5
    assert max(benign) < 0.2
    assert all(0.0 <= score <= 1.0 for score in toxic + benign)


def test_call_returns_satisfaction_for_standard_and_conversational(oracle):
    texts = TOXIC[:2] + BENIGN[:2] + [""]
    toxicity = oracle.toxicity(texts)
    prompts = ["Say something."] * len(texts)
    scores = oracle(prompts=prompts, completions=texts)
    assert len(scores) == len(texts)
    assert all(isinstance(score, float) for score in scores)
    np.testing.assert_allclose(scores, 1.0 - np.asarray(toxicity), atol=1e-7)

    conversational_prompts = [[{"role": "user", "content": prompt}] for prompt in prompts]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    assert oracle(prompts=conversational_prompts, completions=completions) == scores


def test_empty_inputs_and_determinism(oracle):
    assert oracle.toxicity([]) == []
    (empty,) = oracle.toxicity([""])
    assert 0.0 <= empty <= 1.0
    texts = TOXIC + BENIGN + ["", "   ", "?!"]
    first = oracle.toxicity(texts)
    assert len(first) == len(texts)
    assert oracle.toxicity(texts) == first
    # A text's score does not depend on the rest of the batch.
    assert oracle.toxicity(texts[::-1]) == pytest.approx(first[::-1], abs=1e-6)


# Jigsaw port


def test_jigsaw_matches_reference_outputs_of_the_keras_model(jigsaw):
    # Outputs of the original Keras model, published in the README of toxic-comment-classifier 0.3.0.
    probabilities = jigsaw.label_probabilities(["You are so dumb and stupid!"])[0]
    expected = [0.9889402985572815, 0.07256772369146347, 0.620429277420044, 0.01934845559298992, 0.8664075136184692]
    np.testing.assert_allclose(probabilities[:5], expected, atol=1e-5)
    np.testing.assert_allclose(probabilities[5], 0.04072948172688484, atol=1e-5)

    # The package's `predict_batch` averages the six labels; the README gives it to four decimals.
    texts = [
        "I hate you so much!",
        "This is wonderful news.",
        "You're disgusting!",
        "Absolutely love your energy!",
        "You're the worst person ever!",
        "Have a nice day :)",
    ]
    from trl_cadet.oracles.jigsaw import JIGSAW_LABELS, JigsawOracle

    mean_oracle = JigsawOracle(labels=JIGSAW_LABELS, reduction="mean")
    np.testing.assert_allclose(
        mean_oracle.toxicity(texts), [0.1395, 0.0013, 0.3110, 0.0088, 0.0937, 0.0115], atol=5.1e-5
    )


def _numpy_keras_forward(h5_path, input_ids):
    """The Keras network written out step by step on the raw h5 arrays, with Keras's gate order (i, f, c, o)."""
    import h5py

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    with h5py.File(h5_path, "r") as h5:
        raw = {key: np.asarray(h5[key], dtype=np.float64) for key in _h5_keys(h5)}
    x = raw["layers/embedding/vars/0"][input_ids]
    outputs = []
    for direction in ("forward", "backward"):
        cell = f"layers/bidirectional/{direction}_layer/cell/vars"
        kernel, recurrent, bias = raw[f"{cell}/0"], raw[f"{cell}/1"], raw[f"{cell}/2"]
        units = recurrent.shape[0]
        h, c = np.zeros(units), np.zeros(units)
        hidden = np.zeros((len(input_ids), units))
        steps = range(len(input_ids)) if direction == "forward" else reversed(range(len(input_ids)))
        for t in steps:
            z = x[t] @ kernel + h @ recurrent + bias
            i, f, g, o = (z[k * units : (k + 1) * units] for k in range(4))
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            hidden[t] = h
        outputs.append(hidden)
    pooled = np.concatenate(outputs, axis=1).max(axis=0)
    dense = np.maximum(pooled @ raw["layers/dense/vars/0"] + raw["layers/dense/vars/1"], 0.0)
    return sigmoid(dense @ raw["layers/dense_1/vars/0"] + raw["layers/dense_1/vars/1"])


def _h5_keys(h5):
    keys = []
    h5.visititems(
        lambda name, obj: keys.append(name) if name.startswith("layers/") and hasattr(obj, "shape") else None
    )
    return keys


def test_jigsaw_torch_port_matches_numpy_lstm(jigsaw):
    from trl_cadet.oracles.jigsaw import jigsaw_model_dir, pad_sequences

    text = "Thanks for the edits, but you are a clueless idiot and this article is garbage"
    (sequence,) = jigsaw.tokenizer.texts_to_sequences([text])
    input_ids = pad_sequences([sequence])[0]
    assert 10 < len(sequence) < 100
    assert (input_ids[: -len(sequence)] == 0).all() and (input_ids[-len(sequence) :] == sequence).all()
    expected = _numpy_keras_forward(jigsaw_model_dir() / "model.weights.h5", input_ids)
    np.testing.assert_allclose(jigsaw.label_probabilities([text])[0], expected, atol=1e-5)


def test_jigsaw_tokenizer_follows_keras():
    from trl_cadet.oracles.jigsaw import KerasTokenizer, pad_sequences

    tokenizer = KerasTokenizer(word_index={"you": 1, "are": 2, "rare": 30, "great": 3}, num_words=10)
    # Lower-cased, punctuation splits words, ids >= num_words and unknown words are dropped (no OOV token).
    assert tokenizer.texts_to_sequences(["You,are...GREAT!! rare unknown", ""]) == [[1, 2, 3], []]
    tokenizer.word_index["<oov>"], tokenizer.oov_token = 4, "<oov>"
    assert tokenizer.texts_to_sequences(["you rare unknown"]) == [[1, 4, 4]]
    # Keras pads and truncates on the left: the end of a long text is what the model sees.
    np.testing.assert_array_equal(pad_sequences([[1, 2, 3], [5, 6]], maxlen=2), [[2, 3], [5, 6]])
    np.testing.assert_array_equal(pad_sequences([[7], []], maxlen=3), [[0, 0, 7], [0, 0, 0]])


def test_jigsaw_long_text_is_judged_on_its_last_100_words(jigsaw):
    insult = "you are a stupid idiot"
    scores = jigsaw.toxicity([insult + " the weather is lovely" * 60, "the weather is lovely " * 60 + insult])
    assert scores[0] < 0.2 < 0.5 < scores[1]


def test_jigsaw_tokenizer_unpickler_refuses_other_classes():
    from trl_cadet.oracles.jigsaw import _TokenizerUnpickler

    payload = pickle.dumps(io.BytesIO(b"not a tokenizer"))
    with pytest.raises(pickle.UnpicklingError, match="Refusing"):
        _TokenizerUnpickler(io.BytesIO(payload)).load()


def test_jigsaw_options(jigsaw):
    from trl_cadet.oracles.jigsaw import JIGSAW_LABELS, JigsawOracle

    texts = TOXIC + BENIGN
    probabilities = jigsaw.label_probabilities(texts)
    np.testing.assert_allclose(jigsaw.toxicity(texts), probabilities[:, 0], atol=1e-7)
    several = JigsawOracle(labels=["insult", "obscene"], batch_size=3)
    assert several.model is jigsaw.model  # loaded once per process
    np.testing.assert_allclose(several.toxicity(texts), probabilities[:, [4, 2]].max(axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="Unknown Jigsaw label"):
        JigsawOracle(labels="rude")
    with pytest.raises(ValueError, match="reduction"):
        JigsawOracle(labels=JIGSAW_LABELS, reduction="sum")


def test_the_jigsaw_files_come_from_the_installed_package_only(tmp_path, monkeypatch):
    """A `toxic_classifier/` folder in the working directory must not stand in for the installed package: its
    tokenizer is a pickle."""
    from trl_cadet.oracles.jigsaw import jigsaw_model_dir

    planted = tmp_path / "toxic_classifier" / "model"
    planted.mkdir(parents=True)
    (tmp_path / "toxic_classifier" / "__init__.py").write_text("")
    for name in ("model.weights.h5", "tokenizer.pickle"):
        (planted / name).write_bytes(b"planted")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("toxic_classifier").origin.startswith(str(tmp_path))  # what find_spec would take
    model_dir = jigsaw_model_dir()
    assert not str(model_dir).startswith(str(tmp_path))
    assert (model_dir / "tokenizer.pickle").read_bytes() != b"planted"


def test_oracles_are_named_by_grpos_rule(tiny_llama):
    """A function by its name, a `functools.partial` by its function's, an instance by its class, a model by its id:
    the names of the `oracle/<name>/mean` metrics, as TRL names reward functions."""
    import functools

    from trl_cadet.oracles import oracle_name

    def no_insult(prompts, completions, threshold=0.5, **kwargs):
        return [1.0] * len(completions)

    class Judge:
        def __call__(self, prompts, completions, **kwargs):
            return [1.0] * len(completions)

    tiny_llama.config._name_or_path = "some-org/tiny-judge"
    assert oracle_name(no_insult) == "no_insult"
    assert oracle_name(functools.partial(no_insult, threshold=0.2)) == "no_insult"
    assert oracle_name(tiny_llama) == "tiny-judge"
    assert oracle_name(Judge()) == "Judge"

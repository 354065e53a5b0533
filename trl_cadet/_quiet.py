"""Imported first by `trl_cadet`: silence what is noise for CADET's users in the libraries it imports, and only that.

bitsandbytes announces, at every import on an AVX512-BF16 CPU, that an optional inference kernel could not be fetched
from the Hub. CADET trains its 4-bit layers unpacked (`trl_cadet.trainability`), where that kernel is never used.
Every other bitsandbytes message goes through.

transformers 5 deprecates `PreTrainedModel.is_gradient_checkpointing`, which TRL's `unwrap_model_for_generation` and
PEFT still read: every oracle phase would print the FutureWarning, about code that is neither ours nor the user's.
Only that message is ignored.
"""

import logging
import warnings


class _OptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())


def ignore_library_deprecations() -> None:
    """Ignore the FutureWarnings that the libraries' own calls raise (called once, at import)."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


ignore_library_deprecations()

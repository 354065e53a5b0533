"""The package itself: what `import trl_cadet` costs and prints."""

import logging


def test_only_the_optional_kernel_notice_of_bitsandbytes_is_silenced(caplog):
    import trl_cadet  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logger.warning("Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32.")
    assert "gemm_4bit_forward" not in caplog.text
    assert "Input type into Linear4bit" in caplog.text


def test_import_is_lazy_and_every_public_name_resolves():
    """`import trl_cadet` does not import TRL's trainers (as TRL's own lazy module); each public name still resolves."""
    import subprocess
    import sys

    code = (
        "import sys, trl_cadet; heavy = [m for m in ('trl', 'peft', 'bitsandbytes') if m in sys.modules]; "
        "print(heavy); print(all(getattr(trl_cadet, name) for name in trl_cadet.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True", out


def test_the_libraries_gradient_checkpointing_deprecation_is_silenced_and_nothing_else():
    """TRL's configs default `gradient_checkpointing=True` and TRL and PEFT read `is_gradient_checkpointing`, both
    deprecated in transformers 5; our users should not see that at every config and oracle phase, but they should see
    every other FutureWarning."""
    import subprocess
    import sys

    code = (
        "import warnings, trl_cadet; from transformers import LlamaConfig, LlamaForCausalLM; "
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, "
        "num_attention_heads=2, num_key_value_heads=2)); model.is_gradient_checkpointing; "
        "trl_cadet.CADETConfig(output_dir='unused', use_cpu=True, bf16=False); "
        "warnings.warn('another deprecation', FutureWarning)"
    )
    err = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True
    ).stderr
    assert "another deprecation" in err
    assert "gradient_checkpointing" not in err


def test_the_library_does_not_ship_or_import_the_demo():
    """The demo's corpus builder, templates and model conversion live in `examples/demo`, outside the package."""
    import subprocess
    import sys
    from pathlib import Path

    import trl_cadet

    assert not (Path(trl_cadet.__file__).parent / "demo").exists()
    code = "import sys, trl_cadet.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'demo'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out

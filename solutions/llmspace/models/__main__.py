"""``python -m llmspace.models train [--steps N ...]``: retrain the tiny LM (see :func:`llmspace.models.tiny_lm.main`)."""
from llmspace.models.tiny_lm import main

main()

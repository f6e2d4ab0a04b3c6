"""llmspace — reference library of the llmspace book: making large language models fit.

One module per chapter; each module's docstring says why the technique exists and what it trades.

* :mod:`llmspace.sparse` — chapter 1, sparse storage (COO/CSR/CSC, sparse add, SpMV).
"""
__version__ = "0.1.0"

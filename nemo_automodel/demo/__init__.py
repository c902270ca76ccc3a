"""The embedded default: SmolLM2-135M-Instruct and chat data from PyPI wheels (``assets``), greedy
chat generation (``chat``), and ``python -m nemo_automodel.demo`` (what ``make demo`` runs)."""

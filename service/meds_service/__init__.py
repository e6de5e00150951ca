"""MEDS reward-shaping service: an error memory that penalises recurring mistakes in RL of LLMs."""

__version__ = "0.1.0"

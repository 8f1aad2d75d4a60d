"""The random tiny BERT teacher of the reliability tests and ``bench/chaos.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["save_tiny_bert"]


def save_tiny_bert(folder: Path, tokenizer: Any) -> Path:
    """A random tiny BERT classifier (2 layers, hidden 32, seed 0) sized to ``tokenizer``,
    saved with the tokenizer in ``folder``."""
    import torch  # local: the tests that only import the helpers do not pay for torch
    from transformers import BertConfig, BertForSequenceClassification  # local: as above

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(tokenizer), max_position_embeddings=64, num_labels=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)

"""Configuration of an EfficientBERT student exported by nni-effbert.

Hugging Face remote code: this file is copied into every export folder and needs nothing but
``transformers``. The field names are those of ``EfficientBertConfig`` in nni-effbert (which
follow BERT's); ``arch`` holds the searched architecture as a flat ``label -> value`` dict, the
same dict as the folder's ``arch.json``.
"""
from typing import Any, Dict, Optional

from transformers import PretrainedConfig


class EfficientBertHFConfig(PretrainedConfig):
    r"""Sizes and architecture of an EfficientBERT student (Dong et al., Findings of EMNLP 2021).

    Parameters
    ----------
    vocab_size : int
        Token vocabulary size.
    embedding_size : int
        Width of the factorized token embeddings, projected up to ``hidden_size``.
    hidden_size : int
        Width of the encoder.
    num_hidden_layers : int
        Number of encoder layers.
    num_attention_heads : int
        Attention heads per layer.
    intermediate_size : int
        The search's "ffn hidden size"; the actual width of each layer's ``linear1`` is in ``arch``.
    max_position_embeddings : int
        Longest input the position table covers; tokenize with ``truncation=True``.
    type_vocab_size : int
        Number of token types (segments).
    hidden_dropout_prob, attention_probs_dropout_prob : float
        Dropout rates (active only in training mode).
    layer_norm_eps : float
        LayerNorm epsilon.
    initializer_range : float
        Standard deviation of the normal weight initialisation.
    fit_size : int
        Width of ``fit_dense``, the projection of hidden states to the teacher's hidden size used
        for distillation; inference does not use it.
    pad_token_id : int
        Id of the padding token.
    arch : dict
        Flat ``label -> value`` architecture (``layer{i}_width``, ``layer{i}_stack``,
        ``layer{i}_{pre,mid,post}_{act,binary,order,operand}``).
    head : str
        ``sequence`` (pooler + classifier: ``EfficientBertForSequenceClassification``) or
        ``span`` (start / end logits per token: ``EfficientBertForQuestionAnswering``).
    **kwargs
        Passed to ``PretrainedConfig`` (``id2label``, ``label2id``, ``problem_type``, ...).
    """

    model_type = "nni_effbert"

    def __init__(
        self,
        vocab_size: int = 30522,
        embedding_size: int = 128,
        hidden_size: int = 540,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 12,
        intermediate_size: int = 540,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        fit_size: int = 768,
        pad_token_id: int = 0,
        arch: Optional[Dict[str, Any]] = None,
        head: str = "sequence",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.fit_size = fit_size
        self.pad_token_id = pad_token_id
        self.arch = dict(arch) if arch is not None else None
        self.head = head

"""Hugging Face wrapper of an EfficientBERT student exported by nni-effbert.

Remote code: this file sits in the export folder next to ``modeling.py`` and ``ops.py``, verbatim
copies of nni-effbert's pure-torch student, which it imports relatively (Hugging Face's dynamic
module loader copies relative imports along). Load the folder with::

    from transformers import AutoModelForSequenceClassification, pipeline
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    classify = pipeline("text-classification", model=folder, trust_remote_code=True)

A student with the span head (SQuAD) loads with ``AutoModelForQuestionAnswering`` and runs in
``pipeline("question-answering", model=folder, trust_remote_code=True)``.

Needs ``torch`` and ``transformers`` only; nni is not involved.
"""
from typing import Optional, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

from .configuration_effbert import EfficientBertHFConfig
from .modeling import EfficientBertModel


class EfficientBertPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the exported heads."""

    config_class = EfficientBertHFConfig
    # Weights are named ``student.<name of the pure-torch module's tensor>``.
    base_model_prefix = "student"
    main_input_name = "input_ids"


class EfficientBertForSequenceClassification(EfficientBertPreTrainedModel):
    """EfficientBERT student with its sequence classification (or regression) head.

    ``config.num_labels == 1`` makes it a regression model (MSE loss), as in BERT.
    """

    def __init__(self, config: EfficientBertHFConfig):
        super().__init__(config)
        if not config.arch:
            raise ValueError(
                "EfficientBertHFConfig.arch is empty: an EfficientBERT student needs its "
                "architecture (the label -> value dict of arch.json); load a folder written by "
                "nni_effbert.product.export.export_student"
            )
        if getattr(config, "head", "sequence") == "span":
            raise ValueError("this folder holds a question-answering student (span head); load it with "
                             "AutoModelForQuestionAnswering")
        self.num_labels = config.num_labels
        self.student = EfficientBertModel(config, config.arch)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple[torch.Tensor, ...], SequenceClassifierOutput]:
        """Classify (or score) a batch of token ids.

        ``hidden_states``, when requested, are the student's ``num_layers + 1`` hidden states
        projected by ``fit_dense`` to ``config.fit_size`` (what distillation compares with a
        teacher); ``attentions`` are the attention probabilities of each layer.
        """
        if input_ids is None:
            raise ValueError("EfficientBertForSequenceClassification needs input_ids")
        limit = self.config.max_position_embeddings
        if input_ids.shape[-1] > limit:
            raise ValueError(
                f"input of {input_ids.shape[-1]} tokens is longer than the model's "
                f"max_position_embeddings ({limit}); tokenize with truncation=True "
                f"(max_length <= {limit})"
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = self.student(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_kd=bool(output_hidden_states or output_attentions),
        )
        logits = out.logits
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels)
        hidden_states = out.hidden_states if output_hidden_states else None
        attentions = out.attentions if output_attentions else None
        if not return_dict:
            extra = tuple(x for x in (hidden_states, attentions) if x is not None)
            return ((loss, logits) if loss is not None else (logits,)) + extra
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Same rule as transformers' BertForSequenceClassification: the problem type follows
        # num_labels and the label dtype unless the config names it.
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            return nn.functional.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class EfficientBertForQuestionAnswering(EfficientBertPreTrainedModel):
    """EfficientBERT student with a span head: start and end logits of every token (SQuAD).

    The head is one linear layer over the last hidden states (BERT's ``qa_outputs``). Loads with
    ``AutoModelForQuestionAnswering`` and runs in ``pipeline("question-answering")``.
    """

    def __init__(self, config: EfficientBertHFConfig):
        super().__init__(config)
        if not config.arch:
            raise ValueError(
                "EfficientBertHFConfig.arch is empty: an EfficientBERT student needs its "
                "architecture (the label -> value dict of arch.json); load a folder written by "
                "nni_effbert.product.export.export_student"
            )
        if getattr(config, "head", "sequence") != "span":
            raise ValueError(f"this folder holds a student with the {config.head!r} head, not a question-answering "
                             "(span) head; load it with AutoModelForSequenceClassification")
        self.student = EfficientBertModel(config, config.arch)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple[torch.Tensor, ...], QuestionAnsweringModelOutput]:
        """Start / end logits ``[batch, seq]`` of a batch of question + context token ids.

        With ``start_positions`` and ``end_positions`` the loss is BERT's: the mean of the
        cross-entropies of start and end, positions outside the input clamped and ignored.
        """
        if input_ids is None:
            raise ValueError("EfficientBertForQuestionAnswering needs input_ids")
        limit = self.config.max_position_embeddings
        if input_ids.shape[-1] > limit:
            raise ValueError(
                f"input of {input_ids.shape[-1]} tokens is longer than the model's "
                f"max_position_embeddings ({limit}); tokenize with truncation=True "
                f"(max_length <= {limit})"
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = self.student(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_kd=bool(output_hidden_states or output_attentions),
        )
        start_logits = out.logits[..., 0].contiguous()
        end_logits = out.logits[..., 1].contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # As transformers' BertForQuestionAnswering: positions beyond the input are ignored.
            ignored = start_logits.size(1)
            start_positions = start_positions.view(-1).clamp(0, ignored)
            end_positions = end_positions.view(-1).clamp(0, ignored)
            loss_fct = nn.CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
        hidden_states = out.hidden_states if output_hidden_states else None
        attentions = out.attentions if output_attentions else None
        if not return_dict:
            extra = tuple(x for x in (hidden_states, attentions) if x is not None)
            head = (start_logits, end_logits)
            return ((loss,) + head if loss is not None else head) + extra
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=hidden_states, attentions=attentions)

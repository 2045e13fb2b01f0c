"""Probe losses the derivative needs beyond torch's: the causal language-model loss, summed.

The topological derivative is a property of J, the loss *summed* over the probe data (a mean would make
the statistics depend on the batch size), so every loss here sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "CausalLMLoss", "causal_lm_labels"]

#: Label of a token that carries no loss (padding, prompt), as in transformers.
IGNORE_INDEX = -100


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy summed over the predicted tokens.

    J = - sum_{b, l : y_{b, l+1} != -100} log softmax(logits_{b, l})[y_{b, l+1}]

    Position l predicts token l + 1, so logits are shifted against the labels here (callers pass the
    labels aligned with ``input_ids``, as transformers does). Tokens labelled :data:`IGNORE_INDEX`
    (padding, prompt) contribute nothing; their *states* still count as derivative samples unless the
    batch's ``attention_mask`` drops them, because later tokens attend to them.

    Args:
        reduction: ``"sum"`` (the probe loss J; read by
            :func:`~topotransfer.derivative.topological.check_loss_fn`) or ``"mean"`` (over the predicted
            tokens: the training loss, whose value does not depend on the batch size).
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"CausalLMLoss reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: logits (B, L, V), labels (B, L) token ids or -100. Returns: the scalar summed loss."""
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"CausalLMLoss needs logits (B, L, V) and labels (B, L); got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        pred = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        target = labels[:, 1:].reshape(-1).to(pred.device)
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction=self.reduction)


def causal_lm_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """Labels for :class:`CausalLMLoss`: the input ids, with padding and prompt tokens set to -100.

    Args:
        input_ids: (B, L) token ids.
        attention_mask: (B, L) 1 for real tokens, 0 for padding (``None``: no padding).
        prompt_lengths: (B,) number of leading real tokens per sequence that are prompt, not target
            (``None``: every real token is a target). Assumes right padding.

    Returns:
        (B, L) long tensor.
    """
    labels = input_ids.clone().long()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).reshape(1, -1)
        labels = labels.masked_fill(positions < lengths, IGNORE_INDEX)
    return labels

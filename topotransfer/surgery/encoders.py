"""More transformers encoders: DistilBERT (text) and DINOv2 (images, blocks with layer scale).

Both are a stem ``embeddings`` followed by one ``nn.ModuleList`` of blocks that take
``(hidden_states, attention_mask, ...)`` and return a tensor (transformers 5.x), so the generic
:class:`~topotransfer.surgery.hf.HFEncoderFamily` machinery applies; what differs is only where the blocks
live and what they are called:

* DistilBERT: ``distilbert.transformer.layer`` of ``TransformerBlock`` (post-LayerNorm like BERT), stem
  ``distilbert.embeddings``; the config calls its depth ``n_layers`` and its width ``dim``
  (``num_hidden_layers`` / ``hidden_size`` are aliases of them).
* DINOv2: ``dinov2.encoder.layer`` of ``Dinov2Layer``: pre-LayerNorm, each residual branch multiplied by
  a learned per-channel layer scale before it is added; stem ``dinov2.embeddings`` (CLS token + patches
  (+ registers for ``Dinov2WithRegisters``)). An inserted TopoBlock sits between blocks, on the residual
  stream, so it is not scaled by any block's layer scale.

The heads (DistilBERT: ``pre_classifier`` + ReLU + ``classifier`` on the first token; DINOv2:
``classifier`` on [CLS, mean of patch tokens]) are not reproduced by :meth:`forward_from`: callers fall
back to the full forward pass.
"""

from __future__ import annotations

import torch

from .hf import HFEncoderFamily
from .midblock import MidBlockSites

__all__ = ["Dinov2Family", "DistilBertFamily"]


class DistilBertFamily(HFEncoderFamily):
    """transformers DistilBERT (``DistilBertModel``, ``DistilBertForSequenceClassification``, ...).

    Sites inside a block (``"sublayers"``): the block is post-LN, ``a' = sa_layer_norm(attn(h) + h)``,
    ``out = output_layer_norm(ffn(a') + a')``, and each sum's only consumer is its LayerNorm, so a layer goes
    in front of the LayerNorm (:class:`~topotransfer.surgery.hf.TopoPreNorm`, as for BERT).
    """

    name = "distilbert"
    model_types = ("distilbert",)
    block_classes = ("TransformerBlock",)
    inner_points = (("sa_layer_norm", 1 / 3, "pre_norm"), ("output_layer_norm", 2 / 3, "pre_norm"))


def _dinov2_mid_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        **kwargs: object) -> torch.Tensor:
    """transformers 5.x ``Dinov2Layer.forward`` with ``self.topo_mid`` on the residual stream after the attention."""
    residual = hidden_states
    hidden_states, _ = self.attention(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
    hidden_states = self.drop_path(self.layer_scale1(hidden_states)) + residual
    hidden_states = self.topo_mid(hidden_states)  # the inserted layer, on the residual stream m
    return self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states


class Dinov2Family(MidBlockSites, HFEncoderFamily):
    """transformers DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``) and DINOv2 with registers.

    Sites inside a block (``"sublayers"``): the residual stream after the layer-scaled attention branch, the
    input of ``norm2`` (site ``<block>.norm2``), through a checked mid-block forward
    (:class:`~topotransfer.surgery.midblock.MidBlockSites`).
    """

    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    block_classes = ("Dinov2Layer", "Dinov2WithRegistersLayer")
    mid_norm = "norm2"
    mid_forward = _dinov2_mid_forward

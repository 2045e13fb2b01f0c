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
back to the full forward pass. DINOv2 has no sites inside its blocks yet (its pre-LN block with layer
scale would need its own checked mid-block forward).
"""

from __future__ import annotations

from .hf import HFEncoderFamily

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


class Dinov2Family(HFEncoderFamily):
    """transformers DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``) and DINOv2 with registers."""

    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    block_classes = ("Dinov2Layer", "Dinov2WithRegistersLayer")

"""Hugging Face transformer encoders (ViT / DeiT, BERT / RoBERTa): blocks found by class, not by path.

transformers 5.x keeps ViT blocks at ``vit.layers`` and a block returns a tensor; 4.x keeps them at
``vit.encoder.layer`` and a block returns a tuple. The adapter finds the ``nn.ModuleList`` whose
children are the family's block class, takes the stem from the nearest ancestor with an
``embeddings`` attribute, and asks a real block what it returns so that an inserted
:class:`TopoBlock` answers the encoder loop in the same form.

Sites inside blocks (``probe.sites=sublayers|all``), named by the LayerNorm whose input is the state:

* pre-LN ViT / DeiT block ``h -> m = h + attn(LN1(h)) -> m + mlp(LN2(m))``: the residual stream m after
  the attention add, site ``<block>.layernorm_after``. The layer must act on m for *both* of its uses (the
  LayerNorm and the MLP's residual), so the block's class is swapped for a subclass whose forward is the
  same computation with ``m = layer(m)`` in between (:func:`~.midblock.swap_in_mid_layer`); the swap is checked to
  reproduce the original forward bit for bit before it is kept. The point after the MLP add is the block
  boundary, a ``"blocks"`` site already.
* post-LN BERT / RoBERTa block: the sums ``a + h`` fed to ``attention.output.LayerNorm`` and
  ``f + a'`` fed to ``output.LayerNorm``. The LayerNorm is their only consumer, so the layer goes in
  front of it: the LayerNorm is replaced by a :class:`TopoPreNorm` that shares its parameters (the
  state-dict keys of the base do not change) and computes ``LN(layer(x))``.

With a zero layer both are exact identities (``layer(x) = x + 0``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import NoSitesFoundError, UnsupportedModelError
from ..layers import TopoLayer
from .base import ChainFamily, DownstreamUnsupportedError, Site, block_list_path, first_tensor
from .midblock import swap_in_mid_layer, swap_out_mid_layer

__all__ = ["BertFamily", "HFEncoderFamily", "TopoBlock", "TopoPreNorm", "ViTFamily"]


class TopoPreNorm(nn.LayerNorm):
    """A LayerNorm with an inserted layer in front: ``LN(layer(x))``, sharing the original LayerNorm's
    ``weight`` / ``bias`` Parameters (so their state-dict keys stay those of the base model).

    Args:
        norm: the block's ``nn.LayerNorm``.
        layer: the inserted TopoLayer, a child named ``topo``.
    """

    def __init__(self, norm: nn.LayerNorm, layer: nn.Module) -> None:
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None, device="meta")
        self.weight, self.bias = norm.weight, norm.bias  # the same Parameters, not copies
        self.topo = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., d) the sum the block normalises. Returns: LN(topo(x)), (..., d)."""
        return super().forward(self.topo(x))

    def plain(self) -> nn.LayerNorm:
        """The original LayerNorm back (same Parameters)."""
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
                            bias=self.bias is not None, device="meta")
        norm.weight, norm.bias = self.weight, self.bias
        return norm


def _pre_ln_mid_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        *args: object, **kwargs: object) -> torch.Tensor:
    """transformers 5.x pre-LN ViT / DeiT block with ``self.topo_mid`` applied to the attention add's result."""
    residual = hidden_states
    hidden_states = self.layernorm_before(hidden_states)
    out = self.attention(hidden_states, attention_mask, *args, **kwargs)
    hidden_states = out[0] if isinstance(out, tuple) else out
    hidden_states = self.dropout(hidden_states)
    hidden_states = hidden_states + residual
    hidden_states = self.topo_mid(hidden_states)  # the inserted layer, on the residual stream m
    residual = hidden_states
    hidden_states = self.layernorm_after(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.dropout(hidden_states)
    return hidden_states + residual


class TopoBlock(nn.Module):
    """A :class:`TopoLayer` dressed as a transformer encoder block.

    The encoder loop calls ``block(hidden_states, *extra)`` (attention mask, head mask, flags...);
    the extra arguments are ignored because the layer is token-wise.

    Args:
        layer: the token-wise TopoLayer (usually with ``norm="layernorm"``).
        return_tuple: return ``(hidden_states,)`` like transformers 4.x blocks, instead of a tensor.
    """

    def __init__(self, layer: TopoLayer, return_tuple: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.return_tuple = return_tuple

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor | tuple:
        """Args: hidden_states (B, L, d). Returns: (B, L, d), or a 1-tuple of it."""
        out = self.layer(hidden_states)
        return (out,) if self.return_tuple else out

    def extra_repr(self) -> str:
        return f"return_tuple={self.return_tuple}"


class HFEncoderFamily(ChainFamily):
    """Adapter for transformers encoders with an ``embeddings`` stem and a list of blocks.

    Subclasses set :attr:`model_types` (``config.model_type`` values) and :attr:`block_classes`
    (class names of the original blocks).
    """

    model_types: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()
    #: Points inside a block: (path of the LayerNorm whose input is the state, relative to the block;
    #: fraction of the block's depth, for ordering; insertion mechanism "mid_block" | "pre_norm").
    inner_points: tuple[tuple[str, float, str], ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def _is_block(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.block_classes

    def chain(self, model: nn.Module) -> tuple[str, str]:
        path = block_list_path(model, self._is_block, (TopoBlock,), self.block_classes)
        return self._stem_for(model, path), path

    @staticmethod
    def _stem_for(model: nn.Module, container: str) -> str:
        parts = container.split(".")[:-1]
        while True:  # nearest ancestor of the block list that owns the embeddings
            prefix = ".".join(parts)
            owner = model.get_submodule(prefix)
            if hasattr(owner, "embeddings") and isinstance(owner.embeddings, nn.Module):
                return f"{prefix}.embeddings" if prefix else "embeddings"
            if not parts:
                raise NoSitesFoundError(f"No 'embeddings' module above {container!r} in {type(model).__name__}")
            parts.pop()

    def hidden_size(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def new_layer(self, model: nn.Module, site: Site) -> nn.Module:
        eps = float(getattr(model.config, "layer_norm_eps", 1e-12))
        return TopoLayer(self.hidden_size(model), norm="layernorm", eps=eps)

    @torch.no_grad()
    def _blocks_return_tuple(self, model: nn.Module) -> bool:
        _, container = self.chain(model)
        for block in model.get_submodule(container):
            if self._is_block(block):
                ref = next(block.parameters())
                out = block(torch.zeros(1, 2, self.hidden_size(model), dtype=ref.dtype, device=ref.device))
                first_tensor(out)  # raises if the contract changed beyond tensor / tuple
                return not isinstance(out, torch.Tensor)
        return False

    def wrap(self, model: nn.Module, layer: nn.Module) -> nn.Module:
        return TopoBlock(layer, return_tuple=self._blocks_return_tuple(model))

    def unwrap(self, block: nn.Module) -> nn.Module | None:
        return block.layer if isinstance(block, TopoBlock) else None

    def sync_config(self, model: nn.Module) -> None:
        # transformers sizes head masks by num_hidden_layers (4.x) and drops extra blocks on load (5.x).
        _, container = self.chain(model)
        model.config.num_hidden_layers = len(model.get_submodule(container))

    # -- sites inside blocks ----------------------------------------------------------------------
    def sub_sites(self, model: nn.Module) -> list[Site]:
        _, container = self.chain(model)
        out = []
        for p, block in enumerate(model.get_submodule(container)):
            if not self._is_block(block):
                continue
            for rel, frac, _ in self.inner_points:
                try:
                    norm = block.get_submodule(rel)
                except AttributeError:
                    continue  # a variant without this sub-layer
                if isinstance(norm, nn.LayerNorm):
                    out.append(Site(f"{container}.{p}.{rel}", p + frac, container, p, kind="input"))
        return out

    def _point(self, site: Site) -> tuple[str, str]:
        """(path of the block, mechanism) of a sub-block site."""
        block_path = f"{site.container}.{site.position}"
        for rel, _, mechanism in self.inner_points:
            if site.name == f"{block_path}.{rel}":
                return block_path, mechanism
        raise ValueError(f"{site.name!r} is not a sub-block site of {self.name}")

    def insert_inside(self, model: nn.Module, site: Site, layer: nn.Module) -> None:
        block_path, mechanism = self._point(site)
        if mechanism == "pre_norm":
            parent_path, attr = site.name.rsplit(".", 1)
            norm = model.get_submodule(site.name)
            if isinstance(norm, TopoPreNorm):
                raise ValueError(f"site {site.name!r} already holds an inserted layer")
            setattr(model.get_submodule(parent_path), attr, TopoPreNorm(norm, layer))
            return
        block = model.get_submodule(block_path)
        if hasattr(type(block), "_topo_base"):
            raise ValueError(f"site {site.name!r} already holds an inserted layer")
        self._swap_mid(block, layer)

    @staticmethod
    def _swap_mid(block: nn.Module, layer: nn.Module) -> None:
        """Swap ``block`` to the mid-block class with ``layer`` as ``topo_mid`` (checked bit for bit first)."""
        needed = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
        missing = [n for n in needed if not isinstance(getattr(block, n, None), nn.Module)]
        if missing:
            raise UnsupportedModelError(
                f"{type(block).__name__} has no {missing}: sites inside ViT blocks need the transformers 5.x block layout"
            )
        swap_in_mid_layer(block, layer, _pre_ln_mid_forward, block.layernorm_after.normalized_shape[-1])

    def remove_inside(self, model: nn.Module, site: Site) -> nn.Module:
        block_path, mechanism = self._point(site)
        if mechanism == "pre_norm":
            norm = model.get_submodule(site.name)
            if not isinstance(norm, TopoPreNorm):
                raise ValueError(f"No inserted TopoLayer at site {site.name!r}")
            parent_path, attr = site.name.rsplit(".", 1)
            setattr(model.get_submodule(parent_path), attr, norm.plain())
            return norm.topo
        return swap_out_mid_layer(model.get_submodule(block_path), site.name)

    def inside_layers(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        _, container = self.chain(model)
        out = []
        for path, module in model.get_submodule(container).named_modules(prefix=container):
            if isinstance(module, TopoPreNorm):
                out.append((path, f"{path}.topo", module.topo))
            elif hasattr(type(module), "_topo_base"):
                out.append((f"{path}.layernorm_after", f"{path}.topo_mid", module.topo_mid))
        return out


#: Image-classification heads on the final LayerNorm's output s (B, L, d), by owner class name.
_VIT_HEADS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "ViTForImageClassification": lambda owner, s: owner.classifier(s[:, 0, :]),
    "DeiTForImageClassification": lambda owner, s: owner.classifier(s[:, 0, :]),
    # inference logits of the distilled DeiT: the mean of the class-token and distillation-token heads
    "DeiTForImageClassificationWithTeacher": lambda owner, s: (
        owner.cls_classifier(s[:, 0, :]) + owner.distillation_classifier(s[:, 1, :])
    ) / 2,
}
_VIT_BACKBONES = ("ViTModel", "DeiTModel")


class ViTFamily(HFEncoderFamily):
    """transformers ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, DeiT equivalents).

    The downstream part of a site (:meth:`forward_from`) is known for ``ViTModel`` / ``DeiTModel``
    (predictions = ``last_hidden_state``, the final LayerNorm's output), ``ViTForImageClassification``,
    ``DeiTForImageClassification`` (classifier on token 0) and ``DeiTForImageClassificationWithTeacher``
    (mean of the class-token and distillation-token classifiers), also under a peft wrapper. Other heads
    and inputs with an ``attention_mask`` / ``head_mask`` raise :class:`DownstreamUnsupportedError`.
    """

    name = "vit"
    model_types = ("vit", "deit")
    block_classes = ("ViTLayer", "DeiTLayer")
    inner_points = (("layernorm_after", 0.5, "mid_block"),)

    def head(self, model: nn.Module, inputs: object = None) -> Callable[[torch.Tensor], torch.Tensor]:
        if isinstance(inputs, dict) and any(inputs.get(k) is not None for k in ("attention_mask", "head_mask")):
            raise DownstreamUnsupportedError("ViT blocks would need the attention / head mask: run the full model")
        stem, _ = self.chain(model)
        bb_path = stem.rsplit(".", 1)[0] if "." in stem else ""
        backbone = model.get_submodule(bb_path)
        norm = getattr(backbone, "layernorm", None)
        if type(backbone).__name__ not in _VIT_BACKBONES or not isinstance(norm, nn.Module):
            raise DownstreamUnsupportedError(
                f"Unknown ViT backbone {type(backbone).__name__} (known: {', '.join(_VIT_BACKBONES)}): run the full model"
            )
        if not bb_path:
            return norm  # ViTModel / DeiTModel: the predictions are last_hidden_state
        owner = model.get_submodule(bb_path.rsplit(".", 1)[0] if "." in bb_path else "")
        fn = _VIT_HEADS.get(type(owner).__name__)
        if fn is None:
            raise DownstreamUnsupportedError(
                f"Unknown head {type(owner).__name__} on a {type(backbone).__name__} (known: {', '.join(_VIT_HEADS)}): "
                "run the full model"
            )
        return lambda h: fn(owner, norm(h))


class BertFamily(HFEncoderFamily):
    """transformers BERT and RoBERTa encoders (``BertModel``, ``BertForSequenceClassification``, ...).

    Blocks live at ``<prefix>encoder.layer`` and the stem is ``<prefix>embeddings``. Text batches pad
    sequences: :func:`~topotransfer.derivative.topological.compute_site_statistics` drops the tokens
    whose ``attention_mask`` is 0 from the statistics (their adjoint is zero anyway, because masked keys
    receive no attention, but they must not count as samples).
    """

    name = "bert"
    model_types = ("bert", "roberta")
    block_classes = ("BertLayer", "RobertaLayer")
    inner_points = (("attention.output.LayerNorm", 1 / 3, "pre_norm"), ("output.LayerNorm", 2 / 3, "pre_norm"))

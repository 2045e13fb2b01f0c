"""Hugging Face decoder language models: GPT-2 and the Llama layout (Llama, Qwen2, Mistral).

Chain of states (transformers 5.x):

* GPT-2 (``GPT2Model`` / ``GPT2LMHeadModel``): h_0 = ``drop(wte(ids) + wpe(pos))`` is the output of the
  ``transformer.drop`` module (the stem site), blocks ``transformer.h``; each ``GPT2Block`` is pre-LayerNorm
  and returns a tensor.
* Llama layout (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` and their base models):
  h_0 = ``embed_tokens(ids)`` (the stem site ``model.embed_tokens``), blocks ``model.layers``; each
  decoder layer is RMSNorm pre-norm and is called as ``layer(h, attention_mask=..., position_embeddings=
  (cos, sin), position_ids=..., cache=..., use_cache=...)``, returning a tensor. The rotary embeddings are
  computed once by the model and passed to every layer.

An inserted :class:`~topotransfer.surgery.hf.TopoBlock` is token-wise: it ignores the mask, the rotary
embeddings and the KV cache (it has no keys or values to cache). What the family must keep right is the
cache bookkeeping of the *other* blocks:

* the decoder loop iterates ``layers[: config.num_hidden_layers]``, so the config follows the depth;
* every attention module writes its keys / values to ``cache.layers[attn.layer_idx]``, and transformers
  reads the sequence length and mask sizes from the first cache layer. Cache slots are therefore numbered
  densely over the blocks *that have attention*, in depth order: a TopoBlock takes no slot (so the slot of
  every original block is unchanged), while a copied block (:class:`CopiedBlock`) takes the next slot and
  shifts the slots of the attention blocks after it (:meth:`DecoderFamily.sync_config` renumbers them);
* ``config.layer_types`` (Qwen2 / Mistral-style configs) is indexed by block position in the decoder loop
  and by slot in the cache; both agree only when all layers have one type, so mixed types are refused.

Sites inside a block (``"sublayers"``, :class:`~topotransfer.surgery.midblock.MidBlockSites`): the
residual stream after the attention add, named by the norm it feeds (``<block>.ln_2`` for GPT-2,
``<block>.post_attention_layernorm`` for the Llama layout).

Downstream evaluation from a site (:meth:`ChainFamily.forward_from`) is not provided: it would need the
model's own masks and rotary embeddings, so callers fall back to the full forward pass.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import NoSitesFoundError, UnsupportedModelError
from ..layers import TopoLayer
from .base import ChainFamily, Site, block_list_path
from .hf import TopoBlock
from .midblock import MidBlockSites

__all__ = ["COPIED_BLOCK_TYPE", "CopiedBlock", "DecoderFamily", "GPT2Family", "LlamaFamily"]

#: ``config()["type"]`` of a copied block in insertion records.
COPIED_BLOCK_TYPE = "copied_block"


class CopiedBlock(nn.Module):
    """A copy of a model's own transformer block, inserted as a new block (LLaMA-Pro block expansion).

    The wrapper forwards every argument (mask, rotary embeddings, KV cache) to the copy and returns what it
    returns. It exists so that the surgery can tell inserted copies from original blocks (adapter records,
    trainable-parameter selection); the copy keeps its original class, so transformers' hooks still see a
    decoder layer inside it.

    Args:
        block: the copied block (already a deep copy; its output projections set by the caller).
        source: position, in the container at insertion time, of the block it copies.
    """

    def __init__(self, block: nn.Module, source: int) -> None:
        super().__init__()
        self.block = block
        self.source = int(source)

    def forward(self, *args: object, **kwargs: object) -> object:
        """Exactly the copied block's forward."""
        return self.block(*args, **kwargs)

    def config(self) -> dict:
        """The insertion record's layer entry. Replaying it copies the block that
        :meth:`DecoderFamily.source_position` names for the site (weights are loaded afterwards)."""
        return {"type": COPIED_BLOCK_TYPE, "block": type(self.block).__name__}

    def extra_repr(self) -> str:
        return f"source={self.source}"


def _gpt2_mid_forward(self, hidden_states: torch.Tensor, cache: object = None, attention_mask: object = None,
                      encoder_hidden_states: object = None, encoder_attention_mask: object = None,
                      use_cache: bool | None = False, **kwargs: object) -> torch.Tensor:
    """transformers 5.x ``GPT2Block.forward`` (no cross-attention) with ``self.topo_mid`` on the attention add."""
    if encoder_hidden_states is not None:
        raise ValueError("a layer inside a GPT-2 block does not support cross-attention")
    residual = hidden_states
    attn_output, _ = self.attn(self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask,
                               use_cache=use_cache, **kwargs)
    hidden_states = self.topo_mid(attn_output + residual)  # the inserted layer, on the residual stream m
    return hidden_states + self.mlp(self.ln_2(hidden_states))


def _llama_mid_forward(self, hidden_states: torch.Tensor, attention_mask: object = None, position_ids: object = None,
                       cache: object = None, use_cache: bool | None = False, position_embeddings: object = None,
                       **kwargs: object) -> torch.Tensor:
    """transformers 5.x Llama / Qwen2 / Mistral decoder layer with ``self.topo_mid`` on the attention add."""
    if "past_key_values" in kwargs:  # the original forward's deprecated name for ``cache``
        cache = kwargs.pop("past_key_values")
    residual = hidden_states
    hidden_states, _ = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
        cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
    )
    hidden_states = self.topo_mid(residual + hidden_states)  # the inserted layer, on the residual stream m
    return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DecoderFamily(MidBlockSites, ChainFamily):
    """Adapter for transformers decoder LMs: blocks found by class name, stem by attribute name.

    Subclasses set :attr:`model_types`, :attr:`block_classes`, :attr:`stem_attr` (the stem module's
    attribute on the backbone), :attr:`norm_eps_attr` (the config's norm epsilon) and
    :attr:`output_projections` (the block's sub-modules that write into the residual stream).
    """

    model_types: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()
    stem_attr: str = ""
    norm_eps_attr: str = ""
    output_projections: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def _is_block(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.block_classes

    def chain(self, model: nn.Module) -> tuple[str, str]:
        path = block_list_path(model, self._is_block, (TopoBlock, CopiedBlock), self.block_classes)
        owner = path.rsplit(".", 1)[0] if "." in path else ""
        backbone = model.get_submodule(owner)
        if not isinstance(getattr(backbone, self.stem_attr, None), nn.Module):
            raise NoSitesFoundError(f"No {self.stem_attr!r} module beside {path!r} in {type(model).__name__}")
        return (f"{owner}.{self.stem_attr}" if owner else self.stem_attr), path

    def new_layer(self, model: nn.Module, site: Site) -> nn.Module:
        eps = float(getattr(model.config, self.norm_eps_attr, 1e-5))
        return TopoLayer(int(model.config.hidden_size), norm="layernorm", eps=eps)

    def wrap(self, model: nn.Module, layer: nn.Module) -> nn.Module:
        # transformers 5.x decoder layers return the hidden states as a tensor
        return layer if isinstance(layer, CopiedBlock) else TopoBlock(layer, return_tuple=False)

    def unwrap(self, block: nn.Module) -> nn.Module | None:
        if isinstance(block, TopoBlock):
            return block.layer
        return block if isinstance(block, CopiedBlock) else None

    def _check_layer_types(self, model: nn.Module) -> None:
        types = getattr(model.config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(set(types)) > 1:
            raise UnsupportedModelError(
                f"{type(model).__name__} mixes layer types {sorted(set(types))}: config.layer_types is indexed by "
                "block position in the decoder loop and by cache slot in the KV cache, which an insertion would "
                "make disagree; only models whose layers share one type are supported"
            )

    def insert(self, model: nn.Module, site: str | Site, layer: nn.Module) -> Site:
        self._check_layer_types(model)
        return super().insert(model, site, layer)

    def sync_config(self, model: nn.Module) -> None:
        _, container = self.chain(model)
        blocks = model.get_submodule(container)
        model.config.num_hidden_layers = len(blocks)  # the decoder loop runs layers[:num_hidden_layers]
        types = getattr(model.config, "layer_types", None)
        if isinstance(types, (list, tuple)) and types:
            model.config.layer_types = [types[0]] * len(blocks)  # one type (checked in insert)
        slot = 0
        for block in blocks:  # dense KV-cache slots over the blocks with attention, in depth order
            if isinstance(block, TopoBlock):
                continue
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = slot
            slot += 1

    # -- copied blocks (block expansion) ----------------------------------------------------------------
    def source_position(self, model: nn.Module, site: str | Site) -> int:
        """Position of the original block a copy inserted at ``site`` duplicates.

        The nearest original block before the site (LLaMA-Pro copies the block it follows); at the stem
        site, where no block precedes, the first original block.
        """
        site = self.site(model, site)
        blocks = list(model.get_submodule(site.container))
        originals = [i for i, b in enumerate(blocks) if self.unwrap(b) is None]
        before = [i for i in originals if i < site.position]
        return before[-1] if before else originals[0]

    def check_call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # rotary layout: the identity rotation (cos 1, sin 0) stands in for the model's position embeddings
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "head_dim"):
            shape = (1, x.shape[1], int(attn.head_dim))
            return super().check_call(block, x, position_embeddings=(torch.ones(shape).to(x), torch.zeros(shape).to(x)))
        return super().check_call(block, x)

    def copy_block(self, model: nn.Module, site: str | Site) -> CopiedBlock:
        """A :class:`CopiedBlock` of the block at :meth:`source_position`, output projections zeroed.

        With every output projection (attention output and MLP down projection, weight and bias) at zero,
        the copy adds exactly 0 to both residual branches, so the block is an exact identity.
        """
        position = self.source_position(model, site)
        source = model.get_submodule(self.site(model, site).container)[position]
        block = copy.deepcopy(source)
        base = getattr(type(block), "_topo_base", None)
        if base is not None:  # the source holds a layer inside it: copy the block's own computation only
            del block.topo_mid
            block.__class__ = base
        for name in self.output_projections:
            proj = block.get_submodule(name)
            with torch.no_grad():
                for p in proj.parameters(recurse=False):
                    p.zero_()
        return CopiedBlock(block, position)

    def output_projection_modules(self, block: CopiedBlock) -> dict[str, nn.Module]:
        """``{name: module}`` of the copy's output projections (names relative to the copied block)."""
        return {name: block.block.get_submodule(name) for name in self.output_projections}


class GPT2Family(DecoderFamily):
    """transformers GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``): stem ``transformer.drop``, blocks ``transformer.h``.

    The stem site is the dropout after ``wte + wpe`` because that module outputs h_0 (GPT-2 has no single
    embeddings module). Output projections of a block: ``attn.c_proj`` and ``mlp.c_proj`` (``Conv1D``,
    weight stored (in, out)).
    """

    name = "gpt2"
    model_types = ("gpt2",)
    block_classes = ("GPT2Block",)
    stem_attr = "drop"
    norm_eps_attr = "layer_norm_epsilon"
    output_projections = ("attn.c_proj", "mlp.c_proj")
    mid_norm = "ln_2"
    mid_forward = _gpt2_mid_forward


class LlamaFamily(DecoderFamily):
    """The Llama layout: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` (and base models).

    Stem ``model.embed_tokens``, blocks ``model.layers``; output projections ``self_attn.o_proj`` and
    ``mlp.down_proj``. The inserted TopoLayer normalises with a LayerNorm without affine parameters (its
    own choice; the family's RMSNorm epsilon is reused).
    """

    name = "llama"
    model_types = ("llama", "qwen2", "mistral")
    block_classes = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
    stem_attr = "embed_tokens"
    norm_eps_attr = "rms_norm_eps"
    output_projections = ("self_attn.o_proj", "mlp.down_proj")
    mid_norm = "post_attention_layernorm"
    mid_forward = _llama_mid_forward

"""Checks shared by the decoder-LM family tests (test_surgery_gpt2.py, test_surgery_llama.py, test_expansion.py).

Not a test module: helpers only. Batches are right-padded, with a prompt, so that the probe loss masks
both (labels -100) and the statistics drop the padding (attention_mask 0).
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from topotransfer import insert_layer
from topotransfer.losses import CausalLMLoss, causal_lm_labels

VOCAB, SEQ = 40, 7
LENGTHS = (7, 5, 3)  # real tokens per sequence; the rest is padding
PROMPTS = (2, 1, 1)  # leading prompt tokens per sequence (no loss)
EPS_FD = 1e-4
PAD = 0


def make_batch(seed: int = 1, lengths=LENGTHS, prompts=PROMPTS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), SEQ), generator=g)
    mask = torch.zeros(len(lengths), SEQ, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": causal_lm_labels(ids, mask, list(prompts))}


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def exact_rmsnorm(model: nn.Module) -> nn.Module:
    """Make every ``*RMSNorm`` of ``model`` compute in the input's dtype.

    transformers' RMSNorm casts its input to float32 (even a float64 one), so J carries float32 rounding
    noise that swamps a finite-difference quotient at eps = 1e-4. Finite-difference tests replace the
    forward by the same formula w * h / sqrt(mean(h^2) + eps) in float64. Returns ``model``.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
    return model


@torch.no_grad()
def summed_loss(model: nn.Module, data, loss_fn=None) -> float:
    loss_fn = loss_fn or CausalLMLoss()
    return float(sum(loss_fn(model(**inputs_of(b)).logits, b["labels"]) for b in data))


@torch.no_grad()
def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**inputs_of(batch)).logits


def fd_quadratic(model, site, weight, bias, data, eps=EPS_FD) -> float:
    """2 (J(0) - J(eps)) / eps^2 with a TopoLayer W = eps weight, b = eps bias inserted at ``site`` of a copy."""
    j0 = summed_loss(model, data)
    grown = insert_layer(copy.deepcopy(model), site, weight, bias, epsilon=eps)
    return 2.0 * (j0 - summed_loss(grown, data)) / eps**2


def random_direction(model: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = int(model.config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 6, use_cache: bool = True):
    """Greedy generation: (sequences, per-step logits (new_tokens, B, V))."""
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    return out.sequences, torch.stack(out.logits)


def assert_cached_generation_is_exact(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """Generation with the KV cache equals generation without it (the cache slots are right), and every
    step's logits equal the full forward pass over the generated prefix. Returns the sequences."""
    seq, step_logits = greedy(model, prompt, use_cache=True)
    seq_nc, step_logits_nc = greedy(model, prompt, use_cache=False)
    assert torch.equal(seq, seq_nc), (seq, seq_nc)
    torch.testing.assert_close(step_logits, step_logits_nc, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        full = model(input_ids=seq).logits.float()  # (B, L, V); generate hands out float32 logits
    n = prompt.shape[1]
    for i in range(step_logits.shape[0]):
        torch.testing.assert_close(step_logits[i], full[:, n - 1 + i], rtol=1e-6, atol=1e-6)
    return seq

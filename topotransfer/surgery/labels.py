"""Site names as users think of them: a place in the *original* network plus the order of insertion there.

Surgery names a site by the dotted path of the module whose output it is (``"vit.layers.3"``). After an
insertion the blocks behind it shift, so the same dotted name means another place in the next event. A
*label* does not move:

* an original site keeps the dotted name it has in the base model: ``"vit.embeddings"``, ``"vit.layers.3"``
  (the state after base block 3, 0-based like the module names);
* the output of an inserted layer is ``"<base site>+<n>"``: the n-th layer inserted after that base site,
  counted in the order of insertion (``"vit.layers.3+2"`` is the second layer inserted after block 3 of the
  base model, wherever later insertions put it).

A layer inserted after an inserted layer belongs to the same base site (``"vit.layers.3+1"`` -> ``+2``).
Labels are a pure function of the ordered insertion records, so checkpoints, adapters and results that
keep those records can always recompute them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import ChainFamily

__all__ = ["label_event", "label_insertions", "site_labels"]

_PEFT_PREFIX = "base_model.model."


def _state_index(site: str, stem: str, container: str) -> int:
    """t of the state a dotted site name denotes: 0 for the stem, k + 1 for ``<container>.k``."""
    if site == stem:
        return 0
    head, _, tail = site.rpartition(".")
    if head != container or not tail.isdigit():
        raise ValueError(f"site {site!r} is neither the stem {stem!r} nor a block of {container!r}")
    return int(tail) + 1


def _replay(insertions: Sequence[dict], stem: str, container: str, base_blocks: int) -> tuple[list[str], list[dict]]:
    """Replay the records on the chain of labels; returns (final chain, per record its two labels)."""
    chain = [stem] + [f"{container}.{i}" for i in range(base_blocks)]
    counts: dict[str, int] = {}
    out = []
    for record in insertions:
        t = _state_index(str(record["site"]).removeprefix(_PEFT_PREFIX), stem, container)
        if t >= len(chain):
            raise ValueError(f"insertion at {record['site']!r}: the network has only {len(chain)} sites there")
        base = chain[t].split("+", 1)[0]
        counts[base] = counts.get(base, 0) + 1
        label = f"{base}+{counts[base]}"
        out.append({"site_label": chain[t], "label": label})
        chain.insert(t + 1, label)
    return chain, out


def _names(model: nn.Module, family: ChainFamily | None) -> tuple[ChainFamily, str, str, int]:
    from . import get_family

    family = family or get_family(model)
    stem, container = family.chain(model)
    blocks = len(model.get_submodule(container))
    return family, stem.removeprefix(_PEFT_PREFIX), container.removeprefix(_PEFT_PREFIX), blocks


def label_insertions(model: nn.Module, insertions: Sequence[dict], family: ChainFamily | None = None,
                     strict: bool = True) -> list[dict]:
    """The records with their labels added: ``site_label`` (where the layer went) and ``label`` (the layer).

    Args:
        model: the network *with* these insertions applied (its block count minus theirs is the base depth).
        insertions: ordered ``{"site": dotted name at insertion time, ...}`` records (peft prefix allowed).
        strict: raise on records the labels cannot place; ``False`` returns copies without labels instead
            (site kinds other than block boundaries).

    Returns:
        Copies of the records with ``site_label`` and ``label`` set.
    """
    try:
        _, stem, container, blocks = _names(model, family)
        _, labels = _replay(insertions, stem, container, blocks - len(insertions))
    except ValueError:
        if strict:
            raise
        return [dict(r) for r in insertions]
    return [{**dict(r), **lab} for r, lab in zip(insertions, labels, strict=True)]


def site_labels(model: nn.Module, insertions: Sequence[dict], family: ChainFamily | None = None,
                applied: int | None = None) -> dict[str, str]:
    """``{dotted site name: label}`` for every site (see the module docstring).

    Args:
        model: the network with ``insertions`` applied (peft-wrapped or not; names are given without the
            peft prefix).
        insertions: every insertion the network has had, in order (an adapter's base insertions first).
        applied: name the sites of the network as it was after the first ``applied`` insertions (default:
            all of them, the network as it is).

    Raises:
        ValueError: the records do not fit the model (a site that did not exist when it was recorded).
    """
    family, stem, container, blocks = _names(model, family)
    base_blocks = blocks - len(insertions)
    applied = len(insertions) if applied is None else applied
    chain, _ = _replay(insertions[:applied], stem, container, base_blocks)
    names = [stem] + [f"{container}.{i}" for i in range(base_blocks + applied)]
    return dict(zip(names, chain, strict=True))


def label_event(record: dict, model: nn.Module, insertions: Sequence[dict]) -> dict:
    """Add the labels to a growth / insertion event record (in place; returned too).

    ``site_labels`` maps the dotted names the record uses (its ``scores``, ``realized`` and ``site``, named
    as the network was when the event ran) to labels; ``site_label`` is the label of the chosen site and
    ``label`` that of the inserted layer. A record of site kinds the labels do not know is left as it is.

    Args:
        record: the event record (``"site"`` None when nothing was inserted).
        model: the network after the event.
        insertions: every insertion the network has had, in order, this event's last when it inserted.
    """
    n = len(record["layers"]) if record.get("layers") else int(record.get("site") is not None)  # layers it inserted
    before = len(insertions) - n
    try:
        labels = site_labels(model, insertions, applied=before)
        labelled = label_insertions(model, insertions)
    except ValueError:
        return record
    record["site_labels"] = labels
    if record.get("site") is not None:
        record["site_label"], record["label"] = labelled[-n]["site_label"], labelled[-n]["label"]  # its first layer
    return record

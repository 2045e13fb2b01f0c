"""Inserted TopoLayers as an adapter over an untouched base model (docs/method.md section 9).

Adaptation never changes the backbone's weights: it inserts TopoLayers, trains a head for the target
labels and, optionally, peft LoRA matrices. Two ways to persist the result:

* **Adapter** (:func:`save_adapter` / :func:`load_adapter`): ``adapter_config.json`` (a
  :class:`TopoAdapter`: base model name + revision, its model type, width and depth, the ordered
  insertions, the label set, the LoRA config) and ``adapter_model.safetensors`` holding only the
  inserted layers, the head (when it was trained for the target) and the LoRA matrices. Loading
  re-reads the base with ``from_pretrained``, checks it is the recorded one, replays the insertions
  and loads the tensors.
* **Merged export** (:func:`merge_and_save` / :func:`load_merged`): every weight in one file (LoRA
  folded into the base matrices), the config with the *base* ``num_hidden_layers`` and the insertion
  manifest. The weights are deliberately not called ``model.safetensors``: a plain ``from_pretrained``
  cannot know the inserted blocks (transformers 5.x would silently build only ``num_hidden_layers``
  standard blocks and re-initialise the rest), so it fails loudly instead; :func:`load_merged` rebuilds
  the base architecture, replays the insertions and loads the weights strictly.

Site names in insertion records are relative to the transformers model (never prefixed by a peft
wrapper), in the order the layers were inserted: ``{"site": name at insertion time, "layer": config}``;
saved adapters add the stable ``site_label`` / ``label`` of :mod:`topotransfer.surgery.labels` (the place
in the base model and the insertion order there).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import AdapterMismatchError, CheckpointMismatchError, LabelCountMismatchError
from .surgery import build_inserted, get_family
from .surgery.labels import label_insertions

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT_VERSION",
    "MERGED_MANIFEST_NAME",
    "MERGED_WEIGHTS_NAME",
    "TopoAdapter",
    "check_base",
    "head_module_names",
    "infer_insertions",
    "load_adapter",
    "load_merged",
    "merge_and_save",
    "save_adapter",
    "unwrap_peft",
]

FORMAT_VERSION = 1
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MERGED_MANIFEST_NAME = "topotransfer_manifest.json"
MERGED_WEIGHTS_NAME = "topotransfer_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class TopoAdapter:
    """The content of ``adapter_config.json``: what to re-apply, and to which base model.

    Attributes:
        base_model_name_or_path: hub name or local directory of the untouched base model.
        revision: hub revision of the base (``None`` for local directories / the default branch).
        architecture: transformers class the model was loaded with (e.g. ``"ViTForImageClassification"``).
        model_type: ``config.model_type`` of the base (checked on load).
        hidden_size: width of the base (checked on load).
        base_num_hidden_layers: number of blocks of the base (checked on load).
        insertions: ordered ``{"site": name at insertion time, "layer": TopoLayer config}`` records.
        num_labels: classes of the adapted head.
        id2label: class names of the adapted head (``{"0": name, ...}`` as in transformers configs).
        head: module names of the head saved in the adapter (``[]`` when the base's head is used).
        lora: peft LoRA config dict, or ``None`` when the backbone carries no LoRA.
        tensors: key lists per group (``"inserted"``, ``"head"``, ``"lora"``) of ``adapter_model.safetensors``.
        format_version: version of this file format.
        library: ``"topotransfer"`` and its version.
    """

    base_model_name_or_path: str
    revision: str | None
    architecture: str
    model_type: str
    hidden_size: int
    base_num_hidden_layers: int
    insertions: list[dict] = field(default_factory=list)
    num_labels: int | None = None
    id2label: dict[str, str] | None = None
    head: list[str] = field(default_factory=list)
    lora: dict | None = None
    tensors: dict[str, list[str]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    library: str = f"topotransfer {__version__}"

    def to_dict(self) -> dict:
        """JSON-able dict (the file content)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TopoAdapter:
        """Parse a file content; refuses newer format versions and unknown keys."""
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AdapterMismatchError(
                f"adapter format_version {version!r} is not supported (this topotransfer reads <= {FORMAT_VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterMismatchError(f"adapter config has unknown keys {unknown}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/adapter_config.json``."""
        path = Path(directory) / ADAPTER_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TopoAdapter:
        """Read ``directory/adapter_config.json``.

        Raises:
            FileNotFoundError: the directory holds no adapter.
        """
        path = Path(directory) / ADAPTER_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} holds no {ADAPTER_CONFIG_NAME}: not a topotransfer adapter")
        return cls.from_dict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------------ helpers
def _json_default(obj: object) -> object:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "value"):  # enums (peft_type, task_type)
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def unwrap_peft(model: nn.Module) -> tuple[nn.Module, object | None]:
    """``(transformers model, PeftModel or None)``: the model under a peft wrapper, if there is one."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model(), model
    return model, None


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the backbone (``base_model_prefix``): e.g. ``["classifier"]``."""
    prefix = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]


def _site_name(stem: str, container: str, position: int) -> str:
    """The site whose inserted block goes to ``position`` of the container."""
    return stem if position == 0 else f"{container}.{position - 1}"


def infer_insertions(model: nn.Module) -> list[dict]:
    """An ordered list of insertion records that rebuilds ``model``'s layout from its base.

    Inserting the layers in increasing final position, each at the site just before that position,
    reproduces the layout (every block before it is already in place when it is inserted).

    Returns:
        ``[{"site": name at insertion time, "layer": config}, ...]``.
    """
    model, _ = unwrap_peft(model)
    family = get_family(model)
    stem, container = family.chain(model)
    out = []
    for position, block in enumerate(model.get_submodule(container)):
        layer = family.unwrap(block)
        if layer is not None:
            out.append({"site": _site_name(stem, container, position), "layer": layer.config()})
    # layers inside blocks last: once every block is in place their final site names are valid
    out += [{"site": name, "layer": layer.config()} for name, _, layer in family.inside_layers(model)]
    return out


def _replay(insertions: list[dict], base_depth: int, stem: str, container: str) -> tuple[list[int | None], dict]:
    """Replay ``insertions`` on names only.

    Returns:
        The final block layout (insertion index per position, ``None`` = original block) and
        ``{final site name: insertion index}`` of the insertions inside blocks (sites
        ``<container>.<j>.<path>``, whose block index j shifts with later block insertions).
    """
    layout: list[int | None] = [None] * base_depth
    origin: list[int | None] = list(range(base_depth))  # original block index per position, None = inserted
    inside: dict[tuple[int, str], int] = {}
    for i, ins in enumerate(insertions):
        site = ins.get("site")
        rest = site[len(container) + 1 :] if isinstance(site, str) and site.startswith(f"{container}.") else ""
        head, _, path = rest.partition(".")
        if site == stem:
            position = 0
        elif head.isdigit() and not path:
            position = int(head) + 1
        elif head.isdigit() and int(head) < len(layout) and origin[int(head)] is not None:
            inside[(origin[int(head)], path)] = i  # a sub-block site of an original block
            continue
        else:
            position = -1
        if not 0 <= position <= len(layout):
            raise AdapterMismatchError(
                f"insertion {i} names site {site!r}, which the model does not have at that point "
                f"(sites are {stem!r} and {container}.0 .. {container}.{len(layout) - 1})"
            )
        layout.insert(position, i)
        origin.insert(position, None)
    final = {f"{container}.{origin.index(k)}.{path}": i for (k, path), i in inside.items()}
    return layout, final


def _replay_layout(insertions: list[dict], base_depth: int, stem: str, container: str) -> list[int | None]:
    """Final block layout after replaying ``insertions``: insertion index per position, ``None`` = original."""
    return _replay(insertions, base_depth, stem, container)[0]


def _inserted_keys(model: nn.Module, container: str, positions: list[int | str]) -> list[str]:
    """State-dict keys of inserted layers: block positions (int) or module paths inside blocks (str)."""
    prefixes = tuple(f"{container}.{p}." if isinstance(p, int) else f"{p}." for p in positions)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies; tensors that share storage (tied weights) are cloned apart."""
    out, seen = {}, set()
    for key, value in state.items():
        t = value.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _base_num_labels(name_or_path: str, revision: str | None) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(name_or_path, revision=revision), "num_labels", None)


# ------------------------------------------------------------------------------------------------ adapter
def save_adapter(
    model: nn.Module,
    base_name_or_path: str,
    revision: str | None,
    insertions: list[dict] | None,
    directory: str | Path,
    *,
    include_head: bool | None = None,
) -> TopoAdapter:
    """Write the adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Args:
        model: the adapted transformers model (optionally wrapped by peft ``get_peft_model``).
        base_name_or_path: where the untouched base comes from (hub name or local directory).
        revision: hub revision of the base.
        insertions: ordered insertion records ``{"site", "layer"}`` as they happened; ``None`` derives an
            equivalent order from the model (:func:`infer_insertions`). Checked against the model.
        directory: output directory (created).
        include_head: save the head; ``None`` saves it when its label count differs from the base's.
            Pass ``True`` whenever the head was trained on the target (as the adapt recipe does).

    Returns:
        The :class:`TopoAdapter` written.

    Raises:
        AdapterMismatchError: ``insertions`` do not reproduce the model's layout or layer configs.
    """
    base, peft_model = unwrap_peft(model)
    family = get_family(base)
    stem, container = family.chain(base)
    blocks = base.get_submodule(container)
    positions = [i for i, b in enumerate(blocks) if family.unwrap(b) is not None]
    records = infer_insertions(base) if insertions is None else [
        {"site": str(r["site"]).removeprefix(_PEFT_PREFIX), "layer": dict(r["layer"])} for r in insertions
    ]
    base_depth = len(blocks) - len(positions)
    layout, inside_records = _replay(records, base_depth, stem, container)
    inside = {name: layer for name, _, layer in family.inside_layers(base)}
    if set(inside_records) != set(inside):
        raise AdapterMismatchError(
            f"the insertion records put layers inside blocks at {sorted(inside_records)}, but the model has them at "
            f"{sorted(inside)}"
        )
    for name, index in inside_records.items():
        if inside[name].config() != records[index]["layer"]:
            raise AdapterMismatchError(
                f"insertion {index} records layer {records[index]['layer']} but site {name} holds {inside[name].config()}"
            )
    if [p for p, i in enumerate(layout) if i is not None] != positions:
        raise AdapterMismatchError(
            f"the {len(records)} insertion records put TopoLayers at block positions "
            f"{[p for p, i in enumerate(layout) if i is not None]}, but the model has them at {positions}"
        )
    for position, index in enumerate(layout):
        if index is not None and family.unwrap(blocks[position]).config() != records[index]["layer"]:
            raise AdapterMismatchError(
                f"insertion {index} records layer {records[index]['layer']} but block {position} is "
                f"{family.unwrap(blocks[position]).config()}"
            )
    config = base.config
    num_labels = getattr(config, "num_labels", None)
    if include_head is None:
        include_head = num_labels != _base_num_labels(base_name_or_path, revision)
    head = head_module_names(base) if include_head else []

    state = base.state_dict()
    groups = {"inserted": _inserted_keys(base, container, positions + [p for _, p, _ in family.inside_layers(base)])}
    groups["head"] = [k for k in state if k.split(".", 1)[0] in head]
    tensors = {k: state[k] for k in groups["inserted"] + groups["head"]}
    lora = None
    if peft_model is not None:
        from peft import get_peft_model_state_dict

        lora_state = get_peft_model_state_dict(peft_model)
        groups["lora"] = sorted(lora_state)
        tensors.update(lora_state)
        lora = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(), default=_json_default))
    adapter = TopoAdapter(
        base_model_name_or_path=str(base_name_or_path),
        revision=revision,
        architecture=type(base).__name__,
        model_type=config.model_type,
        hidden_size=int(config.hidden_size),
        base_num_hidden_layers=base_depth,
        insertions=label_insertions(base, records, family, strict=False),
        num_labels=num_labels,
        id2label={str(k): str(v) for k, v in getattr(config, "id2label", {}).items()} or None,
        head=head,
        lora=lora,
        tensors=groups,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_tensors(tensors), str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    adapter.save(directory)
    return adapter


def check_base(model: nn.Module, adapter: TopoAdapter) -> None:
    """Raise :class:`AdapterMismatchError` unless ``model`` is the kind of base ``adapter`` was made on."""
    base, peft_model = unwrap_peft(model)
    if peft_model is not None:
        raise AdapterMismatchError("load_adapter needs the plain base model, not a peft-wrapped one")
    config = getattr(base, "config", None)
    found = {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
    }
    expected = {"model_type": adapter.model_type, "hidden_size": adapter.hidden_size}
    family = get_family(base)  # raises UnsupportedModelError for a model of no family
    _, container = family.chain(base)
    blocks = base.get_submodule(container)
    if any(family.unwrap(b) is not None for b in blocks):
        raise AdapterMismatchError("the model already holds inserted TopoLayers; load the adapter into the plain base")
    found["num_blocks"] = len(blocks)
    expected["num_blocks"] = adapter.base_num_hidden_layers
    if found != expected:
        diff = ", ".join(f"{k}: adapter {expected[k]!r} vs model {found[k]!r}" for k in expected if found[k] != expected[k])
        raise AdapterMismatchError(
            f"the adapter was made for {adapter.base_model_name_or_path!r} and does not fit this "
            f"{type(base).__name__} ({diff})"
        )


def load_adapter(model_or_name: nn.Module | str | Path | None, directory: str | Path) -> nn.Module:
    """Re-apply a saved adapter to its base model.

    Args:
        model_or_name: the base model (changed in place), a hub name / local directory to load it from
            (``from_pretrained`` with the adapter's label set), or ``None`` for the recorded base and revision.
        directory: the adapter directory written by :func:`save_adapter`.

    Returns:
        The adapted model in eval mode (a peft ``PeftModel`` when the adapter carries LoRA).

    Raises:
        AdapterMismatchError: the base model is not the one the adapter was made on.
        LabelCountMismatchError: the base's head has another label count than the adapter's.
    """
    from .models.hf import load_backbone

    adapter = TopoAdapter.load(directory)
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME))
    if model_or_name is None or isinstance(model_or_name, (str, Path)):
        name = adapter.base_model_name_or_path if model_or_name is None else str(model_or_name)
        revision = adapter.revision if name == adapter.base_model_name_or_path else None
        id2label = {int(k): v for k, v in adapter.id2label.items()} if adapter.head and adapter.id2label else None
        model = load_backbone(name, revision, id2label=id2label, architecture=adapter.architecture)
    else:
        model = model_or_name
    check_base(model, adapter)
    labels = getattr(model.config, "num_labels", None)
    head_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in adapter.tensors.get("head", [])}
    saved_shapes = {k: tuple(tensors[k].shape) for k in adapter.tensors.get("head", [])}
    if (adapter.head and head_shapes != saved_shapes) or (not adapter.head and labels != adapter.num_labels):
        raise LabelCountMismatchError(
            f"the adapter's head has {adapter.num_labels} labels but the base model has {labels}: load the base with "
            f"id2label for {adapter.num_labels} classes and ignore_mismatched_sizes=True (or pass its name)"
        )

    family = get_family(model)
    for record in adapter.insertions:
        family.insert(model, record["site"], build_inserted(model, record["site"], record["layer"]))
    own = [k for k in adapter.tensors.get("inserted", []) + adapter.tensors.get("head", [])]
    expected = set(_inserted_keys(model, family.chain(model)[1], [p for p, _ in family.inserted(model)]))
    expected |= set(adapter.tensors.get("head", []))
    if set(own) != expected or not set(own) <= set(tensors):
        raise CheckpointMismatchError(
            f"adapter tensors do not match the replayed model: missing {sorted(expected - set(own))[:5]}, "
            f"unexpected {sorted(set(own) - expected)[:5]}"
        )
    model.load_state_dict({k: tensors[k] for k in own}, strict=False)
    if adapter.head and adapter.id2label:
        model.config.id2label = {int(k): v for k, v in adapter.id2label.items()}
        model.config.label2id = {v: int(k) for k, v in adapter.id2label.items()}
    if adapter.lora is not None:
        from peft import get_peft_config, get_peft_model, set_peft_model_state_dict

        model = get_peft_model(model, get_peft_config(dict(adapter.lora)))
        result = set_peft_model_state_dict(model, {k: tensors[k] for k in adapter.tensors.get("lora", [])})
        lora_missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if getattr(result, "unexpected_keys", None) or lora_missing:
            raise CheckpointMismatchError(
                f"LoRA tensors do not match the model: unexpected {list(result.unexpected_keys)[:5]}, "
                f"missing {lora_missing[:5]}"
            )
    return model.eval()


# ------------------------------------------------------------------------------------------------ merged export
def merge_and_save(
    model: nn.Module,
    directory: str | Path,
    *,
    base_name_or_path: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write a merged export: all weights (LoRA folded in), the base config and the insertion manifest.

    The model itself is not changed (LoRA is merged into a copy).

    Args:
        model: the adapted model (optionally peft-wrapped).
        directory: output directory (created).
        base_name_or_path: provenance recorded in the manifest.
        revision: provenance recorded in the manifest.

    Returns:
        ``directory``. Files: ``config.json`` (``num_hidden_layers`` = the base's), ``topotransfer_manifest.json``
        and ``topotransfer_model.safetensors``; load with :func:`load_merged`.
    """
    base, peft_model = unwrap_peft(model)
    merged = copy.deepcopy(peft_model).merge_and_unload() if peft_model is not None else base
    family = get_family(merged)
    _, container = family.chain(merged)
    insertions = infer_insertions(merged)
    depth = len(merged.get_submodule(container))
    config = copy.deepcopy(merged.config)
    blocks_inserted = sum(isinstance(p, int) for p, _ in family.inserted(merged))
    config.num_hidden_layers = depth - blocks_inserted  # from_config must build the base, then insertions replay
    if isinstance(getattr(config, "layer_types", None), list):  # per-block list (Qwen2 / Mistral configs)
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    config.architectures = [type(merged).__name__]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    tensors = _cpu_tensors(merged.state_dict())
    save_file(tensors, str(directory / MERGED_WEIGHTS_NAME), metadata={"format": "pt"})
    ref = next(merged.parameters())
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": f"topotransfer {__version__}",
        "architecture": type(merged).__name__,
        "model_type": merged.config.model_type,
        "base_model_name_or_path": base_name_or_path,
        "revision": revision,
        "base_num_hidden_layers": depth - blocks_inserted,
        "num_hidden_layers": depth,
        "insertions": insertions,
        "attn_implementation": getattr(merged.config, "_attn_implementation", None),
        "dtype": str(ref.dtype).removeprefix("torch."),
        "lora_merged": peft_model is not None,
    }
    (directory / MERGED_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return directory


def load_merged(directory: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`merge_and_save`.

    The base architecture is built from ``config.json`` (the base ``num_hidden_layers``), the recorded
    insertions are replayed, and the weights are loaded strictly after comparing the key lists.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: not a merged export.
        CheckpointMismatchError: the weights do not match the rebuilt architecture.
    """
    import transformers
    from transformers import AutoConfig

    from .training.checkpoint import replay_insertions

    directory = Path(directory)
    manifest_path = directory / MERGED_MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no {MERGED_MANIFEST_NAME}: not a topotransfer merged export")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointMismatchError(f"merged export format {manifest['format_version']} is newer than this topotransfer")
    config = AutoConfig.from_pretrained(directory)
    if config.num_hidden_layers != manifest["base_num_hidden_layers"]:
        raise CheckpointMismatchError(
            f"config.json has num_hidden_layers={config.num_hidden_layers} but the manifest's base has "
            f"{manifest['base_num_hidden_layers']}"
        )
    cls = getattr(transformers, manifest["architecture"], None)
    if cls is None:
        raise CheckpointMismatchError(f"{manifest['architecture']!r} is not a class of the installed transformers")
    model = cls(config)
    if manifest.get("attn_implementation"):
        model.set_attn_implementation(manifest["attn_implementation"])
    model.to(getattr(torch, manifest.get("dtype", "float32")))
    replay_insertions(model, manifest["insertions"])
    if model.config.num_hidden_layers != manifest["num_hidden_layers"]:
        raise CheckpointMismatchError(
            f"replaying {len(manifest['insertions'])} insertions gave {model.config.num_hidden_layers} blocks, "
            f"the export has {manifest['num_hidden_layers']}"
        )
    tensors = load_file(str(directory / MERGED_WEIGHTS_NAME))
    expected, found = set(model.state_dict()), set(tensors)
    if expected != found:
        raise CheckpointMismatchError(
            f"{directory} does not match the rebuilt {manifest['architecture']}: missing keys "
            f"{sorted(expected - found)[:5]}, unexpected keys {sorted(found - expected)[:5]}"
        )
    model.load_state_dict(tensors, strict=True)
    return model.eval()

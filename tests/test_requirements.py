"""A missing optional package is one line with the pip command, before any data is read or training starts."""

from __future__ import annotations

import pytest

from topotransfer import requirements
from topotransfer.config import load_config
from topotransfer.requirements import MissingPackageError, check_requirements, required_packages


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_required_packages_follow_the_config():
    assert required_packages(cfg("data.name=regression")) == []
    assert [m for m, _ in required_packages(cfg("data.name=digits"))] == ["sklearn"]
    assert [m for m, _ in required_packages(cfg("data.name=mnist"))] == ["pureml", "zarr"]
    assert [m for m, _ in required_packages(cfg("data.name=hf:csv"))] == ["datasets", "PIL"]
    lora = cfg("task=adapt", "data.name=digits", "adapt.method=topo", "adapt.lora=true")
    assert [m for m, _ in required_packages(lora)] == ["sklearn", "peft"]
    assert "peft" not in [m for m, _ in required_packages(cfg("task=adapt", "data.name=digits"))]


def test_missing_peft_fails_before_the_head_phase(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from test_adapt import save_vit

    from topotransfer.cli import main

    base = save_vit(tmp_path / "vit")
    real = requirements._installed
    monkeypatch.setattr(requirements, "_installed", lambda module: module != "peft" and real(module))
    with pytest.raises(MissingPackageError, match=r"needs the package 'peft', which is not installed: pip install peft"):
        check_requirements(cfg("task=adapt", "data.name=digits", "adapt.method=lora"))
    out = tmp_path / "run"
    capsys.readouterr()  # drop what building the test backbone printed (transformers' "Writing model shards" bar)
    assert main(["adapt", "--config", "adapt_digits_vit", f"model.name_or_path={base}", f"output_dir={out}",
                 "adapt.method=lora", "progress=false"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "pip install peft" in message and "\n" not in message
    assert not (out / "history.json").exists() and not (out / "last").exists()  # nothing trained

"""The registry imports only the home module of the kind asked for, and takes import paths."""

import subprocess
import sys

import pytest

from poise import _registry


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n"
                          "print(' '.join(m for m in sys.modules if m.startswith('poise')))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_get_imports_only_the_home_of_its_kind():
    mods = _modules_after("from poise import _registry; _registry.get('optimizer', 'adamw')")
    assert "poise.optim" in mods
    assert not {m for m in mods if m.startswith(("poise.rl", "poise.edit", "poise.continual", "poise.runs"))}


@pytest.mark.parametrize("kind", sorted(_registry.HOMES))
def test_every_home_registers_its_kind(kind):
    assert _registry.names(kind), f"home {_registry.HOMES[kind]} registered no {kind}"


def test_a_path_is_imported_and_a_bad_one_is_named():
    import torch

    assert _registry.get("optimizer", "torch.optim:SGD") is torch.optim.SGD
    with pytest.raises(_registry.UnknownNameError, match="optimizer 'torch.optim:Nope': cannot import it"):
        _registry.get("optimizer", "torch.optim:Nope")
    with pytest.raises(_registry.UnknownNameError, match="unknown strategy 'nope'; valid choices: agem"):
        _registry.get("strategy", "nope")

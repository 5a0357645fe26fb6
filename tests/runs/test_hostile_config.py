"""Hostile values and names fail before any training, naming the key; never a traceback or a path escape."""

import pytest

from poise.cli import main
from poise.runs.config import ConfigError, load_recipe


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("seeds=[-1]", "seeds[0]=-1 must be in [0, 2^63)"),
    ("seeds=[1,1]", "repeats a seed"),
    ("eval.windows=[0]", "eval.windows[0]=0 must be > 0"),
    ("variants.replay.params.mem_size=-5", "variants[1].params: replay: capacity=-5 must be >= 1"),
    ("train.steps_per_task=1000000000000", "at most 10,000,000 per run"),
    ("threads=100000", "threads=100000; valid: 1 to"),
    ("name='x/../../escaped-by-name'", "name='x/../../escaped-by-name' is not a usable name"),
    ("variants.replay.name='../../victim'", "variants[1].name='../../victim' is not a usable name"),
    ("variants.replay.name='.hidden'", "is not a usable name"),
])
def test_bad_values_and_names(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("stability-gap", [override])
    assert message in str(e.value)


def test_a_binary_or_a_directory_recipe_is_named(tmp_path, capsys):
    binary = tmp_path / "x.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert main(["run", str(binary), "--dry-run"]) == 2
    assert "is not a text (UTF-8 TOML) file" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--dry-run"]) == 2
    assert "is a directory; give a .toml file" in capsys.readouterr().err


def test_names_with_spaces_and_percent_are_fine():
    cfg = load_recipe("priming", ["seeds=[0]"])
    assert "ignore-k 8%" in [v.name for v in cfg.variants]


def test_an_editor_refusing_a_singular_system_mid_study_is_one_line_with_exit_2(tmp_path, capsys):
    """MEMIT with lam=0 and fewer keys than the key space is singular: the editor's ValueError becomes one
    line naming the variant and the request (exit 2), not a traceback."""
    code = main(["run", "edit-stream", "--quick", "lm.steps=50", "stream.n_edits=10",
                 "variants=[{editor='memit', params={lam=0.0}}]", "claims=[]", "--run-dir", str(tmp_path / "r"),
                 "--no-progress", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "variants.memit: request 0" in err[-1] and "singular" in err[-1]

"""Every study kind through the one interface: its example recipe loads (``--quick --dry-run``),
every field has help, and a tiny run's summary holds every column the CLI prints."""

import dataclasses
import json

import pytest

from poise.cli import main
from poise.runs.config import field_help, load_recipe
from poise.runs.engine import execute
from poise.runs.kinds import KINDS, StudyKind, get_kind, kind_names, kind_of

# The smallest run of each kind's example recipe that still exercises its whole path.
TINY = {
    "continual": ["workload.n_tasks=2", "train.steps_per_task=4", "variants=[{strategy='finetune'},"
                  "{strategy='replay'}]"],
    "optimizers": ["lm.steps=3", "lm.eval_every=3", "lm.n_layer=1", "lm.n_embd=16"],
    "rl": ["train.steps=1", "train.sft_steps=2", "train.eval_problems=4", "train.prompts=2", "train.group_size=2",
           "variants=[{loss='ppo_clip'}]"],
    "edit": ["lm.n_facts=60", "lm.steps=5", "stream.n_edits=4", "stream.per_request=2", "stream.n_locality=4",
             "stream.n_preserve=8", "stream.eval_every=1", "stream.unlearn_every=0", "stream.v_steps=2",
             "variants=[{name='unedited',editor='none'},{name='rome',editor='rome'}]"],
    "priming": ["lm.n_facts=30", "lm.steps=5", "priming.n_probes=2", "priming.learn_steps=2",
                "variants=[{name='plain'}]"],
    "unlearn": ["model.train_steps=20", "stream.requests=2", "stream.steps=3", "stream.eval_every=1",
                "attack.calibrate=false", "attack.steps=2", "variants=[{method='ga'},{method='retrain'}]"],
    "federated": ["data.n_clients=4", "data.participation=[0.5]", "train.rounds=2", "train.local_steps=2",
                  "eval.warmup=0", "eval.final_window=1"],
}


def test_tiny_sizes_cover_every_kind():
    assert set(TINY) == set(KINDS)  # a new kind needs its line here


@pytest.mark.parametrize("name", kind_names())
def test_example_recipe_loads_quick_dry_run(name, capsys):
    kind = get_kind(name)
    assert isinstance(kind, StudyKind) and kind.name == name
    assert main(["run", kind.example, "--quick", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg.get("kind", "continual") == name
    loaded = load_recipe(kind.example, quick=True)
    assert kind_of(loaded) is kind and len(loaded.seeds) == 1


@pytest.mark.parametrize("name", kind_names())
def test_every_field_has_help(name):
    rows = field_help(get_kind(name).Config)
    assert rows and all(help_ for _, _, _, help_ in rows), [k for k, _, _, h in rows if not h]


@pytest.mark.parametrize("name", kind_names())
def test_columns_exist_in_the_summary(name, tmp_path):
    kind = get_kind(name)
    cfg = load_recipe(kind.example, ["seeds=[0]", *TINY[name]])
    path = execute(cfg, tmp_path / name, progress=False, report=False, kind=kind)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["kind"] == name and summary["complete"]
    for variant, row in summary["variants"].items():
        missing = [k for k, _ in kind.columns if k not in row]
        assert not missing, f"{name}: columns {missing} not in the summary of {variant}"
    config = json.loads((path / "config.json").read_text())
    assert config["kind"] == name
    # the stored config loads back (poise run --resume reads it)
    from poise.runs.config import from_dict

    assert dataclasses.asdict(from_dict(config)) == {k: v for k, v in config.items() if k != "resolved"}


def test_unknown_kind_names_the_choices():
    from poise.runs.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="unknown study kind 'nope'; valid choices: continual, optimizers"):
        from_dict({"kind": "nope"})

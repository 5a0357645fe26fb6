"""One optimizer slot for every study kind (poise.runs.components)."""

import json

import pytest
import torch
from torch import nn

from poise.cli import main
from poise.runs.components import OptimizerSpec, build_optimizer, describe_optimizer, optimizer_class
from poise.runs.config import ConfigError, load_recipe


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.mark.parametrize("name, cls", [("adamw", "poise.optim.adamw.AdamW"), ("stable_spam", "StableSPAM"),
                                       ("sgd", "torch.optim.sgd.SGD"), ("adam", "torch.optim.adam.Adam"),
                                       ("torch.optim:AdamW", "torch.optim.adamw.AdamW")])
def test_every_kind_of_name_builds(name, cls):
    opt = build_optimizer(OptimizerSpec(name, {}), _mlp(), lr=0.01)
    assert describe_optimizer(opt)["class"].endswith(cls)
    assert opt.param_groups[0]["lr"] == 0.01


def test_bad_names_and_arguments_name_the_key():
    with pytest.raises(ConfigError, match="train.optimizer: unknown optimizer 'lion'; valid choices: adam, adamw"):
        build_optimizer(OptimizerSpec("lion"), _mlp(), "train.optimizer")
    with pytest.raises(ConfigError, match="optimizer 'torch.optim:Lion': cannot import it"):
        optimizer_class("torch.optim:Lion")
    with pytest.raises(ConfigError, match="'torch.nn:Linear' is not a torch.optim.Optimizer"):
        optimizer_class("torch.nn:Linear")
    with pytest.raises(ConfigError, match=r"train.optimizer_params.gamma9: unknown argument of optimizer "
                                          r"'stable_spam'; valid: lr, betas"):
        build_optimizer(OptimizerSpec("stable_spam", {"gamma9": 1}), _mlp(), "train.optimizer",
                        "train.optimizer_params")


def test_a_study_setting_the_optimizer_lacks_is_refused_not_dropped():
    # SGD momentum 0.9 with Adam: silently dropping it would change the study
    with pytest.raises(ConfigError, match="optimizer 'adam' takes no 'momentum' argument, but the study sets "
                                          "momentum=0.9"):
        build_optimizer(OptimizerSpec("adam"), _mlp(), lr=0.1, momentum=0.9)
    build_optimizer(OptimizerSpec("adam"), _mlp(), lr=0.1, momentum=0.0)  # off: nothing is lost


@pytest.mark.parametrize("name", ["galore_adamw", "qgalore_adamw"])
def test_low_rank_optimizers_project_the_matrices_and_refuse_without_rank(name):
    opt = build_optimizer(OptimizerSpec(name, {"rank": 2, "update_proj_gap": 5}), _mlp(), lr=0.01)
    groups = describe_optimizer(opt, None)["groups"]
    assert [g["projected_tensors"] for g in groups] == [2, 0]  # the two Linear weights; not the embedding
    assert groups[0]["rank"] == 2 and groups[0]["update_proj_gap"] == 5
    with pytest.raises(ConfigError, match="plain AdamW"):
        build_optimizer(OptimizerSpec(name, {}), _mlp(), lr=0.01)


def test_qgalore_in_the_optimizer_study_projects(tmp_path):
    # regression: qgalore_adamw with params.rank was rejected, and without it trained as plain AdamW
    cfg = load_recipe("optimizers", ["variants=[{optimizer='qgalore_adamw',params={rank=8,lr=0.01}},"
                                     "{optimizer='galore_adamw',params={rank=8,lr=0.01}}]", "seeds=[0]"])
    from poise.runs.kinds.optimizers import resolve

    for v in ("qgalore_adamw", "galore_adamw"):
        groups = resolve(cfg)["optimizers"][v]["groups"]
        assert groups[0]["rank"] == 8 and groups[0]["projected_tensors"] > 0


def test_every_kind_takes_any_optimizer(tmp_path, capsys):
    # continual: a poise optimizer for every variant, and one variant with its own projected optimizer
    run = tmp_path / "c"
    assert main(["run", "tiny", "train.optimizer=stable_spam", "train.lr=0.003", "train.steps_per_task=3",
                 "variants=[{strategy='replay'},{name='replay+galore',strategy='replay',optimizer='galore_adamw',"
                 "optimizer_params={rank=16,lr=0.01}}]", "--run-dir", str(run), "--no-progress", "--no-report"]) == 0
    opts = json.loads((run / "config.json").read_text())["resolved"]["optimizers"]
    assert opts["replay"]["class"] == "poise.optim.stable_spam.StableSPAM"
    assert opts["replay+galore"]["class"] == "poise.optim.galore.GaLoreAdamW"
    assert opts["replay+galore"]["groups"][0]["rank"] == 16 and opts["replay+galore"]["groups"][0]["projected_names"]
    # RL
    run = tmp_path / "r"
    assert main(["run", "rl-stability", "--quick", "train.optimizer=soap", "train.steps=1", "train.sft_steps=2",
                 "train.eval_problems=4", "variants=[{loss='pg'}]", "--run-dir", str(run), "--no-progress",
                 "--no-report"]) == 0
    assert json.loads((run / "config.json").read_text())["resolved"]["optimizer"]["class"] == "poise.optim.soap.SOAP"
    # priming: its learner's optimizer is checked before any training
    assert main(["run", "priming", "--quick", "priming.optimizer=lion", "--dry-run"]) == 2
    assert "priming.optimizer: unknown optimizer 'lion'" in capsys.readouterr().err


def test_the_example_recipe_composes_replay_with_three_optimizers():
    from pathlib import Path

    from poise.runs.kinds.continual import resolve

    recipe = Path(__file__).resolve().parents[2] / "examples" / "replay_galore.toml"
    cfg = load_recipe(str(recipe), quick=True)
    opts = resolve(cfg)["optimizers"]
    assert [o["class"].rsplit(".", 1)[1] for o in opts.values()] == ["SGD", "StableSPAM", "GaLoreAdamW"]
    assert opts["replay+galore16"]["groups"][0]["rank"] == 16


def _label(opt, param):
    """How a poise optimizer names ``param`` in its errors: its name, else its group and index."""
    gi, pi = next((gi, pi) for gi, g in enumerate(opt.param_groups) for pi, p in enumerate(g["params"])
                  if p is param)
    names = opt.param_groups[gi].get("param_names")
    return names[pi] if names else f"param_groups[{gi}].params[{pi}]"


def _poise_optimizer_names():
    from poise import _registry
    from poise import optim as _  # noqa: F401 (registers the optimizers)

    return _registry.names("optimizer")


@pytest.mark.parametrize("name", _poise_optimizer_names())
def test_max_consecutive_skips_reaches_every_poise_optimizer_through_the_slot(name):
    import re

    from poise.optim import NonFiniteGradientError

    rank = {"rank": 2} if name in ("galore_adamw", "qgalore_adamw") else {}
    model = _mlp()
    opt = build_optimizer(OptimizerSpec(name, {"nonfinite": "skip", "max_consecutive_skips": 3, **rank}), model)
    assert (opt.nonfinite, opt.max_consecutive_skips) == ("skip", 3)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]

    def step(bad):
        for p in params:
            p.grad = torch.ones_like(p)
        if bad:
            params[0].grad.view(-1)[0] = float("nan")
        opt.step()

    step(True)
    step(True)
    step(False)  # a finite step resets the count (and may move the weights)
    moved = [p.detach().clone() for p in params]
    step(True)
    step(True)
    with pytest.raises(NonFiniteGradientError, match=r"3 steps in a row skipped .* at step 6 in "
                                                     + re.escape(f"{_label(opt, params[0])}; stopping "
                                                                 "(max_consecutive_skips=3)")):
        step(True)
    assert opt.skipped_steps == 5
    assert all(torch.equal(p, q) for p, q in zip(params, moved, strict=True))
    assert len(before) == len(moved)


@pytest.mark.parametrize("name", _poise_optimizer_names())
def test_nonfinite_raise_through_the_slot_names_the_parameter(name):
    import re

    from poise.optim import NonFiniteGradientError

    rank = {"rank": 2} if name in ("galore_adamw", "qgalore_adamw") else {}
    model = _mlp()
    opt = build_optimizer(OptimizerSpec(name, rank), model)
    assert opt.nonfinite == "raise"
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad.view(-1)[-1] = float("inf")
    label = re.escape(_label(opt, params[-1]))
    with pytest.raises(NonFiniteGradientError, match=f"non-finite gradient in {label}; nothing was updated"):
        opt.step()

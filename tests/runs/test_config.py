import pytest

from poise.runs.config import ConfigError, apply_overrides, field_help, load_recipe, recipe_names


def test_default_recipe_is_the_stability_gap_study():
    cfg = load_recipe()
    assert cfg.name == "stability-gap"
    assert [v.name for v in cfg.variants] == ["finetune", "replay", "ewc", "agem", "ogpsa"]
    assert cfg.seeds == [0, 1, 2] and cfg.eval.every == 1 and cfg.eval.dense_steps == 0
    assert {"stability-gap", "tiny", "domain-shift"} <= set(recipe_names())


@pytest.mark.parametrize("name", ["stability-gap", "tiny", "domain-shift"])
def test_builtin_recipes_validate(name):
    load_recipe(name)


def test_overrides_are_typed_and_address_variants():
    cfg = load_recipe("stability-gap", ["train.lr=0.1", "seeds=[4]", "variants.replay.params.mem_size=50",
                                        "description=hello world"])
    assert cfg.train.lr == 0.1 and cfg.seeds == [4] and cfg.description == "hello world"
    assert cfg.variants[1].params["mem_size"] == 50
    assert load_recipe("tiny", ["train.lr=1"]).train.lr == 1.0  # int accepted for a float


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'; valid keys in train: optimizer, lr"),
    ("bogus=1", "unknown key 'bogus'; valid keys: name, description, seeds"),
    ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
    ("seeds=3", "seeds: expected a list of int"),
    ("train.optimizer=lion", "unknown optimizer 'lion'; valid choices: adam, adamw, classp, frugal, galore_adamw"),
    ("variants.replay.strategy=gem", "unknown strategy 'gem'; valid choices: agem, ema"),
    ("variants.replay.params.memory=5", "unknown parameter of strategy 'replay'; valid: mem_size"),
    ("variants.replay.params.mem_size=big", "params.mem_size: expected int, got str 'big'"),
    ("variants.nope.params.mem_size=5", "no variant 'nope'; variants: finetune, replay"),
    ("workload.model=resnet", "unknown model 'resnet'; valid choices: cnn, mlp"),
    ("workload.scenario=domain", "valid choices: class, task"),
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("seeds=[]", "seeds is empty"),
    ("noequals", "is not key=value"),
])
def test_bad_config_names_key_and_choices(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("stability-gap", [override])
    assert message in str(e.value)


def test_bad_recipe_files(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[train]\nlr = 0.1\nfoo = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'train.foo'"):
        load_recipe(str(p))
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(str(p))
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; valid choices: .*stability-gap"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.toml"))


def test_field_help_covers_every_field():
    keys = {k for k, *_ in field_help()}
    assert {"seeds", "train.lr", "eval.every", "workload.stream", "variants"} <= keys
    assert all(h for *_, h in field_help())


def test_apply_overrides_on_raw_dict():
    d = apply_overrides({}, ["a.b.c=1", "x=[1, 2]"])
    assert d == {"a": {"b": {"c": 1}}, "x": [1, 2]}


# -- sweeps: key=a,b,c on the command line -------------------------------------------------------
def test_sweep_of_a_study_key_makes_one_variant_per_value_with_its_own_config():
    from poise.runs.config import variant_config

    cfg = load_recipe("tiny", ["train.lr=0.01,0.1"])
    assert [v.name for v in cfg.variants] == ["finetune[lr=0.01]", "finetune[lr=0.1]",
                                             "replay[lr=0.01]", "replay[lr=0.1]"]
    assert [variant_config(cfg, i).train.lr for i in range(4)] == [0.01, 0.1, 0.01, 0.1]
    assert cfg.train.lr not in (0.01, 0.1)  # the base config keeps the recipe's value
    assert cfg.variants[3].params == {"mem_size": 50}


def test_sweep_of_one_variants_key_copies_only_that_variant():
    cfg = load_recipe("tiny", ["variants.replay.params.mem_size=10,50"])
    assert [(v.name, v.params) for v in cfg.variants] == [
        ("finetune", {}), ("replay[mem_size=10]", {"mem_size": 10}), ("replay[mem_size=50]", {"mem_size": 50})]
    assert cfg.sweep == {}


def test_two_sweeps_multiply_and_lists_and_quoted_strings_are_not_sweeps():
    cfg = load_recipe("tiny", ["train.lr=0.01,0.1", "variants.replay.params.mem_size=10,50", "seeds=[0, 1]",
                               'description="a, b"'])
    names = [v.name for v in cfg.variants]
    assert len(names) == 6 and "replay[lr=0.1,mem_size=50]" in names
    assert cfg.seeds == [0, 1] and cfg.description == "a, b"


@pytest.mark.parametrize("override, message", [
    ("seeds=0,1", "replicate axis"),
    ("train.lr=0.1,,0.2", "between every two commas"),
    ("train.lr=0.1,0.1", "repeats a value"),
    ("train.lr=0.1,nan", "finite"),
    ("variants.nope.params.mem_size=1,2", "no variant 'nope'"),
    ("train.nokey=1,2", "unknown key"),
])
def test_bad_sweeps_are_refused_naming_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("tiny", [override])


def test_a_sweep_runs_each_value(tmp_path):
    import json

    from poise.runs.engine import run

    cfg = load_recipe("tiny", ["train.lr=0.001,0.5", "seeds=[0]", "variants=[{strategy='finetune'}]",
                               "train.steps_per_task=5"])
    path = run(cfg, tmp_path / "r", progress=False, report=False)
    res = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in (path / "results").glob("*.json")}
    assert set(res) == {"finetune[lr=0.001]", "finetune[lr=0.5]"}
    summary = json.loads((path / "summary.json").read_text())["variants"]
    assert summary["finetune[lr=0.001]"]["acc"]["mean"] != summary["finetune[lr=0.5]"]["acc"]["mean"]

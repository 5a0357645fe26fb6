"""Malformed recipes and checkpoint manifests fail with a clear error (ConfigError or
ValueError naming the problem), never with a traceback from deep inside."""

import json
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poise.runs.checkpoint import latest_checkpoint
from poise.runs.config import ConfigError, apply_overrides, find_recipe, from_dict, recipe_names

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
RECIPES = {n: tomllib.loads(find_recipe(n)[1]) for n in recipe_names()}
KEYS = sorted({f"{t}.{k}" if isinstance(v, dict) else t for d in RECIPES.values() for t, v in d.items()
               for k in (v if isinstance(v, dict) else [None])})


def _load(data):
    try:
        from_dict(data)
    except ConfigError as e:
        assert str(e)  # a message, naming the key
    except ValueError as e:  # ConfigError is a ValueError; others must still say what is wrong
        assert str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(RECIPES)), key=st.sampled_from(KEYS), value=VALUES)
def test_a_recipe_with_one_bad_value_fails_cleanly(name, key, value):
    data = json.loads(json.dumps(RECIPES[name]))
    node = data
    *head, last = key.split(".")
    for h in head:
        node = node.setdefault(h, {}) if isinstance(node.get(h, {}), dict) else {}
    node[last] = value
    _load(data)


@settings(max_examples=150, deadline=None)
@given(data=st.dictionaries(st.text(max_size=10), VALUES, max_size=6))
def test_arbitrary_tables_fail_cleanly(data):
    _load(data)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(RECIPES)), variants=VALUES)
def test_malformed_variants_fail_cleanly(name, variants):
    data = json.loads(json.dumps(RECIPES[name]))
    data["variants"] = variants
    _load(data)


@settings(max_examples=100, deadline=None)
@given(override=st.text(max_size=30))
def test_overrides_fail_cleanly(override):
    try:
        from_dict(apply_overrides(json.loads(json.dumps(RECIPES["tiny"])), [override]))
    except ValueError as e:
        assert str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=60), VALUES.map(lambda v: json.dumps(v).encode()),
                         st.fixed_dictionaries({"step": VALUES, "path": VALUES}).map(lambda v: json.dumps(v).encode())))
def test_malformed_checkpoint_manifests_fail_cleanly(tmp_path, content):
    (tmp_path / "latest.json").write_bytes(content)
    try:
        got = latest_checkpoint(tmp_path)
    except ValueError as e:
        assert "latest.json" in str(e)
    else:
        assert got is None  # nothing usable there: a fresh start


def test_a_manifest_cannot_point_outside_its_directory(tmp_path):
    import pytest

    (tmp_path / "latest.json").write_text(json.dumps({"step": 1, "path": "../../etc"}))
    with pytest.raises(ValueError, match="malformed"):
        latest_checkpoint(tmp_path)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    import pytest
    import torch

    from poise.runs.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    gen = torch.Generator()
    path = save_checkpoint(tmp_path, 4, model, opt, gen, {"x": 1})
    assert load_checkpoint(path, model, opt, gen)["x"] == 1
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_checkpoint(path, model, opt, gen)
    (path / "optimizer.pt").write_bytes(b"not a pickle")
    (path / "state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no integer 'step'"):
        load_checkpoint(path, model, opt, gen)

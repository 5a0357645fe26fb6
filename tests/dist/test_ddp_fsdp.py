"""Two CPU processes joined by gloo give the single-process parameters, for every optimizer,
under DDP (every optimizer) and FSDP2 (shard-safe ones on local shards, the others gathered).

The single process sees the same global batch as two gradient-accumulation halves, the
arithmetic DDP does. Against one full-batch backward the gradients differ by rounding
(~1e-8), which SOAP's eigenbases amplify to ~8e-3 on this toy (degenerate eigenvalues at its
first preconditioner): a property of SOAP, the same in one process."""

import json

import pytest
import torch

from poise.distributed import launch, shard_safety
from tests.dist import _workers as W

NAMES = sorted(shard_safety())


def test_shard_safety_is_declared_and_matches_the_transforms():
    s = shard_safety()
    assert s["adamw"] and s["spam"] and s["classp"]
    assert not s["soap"] and not s["galore_adamw"] and not s["stable_spam"] and not s["frugal"]
    for name in NAMES:  # the class's declaration is what its chain of transforms says
        opt = W.make_optimizer(W.OptimVariantConfig(optimizer=name, params=dict(W.PARAMS.get(name, {}))),
                               W.model())
        assert opt.transform.shard_safe == s[name], name


def test_transforms_declare_shard_safety():
    from poise import transforms as T

    assert T.scale_by_adam().shard_safe and T.chain(T.scale_by_adam(), T.scale_by_learning_rate()).shard_safe
    for t in (T.clip_by_global_norm(), T.scale_by_soap(), T.ignore_top_k(0.1), T.normalize_by_rms(),
              T.clip_spikes_by_max_ema(), T.chain(T.scale_by_adam(), T.clip_by_global_norm())):
        assert not t.shard_safe, t.name


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    ref = W.single(NAMES)
    out = tmp_path / "dist.json"
    launch(W.ddp_worker, 2, NAMES, str(out), mode)
    got = json.loads(out.read_text())
    errors = {}
    for n in NAMES:
        a, b = torch.tensor(ref[n]), torch.tensor(got[n])
        errors[n] = float((a - b).abs().max())
        init = torch.cat([p.detach().flatten() for p in W.model().parameters()])
        assert float((a - init).abs().max()) > 1e-3, f"{n} did not train"
    bad = {n: e for n, e in errors.items() if not e < 1e-5}
    assert not bad, f"{mode}: 2 processes differ from 1 by {bad}"
    # Against one full-batch backward in one process: rounding only, except SOAP (docstring).
    full = W.single(NAMES, micro=1)
    vs_full = {n: float((torch.tensor(full[n]) - torch.tensor(got[n])).abs().max()) for n in NAMES}
    print(f"\n{mode}, max |2 processes - 1 process|, same accumulation:", fmt(errors))
    print(f"{mode}, max |2 processes - 1 process|, one full-batch backward:", fmt(vs_full))
    bad = {n: e for n, e in vs_full.items() if n != "soap" and not e < 1e-6}
    assert not bad, f"{mode}: 2 processes differ from one full-batch process by {bad}"


def fmt(errors: dict[str, float]) -> str:
    return ", ".join(f"{n} {e:.1e}" for n, e in errors.items())


def test_continual_evaluation_is_sharded_and_reduced(tmp_path):
    from poise.measure import ContinualEvaluator

    ref = ContinualEvaluator(W.eval_sets(), batch_size=16).evaluate(W.CountingModel())
    out = tmp_path / "eval.json"
    launch(W.eval_worker, 2, str(out))
    got = json.loads(out.read_text())
    n = sum(len(y) for _, y in W.eval_sets().values())
    assert {int(k): v for k, v in got["accs"].items()} == ref  # same accuracies, exactly
    assert got["total"] == n and got["mine"] == sum((len(y) + 1) // 2 for _, y in W.eval_sets().values())

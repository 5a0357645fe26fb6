"""The speed work of issue 18 (prefix sharing in :func:`poise.rl.generate`, vectorised padding in
:func:`poise.rl.trainer_logprobs` / :func:`poise.rl.completion_batch`, the shared pi_old forward) changes
no number: each is compared here with a verbatim copy of the function as it was before (the
``reference_*`` functions below), bitwise, and a short RL run with the references patched in
gives the same results, key for key (with ``train.share_rows=false``). ``train.share_rows`` (on by
default for a training forward without dropout) gives the same forward values and, up to rounding,
the same gradient."""

# ruff: noqa: E501 - the reference functions are verbatim copies

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of
from poise.rl import completion_batch, generate, sft_warmup, trainer_logprobs
from poise.rl import rollout as R
from poise.rl.rollout import Rollout
from poise.tasks.reasoning import EOS, ArithmeticTask, Problem
from poise.tasks.text import CharTokenizer

TOK = CharTokenizer()


# -- the functions before the change, verbatim ------------------------------------------------
@torch.no_grad()
def reference_generate(model: nn.Module, tokenizer: CharTokenizer, problems: Sequence[Problem], *, group_size: int = 8,
             max_new_tokens: int = 8, temperature: float = 1.0, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None, greedy: bool = False,
             weight_bits: int | None = None) -> list[Rollout]:
    """Sample ``group_size`` completions per problem (stopping at EOS or ``max_new_tokens``)
    and record the sampler's log-probabilities. ``dtype=torch.bfloat16`` runs the sampler's
    forward in bfloat16 autocast: a real train-inference mismatch against a float32 trainer.
    ``weight_bits`` samples from :func:`quantised_copy` ``(model, weight_bits)`` (weight-only
    quantisation of the sampler, a larger and controlled mismatch; ``None`` = the model's own
    weights). ``greedy`` takes the most likely token (evaluation)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if weight_bits is not None:
        model = R.quantised_copy(model, weight_bits)
    eos = tokenizer.encode(EOS)[0]
    was = model.training
    model.eval()
    out: list[Rollout] = []
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    try:
        for _, idx in sorted(R._by_length(range(len(problems)), lambda i: len(prompts[i])).items()):
            x = torch.stack([prompts[i] for i in idx for _ in range(group_size)])
            n, p_len = x.shape
            logps = torch.zeros(n, max_new_tokens)
            done = torch.zeros(n, dtype=torch.bool)
            lengths = torch.full((n,), max_new_tokens)
            for t in range(max_new_tokens):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = logits_of(model(x))[:, -1].float()
                lp = F.log_softmax(logits / temperature, -1)
                if greedy:
                    tok = lp.argmax(-1)
                else:
                    tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(1)
                logps[:, t] = lp.gather(1, tok[:, None]).squeeze(1)
                x = torch.cat([x, tok[:, None]], 1)
                newly = (~done) & (tok == eos)
                lengths[newly] = t + 1
                done |= newly
                if done.all():
                    break
            for row in range(n):
                k = int(lengths[row])
                comp = x[row, p_len : p_len + k]
                i = idx[row // group_size]
                out.append(Rollout(problems[i], prompts[i], comp.clone(), logps[row, :k].clone(),
                                   tokenizer.decode(comp), group=i))
    finally:
        model.train(was)
    return sorted(out, key=lambda r: r.group)  # stable: completions keep their order within a group


def reference_completion_batch(rollouts: Sequence[Rollout]) -> tuple[Tensor, Tensor]:
    """``(sampler_logp [N, T], mask [N, T])``, right-padded to the longest completion."""
    T = max(len(r.completion_ids) for r in rollouts)
    logp = torch.zeros(len(rollouts), T)
    mask = torch.zeros(len(rollouts), T)
    for i, r in enumerate(rollouts):
        k = len(r.completion_ids)
        logp[i, :k] = r.sampler_logp
        mask[i, :k] = 1
    return logp, mask


def reference_trainer_logprobs(model: nn.Module, rollouts: Sequence[Rollout], temperature: float = 1.0,
                     with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(completion token | prefix) ``[N, T]`` under ``model`` (with grad), right-padded
    like :func:`completion_batch` (zeros on padding); with ``with_entropy`` also the
    full-vocabulary entropy of each position (detached)."""
    T = max(len(r.completion_ids) for r in rollouts)
    rows: list[tuple[int, Tensor]] = []
    ents: list[tuple[int, Tensor]] = []
    for _, idx in R._by_length(range(len(rollouts)), lambda i: len(rollouts[i].prompt_ids)).items():
        p_len = len(rollouts[idx[0]].prompt_ids)
        t_max = max(len(rollouts[i].completion_ids) for i in idx)
        x = torch.zeros(len(idx), p_len + t_max, dtype=torch.long)
        for j, i in enumerate(idx):
            r = rollouts[i]
            x[j, :p_len] = r.prompt_ids
            x[j, p_len : p_len + len(r.completion_ids)] = r.completion_ids
        logits = logits_of(model(x))[:, p_len - 1 : p_len - 1 + t_max].float() / temperature
        full = F.log_softmax(logits, -1)
        lp = full.gather(2, x[:, p_len : p_len + t_max, None]).squeeze(2)
        if with_entropy:
            h = -(full.detach().exp() * full.detach()).sum(-1)
        for j, i in enumerate(idx):
            rows.append((i, F.pad(lp[j], (0, T - t_max))))
            if with_entropy:
                ents.append((i, F.pad(h[j], (0, T - t_max))))
    rows.sort(key=lambda t: t[0])
    out = torch.stack([row for _, row in rows])
    _, mask = reference_completion_batch(rollouts)
    if not with_entropy:
        return out * mask
    ents.sort(key=lambda t: t[0])
    return out * mask, torch.stack([e for _, e in ents]) * mask


# -- the comparisons -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def float64_default():
    """Overrides tests/rl/conftest.py: the sampler runs in float32 as in the workbench."""
    yield


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _policy(arch: str) -> nn.Module:
    """A briefly warm-started policy: it ends some completions early (EOS) and not others."""
    from poise.models import build_lm

    if arch == "qwen2":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_lm(arch, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=24)
    sft_warmup(model, TOK, ArithmeticTask(1, seed=5), steps=25, batch_size=32, lr=3e-3, seed=0)
    return model


POLICIES: dict[str, nn.Module] = {}


def policy(arch: str) -> nn.Module:
    if arch not in POLICIES:
        POLICIES[arch] = _policy(arch)
    return POLICIES[arch]


def _problems(seed: int, n: int, mixed: bool) -> list[Problem]:
    """``n`` problems; ``mixed``: prompts of different lengths (1- and 2-digit additions), so several buckets."""
    if not mixed:
        return ArithmeticTask(1, seed=seed).sample(n)
    a, b = ArithmeticTask(1, seed=seed).sample(n), ArithmeticTask(2, seed=seed).sample(n)
    return [p for pair in zip(a, b, strict=True) for p in pair][:n]


def _same_rollouts(a: list[Rollout], b: list[Rollout]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.problem == y.problem and x.text == y.text and x.group == y.group
        assert torch.equal(x.prompt_ids, y.prompt_ids) and torch.equal(x.completion_ids, y.completion_ids)
        assert x.sampler_logp.dtype == y.sampler_logp.dtype and torch.equal(x.sampler_logp, y.sampler_logp)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt", "qwen2"])
def test_generate_equals_the_function_before_prefix_sharing(arch, dtype, threads):
    torch.set_num_threads(threads)
    model = policy(arch)
    cases = [(1, 1, False, False), (1, 4, False, False), (2, 3, True, False), (3, 8, False, False),
             (6, 8, True, False), (16, 8, False, False), (5, 1, True, True), (12, 2, True, True)]
    shared = 0
    for seed, (n, group, mixed, greedy) in enumerate(cases):
        problems = _problems(seed, n, mixed)
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        kw = dict(group_size=group, max_new_tokens=6, dtype=dtype, greedy=greedy)
        new = generate(model, TOK, problems, generator=ga, **kw)
        _same_rollouts(new, reference_generate(model, TOK, problems, generator=gb, **kw))
        assert torch.equal(ga.get_state(), gb.get_state())  # the same random numbers were drawn
        _same_rollouts(generate(model, TOK, problems, generator=torch.Generator().manual_seed(seed),
                                share_prefixes=False, **kw), new)
        shared += len({(r.group, r.text) for r in new}) < len(new)
    assert shared >= 3  # repeated completions: prefix sharing had work to skip


def test_generate_with_quantised_weights_equals_the_function_before():
    model = policy("gpt")
    problems = _problems(3, 8, True)
    new = generate(model, TOK, problems, group_size=4, max_new_tokens=5, weight_bits=3, dtype=torch.bfloat16,
                   generator=torch.Generator().manual_seed(1))
    old = reference_generate(model, TOK, problems, group_size=4, max_new_tokens=5, weight_bits=3,
                             dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    _same_rollouts(new, old)


def test_distinct_active_rows_maps_every_unfinished_row_to_its_prefix():
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]
    x = torch.tensor([a, a, b, a, [9] * 8, b])
    cls = torch.tensor([0, 0, 1, 0, 2, 1])
    done = torch.tensor([False, False, False, False, True, False])
    rows, where = R._distinct_active_rows(x, cls, done)
    assert where is not None and rows.tolist() == [a, b]  # the finished row is skipped
    assert where.tolist()[:4] + where.tolist()[5:] == [0, 0, 1, 0, 1]
    assert R._distinct_active_rows(x[:3], torch.tensor([0, 1, 2]), done[:3])[1] is None  # nothing to share
    assert R._distinct_active_rows(x[:, :4], cls, done)[1] is None  # 2 rows x 4 tokens: too few to share


def _rollouts(seed: int, n: int) -> list[Rollout]:
    """Rollouts with prompts of two lengths, in shuffled order, with repeats and early EOS."""
    g = torch.Generator().manual_seed(seed)
    eos = int(TOK.encode(EOS)[0])
    out = []
    for i, p in enumerate(_problems(seed, n, True)):
        k = int(torch.randint(1, 6, (1,), generator=g))
        comp = torch.randint(0, TOK.vocab_size, (k,), generator=g)
        comp[-1] = eos
        for _ in range(1 + i % 3):  # repeats
            out.append(Rollout(p, TOK.encode(p.prompt), comp.clone(), -torch.rand(k, generator=g), "", i))
    perm = torch.randperm(len(out), generator=g).tolist()
    return [out[j] for j in perm]


@pytest.mark.parametrize("arch", ["gpt", "qwen2"])
def test_trainer_logprobs_values_and_gradients_equal_the_function_before(arch):
    model = policy(arch)
    rollouts = _rollouts(0, 12)
    w = torch.randn(len(rollouts), 5, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (trainer_logprobs, reference_trainer_logprobs):
        model.zero_grad()
        lp, ent = fn(model, rollouts, temperature=0.7, with_entropy=True)
        (lp * w[:, : lp.shape[1]]).sum().backward()
        grads.append((lp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (a, ea, ga), (b, eb, gb) = grads
    assert torch.equal(a, b) and torch.equal(ea, eb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    assert torch.equal(trainer_logprobs(model, rollouts), reference_trainer_logprobs(model, rollouts))


def test_share_rows_gives_the_same_values_and_the_same_gradient_up_to_rounding():
    model = policy("qwen2")
    rollouts = _rollouts(2, 12)
    assert len(R._distinct_rollouts(rollouts)[0]) < len(rollouts)
    w = torch.randn(len(rollouts), 5, generator=torch.Generator().manual_seed(1))
    got = []
    for share in (False, True):
        model.zero_grad()
        lp, ent = trainer_logprobs(model, rollouts, with_entropy=True, share_rows=share)
        (lp * w[:, : lp.shape[1]]).sum().backward()
        got.append((lp.detach(), ent, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (a, ea, ga), (b, eb, gb) = got
    assert torch.equal(a, b) and torch.equal(ea, eb)
    assert float((ga - gb).norm()) <= 1e-6 * float(ga.norm())  # float32 rounding, not another gradient
    with torch.no_grad():  # a forward only: exactly the same
        assert torch.equal(trainer_logprobs(model, rollouts, share_rows=True), a)


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_completion_batch_equals_the_function_before(default):
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        rollouts = _rollouts(1, 9)
        for a, b in zip(completion_batch(rollouts), reference_completion_batch(rollouts), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        p = rollouts[0].problem  # a sampler_logp with one value per completion broadcasts, as before
        odd = [*rollouts, Rollout(p, TOK.encode(p.prompt), torch.tensor([1, 2, 3]), torch.tensor([-0.5]), "", 0)]
        for a, b in zip(completion_batch(odd), reference_completion_batch(odd), strict=True):
            assert torch.equal(a, b)
    finally:
        torch.set_default_dtype(old)


def _short_run(recipe: str, variant: str, extra: tuple[str, ...] = ()) -> dict:
    from poise.runs.config import load_recipe
    from poise.runs.kinds.rl import run_one_rl

    cfg = load_recipe(recipe, ["train.steps=3", "train.prompts=6", "train.group_size=4", "train.sft_steps=60",
                               "train.eval_every=2", "train.eval_problems=6", "train.checkpoint_every=0",
                               "train.eval_pass1_samples=2", "seeds=[0]", *extra])
    r = run_one_rl(cfg, [v.name for v in cfg.variants].index(variant), 0)
    return {k: v for k, v in r.items() if k not in ("wall_seconds", "seconds_per_step")}


@pytest.mark.parametrize("recipe, variant, extra", [
    ("rl-stability", "pg_is_stale4", ()),  # bfloat16 sampler on 3-bit weights; pi_old forward (shared rows)
    ("rl-stability", "ppo_clip", ("train.model=qwen2", "train.sampler_dtype=float32", "train.sampler_bits=0")),
    ("rl-paraphrase", "ps_grpo_task", ()),  # prompts of several lengths
])
def test_a_short_run_equals_the_run_with_the_functions_before(recipe, variant, extra, monkeypatch):
    import poise.runs.kinds.rl as rs

    if "train.model=qwen2" in extra:
        pytest.importorskip("transformers")
    torch.set_num_threads(1)
    extra = (*extra, "train.share_rows=false")  # every row in the training forward, as before
    new = _short_run(recipe, variant, extra)
    monkeypatch.setattr(R, "generate", reference_generate)  # what collect samples with
    monkeypatch.setattr(rs, "generate", reference_generate)  # evaluation
    monkeypatch.setattr(rs, "completion_batch", reference_completion_batch)
    monkeypatch.setattr(R, "trainer_logprobs",
                        lambda m, r, temperature=1.0, with_entropy=False, share_rows=False:
                        reference_trainer_logprobs(m, r, temperature, with_entropy))
    monkeypatch.setattr(rs, "trainer_logprobs", R.trainer_logprobs)
    old = _short_run(recipe, variant, extra)
    assert new.keys() == old.keys()
    for key in new:
        assert new[key] == old[key], key
    assert any(x > 0 for x in new["curves"]["reward"])  # a real update happened


def test_share_rows_run_starts_identically_and_stays_close():
    torch.set_num_threads(1)
    extra = ("train.model=qwen2", "train.sampler_dtype=float32", "train.sampler_bits=0")
    pytest.importorskip("transformers")
    a = _short_run("rl-stability", "ppo_clip", (*extra, "train.share_rows=false"))
    b = _short_run("rl-stability", "ppo_clip", (*extra, "train.share_rows=true"))
    assert a["curves"]["reward"][0] == b["curves"]["reward"][0]  # the same first batch
    assert a["curves"]["entropy"][0] == b["curves"]["entropy"][0]  # the same forward values
    assert b["curves"]["grad_norm"][0] == pytest.approx(a["curves"]["grad_norm"][0], rel=1e-5)
    assert a["curves"]["grad_norm"][0] != b["curves"]["grad_norm"][0]  # other rounding: the rows were shared
    # the default ("auto") shares rows for this model, which has no dropout
    assert _short_run("rl-stability", "ppo_clip", extra) == b


def test_share_rows_is_auto_true_or_false():
    from poise.runs.config import ConfigError, load_recipe
    from poise.runs.kinds.rl import validate_rl

    assert load_recipe("rl-stability", []).train.share_rows == "auto"
    for ok in ("auto", "true", "false"):
        validate_rl(load_recipe("rl-stability", [f"train.share_rows={ok}"]))
    with pytest.raises(ConfigError, match="share_rows=1; valid choices: auto, true, false"):
        validate_rl(load_recipe("rl-stability", ["train.share_rows=1"]))
    from poise.runs.kinds.rl import resolve  # what "auto" came to is written in config.json's "resolved"

    assert resolve(load_recipe("rl-stability", []))["share_rows"] == {
        "value": True, "why": "auto: the training forward is deterministic"}
    assert resolve(load_recipe("rl-stability", ["train.share_rows=false"]))["share_rows"] == {"value": False,
                                                                                            "why": "set"}


def test_auto_does_not_share_the_rows_of_a_random_forward():
    from torch import nn

    from poise.rl import stochastic_forward

    assert stochastic_forward(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) is None
    assert "dropout with p=0.1" in stochastic_forward(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=20)
    assert stochastic_forward(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))) is None
    dropped = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(attention_dropout=0.1, **cfg))
    assert stochastic_forward(dropped) == "its config sets attention_dropout=0.1"
    wrapped = nn.Module()
    wrapped.module = dropped  # DDP's layout
    assert stochastic_forward(wrapped) == "its config sets attention_dropout=0.1"
    # Mixtral's router jitter is random too; GPT-2's summary_first_dropout is not the LM's
    mx = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=17, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5))
    assert stochastic_forward(mx) == "its config sets router_jitter_noise=0.5"
    g2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20,
                                                              resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    assert stochastic_forward(g2) is None


_ = (F, Tensor, logits_of)  # used by the verbatim references

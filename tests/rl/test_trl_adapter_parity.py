"""PoiseGRPOTrainer against TRL's own ``GRPOTrainer._compute_loss`` (installed trl), one GRPOConfig
loss setting at a time: same batch (ragged, with an empty row), same forward (a leaf tensor of
log-probs and entropies replaces the model), float64; loss and gradient <= 1e-8, and TRL's logged
metrics equal. Settings poise cannot honour must raise at construction naming the field.

``pytest tests/rl/test_trl_adapter_parity.py -s`` prints the table (setting -> forwarded / refused,
loss error, gradient error)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL adapter needs the trl extra")

from poise.integrations.trl import PoiseGRPOTrainer, trl_loss_plan  # noqa: E402

B, T, MAXLEN = 6, 7, 9
ROWS: list[tuple[str, str, float | None, float | None]] = []


class _Acc:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def pad_across_processes(self, x, *a, **k):
        return x

    def reduce(self, x, *a, **k):
        return x


def _config(**kw):
    return trl.GRPOConfig(output_dir="/tmp/poise-trl-parity", use_cpu=True, bf16=False, report_to="none",
                          max_completion_length=MAXLEN, **kw)


def _common(t, cfg, logp, ent, training, ga):
    t.__dict__.update(
        args=cfg, accelerator=_Acc(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=training), current_gradient_accumulation_steps=ga, aux_loss_enabled=False,
        router_aux_loss_coef=0.0)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)


def _trl(cfg, logp, ent, inputs, training=True, ga=1):
    t = object.__new__(trl.GRPOTrainer)
    _common(t, cfg, logp, ent, training, ga)
    t.__dict__.update(  # as GRPOTrainer.__init__ sets them from the config
        loss_type=cfg.loss_type, epsilon_low=cfg.epsilon,
        epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon, beta=cfg.beta,
        importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=cfg.top_entropy_quantile,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold, use_vllm=cfg.use_vllm,
        vllm_importance_sampling_correction=cfg.vllm_importance_sampling_correction,
        max_completion_length=cfg.max_completion_length, entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=cfg.use_adaptive_entropy,
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0 or cfg.use_adaptive_entropy)
    return t._compute_loss(None, inputs), t._metrics["train" if training else "eval"]


def _ours(cfg, logp, ent, inputs, training=True, ga=1, **poise):
    t = object.__new__(PoiseGRPOTrainer)
    _common(t, cfg, logp, ent, training, ga)
    t.poise_plan = trl_loss_plan(cfg, **poise)
    return t.compute_loss(None, inputs), t._metrics["train" if training else "eval"]


def _trl_is_ratio(cfg, old, behav, mask):
    """TRL 1.16 ``_generate_and_score_completions``: the vLLM importance-sampling ratio."""
    diff = torch.nan_to_num((old - behav) * mask, nan=0.0)
    if cfg.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    r = torch.exp(diff)
    lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    if cfg.vllm_importance_sampling_mode.endswith("truncate"):
        return torch.clamp(r, min=lo, max=hi)
    bad = (r < (lo if lo is not None else -math.inf)) | (r > (hi if hi is not None else math.inf))
    return r.masked_fill(bad, 0.0)


def _batch(cfg, seed, tool_mask=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)
    behav = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])  # row 2 is empty (TRL grpo counts it)
    cmask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": cmask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    mask = cmask
    if tool_mask:
        tm = torch.ones(B, T, dtype=torch.long)
        tm[0, 2:4] = 0
        tm[5, 1] = 0
        inputs["tool_mask"] = tm
        mask = cmask * tm
    if cfg.use_vllm or cfg.off_policy_mask_threshold is not None:
        inputs["sampling_per_token_logps"] = behav
    if cfg.use_vllm and cfg.vllm_importance_sampling_correction:
        inputs["importance_sampling_ratio"] = _trl_is_ratio(cfg, old, behav, mask)
    inputs["num_items_in_batch"] = mask.sum()
    return logp, ent, inputs


TOK = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
SETTINGS = {
    **{f"loss_type={lt}": ({"loss_type": lt}, {}) for lt in TOK},
    **{f"loss_type={lt}, importance_sampling_level=sequence": (
        {"loss_type": lt, "importance_sampling_level": "sequence"}, {})
       for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")},
    "epsilon=0.1, epsilon_high=0.3": ({"loss_type": "grpo", "epsilon": 0.1, "epsilon_high": 0.3}, {}),
    "cispo epsilon_high=1.2": ({"loss_type": "cispo", "epsilon_high": 1.2}, {}),
    "delta=1.5 (>= 1+epsilon_high)": ({"loss_type": "dapo", "delta": 1.5, "epsilon_high": 0.28}, {}),
    "sapo_temperature_pos=0.8, _neg=1.3": ({"loss_type": "sapo", "sapo_temperature_pos": 0.8,
                                           "sapo_temperature_neg": 1.3}, {}),
    "beta=0.04 (grpo)": ({"loss_type": "grpo", "beta": 0.04}, {}),
    "beta=0.04, use_bias_correction_kl=False": ({"loss_type": "dapo", "beta": 0.04,
                                                 "use_bias_correction_kl": False}, {}),
    "beta=0.04, importance_sampling_level=sequence": ({"loss_type": "grpo", "beta": 0.04,
                                                       "importance_sampling_level": "sequence"}, {}),
    "top_entropy_quantile=0.3 (grpo)": ({"loss_type": "grpo", "top_entropy_quantile": 0.3}, {}),
    "top_entropy_quantile=0.3, sequence level": ({"loss_type": "grpo", "top_entropy_quantile": 0.3,
                                                  "importance_sampling_level": "sequence"}, {}),
    "top_entropy_quantile=0.0 (dapo)": ({"loss_type": "dapo", "top_entropy_quantile": 0.0}, {}),
    "off_policy_mask_threshold=0.02": ({"loss_type": "grpo", "off_policy_mask_threshold": 0.02}, {}),
    "entropy_coef=0.01": ({"loss_type": "dapo", "entropy_coef": 0.01}, {}),
    "entropy_coef=0.01, top_entropy_quantile=0.5": ({"loss_type": "grpo", "entropy_coef": 0.01,
                                                     "top_entropy_quantile": 0.5}, {}),
    **{f"use_vllm, vllm_importance_sampling_mode={m}": (
        {"loss_type": "grpo", "use_vllm": True, "vllm_importance_sampling_mode": m,
         "vllm_importance_sampling_clip_min": 0.8 if m.endswith("truncate") else 0.5,
         "vllm_importance_sampling_clip_max": 1.5}, {})
       for m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
    "use_vllm, sequence_mask (default), sequence level": (
        {"loss_type": "dapo", "use_vllm": True, "importance_sampling_level": "sequence"}, {}),
    "use_vllm, vllm_importance_sampling_correction=False": (
        {"loss_type": "grpo", "use_vllm": True, "vllm_importance_sampling_correction": False}, {}),
    "tool_mask (input)": ({"loss_type": "grpo"}, {"tool_mask": True}),
    "tool_mask, dapo, beta, vLLM token_mask": ({"loss_type": "dapo", "beta": 0.04, "use_vllm": True,
                                               "vllm_importance_sampling_mode": "token_mask"}, {"tool_mask": True}),
    "eval mode (grpo)": ({"loss_type": "grpo"}, {"training": False}),
    "grad-accum 2, steps_per_generation 2 (dapo)": ({"loss_type": "dapo", "steps_per_generation": 2}, {"ga": 2}),
    "grad-accum 2 (grpo)": ({"loss_type": "grpo", "steps_per_generation": 2}, {"ga": 2}),
    "everything (grpo, seq): beta, vLLM, top-entropy, OPSM, entropy_coef": (
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04, "use_vllm": True,
         "top_entropy_quantile": 0.4, "off_policy_mask_threshold": 0.02, "entropy_coef": 0.01}, {"tool_mask": True}),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_adapter_matches_trl_compute_loss(name):
    cfg_kw, run = SETTINGS[name]
    cfg = _config(**cfg_kw)
    training, ga = run.get("training", True), run.get("ga", 1)
    worst_l = worst_g = 0.0
    for seed in (0, 1, 2):
        logp, ent, inputs = _batch(cfg, seed, run.get("tool_mask", False))
        theirs, m_theirs = _trl(cfg, logp, ent, inputs, training, ga)
        g_theirs = torch.autograd.grad(theirs, logp)[0]
        ours, m_ours = _ours(cfg, logp, ent, inputs, training, ga)
        g_ours = torch.autograd.grad(ours, logp)[0]
        assert torch.isfinite(theirs)
        worst_l = max(worst_l, abs(float(ours.detach() - theirs.detach())))
        worst_g = max(worst_g, float((g_ours - g_theirs).abs().max()))
        for k, v in m_theirs.items():  # every metric TRL logs, with TRL's name and value
            assert k in m_ours, (k, sorted(m_ours))
            assert m_ours[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
    ROWS.append((name, "forwarded", worst_l, worst_g))
    assert worst_l <= 1e-8 and worst_g <= 1e-8


REFUSED = {
    "loss_type=vespo": ({"loss_type": "vespo"}, "loss_type='vespo'"),
    "use_adaptive_entropy=True": ({"use_adaptive_entropy": True}, "use_adaptive_entropy=True"),
    "delta=1.1 < 1+epsilon_high": ({"loss_type": "grpo", "delta": 1.1, "epsilon_high": 0.28}, "delta=1.1"),
    "delta with importance_sampling_level=sequence": (
        {"loss_type": "grpo", "delta": 2.0, "importance_sampling_level": "sequence"}, "delta=2.0"),
    "cispo, importance_sampling_level=sequence": (
        {"loss_type": "cispo", "importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
    "sapo, importance_sampling_level=sequence": (
        {"loss_type": "sapo", "importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unhonourable_fields_are_refused_at_construction(name):
    cfg_kw, field = REFUSED[name]
    cfg = _config(**cfg_kw)
    with pytest.raises(ValueError, match=f"GRPOConfig.{field} cannot be honoured by PoiseGRPOTrainer"):
        PoiseGRPOTrainer(model=None, args=cfg)  # raises before TRL touches the (absent) model
    ROWS.append((name, "refused", None, None))


def test_poise_loss_mode_forwards_or_refuses_config_fields():
    plan = trl_loss_plan(_config(loss_type="grpo", epsilon=0.1, epsilon_high=0.3, delta=2.0), poise_loss="ppo_clip")
    assert plan.loss_kwargs == {"eps_low": 0.1, "eps_high": 0.3, "dual_clip": 2.0, "convention": "trl"}
    assert plan.normaliser == "grpo"
    with pytest.raises(ValueError, match="GRPOConfig.delta=2.0 cannot be honoured.*poise_loss='pg' has no dual_clip"):
        trl_loss_plan(_config(delta=2.0), poise_loss="pg")
    with pytest.raises(ValueError, match="GRPOConfig.epsilon_high=0.3 .*poise_loss_kwargs sets eps_high=0.28"):
        trl_loss_plan(_config(epsilon_high=0.3), poise_loss="cispo", poise_loss_kwargs={"eps_high": 0.28})
    with pytest.raises(ValueError, match="GRPOConfig.vllm_importance_sampling_correction=True .*poise_is"):
        trl_loss_plan(_config(use_vllm=True), poise_loss="pg", poise_is=("token", "truncate", 2.0))
    with pytest.raises(ValueError, match="GRPOConfig.vllm_importance_sampling_correction=True .*minirl"):
        trl_loss_plan(_config(use_vllm=True), poise_loss="minirl")
    with pytest.raises(ValueError, match="GRPOConfig.importance_sampling_level='sequence' .*poise_loss='gspo'"):
        trl_loss_plan(_config(importance_sampling_level="sequence"), poise_loss="ppo_clip")
    # the same TRL composition around a poise loss: ppo_clip with TRL's epsilon equals TRL's dapo
    cfg = _config(loss_type="dapo", beta=0.04, top_entropy_quantile=0.5)
    logp, ent, inputs = _batch(cfg, 0)
    theirs, _ = _trl(cfg, logp, ent, inputs)
    ours, m = _ours(cfg, logp, ent, inputs, poise_loss="ppo_clip")
    assert abs(float((ours - theirs).detach())) <= 1e-12 and "poise/ratio/mean" in m


def test_seq_modes_count_empty_rows_as_trl():
    # the old adapter divided by the non-empty rows: 0.11 relative from TRL grpo on such a batch
    cfg = _config(loss_type="grpo")
    logp, ent, inputs = _batch(cfg, 0)
    theirs, _ = _trl(cfg, logp, ent, inputs)
    ours, _ = _ours(cfg, logp, ent, inputs, poise_aggregation="seq_mean_token_mean", poise_loss="ppo_clip")
    assert abs(float((ours - theirs).detach())) <= 1e-12


def test_print_table():
    """Run last (-s): the table the closing note quotes."""
    if not ROWS:
        pytest.skip("run with the parity tests")
    w = max(len(r[0]) for r in ROWS)
    print(f"\nTRL {trl.__version__} GRPOConfig setting -> PoiseGRPOTrainer (float64, 3 seeds, worst case)")
    print(f"{'setting':<{w}}  {'status':<9}  {'loss err':>9}  {'grad err':>9}")
    def fmt(x):
        return "-" if x is None else f"{x:.1e}"

    for name, status, el, eg in ROWS:
        print(f"{name:<{w}}  {status:<9}  {fmt(el):>9}  {fmt(eg):>9}")

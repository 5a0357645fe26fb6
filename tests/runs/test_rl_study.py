import json

import pytest
import torch

from poise.cli import main
from poise.rl import PolicyBatch
from poise.runs.config import ConfigError, RLStudyConfig, RLVariantConfig, load_recipe
from poise.runs.kinds.rl import variant_objective
from poise.runs.store import read_jsonl

QUICK = ["seeds=[0]", "train.steps=3", "train.prompts=4", "train.group_size=4", "train.sft_steps=20",
         "train.eval_problems=10", "train.eval_every=2", "train.n_embd=16"]


def test_rl_recipe_validates():
    cfg = load_recipe("rl-stability")
    assert isinstance(cfg, RLStudyConfig) and cfg.train.sampler_dtype == "bfloat16" and cfg.train.sampler_bits == 3
    assert [v.name for v in cfg.variants] == ["pg_is", "pg_nois", "ppo_clip", "pg_is_stale4", "pg_nois_stale4",
                                              "ppo_clip_stale4"]
    names = {v.name for v in cfg.variants}
    assert all(c.better.variant in names and c.than.variant in names for c in cfg.claims) and len(cfg.claims) == 2


def test_rl_study_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "rl-stability", "--run-dir", str(run_dir), "--no-progress", *QUICK]) == 0
    assert "pg_is" in capsys.readouterr().out
    rows = read_jsonl(run_dir / "metrics" / "ppo_clip_stale4-s0.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "held_out_acc" in rows[1] and "mismatch/abs_log_ratio" in rows[0] and "ratio/mean" in rows[0]
    assert rows[0]["mismatch/abs_log_ratio"] > 0  # the bfloat16 sampler differs from the float32 trainer
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["variants"]["ppo_clip"]["collapsed"]["runs"] == 1
    assert 0 <= summary["variants"]["pg_is"]["late_pass1"]["mean"] <= 1  # the claims' metric is there
    assert (run_dir / "report.html").read_text().count("<img") == 3  # accuracy vs staleness; per staleness; curves


@pytest.mark.parametrize("loss", ["pg", "ppo_clip", "gspo", "cispo", "sapo", "minirl", "decoupled_ppo"])
@pytest.mark.parametrize("is_level", ["none", "token", "sequence"])
def test_policy_loss_dispatch_is_finite_and_on_policy_is_pg(loss, is_level):
    if is_level != "none" and loss in ("minirl", "decoupled_ppo"):
        pytest.skip("these losses correct the mismatch themselves; a recipe with is_level is refused")
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 5, generator=g)).requires_grad_(True)
    old = logp.detach().clone()
    behav = old.clone()  # no mismatch: IS weights are 1
    adv = torch.randn(6, generator=g)
    mask = torch.ones(6, 5)
    v = RLVariantConfig(name="x", loss=loss, is_level=is_level)
    values, agg_mask, metrics = variant_objective(v, PolicyBatch(logp, old, behav, adv, mask))
    assert torch.equal(agg_mask, mask)
    values.sum().backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(6, 5))


@pytest.mark.parametrize("override, message", [
    ("variants.pg_is.loss=kl", "'kl' is not a policy loss; valid choices: pg, ppo_clip"),
    ("variants.pg_is.is_level=batch", "is_level: 'batch'; valid choices: none, token, sequence, geometric"),
    ("variants.ppo_clip.params.eps=0.1", "unknown argument of loss 'ppo_clip'; valid: eps_low"),
    ("variants.pg_is.loss=minirl", "loss 'minirl' corrects the sampler mismatch with its own behav_logp"),
    ("train.sampler_dtype=float16", "valid choices: bfloat16, float32"),
    ("train.sampler_bits=1", "train.sampler_bits=1: 0 (the trainer's weights) or an integer 2-16"),
    ("train.eval_pass1_samples=-1", "train.eval_pass1_samples=-1 must be >= 0"),
    ("task.name=chess", "unknown rl_task 'chess'; valid choices: arithmetic, countdown"),
    ("task.level=9", "level=9 is out of range"),
    ("train.group_size=1", "group_size=1 must be >= 2"),
])
def test_bad_rl_recipe(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("rl-stability", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_rl_loop_runs_a_hugging_face_policy(model, tmp_path):
    pytest.importorskip("transformers")
    from poise.runs.rl_study import run_one_rl

    cfg = load_recipe("rl-stability", [*QUICK, f"train.model={model}", "train.n_head=2"])
    names = [v.name for v in cfg.variants]
    r = run_one_rl(cfg, names.index("ppo_clip"), seed=0)
    assert len(r["curves"]["reward"]) == 3 and 0 <= r["final_acc"] <= 1
    assert r["curves"]["mismatch_abs"][0] > 0


def test_token_selection_weights_and_bapo_in_the_loss():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 5, generator=g)).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(4, 5, generator=g)
    adv, mask = torch.randn(4, generator=g), torch.ones(4, 5)
    ent = torch.rand(4, 5, generator=g)
    v = RLVariantConfig(name="x", loss="ppo_clip", token_select="entropy_top", entropy_ratio=0.25)
    _, agg, metrics = variant_objective(v, PolicyBatch(logp, old, old, adv, mask), ent)
    assert agg.sum() == 5  # ceil(0.25 * 20) selected tokens
    v = RLVariantConfig(name="x", loss="ppo_clip", token_weights="steer")
    values, _, metrics = variant_objective(v, PolicyBatch(logp, old, old, adv, mask), ent)
    assert 0.8 <= float(metrics["steer/weight_mean"]) <= 1.0
    v = RLVariantConfig(name="x", loss="ppo_clip", adaptive_clip="bapo")
    _, _, metrics = variant_objective(v, PolicyBatch(logp, old, old, adv, mask), ent)
    assert "bapo/c_high" in metrics


@pytest.mark.parametrize("sampling", ["uniform", "dynamic", "reinforce_ada"])
def test_sampling_strategies_collect_valid_groups(sampling):
    from poise.rl import collect
    from poise.runs.kinds.rl import _collect_kwargs, build_policy
    from poise.tasks.reasoning import ArithmeticTask
    from poise.tasks.text import CharTokenizer

    cfg = load_recipe("rl-sampling", [*QUICK, f"variants.uniform.sampling={sampling}"])
    v, t = cfg.variants[0], cfg.train
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = build_policy(t, tok.vocab_size)
    kw = {**_collect_kwargs(v, t), "dtype": None}
    rollouts, rewards, adv, generated, bad = collect(model, tok, ArithmeticTask(1, seed=0),
                                                     generator=torch.Generator().manual_seed(0), **kw)
    groups = [r.group for r in rollouts]
    assert len(rollouts) == len(rewards) == len(adv) <= generated and bad == []
    assert torch.isfinite(adv).all()
    if sampling == "uniform":
        assert generated == t.prompts * t.group_size
    if sampling == "reinforce_ada":
        assert all(groups.count(g) == t.group_size for g in set(groups))
    assert sorted(set(groups)) == list(range(len(set(groups)))) or sampling == "reinforce_ada"


def test_a_reward_that_raises_is_counted_and_the_run_goes_on(monkeypatch):
    from poise.runs import rl_study
    from poise.tasks.reasoning import ArithmeticTask

    calls = {"n": 0}
    original = ArithmeticTask.reward

    def flaky(problem, completion):
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise RuntimeError("verifier crashed")
        if calls["n"] % 7 == 0:
            return float("nan")
        return original(problem, completion)

    monkeypatch.setattr(ArithmeticTask, "reward", staticmethod(flaky))
    cfg = load_recipe("rl-stability", QUICK)
    r = rl_study.run_one_rl(cfg, 0, seed=0)
    assert r["bad_rewards"] > 0 and len(r["curves"]["reward"]) == 3  # dropped samples, not a stopped run
    ex = r["bad_reward_examples"][-1]
    assert ex["prompt"].endswith("=") and ("verifier crashed" in ex["error"] or "nan" in ex["error"])


class _Crash(Exception):
    pass


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    from poise.runs.rl_study import run_one_rl

    cfg = load_recipe("rl-stability", [*QUICK, "train.steps=6", "train.checkpoint_every=2"])
    names = [v.name for v in cfg.variants]
    i = names.index("ppo_clip_stale4")
    clean = run_one_rl(cfg, i, 0, tmp_path / "a" / "metrics" / "x.jsonl")

    path = tmp_path / "b" / "metrics" / "x.jsonl"
    calls = {"n": 0}

    def crash_after_5(n):
        calls["n"] += n
        if calls["n"] == 5:  # after step 5 was logged; the last checkpoint is step 4
            raise _Crash

    with pytest.raises(_Crash):
        run_one_rl(cfg, i, 0, path, crash_after_5)
    resumed = run_one_rl(cfg, i, 0, path)
    for key in ("curves", "eval_steps", "eval_acc", "eval_samples", "samples_generated", "final_acc"):
        assert resumed[key] == clean[key], key
    steps = [r["step"] for r in read_jsonl(path)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no torn or duplicated lines
    assert (tmp_path / "b" / "checkpoints" / "x" / "latest.json").is_file()


def test_cli_resume_skips_finished_runs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "rl-sampling", "--run-dir", str(run_dir), "--no-progress", "--no-report", *QUICK]
    assert main(args) == 0
    first = (run_dir / "results" / "uniform-s0.json").read_text()
    (run_dir / "results" / "dynamic-s0.json").unlink()  # as if interrupted during that run
    assert main(["run", "--resume", str(run_dir), "--no-progress", "--no-report"]) == 0
    assert (run_dir / "results" / "uniform-s0.json").read_text() == first  # not run again
    assert (run_dir / "results" / "dynamic-s0.json").is_file()
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 1


def test_quick_rl_stability_runs_in_under_two_minutes(tmp_path, capsys):
    import time

    t0 = time.perf_counter()
    assert main(["run", "rl-stability", "--quick", "--run-dir", str(tmp_path / "q"), "--no-progress"]) == 0
    assert time.perf_counter() - t0 < 120
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["complete"] and list(summary["variants"]) == [v.name for v in load_recipe("rl-stability").variants]


@pytest.mark.parametrize("eta", [1, 2])
def test_async_generation_stays_within_eta_versions(eta, tmp_path):
    from poise.runs.rl_study import run_one_rl

    cfg = load_recipe("rl-stability", [*QUICK, "train.steps=6", f"train.async_eta={eta}", "train.checkpoint_every=0"])
    names = [v.name for v in cfg.variants]
    path = tmp_path / "metrics" / "a.jsonl"
    r = run_one_rl(cfg, names.index("ppo_clip"), 0, path)
    gaps = [row["staleness/version_gap"] for row in read_jsonl(path)]
    assert len(gaps) == 6 and all(0 <= g <= eta for g in gaps)
    assert len(r["curves"]["reward"]) == 6


def test_async_sampler_errors_reach_the_trainer():
    from poise.rl import AsyncSampler

    def boom(model):
        raise RuntimeError("generation failed")

    s = AsyncSampler(torch.nn.Linear(2, 2), eta=1, steps=3, produce=boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        s.get()
    s.close()


def test_failed_rewards_drop_their_samples():
    from poise.rl import score_rollouts
    from poise.tasks.reasoning import Problem

    class T:
        @staticmethod
        def reward(problem, completion):
            if completion == "boom":
                raise ValueError("bad")
            return float("inf") if completion == "inf" else 1.0

    from poise.tasks.lm import Rollout

    rs = [Rollout(Problem("1+1=", "2"), torch.zeros(1), torch.zeros(1), torch.zeros(1), text, 0)
          for text in ("2", "boom", "inf", "3")]
    kept, bad = score_rollouts(T, rs)
    assert [r.text for r in kept] == ["2", "3"] and len(bad) == 2
    assert [b["completion"] for b in bad] == ["boom", "inf"] and "ValueError: bad" in bad[0]["error"]


def test_ray_actor_generation_stays_within_eta(tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray backend needs the ray extra")
    from poise.runs.rl_study import run_one_rl

    cfg = load_recipe("rl-stability", [*QUICK, "train.steps=4", "train.async_eta=1", "train.async_backend=ray",
                                       "train.checkpoint_every=0"])
    names = [v.name for v in cfg.variants]
    path = tmp_path / "metrics" / "r.jsonl"
    try:
        r = run_one_rl(cfg, names.index("ppo_clip"), 0, path)
    finally:
        ray.shutdown()
    gaps = [row["staleness/version_gap"] for row in read_jsonl(path)]
    assert gaps == [0, 1, 1, 1]  # batches 0 and 1 from the start weights, then always one version behind
    assert len(r["curves"]["reward"]) == 4


# -- issue 17: FP16 sampling, Routing Replay, AceReason sampling, PS-GRPO ------------------------------------
TINY17 = ["seeds=[0]", "train.steps=2", "train.prompts=4", "train.group_size=2", "train.sft_steps=5",
          "train.eval_problems=8", "train.eval_every=2", "train.n_embd=16", "train.checkpoint_every=0"]


@pytest.mark.parametrize("recipe, names", [
    ("rl-precision", ["bf16_sampler", "fp16_sampler", "bf16_both", "fp16_both", "fp32_sampler"]),
    ("rl-routing-replay", ["no_replay", "R3", "no_replay_stale4", "R2_stale4", "R3_stale4"]),
    ("rl-acereason", ["grpo_on_policy", "length_curriculum", "overlong_filter", "acereason"]),
    ("rl-paraphrase", ["grpo_task", "ps_grpo", "ps_grpo_task", "ps_grpo_task_approx"]),
])
def test_issue17_recipes_validate(recipe, names):
    cfg = load_recipe(recipe)
    assert [v.name for v in cfg.variants] == names


@pytest.mark.parametrize("override, message", [
    ("variants.bf16_sampler.sampler_precision=fp8", "sampler_precision: 'fp8'; valid choices: '', float32, bfloat16"),
    ("variants.bf16_sampler.trainer_precision=half", "trainer_precision: 'half'; valid choices: float32"),
    ("variants.bf16_sampler.routing_replay=R3", "routing_replay='R3' needs a routed policy: train.model='moe'"),
    ("variants.bf16_sampler.routing_replay=R1", "routing_replay: 'R1'; valid choices: none, R2, R3"),
    ("variants.bf16_sampler.length_stages=[3,2]", "length_stages=[3, 2]: a length curriculum does not shrink"),
    ("variants.bf16_sampler.length_stages=[0]", "length_stages[0]=0"),
    ("variants.bf16_sampler.ps_grpo=similarity", "ps_grpo='similarity' needs paraphrased prompts"),
    ("variants.bf16_sampler.ps_grpo=vote", "ps_grpo: 'vote'; valid choices: none, similarity, similarity+task"),
    ("variants.bf16_sampler.ps_grpo_samples=-1", "ps_grpo_samples=-1: 0 (exact) or an integer >= 1"),
    ("train.sampler_dtype=float16", "FP16 sampling: a variant's sampler_precision='float16'"),
])
def test_bad_issue17_options(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("rl-precision", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("recipe, override, message", [
    ("rl-acereason", "variants.acereason.minibatches=2", "strict_on_policy: one gradient step per rollout batch"),
    ("rl-paraphrase", "task.paraphrases=1", "n_paraphrases=1: a paraphrase set needs 2..6"),
    ("rl-paraphrase", "variants.ps_grpo.sampling=dynamic", "sampling must be 'uniform'"),
    ("rl-routing-replay", "train.moe_top_k=5", "train.moe_top_k=5 must be <= train.moe_experts=4"),
    ("rl-routing-replay", "train.async_eta=1", "records the sampler's routing synchronously"),
])
def test_bad_issue17_recipes(recipe, override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, [override])
    assert message in str(e.value)


def _run(recipe, tmp_path, *extra):
    run_dir = tmp_path / recipe
    assert main(["run", recipe, "--run-dir", str(run_dir), "--no-progress", *TINY17, *extra]) == 0
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_precision_study_measures_the_mismatch(tmp_path):
    run_dir, summary = _run("rl-precision", tmp_path, "variants=[{name='bf16',loss='ppo_clip',sampler_precision="
                            "'bfloat16'},{name='fp16',loss='ppo_clip',sampler_precision='float16'},{name='both',"
                            "loss='ppo_clip',sampler_precision='float16',trainer_precision='float16'}]")
    v = summary["variants"]
    assert 0 < v["fp16"]["mismatch_abs"]["mean"] < v["bf16"]["mismatch_abs"]["mean"]
    assert v["fp16"]["mismatch_k3_kl"]["n"] == 1
    assert "Train-inference mismatch" in (run_dir / "report.html").read_text()


def test_routing_replay_study_records_and_replays(tmp_path):
    run_dir, summary = _run("rl-routing-replay", tmp_path, "train.n_head=2", "train.sampler_bits=2",
                            "variants=[{name='none',loss='ppo_clip'},{name='R3',loss='ppo_clip',routing_replay='R3'},"
                            "{name='R2s',loss='ppo_clip',routing_replay='R2',minibatches=2}]")
    rows = {n: read_jsonl(run_dir / "metrics" / f"{n}-s0.jsonl") for n in ("none", "R3", "R2s")}
    for rs in rows.values():
        assert all(0 <= r["routing/mismatch"] <= 1 for r in rs)
    # step 1: the same model and samples in every variant (same seed); without replay the trainer's
    # mismatch is the unreplayed one, with R3 it is the replayed one
    n1, r1 = rows["none"][0], rows["R3"][0]
    assert n1["mismatch/abs_log_ratio"] == pytest.approx(n1["routing/abs_log_ratio_unreplayed"], rel=1e-5)
    assert r1["routing/abs_log_ratio_unreplayed"] == pytest.approx(n1["routing/abs_log_ratio_unreplayed"], rel=1e-5)
    if r1["routing/mismatch"] > 0:
        assert r1["mismatch/abs_log_ratio"] != pytest.approx(r1["routing/abs_log_ratio_unreplayed"], rel=1e-6)
    assert summary["variants"]["R3"]["routing_mismatch"]["n"] == 1
    for rs in rows.values():  # without R3 the trained-on log-probs route as the trainer does
        assert all(r["routing/abs_log_ratio_trained"] >= 0 for r in rs)
    assert n1["routing/abs_log_ratio_trained"] == pytest.approx(n1["routing/abs_log_ratio_unreplayed"], rel=1e-5)
    assert rows["R2s"][0]["routing/abs_log_ratio_trained"] == pytest.approx(
        rows["R2s"][0]["routing/abs_log_ratio_unreplayed"], rel=1e-5)  # R2: pi_old routes as the trainer


def test_overlong_filter_masks_truncated_completions(tmp_path):
    """With a limit of one token, a completion finishes only by emitting EOS first; the rest are
    masked out of the loss, so the truncated share is logged and a fully truncated batch trains on nothing."""
    run_dir, _ = _run("rl-acereason", tmp_path, "task.level=1", "variants=[{name='f',loss='ppo_clip',"
                      "overlong_filter=true,length_stages=[1]},{name='c',loss='ppo_clip',length_stages=[1,5]}]")
    for r in read_jsonl(run_dir / "metrics" / "f-s0.jsonl"):
        assert 0 <= r["overlong/truncated_frac"] <= 1
        if r["overlong/truncated_frac"] == 1:
            assert r["loss"] == 0 and r["grad_norm"] == 0
    rows = read_jsonl(run_dir / "metrics" / "c-s0.jsonl")
    assert rows[0]["overlong/truncated_frac"] > 0.5  # stage 1 (1 token) cuts the answers "d\n"


def test_ps_grpo_rewards_agreement_across_paraphrases(tmp_path):
    run_dir, summary = _run("rl-paraphrase", tmp_path, "variants=[{name='ps',loss='ppo_clip',ps_grpo='similarity'},"
                            "{name='task',loss='ppo_clip'}]")
    rows = read_jsonl(run_dir / "metrics" / "ps-s0.jsonl")
    assert all(0 <= r["ps_grpo/similarity_reward"] <= 1 and 0 <= r["consistency/train"] <= 1 for r in rows)
    assert "ps_grpo/similarity_reward" not in read_jsonl(run_dir / "metrics" / "task-s0.jsonl")[0]
    for v in ("ps", "task"):
        assert summary["variants"][v]["late_consistency"]["n"] == 1
        assert 0 <= summary["variants"][v]["start_consistency"]["mean"] <= 1

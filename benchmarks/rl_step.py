"""RL step speed and sample efficiency: poise's loop against TRL's GRPOTrainer, side by side.

    python benchmarks/rl_step.py [--steps 6] [--prompts 32] [--group 8]

Both train the same tiny Hugging Face Qwen2 policy (built from a config, warm-started on
1-digit additions by poise's supervised warm start, then copied to both), on the same
task and reward, with the same batch (prompts x group completions), learning rate,
temperature and completion length, one optimizer step per rollout batch. poise runs its
RL loop (float32 sampler so that both sample alike); TRL runs ``GRPOTrainer`` (loss dapo,
beta 0) offline on CPU. Reported: seconds per step (median over steps, generation
included), the ratio TRL / poise, and the mean training reward over the same number of
generated samples. One process; the order of the two is alternated over ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import torch

from poise.rl import sft_warmup
from poise.runs.config import load_recipe
from poise.runs.kinds.rl import run_one_rl
from poise.tasks.reasoning import ArithmeticTask
from poise.tasks.text import CharTokenizer

LR = 3e-4  # both, constant


def hf_char_tokenizer(tok: CharTokenizer):
    import tokenizers
    import transformers

    vocab = {c: i for i, c in enumerate(tok.alphabet)}
    vocab["<pad>"] = len(vocab)
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    t.decoder = tokenizers.decoders.Fuse()  # characters back to text without spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="\n",
                                                unk_token="<pad>")


def build(seed: int = 0):
    import transformers

    tok = CharTokenizer()
    cfg = transformers.Qwen2Config(vocab_size=tok.vocab_size + 1, hidden_size=48, intermediate_size=192,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32, pad_token_id=tok.vocab_size,
                                   eos_token_id=int(tok.encode("\n")[0]),
                                   bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg)
    sft_warmup(model, tok, ArithmeticTask(1, seed=99), steps=150, lr=3e-3, seed=seed)
    return model


def run_poise(model, steps: int, prompts: int, group: int) -> tuple[float, float]:
    import poise.runs.kinds.rl as rs

    overrides = [f"train.lr={LR}", f"train.steps={steps}", f"train.prompts={prompts}", f"train.group_size={group}",
                 "train.sft_steps=0", "train.sampler_dtype=float32", "train.eval_every=1000",
                 "train.eval_problems=10", "train.checkpoint_every=0", "seeds=[0]", "train.model=qwen2"]
    cfg = load_recipe("rl-stability", overrides)
    original = rs.build_policy
    rs.build_policy = lambda t, v: copy.deepcopy(model)
    try:
        i = [v.name for v in cfg.variants].index("ppo_clip")
        r = run_one_rl(cfg, i, 0)
    finally:
        rs.build_policy = original
    return r["seconds_per_step"], statistics.mean(r["curves"]["reward"])


def run_trl(model, steps: int, prompts: int, group: int) -> tuple[float, float]:
    import datasets
    import trl

    tok = hf_char_tokenizer(CharTokenizer())
    task = ArithmeticTask(1, seed=0)
    problems = task.sample(prompts * steps)
    answers = {p.prompt: p for p in problems}
    data = datasets.Dataset.from_dict({"prompt": [p.prompt for p in problems]})

    def reward(prompts, completions, **kw):
        return [task.reward(answers[p], c) for p, c in zip(prompts, completions, strict=True)]

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.GRPOConfig(output_dir=d, per_device_train_batch_size=prompts * group, num_generations=group,
                              max_completion_length=5, max_steps=steps, report_to="none", use_cpu=True,
                              logging_steps=1, save_strategy="no", learning_rate=LR, lr_scheduler_type="constant",
                              bf16=False, beta=0.0,
                              loss_type="dapo", temperature=1.0, disable_tqdm=True)
        trainer = trl.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return wall / steps, statistics.mean(rewards) if rewards else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = build()
    rows: dict[str, list[tuple[float, float]]] = {"poise": [], "trl": []}
    for k in range(a.repeats):
        order = ("poise", "trl") if k % 2 == 0 else ("trl", "poise")
        for name in order:
            fn = run_poise if name == "poise" else run_trl
            rows[name].append(fn(model, a.steps, a.prompts, a.group))
    p_s = statistics.median(x for x, _ in rows["poise"])
    t_s = statistics.median(x for x, _ in rows["trl"])
    print(f"batch {a.prompts} prompts x {a.group} completions, {a.steps} steps, {a.repeats} repeats, "
          f"torch threads {a.threads}")
    print(f"{'':8}{'s / step':>10}{'steps / s':>11}{'mean reward':>13}")
    for name, s in (("poise", p_s), ("trl", t_s)):
        rew = statistics.mean(r for _, r in rows[name])
        print(f"{name:8}{s:>10.3f}{1 / s:>11.2f}{rew:>13.3f}")
    print(f"poise is {t_s / p_s:.2f}x TRL's steps per second")


if __name__ == "__main__":
    main()

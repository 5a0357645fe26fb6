"""Continual fine-tuning of a Hugging Face causal LM through ``transformers.Trainer``: three small
text tasks in sequence, experience replay, a poise optimizer with diagnostics, and continual
evaluation (token accuracy, loss and perplexity on each task's held-out responses, densely after
each task switch), all logged through the Trainer (``report_to`` reaches every tracker it supports).

    python examples/hf_continual.py        # CPU, well under a minute; nothing is downloaded

The model is a 2-layer Llama built from a config, the tokenizer a word list: the tasks are
``copy a b c = a b c``, ``reverse a b c = c b a`` and ``shift a b c = b c d``.
"""

from __future__ import annotations

import random
import tempfile

import torch
from transformers import PrinterCallback, TrainingArguments

from poise.continual import Replay
from poise.integrations.hf import PoiseTrainer, causal_lm_loss
from poise.measure import ContinualEvaluator, EvalSchedule, LMEvalSet
from poise.models import build_causal_lm
from poise.optim import StableSPAM

LETTERS = "abcdefghij"
WORDS = ["<pad>", "=", *LETTERS, "copy", "reverse", "shift"]
ID = {w: i for i, w in enumerate(WORDS)}
RULES = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "shift": lambda s: [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s],
}


def example(task: str, rng: random.Random) -> tuple[list[int], list[int]]:
    """``<task> x y z =`` and its answer, as token ids."""
    s = rng.sample(LETTERS, 3)
    return [ID[w] for w in (task, *s, "=")], [ID[w] for w in RULES[task](s)]


def train_set(task: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-length rows (8 tokens: a replay buffer stores one row length), loss on the answer only."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, r = example(task, rng)
        ids = torch.tensor(p + r)
        labels = torch.cat([torch.full((len(p),), -100), torch.tensor(r)])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def main(steps_per_task: int = 60, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_causal_lm("llama", vocab_size=len(WORDS), n_layer=2, n_head=2, n_embd=32, block_size=16)
    held_out = {t: [example(t, random.Random(1000 + i)) for i in range(32)] for t in RULES}
    ev = ContinualEvaluator({t: LMEvalSet.from_pairs(*zip(*pairs, strict=True)) for t, pairs in held_out.items()},
                            schedule=EvalSchedule(dense_steps=10, every=10))  # dense after each switch
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps_per_task, per_device_train_batch_size=16,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=20, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=seed)  # report_to=["tensorboard"]
    trainer = PoiseTrainer(model=model, args=args, strategy=Replay(mem_size=256, batch_size=16, loss_fn=causal_lm_loss),
                           evaluator=ev, diagnostics=True,
                           optimizer_cls_and_kwargs=(StableSPAM, {"lr": 3e-3, "diagnostics": True}))
    trainer.remove_callback(PrinterCallback)  # keep the console quiet: the logs go to report_to's trackers
    for i, task in enumerate(RULES):
        trainer.train_task(task, train_set(task, 512, seed=i))
        print(f"after {task:8s}", {t: round(v, 3) for t, v in ev.last_scores()["token_acc"].items()})
    loss = ev.metrics("loss")
    acc = ev.metrics("token_acc")
    print(f"final token accuracy {acc['acc']:.3f}, forgetting {acc['forgetting']:.3f}, min-ACC {acc['min_acc']:.3f}")
    print(f"held-out loss: final {loss['acc']:.3f}, forgetting (rise) {loss['forgetting']:.3f}, "
          f"stability-gap depth (rise) {loss['gap_depth']:.3f}, {ev.metrics('ppl')['acc']:.2f} perplexity")
    return {"token_acc": acc, "loss": loss}


if __name__ == "__main__":
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    main()

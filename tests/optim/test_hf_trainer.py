"""GaLore / Q-GaLore through Hugging Face's Trainer (``optimizer_cls_and_kwargs``), offline on
CPU: a tiny Llama built from a config, random tokens, four steps. The Trainer calls
``optimizer_cls(its weight-decay groups, **kwargs)``; ``rank`` in the kwargs must project the
matrices (before, GaLore silently ran as AdamW there)."""

import pytest
import torch

from poise.optim import AdamW, GaLoreAdamW, QGaLoreAdamW, low_rank_groups

transformers = pytest.importorskip("transformers")

LR = 1e-2


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


def _trainer(tmp_path, model, opt_cls, kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", seed=0, learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                optimizer_cls_and_kwargs=(opt_cls, dict(kwargs)))


def _train(tmp_path, opt_cls, kwargs):
    model = _model()
    trainer = _trainer(tmp_path, model, opt_cls, kwargs)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return opt, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    # the AdamW that GaLore used to be here: HF convention, the authors' eps, no decay (fused: the kernel
    # unprojected GaLore uses)
    return _train(tmp_path_factory.mktemp("adamw"), AdamW,
                  {"lr": LR, "eps": 1e-6, "weight_decay": 0.0, "convention": "hf"})[1]


@pytest.mark.parametrize("cls", [GaLoreAdamW, QGaLoreAdamW])
def test_rank_in_optimizer_kwargs_projects_the_matrices(tmp_path, adamw_run, cls):
    opt, weights = _train(tmp_path, cls, {"lr": LR, "rank": 4, "update_proj_gap": 2})
    assert isinstance(opt, cls)
    n_matrices = sum(p.dim() >= 2 for p in _model().parameters())
    summary = opt.projected_summary()
    projected = [d for d in summary if d["rank"] is not None]
    assert projected and all(d["rank"] == 4 and d["update_proj_gap"] == 2 for d in projected)
    assert sum(d["projected_tensors"] for d in summary) == n_matrices  # every matrix, from the Trainer's groups
    assert not torch.allclose(weights, adamw_run, atol=1e-6)


def test_without_rank_it_refuses_and_allowed_it_is_adamw(tmp_path, adamw_run):
    trainer = _trainer(tmp_path, _model(), GaLoreAdamW, {"lr": LR})
    with pytest.raises(ValueError, match="would run as plain AdamW"):
        trainer.create_optimizer()
    with pytest.warns(UserWarning, match="would run as plain AdamW"):
        _, weights = _train(tmp_path, GaLoreAdamW, {"lr": LR, "allow_unprojected": True})
    assert torch.allclose(weights, adamw_run, rtol=0, atol=1e-7)


def test_params_from_low_rank_groups_choose_the_modules(tmp_path):
    # Hugging Face takes "params" from the kwargs in place of its own groups: module-level choice
    model = _model()
    groups = low_rank_groups(model, 4, target=["q_proj", "v_proj"])
    trainer = _trainer(tmp_path, model, GaLoreAdamW, {"lr": LR, "params": groups})
    opt = trainer.create_optimizer()
    names = [n for d in opt.projected_summary() for n in d.get("projected_names", [])]
    assert names == [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]

"""The TRL adapter trains offline on CPU: a tiny Qwen2 built from a config, an in-memory
word-level tokenizer, four prompts, two optimizer steps, any poise loss by name."""

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL adapter needs the trl extra")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tokenizer():
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *[str(d) for d in range(10)], "+", "="])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


@pytest.mark.parametrize("loss, kwargs, config", [
    ("cispo", {"eps_high": 0.28}, {}), ("ppo_clip", {"dual_clip": 3.0}, {}), ("pg", {}, {}),
    # TRL's own loss computed by poise (beta != 0 needs a reference model TRL can load by name: the parity
    # test covers it)
    (None, {}, {"loss_type": "grpo", "top_entropy_quantile": 0.5, "entropy_coef": 0.01}),
])
def test_poise_loss_inside_grpo_trainer(tmp_path, loss, kwargs, config):
    from poise.integrations.trl import PoiseGRPOTrainer

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = transformers.Qwen2ForCausalLM(cfg)
    data = datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4=", "2+2=", "5+1="]})

    def reward(completions, **kw):
        return [float(c.strip().startswith("3")) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, max_steps=2, report_to="none", use_cpu=True, logging_steps=1,
                          save_strategy="no", learning_rate=1e-3, bf16=False, **config)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = PoiseGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                               processing_class=tok, poise_loss=loss, poise_loss_kwargs=kwargs)
    out = trainer.train()
    assert out.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert any(k.startswith("poise/") for k in logged), sorted(logged)
    assert "entropy" in logged, sorted(logged)  # TRL's metric names
    if loss is None:
        assert {"clip_ratio/region_mean", "entropy_coef", "policy_loss"} <= logged, sorted(logged)


def test_bad_adapter_arguments():
    from poise.integrations.trl import PoiseGRPOTrainer

    with pytest.raises(ValueError, match="poise_loss='kl'; valid choices: pg, ppo_clip"):
        PoiseGRPOTrainer(poise_loss="kl")

"""Memory Bank Compression (arXiv 2601.00756): nearest-code assignment, perplexity, the online
dead-code reset, byte accounting against raw replay, and refusals that change no state."""

import pytest
import torch
from torch import nn

from poise.continual import Batch, MBCReplay, VQCodebook, codebook_perplexity, vq_assign


def test_vq_assign_and_perplexity_by_hand():
    cb = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert vq_assign(torch.tensor([[0.1, 0.2], [0.9, 0.8], [0.6, 0.6]]), cb).tolist() == [0, 1, 1]
    assert codebook_perplexity(torch.zeros(8, dtype=torch.long), 4).item() == pytest.approx(1.0)
    assert codebook_perplexity(torch.arange(8) % 4, 4).item() == pytest.approx(4.0)  # uniform over 4 codes
    assert codebook_perplexity(torch.tensor([0, 0, 1, 1]), 8).item() == pytest.approx(2.0)


def test_dead_codes_reset_to_batch_vectors_with_mean_usage():
    vq = VQCodebook(4, 2, decay=0.99, seed=0)
    x = torch.tensor([[5.0, 5.0], [5.0, 5.1], [6.0, 6.0]])
    out = vq.update(x)
    # one code took all 3 vectors (all codes start near 0): usage 0.01 * 3 = 0.03 for it, 0 for 3 dead codes;
    # min(3 dead, 3 vectors) = 3 dead codes are reset to the 3 batch vectors, usage = mean = 0.03 / 4
    assert out["dead_reset"].item() == 3.0 and out["perplexity"].item() == pytest.approx(1.0)
    rows = {tuple(r) for r in x.tolist()}
    reset = [k for k in range(4) if tuple(vq.codes[k].tolist()) in rows]
    assert len(reset) == 3
    assert sorted(vq.usage.tolist()) == pytest.approx([0.0075, 0.0075, 0.0075, 0.03])


def test_protected_codes_are_never_reset():
    vq = VQCodebook(4, 2, seed=0)
    before = vq.codes.detach().clone()
    protected = torch.tensor([False, True, True, True])
    x = torch.full((3, 2), 9.0)
    idx = vq.encode(x)[0].item()
    out = vq.update(x, protected=protected)
    dead = {0, 1, 2, 3} - {idx}
    n_reset = len([k for k in dead if not protected[k]])
    assert out["dead_reset"].item() == n_reset
    for k in dead:
        if protected[k]:
            torch.testing.assert_close(vq.codes[k].detach(), before[k])


def test_bytes_usage_and_roundtrip():
    torch.manual_seed(0)
    s = MBCReplay(mem_size=10, batch_size=4, num_codes=256, code_dim=4)
    x = torch.rand(10, 8, 8)
    out = s.after_step(nn.Identity(), Batch(x, torch.arange(10)))
    # 10 samples x 16 uint8 indices + 256 x 4 float32 codebook = 160 + 4096; raw: 10 x 64 x 4 = 2560
    assert out["mem_bytes"].item() == 4256 and out["raw_bytes"].item() == 2560
    assert out["compression"].item() == pytest.approx(2560 / 4256)
    assert s.buffer._x.dtype == torch.uint8
    rep = s.memory_report()
    assert rep["mem_bytes"] == 4256 and 0 < rep["usage"] <= 1 and rep["bank_perplexity"] >= 1
    # decoding returns the nearest codes, reshaped to the input shape
    codes = s.buffer._x[:10]
    dec = s.decode(codes)
    assert dec.shape == (10, 8, 8)
    torch.testing.assert_close(dec.reshape(-1, 4), s.codebook.codes.detach()[codes.long().flatten()])


def test_padding_when_code_dim_does_not_divide():
    s = MBCReplay(mem_size=4, num_codes=8, code_dim=2)
    s.after_step(nn.Identity(), Batch(torch.rand(3, 5), torch.zeros(3, dtype=torch.long)))
    assert s.buffer._x.shape == (4, 3) and s.decode(s.buffer._x[:3]).shape == (3, 5)


def test_size_zero_and_empty_memory():
    with pytest.raises(ValueError, match=r"num_codes=0 must be >= 1 \(a codebook of size 0"):
        MBCReplay(num_codes=0)
    s = MBCReplay(mem_size=5)
    before = s.state_dict()
    model = nn.Linear(4, 2)
    assert s.loss_terms(model, Batch(torch.rand(2, 4), torch.zeros(2, dtype=torch.long)), None) == {}  # no-op
    after = s.state_dict()
    assert torch.equal(before["codebook"]["codes"], after["codebook"]["codes"]) and after["buffer"]["seen"] == 0
    assert s.memory_report()["mem_size"] == 0.0
    with pytest.raises(RuntimeError, match="empty buffer"):
        s.buffer.sample(1)

"""StableUN, FIT and the relearning attack: exact mechanism tests."""

import pytest
import torch
from torch import nn

from poise.edit import (
    FIT,
    layer_attribution,
    project_conflict,
    redundancy_filter,
    relearn_attack,
    select_algorithm,
    stableun_backward,
)

D = torch.float64


def test_projection_by_hand():
    # g_f = [1, 0], g_r = [-1, 1]: dot -1 < 0 -> g_f - (-1/2) g_r = [0.5, 0.5], orthogonal to g_r
    g, done = project_conflict(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]))
    assert done and torch.allclose(g, torch.tensor([0.5, 0.5]))
    # no conflict: unchanged
    g, done = project_conflict(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert not done and torch.equal(g, torch.tensor([1.0, 0.0]))


def _quad():
    # L_f(w) = 1/2 ||w - a||^2 (grad w - a), L_r(w) = 1/2 ||w - b||^2 (grad w - b)
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=D))
    a, b = torch.tensor([0.0, 0.0], dtype=D), torch.tensor([3.0, 2.0], dtype=D)
    return w, (lambda: 0.5 * (w - a).pow(2).sum()), (lambda: 0.5 * (w - b).pow(2).sum())


def test_stableun_reduces_to_graddiff_without_probes_and_restores_parameters():
    w, lf, lr_ = _quad()
    # g_f = [1, 2], g_r = [-2, 0]: dot -2 < 0 -> projected g_f = [1, 2] - (-2/4)[-2, 0] = [0, 2]
    m = stableun_backward([w], lf, lr_, inner_lr=0.0, rho=0.0, alpha=1.0)
    assert torch.allclose(w.grad, torch.tensor([0.0 - 2.0, 2.0], dtype=D)) and m["projected"] == 1.0
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=D))


def test_stableun_forgetting_feedback_is_taken_at_the_perturbed_point():
    w, lf, _ = _quad()
    # inner step eta = 0.5: theta_tau = [1, 2] - 0.5 [1, 2] = [0.5, 1]; grad there [0.5, 1], norm sqrt(1.25)
    # SAP probe rho = sqrt(1.25): delta = [0.5, 1] -> probe point [1, 2], grad L_f = [1, 2]
    stableun_backward([w], lf, None, inner_lr=0.5, rho=1.25**0.5)
    assert torch.allclose(w.grad, torch.tensor([1.0, 2.0], dtype=D))
    # rho = 0, same inner step: the gradient at theta_tau itself
    stableun_backward([w], lf, None, inner_lr=0.5, rho=0.0)
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.0], dtype=D))
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=D))
    with pytest.raises(ValueError, match="rho=-1"):
        stableun_backward([w], lf, None, rho=-1)


def test_fit_filter_and_selection_by_hand():
    sim = torch.tensor([0.5, 0.99, 0.99])
    change = torch.tensor([0.0, 0.05, 0.3])
    # item 0 novel (0.5 < 0.95); item 1 redundant and |dL| 0.05 <= 0.1 -> dropped; item 2 matters (0.3 > 0.1)
    assert redundancy_filter(sim, change, 0.95, 0.1).tolist() == [True, False, True]
    assert [select_algorithm(s) for s in (3.0, 6.0, 11.9, 12.0)] == ["random_label", "npo", "npo", "npo_kl"]


def test_layer_attribution_picks_the_layer_the_loss_depends_on():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
        net[0].bias.zero_()
        net[1].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
        net[1].bias.fill_(5.0)
    x = torch.ones(2, 3)
    # L = mean output = 3 + 5 = 8; zeroing layer 0 -> 0 + 5 = 5 (|dL| 3); zeroing layer 1 -> 0 (|dL| 8)
    W0 = net[0].weight.clone()
    assert layer_attribution(lambda: net(x).mean(), {"a": net[0], "b": net[1]}, 1) == ["b"]
    assert torch.equal(net[0].weight, W0)


def _clf(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x, y


def test_fit_refuses_never_learned_and_empty_requests_without_changing_the_model():
    model, x, y = _clf()
    fit = FIT(model, learned=(x, y), steps=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="empty deletion request"):
        fit.request(x[:0], y[:0])
    with pytest.raises(ValueError, match="row 1 of the deletion request was never learned"):
        fit.request(torch.cat([x[:1], x[:1] + 7]), y[:2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fit.memory is None


def test_fit_forgets_and_a_repeated_request_is_a_no_op():
    model, x, y = _clf()
    fit = FIT(model, steps=40, lr=0.05, top_k=2, tau=0.95, epsilon=1e9)
    xf, yf = x[y == 0], y[y == 0]
    acc0 = float((model(xf).argmax(1) == yf).float().mean())
    out = fit.request(xf, yf)
    acc1 = float((model(xf).argmax(1) == yf).float().mean())
    assert out["kept"] == len(xf) and out["algorithm"] in ("random_label", "npo", "npo_kl")
    assert acc0 > 0.8 and acc1 < 0.3
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    again = fit.request(xf, yf)  # every item has similarity 1 with the memory and epsilon is huge
    assert again["kept"] == 0 and again["filtered"] == len(xf)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())


def test_relearn_attack_returns_a_copy_and_recovers():
    model, x, y = _clf()
    W = model[0].weight.clone()
    attacked = relearn_attack(model, x[:10], y[:10], steps=5, lr=0.01)
    assert torch.equal(model[0].weight, W) and not torch.equal(attacked[0].weight, W)
    with pytest.raises(ValueError, match="at least one sample"):
        relearn_attack(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="valid choices: adam, sgd"):
        relearn_attack(model, x[:2], y[:2], optimizer="lbfgs")


def _relearn_study():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "unlearn_relearn.py"
    spec = importlib.util.spec_from_file_location("unlearn_relearn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_relearn_calibration_rule_by_hand():
    choose = _relearn_study().choose_attack
    row = lambda mix, steps, f, r: {"mix": mix, "steps": steps, "lr": 1e-3, "forget": f, "retain": r}  # noqa: E731
    table = [row(0, 10, 0.0, 0.95), row(0, 20, 0.5, 0.70),  # pure attack: recovers only by wrecking retain
             row(25, 10, 0.1, 0.90), row(25, 20, 0.25, 0.90), row(25, 30, 0.45, 0.85), row(25, 40, 0.58, 0.9)]
    # mix 0 has no row with forget in [0.2, 0.6] and retain >= 0.8 -> mix 25; qualifying 0.25, 0.45, 0.58;
    # distances to 0.4: 0.15, 0.05, 0.18 -> steps 30
    assert choose(table, (0, 25), (0.2, 0.6), 0.8) == ({"mix": 25, "steps": 30, "lr": 1e-3}, True)
    # the pure attack wins whenever it qualifies, even if mix 25 is nearer the middle
    table[1] = row(0, 20, 0.59, 0.81)
    assert choose(table, (0, 25), (0.2, 0.6), 0.8) == ({"mix": 0, "steps": 20, "lr": 1e-3}, True)
    # nothing qualifies: nearest 0.4 among rows keeping retain >= 0.8, flagged as missed
    miss = [row(0, 10, 0.0, 0.95), row(0, 20, 0.9, 0.5), row(25, 10, 0.1, 0.9), row(25, 20, 0.8, 0.85)]
    assert choose(miss, (0, 25), (0.2, 0.6), 0.8) == ({"mix": 25, "steps": 10, "lr": 1e-3}, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CPU generators with CUDA parameters")
def test_stableun_noise_probes_and_fit_stream_run_on_cuda():
    # regression: the Gaussian probes and FIT's similarity/loss-change/random-label tensors were made on the
    # CPU, so a CUDA model failed (a second FIT request compared a CUDA similarity with a CPU loss change)
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=D, device="cuda"))
    stableun_backward([w], lambda: 0.5 * w.pow(2).sum(), None, rho=0.0, sigma=0.1, n_noise=2,
                      generator=torch.Generator().manual_seed(0))
    assert w.grad.device.type == "cuda"
    model, x, y = _clf()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    fit = FIT(model, steps=3, lr=0.01, thresholds=(1e9, 2e9))  # random labels
    fit.request(x[y == 0], y[y == 0])
    out = fit.request(x[y == 1], y[y == 1])
    assert out["algorithm"] == "random_label" and next(model.parameters()).device.type == "cuda"

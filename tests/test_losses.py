"""Every DPO loss type against an independent float64 numpy implementation of the TRL 1.16
formulas (shared/specs/trl-1.16-losses.md), plus weighting, combination and reward loss."""

import math

import numpy as np
import pytest
import torch

from rayalign import losses
from rayalign.losses import LOSSES, LossParams, combined_dpo_loss, dpo_loss, reward_loss, reward_metrics

LOSS_TYPES = list(LOSSES)


def logsig(x):
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


def sig(x):
    return 1 / (1 + np.exp(-x))


def g(h, kind, a):
    if kind == "reverse_kl":
        return h
    if kind == "forward_kl":
        return 1 - np.exp(-h)
    if kind == "js_divergence":
        return np.log(2) + logsig(h)
    if abs(a - 1) < 1e-6:
        return h
    return (np.exp(np.minimum((a - 1) * h, 80)) - 1) / (a - 1)


def reference(kind, pc, pr, rc, rr, nc, nr, beta, eps, fdiv="reverse_kl", a=1.0, tau=0.05):
    hc, hr = pc - rc, pr - rr
    uc, ur = g(hc, fdiv, a), g(hr, fdiv, a)
    d = uc - ur
    z = beta * d
    if kind == "sigmoid":
        return -logsig(z)
    if kind == "hinge":
        return np.maximum(0, 1 - z)
    if kind == "ipo":
        return (uc / np.maximum(nc, 1) - ur / np.maximum(nr, 1) - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        # TRL's constants: log1p(-eps) and log(eps) of a float32 (torch's default dtype) tensor
        e32 = torch.tensor(eps, dtype=torch.float32)
        l1, l2 = float(torch.log1p(-e32)), float(torch.log(e32))
        return sig(z) * (logsig(z) - l1) + sig(-z) * (logsig(-z) - l2)
    if kind == "nca_pair":
        return -logsig(beta * hc) - 0.5 * logsig(-beta * hc) - 0.5 * logsig(-beta * hr)
    if kind == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return -logsig(beta * hc) - logsig(-beta * hr)
    if kind == "sppo_hard":
        return (hc - 0.5 / beta) ** 2 + (hr + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            dd = np.sort(pc - pr) - np.sort(rc - rr)
        else:
            dd = np.sort(hc) - np.sort(hr)
        return -(1 - eps) * logsig(beta * dd) - eps * logsig(-beta * dd)
    if kind == "apo_zero":
        return (1 - sig(beta * hc)) + sig(beta * hr)
    if kind == "apo_down":
        return sig(beta * hc) + (1 - sig(beta * (hc - hr)))
    if kind == "discopop":
        m = sig(z / tau)
        return -logsig(z) * (1 - m) + np.exp(-z) * m
    if kind == "sft":
        return np.full_like(pc, -pc.sum() / nc.sum())
    if kind == "sigmoid_norm":
        return -logsig(beta * (uc / np.maximum(nc, 1) - ur / np.maximum(nr, 1)))
    raise AssertionError(kind)


def make_inputs(seed, b=7):
    rng = np.random.default_rng(seed)
    pc = -rng.uniform(5, 40, b)
    pr = -rng.uniform(5, 40, b)
    rc = pc + rng.normal(0, 3, b)
    rr = pr + rng.normal(0, 3, b)
    nc = rng.integers(1, 30, b).astype(float)
    nr = rng.integers(1, 30, b).astype(float)
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_type_matches_reference(kind, seed):
    pc, pr, rc, rr, nc, nr = make_inputs(seed)
    beta = 0.1 if seed != 2 else 0.5
    eps = 0.2
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, nc, nr)]
    got, cr, rr_ = dpo_loss(*t[:4], loss_type=kind, params=LossParams(beta=beta, label_smoothing=eps),
                            chosen_lengths=t[4], rejected_lengths=t[5])
    want = reference(kind, pc, pr, rc, rr, nc, nr, beta, eps)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cr.numpy(), beta * (pc - rc), rtol=1e-12)
    np.testing.assert_allclose(rr_.numpy(), beta * (pr - rr), rtol=1e-12)


@pytest.mark.parametrize("fdiv,a", [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                                    ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences(kind, fdiv, a):
    pc, pr, rc, rr, nc, nr = make_inputs(5)
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, nc, nr)]
    params = LossParams(beta=0.1, label_smoothing=0.1, f_divergence_type=fdiv, f_alpha_divergence_coef=a)
    got, _, _ = dpo_loss(*t[:4], loss_type=kind, params=params, chosen_lengths=t[4], rejected_lengths=t[5])
    want = reference(kind, pc, pr, rc, rr, nc, nr, 0.1, 0.1, fdiv, a)
    # alpha divergence is evaluated in float32 as TRL does: float32-level agreement
    tol = 2e-6 if fdiv == "alpha_divergence" and a != 1.0 else 1e-12
    np.testing.assert_allclose(got.numpy(), want, rtol=tol, atol=tol)


def test_alpha_divergence_float32_path_matches_trl_rounding():
    h = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float32)
    got = losses.f_divergence_score(h, "alpha_divergence", 0.5)
    want = (torch.exp(torch.clamp(-0.5 * h, max=80.0)) - 1) * (1.0 / -0.5)
    assert torch.equal(got, want)


def test_closed_form_sigmoid_at_zero_margin_is_log2():
    z = torch.zeros(3)
    losses_, cr, rr = dpo_loss(z, z, z, z, loss_type="sigmoid")
    assert torch.allclose(losses_, torch.full((3,), math.log(2.0)))
    ipo, _, _ = dpo_loss(z, z, z, z, loss_type="ipo", params=LossParams(beta=0.25), chosen_lengths=torch.ones(3),
                         rejected_lengths=torch.ones(3))
    assert torch.allclose(ipo, torch.full((3,), 4.0))  # (0 - 1/(2*0.25))^2
    hinge, _, _ = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                           loss_type="hinge", params=LossParams(beta=0.1))
    assert torch.allclose(hinge, torch.tensor([0.8]))


def test_combined_losses_with_weights_and_metrics():
    pc, pr, rc, rr, nc, nr = make_inputs(3)
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, nc, nr)]
    loss, metrics = combined_dpo_loss(*t[:4], loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3],
                                      params=LossParams(beta=0.1), chosen_lengths=t[4], rejected_lengths=t[5])
    want = reference("sigmoid", pc, pr, rc, rr, nc, nr, 0.1, 0).mean() + 0.3 * (-pc.sum() / nc.sum())
    assert loss.item() == pytest.approx(want, rel=1e-12)
    cr, rj = 0.1 * (pc - rc), 0.1 * (pr - rr)
    assert metrics["rewards/margins"].item() == pytest.approx((cr - rj).mean())
    assert metrics["rewards/accuracies"].item() == pytest.approx((cr > rj).mean())
    assert metrics["logps/chosen"].item() == pytest.approx(pc.mean())


def test_reference_free_uses_zero_reference():
    pc, pr, rc, rr, nc, nr = make_inputs(4)
    t = [torch.tensor(x) for x in (pc, pr, rc, rr)]
    loss, metrics = combined_dpo_loss(*t, reference_free=True, params=LossParams(beta=0.1))
    want = reference("sigmoid", pc, pr, 0 * rc, 0 * rr, nc, nr, 0.1, 0).mean()
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * pc.mean())


def test_wpo_weights_multiply_each_loss_and_work_with_sft():
    pc, pr, rc, rr, nc, nr = make_inputs(6)
    t = [torch.tensor(x) for x in (pc, pr, rc, rr, nc, nr)]
    wc = torch.tensor(np.linspace(0.1, 0.9, 7))
    wr = torch.tensor(np.linspace(0.9, 0.2, 7))
    loss, _ = combined_dpo_loss(*t[:4], loss_type=["sigmoid", "sft"], params=LossParams(beta=0.1),
                                chosen_lengths=t[4], rejected_lengths=t[5], chosen_weights=wc, rejected_weights=wr)
    w = (wc * wr).numpy()
    want = (reference("sigmoid", pc, pr, rc, rr, nc, nr, 0.1, 0) * w).mean() + (-pc.sum() / nc.sum() * w).mean()
    assert loss.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="use_weighting"):
        combined_dpo_loss(*t[:4], loss_type="aot", chosen_weights=wc, rejected_weights=wr)


def test_wpo_weights_helper():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    lssp = torch.tensor([[-0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = losses.wpo_weights(lp, lssp, mask)
    assert torch.allclose(w, torch.tensor([math.exp((-0.5 - 1.0) / 2), math.exp(-0.3)]))


def test_gradients_flow_and_rewards_are_detached():
    pc = torch.tensor([-3.0, -4.0], requires_grad=True)
    pr = torch.tensor([-5.0, -2.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0])
    loss, cr, rr = dpo_loss(pc, pr, ref, ref)
    loss.sum().backward()
    assert pc.grad is not None and torch.all(pc.grad < 0)  # raising chosen lowers the loss
    assert not cr.requires_grad and not rr.requires_grad


@pytest.mark.parametrize("loss_type, params, match", [
    ("nope", {}, "loss_type"),
    ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),
    ("ipo", {}, "chosen_lengths"),
    ("apo_zero", {"f_divergence_type": "forward_kl"}, "f_divergence_type"),
    ("sigmoid", {"f_divergence_type": "bogus"}, "f_divergence_type"),
])
def test_errors_name_the_argument(loss_type, params, match):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(z, z, z, z, loss_type=loss_type, params=LossParams(**params))


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl_formula(center, with_margin):
    rng = np.random.default_rng(0)
    c, r, m = rng.normal(size=6), rng.normal(size=6), rng.uniform(0, 1, 6)
    got = reward_loss(torch.tensor(c), torch.tensor(r), torch.tensor(m) if with_margin else None, center)
    want = -logsig(c - r - (m if with_margin else 0)).mean() + (center or 0) * ((c + r) ** 2).mean()
    assert got.item() == pytest.approx(want, rel=1e-12)
    met = reward_metrics(torch.tensor(c), torch.tensor(r))
    assert met["accuracy"].item() == pytest.approx((c > r).mean())
    assert met["min_reward"].item() == pytest.approx(min(c.min(), r.min()))


def test_loss_table_covers_trl():
    from trl import DPOConfig

    import dataclasses
    field = {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"]
    help_text = field.metadata.get("help", "")
    for name in LOSS_TYPES:
        assert name in help_text, f"{name} is not a TRL 1.16 loss type"


def test_loss_params_defaults_are_trls_and_dpo_configs():
    import dataclasses

    from trl import DPOConfig as TRLDPOConfig

    from rayalign.config import DPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(TRLDPOConfig)}
    ours = DPOConfig(model_name_or_path="m", train_dataset="d.jsonl")
    for f in dataclasses.fields(LossParams):
        assert f.default == trl_defaults[f.name], f.name
    assert LossParams.of(ours) == LossParams()


def test_a_new_loss_type_is_one_function_and_one_table_entry(monkeypatch):
    """Registering an entry is all it takes: DPOConfig accepts the name, validates its
    metadata, and the combined loss runs the function."""
    from rayalign.config import ConfigError, DPOConfig

    def _margin_squared(t: losses.PairTerms, p: LossParams) -> torch.Tensor:
        return (p.beta * t.delta - 1) ** 2

    bounded = losses.Requirement("label_smoothing", lambda eps: eps == 0, "label_smoothing == 0")
    monkeypatch.setitem(losses.LOSSES, "margin_squared", losses.LossSpec(_margin_squared, requires=(bounded,)))
    base = {"model_name_or_path": "m", "train_dataset": "d.jsonl"}
    cfg = DPOConfig(**base, loss_type=("sigmoid", "margin_squared"), loss_weights=(1.0, 0.5), beta=0.2)
    with pytest.raises(ConfigError, match=r"^label_smoothing: margin_squared needs label_smoothing == 0"):
        DPOConfig(**base, loss_type=("margin_squared",), label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"^f_divergence_type: .*\['margin_squared'\]"):
        DPOConfig(**base, loss_type=("margin_squared",), f_divergence_type="forward_kl")

    pc, pr, rc, rr, nc, nr = make_inputs(7)
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)]
    loss, _ = combined_dpo_loss(*t, loss_type=cfg.loss_type, loss_weights=cfg.loss_weights,
                                params=LossParams.of(cfg))
    delta = (pc - rc) - (pr - rr)
    want = reference("sigmoid", pc, pr, rc, rr, nc, nr, 0.2, 0).mean() + 0.5 * ((0.2 * delta - 1) ** 2).mean()
    assert loss.item() == pytest.approx(want, rel=1e-12)

"""Kernels of the safety-restoration methods (issue 7) against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mergesafe.restore import (alignment_projector, ema_update_, lox_harden, projection_cosine,
                               resta, safe_lora_update, safemerge_update, select_layers)
from mergesafe.restore.safe_lora import (alignment_matrix, lora_update_cosine, project_lora_update,
                                         project_update, round_cosine, update_cosine)
from mergesafe.restore.safemerge import blends


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=_gen(seed), dtype=torch.float64))
    return q.to(torch.float32)


# ---------------------------------------------------------------- Safe LoRA

def test_projector_formula_on_hand_made_matrix():
    w_u = torch.zeros(2, 2)
    w_a = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # V = [[3,0],[4,0]], ‖V‖_F = 5
    C = alignment_projector(w_a, w_u)
    expected = torch.tensor([[9.0, 12.0], [12.0, 16.0]]) / 5.0
    torch.testing.assert_close(C, expected)
    assert C.dtype == torch.float32 and C.shape == (2, 2)


def test_projector_uses_the_difference_not_the_weights():
    base = torch.randn(5, 3, generator=_gen(1))
    v = torch.randn(5, 3, generator=_gen(2))
    C = alignment_projector(base + v, base)
    torch.testing.assert_close(C, v @ v.T / torch.linalg.matrix_norm(v), rtol=1e-5, atol=1e-5)


def test_unit_rank_one_projector_leaves_subspace_matrix_unchanged():
    u = _orthonormal(6, 1, seed=3)          # unit column
    r = torch.randn(1, 4, generator=_gen(4))
    r = r / r.norm()                        # V = u rᵀ, ‖V‖_F = 1 → C = u uᵀ
    w_u = torch.randn(6, 4, generator=_gen(5))
    C = alignment_projector(w_u + u @ r, w_u)
    delta = u @ torch.randn(1, 4, generator=_gen(6)) * 2.5   # in the column space of V
    torch.testing.assert_close(safe_lora_update(delta, C, project=True), delta,
                               rtol=1e-5, atol=1e-5)
    assert projection_cosine(C, delta) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(C @ C, C, rtol=1e-5, atol=1e-5)  # idempotent in this case


def test_cosine_is_one_in_subspace_and_zero_orthogonal_for_rank_k():
    q = _orthonormal(8, 3, seed=7)
    basis, ortho = q[:, :2], q[:, 2:]
    # rank-2 alignment update with equal singular values → C = multiple of span projector
    v = basis @ torch.eye(2, 5) * 3.0
    C = alignment_projector(v, torch.zeros_like(v))
    in_span = basis @ torch.randn(2, 5, generator=_gen(9))
    orth = ortho @ torch.randn(1, 5, generator=_gen(10))
    assert projection_cosine(C, in_span) == pytest.approx(1.0, abs=1e-5)
    assert projection_cosine(C, orth) == pytest.approx(0.0, abs=1e-5)
    # C·ΔW of an orthogonal update vanishes; scaled (‖V‖_F = 3√2) projector in the span
    assert safe_lora_update(orth, C, project=True).abs().max().item() < 1e-5
    torch.testing.assert_close(safe_lora_update(in_span, C, project=True),
                               in_span * (9.0 / (3.0 * math.sqrt(2.0))), rtol=1e-4, atol=1e-5)


def test_cosine_exact_on_permuted_basis():
    # V spans e0, e2 exactly (no rounding): updates in span(e1, e3) give exactly zero
    v = torch.zeros(4, 3)
    v[0, 0], v[2, 1] = 2.0, 2.0
    C = alignment_projector(v, torch.zeros_like(v))
    orth = torch.zeros(4, 3)
    orth[1] = torch.tensor([1.0, -2.0, 3.0])
    orth[3] = torch.tensor([0.5, 0.0, 1.0])
    assert projection_cosine(C, orth) == 0.0
    inside = torch.zeros(4, 3)
    inside[0], inside[2] = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, 4.0])
    assert projection_cosine(C, inside) == pytest.approx(1.0, abs=1e-7)
    # half in, half out with equal norms → 1/√2
    assert projection_cosine(C, inside + orth * (inside.norm() / orth.norm())) == \
        pytest.approx(1 / math.sqrt(2.0), abs=1e-6)


def test_cosine_of_mixed_update_matches_hand_value():
    # C = e1 e1ᵀ (V = e1 e1ᵀ), ΔW = e1 + e2 as a column → C ΔW = e1, cos = 1/√2
    v = torch.zeros(3, 1)
    v[0, 0] = 1.0
    C = alignment_projector(v, torch.zeros_like(v))
    delta = torch.tensor([[1.0], [1.0], [0.0]])
    assert projection_cosine(C, delta) == pytest.approx(1 / math.sqrt(2.0), abs=1e-6)


def test_zero_inputs_give_zero_projector_and_no_cosine():
    w = torch.randn(4, 4, generator=_gen(11))
    C = alignment_projector(w, w.clone())
    assert C.abs().max().item() == 0.0
    # a zero V has no C: the cosine is undefined (the reference's NaN), not 0
    assert projection_cosine(C, torch.randn(4, 2, generator=_gen(12))) is None
    assert projection_cosine(torch.eye(4), torch.zeros(4, 2)) == 0.0


def test_safe_lora_update_without_projection_is_identity():
    delta = torch.randn(4, 3, generator=_gen(13))
    C = torch.randn(4, 4, generator=_gen(14))
    assert torch.equal(safe_lora_update(delta, C, project=False), delta)
    torch.testing.assert_close(safe_lora_update(delta, C, project=True), C @ delta)


def test_shape_errors():
    with pytest.raises(ValueError):
        alignment_projector(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):
        alignment_projector(torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        projection_cosine(torch.eye(3), torch.zeros(4, 2))


def test_select_layers_top_k_and_threshold():
    cos = {"a": 0.9, "b": 0.1, "c": 0.45, "d": 0.5, "e": -0.2, "f": 0.7}
    assert select_layers(cos, top_k=2) == {"e", "b"}
    assert select_layers(cos, top_k=3) == {"e", "b", "c"}
    assert select_layers(cos, top_k=0) == set()
    assert select_layers(cos, top_k=100) == set(cos)
    assert select_layers(cos, top_k=None) == set(cos)
    # threshold: cos <= threshold, as the reference; it overrides top_k
    assert select_layers(cos, top_k=1, threshold=0.5) == {"e", "b", "c", "d"}
    assert select_layers(cos, threshold=0.4999) == {"e", "b", "c"}
    assert select_layers(cos, threshold=0.0) == {"e"}
    # defaults: the 10 lowest
    many = {f"l{i:02d}": i / 20 for i in range(20)}
    assert select_layers(many) == {f"l{i:02d}" for i in range(10)}


def test_select_layers_ties_broken_by_name():
    cos = {"z": 0.3, "y": 0.3, "x": 0.3}
    assert select_layers(cos, top_k=2) == {"x", "y"}


def test_select_layers_rounds_to_five_decimals_then_compares_with_le():
    # numpy.round(cos, 5) first: 0.500004 is 0.5 (selected at 0.5), 0.500006 is 0.50001 (not)
    cos = {"a": 0.500004, "b": 0.500006, "c": 0.499996, "d": 0.5}
    assert round_cosine(0.500004) == 0.5 and round_cosine(0.500006) == 0.50001
    assert round_cosine(0.499996) == 0.5 and round_cosine(None) is None
    assert select_layers(cos, threshold=0.5) == {"a", "c", "d"}
    assert select_layers(cos, threshold=0.50001) == {"a", "b", "c", "d"}
    assert select_layers(cos, threshold=0.49999) == set()
    # top-k ranks the rounded cosines: a, c and d tie at 0.5 and are taken by name
    assert select_layers(cos, top_k=2) == {"a", "c"}
    assert select_layers({"x": 0.300001, "y": 0.3}, top_k=1) == {"x"}  # tie after rounding
    assert select_layers({"x": 0.30001, "y": 0.3}, top_k=1) == {"y"}


def test_select_layers_never_selects_a_zero_alignment_layer():
    cos = {"zero": None, "nan": float("nan"), "a": 0.9, "b": 0.2}
    assert select_layers(cos, top_k=1) == {"b"}
    assert select_layers(cos, top_k=10) == {"a", "b"}
    assert select_layers(cos, top_k=None) == {"a", "b"}
    assert select_layers(cos, threshold=1.0) == {"a", "b"}


def _explicit(v: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """C·ΔW with C = V Vᵀ/‖V‖_F formed explicitly (float64), and the cosine of the two."""
    v, d = v.double(), delta.double()
    cd = (v @ v.T / torch.linalg.matrix_norm(v)) @ d
    return cd, float((cd * d).sum() / (cd.norm() * d.norm()))


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_projection_without_c_equals_the_explicit_formula(shape):
    out, inn = shape
    w_u = torch.randn(out, inn, generator=_gen(70))
    w_a = w_u + 0.3 * torch.randn(out, inn, generator=_gen(71))
    v = alignment_matrix(w_a, w_u)
    torch.testing.assert_close(v, w_a - w_u)
    delta = torch.randn(out, inn, generator=_gen(72))
    want, want_cos = _explicit(v, delta)
    got = project_update(v, delta)
    assert got.dtype == torch.float32 and got.shape == (out, inn)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    assert update_cosine(v, delta) == pytest.approx(want_cos, abs=1e-12)
    # the explicit-C forms agree
    C = alignment_projector(w_a, w_u)
    torch.testing.assert_close(safe_lora_update(delta, C, project=True), got, rtol=1e-4, atol=1e-5)
    assert projection_cosine(C, delta) == pytest.approx(want_cos, abs=1e-6)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
def test_lora_projection_and_cosine_from_the_factors(shape):
    out, inn = shape
    r, scale = 3, 2.5
    v = torch.randn(out, inn, generator=_gen(80))
    b = torch.randn(out, r, generator=_gen(81))
    a = torch.randn(r, inn, generator=_gen(82))
    delta = scale * (b.double() @ a.double())
    want, want_cos = _explicit(v, delta)
    got = project_lora_update(v, b, a, scale)
    assert got.dtype == torch.float32 and got.shape == (out, inn)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    cos = lora_update_cosine(v, b, a)
    assert cos == pytest.approx(want_cos, abs=1e-12)
    assert cos == pytest.approx(update_cosine(v, delta.float()), abs=1e-6)  # scale-free
    # B in the column space of a rank-1 V → cos 1; B orthogonal to it → cos 0, C·ΔW = 0
    u = _orthonormal(out, 2, seed=83)
    v1 = u[:, :1] @ torch.randn(1, inn, generator=_gen(84))
    assert lora_update_cosine(v1, u[:, :1] @ torch.randn(1, r, generator=_gen(85)), a) == \
        pytest.approx(1.0, abs=1e-9)
    b_orth = u[:, 1:] @ torch.randn(1, r, generator=_gen(86))
    assert lora_update_cosine(v1, b_orth, a) == 0.0
    assert project_lora_update(v1, b_orth, a).abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        project_lora_update(v, b, a[:, :-1])


def test_zero_alignment_matrix_has_no_cosine_and_is_never_projected():
    w = torch.randn(5, 4, generator=_gen(90))
    v = alignment_matrix(w, w.clone())
    assert update_cosine(v, torch.randn(5, 4, generator=_gen(91))) is None
    assert lora_update_cosine(v, torch.randn(5, 2, generator=_gen(92)),
                              torch.randn(2, 4, generator=_gen(93))) is None
    with pytest.raises(ValueError, match="never projected"):
        project_update(v, torch.randn(5, 4, generator=_gen(94)))
    with pytest.raises(ValueError, match="never projected"):
        project_lora_update(v, torch.ones(5, 2), torch.ones(2, 4))
    # a zero update against a non-zero V: cosine 0 (as torch's cosine_similarity of a zero vector)
    assert update_cosine(torch.ones(5, 4), torch.zeros(5, 4)) == 0.0
    # with the cosines of a layer stack, the zero-V layer is not among the 2 lowest
    cosines = {"l0": update_cosine(v, torch.randn(5, 4, generator=_gen(95))), "l1": 0.7, "l2": 0.9}
    assert select_layers(cosines, top_k=2) == {"l1", "l2"}


# ---------------------------------------------------------------- SafeMERGE

def test_safemerge_blends_only_below_threshold():
    task = torch.randn(3, 4, generator=_gen(20))
    safe = torch.randn(3, 4, generator=_gen(21))
    blended = safemerge_update(task, safe, cosine=0.2)
    torch.testing.assert_close(blended, 0.8 * task + 0.2 * safe)
    assert torch.equal(safemerge_update(task, safe, cosine=0.35), task)  # not below
    # the cosine is rounded to 5 decimals first (SafeMERGE's code), then compared with <
    assert torch.equal(safemerge_update(task, safe, cosine=0.349996), task)  # 0.35: not below
    torch.testing.assert_close(safemerge_update(task, safe, cosine=0.349994), 0.8 * task + 0.2 * safe)
    assert blends(0.349994) and not blends(0.349996) and not blends(0.35)
    # a zero alignment matrix (cosine None): SafeMERGE's code has C = 0, cosine 0 → blended
    assert blends(None) and not blends(float("nan"))
    torch.testing.assert_close(safemerge_update(task, safe, cosine=None), 0.8 * task + 0.2 * safe)
    assert torch.equal(safemerge_update(task, safe, cosine=0.9), task)
    assert torch.equal(safemerge_update(task, safe, cosine=float("nan")), task)
    custom = safemerge_update(task, safe, cosine=0.6, threshold=0.7, w_task=0.5, w_safe=0.5)
    torch.testing.assert_close(custom, 0.5 * (task + safe))
    with pytest.raises(ValueError):
        safemerge_update(task, safe[:2], cosine=0.0)


# ---------------------------------------------------------------- RESTA

def test_resta_closed_form_without_dare_and_with_density_one():
    pre = torch.randn(5, 6, generator=_gen(30))
    post = torch.randn(5, 6, generator=_gen(31))
    harm = torch.randn(5, 6, generator=_gen(32))
    expected = post + 0.5 * (pre - harm)
    torch.testing.assert_close(resta(pre, post, harm), expected)
    torch.testing.assert_close(resta(pre, post, harm, dare_density=1.0), expected)
    torch.testing.assert_close(resta(pre, post, harm, gamma=2.0),
                               post + 2.0 * (pre - harm))
    torch.testing.assert_close(resta(pre, post, harm, gamma=0.0), post)


def test_resta_dare_drops_and_rescales_the_task_vector_only():
    pre = torch.randn(200, 50, generator=_gen(33))
    tau = torch.randn(200, 50, generator=_gen(34))
    harm = torch.randn(200, 50, generator=_gen(35))
    out = resta(pre, pre + tau, harm, gamma=1.0, dare_density=0.25, generator=_gen(36))
    kept = out - pre - (pre - harm)       # = DARE(τ)
    nz = kept.abs() > 1e-4
    frac = nz.float().mean().item()
    assert 0.22 < frac < 0.28
    torch.testing.assert_close(kept[nz], tau[nz] / 0.25, rtol=1e-4, atol=1e-4)
    again = resta(pre, pre + tau, harm, gamma=1.0, dare_density=0.25, generator=_gen(36))
    assert torch.equal(out, again)         # reproducible from the generator
    with pytest.raises(ValueError):
        resta(pre, pre, harm, dare_density=0.0)


# ---------------------------------------------------------------- LoX

def test_lox_full_rank_is_full_extrapolation():
    pre = torch.randn(6, 4, generator=_gen(40))
    u = torch.randn(6, 4, generator=_gen(41))
    expected = pre + 1.5 * (pre - u)
    torch.testing.assert_close(lox_harden(pre, u, rank=0, coef=1.5), expected)
    torch.testing.assert_close(lox_harden(pre, u, rank=4, coef=1.5), expected,
                               rtol=1e-5, atol=1e-5)
    bias_pre, bias_u = torch.randn(6, generator=_gen(42)), torch.randn(6, generator=_gen(43))
    torch.testing.assert_close(lox_harden(bias_pre, bias_u, rank=2, coef=0.5),
                               bias_pre + 0.5 * (bias_pre - bias_u))


def test_lox_rank_k_matches_hand_built_low_rank():
    left = _orthonormal(8, 3, seed=44)
    right = _orthonormal(5, 3, seed=45)
    sigma = torch.tensor([5.0, 2.0, 0.5])
    delta = left @ torch.diag(sigma) @ right.T   # singular values known by construction
    u = torch.randn(8, 5, generator=_gen(46))
    pre = u + delta
    top2 = left[:, :2] @ torch.diag(sigma[:2]) @ right[:, :2].T
    torch.testing.assert_close(lox_harden(pre, u, rank=2, coef=2.0), pre + 2.0 * top2,
                               rtol=1e-4, atol=1e-4)
    top1 = 5.0 * left[:, :1] @ right[:, :1].T
    torch.testing.assert_close(lox_harden(pre, u, rank=1, coef=1.0), pre + top1,
                               rtol=1e-4, atol=1e-4)
    # rank 3 = the whole (rank-3) update
    torch.testing.assert_close(lox_harden(pre, u, rank=3, coef=1.0), pre + delta,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        lox_harden(pre, u, rank=-1, coef=1.0)


# ---------------------------------------------------------------- EMA

def test_ema_after_n_steps_matches_closed_form():
    beta = 0.9
    pre = {"w": torch.randn(3, 2, generator=_gen(50)), "b": torch.randn(2, generator=_gen(51))}
    avg = {k: v.clone() for k, v in pre.items()}
    steps = [{k: torch.randn(v.shape, generator=_gen(60 + t)) for k, v in pre.items()}
             for t in range(5)]
    for params in steps:
        ema_update_(avg, params, beta)
    n = len(steps)
    for k in pre:
        expected = beta ** n * pre[k] + sum((1 - beta) * beta ** (n - 1 - t) * steps[t][k]
                                            for t in range(n))
        torch.testing.assert_close(avg[k], expected, rtol=1e-5, atol=1e-6)


def test_ema_single_step_and_edge_betas_in_place():
    a = torch.tensor([1.0, 2.0])
    avg = {"x": a}
    ema_update_(avg, {"x": torch.tensor([3.0, 6.0])}, 0.75)
    assert avg["x"] is a                                  # updated in place
    torch.testing.assert_close(a, torch.tensor([1.5, 3.0]))
    ema_update_(avg, {"x": torch.tensor([9.0, 9.0])}, 1.0)
    torch.testing.assert_close(a, torch.tensor([1.5, 3.0]))
    ema_update_(avg, {"x": torch.tensor([9.0, 9.0])}, 0.0)
    torch.testing.assert_close(a, torch.tensor([9.0, 9.0]))
    with pytest.raises(KeyError):
        ema_update_({"y": torch.zeros(1)}, {"x": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError):
        ema_update_(avg, {"x": torch.zeros(2)}, 1.5)

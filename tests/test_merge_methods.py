"""Each merge method against its formula on small tensors; the registry; merge_tensor."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mergesafe.errors import UserError
from mergesafe.merge import methods as M
from mergesafe.merge.engine import VocabularyGrowthWarning, merge_tensor, pair_plan, tensor_seed
from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.registry import METHODS, get_method, validate_params

ATOL = 1e-6


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------- reference formulas

def ref_topk(t, density):
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel())
    mask[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
    return t * mask.reshape(t.shape)


def ref_breadcrumbs(t, density, gamma):
    n = t.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = torch.argsort(t.abs().reshape(-1))
    mask = torch.zeros(n)
    mask[idx[n_bot:n_bot + target]] = 1
    return t * mask.reshape(t.shape)


def ref_gta(base, others, weights, deltas, *, consensus, normalize, lam=1.0):
    d = torch.stack([w * dl for w, dl in zip(weights, deltas)])
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    if consensus:
        maj = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        mask = (d.sign() == maj).float()
        mixed = (d * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = d.sum(0)
        div = w.sum()
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


# --------------------------------------------------------------------- methods

def test_linear_is_weighted_mean():
    a, b, c = rnd(5, 7, seed=1), rnd(5, 7, seed=2), rnd(5, 7, seed=3)
    out = M.linear([a, b, c], [0.2, 0.3, 0.5])
    torch.testing.assert_close(out, 0.2 * a + 0.3 * b + 0.5 * c, atol=ATOL, rtol=0)
    out = M.linear([a, b], [1.0, 3.0])
    torch.testing.assert_close(out, (a + 3 * b) / 4, atol=ATOL, rtol=0)
    out = M.linear([a, b], [1.0, 3.0], normalize=False)
    torch.testing.assert_close(out, a + 3 * b, atol=ATOL, rtol=0)


def test_task_arithmetic():
    base, x, y = rnd(4, 6, seed=1), rnd(4, 6, seed=2), rnd(4, 6, seed=3)
    out = M.task_arithmetic(base, [x, y], [0.3, 0.6], lambda_=0.5)
    torch.testing.assert_close(out, base + 0.5 * (0.3 * (x - base) + 0.6 * (y - base)), atol=ATOL, rtol=0)
    out = M.task_arithmetic(base, [x, y], [0.3, 0.6], normalize=True)
    torch.testing.assert_close(out, base + (0.3 * (x - base) + 0.6 * (y - base)) / 0.9, atol=ATOL, rtol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_trim_elect_disjoint_merge(normalize):
    base, x, y = rnd(8, 9, seed=1), rnd(8, 9, seed=2), rnd(8, 9, seed=3)
    dens = [0.5, 0.3]
    out = M.ties(base, [x, y], [0.7, 0.4], density=dens, normalize=normalize)
    deltas = [ref_topk(x - base, 0.5), ref_topk(y - base, 0.3)]
    ref = ref_gta(base, [x, y], [0.7, 0.4], deltas, consensus=True, normalize=normalize)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_ties_single_model_keeps_top_fraction():
    base, x = rnd(10, 10, seed=4), rnd(10, 10, seed=5)
    out = M.ties(base, [x], [1.0], density=[0.2])
    kept = (out - base) != 0
    assert int(kept.sum()) == 20
    torch.testing.assert_close(out, base + ref_topk(x - base, 0.2), atol=ATOL, rtol=0)


def test_ties_count_normalisation_is_pefts():
    base, x, y = torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, -1.0])
    out = M.ties(base, [x, y], [1.0, 1.0], density=[1.0, 1.0], normalize_by="count")
    # signs: elect + for 0 (1+3), 0 for index 1 (-1+1 = 0 -> +), + for 2 (2-1)
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 2.0]))


def test_breadcrumbs_drops_outliers_and_small_values():
    base, x = rnd(20, 10, seed=6), rnd(20, 10, seed=7)
    out = M.breadcrumbs(base, [x], [0.5], density=[0.6], gamma=[0.05])
    torch.testing.assert_close(out, base + 0.5 * ref_breadcrumbs(x - base, 0.6, 0.05), atol=ATOL, rtol=0)
    kept = ((out - base) != 0).sum()
    assert int(kept) == 120


def test_breadcrumbs_ties():
    base, x, y = rnd(10, 10, seed=8), rnd(10, 10, seed=9), rnd(10, 10, seed=10)
    out = M.breadcrumbs_ties(base, [x, y], [0.5, 0.8], density=[0.7, 0.5], gamma=[0.02, 0.1])
    deltas = [ref_breadcrumbs(x - base, 0.7, 0.02), ref_breadcrumbs(y - base, 0.5, 0.1)]
    ref = ref_gta(base, [x, y], [0.5, 0.8], deltas, consensus=True, normalize=False)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_dare_linear_density_one_is_task_arithmetic_and_is_seeded():
    base, x = rnd(50, 40, seed=11), rnd(50, 40, seed=12)
    out = M.dare_linear(base, [x], [0.4], density=[1.0], generator=gen())
    torch.testing.assert_close(out, base + 0.4 * (x - base), atol=ATOL, rtol=0)
    a = M.dare_linear(base, [x], [1.0], density=[0.3], generator=gen(1))
    b = M.dare_linear(base, [x], [1.0], density=[0.3], generator=gen(1))
    c = M.dare_linear(base, [x], [1.0], density=[0.3], generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_statistics_and_rescaling():
    base, x = torch.zeros(200, 200), rnd(200, 200, seed=13)
    tau = x - base
    out = M.dare_linear(base, [x], [1.0], density=[0.3], generator=gen(3))  # L1 rescale (mergekit)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-4)
    scale = out[kept] / tau[kept]
    assert torch.allclose(scale, scale[0].expand_as(scale))
    out = M.dare_linear(base, [x], [1.0], density=[0.3], rescale_norm="density", generator=gen(3))
    torch.testing.assert_close(out[kept], tau[kept] / 0.3)
    out = M.dare_linear(base, [x], [1.0], density=[0.3], rescale=False, generator=gen(3))
    torch.testing.assert_close(out[kept], tau[kept])


def test_dare_ties_density_one_is_ties_without_trim():
    base, x, y = rnd(6, 6, seed=14), rnd(6, 6, seed=15), rnd(6, 6, seed=16)
    out = M.dare_ties(base, [x, y], [0.5, 0.5], density=[1.0, 1.0], generator=gen())
    ref = ref_gta(base, [x, y], [0.5, 0.5], [x - base, y - base], consensus=True, normalize=False)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_della_keep_probability_grows_with_magnitude():
    base, x = torch.zeros(400, 400), rnd(400, 400, seed=17)
    tau = x - base
    out = M.della_linear(base, [x], [1.0], density=[0.5], epsilon=[0.3], rescale=False,
                         generator=gen(4))
    kept = out != 0
    ranks = tau.abs().argsort(dim=1).argsort(dim=1).float() / 399
    low, high = kept[ranks < 0.25].float().mean().item(), kept[ranks > 0.75].float().mean().item()
    # p = 0.2 + 0.6·rank: ≈ 0.275 in the lowest quarter, ≈ 0.725 in the highest
    assert abs(low - 0.275) < 0.02 and abs(high - 0.725) < 0.02
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    torch.testing.assert_close(out[kept], tau[kept])


def test_della_density_one_and_validation():
    base, x, y = rnd(5, 5, seed=18), rnd(5, 5, seed=19), rnd(5, 5, seed=20)
    out = M.della(base, [x, y], [0.3, 0.7], density=[1.0, 1.0], epsilon=[0.15, 0.15], generator=gen())
    ref = ref_gta(base, [x, y], [0.3, 0.7], [x - base, y - base], consensus=True, normalize=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="epsilon"):
        validate_params("della", {"density": 0.9, "epsilon": 0.2})


def test_della_density_epsilon_checked_per_model_as_mergekit():
    sparsify = pytest.importorskip("mergekit.sparsify")  # the oracle: della_magprune's own check
    t = rnd(4, 8, seed=21)

    def mergekit_accepts(d: float, e: float) -> bool:
        try:
            sparsify.della_magprune(t, density=d, epsilon=e)
        except ValueError:
            return False
        return True

    # one (density, epsilon) per post model: 0.3 ± 0.25 and 0.8 ± 0.1 both lie in (0, 1); the
    # cross pair 0.8 ± 0.25 (which no model uses) would not
    assert mergekit_accepts(0.3, 0.25) and mergekit_accepts(0.8, 0.1)
    assert not mergekit_accepts(0.8, 0.25)
    for method in ("della", "della_linear"):
        p = validate_params(method, {"density": [0.3, 0.8], "epsilon": [0.25, 0.1]})
        assert p["density"] == [0.3, 0.8] and p["epsilon"] == [0.25, 0.1]
        plan = pair_plan(method, p, [0.5, 0.5], 2, validated=True)
        assert plan.model_params["density"] == [0.3, 0.8]
        assert plan.model_params["epsilon"] == [0.25, 0.1]
    # a scalar stands for every model; density 1 keeps the task vector whole (no check)
    assert validate_params("della", {"density": 0.5, "epsilon": [0.1, 0.45]})["epsilon"] == [0.1, 0.45]
    assert mergekit_accepts(1.0, 0.5)
    assert validate_params("della", {"density": [1.0, 0.6], "epsilon": [0.5, 0.3]})["density"] == \
        [1.0, 0.6]
    # genuinely invalid pairs, refused naming the post model
    assert not mergekit_accepts(0.8, 0.25) and not mergekit_accepts(0.1, 0.1)
    with pytest.raises(UserError, match=r"post model 2 \(density=0\.8, epsilon=0\.25\)"):
        validate_params("della", {"density": [0.3, 0.8], "epsilon": [0.1, 0.25]})
    with pytest.raises(UserError, match=r"post model 2 \(density=0\.8, epsilon=0\.25\)"):
        validate_params("della_linear", {"density": 0.8, "epsilon": [0.1, 0.25]})
    with pytest.raises(UserError, match=r"post model 1 \(density=0\.1, epsilon=0\.1\)"):
        validate_params("della", {"density": [0.1, 0.5], "epsilon": 0.1})
    with pytest.raises(UserError, match="2 density values but 3 epsilon values"):
        validate_params("della", {"density": [0.3, 0.8], "epsilon": [0.1, 0.1, 0.1]})


def test_slerp_formula():
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 2.0])
    out = M.slerp(0.5, v0, v1)
    # Ω = 90°, coefficients sin(45°)/sin(90°) on both (unnormalised) inputs
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    torch.testing.assert_close(M.slerp(0.0, v0, v1), v0)
    torch.testing.assert_close(M.slerp(1.0, v0, v1), v1)
    a = rnd(3, 4, seed=21)
    torch.testing.assert_close(M.slerp(0.3, a, 2 * a), 0.7 * a + 0.3 * 2 * a)  # collinear: lerp
    a, b = rnd(30, 20, seed=22), rnd(30, 20, seed=23)
    fa, fb = a.reshape(-1), b.reshape(-1)
    omega = torch.acos((fa / fa.norm()) @ (fb / fb.norm()))
    ref = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(M.slerp(0.3, a, b), ref, atol=1e-6, rtol=1e-5)


def test_model_stock_formula():
    base = torch.zeros(2)
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal offsets: cos = 0
    torch.testing.assert_close(M.model_stock(base, [w1, w2]), torch.zeros(2))
    w1, w2 = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])  # cos 45°
    cos = math.sqrt(0.5)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(M.model_stock(base, [w1, w2]), t * (w1 + w2) / 2)
    b, x, y = rnd(4, 3, seed=24), rnd(4, 3, seed=25), rnd(4, 3, seed=26)
    out = M.model_stock(b, [x, y], filter_wise=True)
    for r in range(4):
        oa, ob = x[r] - b[r], y[r] - b[r]
        c = (oa @ ob) / (oa.norm() * ob.norm())
        tr = 2 * c / (1 + c)
        torch.testing.assert_close(out[r], tr * (x[r] + y[r]) / 2 + (1 - tr) * b[r])


def test_topk_mask_ties_and_selection():
    x = rnd(100_000, seed=27).abs()
    k = 31_337
    ref = torch.zeros(x.numel(), dtype=torch.bool)
    ref[torch.argsort(x, descending=True)[:k]] = True
    assert torch.equal(sp.topk_mask(x, k), ref)
    y = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 0.0])
    assert sp.topk_mask(y, 3).tolist() == [False, True, True, False, True, False]
    assert sp.topk_mask(y, 6).all()
    torch.testing.assert_close(sp.magnitude(torch.tensor([1.0, -2.0, 2.0, -2.0, 3.0]), 0.6),
                               torch.tensor([0.0, -2.0, 2.0, 0.0, 3.0]))


# --------------------------------------------------------------------- registry

def test_registry_names_and_defaults_follow_mergekit():
    assert list(METHODS) == ["linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties",
                             "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock"]
    expect = {  # (normalize, rescale) defaults of mergekit 0.1.5
        "task_arithmetic": (False, False), "ties": (True, False), "dare_linear": (False, True),
        "dare_ties": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
        "della": (True, True), "della_linear": (False, True),
    }
    for name, (norm, resc) in expect.items():
        p = validate_params(name, {})
        assert (p["normalize"], p["rescale"], p["density"], p["lambda"]) == (norm, resc, 1.0, 1.0)
    assert validate_params("breadcrumbs", {})["gamma"] == 0.01
    assert validate_params("della", {})["epsilon"] == 0.15
    assert validate_params("linear", {}) == {"normalize": True}
    assert validate_params("model_stock", {}) == {"filter_wise": False}


def test_validate_params_errors_and_coercion():
    p = validate_params("ties", {"density": "0.5", "normalize": "false", "lambda": "2"})
    assert p["density"] == 0.5 and p["normalize"] is False and p["lambda"] == 2.0
    assert validate_params("ties", {"density": [0.5, 0.7]})["density"] == [0.5, 0.7]
    for bad, match in [({"density": 0}, r"\(0, 1\]"), ({"density": 1.5}, r"\(0, 1\]"),
                       ({"density": "x"}, "number"), ({"gamma": 0.1}, "unknown parameter"),
                       ({"normalize": "maybe"}, "true or false"), ({"weight": 0.3}, "--weight"),
                       ({"rescale_norm": "l3"}, "one of"), ({"density": float("nan")}, "finite")]:
        with pytest.raises(UserError, match=match):
            validate_params("ties", bad)
    with pytest.raises(UserError, match="unknown merge method"):
        get_method("average")
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        validate_params("breadcrumbs", {"gamma": 1.0})


# --------------------------------------------------------------------- merge_tensor (pair API)

@pytest.mark.parametrize("method,params,sparsify", [
    ("linear", {}, lambda t: t),
    ("task_arithmetic", {}, lambda t: t),
    ("ties", {"density": 0.4}, lambda t: ref_topk(t, 0.4)),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, lambda t: ref_breadcrumbs(t, 0.5, 0.1)),
    ("breadcrumbs_ties", {"density": 0.5}, lambda t: ref_breadcrumbs(t, 0.5, 0.01)),
    ("dare_linear", {}, lambda t: t),
    ("della", {}, lambda t: t),
])
def test_weight_is_lambda_of_the_post_model(method, params, sparsify):
    pre, post = rnd(16, 12, seed=30), rnd(16, 12, seed=31)
    for lam in (0.0, 0.3, 0.6, 1.0):
        out = merge_tensor(method, "model.layers.0.mlp.up_proj.weight", pre, [post], [lam], params, 0)
        torch.testing.assert_close(out, pre + lam * sparsify(post - pre), atol=ATOL, rtol=0)


def test_slerp_and_model_stock_pair_semantics():
    pre, post, post2, anchor = (rnd(8, 8, seed=s) for s in (32, 33, 34, 35))
    torch.testing.assert_close(merge_tensor("slerp", "w", pre, [post], [0.3], {}, 0),
                               M.slerp(0.3, pre, post))
    torch.testing.assert_close(merge_tensor("slerp", "w", pre, [post], [0.9], {"t": 0.3}, 0),
                               M.slerp(0.3, pre, post))
    torch.testing.assert_close(merge_tensor("model_stock", "w", pre, [post], [0.5], {}, 0, anchor=anchor),
                               M.model_stock(anchor, [pre, post]))
    torch.testing.assert_close(merge_tensor("model_stock", "w", pre, [post, post2], [0.5, 0.5], {}, 0),
                               M.model_stock(pre, [post, post2]))
    with pytest.raises(UserError, match="third model"):
        merge_tensor("model_stock", "w", pre, [post], [0.5], {}, 0)
    with pytest.raises(UserError, match="exactly two"):
        merge_tensor("slerp", "w", pre, [post, post2], [0.5, 0.5], {}, 0)
    with pytest.raises(UserError, match="anchor"):
        merge_tensor("linear", "w", pre, [post], [0.5], {}, 0, anchor=anchor)


def test_several_posts_with_weights():
    pre, a, b = rnd(6, 5, seed=36), rnd(6, 5, seed=37), rnd(6, 5, seed=38)
    out = merge_tensor("linear", "w", pre, [a, b], [0.2, 0.5], {}, 0)
    torch.testing.assert_close(out, pre + 0.2 * (a - pre) + 0.5 * (b - pre), atol=ATOL, rtol=0)
    out = merge_tensor("task_arithmetic", "w", pre, [a, b], [0.2, 0.5], {}, 0)
    torch.testing.assert_close(out, pre + 0.2 * (a - pre) + 0.5 * (b - pre), atol=ATOL, rtol=0)
    # TIES with normalize: the normalised mixture scaled by Σλ (= mergekit when Σλ = 1)
    out = merge_tensor("ties", "w", pre, [a, b], [0.4, 0.6], {}, 0)
    ref = ref_gta(pre, [a, b], [0.4, 0.6], [a - pre, b - pre], consensus=True, normalize=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    plan = pair_plan("ties", {"density": [0.5, 0.7]}, [0.4, 0.6], 2)
    assert plan.model_params["density"] == [0.5, 0.7]
    with pytest.raises(UserError, match="weights for 3"):
        merge_tensor("linear", "w", pre, [a, b, b], [0.2, 0.5], {}, 0)


def test_random_methods_are_seeded_per_tensor():
    pre, post = rnd(30, 30, seed=39), rnd(30, 30, seed=40)
    a = merge_tensor("dare_ties", "x.weight", pre, [post], [0.5], {"density": 0.5}, seed=7)
    b = merge_tensor("dare_ties", "x.weight", pre, [post], [0.5], {"density": 0.5}, seed=7)
    c = merge_tensor("dare_ties", "y.weight", pre, [post], [0.5], {"density": 0.5}, seed=7)
    d = merge_tensor("dare_ties", "x.weight", pre, [post], [0.5], {"density": 0.5}, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert tensor_seed(7, "x.weight") != tensor_seed(7, "y.weight")


def test_vocabulary_growth_and_shape_errors():
    pre, post = rnd(10, 4, seed=41), rnd(13, 4, seed=42)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = merge_tensor("ties", "model.embed_tokens.weight", pre, [post], [0.5], {"density": 0.5}, 0)
    assert out.shape == (13, 4)
    torch.testing.assert_close(out[:10], merge_tensor("ties", "model.embed_tokens.weight", pre,
                                                      [post[:10]], [0.5], {"density": 0.5}, 0))
    assert torch.equal(out[10:], post[10:])
    assert any(issubclass(w.category, VocabularyGrowthWarning) for w in caught)
    with pytest.raises(UserError, match="shape mismatch"):
        merge_tensor("linear", "model.layers.0.mlp.up_proj.weight", pre, [post], [0.5], {}, 0)
    with pytest.raises(UserError, match="shape mismatch"):
        merge_tensor("linear", "lm_head.weight", pre, [rnd(10, 5)], [0.5], {}, 0)
    with pytest.raises(UserError, match="vocabulary"):
        merge_tensor("linear", "lm_head.weight", post, [pre], [0.5], {}, 0)

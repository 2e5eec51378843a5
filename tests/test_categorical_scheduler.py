"""Categorical diffusion scheduler of the TCSS stage, checked against a brute-force N x N reference.

The reference below never uses the closed forms of the scheduler: it chains the one-step transition matrices
alpha_u I + (1 - alpha_u) / N 11^T, builds q(x_s | x_t, x_0 = i) for every candidate i as a full N x N matrix per
voxel (Bayes' rule) and sums over i explicitly, all in float64.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import NoiseSchedules

from custom_components.schedulers import CategoricalDiffusionScheduler

T = 1000
SPATIAL = (3, 4, 2)


# ----------------------------------------------------------------------------------------------------------------
# brute-force reference
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _sched(num_classes: int, schedule: str = "cosine") -> CategoricalDiffusionScheduler:
    return CategoricalDiffusionScheduler(num_train_timesteps=T, num_classes=num_classes, schedule=schedule)


@lru_cache(maxsize=None)
def chain(num_classes: int, start: int, stop: int) -> torch.Tensor:
    """M[k, j] = q(x_stop = j | x_start = k) as the product of one-step matrices u = start+1..stop (start=-1: clean)."""
    alphas = _sched(num_classes).alphas
    eye = torch.eye(num_classes, dtype=torch.float64)
    ones = torch.ones(num_classes, num_classes, dtype=torch.float64)
    m = eye.clone()
    for u in range(start + 1, stop + 1):
        m = m @ (alphas[u] * eye + (1 - alphas[u]) / num_classes * ones)
    return m


def one_hot(classes: torch.Tensor, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, *spatial) class indices -> (B, N, *spatial) one-hot."""
    return F.one_hot(classes, n).movedim(-1, 1).to(dtype)


def brute_posteriors(x_t, x0, f, t, prev):
    """Dense reference: (q(x_s | x_t, x_0), sum_i f_i q(x_s | x_t, x_0 = i), plug-in posterior at soft x0)."""
    b_size, n = x_t.shape[:2]
    q_out, p_out, plug_out = torch.empty_like(f), torch.empty_like(f), torch.empty_like(f)
    for b in range(b_size):
        q_ts = chain(n, int(prev[b]), int(t[b]))  # [k, j]
        q_s0 = chain(n, -1, int(prev[b]))  # [i, k]
        q_t0 = q_s0 @ q_ts  # [i, j]
        j = x_t[b].reshape(n, -1).argmax(0)  # (V,)
        # post[v, i, k] = q(x_s = k | x_t = j_v, x_0 = i): the full N x N matrix per voxel
        post = q_s0[None] * q_ts[:, j].T[:, None, :] / q_t0[:, j].T[:, :, None]
        assert torch.allclose(post.sum(-1), torch.ones((), dtype=post.dtype), atol=1e-12)
        fv = f[b].reshape(n, -1).T  # (V, N)
        x0v = x0[b].reshape(n, -1).T
        p = (fv[:, :, None] * post).sum(1)
        q = (x0v[:, :, None] * post).sum(1)  # selects the row i = x0 for one-hot x0
        plug = q_ts[:, j].T * (fv @ q_s0)
        plug = plug / plug.sum(1, keepdim=True)
        shape = f[b].shape
        p_out[b], q_out[b], plug_out[b] = (v.T.reshape(shape) for v in (p, q, plug))
    return q_out, p_out, plug_out


def brute_kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.where(q > 0, q * (torch.log(q) - torch.log(p)), torch.zeros(())).sum(1)


def random_case(n: int, seed: int, batch: int = 2, spatial=SPATIAL, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = one_hot(torch.randint(0, n, (batch, *spatial), generator=g), n, dtype)
    x_t = one_hot(torch.randint(0, n, (batch, *spatial), generator=g), n, dtype)
    if spatial:  # make sure both the x_t == x0 and x_t != x0 branches occur
        x_t[:, :, 0] = x0[:, :, 0]
    logits = 3 * torch.randn((batch, n, *spatial), generator=g, dtype=dtype)
    return x0, x_t, logits


CASES = [  # (t, prev_t) per batch element; None = default t - 1
    ((0, 0), None),
    ((1, 1), None),
    ((2, 517), None),
    ((T - 1, T - 1), None),
    ((T - 1, 500), (949, 0)),  # strided jumps
    ((40, 7), (3, -1)),  # jump straight to the clean data
    ((T - 1, 1), (-1, -1)),
]


# ----------------------------------------------------------------------------------------------------------------
# schedule and forward process
# ----------------------------------------------------------------------------------------------------------------


def test_package_exports_the_schedulers():
    import custom_components.schedulers as schedulers

    assert schedulers.__all__ == ["CategoricalDiffusionScheduler", "LeadingDDIMScheduler"]


def test_cosine_schedule_decreases_from_one_to_zero():
    s = _sched(20)
    abar = s.alphas_cumprod
    assert abar.shape == (T,) and abar.dtype == torch.float64
    assert (abar[1:] < abar[:-1]).all()
    assert 0.999 < abar[0] < 1 and 0 < abar[-1] < 1e-3
    betas = NoiseSchedules["cosine"](num_train_timesteps=T)[0].double()
    torch.testing.assert_close(s.alphas, 1 - betas)
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0))


def test_other_registered_schedules_and_args():
    s = CategoricalDiffusionScheduler(100, num_classes=3, schedule="linear_beta", beta_start=1e-3, beta_end=0.1)
    torch.testing.assert_close(s.alphas, 1 - torch.linspace(1e-3, 0.1, 100).double())
    with pytest.raises(ValueError, match="betas"):
        CategoricalDiffusionScheduler(100, num_classes=3, schedule="linear_beta", beta_start=0.0)


@pytest.mark.parametrize("n", [5, 20])
@pytest.mark.parametrize("s,t", [(-1, 0), (-1, T - 1), (0, 1), (3, 40), (500, 999), (949, 999), (-1, 517)])
def test_jump_equals_chained_one_step_matrices(n, s, t):
    sched = _sched(n)
    abar_s = 1.0 if s < 0 else sched.alphas_cumprod[s]
    a = sched.alphas_cumprod[t] / abar_s
    closed = a * torch.eye(n, dtype=torch.float64) + (1 - a) / n
    torch.testing.assert_close(chain(n, s, t), closed, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [5, 20])
def test_q_probs_matches_chain(n):
    x0, _, _ = random_case(n, 0)
    t = torch.tensor([0, 617])
    probs = _sched(n).q_probs(x0, t)
    for b in range(2):
        ref = torch.einsum("i...,ij->j...", x0[b], chain(n, -1, int(t[b])))
        torch.testing.assert_close(probs[b], ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))


def test_q_sample_frequencies_match_q_probs():
    n, v = 5, 200_000
    s = _sched(n)
    classes = torch.arange(v).remainder(n).reshape(1, v)
    x0 = one_hot(classes, n, torch.float32)
    for t in (300, 700, T - 1):
        x_t = s.q_sample(x0, torch.tensor([t]), generator=torch.Generator().manual_seed(t))
        assert x_t.dtype == torch.float32 and torch.equal(x_t.sum(1), torch.ones(1, v))
        probs = s.q_probs(x0[..., :n], torch.tensor([t]))[0]  # column i: distribution of x_t given x0 = i
        for i in range(n):
            freq = x_t[0][:, classes[0] == i].mean(1)
            torch.testing.assert_close(freq, probs[:, i], atol=0.01, rtol=0)


def test_sampler_never_draws_zero_probability_classes_and_resolves_tiny_ones():
    s = _sched(5)
    v = 400_000
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5 - 5e-5, 5e-5]).reshape(1, 5, 1).expand(1, 5, v).contiguous()
    draws = s._sample(probs, generator=torch.Generator().manual_seed(0))
    counts = draws.sum((0, 2))
    assert counts[0] == counts[2] == 0 and 5 < counts[4] < 40  # expected 20 draws of the 5e-5 class
    last_zero = torch.tensor([0.3, 0.7, 0.0, 0.0, 0.0]).reshape(1, 5, 1).expand(1, 5, v).contiguous()
    assert s._sample(last_zero, generator=torch.Generator().manual_seed(1))[:, 2:].sum() == 0


def test_sample_prior_is_uniform_one_hot():
    s = _sched(4)
    x = s.sample_prior((2, 4, 50, 50, 20), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 50, 50, 20) and x.dtype == torch.float32
    assert torch.equal(x.sum(1), torch.ones(2, 50, 50, 20))
    torch.testing.assert_close(x.mean((0, 2, 3, 4)), torch.full((4,), 0.25), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="4 classes"):
        s.sample_prior((2, 3, 5))


def test_same_seed_same_samples():
    s = _sched(5)
    x0, x_t, logits = random_case(5, 1, dtype=torch.float32)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return (s.q_sample(x0, 500, generator=g), s.sample_prior(x0.shape, generator=g), s.step(logits, 500, x_t, g))

    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_add_noise_is_deterministic_in_its_uniform_noise():
    s = _sched(5)
    x0, _, _ = random_case(5, 2, dtype=torch.float32)
    u = torch.rand((2, *SPATIAL), generator=torch.Generator().manual_seed(0))
    a = s.add_noise(original_samples=x0, noise=u, timesteps=torch.tensor([600, 900]))
    b = s.add_noise(original_samples=x0, noise=u.unsqueeze(1), timesteps=torch.tensor([600, 900]))
    assert torch.equal(a, b) and torch.equal(a.sum(1), torch.ones_like(a[:, 0]))
    with pytest.raises(ValueError, match="noise must be shaped"):
        s.add_noise(x0, torch.randn_like(x0), torch.tensor([600, 900]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        s.add_noise(x0, u + 1, torch.tensor([600, 900]))


# ----------------------------------------------------------------------------------------------------------------
# posteriors and loss against the brute force
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 20])
@pytest.mark.parametrize("t,prev", CASES)
def test_posteriors_and_kl_match_bruteforce(n, t, prev):
    s = _sched(n)
    x0, x_t, logits = random_case(n, 10 * n + t[0])
    f = torch.softmax(logits, 1)
    t = torch.tensor(t)
    prev_t = None if prev is None else torch.tensor(prev)
    ref_q, ref_p, ref_plug = brute_posteriors(x_t, x0, f, t, t - 1 if prev is None else prev_t)

    q = s.q_posterior(x_t, x0, t, prev_t)
    p = s.model_posterior(x_t, f, t, prev_t)
    torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(p, ref_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.q_posterior(x_t, f, t, prev_t), ref_plug, atol=1e-6, rtol=0)
    for post in (q, p):
        assert (post >= 0).all()
        torch.testing.assert_close(post.sum(1), torch.ones_like(post[:, 0]), atol=1e-12, rtol=0)

    kl = s.kl_loss(x_t, x0, logits, t, prev_t, reduction="none")
    assert kl.shape == (2, *SPATIAL)
    torch.testing.assert_close(kl, brute_kl(ref_q, ref_p).clamp_min(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.kl_loss(x_t, x0, logits, t, prev_t), kl.mean())
    torch.testing.assert_close(s.kl_loss(x_t, x0, logits, t, prev_t, reduction="sum"), kl.sum())


def test_model_posterior_is_not_the_plugin_posterior():
    s = _sched(5)
    x0, x_t, logits = random_case(5, 3)
    f = torch.softmax(logits, 1)
    t = torch.tensor([500, 500])
    assert (s.model_posterior(x_t, f, t) - s.q_posterior(x_t, f, t)).abs().max() > 1e-3


def test_any_number_of_spatial_dims():
    s = _sched(5)
    for spatial in ((), (7,), (3, 4), (2, 2, 2, 2)):
        x0, x_t, logits = random_case(5, 4, spatial=spatial)
        f = torch.softmax(logits, 1)
        t, prev = torch.tensor([300, 12]), torch.tensor([100, -1])
        _, ref_p, _ = brute_posteriors(x_t, x0, f, t, prev)
        torch.testing.assert_close(s.model_posterior(x_t, f, t, prev), ref_p, atol=1e-10, rtol=0)
        assert s.kl_loss(x_t, x0, logits, t, prev, reduction="none").shape == (2, *spatial)


def test_t0_posterior_is_x0_and_kl_is_cross_entropy():
    s = _sched(20)
    x0, x_t, logits = random_case(20, 5)
    f = torch.softmax(logits, 1)
    assert torch.equal(s.q_posterior(x_t, x0, 0), x0)
    torch.testing.assert_close(s.model_posterior(x_t, f, 0), f, atol=1e-12, rtol=0)
    ce = -(torch.log_softmax(logits, 1) * x0).sum(1)
    torch.testing.assert_close(s.kl_loss(x_t, x0, logits, 0, reduction="none"), ce, atol=1e-10, rtol=0)
    torch.testing.assert_close(s.kl_loss(x_t, x0, logits, 0), ce.mean(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [5, 20])
def test_float32_is_stable_at_both_ends_of_the_schedule(n):
    s = _sched(n)
    x0, x_t, logits = random_case(n, 6)
    for t, prev in ((0, None), (1, None), (2, None), (T - 1, None), (T - 2, None), (T - 1, 0), (5, -1)):
        p64 = s.model_posterior(x_t, torch.softmax(logits, 1), t, prev)
        p32 = s.model_posterior(x_t.float(), torch.softmax(logits.float(), 1), t, prev)
        q32 = s.q_posterior(x_t.float(), x0.float(), t, prev)
        assert p32.dtype == q32.dtype == torch.float32
        torch.testing.assert_close(p32.double(), p64, atol=2e-6, rtol=0)
        torch.testing.assert_close(q32.double(), s.q_posterior(x_t, x0, t, prev), atol=2e-6, rtol=0)
        for post in (p32, q32):
            assert torch.isfinite(post).all() and (post >= 0).all()
            torch.testing.assert_close(post.sum(1), torch.ones_like(post[:, 0]), atol=1e-5, rtol=0)
        k64 = s.kl_loss(x_t, x0, logits, t, prev)
        k32 = s.kl_loss(x_t.float(), x0.float(), logits.float(), t, prev)
        assert k32.dtype == torch.float32
        torch.testing.assert_close(k32.double(), k64, atol=1e-4, rtol=1e-4)


def test_half_precision_inputs_are_computed_in_float32_and_returned_in_half():
    s = _sched(20)
    x0, x_t, logits = random_case(20, 14, dtype=torch.float16)
    f = torch.softmax(logits.float(), 1)
    for t in (0, 1, T - 1):
        p16 = s.model_posterior(x_t, f.half(), t)
        assert p16.dtype == torch.float16 and torch.isfinite(p16).all()
        torch.testing.assert_close(p16.float(), s.model_posterior(x_t.float(), f.half().float(), t), atol=1e-3, rtol=0)
        assert s.q_posterior(x_t, x0, t).dtype == s.q_sample(x0, t).dtype == torch.float16
        assert s.kl_loss(x_t, x0, logits, t).dtype == torch.float32


def test_kl_is_finite_when_the_network_rules_out_the_true_class():
    s = _sched(20)
    x0, x_t, _ = random_case(20, 7, dtype=torch.float32)
    logits = (1000.0 * (1 - x0)).requires_grad_()  # softmax puts exactly 0 on the true class in float32
    for t in (0, 1, 500, T - 1):
        loss = s.kl_loss(x_t, x0, logits, t)
        assert torch.isfinite(loss) and loss >= 0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
    assert s.kl_loss(x_t, x0, logits, 0).item() == pytest.approx(-math.log(1e-30), rel=1e-6)


def test_kl_is_nonnegative_and_vanishes_for_a_perfect_prediction():
    s = _sched(5)
    x0, x_t, logits = random_case(5, 8)
    for t in (0, 1, 10, 500, T - 1):
        assert (s.kl_loss(x_t, x0, logits, t, reduction="none") >= 0).all()
        assert s.kl_loss(x_t, x0, 60.0 * x0, t) < 1e-12
    assert s.kl_loss(x_t, x0, logits, 10) > 1e-3


def test_kl_gradients_flow_to_logits():
    s = _sched(5)
    x0, x_t, logits = random_case(5, 9, spatial=(2, 3))
    logits32 = logits.float().requires_grad_()
    s.kl_loss(x_t.float(), x0.float(), logits32, torch.tensor([400, 3])).backward()
    assert torch.isfinite(logits32.grad).all() and logits32.grad.abs().sum() > 0
    x0, x_t, logits = random_case(5, 9, spatial=(2,))
    for t, prev in ((torch.tensor([400, 3]), None), (torch.tensor([999, 60]), torch.tensor([900, -1]))):
        assert torch.autograd.gradcheck(lambda lg: s.kl_loss(x_t, x0, lg, t, prev), (logits.detach().requires_grad_(),))


def test_no_grad_and_grad_paths_agree():
    s = _sched(20)
    x0, x_t, logits = random_case(20, 11)
    f = torch.softmax(logits, 1)
    with torch.no_grad():
        fast = s.model_posterior(x_t, f, 700, 650)
    slow = s.model_posterior(x_t, f.clone().requires_grad_(), 700, 650)
    torch.testing.assert_close(fast, slow.detach(), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------------------


def test_set_timesteps_and_previous_timestep():
    s = CategoricalDiffusionScheduler(num_train_timesteps=T, num_classes=5)
    assert s.timesteps.tolist() == list(range(T - 1, -1, -1))
    s.set_timesteps(50)
    ts = s.timesteps
    assert s.num_inference_steps == 50 and ts.dtype == torch.long and len(ts) == 50
    assert ts[0] == T - 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    assert s.previous_timestep(int(ts[0])) == ts[1] and s.previous_timestep(0) == -1
    torch.testing.assert_close(s.previous_timestep(ts), torch.cat([ts[1:], torch.tensor([-1])]))
    s.set_timesteps(T)
    assert s.timesteps.tolist() == list(range(T - 1, -1, -1))
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [T - 1] and s.previous_timestep(T - 1) == -1
    for bad in (0, T + 1, 2.5, True):
        with pytest.raises(ValueError, match=r"\[1, 1000\]"):
            s.set_timesteps(bad)


def test_step_at_t0_returns_argmax_and_otherwise_one_hot_draws():
    s = _sched(5)
    s.set_timesteps(10)
    _, x_t, logits = random_case(5, 12, dtype=torch.float32)
    out = s.step(logits, 0, x_t)
    assert torch.equal(out, one_hot(logits.argmax(1), 5, torch.float32))
    for t in s.timesteps[:-1]:
        out = s.step(logits, t, x_t, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and torch.equal(out.sum(1), torch.ones_like(out[:, 0]))
    # a batch whose elements sit at different steps
    mixed = s.step(logits, torch.tensor([0, int(s.timesteps[0])]), x_t)
    assert torch.equal(mixed[0], one_hot(logits.argmax(1), 5, torch.float32)[0])


def test_oracle_sampler_recovers_x0():
    n = 4
    s = CategoricalDiffusionScheduler(num_train_timesteps=T, num_classes=n)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0 = one_hot(torch.randint(0, n, (1, 4, 4, 4), generator=g), n, torch.float32)
    oracle_logits = torch.where(x0 > 0, 0.0, -torch.inf)
    x = s.sample_prior(x0.shape, generator=g)
    for t in s.timesteps:
        x = s.step(oracle_logits, t, x, generator=g)
    assert torch.equal(x, x0)


def test_strided_oracle_chain_has_the_forward_marginals():
    # With f = e(x0) the reverse chain is the exact forward posterior, so after each strided step
    # P(x_s = x0) must be abar_s + (1 - abar_s) / N; a wrong jump transition would break this.
    n, v = 4, 20_000
    s = CategoricalDiffusionScheduler(num_train_timesteps=T, num_classes=n)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x0 = one_hot(torch.randint(0, n, (1, v), generator=g), n, torch.float32)
    oracle_logits = torch.where(x0 > 0, 0.0, -torch.inf)
    x = s.sample_prior(x0.shape, generator=g)
    for t in s.timesteps[:-1]:
        x = s.step(oracle_logits, t, x, generator=g)
        prev = int(s.previous_timestep(t))
        expected = s.alphas_cumprod[prev].item() * (1 - 1 / n) + 1 / n
        assert (x * x0).sum().item() / v == pytest.approx(expected, abs=0.015), prev


# ----------------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------------


def test_validation_errors():
    s = _sched(5)
    x0, x_t, logits = random_case(5, 13)
    with pytest.raises(ValueError, match="expected 5 classes, got 4"):
        s.model_posterior(x_t[:, :4], torch.softmax(logits, 1)[:, :4], 10)
    with pytest.raises(ValueError, match="same shape"):
        s.q_posterior(x_t, x0[..., :1], 10)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.q_probs(x0, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.q_sample(x0, -1)
    with pytest.raises(ValueError, match="smaller than t"):
        s.q_posterior(x_t, x0, 10, 10)
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        s.kl_loss(x_t, x0, logits, 10, -2)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        s.q_probs(x0, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        s.q_probs(x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="reduction"):
        s.kl_loss(x_t, x0, logits, 10, reduction="avg")
    with pytest.raises(ValueError, match="num_classes"):
        CategoricalDiffusionScheduler(num_classes=1)
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 1, got 10.5"):
        CategoricalDiffusionScheduler(num_train_timesteps=10.5)


def test_integral_config_values_are_accepted():
    np = pytest.importorskip("numpy")
    s = CategoricalDiffusionScheduler(num_train_timesteps=np.int64(50), num_classes=torch.tensor(3))
    assert (s.num_train_timesteps, s.num_classes) == (50, 3) and type(s.num_classes) is int
    s.set_timesteps(np.int32(5))
    assert s.timesteps.tolist() == [49, 37, 24, 12, 0] and s.num_inference_steps == 5

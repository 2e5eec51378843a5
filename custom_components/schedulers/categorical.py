"""Categorical (multinomial) diffusion for GuideGen's TCSS stage.

The TCSS stage of GuideGen (AAAI-26) generates an N-class anatomy mask with a discrete diffusion process in the
style of Hoogeboom et al., "Argmax Flows and Multinomial Diffusion" (NeurIPS 2021),
https://arxiv.org/abs/2102.05379. Each voxel holds one of N classes and is corrupted towards the uniform
distribution:

    q(x_t | x_{t-1}) = Cat(alpha_t e(x_{t-1}) + (1 - alpha_t) / N)                                   (paper Eq. 1)
    q(x_t | x_0)     = Cat(abar_t e(x_0) + (1 - abar_t) / N),        abar_t = prod_{u <= t} alpha_u   (paper Eq. 2)

and the network f_theta(x_t, t, text) predicts a distribution over the clean class x_0. The reverse step is the
mixture of true posteriors weighted by that prediction (paper Eq. 6),

    p_theta(x_s | x_t) = sum_{x_0} q(x_s | x_t, x_0) f_theta(x_0 | x_t),

and training minimises KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)).

Conventions used throughout: timesteps are 0-indexed, t in {0, ..., T-1}; the clean data is "x_{-1}", i.e. abar of
the step before 0 is 1, so the step out of t = 0 returns the clean mask. Every probability or one-hot tensor is
shaped (B, N, *spatial) with any number of spatial dimensions and classes along dim 1; timesteps are (B,) long
tensors (a Python int or 0-dim tensor is broadcast over the batch).

Classifier-free guidance (beyond the paper) replaces f_theta by a log-space mix of the predictions with and without
the prompt before the mixture is formed; see :meth:`CategoricalDiffusionScheduler.guided_x0_logits`.

The paper's public code evaluates the mixture by building q(x_s | x_t, x_0 = i) for all N candidates i, an
N x N tensor per voxel. :meth:`CategoricalDiffusionScheduler.model_posterior` evaluates the same sum exactly in
closed form with O(N V) memory; see its docstring for the derivation.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from monai.networks.schedulers import Scheduler

__all__ = ["CategoricalDiffusionScheduler"]

_REDUCTIONS = ("mean", "sum", "none")


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is integral (int, numpy or 0-dim tensor integer, not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: (1 - abar) / N reaches ~2e-6 and posterior entries ~1e-14, below float16's normal range."""
    return torch.promote_types(dtype, torch.float32)


class CategoricalDiffusionScheduler(Scheduler):
    """
    Categorical (multinomial) diffusion scheduler: forward corruption, exact posteriors, the KL training loss and
    a strided ancestral sampler for GuideGen's TCSS stage.

    The noise schedule is taken from MONAI's ``NoiseSchedules`` registry (``"cosine"``, ``"linear_beta"``,
    ``"scaled_linear_beta"``, ``"sigmoid_beta"`` or any registered function); only its ``betas`` are used, with
    ``alphas = 1 - betas`` and ``alphas_cumprod = cumprod(alphas)`` recomputed in float64 so that ``1 - abar`` stays
    accurate near t = 0. Public tensors ``alphas`` and ``alphas_cumprod`` have shape (T,) and dtype float64; results
    are returned in the dtype of the inputs.

    Typical use:

    .. code-block:: python

        scheduler = CategoricalDiffusionScheduler(num_train_timesteps=1000, num_classes=20)
        # training
        x_t = scheduler.q_sample(x0_onehot, t)
        loss = scheduler.kl_loss(x_t, x0_onehot, network(x_t, t, context), t)
        # sampling
        scheduler.set_timesteps(50)
        x = scheduler.sample_prior((1, 20, 128, 128, 128))
        for t in scheduler.timesteps:
            x = scheduler.step(network(x, t, context), t, x)

    Args:
        num_train_timesteps: number of diffusion steps T used to train the model.
        num_classes: number of classes N (the channel count of every one-hot / probability tensor).
        schedule: member of ``monai.networks.schedulers.NoiseSchedules``.
        schedule_args: keyword arguments passed to the schedule function (e.g. ``s`` for "cosine",
            ``beta_start``/``beta_end`` for "linear_beta").

    Raises:
        ValueError: when ``num_classes < 2``, ``num_train_timesteps < 1`` or the schedule's betas do not give
            0 < abar_t < 1 for every t (the posteriors divide by both abar_t and 1 - abar_t).
    """

    def __init__(
        self, num_train_timesteps: int = 1000, num_classes: int = 20, schedule: str = "cosine", **schedule_args
    ) -> None:
        n_classes, n_steps = _as_int(num_classes), _as_int(num_train_timesteps)
        if n_classes is None or n_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        if n_steps is None or n_steps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}.")
        num_classes, num_train_timesteps = n_classes, n_steps
        super().__init__(num_train_timesteps, schedule, **schedule_args)

        # MONAI's schedules are float32; recomputing in float64 keeps 1 - abar_t (as small as ~4e-5 at t = 0 for
        # the cosine schedule) and the ratios abar_t / abar_s of strided jumps accurate to ~1e-12.
        betas = torch.as_tensor(self.betas).detach().to(device="cpu", dtype=torch.float64)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"schedule '{schedule}' returned betas of shape {tuple(betas.shape)}, "
                f"expected ({num_train_timesteps},)."
            )
        if not torch.isfinite(betas).all() or (betas < 0).any() or (betas >= 1).any() or betas[0] <= 0:
            raise ValueError(
                f"schedule '{schedule}' must give betas in [0, 1) with betas[0] > 0 so that 0 < abar_t < 1 for all t; "
                f"got betas in [{betas.min().item():.3g}, {betas.max().item():.3g}] "
                f"with betas[0] = {betas[0].item():.3g}."
            )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if (self.alphas_cumprod <= 0).any():
            raise ValueError(f"schedule '{schedule}' drives abar_t to 0 in float64; use fewer steps or smaller betas.")
        self.num_classes = num_classes

    # ------------------------------------------------------------------------------------------------------------
    # validation and schedule look-ups
    # ------------------------------------------------------------------------------------------------------------

    def _check_tensor(self, x: torch.Tensor, name: str, floating: bool = True) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor shaped (B, N, *spatial), got {type(x).__name__}.")
        if x.ndim < 2:
            raise ValueError(f"{name} must be shaped (B, N, *spatial), got shape {tuple(x.shape)}.")
        if x.shape[1] != self.num_classes:
            raise ValueError(
                f"{name} must have the class dimension at dim 1: expected {self.num_classes} classes, "
                f"got {x.shape[1]} (shape {tuple(x.shape)})."
            )
        if floating and not x.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}.")

    @staticmethod
    def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
        if a.shape != b.shape:
            raise ValueError(
                f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
            )

    def _as_timesteps(self, t: int | torch.Tensor, batch: int, name: str, lowest: int = 0) -> torch.Tensor:
        """Validate timesteps and return them as a (B,) long tensor on the CPU (schedule look-ups happen there)."""
        if isinstance(t, bool):
            raise TypeError(f"{name} must be an int or an integer tensor, got bool.")
        t_tensor = torch.as_tensor(t)
        if t_tensor.is_floating_point() or t_tensor.is_complex() or t_tensor.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer timesteps, got dtype {t_tensor.dtype}.")
        t_tensor = t_tensor.detach().to(device="cpu", dtype=torch.long)
        if t_tensor.ndim == 0:
            t_tensor = t_tensor.expand(batch)
        if t_tensor.shape != (batch,):
            raise ValueError(f"{name} must be shaped (B,) = ({batch},), got {tuple(t_tensor.shape)}.")
        high = self.num_train_timesteps - 1
        if batch and (t_tensor.min() < lowest or t_tensor.max() > high):
            raise ValueError(f"{name} must lie in [{lowest}, {high}], got values {t_tensor.tolist()}.")
        return t_tensor

    def _timestep_pair(
        self, t: int | torch.Tensor, prev_t: int | torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_cpu = self._as_timesteps(t, batch, "t")
        prev_cpu = t_cpu - 1 if prev_t is None else self._as_timesteps(prev_t, batch, "prev_t", lowest=-1)
        if (prev_cpu >= t_cpu).any():
            raise ValueError(
                f"prev_t must be smaller than t, got t = {t_cpu.tolist()} and prev_t = {prev_cpu.tolist()}."
            )
        return t_cpu, prev_cpu

    def _abar(self, t_cpu: torch.Tensor) -> torch.Tensor:
        """abar_t in float64 with abar_{-1} = 1 (the clean data)."""
        return torch.where(t_cpu < 0, torch.ones((), dtype=torch.float64), self.alphas_cumprod[t_cpu.clamp_min(0)])

    @staticmethod
    def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-sample float64 coefficient (B,) as a (B, 1, ..., 1) tensor in ``like``'s dtype and device."""
        return c.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------------------------------------------------
    # forward process
    # ------------------------------------------------------------------------------------------------------------

    def q_probs(self, x0_onehot: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """
        Marginal of the forward process, q(x_t | x_0) = Cat(abar_t e(x_0) + (1 - abar_t) / N) (paper Eq. 2).

        Args:
            x0_onehot: clean classes as one-hot (or probabilities), (B, N, *spatial), floating point.
            t: timesteps in [0, T-1], (B,) long (an int is broadcast).

        Returns:
            probabilities of x_t, same shape and dtype as ``x0_onehot``.
        """
        self._check_tensor(x0_onehot, "x0_onehot")
        abar = self._abar(self._as_timesteps(t, x0_onehot.shape[0], "t"))
        x0 = x0_onehot.to(_work_dtype(x0_onehot.dtype))
        # (1 - abar) / N is formed in float64: in float32, 1 - abar near t = 0 would keep only ~3 digits.
        probs = self._bcast(abar, x0) * x0 + self._bcast((1.0 - abar) / self.num_classes, x0)
        return probs.to(x0_onehot.dtype)

    def q_sample(
        self, x0_onehot: torch.Tensor, t: int | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """
        Draw x_t ~ q(x_t | x_0) (paper Eq. 2) as a one-hot tensor.

        Args:
            x0_onehot: clean classes as one-hot (or probabilities), (B, N, *spatial), floating point.
            t: timesteps in [0, T-1], (B,) long (an int is broadcast).
            generator: random generator on ``x0_onehot``'s device, for reproducible draws.

        Returns:
            one-hot x_t, same shape and dtype as ``x0_onehot``.
        """
        self._check_tensor(x0_onehot, "x0_onehot")
        probs = self.q_probs(x0_onehot.to(_work_dtype(x0_onehot.dtype)), t)
        return self._sample(probs, generator=generator).to(x0_onehot.dtype)

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor | None = None,
        timesteps: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        MONAI-style name for :meth:`q_sample` (paper Eq. 2).

        Unlike the Gaussian schedulers, the "noise" of a categorical process is the uniform variate that picks the
        class by inverse-CDF sampling, so ``x_t`` is a deterministic function of (``original_samples``, ``noise``,
        ``timesteps``) just as in MONAI's ``add_noise``.

        Args:
            original_samples: clean classes as one-hot, (B, N, *spatial), floating point.
            noise: optional uniform variates in [0, 1), shaped (B, 1, *spatial) or (B, *spatial); drawn from
                ``generator`` when omitted.
            timesteps: timesteps in [0, T-1], (B,) long (an int is broadcast). Required.
            generator: random generator used when ``noise`` is omitted.

        Returns:
            one-hot x_t, same shape and dtype as ``original_samples``.
        """
        if timesteps is None:
            raise ValueError("add_noise needs timesteps.")
        self._check_tensor(original_samples, "original_samples")
        probs = self.q_probs(original_samples.to(_work_dtype(original_samples.dtype)), timesteps)
        return self._sample(probs, generator=generator, uniform=noise).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Not defined for categorical diffusion (there is no Gaussian noise to form a velocity from)."""
        raise NotImplementedError("get_velocity is a Gaussian-diffusion quantity; categorical diffusion has none.")

    def sample_prior(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """
        Draw one-hot samples from Cat(1/N), the limit of the forward process (paper Eq. 2 as abar_t -> 0), which
        starts the reverse chain.

        Args:
            shape: (B, N, *spatial) with N == ``num_classes``.
            generator: random generator on ``device``, for reproducible draws.
            device: device of the result (the generator's device when omitted and a generator is given).
            dtype: floating point dtype of the result.

        Returns:
            one-hot tensor of ``shape``.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or shape[1] != self.num_classes:
            raise ValueError(
                f"shape must be (B, N, *spatial) with N = {self.num_classes} classes at dim 1, got {shape}."
            )
        if device is None and generator is not None:
            device = generator.device
        classes = torch.randint(
            0, self.num_classes, (shape[0], 1, *shape[2:]), generator=generator, device=device, dtype=torch.long
        )
        return torch.zeros(shape, device=device, dtype=dtype).scatter_(1, classes, 1.0)

    def _sample(
        self,
        probs: torch.Tensor,
        generator: torch.Generator | None = None,
        uniform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        One-hot draw from per-voxel categorical distributions by inverse-CDF sampling.

        One uniform per voxel (instead of N Gumbels) keeps the random stream small; apart from the one-hot result
        the memory is O(V). The draw is exact up to float64 rounding; classes of zero probability are never drawn.
        """
        spatial = probs.shape[2:]
        # float64 so that u * total resolves probabilities well below float32's 2**-24 grid (MPS has no float64)
        acc_dtype = torch.float32 if probs.device.type == "mps" else torch.float64
        if uniform is None:
            uniform = torch.rand(
                (probs.shape[0], 1, *spatial), generator=generator, device=probs.device, dtype=acc_dtype
            )
        else:
            if not isinstance(uniform, torch.Tensor) or not uniform.is_floating_point():
                raise TypeError("noise must be a floating point tensor of uniform variates in [0, 1).")
            if uniform.shape == (probs.shape[0], *spatial):
                uniform = uniform.unsqueeze(1)
            if uniform.shape != (probs.shape[0], 1, *spatial):
                raise ValueError(
                    f"noise must be shaped (B, 1, *spatial) = {(probs.shape[0], 1, *spatial)} or (B, *spatial), "
                    f"got {tuple(uniform.shape)}."
                )
            if uniform.numel() and (uniform.min() < 0 or uniform.max() >= 1):
                raise ValueError("noise must hold uniform variates in [0, 1).")
            uniform = uniform.to(probs.device)
        # The class is the number of cumulative sums <= u * total. Accumulating class by class in float64 keeps the
        # memory at O(V) and avoids a float32 cumsum's ~1e-7 rounding near 1, which would distort classes of
        # probability ~1e-6 (as at t = 0). Scaling u by the total tolerates rows that sum to 1 only up to rounding;
        # the total is accumulated in the same order as the comparisons below so that a last class of probability
        # 0 cannot be reached through a rounding difference.
        total = torch.zeros((probs.shape[0], 1, *spatial), dtype=acc_dtype, device=probs.device)
        for k in range(self.num_classes):
            total += probs[:, k : k + 1]
        threshold = uniform.to(acc_dtype) * total
        cumulative = total.zero_()
        classes = torch.zeros(threshold.shape, dtype=torch.long, device=probs.device)
        for k in range(self.num_classes - 1):  # the last class is whatever is left
            cumulative += probs[:, k : k + 1]
            classes += cumulative <= threshold
        return torch.zeros_like(probs).scatter_(1, classes, 1.0)

    # ------------------------------------------------------------------------------------------------------------
    # posteriors and loss
    # ------------------------------------------------------------------------------------------------------------

    def _jump_coefficients(
        self, t_cpu: torch.Tensor, prev_cpu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """abar_t, a = abar_t / abar_s (the jump s -> t) and b = abar_s (the marginal of x_s), all float64 (B,)."""
        abar_t = self._abar(t_cpu)
        abar_s = self._abar(prev_cpu)
        return abar_t, abar_t / abar_s, abar_s

    def _posterior_coefficients(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        x0_name: str,
        t: int | torch.Tensor,
        prev_t: int | torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate the inputs of a posterior (:meth:`q_posterior`, :meth:`model_posterior`) and return
        ``(abar_t, a, b)`` of its jump t -> s (see :meth:`_jump_coefficients`)."""
        self._check_tensor(x_t, "x_t", floating=False)
        self._check_tensor(x0, x0_name)
        self._check_same_shape(x_t, x0, "x_t", x0_name)
        t_cpu, prev_cpu = self._timestep_pair(t, prev_t, x_t.shape[0])
        return self._jump_coefficients(t_cpu, prev_cpu)

    def q_posterior(
        self,
        x_t: torch.Tensor,
        x0_onehot: torch.Tensor,
        t: int | torch.Tensor,
        prev_t: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        True posterior q(x_s | x_t, x_0) for s = ``prev_t`` < t, the target inside paper Eq. 6.

        By Bayes' rule with the jump transition q(x_t | x_s) = Cat(a e(x_s) + (1 - a) / N), a = abar_t / abar_s
        (the product of the one-step transitions s+1..t, which is what makes a strided sampler exact) and the
        marginal q(x_s | x_0) = Cat(b e(x_0) + (1 - b) / N), b = abar_s (paper Eq. 2):

            q(x_s = k | x_t, x_0) ∝ (a x_t[k] + (1 - a) / N) * (b x_0[k] + (1 - b) / N).

        With ``prev_t = -1`` (b = 1) the posterior is x_0 itself. ``x0_onehot`` may also be a probability vector,
        which gives the "plug-in" posterior of Hoogeboom et al.; note that :meth:`model_posterior` (the mixture of
        paper Eq. 6) is *not* this plug-in formula evaluated at f_theta.

        Args:
            x_t: one-hot x_t, (B, N, *spatial).
            x0_onehot: one-hot (or probabilities) of x_0, same shape as ``x_t``, floating point.
            t: timesteps in [0, T-1], (B,) long (an int is broadcast).
            prev_t: timesteps s in [-1, t-1], (B,) long; defaults to t - 1.

        Returns:
            probabilities of x_s, same shape and dtype as ``x0_onehot``; rows (dim 1) sum to 1.
        """
        _, a, b = self._posterior_coefficients(x_t, x0_onehot, "x0_onehot", t, prev_t)
        n = self.num_classes
        out_dtype = x0_onehot.dtype
        x0_onehot = x0_onehot.to(_work_dtype(out_dtype))
        x_t = x_t.to(x0_onehot.dtype)
        # Both factors are sums of non-negative terms with the constants formed in float64, so nothing cancels even
        # when 1 - a or 1 - b is ~1e-5; the unnormalised values stay >= ~1e-14, far from float32 underflow.
        post = self._bcast(a, x_t) * x_t + self._bcast((1.0 - a) / n, x_t)
        post = post * (self._bcast(b, x0_onehot) * x0_onehot + self._bcast((1.0 - b) / n, x0_onehot))
        post = post.clamp_min(0.0)
        return (post / post.sum(dim=1, keepdim=True).clamp_min(torch.finfo(post.dtype).tiny)).to(out_dtype)

    def model_posterior(
        self,
        x_t: torch.Tensor,
        x0_probs: torch.Tensor,
        t: int | torch.Tensor,
        prev_t: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Model posterior p_theta(x_s | x_t) = sum_i q(x_s | x_t, x_0 = i) f_theta(i) (paper Eq. 6, "A f_theta"),
        evaluated exactly in O(N V) memory.

        Derivation. Let x_t = j, a = abar_t / abar_s, b = abar_s, A_jk = q(x_t = j | x_s = k) = a δ_jk + (1 - a) / N
        and B_ik = q(x_s = k | x_0 = i) = b δ_ik + (1 - b) / N. Then q(x_s = k | x_t = j, x_0 = i) = A_jk B_ik / Z_ji
        with Z_ji = sum_k A_jk B_ik = q(x_t = j | x_0 = i) = abar_t δ_ij + (1 - abar_t) / N, which takes only two
        values: Z_on = abar_t + (1 - abar_t) / N when i = j and Z_off = (1 - abar_t) / N otherwise. Splitting the sum
        over i at i = j,

            p(k | j) = A_jk [ (sum_i f_i B_ik) / Z_off + f_j B_jk (1 / Z_on - 1 / Z_off) ]
                     = (A_jk / Z_off) [ sum_{i != j} f_i B_ik + (Z_off / Z_on) f_j B_jk ],
            sum_{i != j} f_i B_ik = b f_k [k != j] + (1 - b) / N * sum_{i != j} f_i,

        so each voxel needs only N-vectors. The second line is the form evaluated: it has no subtraction, so it
        cannot cancel when Z_off -> 0 (abar_t -> 1, t near 0) and cannot go negative; sum_{i != j} f_i is summed
        directly instead of as 1 - f_j, which would lose all digits when f_j ≈ 1. Since sum_k A_jk [ ... ] =
        Z_off sum_i f_i, the explicit normalisation over k only removes rounding (and makes unnormalised
        ``x0_probs`` act as normalised ones); the clamp at 0 only guards against negative entries in ``x0_probs``.
        At ``prev_t = -1`` (b = 1) the result is f itself, as it should be. The only N x V temporary is the
        output; everything else is per voxel.

        Args:
            x_t: one-hot x_t, (B, N, *spatial); only its argmax along dim 1 is read.
            x0_probs: f_theta, the predicted probabilities of x_0, same shape as ``x_t``, floating point. Gradients
                flow to it.
            t: timesteps in [0, T-1], (B,) long (an int is broadcast).
            prev_t: timesteps s in [-1, t-1], (B,) long; defaults to t - 1.

        Returns:
            probabilities of x_s, same shape and dtype as ``x0_probs``; rows (dim 1) sum to 1.
        """
        abar_t, a, b = self._posterior_coefficients(x_t, x0_probs, "x0_probs", t, prev_t)
        n = self.num_classes
        z_off = (1.0 - abar_t) / n
        ratio = z_off / (abar_t + z_off)  # Z_off / Z_on, in [0, 1)

        out_dtype = x0_probs.dtype
        f = x0_probs.to(_work_dtype(out_dtype))
        # In-place updates keep the peak at one extra N x V tensor; autograd needs the out-of-place versions.
        inplace = not (torch.is_grad_enabled() and f.requires_grad)
        # max().indices gives argmax's first-maximum index but is several times faster for a reduction over dim 1
        j = (x_t.to(torch.uint8) if x_t.dtype == torch.bool else x_t).max(dim=1, keepdim=True).indices
        f_j = f.gather(1, j)
        post = f.scatter(1, j, 0.0)  # f_k [k != j]
        f_not_j = post.sum(dim=1, keepdim=True)

        b_, lo_b = self._bcast(b, f), self._bcast((1.0 - b) / n, f)
        ratio_f_j = self._bcast(ratio, f) * f_j
        # bracket_k = b f_k [k != j] + (1 - b)/N (f_not_j + ratio f_j) + [k == j] ratio b f_j
        shared = lo_b * (f_not_j + ratio_f_j)
        on_j = b_ * ratio_f_j
        if inplace:
            post.mul_(b_).add_(shared).scatter_add_(1, j, on_j)
        else:
            post = (post * b_ + shared).scatter_add(1, j, on_j)

        # times A_jk = (1 - a)/N + [k == j] a
        a_, lo_a = self._bcast(a, f), self._bcast((1.0 - a) / n, f)
        post_j = post.gather(1, j)
        if inplace:
            post.mul_(lo_a).scatter_add_(1, j, a_ * post_j).clamp_min_(0.0)
            post.div_(post.sum(dim=1, keepdim=True).clamp_min_(torch.finfo(post.dtype).tiny))
        else:
            post = (post * lo_a).scatter_add(1, j, a_ * post_j).clamp_min(0.0)
            post = post / post.sum(dim=1, keepdim=True).clamp_min(torch.finfo(post.dtype).tiny)
        return post.to(out_dtype)

    def kl_loss(
        self,
        x_t: torch.Tensor,
        x0_onehot: torch.Tensor,
        x0_logits: torch.Tensor,
        t: int | torch.Tensor,
        prev_t: int | torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """
        KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)) with f_theta = softmax(``x0_logits``, dim=1) (paper Eq. 6).

        Summed over classes, then averaged (``"mean"``) or summed (``"sum"``) over voxels and batch, or returned per
        voxel (``"none"``). At s = -1 (t = 0 with the default ``prev_t``) the true posterior is e(x_0) and the
        model posterior is f_theta, so the loss is the cross-entropy -log f_theta(x_0).

        log p is taken of p clamped to eps = 1e-30 (or the dtype's smallest normal number if larger, e.g. float16):
        legitimate posterior entries go down to ~1e-14 (products of two (1 - abar) / N factors), so a larger eps such
        as 1e-8 would bias the loss, while 1e-30 is well above float32's denormals (< 1.2e-38, where precision is
        lost) and bounds the loss at -log(1e-30) ≈ 69 per voxel when the network's softmax underflows to exactly 0 on
        a class the true posterior needs. Per-voxel values are clamped at 0 to remove rounding negatives.
        Computation is in at least float32, so float16/bfloat16 logits (autocast) are upcast.

        Args:
            x_t: one-hot x_t, (B, N, *spatial).
            x0_onehot: one-hot x_0, same shape as ``x_t``, floating point.
            x0_logits: network logits for x_0, same shape as ``x_t``.
            t: timesteps in [0, T-1], (B,) long (an int is broadcast).
            prev_t: timesteps s in [-1, t-1], (B,) long; defaults to t - 1.
            reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-voxel values, shape (B, *spatial)).

        Returns:
            scalar loss, or (B, *spatial) per-voxel losses when ``reduction="none"``.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
        self._check_tensor(x0_logits, "x0_logits")
        self._check_same_shape(x0_logits, x0_onehot, "x0_logits", "x0_onehot")
        dtype = _work_dtype(x0_logits.dtype)
        q = self.q_posterior(x_t, x0_onehot.to(dtype), t, prev_t)
        p = self.model_posterior(x_t, torch.softmax(x0_logits.to(dtype), dim=1), t, prev_t)
        eps = max(1e-30, torch.finfo(dtype).tiny)
        kl = (torch.xlogy(q, q) - q * torch.log(p.clamp_min(eps))).sum(dim=1).clamp_min(0.0)
        if reduction == "mean":
            return kl.mean()
        if reduction == "sum":
            return kl.sum()
        return kl

    # ------------------------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def check_guidance_scale(guidance_scale: float) -> float:
        """Validate a classifier-free guidance scale (see :meth:`guided_x0_logits`).

        Args:
            guidance_scale: the scale s; a finite real number >= 0 (bools and strings are refused).

        Returns:
            s as a float.

        Raises:
            ValueError: naming ``guidance_scale``, when s is not a finite real number >= 0.
        """
        scale = None
        if not isinstance(guidance_scale, (bool, str, bytes)):
            try:  # ints, floats, numpy scalars, one-element tensors
                scale = float(guidance_scale)
            except (TypeError, ValueError, RuntimeError):
                pass
        if scale is None or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}.")
        return scale

    def guided_x0_logits(
        self, cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """
        Classifier-free guidance of the x_0 prediction (beyond the paper): the guided f_theta that the mixture of
        paper Eq. 6 (:meth:`model_posterior`, :meth:`step`) then uses in place of the conditional one.

        With f_c = softmax(cond_logits) the prediction given the prompt, f_u = softmax(uncond_logits) the
        prediction given the null prompt and s = ``guidance_scale``, the mixing is done in log space,

            log f_s = log f_u + s (log f_c - log f_u) - log Z,       i.e.   f_s ∝ f_u^(1-s) f_c^s = f_u (f_c / f_u)^s,

        with Z the per-voxel normaliser. By Bayes' rule f_c / f_u ∝ p(text | x_0), so f_s ∝ p(x_0) p(text | x_0)^s:
        the implicit classifier is sharpened by s, as in Ho & Salimans' guidance (whose ε-space rule
        ε_u + s (ε_c - ε_u) is the same combination of scores) and VQ-Diffusion's discrete guidance (Tang et al.
        2022). Log space keeps f_s a valid distribution for every s >= 0, whereas mixing the probabilities
        themselves, f_u + s (f_c - f_u), turns negative for s > 1 and would need clipping. s = 0 gives f_u, s = 1 gives
        f_c (callers skip the unconditional pass then, see :class:`~custom_components.pipelines.TCSSPipeline`), s > 1
        moves mass further towards the classes the prompt favours over the null prompt.

        Args:
            cond_logits: network logits of x_0 with the prompt, (B, N, *spatial).
            uncond_logits: network logits of x_0 with the null prompt, same shape.
            guidance_scale: s >= 0.

        Returns:
            normalised log-probabilities log f_s, same shape as the inputs, in at least float32 (softmax of them is
            f_s, so they can be passed to :meth:`step` as its ``x0_logits``).

        Raises:
            ValueError: bad scale (naming ``guidance_scale``) or shapes.
        """
        scale = self.check_guidance_scale(guidance_scale)
        self._check_tensor(cond_logits, "cond_logits")
        self._check_tensor(uncond_logits, "uncond_logits")
        self._check_same_shape(cond_logits, uncond_logits, "cond_logits", "uncond_logits")
        dtype = _work_dtype(torch.promote_types(cond_logits.dtype, uncond_logits.dtype))
        # log_softmax first: logits carry an arbitrary per-voxel offset that would otherwise be scaled by s
        log_u = torch.log_softmax(uncond_logits.to(dtype), dim=1)
        log_c = torch.log_softmax(cond_logits.to(dtype), dim=1)
        return torch.log_softmax(log_u + scale * (log_c - log_u), dim=1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """
        Set the descending timesteps of the reverse chain: ``num_inference_steps`` values evenly spaced over
        [0, T-1], starting at T-1 and ending at 0 (a single step is just [T-1]). Strided chains stay exact because
        :meth:`q_posterior` / :meth:`model_posterior` use the closed-form jump between consecutive entries.

        Args:
            num_inference_steps: number of reverse steps n, 1 <= n <= T; n = T visits every timestep.
            device: device of ``self.timesteps``.

        Raises:
            ValueError: when n is not an integer in [1, T].
        """
        n_train = self.num_train_timesteps
        steps = _as_int(num_inference_steps)
        if steps is None or not 1 <= steps <= n_train:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {n_train}] (num_train_timesteps), "
                f"got {num_inference_steps!r}."
            )
        num_inference_steps = steps
        # Spacing (T-1)/(n-1) >= 1 when n <= T, so rounding keeps the values distinct; float64 avoids ties at n = T.
        timesteps = torch.linspace(n_train - 1, 0, num_inference_steps, dtype=torch.float64).round().long()
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = num_inference_steps

    def previous_timestep(self, t: int | torch.Tensor) -> torch.Tensor:
        """
        The next lower entry of ``self.timesteps`` below ``t`` (-1, the clean data, below the smallest), i.e. the
        s that :meth:`step` jumps to from t.

        Args:
            t: int or integer tensor of any shape, values in [0, T-1].

        Returns:
            long tensor of the same shape as ``t`` (0-dim for an int), on ``self.timesteps``'s device.
        """
        t_tensor = torch.as_tensor(t, device=self.timesteps.device)
        if t_tensor.is_floating_point() or t_tensor.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t_tensor.dtype}.")
        t_tensor = t_tensor.long()
        if t_tensor.numel() and (t_tensor.min() < 0 or t_tensor.max() > self.num_train_timesteps - 1):
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps - 1}], got {t_tensor.tolist()}.")
        steps = self.timesteps.long()
        below = steps < t_tensor.unsqueeze(-1)
        return torch.where(below, steps, torch.full_like(steps, -1)).max(dim=-1).values

    def step(
        self,
        x0_logits: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        One reverse step along ``self.timesteps`` (paper Eq. 6 for the draw; argmax at the last step).

        With s = :meth:`previous_timestep` (t): when s >= 0, draw x_s ~ p_theta(x_s | x_t) from
        :meth:`model_posterior`; at the last step (s = -1, i.e. t = 0 for any chain of two or more steps) return the
        most probable class of f_theta, as the paper does at its final (1-indexed t = 1) step.

        Args:
            x0_logits: network logits for x_0, (B, N, *spatial).
            t: current timestep, an int or a 0-dim / (B,) integer tensor.
            x_t: current one-hot sample, same shape as ``x0_logits``.
            generator: random generator on ``x_t``'s device, for reproducible draws.

        Returns:
            one-hot x_s, same shape and dtype as ``x_t`` (float32 if ``x_t`` is not floating point).
        """
        self._check_tensor(x0_logits, "x0_logits")
        self._check_tensor(x_t, "x_t", floating=False)
        self._check_same_shape(x0_logits, x_t, "x0_logits", "x_t")
        batch = x_t.shape[0]
        t_cpu = self._as_timesteps(t, batch, "t")
        prev_cpu = self.previous_timestep(t_cpu.to(self.timesteps.device)).cpu()
        out_dtype = x_t.dtype if x_t.is_floating_point() else torch.float32

        last = prev_cpu < 0
        result = None
        if not last.all():
            dtype = _work_dtype(x0_logits.dtype)
            probs = self.model_posterior(x_t, torch.softmax(x0_logits.to(dtype), dim=1), t_cpu, prev_cpu)
            result = self._sample(probs, generator=generator).to(out_dtype)
            del probs
        if last.any():
            final = torch.zeros(x_t.shape, dtype=out_dtype, device=x_t.device)
            final.scatter_(1, x0_logits.argmax(dim=1, keepdim=True), 1.0)
            if result is None:
                return final
            # a batch mixing last and non-last steps keeps the draw only where a step remains
            mask = last.to(x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
            result = torch.where(mask, final, result)
        return result

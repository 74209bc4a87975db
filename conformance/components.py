"""The checks of operators and severity estimators, the other two things a plugin registers.

Operator checks (`OperatorCase`): adjointness where an ``adjoint`` is offered, linearity where
declared, determinism given a generator, batch = samples alone through ``select``, and gradient
flow through ``forward``. Estimator checks (`EstimatorCase`): metadata naming the latent space and
the operator family, finite ``σ̂² > 0`` with the right shapes, determinism, and ``σ̂²`` increasing
with the severity on average over the family it was trained for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from flash_plugin.protocols import Operator, SeverityEstimator
from flash_plugin.types import SeverityEstimate

from .harness import (
    EstimatorCase,
    NotApplicable,
    OperatorCase,
    estimator_check,
    failure,
    max_diff,
    operator_check,
    seeded,
    seeded_list,
    short_repr,
)

ADJOINT_RTOL = 1e-4
"""Largest relative adjointness error ``|<Au, v> − <u, A*v>| / (‖Au‖‖v‖ + ‖u‖‖A*v‖)`` (float32 inputs)."""
SAME_RTOL, SAME_ATOL = 1e-4, 1e-5


@dataclass
class _Component:
    """One check's view of an operator or estimator (the case, its label, how to reproduce)."""

    case: Any
    check: str
    door: str
    field: str

    @property
    def obj(self) -> Any:
        return getattr(self.case, self.field)

    @property
    def label(self) -> str:
        return self.case.name or short_repr(self.obj)

    def fail(self, *, observed: str, expected: str, cause: str, detail: str = "") -> NoReturn:
        line = f"flash_plugin.conformance.{self.door}(<your {type(self.obj).__name__} object>, checks=[{self.check!r}])"
        if detail:
            line += f"\n      setting: {detail}"
        raise failure(self.check, self.label, observed=observed, expected=expected, cause=cause, reproduce=line)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach().double().cpu(), b.detach().double().cpu(), rtol=SAME_RTOL, atol=SAME_ATOL)


# ---- Operators -------------------------------------------------------------------------------
def _operator(obj: Any, check: str) -> tuple[_Component, Any, torch.Tensor]:
    case = obj if isinstance(obj, OperatorCase) else OperatorCase(obj)
    c = _Component(case, check, "check_operator", "operator")
    op = case.operator
    if not isinstance(op, Operator):
        c.fail(observed=f"a {type(op).__name__}", expected="an Operator (`noise_std`, `forward(x)`, `measure(x, generator)`)",
               cause="the object does not satisfy flash_plugin.protocols.Operator")
    images = case.images
    if images is None:
        shape, batch = getattr(op, "image_shape", None), getattr(op, "batch_size", None)
        if shape is None:
            raise NotApplicable(f"{check}: {c.label} has no `image_shape`; pass images=... (clean images it accepts)")
        images = 2 * torch.rand((batch or 2, *shape), generator=seeded(0)) - 1
    return c, op, images


def _is_linear(case: OperatorCase, op: Any) -> bool:
    return case.linear if case.linear is not None else callable(getattr(op, "adjoint", None))


@operator_check
def check_operator_adjoint(operator: Any) -> None:
    """Where ``adjoint`` is offered: ``<A u, v> = <u, A* v>`` for random ``u``, ``v`` (relative error
    at most `ADJOINT_RTOL`)."""
    c, op, images = _operator(operator, "check_operator_adjoint")
    if not callable(getattr(op, "adjoint", None)):
        raise NotApplicable(f"{c.check}: {c.label} offers no adjoint")
    g = seeded(1)
    u = torch.randn(images.shape, generator=g, dtype=images.dtype)
    with torch.no_grad():
        au = op.forward(u)
        v = torch.randn(au.shape, generator=g, dtype=au.dtype)
        atv = op.adjoint(v)
    if atv.shape != u.shape:
        c.fail(observed=f"adjoint(v) has shape {tuple(atv.shape)} for inputs of shape {tuple(u.shape)}",
               expected="A* maps the measurement space back onto the image space", cause="a wrong adjoint")
    lhs, rhs = float((au.double() * v.double()).sum()), float((u.double() * atv.double()).sum())
    scale = float(au.double().norm() * v.double().norm() + u.double().norm() * atv.double().norm())
    err = abs(lhs - rhs) / max(scale, 1e-300)
    if err > ADJOINT_RTOL:
        c.fail(observed=f"<A u, v> = {lhs:.6g} but <u, A* v> = {rhs:.6g} (relative error {err:.3g})",
               expected=f"equal within {ADJOINT_RTOL:g}",
               cause="adjoint() is not the adjoint of forward() (a flipped kernel, a missing mask, boundary handling "
               "that differs between the two)", detail=f"u, v standard normal of shapes {tuple(u.shape)} / {tuple(v.shape)}")


@operator_check
def check_operator_linear(operator: Any) -> None:
    """Where declared linear (``linear=True``, or an ``adjoint`` offered):
    ``A(αu + βv) = αA(u) + βA(v)``."""
    c, op, images = _operator(operator, "check_operator_linear")
    if not _is_linear(c.case, op):
        raise NotApplicable(f"{c.check}: {c.label} is not declared linear (no adjoint, linear=False)")
    g = seeded(2)
    u, v = torch.randn(images.shape, generator=g), torch.randn(images.shape, generator=g)
    u, v = u.to(images.dtype), v.to(images.dtype)
    with torch.no_grad():
        lhs = op.forward(0.7 * u - 1.3 * v)
        rhs = 0.7 * op.forward(u) - 1.3 * op.forward(v)
    if not _same(lhs, rhs):
        c.fail(observed=f"A(0.7u − 1.3v) differs from 0.7A(u) − 1.3A(v) (max |diff| = {max_diff(lhs, rhs):.3g})",
               expected="a linear forward()", cause="a clamp, an offset or a nonlinearity in forward(); declare linear=False "
               "(and offer no adjoint) if that is intended", detail="u, v standard normal")


@operator_check
def check_operator_deterministic_given_generator(operator: Any) -> None:
    """``measure(x, generator)`` twice with the same seed is bit-identical; with ``noise_std > 0``
    another seed gives another measurement."""
    c, op, images = _operator(operator, "check_operator_deterministic_given_generator")
    with torch.no_grad():
        a, b = op.measure(images, seeded(3)), op.measure(images, seeded(3))
        other = op.measure(images, seeded(4))
    if not torch.equal(a, b):
        c.fail(observed=f"two measurements with generator seed 3 differ (max |diff| = {max_diff(a, b):.3g})",
               expected="bit-identical measurements", cause="the noise is drawn from torch's global RNG instead of the generator")
    if float(getattr(op, "noise_std", 0.0)) > 0 and torch.equal(a, other):
        c.fail(observed="identical measurements for generator seeds 3 and 4", expected="different noise draws",
               cause="noise_std > 0 but the generator is ignored")


@operator_check
def check_operator_batch_matches_samples_alone(operator: Any) -> None:
    """Sample ``i`` of ``forward(x)`` equals ``select([i]).forward(x[i:i+1])``, and a measurement with
    per-sample generators equals each sample measured alone with its generator."""
    c, op, images = _operator(operator, "check_operator_batch_matches_samples_alone")
    if getattr(type(op), "select", None) is None:
        raise NotApplicable(f"{c.check}: {c.label} has no select(index) (its parameters are shared by all samples)")
    seeds = [20 + i for i in range(images.shape[0])]
    with torch.no_grad():
        full = op.forward(images)
        measured = op.measure(images, seeded_list(seeds))
        for i in range(images.shape[0]):
            alone = op.select(torch.tensor([i])).forward(images[i : i + 1])
            if not _same(full[i : i + 1], alone):
                c.fail(observed=f"forward(x)[{i}] differs from select([{i}]).forward(x[{i}]) (max |diff| = "
                       f"{max_diff(full[i : i + 1], alone) if full[i : i + 1].shape == alone.shape else 'shape'})",
                       expected="per-sample results", cause="select() does not pick sample i's parameters, or forward() mixes samples")
            m = op.select(torch.tensor([i])).measure(images[i : i + 1], seeded_list([seeds[i]]))
            if not _same(measured[i : i + 1], m):
                c.fail(observed=f"measure(x, per-sample generators)[{i}] differs from sample {i} measured alone",
                       expected="per-sample noise draws", cause="the noise is drawn for the batch instead of from each sample's generator")


@operator_check
def check_operator_gradient_flows(operator: Any) -> None:
    """``forward`` is differentiable: the gradient of ``Σ forward(x)²`` w.r.t. ``x`` is finite and not
    all zero (guided solvers differentiate through it)."""
    c, op, images = _operator(operator, "check_operator_gradient_flows")
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = op.forward(x)
        if not out.requires_grad:
            c.fail(observed="forward(x) does not require grad for x that does", expected="a differentiable forward()",
                   cause="forward() detaches, runs under no_grad, or goes through numpy")
        (grad,) = torch.autograd.grad((out * out).sum(), x)
    if not torch.all(torch.isfinite(grad)) or not bool((grad != 0).any()):
        c.fail(observed="the gradient of Σ forward(x)² is " + ("not finite" if not torch.all(torch.isfinite(grad)) else "zero everywhere"),
               expected="a finite, non-zero gradient", cause="forward() is not differentiable in x (rounding, indexing by x)")


# ---- Severity estimators ---------------------------------------------------------------------
FAMILY_KEYS = ("operator", "operator_family")
SEVERITIES = (0.05, 0.3, 0.55, 0.8, 1.0)


def _estimator(obj: Any, check: str) -> _Component:
    case = obj if isinstance(obj, EstimatorCase) else EstimatorCase(obj)
    c = _Component(case, check, "check_severity_estimator", "estimator")
    if not isinstance(case.estimator, SeverityEstimator):
        c.fail(observed=f"a {type(case.estimator).__name__}", expected="a SeverityEstimator (`metadata`, `estimate(y)`)",
               cause="the object does not satisfy flash_plugin.protocols.SeverityEstimator")
    return c


def _measure(c: _Component, t: torch.Tensor, seed: int) -> torch.Tensor:
    if c.case.family is None or c.case.images is None:
        raise NotApplicable(f"{c.check}: measurements are needed: pass family=make(severity, generator) -> Operator and "
                            "images=... (clean images of the estimator's image shape)")
    images = c.case.images
    g = seeded(seed)
    op = c.case.family(t, g)
    with torch.no_grad():
        return op.measure(images, g)


@estimator_check
def check_estimator_metadata(estimator: Any) -> None:
    """``metadata`` names the latent space (``latent_id``) and the operator family (``operator``) it
    was trained for, so that flash() can refuse a mismatch instead of producing garbage."""
    c = _estimator(estimator, "check_estimator_metadata")
    meta = getattr(c.obj, "metadata", None)
    if not isinstance(meta, dict):
        c.fail(observed=f"metadata is a {type(meta).__name__}", expected="a dict", cause="metadata must be a dict")
    missing = [k for k in ("latent_id",) if not isinstance(meta.get(k), str) or not meta.get(k)]
    if not any(isinstance(meta.get(k), str) and meta.get(k) for k in FAMILY_KEYS):
        missing.append(" or ".join(FAMILY_KEYS))
    if missing:
        c.fail(observed=f"metadata lacks {', '.join(missing)} (keys: {sorted(meta)[:10]})",
               expected="metadata['latent_id'] (the autoencoder's latent space) and metadata['operator'] (the family)",
               cause="without them a mismatched estimator runs silently and costs dB per image")


@estimator_check
def check_estimator_output(estimator: Any) -> None:
    """``estimate(y)`` returns a `SeverityEstimate` with ``latent`` batched like ``y`` and ``variance``
    of shape ``[B]``, finite and ``> 0``; the same ``y`` twice gives the same estimate."""
    c = _estimator(estimator, "check_estimator_output")
    n = c.case.images.shape[0] if c.case.images is not None else 0
    y = _measure(c, torch.full((n,), 0.5, dtype=torch.float64), seed=5)
    with torch.no_grad():
        est, again = c.obj.estimate(y), c.obj.estimate(y)
    if not isinstance(est, SeverityEstimate):
        c.fail(observed=f"estimate() returned a {type(est).__name__}", expected="a flash_plugin.types.SeverityEstimate",
               cause="return SeverityEstimate(latent=ẑ, variance=σ̂²)")
    b = y.shape[0]
    if est.latent.shape[0] != b or tuple(est.variance.shape) != (b,):
        c.fail(observed=f"latent {tuple(est.latent.shape)}, variance {tuple(est.variance.shape)} for {b} measurements",
               expected=f"latent (B, ...) and variance [B] with B = {b}", cause="one σ̂² per sample")
    v = est.variance
    if not torch.all(torch.isfinite(v)) or not bool((v > 0).all()) or not torch.all(torch.isfinite(est.latent)):
        c.fail(observed=f"σ̂² = {v.tolist()[:6]} (latent finite: {bool(torch.all(torch.isfinite(est.latent)))})",
               expected="finite σ̂² > 0 and a finite ẑ", cause="an unconstrained variance head (use exp or softplus)")
    if not (_same(est.latent, again.latent) and _same(est.variance, again.variance)):
        c.fail(observed="two estimates of the same y differ", expected="a deterministic estimate",
               cause="dropout or batch statistics active (train mode), or random numbers in estimate()")


@estimator_check
def check_estimator_variance_increases_with_severity(estimator: Any) -> None:
    """Over the supplied family, the mean ``σ̂²`` at severities 0.05 ... 1 increases on average: the
    mean at the most severe level exceeds the mean at the mildest, and the upper half's mean
    exceeds the lower half's."""
    c = _estimator(estimator, "check_estimator_variance_increases_with_severity")
    n = c.case.images.shape[0] if c.case.images is not None else 0
    means = []
    for i, t in enumerate(SEVERITIES):
        y = _measure(c, torch.full((n,), t, dtype=torch.float64), seed=100 + i)
        with torch.no_grad():
            means.append(float(c.obj.estimate(y).variance.double().mean()))
    half = len(means) // 2
    if not (means[-1] > means[0] and sum(means[-half:]) > sum(means[:half])):
        c.fail(observed="mean σ̂² per severity " + ", ".join(f"{t}: {m:.4g}" for t, m in zip(SEVERITIES, means)),
               expected="σ̂² increasing with the severity on average",
               cause="the estimator was trained for another operator family or another noise level, or its variance head "
               "did not learn", detail=f"{n} images, each measured at every severity")

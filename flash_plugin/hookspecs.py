"""Hook specifications of the ``flash_plugin`` project (specs only, no implementations).

A plugin is a module (or any object) with functions named like the specs below, decorated with
``flash_plugin.markers.hookimpl``. An implementation may accept a subset of a spec's parameters.
Plugins are found through the entry-point group ``flash_plugin``; the built-in solvers,
operators, severity estimators and models use the very same hooks (see
`flash_plugin.plugins.BUILTIN_PLUGINS`).

Two kinds of hooks:

* **Registration hooks** ``flash_register_*(register)``: the host passes a ``register`` callable
  and every plugin calls it once per thing it provides. Names are unique per registry: two
  registrations of the same name raise `flash_plugin.errors.DuplicateNameError`.
* **Adaptation hooks** ``flash_adapt_*(obj)`` (``firstresult``): turn a third-party object into
  one that satisfies a flash-plugin protocol, or decline with ``None``.

Every spec is documented with what to return and every parameter; a test checks it.
"""

from __future__ import annotations

from typing import Any, Callable

from flash_plugin.markers import hookspec

Register = Callable[[str, Any], None]
"""Signature of the ``register`` callable passed to the registration hooks: ``register(name, factory)``."""


# --- registration hooks -------------------------------------------------------------------------


@hookspec
def flash_register_solvers(register: Register) -> None:
    """Register solver factories by name.

    Call ``register(name, factory)`` once per solver: ``name`` is a short unique identifier
    (e.g. ``"latent-dps"``), ``factory`` a callable (usually the class) that returns an object
    satisfying `flash_plugin.protocols.Solver`. ``flash-plugin plugins`` shows the factory's
    ``description`` string if it has one, else the first line of its docstring.

    :param register: the callable ``register(name: str, factory) -> None`` provided by the host.

    The return value is ignored.
    """


@hookspec
def flash_register_operators(register: Register) -> None:
    """Register degradation operator factories by name.

    Call ``register(name, factory)`` once per operator family or task: ``name`` is a short unique
    identifier (e.g. ``"gaussian-blur"``), ``factory`` a callable returning an object satisfying
    `flash_plugin.protocols.Operator`. A factory and its operators may declare
    ``operator_family`` (e.g. ``"gaussian-blur"``): ``flash()`` then refuses a severity estimator
    trained for another family.

    :param register: the callable ``register(name: str, factory) -> None`` provided by the host.

    The return value is ignored.
    """


@hookspec
def flash_register_severity_estimators(register: Register) -> None:
    """Register severity estimator factories by name.

    Call ``register(name, factory)`` once per estimator: ``name`` is a short unique identifier,
    ``factory`` a callable returning an object satisfying
    `flash_plugin.protocols.SeverityEstimator` (with ``metadata`` naming its latent space and
    operator family). Keep registration cheap: load weights inside ``factory``.

    :param register: the callable ``register(name: str, factory) -> None`` provided by the host.

    The return value is ignored.
    """


@hookspec
def flash_register_models(register: Register) -> None:
    """Register latent diffusion model loaders by name.

    Call ``register(name, factory)`` once per model: ``name`` is a short unique identifier (e.g.
    ``"fashion-mnist-32"``), ``factory`` a callable that loads and returns the model (for
    example a ``LatentDiffusion``). Keep registration cheap: load weights inside ``factory``,
    not at import or registration time.

    :param register: the callable ``register(name: str, factory) -> None`` provided by the host.

    The return value is ignored.
    """


# --- adaptation hooks ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def flash_adapt_solver(obj: Any) -> Any | None:
    """Adapt a third-party solver object to the `flash_plugin.protocols.Solver` protocol.

    Return an object satisfying ``Solver`` that wraps ``obj`` without changing it, or ``None``
    when this plugin does not know ``obj``. Called only for objects that do not already satisfy
    ``Solver``.

    Stops at first non-None result.

    :param obj: the object the user passed, e.g. to ``flash()``; never modify it.
    """


@hookspec(firstresult=True)
def flash_adapt_operator(obj: Any) -> Any | None:
    """Adapt a third-party operator (e.g. a deepinv ``Physics``) to `flash_plugin.protocols.Operator`.

    Return an object satisfying ``Operator`` that wraps ``obj`` without changing it, or ``None``
    when this plugin does not know ``obj``. Called only for objects that do not already satisfy
    ``Operator``.

    Stops at first non-None result.

    :param obj: the operator object the user passed; never modify it.
    """


@hookspec(firstresult=True)
def flash_adapt_severity_estimator(obj: Any) -> Any | None:
    """Adapt a third-party model to the `flash_plugin.protocols.SeverityEstimator` protocol.

    Return an object satisfying ``SeverityEstimator`` that wraps ``obj`` without changing it,
    or ``None`` when this plugin does not know ``obj``. Called only for objects that do not
    already satisfy ``SeverityEstimator``.

    Stops at first non-None result.

    :param obj: the estimator object the user passed; never modify it.
    """

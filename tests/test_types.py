"""Types on the public surface (issue 14): every public name is annotated.

For the public packages below, every public function has annotated
parameters and a return annotation; every public class has annotated
parameters (and return annotations) on ``__init__`` and on the public
methods that tfdml itself defines (on the class or a tfdml base class;
methods inherited from Keras are not checked). ``self``, ``cls``,
``*args`` and ``**kwargs`` are exempt. Annotations are read as strings
(``eval_str=False``), so ``from __future__ import annotations`` is fine.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = (
    "tfdml.losses",
    "tfdml.mining",
    "tfdml.weighting",
    "tfdml.memory",
    "tfdml.augment",
    "tfdml.meta",
    "tfdml.models",
    "tfdml.eval",
    "tfdml.export",
    "tfdml.data",
    "tfdml.distribute",
    "tfdml.validation",
)

# Methods users call that start with an underscore.
_DUNDERS = ("__init__", "__call__")
_EXEMPT_PARAMS = ("self", "cls")


def public_names(module):
    """``__all__``, else the non-underscore tfdml callables it exports."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return sorted(names)
    out = []
    for name, obj in vars(module).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if not callable(obj):
            continue
        if not getattr(obj, "__module__", "").startswith("tfdml"):
            continue  # typing.Any, keras, numpy ... imported for use
        out.append(name)
    return sorted(out)


def _missing_in(func, label, need_return):
    try:
        sig = inspect.signature(func, eval_str=False)
    except (TypeError, ValueError):  # builtins without a signature
        return []
    missing = []
    for param in sig.parameters.values():
        if param.name in _EXEMPT_PARAMS:
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.annotation is inspect.Parameter.empty:
            missing.append(f"{label}({param.name})")
    if need_return and sig.return_annotation is inspect.Signature.empty:
        missing.append(f"{label}(-> return)")
    return missing


def _class_methods(cls):
    """(qualified label, function) for the methods tfdml defines."""
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("tfdml"):
            continue
        for name, attr in vars(klass).items():
            if name in seen:
                continue
            if name.startswith("_") and name not in _DUNDERS:
                continue
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif not inspect.isfunction(attr):
                continue  # properties, constants, nested classes
            seen.add(name)
            yield f"{klass.__module__}.{klass.__qualname__}.{name}", attr


def unannotated(package):
    module = importlib.import_module(package)
    missing = []
    for name in public_names(module):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            for label, func in _class_methods(obj):
                need_return = not label.endswith(".__init__")
                missing += _missing_in(func, label, need_return)
        elif callable(obj):
            label = f"{obj.__module__}.{obj.__qualname__}"
            missing += _missing_in(obj, label, need_return=True)
    return sorted(set(missing))


@pytest.mark.parametrize("package", PACKAGES)
def test_public_surface_is_annotated(package):
    missing = unannotated(package)
    assert not missing, (
        f"{len(missing)} unannotated on the public surface of {package} "
        "(module.name(param); '-> return' is a missing return type):\n  "
        + "\n  ".join(missing)
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_exports_something(package):
    # Guards the check itself: an empty list of names would pass vacuously.
    assert public_names(importlib.import_module(package))

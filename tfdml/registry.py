"""Configs to objects, on top of Keras' serialisation registry.

Every tfdml class is registered once under ``"tfdml>ClassName"``; the same name
serves ``.keras`` saves, ``{"class_name", "config"}`` dicts and YAML configs.
Defaults live only in constructor signatures.
"""

import keras

PACKAGE = "tfdml"


def register(cls):
    """Class decorator: registers ``cls`` as ``tfdml>ClassName``."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def registered(base=None):
    """Dict ``{ClassName: class}`` of registered tfdml classes.

    With ``base``, only subclasses of it.
    """
    prefix = PACKAGE + ">"
    out = {}
    for key, cls in keras.saving.get_custom_objects().items():
        if key.startswith(prefix) and isinstance(cls, type):
            if base is None or issubclass(cls, base):
                out[key[len(prefix) :]] = cls
    return out


def build(base, spec):
    """Builds an instance of a registered subclass of ``base``.

    ``spec`` is an instance (returned as is), a class name string, a dict
    ``{"name": ClassName, **kwargs}`` or Keras'
    ``{"class_name": "tfdml>ClassName", "config": {...}}``.
    """
    if spec is None or isinstance(spec, base):
        return spec
    if isinstance(spec, dict) and "class_name" in spec:
        obj = keras.saving.deserialize_keras_object(spec)
        if not isinstance(obj, base):
            raise ValueError(
                f"{spec['class_name']!r} is not a {base.__name__}."
            )
        return obj
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise ValueError(
                f"A {base.__name__} spec needs a 'name' key; received {spec!r}."
            )
        name = kwargs.pop("name")
    else:
        raise ValueError(
            f"Cannot build a {base.__name__} from {spec!r} "
            f"(type {type(spec).__name__})."
        )
    available = registered(base)
    if name not in available:
        raise ValueError(
            f"Unknown {base.__name__} {name!r}. Available: "
            f"{', '.join(sorted(available))}."
        )
    cls = available[name]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"Invalid arguments for {name}: {e}") from None

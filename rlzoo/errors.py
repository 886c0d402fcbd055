"""The one exception type meant for users: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown name, missing path, malformed row, bad number).

    The message says what is wrong and what would be right, on one line.
    """


_RULES = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_ranges(obj, rules: dict[str, str], name: str | None = None) -> None:
    """Refuse the first field of the dataclass ``obj`` that breaks its rule (a key of ``_RULES``) with one line
    that names its gin binding (``name.field``; default: the name gin knows ``obj``'s class by). Checked
    when the config is built, before anything is written, so a bad value never leaves a half-made run."""
    import dataclasses
    import math

    ints = {f.name for f in dataclasses.fields(obj) if f.type in (int, "int")}
    for field, rule in rules.items():
        value = getattr(obj, field)
        number = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and math.isfinite(value))
        if not (number and (field not in ints or isinstance(value, int)) and _RULES[rule](value)):
            kind = "an integer" if field in ints else "a number"
            raise UserError(f"{name or configurable_name(type(obj))}.{field} = {value!r}: must be {kind} {rule}")


def configurable_name(cls) -> str:
    """The name gin knows ``cls`` by (``@gin.configurable("value_ppo")``): the one the user's bindings use."""
    import gin.config

    return next((c.name for _, c in gin.config._REGISTRY.items() if c.wrapped is cls), cls.__name__)

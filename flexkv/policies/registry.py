"""Policy registry: names accepted by `policy=`, construction by name or object, `a+b` composition."""
from __future__ import annotations

_POLICIES: dict[str, type] = {}
_MODIFIERS: dict[str, type] = {}


def register(cls):
    _POLICIES[cls.name] = cls
    return cls


def register_modifier(cls):
    _MODIFIERS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names accepted by `policy=` (modifiers compose as `"<policy>+<modifier>"`)."""
    return sorted(_POLICIES) + [f"<policy>+{m}" for m in sorted(_MODIFIERS)]


def _construct(cls, what: str, **params):
    allowed = cls.param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for policy {what!r}; allowed: {allowed}")
    return cls(**params)


def make_policy(policy, budget=None, **params):
    """`policy` is a name (`"h2o"`, `"snapkv+vam"`) or a Policy object (then no extra params)."""
    from flexkv.policies.base import Policy

    if isinstance(policy, Policy) or hasattr(policy, "prefill_layer"):
        if budget is not None or params:
            raise ValueError("budget/params must not be given with a policy object; set them on it")
        return policy
    if not isinstance(policy, str) or not policy:
        raise ValueError(f"policy must be a name from {available()} or a Policy object, got {policy!r}")
    base, *mods = policy.split("+")
    if base not in _POLICIES:
        raise ValueError(f"unknown policy {base!r}; available: {available()}")
    for m in mods:
        if m not in _MODIFIERS:
            raise ValueError(f"unknown policy modifier {m!r} in {policy!r}; "
                             f"available modifiers: {sorted(_MODIFIERS)}")
    cls = _POLICIES[base]
    mod_params = {}
    for m in mods:  # modifier parameters are routed by name; `<modifier>_<param>` is explicit
        for p in _MODIFIERS[m].param_names():
            if f"{m}_{p}" in params:
                mod_params.setdefault(m, {})[p] = params.pop(f"{m}_{p}")
            elif p in params and p not in cls.param_names():
                mod_params.setdefault(m, {})[p] = params.pop(p)
    kw = dict(params)
    if budget is not None or "budget" in cls.param_names():
        kw["budget"] = budget
    pol = _construct(cls, base, **kw)
    for m in mods:
        pol = _construct(_MODIFIERS[m], m, base=pol, **mod_params.get(m, {}))
    return pol

"""Rule presets are data: `rules/NAME.toml` (shipped in the wheel as `graphlrp/_rules/`) or a user's TOML file.

Schema (every key is validated; an unknown or malformed key is a PresetError naming it):

    description = "..."                # free text
    output = "probability" | "logit"   # relevance put on the target class at the start
    split = "ratio" | "symmetric" | "signed"
    include_identity = true | false    # whether identity skips receive relevance
    conserving = true | false          # the preset promises ΣR_input = R_output; every compile checks it to 1e-3
                                       # (graphlrp/verify.py) and refuses an explainer that does not
    on_vanishing = "error" | "warn"    # a non-conserving preset whose ΣR_in / R_out leaves [0.5, 2]: refused (error,
                                       # the default) or warned about and recorded (warn: Gradient×Input-style
                                       # transformer rules, whose sum is not meant to hold)
    batchnorm = "pass" | "fold"        # relevance passes through BN, or BN is folded into an adjacent conv/linear
                                       # where that is exact (graphlrp/canonize.py); unfolded BNs get rules.batchnorm

    [rules]                            # layer category -> rule name, or a table {rule = NAME, param = value, ...}
    first_layer, conv, linear, batchnorm, activation, maxpool, avgpool, merge, constant_add, scale, gate, identity,
    normalization (layer/group/instance norm), reduction (sum/mean over non-spatial dims), softmax,
    matmul (matmul/einsum of two input-dependent tensors: Q·Kᵀ, A·V, linear attention), product (an elementwise
    product of two signals that is no gate: SwiGLU, gMLP's gating; default 'refuse', an error where relevance
    reaches it), constant_cat (constants joining the input: a class token, constant padding); maxpool also covers
    max/min over dims (amax)

    [overrides]                        # glob on module path or node name -> rule (applied where the rule fits)
    "layer4.*" = "epsilon"             # first matching pattern wins; compile(overrides=...) comes before these

Rule parameters are checked against the rule's signature and value constraints (rules.check_params).
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import ops
from .errors import PresetError
from .rules import RULES, SPLITS, check_params, get_rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CATEGORY_KINDS = {
    "first_layer": (ops.CONV, ops.LINEAR),
    "conv": (ops.CONV,),
    "linear": (ops.LINEAR,),
    "batchnorm": (ops.BATCHNORM,),
    "activation": (ops.ACTIVATION,),
    "maxpool": (ops.MAXPOOL, ops.MAX_REDUCE),  # max pools and max/min over dims (amax, max(dim).values)
    "avgpool": (ops.AVGPOOL, ops.REDUCE),
    "merge": (ops.MERGE,),
    "constant_add": (ops.BIAS_ADD,),
    "attention_bias": (ops.BIAS_ADD,),  # a constant added to attention scores (Swin's position bias, shift mask)
    "scale": (ops.SCALE,),
    "gate": (ops.GATE,),
    "identity": (ops.IDENTITY,),
    "normalization": (ops.NORM,),
    "reduction": (ops.REDUCE,),
    "softmax": (ops.SOFTMAX,),
    "matmul": (ops.MATMUL,),
    "product": (ops.PRODUCT,),  # elementwise a·b of two signals, neither a gate (SwiGLU, gMLP, FocalNet)
    "constant_cat": (ops.CONST_CAT, ops.PAD),  # constants joining the input: a class token, constant padding
}
DEFAULT_RULES = {"activation": "pass", "identity": "pass", "constant_add": "pass", "scale": "pass", "gate": "pass",
                 "batchnorm": "pass", "merge": "split", "normalization": "pass", "reduction": "z",
                 "constant_cat": "drop", "matmul": "constant_weights", "product": "refuse",
                 "attention_bias": "proportional"}
TOP_KEYS = {"description", "output", "split", "include_identity", "batchnorm", "rules", "overrides", "name",
            "conserving", "on_vanishing"}


@dataclass
class RuleChoice:
    rule: str
    params: dict = field(default_factory=dict)


@dataclass
class Preset:
    name: str
    description: str = ""
    output: str = "probability"
    split: str = "ratio"
    include_identity: bool = True
    batchnorm: str = "pass"
    conserving: bool = False  # promises ΣR_input = R_output (checked by every compile, graphlrp.verify)
    on_vanishing: str = "error"  # relevance that vanishes or grows (ΣR_in / R_out outside [0.5, 2]): error | warn
    rules: dict = field(default_factory=dict)  # category -> RuleChoice
    overrides: dict = field(default_factory=dict)  # pattern -> RuleChoice

    def rule_for(self, category: str, kind: str, names: tuple[str, ...]) -> RuleChoice:
        for pattern, choice in self.overrides.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names if n) and kind in RULES[choice.rule].kinds:
                return choice
        return self.rules.get(category) or (RuleChoice(DEFAULT_RULES[category]) if category in DEFAULT_RULES
                                            else None)


def preset_dir() -> Path:
    """Where the shipped presets live: `graphlrp/_rules/` in an installed wheel, `rules/` in a source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "_rules"
    return installed if any(installed.glob("*.toml")) else here.parent / "rules"


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def _choice(value, where: str, kinds: tuple | None) -> RuleChoice:
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, dict):
        if "rule" not in value:
            raise PresetError(f"{where}: a rule table needs a 'rule' key")
        params = {k: v for k, v in value.items() if k != "rule"}
        name = value["rule"]
        if not isinstance(name, str):
            raise PresetError(f"{where}.rule: expected a rule name, got {name!r}")
    else:
        raise PresetError(f"{where}: expected a rule name or a table, got {value!r}")
    spec = get_rule(name, where)
    if kinds is not None and not set(kinds) & set(spec.kinds):
        raise PresetError(f"{where}: rule {name!r} does not apply to {'/'.join(kinds)} layers")
    check_params(spec, params, where)
    return RuleChoice(name, params)


def parse_preset(data: dict, name: str) -> Preset:
    for key in data:
        if key not in TOP_KEYS:
            raise PresetError(f"{name}: unknown key {key!r} (known: {', '.join(sorted(TOP_KEYS))})")
    p = Preset(name=data.get("name", name), description=str(data.get("description", "")))
    p.output = data.get("output", p.output)
    if p.output not in ("probability", "logit"):
        raise PresetError(f"{name}: output must be 'probability' or 'logit', got {p.output!r}")
    p.split = data.get("split", p.split)
    if p.split not in SPLITS:
        raise PresetError(f"{name}: split must be one of {', '.join(SPLITS)}, got {p.split!r}")
    p.include_identity = data.get("include_identity", p.include_identity)
    if not isinstance(p.include_identity, bool):
        raise PresetError(f"{name}: include_identity must be true or false")
    p.conserving = data.get("conserving", p.conserving)
    if not isinstance(p.conserving, bool):
        raise PresetError(f"{name}: conserving must be true or false")
    p.on_vanishing = data.get("on_vanishing", p.on_vanishing)
    if p.on_vanishing not in ("error", "warn"):
        raise PresetError(f"{name}: on_vanishing must be 'error' or 'warn', got {p.on_vanishing!r}")
    p.batchnorm = data.get("batchnorm", p.batchnorm)
    if p.batchnorm not in ("pass", "fold"):
        raise PresetError(f"{name}: batchnorm must be 'pass' or 'fold', got {p.batchnorm!r}")
    rules = data.get("rules", {})
    if not isinstance(rules, dict):
        raise PresetError(f"{name}: [rules] must be a table")
    for category, value in rules.items():
        if category not in CATEGORY_KINDS:
            raise PresetError(f"{name}: rules.{category}: unknown layer category "
                              f"(known: {', '.join(CATEGORY_KINDS)})")
        p.rules[category] = _choice(value, f"{name}: rules.{category}", CATEGORY_KINDS[category])
    overrides = data.get("overrides", {})
    if not isinstance(overrides, dict):
        raise PresetError(f"{name}: [overrides] must be a table")
    for pattern, value in overrides.items():
        p.overrides[pattern] = _choice(value, f"{name}: overrides.{pattern!r}", None)
    return p


def load_preset(rules: str | Path | dict | Preset) -> Preset:
    """A preset by name (shipped), by path to a TOML file, or as an already-parsed dict."""
    if isinstance(rules, Preset):
        return rules
    if isinstance(rules, dict):
        return parse_preset(rules, "preset")
    text = str(rules)
    path = Path(text)
    if not (text.endswith(".toml") or path.is_file()):
        path = preset_dir() / f"{text}.toml"
        if not path.is_file():
            raise PresetError(f"unknown preset {text!r}; shipped presets: {', '.join(available_presets())} "
                              "(or give a path to a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise PresetError(f"preset file not found: {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{path}: not valid TOML: {e}") from e
    return parse_preset(data, path.stem)

"""Typed, frozen configuration for the tokenizer.

Precedence, lowest to highest: the dataclass defaults, the method preset
(:func:`TokenizerConfig.for_method`), a config file (YAML or JSON), then ``--set
section.field=value`` overrides on the command line. Every section validates
itself in ``__post_init__`` so a bad value fails where it is given, and an
unknown field is an error that names it. :func:`describe_config` prints an
effective config as YAML with each value's source.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

METHODS = ("sa2crq", "tiger", "rqkmeans", "sa2crq-no-sarq", "sa2crq-no-acrq")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class SegmentConfig:
    """Popularity segments (DESIGN §3): items ranked by training popularity, ties by item id."""

    head_fraction: float = 0.2
    torso_fraction: float = 0.3

    def __post_init__(self) -> None:
        _require(0 < self.head_fraction < 1, f"segments.head_fraction must be in (0, 1), got {self.head_fraction}")
        _require(0 <= self.torso_fraction < 1, f"segments.torso_fraction must be in [0, 1), got {self.torso_fraction}")
        _require(
            self.head_fraction + self.torso_fraction <= 1,
            "segments.head_fraction + segments.torso_fraction must be at most 1",
        )


@dataclass(frozen=True)
class RQVAEConfig:
    """Residual-quantised autoencoder (DESIGN §3.1)."""

    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    levels: int = 4
    codebook_size: int = 256
    beta: float = 0.25
    # Weights of the nested reconstruction terms, one per prefix depth; empty means uniform.
    nested_weights: tuple[float, ...] = ()
    epochs: int = 150
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    kmeans_iters: int = 25
    # A code used by fewer than this many items over an epoch is dead and gets reset.
    dead_code_min_count: int = 1
    # Dead codes are reset every this many epochs, and never in the last quarter of training.
    dead_code_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        object.__setattr__(self, "nested_weights", tuple(float(w) for w in self.nested_weights))
        _require(all(h > 0 for h in self.hidden_dims), "rqvae.hidden_dims must be positive")
        _require(self.latent_dim > 0, "rqvae.latent_dim must be positive")
        _require(self.levels >= 1, "rqvae.levels must be at least 1")
        _require(self.codebook_size >= 2, "rqvae.codebook_size must be at least 2")
        _require(self.beta >= 0, "rqvae.beta must be non-negative")
        _require(
            not self.nested_weights or len(self.nested_weights) == self.levels,
            f"rqvae.nested_weights needs {self.levels} entries (one per level) or none",
        )
        _require(all(w >= 0 for w in self.nested_weights), "rqvae.nested_weights must be non-negative")
        _require(self.epochs >= 1 and self.batch_size >= 1, "rqvae.epochs and rqvae.batch_size must be positive")
        _require(self.learning_rate > 0, "rqvae.learning_rate must be positive")
        _require(self.kmeans_iters >= 1, "rqvae.kmeans_iters must be at least 1")
        _require(self.dead_code_every >= 1, "rqvae.dead_code_every must be at least 1")

    def level_weights(self) -> tuple[float, ...]:
        if self.nested_weights:
            return self.nested_weights
        return tuple(1.0 / self.levels for _ in range(self.levels))


@dataclass(frozen=True)
class ACRQConfig:
    """Anchored curriculum (DESIGN §3.2). Only used by methods that train in two phases."""

    # New codes per level in phase 2; 0 means codebook_size // 4.
    extension_codes: int = 0
    # Gate: a level may take a new code only beyond this quantile of head anchor distances.
    gate_quantile: float = 0.999
    adapter_hidden: int = 128
    # New codes are initialised by k-means on this worst-served share of tail residuals.
    worst_served_fraction: float = 0.25
    # Anchor pull weight lambda(t): decays linearly from start to end over phase 2.
    anchor_weight_start: float = 1.0
    anchor_weight_end: float = 0.0
    # Head replay penalty mu * ||A(x_head)||^2.
    head_replay_weight: float = 10.0
    # Epochs per curriculum stage (torso, tail, cold); stages are cumulative.
    epochs_per_stage: int = 40
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        _require(self.extension_codes >= 0, "acrq.extension_codes must be non-negative")
        _require(0 < self.gate_quantile <= 1, "acrq.gate_quantile must be in (0, 1]")
        _require(self.adapter_hidden > 0, "acrq.adapter_hidden must be positive")
        _require(0 < self.worst_served_fraction <= 1, "acrq.worst_served_fraction must be in (0, 1]")
        _require(self.anchor_weight_start >= 0 and self.anchor_weight_end >= 0, "acrq anchor weights must be >= 0")
        _require(self.head_replay_weight >= 0, "acrq.head_replay_weight must be non-negative")
        _require(self.epochs_per_stage >= 1, "acrq.epochs_per_stage must be at least 1")
        _require(self.learning_rate > 0, "acrq.learning_rate must be positive")

    def extension_size(self, codebook_size: int) -> int:
        return self.extension_codes or max(1, codebook_size // 4)


@dataclass(frozen=True)
class SIDConfig:
    """How full-depth codes become semantic IDs (DESIGN §3.3)."""

    # True: SARQ adaptive lengths. False: every item keeps full depth (fixed length).
    adaptive_length: bool = True
    # Entropy budget in bits; None means log2(number of items).
    tau: float | None = None
    min_length: int = 1
    # Integer smoothing added to every item's popularity in the prefix masses.
    epsilon: int = 1
    max_bucket: int = 32
    # Size of the disambiguation-token vocabulary. Larger full-depth groups overflow (see sarq.py).
    digit_vocab: int = 32
    # Append a disambiguation digit to every full-depth ID (TIGER style), not only to colliding ones.
    always_digit: bool = False
    # Force one item per SID: truncated buckets get disambiguation digits too.
    one_item_per_id: bool = False
    # Recode with a reused tokenizer: an unchanged item keeps its published depth while its prefix
    # masses stay within a factor 2**hysteresis_bits of the keep threshold (sa2crq/ids/stability.py).
    hysteresis_bits: int = 1

    def __post_init__(self) -> None:
        _require(self.tau is None or math.isfinite(self.tau) and self.tau > 0, "sid.tau must be a positive number")
        _require(self.min_length >= 1, "sid.min_length must be at least 1")
        _require(self.epsilon >= 0 and isinstance(self.epsilon, int), "sid.epsilon must be a non-negative integer")
        _require(self.max_bucket >= 1, "sid.max_bucket must be at least 1")
        _require(self.digit_vocab >= 2, "sid.digit_vocab must be at least 2")
        _require(
            isinstance(self.hysteresis_bits, int) and self.hysteresis_bits >= 0,
            "sid.hysteresis_bits must be a non-negative integer",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SIDConfig":
        # Tokenizers and versions published before the mass-band rule store its predecessor,
        # a tolerance in depth levels; no value of it maps onto the new rule, so it is dropped.
        if "hysteresis_levels" in data:
            log.warning("sid.hysteresis_levels is retired (see sid.hysteresis_bits, a different rule): ignored")
            data = {key: value for key, value in data.items() if key != "hysteresis_levels"}
        return _build(cls, data, "")


@dataclass(frozen=True)
class TokenizerConfig:
    method: str = "sa2crq"
    # "acrq": two-phase anchored training; "rqvae": single stage on all items; "rqkmeans": residual k-means.
    quantizer: str = "acrq"
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    acrq: ACRQConfig = field(default_factory=ACRQConfig)
    sid: SIDConfig = field(default_factory=SIDConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    # Fit on about this many items of each segment, a seeded hash sample (sa2crq.quantize.sample):
    # training memory and time stop growing with the catalog. 0 = every item.
    sample_per_segment: int = 250_000

    def __post_init__(self) -> None:
        _require(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(
            isinstance(self.sample_per_segment, int) and self.sample_per_segment >= 0,
            f"sample_per_segment must be a non-negative integer (0 = every item), got {self.sample_per_segment!r}",
        )
        _require(
            self.quantizer in ("acrq", "rqvae", "rqkmeans"),
            f"quantizer must be acrq, rqvae or rqkmeans, got {self.quantizer!r}",
        )
        _require(
            self.sid.min_length <= self.rqvae.levels,
            f"sid.min_length ({self.sid.min_length}) exceeds rqvae.levels ({self.rqvae.levels})",
        )

    @classmethod
    def for_method(cls, method: str) -> "TokenizerConfig":
        """The preset for one method of the comparison (DESIGN §3.5)."""
        if method == "sa2crq":
            return cls(method=method)
        if method == "sa2crq-no-sarq":
            return cls(method=method, sid=SIDConfig(adaptive_length=False))
        if method == "sa2crq-no-acrq":
            return cls(method=method, quantizer="rqvae")
        if method == "tiger":
            # TIGER: 3 levels x 256, every ID carries a collision digit, trained on all items at once.
            return cls(
                method=method,
                quantizer="rqvae",
                rqvae=RQVAEConfig(levels=3),
                sid=SIDConfig(adaptive_length=False, always_digit=True),
            )
        if method == "rqkmeans":
            return cls(
                method=method,
                quantizer="rqkmeans",
                rqvae=RQVAEConfig(levels=3),
                sid=SIDConfig(adaptive_length=False, always_digit=True),
            )
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TokenizerConfig":
        """The preset of ``data["method"]`` (default sa2crq), overridden by the rest of ``data``."""
        preset = cls.for_method(data.get("method", cls.method))
        return _build(cls, _deep_merge(preset.to_dict(), _unflatten(data)), "")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TokenizerConfig":
        """Nested overrides, e.g. ``{"rqvae": {"epochs": 5}}`` or ``{"rqvae.epochs": 5}``."""
        return _build(TokenizerConfig, _deep_merge(self.to_dict(), _unflatten(overrides)), "")


def load_tokenizer_config(method: str, config_file: str | Path | None, assignments: list[str]) -> TokenizerConfig:
    """Preset for ``method``, then the config file, then ``section.field=value`` assignments."""
    file_data = read_config_file(config_file) if config_file is not None else {}
    file_data.pop("method", None)
    layers = _deep_merge(_unflatten(file_data), _unflatten(parse_assignments(assignments)))
    return TokenizerConfig.for_method(method).with_overrides(layers)


CONFIG_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's sections and fields: YAML (``.yaml``, ``.yml``) or JSON (``.json``)."""
    path = Path(path)
    kind = CONFIG_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: a config file is YAML (.yaml, .yml) or JSON (.json), not {path.suffix or 'a file without a suffix'}")
    text = path.read_text()
    if kind == "JSON":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
    else:
        import yaml  # lazily: the GPU machine's bare environment reads JSON configs only

        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of sections and fields, got {type(data).__name__}")
    return data


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's safe loader, reading ``2e-3`` as a float: YAML 1.1 wants a dot in a float (``2.0e-3``)
    and would hand a learning rate over as a string; YAML 1.2, JSON and people write ``2e-3``."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def layered_config(cls: type, config_file: str | Path | None, assignments: list[str]) -> Any:
    """Any config dataclass from its defaults, then a config file, then ``a.b=value`` assignments.

    A nested section whose type has ``from_dict`` (e.g. :class:`TokenizerConfig`, which applies
    its method preset first) is built by it. An error names the layers it was built from.
    """
    file_data = read_config_file(config_file) if config_file is not None else {}
    try:
        return build_config(cls, _deep_merge(_unflatten(file_data), _unflatten(parse_assignments(assignments))))
    except (ValueError, TypeError) as err:
        layers = " < ".join(["defaults", *([str(config_file)] if config_file is not None else []), *(["--set"] if assignments else [])])
        raise ValueError(f"{err} (config: {layers})") from None


def describe_config(config: Any, config_file: str | Path | None, assignments: list[str]) -> str:
    """``config`` (built by :func:`layered_config` from these layers) as YAML, every field with its
    source as a comment: ``--set``, the file, ``preset <method>`` (a tokenizer method preset's
    value), ``default``, or ``derived`` (a default the config resolved, e.g. a path made absolute).
    The text is itself a config file that gives the same config."""
    sources = {key: "--set" for key in _flat(_unflatten(parse_assignments(assignments)))}
    if config_file is not None:
        for key in _flat(_unflatten(read_config_file(config_file))):
            sources.setdefault(key, str(config_file))
    lines = [f"# effective {type(config).__name__}: defaults < {config_file or 'no file'} < --set; each value's source after it"]

    def walk(node: Any, prefix: str, indent: str, changed_by: str) -> None:
        if isinstance(node, TokenizerConfig):
            changed_by = f"preset {node.method}"
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                walk(value, key + ".", indent + "  ", changed_by)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            source = sources.get(key) or ("default" if _plain(value) == _plain(default) else changed_by)
            lines.append(f"{indent}{f.name}: {json.dumps(_plain(value))}  # {source}")

    walk(config, "", "", "derived")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A field value as JSON sees it (tuples as lists)."""
    return json.loads(json.dumps(value))


def _flat(nested: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping's leaves."""
    keys: list[str] = []
    for key, value in nested.items():
        keys += _flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else [prefix + key]
    return keys


def build_config(cls: type, data: Mapping[str, Any]) -> Any:
    return _build(cls, data, "")


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["rqvae.epochs=5", "sid.tau=12.5"]`` -> flat dict; values are parsed as JSON when they can be."""
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} conflicts with another override")
        leaf = parts[-1]
        if isinstance(value, Mapping):
            node[leaf] = _deep_merge(node.get(leaf, {}), _unflatten(value))
        else:
            node[leaf] = value
    return nested


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + name for name in unknown)
        raise ValueError(f"unknown config field(s): {names}; known: {', '.join(prefix + n for n in fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ValueError(f"config field {prefix}{name} must be an object")
            section = type(default)
            if hasattr(section, "from_dict"):
                try:
                    kwargs[name] = section.from_dict(value)
                except ValueError as err:
                    raise ValueError(f"{prefix}{name}: {err}") from None
            else:
                kwargs[name] = _build(section, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)

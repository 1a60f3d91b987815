"""The models one worker serves: each with its own engine, inference thread (scheduler) and batch.

Configured by MODELS (a JSON list, or the path of a JSON file holding one), or, without it, one model
from TTS_ENGINE / MODEL_DIR as before. An entry:

    {"name": "voxcpm-1.5", "dir": "/models/…", "default": true, "device": "cuda:0", "max_batch": "auto",
     "memory_share": 2, "settings": {"cfg_value": 2.5}}
    {"name": "en-fast", "engine": "embedded"}

`engine` may be left out when `dir` holds a checkpoint (its config.json says the family); `uri` is
pulled by bootstrap, which replaces it with `dir`. Requests pick a model by name; OpenAI's model names
(tts-1, tts-1-hd, gpt-4o-mini-tts) mean the default model.

Several models on one GPU share its memory by `memory_share` (default 1 each): models load one after
another, and each sizes its batch from the memory free when it loads times its share of the shares
not yet loaded on that device, so the last model on a GPU gets all that is left and the first cannot
take everything.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from .engines import Engine
    from .scheduler import Scheduler
    from .synthesis import SynthesisService

log = logging.getLogger(__name__)

# What OpenAI SDK users send as `model`: all mean the default model here.
OPENAI_MODEL_NAMES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
    engine: Optional[str] = None
    dir: Optional[Path] = None
    uri: Optional[str] = None
    device: Optional[str] = None
    max_batch: Optional[str] = None
    default: bool = False
    memory_share: float = Field(1.0, gt=0)
    settings: dict = Field(default_factory=dict)

    @field_validator("max_batch", mode="before")
    @classmethod
    def _batch(cls, v):
        v = None if v is None else str(v).strip().lower()
        if v not in (None, "", "auto") and (not v.isdigit() or int(v) < 1):
            raise ValueError("max_batch must be auto or a positive integer")
        return v or None


@dataclass
class ModelSpec:
    name: str
    engine: Optional[str] = None  # family name; None: from the checkpoint
    dir: Optional[Path] = None
    uri: Optional[str] = None
    device: Optional[str] = None
    batch: Optional[str] = None  # TTS_MAX_BATCH for this model; None: the worker's
    default: bool = False
    memory_share: float = 1.0
    settings: dict = field(default_factory=dict)
    memory_fraction: float = 1.0  # filled in when the models are laid out on their devices

    def max_batch(self, settings) -> str:
        return self.batch or settings.tts_max_batch


def read_models(raw: str) -> tuple[list, str]:
    """MODELS as given, JSON text or the path of a JSON file: its list of entries, and where it was read
    (for messages). ValueError saying what to fix when it is neither, or not a JSON list. The worker
    checks the entries (parse_models); bootstrap reads the same way to pull the ones with a `uri`."""
    text = raw.strip()
    source = "MODELS"
    if not text.startswith("["):
        path = Path(text)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"MODELS={raw!r} is neither a JSON list nor a readable file ({e.strerror})") from None
        source = f"MODELS file {path}"
    try:
        entries = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{source} is not valid JSON ({e}); give a list of model entries") from None
    if not isinstance(entries, list):
        raise ValueError(_not_a_list(source))
    return entries, source


def _not_a_list(source: str) -> str:
    return (f"{source} must be a non-empty JSON list of model entries, e.g. "
            '[{"name": "voxcpm-1.5", "dir": "/models/voxcpm"}]')


def parse_models(raw: str) -> list[ModelSpec]:
    """MODELS: JSON text, or a path to a JSON file; a list of entries with unique names, at most one default."""
    entries, source = read_models(raw)
    if not entries:
        raise ValueError(_not_a_list(source))
    specs = []
    for i, entry in enumerate(entries):
        try:
            e = _Entry.model_validate(entry)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'entry'}: {x['msg']}" for x in err.errors())
            raise ValueError(f"{source} entry {i}: {problems}") from None
        if e.name in OPENAI_MODEL_NAMES:
            raise ValueError(f"{source} entry {i}: '{e.name}' is reserved (OpenAI's name for the default model)")
        specs.append(ModelSpec(e.name, e.engine, e.dir, e.uri, e.device, e.max_batch, e.default, e.memory_share,
                               dict(e.settings)))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{source} names {', '.join(dupes)} more than once; model names must be unique")
    if sum(s.default for s in specs) > 1:
        raise ValueError(f"{source} marks {sum(s.default for s in specs)} models as default; mark one")
    if not any(s.default for s in specs):
        specs[0].default = True  # the first entry answers requests that name no model
    return specs


def device_key(device: str) -> Optional[str]:
    """Which GPU a TTS_DEVICE-style value lands on (auto and cuda mean cuda:0); None for the CPU."""
    d = device.strip().lower()
    if d == "cpu":
        return None
    return "cuda:0" if d in ("", "auto", "cuda") else d


def lay_out_memory(specs: list[ModelSpec], default_device: str, uses_device: dict[str, bool]) -> None:
    """Each model's fraction of the memory free when it loads (see the module's docstring)."""
    keyed = [(s, device_key(s.device or default_device)) for s in specs if uses_device.get(s.name)]
    on_gpu = [(s, key) for s, key in keyed if key is not None]  # a CPU model (key None) shares nothing
    remaining: dict[str, float] = {}
    for s, key in on_gpu:
        remaining[key] = remaining.get(key, 0.0) + s.memory_share
    for s, key in on_gpu:
        s.memory_fraction = s.memory_share / remaining[key]
        remaining[key] -= s.memory_share


class UnknownModel(LookupError):
    """A request named a model this worker does not serve."""


@dataclass
class ModelRuntime:
    """One served model: its entry, engine, inference thread and service layer."""
    spec: ModelSpec
    engine: "Engine"
    scheduler: "Scheduler"
    synthesis: "SynthesisService"

    @property
    def name(self) -> str:
        return self.spec.name


class ModelSet:
    """The worker's models by name, the default one, and what they do together (start, drain)."""

    def __init__(self, runtimes: list[ModelRuntime]):
        self.runtimes = {rt.name: rt for rt in runtimes}
        self.default = next(rt for rt in runtimes if rt.spec.default)

    def __iter__(self):
        return iter(self.runtimes.values())

    def __len__(self) -> int:
        return len(self.runtimes)

    def names(self) -> list[str]:
        return list(self.runtimes)

    def get(self, name: Optional[str]) -> ModelRuntime:
        """The model a request names; none, or an OpenAI model name, is the default one."""
        if name is None or name == "" or name in OPENAI_MODEL_NAMES:
            return self.default
        rt = self.runtimes.get(name)
        if rt is None:
            raise UnknownModel(f"unknown model '{name}'; this worker serves {', '.join(self.runtimes)} "
                               f"(GET /v1/models), and {', '.join(OPENAI_MODEL_NAMES)} mean '{self.default.name}'")
        return rt

    def start(self) -> None:
        for rt in self:
            rt.scheduler.start()

    # -- draining on SIGTERM (service/draining.py), for every model together ----------------------
    def drain(self) -> None:
        for rt in self:
            rt.scheduler.drain()

    def idle(self) -> bool:
        return all(rt.scheduler.idle() for rt in self)

    @property
    def draining(self) -> bool:
        return any(rt.scheduler.draining for rt in self)


def build_models(settings, metrics, voices, engine: Optional["Engine"] = None, lexicon=None,
                 usage=None) -> ModelSet:
    """Engines, schedulers and service layers for every model entry; `engine` replaces the default
    model's engine (tests' fake engines). Models load one after another, in the order listed. The
    lexicon and the usage counts are the deployment's, shared by every model (default: no lexicon, and
    usage counted with no quota)."""
    from .lexicon import EMPTY
    from .usage import Usage
    from .engines.registry import family_for
    from .scheduler import Scheduler
    from .synthesis import SynthesisService

    specs = settings.model_specs
    families = {s.name: family_for(s) for s in specs}
    lay_out_memory(specs, settings.tts_device, {n: f.needs_checkpoint for n, f in families.items()})
    usage, lexicon = usage or Usage(metrics), lexicon or EMPTY
    runtimes, previous = [], None
    for spec in specs:
        eng = engine if engine is not None and spec.default else families[spec.name].build(spec, settings)
        sched = Scheduler(eng, metrics.for_model(spec.name), settings.queue_size, settings.retry_after_s,
                          settings.warmup, spec.max_batch(settings), settings.batch_capacity, load_after=previous,
                          carry_s=settings.carry_seconds)
        previous = sched.loaded
        runtimes.append(ModelRuntime(spec, eng, sched, SynthesisService(settings, eng, sched, voices, usage,
                                                                                lexicon)))
        log.info("model %s: %s engine%s%s", spec.name, eng.name, f", {spec.dir}" if spec.dir else "",
                 f", {spec.memory_fraction:.0%} of the GPU memory free at its load" if spec.memory_fraction < 1
                 else "")
    return ModelSet(runtimes)

"""Fleet scenarios: a YAML file describing a heterogeneous fleet, validated with pydantic.

```yaml
name: fleet-small
rounds: 5
fraction_sampled: 0.75          # share of the available devices that train each round
classes:                        # device classes: name, count, profile, budget
  - {name: mcu, count: 4, profile: mcu-class, budget: {keep: 0.25}}
  - {name: rpi4, count: 4, profile: rpi4, budget: {latency_ms: 40}}
data:
  partition: {kind: voice}      # or {kind: dirichlet, alpha: 0.5}
availability: {offline_probability: 0.1}
events:
  - {round: 3, set_budget: {device_class: rpi4, keep: 0.4}}
  - {round: 4, crash: {count: 2}}
```

Profiles (``mcu-class``, ``rpi4``, ``jetson``, ``phone``, ``server``) come from
``device-classes.yaml`` next to the scenario (or ``profiles_file``). Every error names the field it
is about (``classes.1.budget: give exactly one budget: keep (...), latency_ms (...) or rtf (...)``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ldfleet.common.budget import budget_text, check_budget
from ldfleet.common.data.splits import split_counts
from ldfleet.common.topics import DEVICE_CLASS_PATTERN

DEFAULT_PROFILES_FILE = "device-classes.yaml"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Budget(_Strict):
    """A class budget: a keep fraction of the encoder layers, a latency target in ms per input, or a
    real-time factor (ms of compute per ms of audio), with an optional percentile for the targets
    (``ldfleet.common.budget``)."""

    keep: float | None = None
    latency_ms: float | None = None
    rtf: float | None = None
    percentile: float | None = None

    @model_validator(mode="after")
    def _one(self) -> Budget:
        check_budget(self.keep, self.latency_ms, self.rtf, self.percentile)
        return self

    def fields(self) -> dict[str, float | None]:
        """The budget as the keyword arguments of ``server.operator.set_budget``."""
        return {"keep": self.keep, "latency_ms": self.latency_ms, "rtf": self.rtf, "percentile": self.percentile}

    def text(self) -> str:
        return budget_text(**self.fields())


class DeviceClassSpec(_Strict):
    name: Annotated[str, Field(pattern=DEVICE_CLASS_PATTERN, max_length=40)]
    count: Annotated[int, Field(ge=1, le=10_000)]
    profile: str
    budget: Budget


class Profile(_Strict):
    """A compute profile: how a class of hardware compares with the reference machine."""

    description: str = ""
    cores: Annotated[int, Field(ge=1, le=4096)] = 1
    memory_mb: Annotated[int, Field(ge=16)] = 1024
    accelerator: str | None = None
    #: Latency multiplier relative to one core of the machine the warm model was profiled on.
    slowdown: Annotated[float, Field(gt=0.0, le=1e4)] = 1.0
    #: Relative spread of per-device speed within the class (0.1: +-10 %), drawn per device.
    jitter: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class CorpusSpec(_Strict):
    """The espeak-ng corpus (``ldfleet data synth``); speakers = voices x variants_per_voice."""

    voices: Annotated[int, Field(ge=1, le=8)] = 8
    variants_per_voice: Annotated[int, Field(ge=1, le=40)] = 5
    clips_per_word: Annotated[int, Field(ge=1, le=50)] = 3
    unknown_per_speaker: Annotated[int, Field(ge=0, le=100)] = 3
    silence_clips: Annotated[int, Field(ge=0, le=10_000)] = 120
    seed: int = 0


class AsrCorpusSpec(_Strict):
    """The espeak-ng phrase corpus of a ``task: asr`` scenario (``ldfleet data synth --task asr``):
    speakers = voices x variants_per_voice, each voice's speakers split train / validation / test."""

    #: The first ``voices`` English voices, then the foreign-accent ones (de, es, nl, it).
    voices: Annotated[int, Field(ge=1, le=12)] = 8
    variants_per_voice: Annotated[int, Field(ge=1, le=40)] = 5
    utterances_per_speaker: Annotated[int, Field(ge=1, le=1000)] = 12
    #: Background noise at a range of SNRs (off: clean speech; the channels still vary).
    noise: bool = True
    seed: int = 0


class Partition(_Strict):
    kind: Literal["voice", "dirichlet"] = "voice"
    alpha: Annotated[float, Field(gt=0.0, le=1e4)] = 0.5


class DataSpec(_Strict):
    #: ``synth`` (make or reuse an espeak-ng corpus) or a path to a Speech Commands-layout folder.
    source: str = "synth"
    corpus: CorpusSpec = CorpusSpec()
    #: ``task: asr`` only: the phrase corpus (made once and cached like the keyword corpus).
    asr_corpus: AsrCorpusSpec | None = None
    partition: Partition = Partition()
    #: Share of each device's clips kept back as its local test split (never trained on).
    local_test_share: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    split_seed: int = 0


class WarmSpec(_Strict):
    """The warm backbone, trained centrally on the pooled device training data (reused when present)."""

    backbone: str = "tiny"
    family: Literal["wavlm", "hubert", "wav2vec2"] = "wavlm"
    epochs: Annotated[int, Field(ge=0, le=1000)] = 4
    early_exit_epochs: Annotated[int, Field(ge=0, le=1000)] = 2
    static_epochs: Annotated[int, Field(ge=0, le=1000)] = 0
    #: Central selector epochs before federated training (0: the fleet trains it from scratch).
    selector_epochs: Annotated[int, Field(ge=0, le=1000)] = 0
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    seed: int = 0
    #: Backbone learning rate and LayerDrop rate of stage 1 (None: the task's default recipe,
    #: ``ldfleet.common.train.config_for``).
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    layerdrop: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None


class TrainingSpec(_Strict):
    local_epochs: Annotated[int, Field(ge=1, le=100)] = 2
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    selector_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 5e-3
    head_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 3e-3


class Availability(_Strict):
    #: Probability that a device is offline in a round (drawn per device and round).
    offline_probability: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    #: Probability that a device is a straggler in a round, and how late its reply counts as arriving
    #: (simulated: no wall time is spent); later than ``simulation.round_timeout_s`` = a missed round.
    straggler_probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    straggler_delay_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 0.0


class SetBudgetEvent(Budget):
    """An operator's budget change at a round: for a class, or one device's override."""

    device_class: str
    device: str | None = None  # one device's override instead of the class


class CrashEvent(_Strict):
    """Sampled devices that crash half-way through local training in that round."""

    count: Annotated[int, Field(ge=0, le=10_000)] = 0
    devices: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some(self) -> CrashEvent:
        if self.count == 0 and not self.devices:
            raise ValueError("a crash needs a count or a list of devices")
        return self


class Event(_Strict):
    round: Annotated[int, Field(ge=1)]
    set_budget: SetBudgetEvent | None = None
    crash: CrashEvent | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Event:
        if (self.set_budget is None) == (self.crash is None):
            raise ValueError("an event is exactly one of set_budget and crash")
        return self


class SimulationSpec(_Strict):
    #: Ray actors running ClientApps; ``0`` = one per CPU core.
    actors: Annotated[int, Field(ge=0, le=1024)] = 0
    round_timeout_s: Annotated[float, Field(gt=0.0)] = 300.0
    #: How long a round waits for devices still applying a new policy.
    settle_timeout_s: Annotated[float, Field(ge=0.0)] = 10.0
    #: torch threads of the orchestrating process (warm-up, caches, report); 0 = all cores when the
    #: machine is idle at start, else 1. ClientApps always use one thread.
    torch_threads: Annotated[int, Field(ge=0, le=1024)] = 0


class ServeSpec(_Strict):
    """Inference traffic of the simulated devices (``simulations/serving.py``): after every round each
    device runs ``requests_per_device`` of its own held-out clips through the on-device inference path
    (policy, governor, runtime) and publishes the inference telemetry. 0 (the default) serves nothing."""

    requests_per_device: Annotated[int, Field(ge=0, le=100_000)] = 0
    #: Per-request deadline in ms for the governor; None: the policy's latency target, if any.
    deadline_ms: Annotated[float, Field(gt=0.0)] | None = None


TASKS = ("kws", "asr")


class Scenario(_Strict):
    #: Also the default run folder ``runs/<name>``: a plain name, no path.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = "fleet"
    description: str = ""
    #: kws: keyword spotting (accuracy); asr: speech recognition with a CTC head (WER / CER).
    task: str = "kws"
    seed: int = 0
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 5
    fraction_sampled: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    fraction_evaluate: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    min_devices: Annotated[int, Field(ge=1)] = 1
    profiles_file: str | None = None
    classes: Annotated[list[DeviceClassSpec], Field(min_length=1)]
    data: DataSpec = DataSpec()
    warm: WarmSpec = WarmSpec()
    training: TrainingSpec = TrainingSpec()
    availability: Availability = Availability()
    events: list[Event] = Field(default_factory=list)
    simulation: SimulationSpec = SimulationSpec()
    serve: ServeSpec = ServeSpec()
    #: Keep ratios for the report's accuracy-vs-budget comparison on held-out speakers.
    report_keeps: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=lambda: [0.25, 0.375, 0.5, 0.75, 1.0])
    #: Filled in by ``load_scenario`` from ``profiles_file``: profile name -> profile.
    profiles: dict[str, Profile] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[DeviceClassSpec]) -> list[DeviceClassSpec]:
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device class names must be unique; repeated: {', '.join(dupes)}")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; choose kws (keyword spotting) or asr (speech recognition)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = {c.name for c in self.classes}
        if self.task == "asr":
            self._check_asr()
        elif self.data.asr_corpus is not None:
            raise ValueError("data.asr_corpus: only a task: asr scenario has a phrase corpus")
        self._check_events(names)
        if self.profiles:
            for i, c in enumerate(self.classes):
                if c.profile not in self.profiles:
                    raise ValueError(f"classes.{i}.profile: unknown profile {c.profile!r} "
                                     f"(known: {', '.join(sorted(self.profiles))})")
        if self.min_devices > self.num_devices:
            raise ValueError(f"min_devices ({self.min_devices}) exceeds the fleet size ({self.num_devices})")
        if self.data.partition.kind == "voice" and self.data.source == "synth" and self.task == "kws":
            speakers = self.data.corpus.voices * self.data.corpus.variants_per_voice
            if speakers < self.num_devices:
                raise ValueError(
                    f"data.partition: voice partitioning gives every device whole speakers, but the corpus has "
                    f"{speakers} speakers (voices x variants_per_voice) for {self.num_devices} devices; "
                    "use more variants or partition: {kind: dirichlet}"
                )
        return self

    def _check_events(self, names: set[str]) -> None:
        """Events name rounds, classes and devices of this fleet (ids ``<class>-<nn>``, ``device_ids``),
        so a mistake stops the run before its warm-up, not at the round of the event."""
        fleet = dict(self.device_ids())
        for i, ev in enumerate(self.events):
            if ev.round > self.rounds:
                raise ValueError(f"events.{i}: round {ev.round} is after the last round ({self.rounds})")
            budget, crash = ev.set_budget, ev.crash
            if budget is not None and budget.device_class not in names:
                raise ValueError(f"events.{i}.set_budget: unknown device class {budget.device_class!r} "
                                 f"(classes: {', '.join(sorted(names))})")
            if budget is not None and budget.device is not None and getattr(fleet.get(budget.device), "name", None) != budget.device_class:
                first = next(d for d, c in fleet.items() if c.name == budget.device_class)
                raise ValueError(f"events.{i}.set_budget: no device {budget.device!r} in class {budget.device_class!r} "
                                 f"(its devices are {first} and on)")
            if crash is not None and (unknown := sorted(set(crash.devices) - set(fleet))):
                raise ValueError(f"events.{i}.crash: unknown devices {unknown} (ids are <class>-<nn>, e.g. {next(iter(fleet))})")
            if crash is not None and crash.count > len(fleet):
                raise ValueError(f"events.{i}.crash: count {crash.count} exceeds the fleet size ({len(fleet)})")

    def _check_asr(self) -> None:
        """A speech-recognition fleet: whole speakers per device, enough training speakers."""
        if self.data.partition.kind != "voice":
            raise ValueError("data.partition: a task: asr fleet is partitioned by speaker ({kind: voice}); "
                             "a label skew (dirichlet) has no meaning for transcripts")
        if self.data.source == "synth":
            if self.data.asr_corpus is None:
                self.data.asr_corpus = AsrCorpusSpec()
            c = self.data.asr_corpus
            # the corpus splits each voice's speakers train / validation / test
            train_speakers = c.voices * split_counts(c.variants_per_voice)[0]
            if c.variants_per_voice < 3 or train_speakers < self.num_devices:
                raise ValueError(
                    f"data.asr_corpus: every device needs whole training speakers, but the corpus has about "
                    f"{train_speakers} (voices x variants_per_voice, less each voice's validation and test speakers) for "
                    f"{self.num_devices} devices; use more voices or variants (at least 3 per voice)")

    @property
    def metric(self) -> str:
        """The task's score in reports and progress: ``accuracy`` (kws, higher is better) or ``wer``
        (asr, lower is better)."""
        return "wer" if self.task == "asr" else "accuracy"

    @property
    def num_devices(self) -> int:
        return sum(c.count for c in self.classes)

    def device_ids(self) -> list[tuple[str, DeviceClassSpec]]:
        """Stable device ids: ``<class>-<nn>``."""
        out = []
        for c in self.classes:
            width = max(2, len(str(c.count)))
            out.extend((f"{c.name}-{i + 1:0{width}d}", c) for i in range(c.count))
        return out

    def fingerprint(self, *parts: str) -> str:
        """Hash of the named sections (e.g. "data", "warm"): cache keys for corpus and warm model."""
        # unset optional fields (None) are left out, so sections added later keep old cache keys valid
        blob = json.dumps({p: getattr(self, p).model_dump(mode="json", exclude_none=True) for p in parts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid scenario ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_profiles(path: str | Path) -> dict[str, Profile]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read device profiles: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("profiles"), dict):
        raise ScenarioError(f"{path}: expected a mapping with a 'profiles' section")
    out = {}
    for name, body in raw["profiles"].items():
        try:
            out[str(name)] = Profile.model_validate(body or {})
        except ValidationError as exc:
            raise ScenarioError(_format(exc, f"{path}: profiles.{name}")) from None
    return out


def parse_scenario(data: Any, source: str = "<scenario>", base_dir: str | Path | None = None,
                   profiles: dict[str, Profile] | None = None) -> Scenario:
    """Validate a scenario mapping; profiles from ``profiles`` or the scenario's ``profiles_file``."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a YAML mapping, got {type(data).__name__}")
    data = dict(data)
    if profiles is None:
        pfile = data.get("profiles_file") or DEFAULT_PROFILES_FILE
        if not isinstance(pfile, str):
            raise ScenarioError(f"{source}: invalid scenario (1 problem)\n  profiles_file: a file name, got {pfile!r}")
        candidates = [Path(base_dir or ".") / pfile, Path(__file__).resolve().parents[1] / "configs" / pfile]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ScenarioError(f"{source}: device profiles file {pfile!r} not found (looked in "
                                + ", ".join(str(c.parent) for c in candidates) + ")")
        profiles = load_profiles(found)
    data["profiles"] = {k: v.model_dump() for k, v in profiles.items()}
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_format(exc, source)) from None


def load_scenario(path: str | Path, **overrides: Any) -> Scenario:
    """Read and validate a scenario YAML; ``overrides`` replace top-level fields (e.g. rounds; events after
    an overridden last round are dropped)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"scenario {path} not found") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("rounds") is not None and isinstance(raw.get("events"), list):
            # a shorter run than the file plans: events after its last round do not happen
            raw["events"] = [e for e in raw["events"] if not (isinstance(e, dict) and isinstance(e.get("round"), int)
                                                             and e["round"] > overrides["rounds"])]
    return parse_scenario(raw, str(path), base_dir=path.parent)


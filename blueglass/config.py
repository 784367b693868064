"""The schema of ``params.yaml``: strict pydantic models, one section per stage plus shared sections.

Every stage validates the whole file before it does any work, so a typo anywhere is caught at once.
Errors become one line naming the key, e.g.::

    params.yaml: models.toy-detector.steps: Input should be greater than 0 (got -5)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from blueglass.errors import ConfigError

Precision = Literal["32-true", "bf16-mixed", "16-mixed", "64-true"]  # Lightning
Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", max_length=64)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- shared sections
class SplitSpec(Strict):
    images: int = Field(gt=0, le=1_000_000)
    min_objects: int = Field(1, ge=1, le=8)
    max_objects: int = Field(4, ge=1, le=8)

    @model_validator(mode="after")
    def _order(self) -> SplitSpec:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) exceeds max_objects ({self.max_objects})")
        return self


class DatasetParams(Strict):
    """The embedded toy world, written to ``<root>/<name>/<split>/``."""

    kind: Literal["toyworld"] = "toyworld"
    name: Slug = "toyworld"
    root: str = "data"
    seed: int = Field(0, ge=0)
    image_size: int = Field(64, ge=32, le=256)
    splits: dict[Slug, SplitSpec]

    @model_validator(mode="after")
    def _has_train(self) -> DatasetParams:
        if "train" not in self.splits or "val" not in self.splits:
            raise ValueError("splits must include 'train' and 'val'")
        return self

    @property
    def path(self) -> Path:
        return Path(self.root) / self.name


class CocoSplitSpec(Strict):
    """One split of a dataset on disk: a COCO folder (images + instances JSON) or an ImageFolder tree."""

    images: str = Field(description="folder of images (relative to the params file)")
    annotations: str | None = Field(
        None, description="COCO instances JSON (required unless layout is imagefolder)"
    )
    layout: Literal["coco", "imagefolder"] = "coco"
    categories: list[str] | None = Field(None, min_length=1, description="keep only these category names")
    mini: int | None = Field(None, gt=0, description="a seeded random sample of this many images")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _annotations(self) -> CocoSplitSpec:
        if self.layout == "coco" and not self.annotations:
            raise ValueError("a coco split needs 'annotations' (the instances JSON)")
        if self.layout == "imagefolder" and self.annotations:
            raise ValueError("an imagefolder split takes no 'annotations' (classes are the subfolders)")
        return self


class CocoDatasetParams(Strict):
    """A dataset already on disk (COCO format or ImageFolder); ``prepare`` only validates it."""

    kind: Literal["coco"]
    name: Slug
    splits: dict[Slug, CocoSplitSpec] = Field(min_length=1)


def _dataset_kind(v: Any) -> str:
    return v.get("kind", "toyworld") if isinstance(v, dict) else getattr(v, "kind", "toyworld")


AnyDatasetParams = Annotated[
    Annotated[DatasetParams, Tag("toyworld")] | Annotated[CocoDatasetParams, Tag("coco")],
    Discriminator(_dataset_kind),
]


class TrainParams(Strict):
    steps: int = Field(gt=0, le=1_000_000)
    batch_size: int = Field(64, gt=0, le=65_536)
    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.05, ge=0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    seed: int = Field(0, ge=0)


class VitParams(Strict):
    """A small ViT (``transformers.ViTConfig`` / ``CLIPVisionConfig``)."""

    patch_size: int = Field(8, ge=2, le=64)
    hidden_size: int = Field(128, ge=8, le=4096)
    layers: int = Field(4, ge=1, le=48)
    heads: int = Field(4, ge=1, le=64)
    mlp_dim: int = Field(256, ge=8, le=16384)

    @model_validator(mode="after")
    def _divisible(self) -> VitParams:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        return self


class DetectorModelParams(Strict):
    """The embedded detector: ``transformers.ViTModel`` + a per-patch detection head."""

    kind: Literal["toy-detector"]
    vit: VitParams = VitParams()
    train: TrainParams
    score_threshold: float = Field(0.01, ge=0, lt=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, gt=0, le=1000)


class TextParams(Strict):
    hidden_size: int = Field(128, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(4, ge=1, le=64)
    mlp_dim: int = Field(256, ge=8, le=16384)


class VlmModelParams(Strict):
    """The embedded vision-language model: a small ``transformers.CLIPModel`` trained on captions."""

    kind: Literal["toy-vlm"]
    vision: VitParams = VitParams()
    text: TextParams = TextParams()
    projection_dim: int = Field(128, ge=8, le=4096)
    train: TrainParams


class AdapterParams(Strict):
    """Settings of a real model's adapter (``blueglass.models.common.AdapterOptions``; docs/models.md)."""

    image_size: int | None = Field(
        None, ge=16, le=4096, description="square model input; default: the processor's"
    )
    fit: Literal["stretch", "letterbox"] | None = None
    score_threshold: float = Field(0.05, ge=0, lt=1)
    nms_iou: float | None = Field(None, gt=0, le=1)
    max_detections: int = Field(100, gt=0, le=10_000)
    prompt_template: str | None = Field(None, pattern=r"\{category\}")
    vocabulary: list[str] | None = Field(None, min_length=1)
    top_k: int = Field(1, ge=1, le=100)
    oov_threshold: float = Field(0.5, ge=-1, le=1)
    score_scaling: Literal["none", "similarity"] = "none"

    def adapter_options(self) -> dict[str, Any]:
        return self.model_dump(include=set(AdapterParams.model_fields))


class HFModelParams(AdapterParams):
    """A transformers ``save_pretrained`` folder on local disk (never downloaded)."""

    kind: Literal["hf"]
    path: str = Field(description="the model folder, relative to the params file")


class TorchvisionModelParams(AdapterParams):
    """A torchvision model built by ``arch`` with a local state dict (never downloaded)."""

    kind: Literal["torchvision"]
    arch: str
    weights: str = Field(description="state dict file (.safetensors / .pth), relative to the params file")
    classes: list[str] | None = Field(None, min_length=1, description="default: torchvision's list for arch")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)


ModelParams = Annotated[
    DetectorModelParams | VlmModelParams | HFModelParams | TorchvisionModelParams, Field(discriminator="kind")
]
MODEL_KINDS = ("toy-detector", "toy-vlm", "hf", "torchvision")
TRAINABLE_KINDS = ("toy-detector", "toy-vlm")


class RuntimeParams(Strict):
    threads: int = Field(0, ge=0, le=512, description="torch CPU threads; 0 = min(2, free cores)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class WandbParams(Strict):
    enabled: bool = False
    project: str = "blueglass"
    entity: str | None = None


class TrackingParams(Strict):
    experiment: Slug = "blueglass"
    wandb: WandbParams = WandbParams()


# ---------------------------------------------------------------- stage sections
class BenchmarkRun(Strict):
    model: Slug
    split: Slug


class BenchmarkParams(Strict):
    runs: list[BenchmarkRun] = Field(min_length=1)
    batch_size: int = Field(64, gt=0, le=4096)
    # Zero-shot prompt families: name → template; fields are concept names (toy world) or {category}.
    prompts: dict[Slug, str] = Field(
        default_factory=lambda: {
            "color": "a photo of a {color} object",
            "shape": "a photo of a {shape}",
            "color_shape": "a photo of a {color} {shape}",
        }
    )


class LensSpec(Strict):
    """One Lens: a model × a dataset split × hook points (module paths, globs, aliases, ``…:input``)."""

    model: Slug
    split: Slug
    points: list[str] = Field(min_length=1)
    control: bool = Field(False, description="record a randomly initialised copy of the model instead")
    control_seed: int = Field(0, ge=0)


class ExtractParams(Strict):
    batch_size: int = Field(64, gt=0, le=4096)
    block_images: int = Field(64, gt=0, le=100_000, description="images per tar sample")
    blocks_per_shard: int = Field(8, gt=0, le=100_000)
    dtype: Literal["float16", "float32"] = "float16"
    iou_threshold: float = Field(0.5, gt=0, le=1, description="IoU for the true-positive flag")
    lenses: dict[Slug, LensSpec] = Field(min_length=1)


class ProbeRun(Strict):
    """Linear probes on every point of a Lens, next to the same probes on its random-init control Lens."""

    lens: Slug
    control: Slug | None = None
    targets: list[str] = Field(
        default_factory=lambda: [
            "color",
            "shape",
            "size",
            "cover_class",
            "gt_class",
            "pred_class",
            "tp",
            "pred_box",
        ]
    )
    register_points: list[str] = Field(default_factory=list, description="points whose probes are registered")
    register_targets: list[str] = Field(default_factory=list)


class ProbeParams(Strict):
    l2: float = Field(1e-3, ge=0, le=10)
    learned_margin: float = Field(
        0.05, ge=0, le=1, description="trained − control needed to call a concept learned"
    )
    epochs: int = Field(15, gt=0, le=100_000, description="passes over the Lens (Lightning, streamed)")
    min_steps: int = Field(100, ge=1, description="at least this many steps, whatever the epochs")
    batch_size: int = Field(4096, gt=0, le=1_000_000)
    lr: float = Field(0.05, gt=0, le=10)
    seed: int = Field(0, ge=0)
    precision: Precision = "32-true"
    devices: int = Field(1, ge=1, le=64)
    runs: dict[Slug, ProbeRun] = Field(min_length=1)


SAE_MEMBER_KEYS = ("variant", "expansion", "k", "l1_coeff", "l0_coeff", "aux_k", "dead_tokens", "lr")


class SaeRun(Strict):
    """SAEs on one Lens point. Without ``sweep``: one SAE from these settings. With ``sweep``: one SAE per
    entry (these settings overridden by the entry's), all trained from the same pass over the data."""

    lens: Slug
    point: str
    variant: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = "topk"
    expansion: int = Field(8, ge=1, le=1024)
    k: int = Field(32, ge=1)
    l1_coeff: float = Field(5.0, ge=0)
    l0_coeff: float = Field(0.1, ge=0)
    aux_k: int = Field(256, ge=0)
    dead_tokens: int = Field(100_000, ge=1)
    steps: int = Field(300, gt=0, le=10_000_000)
    batch_size: int = Field(4096, gt=0, le=1_000_000)
    lr: float | None = Field(None, gt=0, le=1)
    seed: int = Field(0, ge=0)
    precision: Precision = "32-true"
    devices: int = Field(1, ge=1, le=64)
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable checkpoints")
    sweep: dict[Slug, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sweep_members(self) -> SaeRun:
        for member, over in self.sweep.items():
            bad = sorted(set(over) - set(SAE_MEMBER_KEYS))
            if bad:
                raise ValueError(
                    f"sweep.{member}: {bad[0]!r} cannot vary within a sweep (per-SAE keys: {', '.join(SAE_MEMBER_KEYS)})"
                )
            try:
                SaeRun.model_validate({**self.model_dump(exclude={"sweep"}), **over})
            except ValidationError as exc:
                raise ValueError(f"sweep.{member}.{_format_error(exc.errors()[0])}") from None
        return self

    def members(self) -> dict[str, SaeRun]:
        """Member name → its full settings (the variant's name when there is no sweep)."""
        if not self.sweep:
            return {self.variant: self}
        base = self.model_dump(exclude={"sweep"})
        return {m: SaeRun.model_validate({**base, **over}) for m, over in self.sweep.items()}


class SaeParams(Strict):
    runs: dict[Slug, SaeRun] = Field(min_length=1)


class InterventionSpec(Strict):
    """One intervention of a patch run. ``sae`` names ``<sae run>/<member>`` (its point is the SAE's);
    ``probe`` names ``<probe run>/<point>/<target>``."""

    kind: Literal["sae", "sae_error", "steer", "clamp"]
    sae: str | None = Field(None, pattern=r"^[^/]+/[^/]+$")
    probe: str | None = Field(None, pattern=r"^[^/]+/[^/]+/[^/]+$")
    target_class: str | None = Field(
        None, description="steer: the probe class (value name or id) to steer to"
    )
    alpha: float = 4.0
    latents: list[int] = Field(default_factory=list, description="clamp: latent ids")
    concept: str | None = Field(
        None, pattern=r"^[A-Za-z_]+=.+$", description="clamp: 'color=red' → the SAE latents that separate it"
    )
    min_auroc: float = Field(0.7, ge=0.5, le=1)
    value: float = 0.0
    tokens: str = "all"

    @model_validator(mode="after")
    def _needs(self) -> InterventionSpec:
        if self.kind in ("sae", "sae_error", "clamp") and not self.sae:
            raise ValueError(f"kind '{self.kind}' needs 'sae: <sae run>/<member>'")
        if self.kind == "steer" and not self.probe:
            raise ValueError("kind 'steer' needs 'probe: <probe run>/<point>/<target>'")
        if self.kind == "clamp" and not (self.latents or self.concept):
            raise ValueError("kind 'clamp' needs 'latents: [...]' or 'concept: <concept>=<value>'")
        return self


class PatchRun(Strict):
    model: Slug
    split: str
    lens: Slug = Field(description="the Lens whose per-dimension means the mean ablation uses")
    metric: str = Field("AP50", description="task metric for 'recovered' (AP, AP50, …, accuracy)")
    interventions: dict[Slug, InterventionSpec] = Field(min_length=1)


class PatchParams(Strict):
    batch_size: int = Field(64, gt=0, le=4096)
    runs: dict[Slug, PatchRun] = Field(min_length=1)


class Params(Strict):
    dataset: AnyDatasetParams
    models: dict[Slug, ModelParams] = Field(min_length=1)
    runtime: RuntimeParams = RuntimeParams()
    tracking: TrackingParams = TrackingParams()
    benchmark: BenchmarkParams
    extract: ExtractParams | None = None
    probe: ProbeParams | None = None
    sae: SaeParams | None = None
    patch: PatchParams | None = None

    @model_validator(mode="after")
    def _references(self) -> Params:
        """Benchmark runs and Lenses must name a configured model and split."""
        refs = [(f"benchmark.runs.{i}", r.model, r.split) for i, r in enumerate(self.benchmark.runs)]
        refs += [
            (f"extract.lenses.{n}", s.model, s.split)
            for n, s in (self.extract.lenses if self.extract else {}).items()
        ]
        lenses = set(self.extract.lenses) if self.extract else set()
        lens_refs = [
            (f"probe.runs.{n}.lens", r.lens) for n, r in (self.probe.runs if self.probe else {}).items()
        ]
        lens_refs += [
            (f"probe.runs.{n}.control", r.control)
            for n, r in (self.probe.runs if self.probe else {}).items()
            if r.control
        ]
        lens_refs += [(f"sae.runs.{n}.lens", r.lens) for n, r in (self.sae.runs if self.sae else {}).items()]
        patch_runs = self.patch.runs if self.patch else {}
        lens_refs += [(f"patch.runs.{n}.lens", r.lens) for n, r in patch_runs.items()]
        refs += [(f"patch.runs.{n}", r.model, r.split) for n, r in patch_runs.items()]
        saes = self.sae.runs if self.sae else {}
        probes = self.probe.runs if self.probe else {}
        for n, r in patch_runs.items():
            for i, iv in r.interventions.items():
                where = f"patch.runs.{n}.interventions.{i}"
                if iv.sae:
                    run, member = iv.sae.split("/")
                    if run not in saes or member not in saes[run].members():
                        known = [f"{k}/{m}" for k, v in saes.items() for m in v.members()]
                        raise ValueError(
                            f"{where}.sae: unknown SAE '{iv.sae}' (SAEs: {', '.join(known) or 'none'})"
                        )
                if iv.probe and iv.probe.split("/")[0] not in probes:
                    raise ValueError(
                        f"{where}.probe: unknown probe run '{iv.probe.split('/')[0]}' (probe.runs: {', '.join(probes) or 'none'})"
                    )
        for where, lens in lens_refs:
            if lens not in lenses:
                raise ValueError(
                    f"{where}: unknown Lens '{lens}' (extract.lenses: {', '.join(sorted(lenses)) or 'none'})"
                )
        for where, model, split in refs:
            if model not in self.models:
                raise ValueError(f"{where}.model: unknown model '{model}' (models: {', '.join(self.models)})")
            if split not in self.dataset.splits:
                raise ValueError(
                    f"{where}.split: unknown split '{split}' (splits: {', '.join(self.dataset.splits)})"
                )
        return self


# ---------------------------------------------------------------- loading
def _format_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    # A tagged union puts the tag into the location (models.<name>.<kind>.key): drop it.
    if len(loc) > 2 and loc[0] == "models" and loc[2] in MODEL_KINDS:
        del loc[2]
    if len(loc) > 1 and loc[0] == "dataset" and loc[1] in ("toyworld", "coco"):
        del loc[1]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], dict | list):
        msg = f"{msg} (got {err['input']!r})"
    key = ".".join(loc)
    return f"{key}: {msg}" if key else msg


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises :class:`ConfigError` with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{path}: {first}{more}") from None


def resolve_threads(requested: int) -> int:
    """``0`` means min(2, cores not already busy), at least 1."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:  # a short sample of current use; the load average lags by a minute and misleads here
        import psutil

        busy = int(psutil.cpu_percent(interval=0.25) / 100.0 * cores + 0.3)
    except Exception:  # psutil missing or unsupported platform
        busy = 0
    return max(1, min(2, cores - busy))

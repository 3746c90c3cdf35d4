"""What a training-data build is: `TrainingDataSpec` and its `TrainingFilters`, each parameter
declared once, with its description.

    spec = TrainingDataSpec(input="s3://audio/labels", output="s3://audio/train-v1",
                            filters=TrainingFilters(min_duration_s=1.0,
                                                    min_confidence={"emotion": 0.5}),
                            validation_fraction=0.05, formats=["webdataset", "hf"])

`input` is what is read (a labelled output), `output` where the shards are written; the
Parquet shards are always written, `formats` names the exports written besides them. The
console's options and the `prepare-training-data` flow's parameters are these fields; the
storage configurations' credentials are never part of a dump, so Prefect never stores them.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.signals import SIGNAL_COLUMNS as SIGNALS
from pipelines.storage import OutputLayout, StorageConfig, StorageOptions


ExportFormat = Literal["webdataset", "lhotse", "hf"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
AUDIO_FORMATS = frozenset({"lhotse", "hf"})  # the exports that hold each segment's audio


class TrainingFilters(BaseModel):
    """Which segments are kept (`pipelines.training_data.selection`). The quality-signal
    filters (`min_speech_ratio`, `min_avg_logprob`, `max_compression_ratio`) are off unless
    set; set, they need an input whose segments have the signal's column (refused otherwise),
    and a segment whose value is null is dropped under a reason of its own (`no_<signal>`)."""

    model_config = ConfigDict(extra="forbid")

    drop_truncated: bool = Field(
        True, description="drop segments whose transcript hit the token budget")
    drop_looped: bool = Field(
        True, description="drop segments whose transcript ended in a repetition loop")
    min_duration_s: float = Field(0.0, ge=0, description="drop shorter segments (seconds)")
    max_duration_s: float | None = Field(
        None, gt=0, description="drop longer segments (seconds); none: no maximum")
    min_confidence: dict[str, float] = Field(
        default_factory=dict, description="closed-set task -> minimum top probability, e.g. "
                                          '{"emotion": 0.5}')
    require_transcript: bool = Field(
        False, description="drop segments whose transcript is null or blank")
    min_speech_ratio: float | None = Field(
        None, ge=0.0, le=1.0,
        description=f"drop segments with a smaller share of speech ({SIGNALS['speech_ratio']}, "
                    "0-1), e.g. 0.5")
    min_avg_logprob: float | None = Field(
        None, le=0.0, allow_inf_nan=False,
        description="drop segments whose transcript's mean token log-probability "
                    f"({SIGNALS['avg_logprob']}, <= 0) is lower, e.g. -1.0")
    max_compression_ratio: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="drop segments whose transcript's gzip compression ratio "
                    f"({SIGNALS['compression_ratio']}) is higher (repetition), e.g. 2.4")

    @model_validator(mode="after")
    def _check(self) -> TrainingFilters:
        if self.max_duration_s is not None and self.max_duration_s < self.min_duration_s:
            raise ValueError(f"max_duration_s {self.max_duration_s} < min_duration_s "
                             f"{self.min_duration_s}")
        for name, value in self.min_confidence.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"min_confidence[{name!r}] = {value} is not in [0, 1]")
        return self


# filters that are also console options of their own (`--min-avg-logprob`, ...), derived from
# these fields (`flows.console.options.add_nested_options`); given both ways, one is refused
FILTER_OPTIONS = ("min_avg_logprob", "max_compression_ratio", "min_speech_ratio")


class TrainingDataSpec(BaseModel):
    """Train/validation shards from a labelled output made with semantic tokens."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="a labelled output made with --semantic-tokens: the URI "
                                   "holding files/ and segments/")
    output: str = Field(description="where train/, validation/, the exports (webdataset/, "
                                    "lhotse/, hf/) and manifest.json go")
    filters: TrainingFilters = Field(
        default_factory=TrainingFilters,
        description='JSON, e.g. {"min_duration_s": 1.0, "min_confidence": {"emotion": 0.5}, '
                    '"drop_truncated": false}; fields: '
                    f"{', '.join(TrainingFilters.model_fields)}")
    validation_fraction: float = Field(
        0.05, ge=0.0, le=1.0, allow_inf_nan=False,
        description="share of the input's files (whole files) in validation/")
    split_salt: str = Field("", description="another salt gives another (still deterministic) "
                                            "split")
    rows_per_shard: int = Field(10_000, ge=1, description="segments per shard at most")
    formats: list[ExportFormat] = Field(
        default_factory=lambda: list(EXPORT_FORMATS),
        description="exports besides the Parquet shards: webdataset (tars of <key>.json + "
                    "<key>.tokens.npy), lhotse (recordings/supervisions manifests + a 16 kHz "
                    "FLAC per segment), hf (Parquet with an Audio column, for HF datasets); "
                    "lhotse and hf read the source audio again; empty: Parquet shards only")
    overwrite: bool = Field(False, description="replace a build the output already holds")
    storage_options: StorageOptions  # the input's, and the output's unless it has its own
    output_storage_options: StorageConfig | None = Field(
        None, description="JSON like storage_options, for the output when it is on another "
                          "store; none: storage_options")

    @field_validator("formats", mode="before")
    @classmethod
    def _known_formats(cls, formats):
        """One line naming an unknown format; each format once, in the given order."""
        if not isinstance(formats, (list, tuple)):
            return formats
        unknown = [f for f in formats if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(f"unknown format {unknown[0]!r}; the formats are "
                             f"{', '.join(EXPORT_FORMATS)}")
        return list(dict.fromkeys(formats))

    @model_validator(mode="after")
    def _distinct(self) -> TrainingDataSpec:
        source, tables = self.input.rstrip("/"), OutputLayout(self.input)
        output = self.output.rstrip("/")
        if output == source or any(output == t or output.startswith(f"{t}/")
                                   for t in (tables.files, tables.segments)):
            raise ValueError("output must differ from the input (a labelled output) and lie "
                             "outside its files/ and segments/")
        return self

    def output_storage(self) -> StorageConfig:
        """The storage configuration of the output side."""
        return self.output_storage_options if self.output_storage_options is not None \
            else self.storage_options

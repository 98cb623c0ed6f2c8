"""The run configuration's schema: every key a config file may hold, its type, default and meaning.

Loading a file, applying overrides and turning validation errors into located messages is
``aligner.config.loading``'s job; where each key was written is ``aligner.config.origin``'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    TypeAdapter,
    field_validator,
    model_validator,
)

from aligner.config.origin import ConfigOrigin, format_loc


class Strict(BaseModel):
    """Config section that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid")


class PluginChoice(BaseModel):
    """A plugin picked by ``name``; every other key is an option validated by the plugin's ``Options``."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        """The keys other than ``name`` (and ``weight`` for losses)."""
        return dict(self.model_extra or {})


class LossChoice(PluginChoice):
    """A loss in a stage, with its weight in the total loss."""

    weight: float = 1.0


class TinyModelConfig(Strict):
    """A small Llama-style model built from this spec, with no download."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = None
    intermediate_size: int = Field(172, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    vocab_size: int | None = Field(None, description="defaults to the tokenizer's size")


class ModelConfig(Strict):
    """Which model to train: a local directory or hub id (``path``), or a built-in ``tiny`` spec."""

    path: str | None = None
    tiny: TinyModelConfig | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "the weights' dtype; auto: bfloat16 on a CUDA GPU that supports it, float32 otherwise (CPU)"))
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="the attention kernel; default: transformers' choice for the model (sdpa where it "
        "has it). flash_attention_2 needs a CUDA GPU, the flash-attn package and bfloat16/float16 weights")
    packed_attention: Literal["auto", "segments", "mask"] = Field("auto", description=(
        "how sdpa/eager attention runs over packed rows (data.packing, shared prompts): segments: one "
        "attention call per sequence, no mask; mask: one call with a block mask; auto: segments on CPU, "
        "mask elsewhere"))

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of 'path' (a directory or hub id) and 'tiny' (a built-in spec)")
        return self


SourceFormat = Literal["sft", "preference", "unpaired", "prompt", "alpaca", "sharegpt", "openai", "hh-rlhf",
                       "ultrafeedback"]


class SourceConfig(Strict):
    """One data source: a local file or folder, or a hub dataset id, with how to read its rows.

    ``weight``/``fraction`` only mean something in a list of sources (a mixture; ``fraction`` also
    subsamples a single source); ``aligner.data.sources.mixture_counts`` says how they become rows.
    """

    path: str = Field(description="a local file, a save_to_disk or dataset repo folder, or a hub dataset id")
    split: str | None = Field(None, description="default: the data section's 'split'")
    subset: str | None = Field(None, validation_alias=AliasChoices("subset", "name"),
                               description="the dataset's configuration (datasets' 'name')")
    revision: str | None = Field(None, description="hub datasets: a branch, tag or commit")
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    format: SourceFormat | None = Field(None, description="a row format or a converter; default: detected")
    columns: dict[str, str] = Field(default_factory=dict, description="{aligner name: source column}")
    weight: float | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0)
    streaming: bool = Field(False, description=(
        "hub ids and dataset repo folders: read rows as they arrive (datasets' streaming), nothing written "
        "to the datasets cache; with max_rows only those rows are fetched. Local files are always streamed"))
    # Set by ``load_config``: the config key of this source and where it was written (for errors),
    # and the run's seed (mixtures are drawn with it).
    _key: tuple = PrivateAttr(default=())
    _where: Any = PrivateAttr(default=None)
    _seed: int = PrivateAttr(default=0)
    # An in-memory ``datasets.Dataset``/``DatasetDict`` handed to the Python API in place of a path.
    _dataset: Any = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _in_memory(cls, value: Any, handler: Any) -> Any:
        """Take a ``datasets`` object where a path goes (``train: ds`` or ``{path: ds, weight: 2}``):
        the source keeps the object and is named by a label in messages and the written config."""
        if _is_dataset(value):
            value = {"path": value}
        if not (isinstance(value, dict) and _is_dataset(value.get("path"))):
            return handler(value)
        dataset = value["path"]
        dataset = dataset.dataset if isinstance(dataset, _Held) else dataset
        rows = (f"{len(dataset)} rows" if not hasattr(dataset, "keys")
                else ", ".join(f"{name}: {len(part)} rows" for name, part in dataset.items()))
        source = handler({**value, "path": f"<in-memory {type(dataset).__name__} ({rows})>"})
        source._dataset = dataset
        return source

    @property
    def dataset(self) -> Any:
        """The in-memory ``datasets`` object this source reads, or ``None`` for a path or hub id."""
        return self._dataset

    @field_validator("columns")
    @classmethod
    def _named_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        for target, column in columns.items():
            if not target.strip() or not column.strip():
                raise ValueError(f"column names must not be empty (got {target!r}: {column!r})")
        return columns

    @property
    def mixture_seed(self) -> int:
        """The seed a mixture this source opens is drawn with (the run's)."""
        return self._seed

    def key_text(self, *sub: str) -> str:
        """``'stages[0].data.train[1].columns.prompt' (file, line N)``: the key to fix for an error."""
        loc = (*self._key, *sub)
        if not self._key:
            return f"'{self.path}'" + (f" ({'.'.join(sub)})" if sub else "")
        where = self._where(loc) if self._where is not None else ""
        return f"'{format_loc(loc)}'{where}"

    def locate(self, key: tuple, where: Any, seed: int) -> None:
        """Tell the source its config key, how to say where a key was written (``ConfigOrigin.where``)
        and the run's seed; ``load_config`` calls it once paths are resolved."""
        self._key, self._where, self._seed = key, where, seed

    def __str__(self) -> str:
        extras = [f"{k} {v}" for k, v in (("subset", self.subset), ("split", self.split)) if v]
        return self.path + (f" ({', '.join(extras)})" if extras else "")


class _Held:
    """An in-memory dataset inside a Python dump of the config: pydantic passes unknown objects through
    unchanged, where it would turn a ``DatasetDict`` (a dict) into a plain dict."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __deepcopy__(self, memo: dict) -> _Held:
        return self  # the dataset's Arrow tables are immutable: sharing them is what a copy means


def _is_dataset(value: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict``, recognised without importing ``datasets`` for every config."""
    return isinstance(value, _Held) or (type(value).__name__ in ("Dataset", "DatasetDict")
                                        and type(value).__module__.startswith("datasets"))


def _source_value(value: Any) -> Any:
    """A source is a string (a path or hub id), a mapping (one source) or a list of mappings (a mixture).

    Dispatched by hand rather than by a pydantic union so that an error inside a source is reported at
    its own key (``train[1].columns``) instead of once per union member."""
    if isinstance(value, SourceConfig | str):
        return value
    if isinstance(value, dict) or _is_dataset(value):
        return SourceConfig.model_validate(value)
    if isinstance(value, list):
        if not value:
            raise ValueError("a list of sources must not be empty")
        sources = _SOURCE_LIST.validate_python(value)
        weighted = [s.weight is not None for s in sources]
        fractioned = [s.fraction is not None for s in sources]
        if any(weighted) and any(fractioned):
            raise ValueError("give every source of a mixture a 'weight' (shares of the mixture) or a 'fraction' "
                             "(of its own rows), not a mix of both")
        if any(weighted) and not all(weighted):
            missing = [i for i, w in enumerate(weighted) if not w]
            raise ValueError(f"sources {missing} have no 'weight' while others do; give every source one")
        return sources
    raise ValueError("must be a path or hub id, a source mapping {path: ...} or a list of them (a mixture)")


def _dump_source(value: Any, info: Any) -> Any:
    if isinstance(value, SourceConfig):
        dumped = value.model_dump(exclude_none=True, exclude_defaults=True)
        # A Python dump (re-validated for overrides) keeps an in-memory dataset; a JSON/YAML one
        # (the run's config.yaml) can only name it.
        if value.dataset is not None and info.mode == "python":
            dumped["path"] = _Held(value.dataset)
        return dumped
    if isinstance(value, list):
        return [_dump_source(v, info) for v in value]
    return value


Source = Annotated[str | SourceConfig | list[SourceConfig], PlainValidator(_source_value),
                   PlainSerializer(_dump_source)]


_SOURCE_LIST = TypeAdapter(list[SourceConfig])


class DataConfig(Strict):
    """Where a stage's rows come from and how they become tokens."""

    train: Source
    eval: Source | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held-out split when no eval file")
    split: str = "train"
    format: Literal["sft", "preference", "unpaired", "prompt"] | None = None
    template: str = "auto"
    max_length: int = Field(512, gt=1)
    max_prompt_length: int = Field(256, gt=0)
    max_rows: int | None = Field(None, gt=0)
    max_drop_fraction: float = Field(0.1, ge=0.0, le=1.0, description=(
        "stop before training when a larger share of a split's rows would be dropped (empty, "
        "identical pair, emptied by truncation)"))
    packing: bool | int = Field(False, description=(
        "sft stages: run each micro-batch's rows concatenated into as few rows as fit (position ids restart per "
        "sequence, no attention across sequences); true: rows as wide as the batch's longest sequence, N: rows of "
        "N tokens (a longer sequence gets its own row); flash_attention_2: one row, varlen"))

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_width(cls, value: Any) -> Any:
        # bool is an int in Python: without this, 'packing: 1' would silently mean 'true'.
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError("give true, false or a packed-row width in tokens (at least 2)")
        return value


class TrainConfig(Strict):
    """Optimisation settings of a stage."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    group_by_length: bool = True
    # Preference pairs: run each pair's prompt once for its chosen and rejected completions.
    share_prompt: bool = True
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    max_nonfinite_steps: int = Field(3, gt=0, description=(
        "stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute each decoder layer's activations in the backward pass instead of keeping them: less memory "
        "(grows with layers x sequence length), about a third more compute; non-reentrant, works with LoRA"))
    activation_offload: bool = Field(False, description=(
        "with gradient_checkpointing: keep the checkpointed layers' inputs in pinned CPU memory instead of on "
        "the GPU (less GPU memory at long context, a copy each way per layer); nothing to move on a CPU run"))

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> TrainConfig:
        if self.activation_offload and not self.gradient_checkpointing:
            raise ValueError("'activation_offload' offloads what gradient checkpointing keeps: set "
                             "'gradient_checkpointing: true' too")
        return self


class GenerationEvalConfig(Strict):
    """Sample completions for held-out prompts and score them with a judge (the behaviour score) or with
    weighted reward sources (e.g. a verifier against the rows' ``answer``: held-out accuracy)."""

    judge: PluginChoice | None = None
    rewards: list[dict[str, Any]] | None = Field(None, description=(
        "reward sources as in an online algorithm's 'rewards': [{function: ..., weight: ...}, {judge: {...}}]"))

    @model_validator(mode="after")
    def _one_kind_of_scorer(self) -> GenerationEvalConfig:
        if (self.judge is None) == (self.rewards is None):
            raise ValueError("set exactly one of 'judge' and 'rewards'")
        return self
    num_prompts: int = Field(64, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, gt=0)


class EvalConfig(Strict):
    """Held-out evaluation of a stage: losses and metrics on the eval rows, and optional generation."""

    batch_size: int = Field(16, gt=0)
    at_start: bool = True
    generate: GenerationEvalConfig | None = None


class StageConfig(Strict):
    """One stage of a run: data, algorithm, losses, reference policy, PEFT backend and training settings."""

    name: str
    data: DataConfig
    algorithm: PluginChoice = Field(default_factory=lambda: PluginChoice(name="offline"), description=(
        "how the stage trains: offline (the weighted losses, default), ppo, grpo, rloo, reinforce_pp, online_dpo"))
    losses: list[LossChoice] = Field(default_factory=list, description="the losses of the offline algorithm "
                                     "(and the preference loss of online_dpo)")
    reference: PluginChoice = PluginChoice(name="auto")
    peft: PluginChoice = PluginChoice(name="full")
    optimizer: PluginChoice = Field(default_factory=lambda: PluginChoice(name="adamw"), description=(
        "how the trainable weights are updated: adamw (default), adamw_8bit, lora_plus, lora_fa; the learning "
        "rate and weight decay come from 'train'"))
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


class WandbConfig(Strict):
    """Weights & Biases tracking (on when this section is present)."""

    project: str = "aligner"
    entity: str | None = None
    name: str | None = Field(None, description="default: the output directory's name")
    group: str | None = None
    tags: list[str] = []
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online with an API key, offline without (never waits for a login)")


class TensorBoardConfig(Strict):
    """TensorBoard tracking through accelerate's tracker integration (on when this section is present)."""

    log_dir: str | None = Field(None, description="default: RUN_DIR/tensorboard")
    name: str | None = Field(None, description="the run's folder under log_dir; default: the output directory's name")

    @model_validator(mode="after")
    def _writer_installed(self) -> TensorBoardConfig:
        # Refused here rather than after the model loads: the writer is only imported at the first stage.
        # accelerate's tracker writes with torch.utils.tensorboard (needs the tensorboard package) or tensorboardX.
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("TensorBoard logging needs the tensorboard package, which is not installed: "
                             "pip install tensorboard")
        return self


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a valid model repository id (``name`` or ``namespace/name``), or ``None``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return f"not a valid Hub repository id: {str(exc).splitlines()[0]}"
    return None


class HubConfig(Strict):
    """Push the final model to the Hugging Face Hub after the run. The token comes from the environment
    (``HF_TOKEN``) or huggingface_hub's login, never from the config."""

    push: bool = Field(False, description="push the last stage's final model when the run ends")
    repo_id: str | None = Field(None, description="'name' or 'namespace/name' of the model repository")
    private: bool = Field(True, description="create the repository private (an existing one keeps its visibility)")
    revision: str | None = Field(None, description="branch to push to (created if missing); default: main")
    commit_message: str | None = Field(None, description="default: 'aligner: <output directory name>'")
    dry_run: bool = Field(False, description="write RUN_DIR/push-dry-run/ (files and card) instead of uploading")

    @model_validator(mode="after")
    def _push_needs_a_valid_repo(self) -> HubConfig:
        if self.dry_run and not self.push:
            raise ValueError("'dry_run' only applies with 'push: true'")
        if self.push and not self.repo_id:
            raise ValueError("'push: true' needs 'repo_id' ('name' or 'namespace/name')")
        if self.repo_id is not None:
            problem = repo_id_problem(self.repo_id)
            if problem:
                raise ValueError(problem)
        return self


class RunConfig(Strict):
    """A whole run: one model trained through one or more stages (e.g. SFT then DPO)."""

    output_dir: str = "runs/default"
    resume: bool | Literal["auto"] = Field(
        False, description="continue from the last complete checkpoint; 'auto': only if there is one")
    seed: int = 0
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    threads: int | Literal["auto"] = Field("auto", description=(
        "torch's CPU threads per process; auto: $OMP_NUM_THREADS if set, else the cores this process may use "
        "(at most 8), 1 per process when several run (see aligner.training.threads)"))
    model: ModelConfig
    tokenizer: str | None = Field(None, description="'builtin', a directory or hub id; default: the model's")
    wandb: WandbConfig | None = None
    tensorboard: TensorBoardConfig | None = None
    hub: HubConfig | None = None
    callbacks: list[PluginChoice] = Field(
        default_factory=list, description="lifecycle plugins to switch on for the run: [{name: ..., <options>}]")
    stages: list[StageConfig] = Field(min_length=1)
    # Where each key was written (set by ``load_config``; empty for a config built in Python).
    _origin: ConfigOrigin | None = PrivateAttr(default=None)

    @property
    def origin(self) -> ConfigOrigin:
        """Where each key of this config was written, for errors that point at a file and line."""
        return self._origin if self._origin is not None else ConfigOrigin(None, None)

    def remember_origin(self, origin: ConfigOrigin) -> None:
        """Keep where each key was written (``load_config`` calls it)."""
        self._origin = origin

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_positive_or_auto(cls, value: Any) -> Any:
        # One message instead of pydantic's one-per-union-member.
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("expected a positive number of threads or 'auto'")
        return value

    @model_validator(mode="after")
    def _unique_stage_names(self) -> RunConfig:
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error reporting
# ---------------------------------------------------------------------------------------------


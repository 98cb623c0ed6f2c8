"""Run configuration: YAML -> overrides -> typed, validated objects.

A config file is YAML. ``key.sub=value`` overrides are applied before validation (list items are
addressed by index, or by ``name`` for stages: ``stages.dpo.train.learning_rate=1e-5``). Every
error names the key path, the file and line it came from, and for typos the nearest valid key.
Relative data and model paths are resolved against the config file's directory, so a recipe works
from any working directory; ``output_dir`` is relative to the working directory.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from aligner.data.loading import read_text
from aligner.errors import ConfigError, suggest


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
            from aligner.push import repo_id_problem

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
        "(at most 8), 1 per process when several run (see aligner.threads)"))
    model: ModelConfig
    tokenizer: str | None = Field(None, description="'builtin', a directory or hub id; default: the model's")
    wandb: WandbConfig | None = None
    tensorboard: TensorBoardConfig | None = None
    hub: HubConfig | None = None
    callbacks: list[PluginChoice] = Field(
        default_factory=list, description="lifecycle plugins to switch on for the run: [{name: ..., <options>}]")
    stages: list[StageConfig] = Field(min_length=1)

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


class _Source:
    """Where config values came from, to point errors at a file and line."""

    def __init__(self, path: Path | None, text: str | None):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.overridden: dict[tuple, str] = {}
        if text is not None:
            try:
                node = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError:
                node = None
            if node is not None:
                self._index(node, ())

    def _index(self, node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, key_node.value)
                self.lines[key] = key_node.start_mark.line + 1
                self._index(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self._index(item, (*path, index))

    def where(self, loc: tuple) -> str:
        """`` (file line N)`` for the deepest known prefix of ``loc``."""
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.overridden:
                return f" (from override '{self.overridden[loc[:end]]}')"
            if loc[:end] in self.lines and self.path is not None:
                return f" ({self.path}, line {self.lines[loc[:end]]})"
        return f" ({self.path})" if self.path else ""

    def written(self, loc: tuple) -> bool | None:
        """Whether ``loc`` (or a key below it) is in the file or an override; ``None`` for a dict config,
        whose keys are not tracked."""
        if self.path is None and not self.overridden:
            return None
        if any(key[:len(loc)] == loc or loc[:len(key)] == key for key in self.overridden):
            return True
        return any(key[:len(loc)] == loc for key in self.lines)


def key_where(config: Any, loc: tuple) -> str:
    """Where the key ``loc`` of a loaded run config was set (`` (file, line N)``, `` (from override
    '...')``), or `` (not set: the default)`` when its file leaves it out, so an error never points
    at the line of an enclosing section as if the key were there."""
    source = getattr(config, "_source", None)
    if source is None:
        return ""
    if source.written(loc) is False:
        return " (not set: the default)"
    return source.where(loc)


def format_loc(loc: tuple) -> str:
    """``('stages', 0, 'train', 'lr')`` -> ``stages[0].train.lr``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The config model class (below ``root``, a run config by default) that owns the last key of ``loc``."""
    model: Any = root or RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        for arg in list(candidates):
            candidates.extend(getattr(arg, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _shown_input(value: Any) -> str:
    """`` (got VALUE)`` for a scalar a user mistyped; nothing for a mapping or list: the message already
    names the key inside it, and a whole mapping could echo a secret pasted into one of its options."""
    if isinstance(value, (dict, list)):
        return ""
    return f" (got {value!r})"


def _describe(error: dict, source: _Source, root: type[BaseModel] | None = None) -> str:
    loc = tuple(error["loc"])
    where = source.where(loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        valid = list(owner.model_fields) if owner else []
        return f"unknown key '{format_loc(loc)}'{where}{suggest(loc[-1], valid)}"
    if error["type"] == "missing":
        return f"missing required key '{format_loc(loc)}'{where}"
    message = error["msg"].removeprefix("Value error, ")
    if loc:
        return f"invalid value for '{format_loc(loc)}'{where}: {message}{_shown_input(error.get('input'))}"
    return f"invalid config{where}: {message}"


def validation_error(exc: ValidationError, source: _Source, prefix: tuple = (),
                     root: type[BaseModel] | None = None) -> ConfigError:
    """Turn a pydantic error into one ConfigError listing every problem with its location; ``root`` is the
    model that was validated (a run config by default), whose keys typos are matched against."""
    problems = []
    for err in exc.errors():
        err = dict(err)
        err["loc"] = (*prefix, *err["loc"])
        problems.append(_describe(err, source, root))
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(f"{len(problems)} problems in the config: " + "; ".join(problems))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str, source: _Source) -> None:
    """Apply one ``a.b.c=value`` override to the raw config dict in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key.path=value")
    key, _, value_text = override.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override '{override}' has an empty key")
    node: Any = data
    resolved: list = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, override, resolved)
            resolved.append(index)
            if last:
                node[index] = _parse_value(value_text)
            else:
                node = node[index]
        elif isinstance(node, dict):
            resolved.append(part)
            if last:
                node[part] = _parse_value(value_text)
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override '{override}': '{format_loc(tuple(resolved))}' is not a section")
    source.overridden[tuple(resolved)] = override


def _list_index(items: list, part: str, override: str, resolved: list) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"override '{override}': index {index} out of range for '{format_loc(tuple(resolved))}'")
        return index % len(items)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(
        f"override '{override}': no item named '{part}' in '{format_loc(tuple(resolved))}'{suggest(part, names)}"
    )


def read_config_source(source: str | Path | dict,
                       overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, Path, _Source]:
    """Raw config data (YAML file or dict) with overrides applied, the directory relative paths
    follow, and the source map used to point errors at a file and line."""
    if isinstance(source, dict):
        data, base_dir, origin = copy.deepcopy(source), Path.cwd(), _Source(None, None)
    else:
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory, not a config file")
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        text = read_text(path)  # not UTF-8 (file, line) or unreadable (the OS's reason): one located line
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping at the top level")
        base_dir, origin = path.resolve().parent, _Source(path, text)
    for override in overrides:
        apply_override(data, override, origin)
    return data, base_dir, origin


def load_config(
    source: str | Path | dict | RunConfig, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Load and validate a run config from a YAML path, a dict or a ``RunConfig``, applying overrides."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        source = source.model_dump(exclude_none=True)
    data, base_dir, origin = read_config_source(source, overrides)
    _refuse_secrets(data, origin)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, origin) from None
    _resolve_paths(config, base_dir, origin)
    config._source = origin  # type: ignore[attr-defined]  # kept for plugin-option errors
    return config


# Option names that hold credentials. The config is copied to <output_dir>/config.yaml and to W&B,
# so a credential must come from the environment (plugins take the variable's name, ``api_key_env``).
# Tokenizer settings such as ``pad_token`` are not credentials, hence the explicit list.
SECRET_KEYS = re.compile(r"(^|_)(api_?key|apikey|secret|password|passwd|access_token|auth_token|bearer_token|"
                         r"api_token|hf_token)$|^token$")


def _refuse_secrets(data: Any, origin: _Source, loc: tuple = ()) -> None:
    """A ConfigError for a credential written into the config (a non-empty string under a secret-like key)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        here = (*loc, key)
        if isinstance(key, str) and SECRET_KEYS.search(key.lower()) and isinstance(value, str) and value:
            raise ConfigError(
                f"'{format_loc(here)}'{origin.where(here)} looks like a credential: the config is copied to the run "
                "directory (config.yaml) and to W&B, so secrets never go in it; set an environment variable and "
                "give the option its name instead (for example `api_key_env: OPENAI_API_KEY`)")
        _refuse_secrets(value, origin, here)


def _resolve_paths(config: RunConfig, base_dir: Path, origin: _Source) -> None:
    """Make data and local model paths absolute (relative to the config file) and check they exist."""

    def resolve(value: str, loc: tuple, must_exist: bool) -> str:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if must_exist and not path.exists():
            raise ConfigError(f"file not found for '{format_loc(loc)}'{origin.where(loc)}: {path}")
        return str(path)

    model = config.model
    if model.path is not None and _looks_local(model.path, base_dir):
        model.path = resolve(model.path, ("model", "path"), must_exist=True)
    if config.tokenizer not in (None, "builtin") and _looks_local(config.tokenizer, base_dir):
        config.tokenizer = resolve(config.tokenizer, ("tokenizer",), must_exist=True)
    for i, stage in enumerate(config.stages):
        stage.data.train = _resolve_source(stage.data.train, ("stages", i, "data", "train"), base_dir, origin,
                                           config.seed, resolve)
        if stage.data.eval is not None:
            stage.data.eval = _resolve_source(stage.data.eval, ("stages", i, "data", "eval"), base_dir, origin,
                                              config.seed, resolve)


def _resolve_source(value: Any, loc: tuple, base_dir: Path, origin: _Source, seed: int, resolve: Any) -> Any:
    """A data source with local paths made absolute (and checked), hub ids left as they are, and each
    configured source told its key (for errors) and the run's seed (for mixtures)."""
    from aligner.data.sources import looks_like_hub_id

    if isinstance(value, list):
        return [_resolve_source(v, (*loc, j), base_dir, origin, seed, resolve) for j, v in enumerate(value)]
    if isinstance(value, SourceConfig) and value.dataset is not None:
        value._key, value._where, value._seed = loc, origin.where, seed
        return value
    path_text = value if isinstance(value, str) else value.path
    local = _looks_local(path_text, base_dir) or not looks_like_hub_id(path_text, bare_names=isinstance(value, SourceConfig))
    if isinstance(value, str):
        if local:
            return resolve(value, loc, must_exist=True)
        # A hub id given as a plain string: a configured source, so a load error can name the key.
        value = SourceConfig(path=value)
    elif local:
        value.path = resolve(value.path, (*loc, "path"), must_exist=True)
    elif value.path in PACKAGED_BUILDERS and value.data_files is not None:
        # datasets reads a builder's data files relative to the working directory; recipes name them
        # relative to the config file, like every other path.
        value.data_files = _resolve_data_files(value.data_files, base_dir)
    value._key, value._where, value._seed = loc, origin.where, seed
    return value


# datasets' builders for plain data files: ``{path: json, data_files: [...]}``.
PACKAGED_BUILDERS = ("json", "csv", "parquet", "arrow", "text")


def _resolve_data_files(files: Any, base_dir: Path) -> Any:
    if isinstance(files, dict):
        return {split: _resolve_data_files(f, base_dir) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_data_files(f, base_dir) for f in files]
    path = Path(files).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def _looks_local(value: str, base_dir: Path) -> bool:
    """A hub id is ``name`` or ``org/name``; anything that exists or looks like a path is local."""
    if value.startswith((".", "/", "~")) or (base_dir / value).exists() or Path(value).exists():
        return True
    return value.count("/") > 1


def validate_plugin_options(options_model: type[BaseModel], choice: PluginChoice, loc: tuple, config: RunConfig) -> Any:
    """Validate a plugin's options (the keys beside ``name``) against its ``Options`` model."""
    source = getattr(config, "_source", _Source(None, None))
    try:
        return options_model.model_validate(choice.options())
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            err_loc = (*loc, *err["loc"])
            where = source.where(err_loc)
            if err["type"] == "extra_forbidden":
                valid = ["name", *options_model.model_fields]
                problems.append(
                    f"unknown option '{format_loc(err_loc)}' for '{choice.name}'{where}{suggest(err['loc'][-1], valid)}"
                )
            else:
                problems.append(
                    f"invalid value for '{format_loc(err_loc)}'{where}: {err['msg'].removeprefix('Value error, ')}"
                    f"{_shown_input(err.get('input'))}"
                )
        raise ConfigError("; ".join(problems)) from None


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (defaults filled in, paths absolute) as YAML."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of 'path' (a directory or hub id) and 'tiny' (a built-in spec)")
        return self


class DataConfig(Strict):
    """Where a stage's rows come from and how they become tokens."""

    train: str
    eval: str | None = None
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


class RunConfig(Strict):
    """A whole run: one model trained through one or more stages (e.g. SFT then DPO)."""

    output_dir: str = "runs/default"
    resume: bool | Literal["auto"] = Field(
        False, description="continue from the last complete checkpoint; 'auto': only if there is one")
    seed: int = 0
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    model: ModelConfig
    tokenizer: str | None = Field(None, description="'builtin', a directory or hub id; default: the model's")
    wandb: WandbConfig | None = None
    callbacks: list[PluginChoice] = Field(
        default_factory=list, description="lifecycle plugins to switch on for the run: [{name: ..., <options>}]")
    stages: list[StageConfig] = Field(min_length=1)

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
        return f"invalid value for '{format_loc(loc)}'{where}: {message} (got {error.get('input')!r})"
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
        stage.data.train = resolve(stage.data.train, ("stages", i, "data", "train"), must_exist=True)
        if stage.data.eval is not None:
            stage.data.eval = resolve(stage.data.eval, ("stages", i, "data", "eval"), must_exist=True)


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
                    f"invalid value for '{format_loc(err_loc)}'{where}: {err['msg'].removeprefix('Value error, ')} "
                    f"(got {err.get('input')!r})"
                )
        raise ConfigError("; ".join(problems)) from None


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (defaults filled in, paths absolute) as YAML."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

"""Loading a run configuration: YAML -> overrides -> typed, validated objects.

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
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from aligner.config.origin import ConfigOrigin, format_loc
from aligner.config.schema import PluginChoice, RunConfig, SourceConfig
from aligner.data.loading import read_text
from aligner.errors import ConfigError, OptionProblem, OptionProblems, suggest


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


# Keys whose value is never echoed in an error: a secret may have been pasted into them by mistake
# (``api_key_env: sk-...``).
_UNSHOWN_KEYS = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|auth|credentials?)(_|$)", re.IGNORECASE)


def _shown_input(value: Any, loc: tuple = ()) -> str:
    """`` (got VALUE)`` for a scalar a user mistyped; nothing for a mapping or list: the message already
    names the key inside it, and a whole mapping could echo a secret pasted into one of its options;
    nothing for a key whose name says it holds (the name of) a credential."""
    if isinstance(value, (dict, list)) or (loc and _UNSHOWN_KEYS.search(str(loc[-1]))):
        return ""
    return f" (got {value!r})"


def option_problems(exc: ValidationError, options_model: type[BaseModel], plugin: str) -> list[OptionProblem]:
    """Each error of validating ``plugin``'s options as a problem below its mapping, with the problems of
    plugins nested in those options (an ``OptionProblems`` a validator raised) one level deeper."""
    problems: list[OptionProblem] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, OptionProblems):
            problems.extend(p.under(loc) for p in nested.problems)
        elif err["type"] == "extra_forbidden":
            owner = _model_at(loc, options_model)
            valid = (["name"] if len(loc) == 1 else []) + (list(owner.model_fields) if owner else [])
            problems.append(OptionProblem(loc, err["msg"], "unknown", plugin, tuple(valid)))
        elif err["type"] == "missing":
            problems.append(OptionProblem(loc, err["msg"], "missing", plugin))
        else:
            problems.append(OptionProblem(loc, err["msg"].removeprefix("Value error, "), "invalid", plugin,
                                          shown=_shown_input(err.get("input"), loc)))
    return problems


def describe_problems(problems: list[OptionProblem], loc: tuple, source: ConfigOrigin) -> list[str]:
    """The messages of ``problems`` of a plugin mapping at ``loc``: full key path, file and line, suggestion."""
    described = []
    for problem in problems:
        full = (*loc, *problem.loc)
        where = source.where((*full, "name") if problem.kind == "plugin" else full)
        described.append(problem.describe(format_loc(full), where))
    return described


def _describe(error: dict, source: ConfigOrigin, root: type[BaseModel] | None = None) -> str:
    loc = tuple(error["loc"])
    where = source.where(loc)
    nested = (error.get("ctx") or {}).get("error")
    if isinstance(nested, OptionProblems):  # a plugin named inside the config (``judge:`` of a label config)
        return "; ".join(describe_problems(nested.problems, loc, source))
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


def validation_error(exc: ValidationError, source: ConfigOrigin, prefix: tuple = (),
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


def apply_override(data: dict, override: str, source: ConfigOrigin) -> None:
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
                       overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, Path, ConfigOrigin]:
    """Raw config data (YAML file or dict) with overrides applied, the directory relative paths
    follow, and the source map used to point errors at a file and line."""
    if isinstance(source, dict):
        data, base_dir, origin = copy.deepcopy(source), Path.cwd(), ConfigOrigin(None, None)
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
        base_dir, origin = path.resolve().parent, ConfigOrigin(path, text)
    for override in overrides:
        apply_override(data, override, origin)
    return data, base_dir, origin


def resolve_config_path(value: str, base: Path, key: str, origin: ConfigOrigin | None = None) -> str:
    """``value`` as a path relative to ``base`` (the config file's directory, from ``read_config_source``)
    unless absolute; ``ConfigError`` naming ``key`` (dotted), and its file and line when ``origin`` is
    given, if nothing is there."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        where = origin.where(tuple(key.split("."))) if origin is not None else ""
        raise ConfigError(f"file not found for '{key}'{where}: {path}")
    return str(path)


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
    config.remember_origin(origin)  # kept for plugin-option errors
    return config


# Option names that hold credentials. The config is copied to <output_dir>/config.yaml and to W&B,
# so a credential must come from the environment (plugins take the variable's name, ``api_key_env``).
# Tokenizer settings such as ``pad_token`` are not credentials, hence the explicit list.
SECRET_KEYS = re.compile(r"(^|_)(api_?key|apikey|secret|password|passwd|access_token|auth_token|bearer_token|"
                         r"api_token|hf_token)$|^token$")


def _refuse_secrets(data: Any, origin: ConfigOrigin, loc: tuple = ()) -> None:
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


def _resolve_paths(config: RunConfig, base_dir: Path, origin: ConfigOrigin) -> None:
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


def _resolve_source(value: Any, loc: tuple, base_dir: Path, origin: ConfigOrigin, seed: int, resolve: Any) -> Any:
    """A data source with local paths made absolute (and checked), hub ids left as they are, and each
    configured source told its key (for errors) and the run's seed (for mixtures)."""
    from aligner.data.sources import looks_like_hub_id

    if isinstance(value, list):
        return [_resolve_source(v, (*loc, j), base_dir, origin, seed, resolve) for j, v in enumerate(value)]
    if isinstance(value, SourceConfig) and value.dataset is not None:
        value.locate(loc, origin.where, seed)
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
    value.locate(loc, origin.where, seed)
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
    try:
        return options_model.model_validate(choice.options())
    except ValidationError as exc:
        problems = describe_problems(option_problems(exc, options_model, choice.name), loc, config.origin)
        raise ConfigError("; ".join(problems)) from None


def validate_located(model: type[BaseModel], data: Any, loc: tuple, source: ConfigOrigin, plugin: str) -> Any:
    """Validate ``data`` found at ``loc`` of a config against ``model`` (a reward source, a plugin's
    options), every problem named by key path, file and line; ``plugin`` names what the keys belong to."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = describe_problems(option_problems(exc, model, plugin), loc, source)
        raise ConfigError("; ".join(problems)) from None


def located_option_problems(exc: OptionProblems, loc: tuple, source: ConfigOrigin) -> ConfigError:
    """A ConfigError naming each of a nested plugin's problems, raised outside validation (``loc`` is
    where the exception's keys start)."""
    return ConfigError("; ".join(describe_problems(exc.problems, loc, source)))


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (defaults filled in, paths absolute) as YAML."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

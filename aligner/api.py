"""The Python API: ``aligner.train``. The CLI's ``train`` command is a thin layer over it.

Setup order, and why:
1. config validated and plugins resolved (options, and what each plugin ``requires`` of the others),
   2. every stage's data read and validated: both cheap and the likeliest to be wrong, so they fail
   before anything slow happens;
3. the output directory checked (creatable, writable, not an earlier run unless resuming or
   overwriting): reads only, nothing written yet;
4. tokenizer, then tokenization (needs the tokenizer, not the model);
5. seeds, accelerator, the checkpoints a resume continues from (verified), and only then the model;
6. only once all that passed: an earlier run removed (``--overwrite``) and ``config.yaml`` written.
   A refused run changes nothing on disk; one that fails before writing anything else takes its
   ``config.yaml`` back, so the corrected rerun is not told the directory "already holds a run".
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from aligner.config import RunConfig, dump_config, key_where, load_config
from aligner.data.check import data_summary, enforce_drop_limit
from aligner.data.tokenize import prompt_token_limit, tokenize_rows
from aligner.errors import ConfigError
from aligner.plugins import call_hook, temporary_plugin
from aligner.training.distributed import (
    build_accelerator,
    check_stages_supported,
    launch_is_main_process,
    on_main_then_shared,
)
from aligner.training.resume import latest_checkpoint, load_weights, stage_finished
from aligner.training.run_dir import check_output_dir, discard_if_untouched, start_run
from aligner.training.run_state import RunResult, RunState
from aligner.training.stages import PreparedStage, instantiate, is_chat, prepare_stages, stage_template

log = logging.getLogger("aligner")

IN_MEMORY = "<in-memory object>"  # what the config holds for a model= or tokenizer= object while it loads


def tokenize_stage(stage: PreparedStage, tokenizer: Any) -> None:
    """Tokenize a stage's train and eval rows and log what truncation dropped."""
    data = stage.config.data
    max_prompt_length = prompt_token_limit(data, stage.data_format, stage.algorithm.generation_tokens(),
                                           stage.name, stage.index)
    template = stage_template(stage.config, stage.index, is_chat(stage.train_rows[:1], stage.eval_rows[:1]), tokenizer)
    for split, rows in (("train", stage.train_rows), ("eval", stage.eval_rows)):
        if not rows:
            continue
        tokenized = tokenize_rows(rows, stage.data_format, tokenizer, template, data.max_length, max_prompt_length)
        # Too many drops means the data or the length limits are wrong: stop before the model loads.
        enforce_drop_limit(stage.name, split, data, stage.data_format, rows, tokenized)
        if tokenized.dropped:
            reasons = ", ".join(f"{n} {why}" for why, n in tokenized.dropped.items())
            log.warning("stage '%s' %s: dropped %d of %d rows (%s)", stage.name, split,
                        sum(tokenized.dropped.values()), len(rows), reasons)
        if tokenized.truncated_rows:
            log.info("stage '%s' %s: truncated %d rows to max_length %d / max_prompt_length %d", stage.name, split,
                     tokenized.truncated_rows, data.max_length, max_prompt_length)
        if not tokenized.examples:
            from aligner.errors import DataError

            raise DataError(f"stage '{stage.name}': no {split} rows left after tokenization and truncation")
        if split == "train":
            stage.train_data = tokenized
        else:
            stage.eval_data = tokenized


def _output_where(config: RunConfig, given: str | Path | None) -> str:
    """Where ``output_dir`` came from, for errors: the argument (``--output-dir``) or the config's line."""
    if given is not None:
        return " (from --output-dir)"
    return key_where(config, ("output_dir",))


# stage name -> (its final model is intact, the checkpoint it continues from)
ResumePlan = dict[str, tuple[bool, Path | None]]


def _resume_plan(stages: list[PreparedStage], out: Path, accelerator: Any) -> ResumePlan:
    """Verify, before the model loads and before ``config.yaml`` is rewritten, where each stage resumes.

    A resume that cannot continue (no intact checkpoint of a stage) stops here with nothing changed.
    The main process goes first: it is the one that sets damaged checkpoints aside, and the others
    then find the same ones.
    """
    def plan() -> ResumePlan:
        result: ResumePlan = {}
        for stage in stages:
            finished = stage_finished(out / stage.name)
            result[stage.name] = (finished, None if finished else latest_checkpoint(out / stage.name))
        return result

    return on_main_then_shared(accelerator, plan)


def _restore_finished_stage(stage: PreparedStage, model: Any, out: Path) -> tuple[Any, dict[str, float]]:
    """A stage that completed before the resume: load its final weights instead of training again."""
    final = out / stage.name / "final"
    model = stage.peft.apply(model)
    load_weights(model, final)
    metrics = json.loads((final / "trainer_state.json").read_text())["metrics"]
    log.info("stage '%s' already finished; loaded %s", stage.name, final)
    return stage.peft.release(model), metrics


def _report_failure(run: RunState, error: BaseException) -> None:
    """``on_run_failed`` for a stage that raised; the stage's own error stays the one reported."""
    try:
        call_hook("on_run_failed", run=run, error=error)
    except Exception as hook_error:
        log.warning("an on_run_failed hook raised %s: %s", type(hook_error).__name__, hook_error)


def _train_stages(stages: list[PreparedStage], model: Any, config: RunConfig, tokenizer: Any, accelerator: Any,
                  out: Path, plan: ResumePlan) -> dict[str, dict[str, float]]:
    """Train (or, when resuming, load) every stage in turn; return each stage's final metrics.

    ``plan`` is the verified resume plan (empty for a fresh run)."""
    from accelerate.utils import set_seed

    from aligner.training.runner import train_stage

    results: dict[str, dict[str, float]] = {}
    for stage in stages:
        finished, start = plan.get(stage.name, (False, None))
        if finished:
            model, results[stage.name] = _restore_finished_stage(stage, model, out)
            continue
        run = RunState(config=config, output_dir=out, stage=stage, tokenizer=tokenizer, accelerator=accelerator)
        set_seed(config.seed + stage.index)
        try:
            model, results[stage.name] = train_stage(run, model, resume_from=start)
        except BaseException as error:
            _report_failure(run, error)
            raise
    return results


def train(config: str | Path | dict | RunConfig, overrides: list[str] | tuple[str, ...] = (),
          output_dir: str | Path | None = None, resume: bool | str | None = None,
          overwrite: bool = False, model: Any = None, tokenizer: Any = None) -> RunResult:
    """Train a model through every stage of ``config``; return the output path and final metrics.

    ``config`` is a YAML path, a dict of the same shape, or a ``RunConfig``; ``overrides`` are
    ``key.path=value`` strings; ``output_dir`` replaces the config's. ``resume`` (or the config's
    ``resume``) continues an interrupted run from its last complete checkpoint: finished stages
    are loaded, not retrained. ``overwrite`` replaces an earlier run in ``output_dir``.

    ``model`` and ``tokenizer`` take objects in place of the config's ``model`` and ``tokenizer``
    (which may then be left out): a transformers model with the head the stages need (it trains in
    place; its dtype and attention implementation are used as they are) and a tokenizer. The
    written config names them by where they were loaded from (``name_or_path``). In-memory datasets
    go where the config names data (``data: {train: dataset}``).
    """
    from accelerate.utils import set_seed

    from aligner.modeling.loading import (
        adopt_model,
        load_model,
        load_tokenizer,
        object_label,
        prepare_tokenizer,
    )
    from aligner.modeling.segment_attention import packed_attention
    from aligner.training.threads import apply_threads

    # Objects replace what the config would load. The config may leave model/tokenizer out: a
    # placeholder satisfies its schema (and no path check), then the resolved config names the objects
    # by where they came from (for config.yaml, the model card and the log).
    given = []
    if model is not None:
        given += [f"model.path={IN_MEMORY}", "model.tiny=null"]
    if tokenizer is not None:
        given.append(f"tokenizer={IN_MEMORY}")
    resolved = load_config(config, [*overrides, *given])
    if model is not None:
        resolved.model.path = object_label(model)
    if tokenizer is not None:
        resolved.tokenizer = object_label(tokenizer)
    if output_dir is not None:
        resolved.output_dir = str(output_dir)
    if resume is not None:
        resolved.resume = resume
    stages = prepare_stages(resolved)
    check_stages_supported([stage.name for stage in stages])  # before anything loads or is written
    # Callbacks are built (their options validated) before anything loads, like the stages' plugins.
    callbacks = [instantiate("callback", choice, ("callbacks", i), resolved) for i, choice in enumerate(resolved.callbacks)]
    # One model runs through every stage, so its head (LM or reward score) must suit them all.
    kinds = {stage.forward_kind for stage in stages}
    if len(kinds) > 1:
        raise ConfigError("a run's stages must all train the same kind of model (language model or reward model); "
                          "train the reward model in its own run, with model.path set to the earlier run's output")
    out = Path(resolved.output_dir)
    where = _output_where(resolved, output_dir)
    # Only the main process writes; RANK is set by torchrun before any accelerator exists.
    main_process = launch_is_main_process()
    check_output_dir(out, where, resolved.resume, overwrite, main_process=main_process)
    # 'auto' resumes only a run that is there; a fresh run has nothing to verify or continue.
    resuming = bool(resolved.resume) and (out / "config.yaml").is_file()
    tokenizer = prepare_tokenizer(tokenizer, "tokenizer=") if tokenizer is not None else load_tokenizer(resolved)
    for stage in stages:
        tokenize_stage(stage, tokenizer)

    accelerator = build_accelerator(resolved.precision)
    plan = _resume_plan(stages, out, accelerator) if resuming else {}
    set_seed(resolved.seed)
    kind = kinds.pop()
    model = adopt_model(model, tokenizer, kind) if model is not None else load_model(resolved.model, tokenizer, kind)
    # Before any training work, after every check (a refused run prints only its error): torch's own
    # pool size oversubscribes shared CPUs.
    apply_threads(resolved.threads)

    # Every check passed and the model loaded: only now is an earlier run replaced and config.yaml written.
    created = bool(on_main_then_shared(accelerator, lambda: start_run(
        out, where, replace=overwrite and not resuming, write_config=lambda path: dump_config(resolved, path))))
    created = created and accelerator.is_main_process
    accelerator.wait_for_everyone()
    try:
        with contextlib.ExitStack() as registered:
            for i, callback in enumerate(callbacks):
                registered.enter_context(temporary_plugin(callback, name=f"callbacks[{i}]:{callback.name}"))
            registered.enter_context(packed_attention(resolved.model.packed_attention))
            results = _train_stages(stages, model, resolved, tokenizer, accelerator, out, plan)
    except BaseException:
        # A fresh run that wrote nothing but its config leaves no directory blocking the rerun.
        if accelerator.is_main_process and not resuming and discard_if_untouched(out, created):
            log.info("nothing was trained or written: removed %s again", out / "config.yaml")
        raise
    final_dir = out / stages[-1].name / "final"
    if accelerator.is_main_process:
        summary = {"final_model": str(final_dir), "stages": results, "data": data_summary(stages)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return RunResult(output_dir=out, final_model_dir=final_dir, metrics=results)

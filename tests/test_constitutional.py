"""Constitutional AI: ``aligner revise`` (critique and revision into SFT rows with their chains, seeded,
resumable) and ``aligner constitutional`` (a pipeline whose steps feed each other)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aligner.cli import main
from aligner.constitutional.config import load_revise_config
from aligner.constitutional.constitution import BUNDLED, load_constitution
from aligner.constitutional.pipeline import load_pipeline, run_pipeline
from aligner.constitutional.revise import draw_principle, revise
from aligner.constitutional.rule_reviser import kind_reviser
from aligner.errors import ConfigError
from aligner.quickstart.task import behaviour_score

from .conftest import ROOT, tiny_model, write_jsonl
from .quickstart_sft import quickstart_rows

PRINCIPLE_NAMES = {p.name for p in load_constitution(BUNDLED)}


def _config(tmp_path: Path, n: int = 6, **extra) -> dict:
    """A revise config over ``n`` quickstart prompts with a tiny random model (it writes its own critiques)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", quickstart_rows("prompts_train.jsonl", n))
    return {"output": str(tmp_path / "revisions.jsonl"), "model": tiny_model(), "tokenizer": "builtin",
            "prompts": str(prompts), "rounds": 2, "max_new_tokens": 6, "batch_size": 4, "seed": 3, **extra}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bundled_constitution_and_a_seeded_draw():
    principles = load_constitution(BUNDLED)
    assert len(principles) >= 2 and all(p.critique and p.revision for p in principles)
    # The draw depends on (seed, prompt, round) only, so a resumed run draws what a whole run would.
    assert draw_principle(principles, 0, 5, 1) == draw_principle(principles, 0, 5, 1)
    assert len({draw_principle(principles, 0, i, 0).name for i in range(30)}) > 1


def test_kind_reviser_turns_unkind_answers_kind():
    critique, revision = kind_reviser("Describe the red cat.", "The red cat is rude and calm.",
                                      load_constitution(BUNDLED)[0])
    assert "rude" in critique and revision == "The red cat is kind and calm."
    assert behaviour_score("", "The red cat is rude and calm.") == 0.0 and behaviour_score("", revision) == 1.0
    assert kind_reviser("p", "The cat is calm.", load_constitution(BUNDLED)[0])[1] == "The cat is calm."


def test_revise_writes_one_row_per_prompt_with_its_chain_deterministically(tmp_path):
    config = _config(tmp_path)
    assert revise(load_revise_config(config)) == {"revised": 6, "skipped": 0}
    rows = _rows(tmp_path / "revisions.jsonl")
    assert [r["provenance"]["prompt_index"] for r in rows] == list(range(6))
    prompts = [r["prompt"] for r in quickstart_rows("prompts_train.jsonl", 6)]
    for row, prompt in zip(rows, prompts, strict=True):
        assert row["prompt"] == prompt
        rounds = row["chain"]["rounds"]
        assert len(rounds) == 2 and {r["principle"] for r in rounds} <= PRINCIPLE_NAMES
        assert all({"critique_request", "critique", "revision_request", "revision"} <= set(r) for r in rounds)
        # The SFT target is the last revision (or the text before it, if the model wrote nothing).
        texts = [row["chain"]["answer"], *(r["revision"] for r in rounds)]
        assert row["completion"] == next((t for t in reversed(texts) if t), "")

    # The same seed writes the same rows: answers, principles, critiques and revisions.
    (tmp_path / "again").mkdir()
    revise(load_revise_config(_config(tmp_path / "again")))
    assert _rows(tmp_path / "again" / "revisions.jsonl") == rows


def test_revise_resumes_after_a_partial_output(tmp_path):
    config = _config(tmp_path, reviser="aligner.constitutional.rule_reviser:kind_reviser")
    output = tmp_path / "revisions.jsonl"
    # A previous run revised prompt 0 and was killed while writing the next line.
    kept = {"prompt": "kept", "completion": "kept", "chain": {}, "provenance": {"prompt_index": 0}}
    output.write_text(json.dumps(kept) + "\n" + '{"prompt": "torn')
    assert revise(load_revise_config(config)) == {"revised": 5, "skipped": 1}
    rows = _rows(output)
    assert rows[0] == kept and sorted(r["provenance"]["prompt_index"] for r in rows) == list(range(6))
    # The principles of the resumed prompts are those an uninterrupted run draws.
    (tmp_path / "whole").mkdir()
    revise(load_revise_config(_config(tmp_path / "whole", reviser="aligner.constitutional.rule_reviser:kind_reviser")))
    principles = {r["provenance"]["prompt_index"]: [x["principle"] for x in r["chain"]["rounds"]]
                  for r in _rows(tmp_path / "whole" / "revisions.jsonl")}
    assert all([x["principle"] for x in r["chain"]["rounds"]] == principles[r["provenance"]["prompt_index"]]
               for r in rows[1:])
    # Nothing left: a rerun revises nothing.
    assert revise(load_revise_config(config)) == {"revised": 0, "skipped": 6}


def test_bad_constitution_is_one_located_error_line(tmp_path, capsys):
    constitution = tmp_path / "constitution.yaml"
    constitution.write_text("principles:\n  - name: a\n    critique: c\n    revision: r\n"
                            "  - name: b\n    critique: c\n")
    config = _config(tmp_path, constitution=str(constitution))
    (tmp_path / "revise.yaml").write_text(yaml.safe_dump(config))
    assert main(["revise", str(tmp_path / "revise.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{constitution}, line 5: principle 2: 'revision'" in err
    assert not (tmp_path / "revisions.jsonl").exists()  # refused before anything was written

    constitution.write_text("principles: []\n")
    with pytest.raises(ConfigError, match="non-empty list 'principles'"):
        load_constitution(constitution)
    constitution.write_text("principles:\n  - name: a\n    critique: c\n    revision: r\n    extra: 1\n")
    with pytest.raises(ConfigError, match=r"line 2: principle 1: unknown key 'extra'"):
        load_constitution(constitution)


def test_a_missing_constitution_or_template_file_names_its_key_and_line(tmp_path, capsys):
    config = _config(tmp_path, constitution="missing.yaml", critique_template="nope.yaml")
    path = tmp_path / "revise.yaml"
    text = yaml.safe_dump(config)
    path.write_text(text)

    def line(key: str) -> int:
        return next(n for n, written in enumerate(text.splitlines(), 1) if written.startswith(f"{key}:"))

    assert main(["revise", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"aligner: error: file not found for 'constitution' ({path}, line {line('constitution')}): "
                   f"{tmp_path / 'missing.yaml'}")
    config["constitution"] = str(BUNDLED)
    text = yaml.safe_dump(config)
    path.write_text(text)
    assert main(["revise", str(path)]) == 2
    assert f"file not found for 'critique_template' ({path}, line {line('critique_template')})" in capsys.readouterr().err


def test_few_shot_template_with_an_unknown_field_is_refused(tmp_path):
    from aligner.constitutional.templates import critique_prompt, load_few_shot_template

    shipped = load_few_shot_template("critique")
    principle = load_constitution(BUNDLED)[0]
    text = critique_prompt(shipped, "Describe the red cat.", "The red cat is rude.", principle)
    # The few-shot examples come first; the request ends the prompt, for the model to continue.
    assert text.endswith(f"Assistant: The red cat is rude.\nCritique request: {principle.critique}\nCritique:")
    assert text.count("Critique request:") == len(shipped.examples) + 1
    bad = tmp_path / "bad.yaml"
    bad.write_text('prompt: "{prompt} {critic}"\nexample: ""\n')
    with pytest.raises(ConfigError, match="unknown field"):
        load_few_shot_template(str(bad))


def test_pipeline_steps_chain_revise_sft_label_dpo(tmp_path, capsys):
    """Each step reads what the one before wrote: the revisions are SFT data, the labels DPO data."""
    rule = {"name": "rule", "callable": "aligner.quickstart.task:behaviour_score"}
    stage = {"data": {"template": "plain", "max_length": 48}, "eval": {"at_start": False},
             "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3}}
    revise_config = _config(tmp_path, n=8, reviser="aligner.constitutional.rule_reviser:kind_reviser")
    sft = {"output_dir": str(tmp_path / "sl_cai"), "seed": 0, "model": tiny_model(), "tokenizer": "builtin",
           "stages": [{**stage, "name": "sl_cai", "losses": [{"name": "sft"}],
                       "data": {**stage["data"], "train": revise_config["output"]}}]}
    label = {"output": str(tmp_path / "labels.jsonl"), "model": {"path": str(tmp_path / "sl_cai" / "sl_cai" / "final")},
             "tokenizer": "builtin", "prompts": revise_config["prompts"], "judge": rule, "num_completions": 4,
             "max_new_tokens": 12, "temperature": 1.0}
    dpo = {"output_dir": str(tmp_path / "rl_cai"), "seed": 0, "model": {"path": label["model"]["path"]},
           "tokenizer": "builtin",
           "stages": [{**stage, "name": "dpo", "losses": [{"name": "dpo"}], "reference": {"name": "frozen_copy"},
                       "data": {**stage["data"], "train": label["output"], "max_drop_fraction": 1.0}}]}
    for name, data in {"revise": revise_config, "sft": sft, "label": label, "dpo": dpo}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("steps:\n  - revise: revise.yaml\n  - train: sft.yaml\n  - label: label.yaml\n"
                        "  - train: dpo.yaml\n")
    lines: list[str] = []
    run_pipeline(pipeline, report=lines.append)
    assert [line.split(":")[0] for line in lines] == ["step 1/4 (revise)", "step 2/4 (train)", "step 3/4 (label)",
                                                      "step 4/4 (train)"]
    assert len(_rows(tmp_path / "revisions.jsonl")) == 8
    assert (tmp_path / "rl_cai" / "dpo" / "final" / "config.json").is_file()


def test_pipeline_file_errors_name_the_step(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("steps:\n  - revise: missing.yaml\n")
    with pytest.raises(ConfigError, match="step 1: config not found"):
        load_pipeline(pipeline)
    (tmp_path / "x.yaml").write_text("{}\n")
    pipeline.write_text("steps:\n  - revise: x.yaml\n  - deploy: x.yaml\n")
    with pytest.raises(ConfigError, match="step 2: unknown command 'deploy'"):
        load_pipeline(pipeline)


def test_shipped_constitutional_configs_validate_and_start_with_their_command():
    folder = ROOT / "configs" / "constitutional"
    steps = load_pipeline(folder / "pipeline.yaml")
    assert [c for c, _ in steps] == ["train", "revise", "train", "label", "train"]
    for command, path in steps:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# aligner {command} configs/{path.relative_to(ROOT / 'configs')}"), path
    revise_path = folder / "revise.yaml"
    data = yaml.safe_load(revise_path.read_text())
    # The model and the revisions exist only once earlier steps ran: validate everything else.
    data["model"] = tiny_model()
    config = load_revise_config({**data, "prompts": str(revise_path.parent / data["prompts"]),
                                 "constitution": str(revise_path.parent / data["constitution"])})
    assert load_constitution(config.constitution) and config.rounds >= 1
    # The training and label configs read earlier steps' outputs: check their shape without the files.
    from aligner.commands.label import LabelConfig
    from aligner.config import RunConfig

    schemas = {"train": RunConfig, "label": LabelConfig}
    for command, path in steps:
        if command in schemas:
            schemas[command].model_validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("command", ["revise", "constitutional"])
def test_help_imports_no_torch(command):
    import subprocess
    import sys

    code = (f"import sys\nfrom aligner.cli import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "[]" and command in done.stdout

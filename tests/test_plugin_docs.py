"""Meta-tests: docs/plugins.md documents every hook with its exact signature, every hook has a test,
and the tutorial's plugin works as written.

Adding a hook to aligner/hookspecs.py fails these tests until it is documented in the hook reference
and a test for it is named in HOOK_TESTS.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

from aligner import hookspecs
from aligner.plugins import get_registry, reset_plugins
from aligner.protocols import PREFERENCE, LossInputs, SequenceLogProbs
from tests.conftest import ROOT

DOCS = ROOT / "docs" / "plugins.md"

# Each hook -> the test (module::function) that exercises it in a real run.
HOOK_TESTS = {
    "register_losses": "tests.test_hooks::test_register_losses_adds_a_loss_the_stage_trains_with",
    "register_reference_policies": "tests.test_hooks::test_register_reference_policies_adds_a_reference_the_loop_uses",
    "register_judges": "tests.test_hooks::test_register_judges_adds_a_judge_for_generation_eval",
    "register_peft_backends": "tests.test_hooks::test_register_peft_backends_adds_a_backend_that_decides_what_trains",
    "register_callbacks": "tests.test_hooks::test_register_callbacks_adds_a_callback_the_config_switches_on",
    "register_algorithms": "tests.test_online_algorithms::test_register_algorithms_adds_an_algorithm_a_stage_trains_with",
    "register_advantage_estimators":
        "tests.test_online_algorithms::test_register_advantage_estimators_adds_an_estimator_an_algorithm_uses",
    "register_generation_engines": "tests.test_generation::test_register_generation_engines_adds_an_engine_a_stage_samples_with",
    "register_optimizers": "tests.test_optimizers::test_register_optimizers_adds_an_optimizer_a_stage_trains_with",
    "on_run_start": "tests.test_hooks::test_on_run_start_is_called_once_after_setup_before_any_step",
    "on_step_end": "tests.test_hooks::test_on_step_end_is_called_after_every_step_and_added_metrics_are_logged",
    "on_evaluate": "tests.test_hooks::test_on_evaluate_is_called_at_start_every_n_steps_and_at_end",
    "on_checkpoint_saved": "tests.test_hooks::test_on_checkpoint_saved_is_called_with_a_complete_checkpoint",
    "on_run_end": "tests.test_hooks::test_on_run_end_is_called_last_with_the_final_metrics",
    "on_run_failed": "tests.test_hooks::test_on_run_failed_is_called_instead_of_on_run_end_and_the_error_still_raised",
}


def hookspec_signatures() -> dict[str, str]:
    """``def name(args) -> returns`` for every function marked ``@hookspec``, parsed from the source."""
    tree = ast.parse(Path(hookspecs.__file__).read_text())
    signatures = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "hookspec" for d in node.decorator_list):
            signatures[node.name] = f"def {node.name}({ast.unparse(node.args)}) -> {ast.unparse(node.returns)}"
    return signatures


def documented_signatures() -> dict[str, str]:
    """The signature lines (``def ...) -> ...`` with no colon) of the docs' hook reference section."""
    text = DOCS.read_text()
    section = text.split("\n## Hook reference\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            match = re.fullmatch(r"def (\w+)\(.*\) -> [^:]+", line.strip())
            if match:
                assert match.group(1) not in found, f"hook {match.group(1)} is documented twice"
                found[match.group(1)] = line.strip()
    return found


def test_hookspecs_are_what_pluggy_sees():
    pluggy_names = {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "aligner_spec")}
    assert set(hookspec_signatures()) == pluggy_names and len(pluggy_names) == 15


def test_every_hook_is_documented_with_its_exact_signature():
    code, docs = hookspec_signatures(), documented_signatures()
    assert sorted(set(code) - set(docs)) == [], "hooks missing from docs/plugins.md"
    assert sorted(set(docs) - set(code)) == [], "docs/plugins.md documents hooks that do not exist"
    for name, signature in code.items():
        assert docs[name] == signature, f"docs/plugins.md has the wrong signature for {name}"
        assert f"#### `{name}`" in DOCS.read_text()


def test_every_hook_has_a_test():
    assert sorted(set(hookspec_signatures()) - set(HOOK_TESTS)) == [], "add a test for the new hook to HOOK_TESTS"
    assert sorted(set(HOOK_TESTS) - set(hookspec_signatures())) == [], "HOOK_TESTS names hooks that do not exist"
    for hook, target in HOOK_TESTS.items():
        module_name, function = target.split("::")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, function, None)), f"{target} (the test for {hook}) does not exist"


def tutorial_block(label: str) -> str:
    match = re.search(rf"<!-- tutorial: {re.escape(label)} -->\n```\w+\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert match, f"tutorial block {label} not found"
    return match.group(1)


@pytest.fixture
def tutorial_plugin_installed(tmp_path, monkeypatch):
    """The tutorial's two files, installed as a distribution (dist-info with its entry points) on sys.path."""
    project = tomllib.loads(tutorial_block("pyproject.toml"))["project"]
    assert any(d.startswith("aligner-trainer>=") for d in project["dependencies"])
    site = tmp_path / "site"
    (site / "aligner_mean_hinge").mkdir(parents=True)
    code = tutorial_block("aligner_mean_hinge/__init__.py")
    assert len(code.strip().splitlines()) <= 32, "the tutorial promises a loss plugin in about 30 lines"
    (site / "aligner_mean_hinge" / "__init__.py").write_text(code)
    info = site / f"aligner_mean_hinge-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = project["entry-points"]["aligner"]
    (info / "entry_points.txt").write_text("[aligner]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_plugins()
    yield
    reset_plugins()
    sys.modules.pop("aligner_mean_hinge", None)


def test_the_tutorial_plugin_registers_and_computes_its_loss(tutorial_plugin_installed):
    entry = get_registry("loss").entry("mean_hinge")
    assert entry.plugin == "mean_hinge"
    hinge = entry.obj(entry.obj.Options(margin=0.5))
    # pair 1: chosen -2 over 2 tokens (-1 each), rejected -6 over 3 (-2 each): gap 1 >= margin -> 0;
    # pair 2: chosen -3 over 2 (-1.5), rejected -2.5 over 2 (-1.25): gap -0.25 -> 0.5 + 0.25 = 0.75.
    logps = SequenceLogProbs(torch.tensor([-2.0, -3.0, -6.0, -2.5]), torch.tensor([2, 2, 3, 2]))
    out = hinge.compute(LossInputs(PREFERENCE, logps, None, {}))
    assert out.loss.item() == pytest.approx((0 + 0.75) / 2)
    assert out.metrics["gap"].item() == pytest.approx((1 - 0.25) / 2)


def test_the_tutorial_config_selects_the_plugin(tutorial_plugin_installed, tmp_path):
    from aligner.config import load_config
    from aligner.training.stages import prepare_stages

    stage = yaml.safe_load(tutorial_block("config"))["stages"][0]
    data = ROOT / "aligner" / "quickstart" / "data" / "preference_train.jsonl"
    stage["data"]["train"] = str(data)
    config = load_config({"output_dir": str(tmp_path / "run"), "model": {"tiny": {}}, "stages": [stage]})
    (prepared,) = prepare_stages(config)
    (loss, weight), = prepared.losses
    assert loss.name == "mean_hinge" and loss.options.margin == 0.5 and weight == 1.0
    assert prepared.reference_name == "none"  # reference-free: no reference model at all


def test_the_tutorials_option_typo_message_is_what_aligner_prints(tutorial_plugin_installed, tmp_path):
    from aligner.config import load_config
    from aligner.errors import ConfigError
    from aligner.training.stages import prepare_stages

    stage = yaml.safe_load(tutorial_block("config"))["stages"][0]
    stage["data"]["train"] = str(ROOT / "aligner" / "quickstart" / "data" / "preference_train.jsonl")
    stage["losses"] = [{"name": "mean_hinge", "margn": 0.5}]
    config = load_config({"output_dir": str(tmp_path / "run"), "model": {"tiny": {}}, "stages": [stage]})
    with pytest.raises(ConfigError) as info:
        prepare_stages(config)
    message = str(info.value)
    assert message.startswith("unknown option 'stages[0].losses[0].margn' for 'mean_hinge'")
    assert message.endswith("(did you mean 'margin'?)")
    assert "unknown option 'stages[0].losses[0].margn' for 'mean_hinge'" in DOCS.read_text()


# --- the kinds table: every kind documented, with a hook, listed, and each built-in plugin tested ---------


def docs_sections(level: str = "### ") -> dict[str, str]:
    """Heading text -> the section's text, up to the next heading of the same or a higher level."""
    text = DOCS.read_text()
    sections = {}
    for part in re.split(rf"\n(?={re.escape(level)}|## )", text)[1:]:
        if part.startswith(level):
            heading, _, body = part.partition("\n")
            sections[heading[len(level):].strip()] = body
    return sections


def slug(heading: str) -> str:
    """The anchor GitHub makes of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def kinds_table_rows() -> list[str]:
    """The docs' kinds table as aligner.kinds.KINDS says it must read."""
    from aligner.kinds import KINDS

    return [f"| `{k.name}` | [`{k.hook}`](#{k.hook}) | [`{k.protocol.__name__}`](#{k.anchor}) | "
            f"{f'`{k.base}`' if k.base else '-'} | {k.description} |" for k in KINDS]


def test_every_kind_has_a_registration_hook_and_every_registration_hook_a_kind():
    from aligner.kinds import KINDS

    registration = {name for name in hookspec_signatures() if name.startswith("register_")}
    assert sorted(k.hook for k in KINDS) == sorted(registration)
    assert len({k.name for k in KINDS}) == len(KINDS)


def test_the_docs_kinds_table_is_the_kinds_table():
    text = DOCS.read_text()
    table = text.split("<!-- kinds table", 1)[1].split("<!-- end kinds table -->", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == kinds_table_rows(), "regenerate the table in docs/plugins.md from aligner.kinds.KINDS"


def test_every_kind_is_documented_with_each_of_its_members():
    from aligner.kinds import KINDS

    sections = docs_sections()
    anchors = {slug(heading): body for heading, body in sections.items()}
    for kind in KINDS:
        assert f"#### `{kind.hook}`" in DOCS.read_text(), f"the hook of kind {kind.name} is not documented"
        assert kind.anchor in anchors, f"docs/plugins.md has no section #{kind.anchor} for kind {kind.name}"
        assert kind.protocol.__name__ in sections, f"the section of kind {kind.name} is not named for its protocol"
        body = anchors[kind.anchor]
        for member in (*kind.required, *kind.defaults):
            assert re.search(rf"`{re.escape(member)}[`(]", body), \
                f"{kind.name} member '{member}' is not documented in docs/plugins.md#{kind.anchor}"


def test_each_protocol_declares_its_members_and_the_optional_ones_have_defaults():
    import inspect

    from aligner.kinds import KINDS

    for kind in KINDS:
        declared = set(kind.protocol.__annotations__) | {n for n in vars(kind.protocol) if not n.startswith("_")}
        assert set(kind.required) <= declared, f"{kind.protocol_path} does not declare {set(kind.required) - declared}"
        for member in kind.values:  # a required value has no default: a class must set it
            assert member not in vars(kind.protocol), f"required {kind.name} member {member} has a default"
        for member in kind.methods:
            assert inspect.isfunction(vars(kind.protocol).get(member)), f"{kind.protocol_path}.{member} is not a method"
        for member, default in kind.defaults.items():
            assert member in kind.protocol.__annotations__ or callable(default) or isinstance(default, classmethod), \
                f"optional {kind.name} member {member} is neither annotated nor a method"


def test_every_kind_is_what_aligner_plugins_lists(capsys):
    import json

    from aligner.cli import main
    from aligner.kinds import KINDS

    assert main(["plugins", "--json", "--all"]) == 0
    listed = json.loads(capsys.readouterr().out)
    kinds = {kind for plugin in listed for kind in plugin["registers"]}
    assert kinds == {k.name for k in KINDS}, "every kind has a built-in plugin, and nothing else is listed"
    for plugin in listed:  # in the table's order
        order = [k.name for k in KINDS if k.name in plugin["registers"]]
        assert list(plugin["registers"]) == order
    assert main(["plugins", "--kinds", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["hook"], r["protocol"], r["docs"]) for r in rows] == [
        (k.name, k.hook, k.protocol_path, f"docs/plugins.md#{k.anchor}") for k in KINDS]
    assert all(r["registered"] == get_registry(r["kind"]).names() for r in rows)


def test_each_builtin_plugin_of_each_kind_is_tested():
    """Every name a built-in plugin registers, of every kind, is named in some test: as a string, a
    config's ``name: x``, or its class."""
    from aligner.kinds import KINDS
    from aligner.plugins import plugin_infos

    builtin = {i.name for i in plugin_infos() if i.source == "builtin"}
    tests = "\n".join(path.read_text() for path in (ROOT / "tests").rglob("*.py"))
    untested = []
    for kind in KINDS:
        for entry in get_registry(kind.name).entries():
            if entry.plugin not in builtin:
                continue
            name, cls = re.escape(entry.name), re.escape(getattr(entry.obj, "__name__", entry.name))
            if not re.search(rf"""['"]{name}['"]|name: {name}\b|\b{cls}\b""", tests):
                untested.append(f"{kind.name} '{entry.name}'")
    assert untested == [], "built-in plugins no test names"


# --- every value a plugin receives is documented field by field; the unit-test snippet runs ----------------


def table_after(marker: str) -> list[str]:
    """The names in the first column of the first markdown table after the line starting with
    ``marker`` (``a``, ``b`` in a cell ``\\`a\\`, \\`b\\```; a call ``f(x)`` counts as ``f``)."""
    lines = DOCS.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append(line.split("|")[1])
    names = []
    for cell in rows[1:]:  # rows[0] is the header
        names.extend(re.sub(r"\(.*", "", name) for name in re.findall(r"`([^`]+)`", cell))
    return names


@pytest.mark.parametrize("marker, cls", [
    ("`SequenceLogProbs`:", "aligner.protocols.SequenceLogProbs"),
    ("`LossInputs`:", "aligner.protocols.LossInputs"),
    ("`ReferenceContext` (`aligner.protocols.ReferenceContext`) has these fields", "aligner.protocols.ReferenceContext"),
    ("What lifecycle hooks get as `run`", "aligner.training.run_state.RunState"),
])
def test_every_field_a_plugin_receives_is_documented(marker, cls):
    import dataclasses

    module_name, _, name = cls.rpartition(".")
    value_class = getattr(importlib.import_module(module_name), name)
    fields = [f.name for f in dataclasses.fields(value_class)]
    fields += [n for n, v in vars(value_class).items() if isinstance(v, property)]
    documented = table_after(marker)
    assert sorted(set(fields) - set(documented)) == [], f"fields of {name} missing from docs/plugins.md"
    assert sorted(set(documented) - set(fields)) == [], f"docs/plugins.md documents fields {name} lacks"


def test_the_docs_unit_test_snippet_runs():
    match = re.search(r"<!-- snippet: loss-unit-test -->\n```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert match, "the loss unit-test snippet is missing from docs/plugins.md"
    exec(compile(match.group(1), "docs/plugins.md (loss-unit-test)", "exec"), {})


def test_the_judge_section_documents_set_tokenizer():
    from aligner.kinds import get_kind

    section = docs_sections()["Judge"]
    for member in get_kind("judge").defaults:
        assert f"| `{member}" in section, f"optional judge member {member} is not documented"

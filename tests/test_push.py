"""Sharing a run: the model card's metadata and body, ``aligner push`` (dry run, and a real upload through
a recording stand-in for ``HfApi``), ``hub.push`` in the config, and one-line errors. No network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import aligner
from aligner.cli import main
from aligner.commands.push import PushError
from aligner.config import load_config
from aligner.errors import ConfigError

from .conftest import preference_rows, sft_rows, tiny_model, write_jsonl

SECRET = "hf_not-a-real-token-0123456789abcdef"


def _config(tmp_path: Path, **top: object) -> dict:
    """SFT (1 step) then DPO (1 step, with held-out rows)."""
    data = {"template": "plain", "max_length": 48}
    return {
        "output_dir": str(tmp_path / "run"),
        "model": tiny_model(),
        "tokenizer": "builtin",
        **top,
        "stages": [
            {"name": "sft", "data": {**data, "train": str(write_jsonl(tmp_path / "sft_rows.jsonl", sft_rows()))},
             "losses": [{"name": "sft"}], "train": {"max_steps": 1, "batch_size": 4}},
            {"name": "dpo", "data": {**data, "train": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows())),
                                     "eval": str(write_jsonl(tmp_path / "held_out.jsonl", preference_rows(4)))},
             "losses": [{"name": "dpo"}], "train": {"max_steps": 1, "batch_size": 4}},
        ],
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One trained two-stage run shared by the tests that only read it (they copy it to change it)."""
    return aligner.train(_config(tmp_path_factory.mktemp("pushrun"))).output_dir


@pytest.fixture
def run_dir(finished_run, tmp_path) -> Path:
    """A private copy of the finished run."""
    import shutil

    return Path(shutil.copytree(finished_run, tmp_path / "copy"))


def _front_matter(card: str) -> tuple[dict, str]:
    _, meta, body = card.split("---\n", 2)
    return yaml.safe_load(meta), body


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records every call, uploads nothing."""

    calls: list[tuple[str, tuple, dict]] = []
    fail_with: Exception | None = None

    def __init__(self, token=None, **kwargs):
        RecordingHfApi.calls.append(("__init__", (), {"token": token}))

    def __getattr__(self, name):
        def record(*args, **kwargs):
            RecordingHfApi.calls.append((name, args, kwargs))
            if RecordingHfApi.fail_with is not None:
                raise RecordingHfApi.fail_with
            return SimpleNamespace(commit_url=f"https://huggingface.co/{args[0]}/commit/abc")

        return record


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A token in the environment, the Hub client replaced by a recorder, offline mode lifted."""
    import huggingface_hub
    from huggingface_hub import constants

    RecordingHfApi.calls = []
    RecordingHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return RecordingHfApi


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, no login file."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


# ---------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------


def test_model_card_has_hub_metadata_stages_config_and_final_metrics(finished_run):
    card = (finished_run / "dpo" / "final" / "README.md").read_text()
    meta, body = _front_matter(card)
    assert meta == {"datasets": ["sft_rows.jsonl", "pairs.jsonl"], "tags": ["aligner", "sft", "dpo"],
                    "library_name": "transformers"}  # no base_model: the tiny model is built, not downloaded
    assert "| 1 | sft | offline (losses: sft (weight 1))" in body and "| 2 | dpo | offline (losses: dpo (weight 1))" in body
    final = json.loads((finished_run / "dpo" / "final" / "trainer_state.json").read_text())["metrics"]
    assert f"| eval/rewards/accuracies | {final['eval/rewards/accuracies']:.6g} |" in body
    assert "### Stage `sft`" in body  # the earlier stage's final metrics too
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    # the run's config, with local paths cut to their names (a card must not publish the directory layout)
    written = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config["stages"][0]["data"]["train"] == "sft_rows.jsonl" == Path(written["stages"][0]["data"]["train"]).name
    assert config["seed"] == written["seed"] and len(config["stages"]) == len(written["stages"])
    assert str(finished_run) not in yaml.safe_dump(config)
    assert "https://github.com/)" not in card and "](https://" not in card  # no placeholder link
    assert f'from_pretrained("{(finished_run / "dpo" / "final").as_posix()}")' in body


def test_base_model_is_the_hub_id_and_adapters_are_peft_cards(tmp_path):
    from aligner.reporting.model_card import model_card_text

    config = load_config(_config(tmp_path, model={"path": "Qwen/Qwen2.5-0.5B"}))
    stage = SimpleNamespace(index=1, name="dpo", config=config.stages[1], reference_name="cached",
                            peft=SimpleNamespace(name="lora"), data_format="preference")
    meta, body = _front_matter(model_card_text(config, stage, {"train/loss": 0.5}, "somewhere", adapter=True))
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["library_name"] == "peft"
    assert "AutoPeftModelForCausalLM" in body
    local = tmp_path / "my-model"
    local.mkdir()
    config = load_config(_config(tmp_path, model={"path": str(local)}))
    meta, body = _front_matter(model_card_text(config, stage, {}, "somewhere"))
    assert "base_model" not in meta and "`my-model` (a local directory)" in body  # the Hub takes ids only
    assert "merge" not in body
    _, body = _front_matter(model_card_text(config, stage, {}, "somewhere", adapter=True))
    assert "`aligner export RUN_DIR --merge` writes a merged model" in body  # the base is not on the Hub


def test_card_never_holds_credentials(tmp_path, monkeypatch):
    from aligner.reporting.model_card import model_card_text, redact

    assert redact({"judge": {"api_key": "x", "api_key_env": "OPENAI_API_KEY", "pad_token": "<pad>"}}) == \
        {"judge": {"api_key": "<redacted>", "api_key_env": "OPENAI_API_KEY", "pad_token": "<pad>"}}
    monkeypatch.setenv("HF_TOKEN", SECRET)
    config = load_config(_config(tmp_path, output_dir=str(tmp_path / SECRET)))  # reaches the card's text
    stage = SimpleNamespace(index=0, name="sft", config=config.stages[0], reference_name="none",
                            peft=SimpleNamespace(name="full"), data_format="sft")
    card = model_card_text(config, stage, {}, "x")
    assert SECRET not in card and "<redacted>" in card


# ---------------------------------------------------------------------------------------------
# aligner push --dry-run
# ---------------------------------------------------------------------------------------------


def test_dry_run_writes_the_exact_files_and_card_and_touches_no_network(run_dir, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # any use of the client would fail
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, out, err = _cli(capsys, "push", str(run_dir), "me/tiny-dpo", "--dry-run")
    assert code == 0, err
    written = run_dir / "push-dry-run"
    assert str(written) in out and "private model repository me/tiny-dpo" in out
    plan = json.loads((written / "plan.json").read_text())
    final = run_dir / "dpo" / "final"
    expected = sorted(p.name for p in final.iterdir() if p.name != "COMPLETE")
    assert [f["path"] for f in plan["files"]] == expected
    card = (written / "README.md").read_text()
    for entry in plan["files"]:
        data = card.encode() if entry["path"] == "README.md" else (final / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert (plan["repo_id"], plan["private"], plan["revision"]) == ("me/tiny-dpo", True, "main")
    assert plan["token"] == "the HF_TOKEN environment variable"
    # The uploaded card is the final model's, loading from the repository instead of the local path.
    original = (final / "README.md").read_text()
    assert card == original.replace(_load_arg(original), 'from_pretrained("me/tiny-dpo")')
    for path in run_dir.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out + err
    assert main(["verify", str(run_dir)]) == 0  # the final model was not touched; the dry run is no stage


def _load_arg(card: str) -> str:
    from aligner.reporting.model_card import LOAD_PATTERN

    return LOAD_PATTERN.search(card).group(0)


def test_dry_run_json_public_revision_and_stage(run_dir, capsys):
    code, out, err = _cli(capsys, "push", str(run_dir), "me/sft-only", "--public", "--revision", "v1",
                          "--stage", "sft", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert (plan["private"], plan["revision"], plan["final_model"]) == (False, "v1", str(run_dir / "sft" / "final"))
    assert plan["card"] == (run_dir / "push-dry-run" / "README.md").read_text()
    assert _front_matter(plan["card"])[0]["tags"] == ["aligner", "sft"]


# ---------------------------------------------------------------------------------------------
# A real push, against a recording HfApi
# ---------------------------------------------------------------------------------------------


def test_push_creates_a_private_repo_and_uploads_the_planned_files_in_one_commit(run_dir, capsys, hub):
    code, out, err = _cli(capsys, "push", str(run_dir), "me/tiny-dpo", "--revision", "exp")
    assert code == 0, err
    names = [name for name, _, _ in hub.calls]
    assert names == ["__init__", "create_repo", "create_branch", "create_commit"]
    assert hub.calls[0][2]["token"] == SECRET  # handed to the client, and only there
    assert hub.calls[1][1] == ("me/tiny-dpo",) and hub.calls[1][2]["private"] is True
    assert hub.calls[2][2] == {"branch": "exp", "repo_type": "model", "exist_ok": True}
    _, args, kwargs = hub.calls[3]
    operations = {op.path_in_repo: op for op in args[1]}
    final = run_dir / "dpo" / "final"
    assert sorted(operations) == sorted(p.name for p in final.iterdir() if p.name != "COMPLETE")
    assert operations["model.safetensors"].path_or_fileobj == str(final / "model.safetensors")
    card = operations["README.md"].path_or_fileobj
    assert b'from_pretrained("me/tiny-dpo")' in card and _front_matter(card.decode())[0]["tags"][0] == "aligner"
    assert kwargs["revision"] == "exp" and kwargs["commit_message"] == "aligner: copy (stage dpo)"
    assert "https://huggingface.co/me/tiny-dpo/commit/abc" in out
    assert SECRET not in out + err


def test_public_push_to_main_and_a_refusal_from_the_hub_is_one_line(run_dir, capsys, hub):
    assert _cli(capsys, "push", str(run_dir), "tiny-dpo", "--public")[0] == 0
    assert [n for n, _, _ in hub.calls] == ["__init__", "create_repo", "create_commit"]
    assert hub.calls[1][2]["private"] is False
    hub.fail_with = OSError(f"401 Client Error: Unauthorized for token {SECRET}\nmore detail")
    code, out, err = _cli(capsys, "push", str(run_dir), "me/tiny-dpo")
    assert code == 2
    assert err.strip().splitlines() == ["aligner: error: push to 'me/tiny-dpo' failed: OSError: 401 Client Error: "
                                        "Unauthorized for token <token>"]


# ---------------------------------------------------------------------------------------------
# Errors: one located line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no-token", "no-final-model", "bad-repo-id", "no-run-dir", "damaged", "offline",
                                  "unknown-stage"])
def test_errors_are_one_line_and_exit_2(case, run_dir, capsys, monkeypatch, no_token, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case == "offline")
    repo, target, extra = "me/model", run_dir, []
    expected = {"no-token": "no Hugging Face token to push to 'me/model': set HF_TOKEN",
                "no-final-model": f"{run_dir / 'dpo' / 'final'}: no final model",
                "bad-repo-id": "REPO_ID 'me/my/model': not a valid Hub repository id",
                "no-run-dir": f"{tmp_path / 'nowhere'}: no such directory",
                "damaged": f"{run_dir / 'dpo' / 'final'}: the final model is damaged",
                "offline": "HF_HUB_OFFLINE is set",
                "unknown-stage": "--stage dop: the run in"}[case]
    if case == "no-final-model":
        import shutil

        shutil.rmtree(run_dir / "dpo" / "final")
    elif case == "bad-repo-id":
        repo = "me/my/model"
    elif case == "no-run-dir":
        target = tmp_path / "nowhere"
    elif case == "damaged":
        weights = run_dir / "dpo" / "final" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif case == "unknown-stage":
        extra = ["--stage", "dop"]
    code, out, err = _cli(capsys, "push", str(target), repo, *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aligner: error: ") and expected in lines[0], err


def test_repo_id_comes_from_the_run_config_or_is_asked_for(run_dir, capsys):
    code, _, err = _cli(capsys, "push", str(run_dir), "--dry-run")
    assert code == 2 and "no repository id: give REPO_ID" in err
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["hub"] = {"repo_id": "team/from-config", "private": False, "revision": None, "push": False}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = _cli(capsys, "push", str(run_dir), "--dry-run", "--json")
    assert code == 0, err
    assert (json.loads(out)["repo_id"], json.loads(out)["private"]) == ("team/from-config", False)


# ---------------------------------------------------------------------------------------------
# hub.push in the config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hub", "message"), [
    ({"push": True}, "'push: true' needs 'repo_id'"),
    ({"push": True, "repo_id": "a b/c"}, "not a valid Hub repository id"),
    ({"dry_run": True, "repo_id": "a/b"}, "'dry_run' only applies with 'push: true'"),
    ({"push": True, "repo_id": "a/b", "token": "x"}, "looks like a credential"),
    ({"push": True, "repo_id": "a/b", "privat": False}, "unknown key 'hub.privat'.*did you mean 'private'"),
])
def test_hub_section_is_validated(tmp_path, hub, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, hub=hub))


def test_hub_push_dry_run_after_a_run(tmp_path):
    result = aligner.train(_config(tmp_path, hub={"push": True, "repo_id": "me/auto", "dry_run": True}))
    plan = json.loads((result.output_dir / "push-dry-run" / "plan.json").read_text())
    assert plan["repo_id"] == "me/auto" and plan["final_model"] == str(result.final_model_dir)
    assert 'from_pretrained("me/auto")' in (result.output_dir / "push-dry-run" / "README.md").read_text()


def test_hub_push_uploads_after_the_last_stage(tmp_path, hub):
    result = aligner.train(_config(tmp_path, hub={"push": True, "repo_id": "me/auto", "revision": "main"}))
    assert [n for n, _, _ in hub.calls] == ["__init__", "create_repo", "create_commit"]
    operations = hub.calls[2][1][1]
    assert {op.path_in_repo for op in operations} >= {"model.safetensors", "README.md", "config.json"}
    assert hub.calls[2][2]["commit_message"] == "aligner: run (stage dpo)"
    assert result.final_model_dir.name == "final"


def test_hub_push_without_a_token_stops_before_training(tmp_path, no_token):
    with pytest.raises(PushError, match="no Hugging Face token.*nothing was trained"):
        aligner.train(_config(tmp_path, hub={"push": True, "repo_id": "me/auto"}))
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_card_names_hub_datasets_local_files_and_mixtures():
    from aligner.reporting.model_card import describe_source, source_names

    hub = SimpleNamespace(path="trl-lib/ultrafeedback_binarized", subset=None, split="train_prefs", weight=2.0,
                          fraction=None, data_files=None, dataset=None)
    files = SimpleNamespace(path="json", data_files={"train": ["/data/a.jsonl", "/data/b.jsonl"]}, subset=None,
                            split=None, weight=1.0, fraction=None, dataset=None)
    memory = SimpleNamespace(path="<in-memory Dataset (8 rows)>", dataset=object(), subset=None, split=None,
                             weight=None, fraction=None, data_files=None)
    assert source_names("/home/me/data/pairs.jsonl") == ["pairs.jsonl"]
    assert source_names("org/name") == ["org/name"]
    assert source_names([hub, files, memory]) == ["trl-lib/ultrafeedback_binarized", "a.jsonl", "b.jsonl"]
    assert describe_source([hub, memory]) == ("`trl-lib/ultrafeedback_binarized` (split train_prefs, weight 2) + "
                                              "`<in-memory Dataset (8 rows)>`")
    assert describe_source("/home/me/data/pairs.jsonl") == "`pairs.jsonl`"

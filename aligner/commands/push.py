"""Share a run's final model on the Hugging Face Hub: ``aligner push`` and the config's ``hub.push``.

What is uploaded is the last stage's ``final/`` directory exactly as the run wrote it (weights or
adapter, tokenizer, config, ``trainer_state.json``), minus aligner's ``COMPLETE`` checksum marker, with
its model card's load snippet pointed at the repository. ``final/`` itself is never modified (its
checksums would no longer match), so the card goes up from memory in the same commit.

The token comes from the environment only: ``HF_TOKEN`` or huggingface_hub's own login store
(``hf auth login``), looked up by huggingface_hub. It is never read from the config, printed, logged
or written. ``--dry-run`` (``hub.dry_run``) writes the exact file list and card to
``RUN_DIR/push-dry-run/`` and touches no network.

Plugin: with ``hub.push: true`` the token is checked when the first stage starts (a missing token
stops the run before it trains, not after) and the final model is pushed when the last stage ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aligner.errors import AlignerError, ConfigError, os_error
from aligner.hookspecs import hookimpl

log = logging.getLogger("aligner")

DRY_RUN_DIR = "push-dry-run"
SKIPPED = ("COMPLETE",)  # aligner's checksum manifest: meaningless outside the run directory
LOGIN_HINT = "set HF_TOKEN in the environment or log in with `hf auth login`"


class PushError(AlignerError):
    """The push could not be made: no token, no final model, the Hub refused or could not be reached."""


def token_source() -> str | None:
    """Where huggingface_hub would take the token from, without reading it; ``None`` when nowhere."""
    from huggingface_hub import constants

    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the HF_TOKEN environment variable"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return "huggingface_hub's login (hf auth login)"
    return None


@dataclass
class PushFile:
    """One file of the upload: its path in the repository, where it comes from, size and SHA-256."""

    path_in_repo: str
    source: Path | None  # None: the card, uploaded from memory
    size: int
    sha256: str


@dataclass
class PushPlan:
    """Everything one push would do, computed without network; ``upload`` carries it out."""

    repo_id: str
    private: bool
    revision: str | None
    commit_message: str
    final_dir: Path
    card: str
    files: list[PushFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (``plan.json`` of a dry run, ``--json``); holds no token."""
        return {
            "repo_id": self.repo_id, "repo_type": "model", "private": self.private,
            "revision": self.revision or "main", "commit_message": self.commit_message,
            "final_model": str(self.final_dir), "token": token_source(),
            "files": [{"path": f.path_in_repo, "size": f.size, "sha256": f.sha256,
                       "from": str(f.source) if f.source else "model card (README.md of this dry run)"}
                      for f in self.files],
        }


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as a dict, or ``{}`` when there is none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from aligner.data.loading import read_text

    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML; is this an aligner run directory?") from None
    return data if isinstance(data, dict) else {}


def locate_run(path: Path) -> tuple[Path, Path | None]:
    """(the run directory, the final model directory when ``path`` names one itself)."""
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise PushError(f"{path}: {what} (push takes a run's output directory)")
    from aligner.training.checkpoint_manifest import MARKER

    if path.name == "final" and (path / MARKER).is_file():
        return path.parent.parent, path
    return path, None


def _verified(final: Path) -> dict[str, dict[str, Any]]:
    """The files of an intact final model, ``{path: {size, sha256}}``; a damaged one is refused."""
    from aligner.training.checkpoint_manifest import MARKER, file_sha256, verify_checkpoint

    verification = verify_checkpoint(final)
    if not verification.usable:
        raise PushError(f"{final}: the final model is {verification.status}: "
                        f"{verification.describe() or verification.note} (see `aligner verify`); nothing was pushed")
    try:
        manifest = json.loads((final / MARKER).read_text())
        if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
            return manifest["files"]  # just verified against the files: no need to hash them again
        # A final model from before manifests (its marker says only "ok"): hash the files here.
        names = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
        return {n: dict(zip(("size", "sha256"), file_sha256(final / n), strict=True)) for n in names if n != MARKER}
    except (OSError, ValueError) as exc:
        raise PushError(f"{final}: could not read the final model's files: {exc}") from exc


def final_model_dir(run_dir: Path, stage: str | None, config: dict[str, Any]) -> Path:
    """The final model directory of ``stage`` (default: the run's last stage)."""
    names = [s.get("name") for s in config.get("stages", []) if isinstance(s, dict)]
    if stage is None:
        if not names:
            raise PushError(f"{run_dir}: no config.yaml naming the run's stages; is this an aligner run directory? "
                            "(pass --stage NAME to pick a stage's final model)")
        stage = names[-1]
    elif names and stage not in names:
        from aligner.errors import suggest

        raise PushError(f"--stage {stage}: the run in {run_dir} has no such stage (stages: {', '.join(names)})"
                        f"{suggest(stage, names)}")
    final = run_dir / stage / "final"
    if not final.is_dir():
        raise PushError(f"{final}: no final model (the stage '{stage}' has not finished; resume the run with "
                        "`aligner train CONFIG --resume`)")
    return final


def plan_push(run_dir: str | Path, repo_id: str | None = None, private: bool | None = None,
              revision: str | None = None, stage: str | None = None, commit_message: str | None = None,
              final_dir: Path | None = None) -> PushPlan:
    """Work out a push of a run's final model: which files, which card, where. No network.

    ``repo_id``, ``private``, ``revision`` and ``commit_message`` default to the run's ``hub`` section
    (``private``: true). ``final_dir`` skips the look-up (the runner knows it).
    """
    # Imported here: the config package loads torch, and `aligner --help` must not.
    from aligner.config.schema import repo_id_problem

    run_dir, named_final = locate_run(Path(run_dir))
    config = _read_run_config(run_dir)
    hub = config.get("hub") or {}
    repo_id = repo_id or hub.get("repo_id")
    if not repo_id:
        raise PushError(f"no repository id: give REPO_ID (e.g. `aligner push {run_dir} my-name/my-model`) or set "
                        "hub.repo_id in the run's config")
    problem = repo_id_problem(repo_id)
    if problem:
        raise PushError(f"REPO_ID '{repo_id}': {problem}")
    final = final_dir or named_final or final_model_dir(run_dir, stage, config)
    manifest = _verified(final)
    if "README.md" not in manifest:
        raise PushError(f"{final / 'README.md'}: the final model has no model card")
    from aligner.reporting.model_card import LOAD_PATTERN, scrub_environment_secrets

    try:
        card = (final / "README.md").read_text(encoding="utf-8")
    except OSError as exc:
        raise os_error(exc, final / "README.md", "could not read") from exc
    # The card's load snippet names the local directory it was written to; on the Hub it is the repository.
    card = scrub_environment_secrets(LOAD_PATTERN.sub(f'from_pretrained("{repo_id}")', card))
    files = []
    for name, entry in sorted(manifest.items()):
        if name in SKIPPED:
            continue
        if name == "README.md":
            data = card.encode()
            files.append(PushFile(name, None, len(data), hashlib.sha256(data).hexdigest()))
        else:
            files.append(PushFile(name, final / name, int(entry["size"]), str(entry["sha256"])))
    private = hub.get("private", True) if private is None else private
    message = commit_message or hub.get("commit_message") or f"aligner: {run_dir.name} (stage {final.parent.name})"
    return PushPlan(repo_id=repo_id, private=private, revision=revision or hub.get("revision"),
                    commit_message=message, final_dir=final, card=card, files=files)


def write_dry_run(plan: PushPlan, directory: Path) -> Path:
    """Write what would be uploaded: ``README.md`` (the card, byte for byte) and ``plan.json``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "README.md").write_text(plan.card, encoding="utf-8")
        (directory / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise os_error(exc, directory, "could not write the dry run to") from exc
    return directory


def _get_token() -> str | None:
    """huggingface_hub's token (``HF_TOKEN``, its login store, or a CI identity exchange), or ``None``."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception as exc:  # an identity exchange (HF_OIDC_RESOURCE) that failed: say so in one line
        raise PushError(f"could not get a Hugging Face token: {type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]}") from exc


def upload(plan: PushPlan) -> str:
    """Create the repository (private unless told otherwise) and upload the plan's files in one commit.

    Returns the commit's URL. The token is looked up by huggingface_hub (``HF_TOKEN`` or its login
    store) and handed to the client only.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it to push, or use --dry-run (hub.dry_run) to see the upload")
    token = _get_token()
    if not token:
        raise PushError(f"no Hugging Face token to push to '{plan.repo_id}': {LOGIN_HINT}")
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                      path_or_fileobj=str(f.source) if f.source else plan.card.encode())
                  for f in plan.files]
    # Everything the Hub client raises here (its HTTP library's errors, OSError for HTTP statuses,
    # ValueError for refused arguments) means the same to the user: nothing or not all was pushed.
    try:
        api.create_repo(plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
        commit = api.create_commit(plan.repo_id, operations, commit_message=plan.commit_message,
                                   repo_type="model", revision=plan.revision)
    except Exception as exc:  # noqa: BLE001 - see above; --debug shows the original
        reason = (str(exc).strip().splitlines() or [""])[0].replace(token, "<token>")
        raise PushError(f"push to '{plan.repo_id}' failed: {type(exc).__name__}: {reason}") from exc
    return str(getattr(commit, "commit_url", "") or f"{constants.ENDPOINT}/{plan.repo_id}")


def describe(plan: PushPlan) -> str:
    """A human summary of a plan: destination, files with sizes, total."""
    total = sum(f.size for f in plan.files)
    lines = [f"{'private' if plan.private else 'public'} model repository {plan.repo_id}, branch "
             f"{plan.revision or 'main'}: {len(plan.files)} files, {total / 1e6:.1f} MB from {plan.final_dir}"]
    lines += [f"  {f.path_in_repo}  {f.size} bytes" for f in plan.files]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The ``aligner push`` command
# ---------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``push`` subcommand to the CLI."""
    push = sub.add_parser("push", help="push a run's final model and its model card to the Hugging Face Hub")
    push.add_argument("run_dir", help="a run's output directory")
    push.add_argument("repo_id", nargs="?", default=None,
                      help="'name' or 'namespace/name' (default: hub.repo_id of the run's config)")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the repository private (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repository public")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing; default: main)")
    push.add_argument("--stage", default=None, help="stage whose final model to push (default: the last one)")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument("--dry-run", action="store_true",
                      help=f"write the files list and card to RUN_DIR/{DRY_RUN_DIR}/ and upload nothing")
    push.add_argument("--json", action="store_true", help="print the plan (with the card) as JSON")
    push.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``aligner push``: 0 when pushed (or planned, with ``--dry-run``); errors exit 2."""
    plan = plan_push(args.run_dir, args.repo_id, args.private, args.revision, args.stage, args.message)
    if args.dry_run:
        run_dir = plan.final_dir.parent.parent
        written = write_dry_run(plan, run_dir / DRY_RUN_DIR)
        if args.json:
            print(json.dumps({**plan.to_dict(), "card": plan.card, "written_to": str(written)}, indent=2))
        else:
            print(f"dry run: would push to the {describe(plan)}\nthe card and plan.json are in {written}; "
                  f"nothing was uploaded")
            if token_source() is None:
                print(f"note: a real push needs a token: {LOGIN_HINT}")
        return 0
    url = upload(plan)
    if args.json:
        print(json.dumps({**plan.to_dict(), "commit_url": url}, indent=2))
    else:
        print(f"pushed to the {describe(plan).splitlines()[0]}\n{url}")
    return 0


# ---------------------------------------------------------------------------------------------
# ``hub.push: true``: lifecycle hooks
# ---------------------------------------------------------------------------------------------


def _settings(run: Any) -> Any:
    hub = run.config.hub
    return hub if hub is not None and hub.push and run.is_main_process else None


@hookimpl
def on_run_start(run):
    """Refuse to train a run that is to be pushed when no token is there to push it with.

    Checked on every process, not only the one that pushes: a main process stopping alone would leave
    the others waiting for it in the first collective.
    """
    hub = run.config.hub
    if hub is None or not hub.push or hub.dry_run:
        return
    if not _get_token():
        raise PushError(f"hub.push is true but there is no Hugging Face token to push to '{hub.repo_id}': "
                        f"{LOGIN_HINT} (or set hub.dry_run: true); nothing was trained")


@hookimpl
def on_run_end(run, metrics):
    """After the last stage's final model is written: push it (or write the dry run)."""
    hub = _settings(run)
    if hub is None or run.stage.index != len(run.config.stages) - 1:
        return
    final = run.stage_dir / "final"
    plan = plan_push(run.output_dir, hub.repo_id, hub.private, hub.revision, commit_message=hub.commit_message,
                     final_dir=final)
    if hub.dry_run:
        written = write_dry_run(plan, run.output_dir / DRY_RUN_DIR)
        log.info("hub.dry_run: would push %d files to %s; the card and plan are in %s", len(plan.files),
                 plan.repo_id, written)
        return
    try:
        url = upload(plan)
    except PushError as exc:
        raise PushError(f"{exc}; the final model is saved in {final}: push it later with "
                        f"`aligner push {run.output_dir} {plan.repo_id}`") from exc
    log.info("pushed %s to %s (%s)", final, url, "private" if plan.private else "public")

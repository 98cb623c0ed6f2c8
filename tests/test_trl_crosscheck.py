"""First-step losses of aligner's DPO, IPO, hinge, robust DPO, KTO, ORPO and reward training against TRL 1.16.

Each test builds TRL's own trainer on a tiny model and four quickstart rows, takes TRL's first
training batch and its loss for it (``compute_loss`` / ``get_batch_loss_metrics``: what the first
step back-propagates), then gives aligner *the same tokens* (the batch converted to aligner's layout)
and the same model weights, and compares. The reference model is a differently seeded model, not a
copy of the policy, so the log-ratios are far from 0 and the comparison is not trivially ``log 2``.

Deliberate differences, checked as such:
- ORPO: TRL's NLL term covers prompt and completion tokens; aligner's covers the chosen completion
  only (the paper's Eq. 6). The odds-ratio part and the logged log-odds must match exactly, and
  aligner's NLL must equal the completion-only cross-entropy.
"""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from aligner.config import TinyModelConfig
from aligner.losses.dpo import DPOLoss, IPOLoss
from aligner.losses.dpo_variants import HingeLoss, RobustDPOLoss
from aligner.losses.kto import KTOLoss
from aligner.losses.orpo import ORPOLoss
from aligner.losses.reward_model import RewardModelLoss
from aligner.modeling.loading import build_tiny_model, build_tiny_reward_model
from aligner.modeling.logprobs import completion_logprobs
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from aligner.protocols import PREFERENCE, UNPAIRED, ReferenceContext
from aligner.references.frozen_copy import FrozenCopyReference
from aligner.training.micro_batch import compute_losses

from .conftest import QUICKSTART_DATA

TOLERANCE = 1e-4
SPEC = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_builtin_tokenizer()
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="module")
def rows():
    lines = (QUICKSTART_DATA / "preference_train.jsonl").read_text().splitlines()[:4]
    return [json.loads(line) for line in lines]


@pytest.fixture(autouse=True)
def quiet_trl_and_reset_accelerate(caplog):
    """Quiet TRL's logs; afterwards forget the process-wide accelerate state TRL's trainers set up,
    which would otherwise clash with the Accelerator of any later ``aligner.train`` in this process."""
    from accelerate.state import AcceleratorState, PartialState

    caplog.set_level(logging.ERROR)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def lm(tokenizer, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny_model(SPEC, tokenizer, torch.float32)


def common_args(tmp_path) -> dict:
    # Full precision, as aligner runs on CPU (TRL's configs default to bf16 where it is available).
    return {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "save_strategy": "no",
            "logging_strategy": "no", "bf16": False}


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def aligner_batch(input_ids, attention_mask, completion_mask, rows: int, **more) -> dict:
    """A TRL batch in aligner's layout: right-padded rows, completion mask, prompt lengths, row ids."""
    completion_mask = completion_mask.long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask.long(),
        "completion_mask": completion_mask,
        "prompt_lengths": completion_mask.argmax(-1),
        "row_ids": torch.arange(rows),
        **more,
    }


def stage_for(losses, data_format, reference_model=None, forward_kind="logprobs"):
    """The parts of a PreparedStage that ``compute_losses`` reads.

    The reference is the trainer's ``ref_model`` as TRL prepared it (its log-probs differ from the
    model handed to TRL in the fourth decimal), so both sides score with identical weights.
    """
    reference = None
    if reference_model is not None:
        reference = FrozenCopyReference()
        reference.setup(ReferenceContext(policy=reference_model, logprobs_fn=completion_logprobs, peft_backend=None,
                                         device=torch.device("cpu"), run_dir=""))
    return SimpleNamespace(
        losses=[(loss, 1.0) for loss in losses], data_format=data_format, reference=reference,
        losses_need_reference=any(loss.needs_reference for loss in losses),
        needs_token_logps=False,
        needs_kl_completions=any(getattr(loss, "needs_kl_completions", False) for loss in losses),
        forward_kind=forward_kind,
    )


@pytest.mark.parametrize(("trl_loss", "beta", "ours"), [
    ("sigmoid", 0.1, DPOLoss(DPOLoss.Options(beta=0.1))),
    # IPO: both length-normalise the log-ratios (TRL's form, confirmed by the IPO authors). beta 0.5
    # keeps the loss near 1: at beta 0.1 it is ~25 and float32 summation order alone moves it by 3e-4.
    ("ipo", 0.5, IPOLoss(IPOLoss.Options(beta=0.5))),
    ("hinge", 0.1, HingeLoss(HingeLoss.Options(beta=0.1))),
    ("robust", 0.1, RobustDPOLoss(RobustDPOLoss.Options(beta=0.1, label_smoothing=0.1))),
])
def test_dpo_family_first_step_matches_trl(tmp_path, tokenizer, rows, trl_loss, beta, ours):
    from trl import DPOConfig, DPOTrainer

    policy, reference = lm(tokenizer, 0), lm(tokenizer, 1)
    args = DPOConfig(per_device_train_batch_size=4, beta=beta, loss_type=[trl_loss],
                     label_smoothing=0.1 if trl_loss == "robust" else 0.0, **common_args(tmp_path))
    # TRL's DPOTrainer needs ref_model for an in-memory model (it would otherwise load one by name).
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = first_batch(trainer)
    expected = trainer.compute_loss(trainer.model, dict(batch)).item()

    ours_batch = aligner_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], rows=4)
    loss, _ = compute_losses(trainer.model, stage_for([ours], PREFERENCE, trainer.ref_model), ours_batch)
    assert loss.item() == pytest.approx(expected, abs=TOLERANCE)
    assert abs(expected - 0.6931) > 1e-3 or trl_loss != "sigmoid"  # a real log-ratio gap was compared


def test_kto_first_step_matches_trl(tmp_path, tokenizer, rows):
    from trl import KTOConfig, KTOTrainer
    from trl.data_utils import unpair_preference_dataset

    # Seeds for which the mismatched log-ratios average above 0, so the KL reference point is not clamped.
    policy, reference = lm(tokenizer, 1), lm(tokenizer, 0)
    # Paired rows unpaired by TRL's own helper: 4 desirable rows, then 4 undesirable ones.
    dataset = unpair_preference_dataset(Dataset.from_list(rows))
    args = KTOConfig(per_device_train_batch_size=8, beta=0.1, desirable_weight=1.3, undesirable_weight=1.0,
                     **common_args(tmp_path))
    trainer = KTOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    batch = first_batch(trainer)
    expected = trainer.compute_loss(trainer.model, dict(batch)).item()

    ours_batch = aligner_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], rows=8,
                               labels=batch["label"].bool())
    # aligner builds the mismatched pairs itself: they must be TRL's (x_i, y_{i-1}) pairs, token for token.
    from aligner.data.mismatch import mismatched_batch

    ours_kl = mismatched_batch(ours_batch)
    for i in range(8):
        theirs = batch["KL_input_ids"][i][batch["KL_attention_mask"][i].bool()]
        assert ours_kl["input_ids"][i][ours_kl["attention_mask"][i].bool()].tolist() == theirs.tolist()

    kto = KTOLoss(KTOLoss.Options(beta=0.1, desirable_weight=1.3, undesirable_weight=1.0))
    loss, metrics = compute_losses(trainer.model, stage_for([kto], UNPAIRED, trainer.ref_model), ours_batch)
    assert loss.item() == pytest.approx(expected, abs=TOLERANCE)
    assert metrics["kl"].item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=TOLERANCE)
    assert metrics["kl"].item() > 1e-3  # the reference point was estimated, not clamped to 0


def test_orpo_first_step_matches_trl_except_for_the_prompt_nll(tmp_path, tokenizer, rows):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = lm(tokenizer, 0)
    args = ORPOConfig(per_device_train_batch_size=4, beta=0.1, **common_args(tmp_path))
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = first_batch(trainer)
    expected, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_odds_term = expected.item() - float(trl_metrics["nll_loss"])

    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def padded(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    input_ids = torch.cat([padded(batch["chosen_input_ids"], tokenizer.pad_token_id),
                           padded(batch["rejected_input_ids"], tokenizer.pad_token_id)])
    attention = torch.cat([padded(batch["chosen_attention_mask"], 0), padded(batch["rejected_attention_mask"], 0)])
    labels = torch.cat([padded(batch["chosen_labels"], -100), padded(batch["rejected_labels"], -100)])
    ours_batch = aligner_batch(input_ids, attention, labels != -100, rows=4)
    loss, metrics = compute_losses(trainer.model, stage_for([ORPOLoss(ORPOLoss.Options(beta=0.1))], PREFERENCE),
                                   ours_batch)

    assert loss.item() - metrics["nll_loss"].item() == pytest.approx(trl_odds_term, abs=TOLERANCE)
    assert metrics["log_odds_chosen"].item() == pytest.approx(float(trl_metrics["log_odds_chosen"]), abs=TOLERANCE)
    assert metrics["rewards/chosen"].item() == pytest.approx(float(trl_metrics["rewards/chosen"]), abs=TOLERANCE)
    # The deliberate difference: aligner's NLL is over the chosen completion tokens only.
    with torch.no_grad():
        logits = trainer.model(input_ids=input_ids[:4], attention_mask=attention[:4]).logits
    completion_nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:4, 1:].reshape(-1))
    assert metrics["nll_loss"].item() == pytest.approx(completion_nll.item(), abs=TOLERANCE)
    assert abs(metrics["nll_loss"].item() - float(trl_metrics["nll_loss"])) > 1e-3  # TRL also scores the prompt


def test_reward_model_first_step_matches_trl(tmp_path, tokenizer, rows):
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = build_tiny_reward_model(SPEC, tokenizer, torch.float32)
    with_margins = [dict(row, margin=0.5 * i) for i, row in enumerate(rows)]
    args = RewardConfig(per_device_train_batch_size=4, center_rewards_coefficient=0.01, **common_args(tmp_path))
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(with_margins),
                            processing_class=tokenizer)
    batch = first_batch(trainer)
    expected = trainer.compute_loss(trainer.model, dict(batch)).item()

    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "margin": batch["margin"], "row_ids": torch.arange(4)}
    loss_fn = RewardModelLoss(RewardModelLoss.Options(center_rewards_coefficient=0.01))
    loss, metrics = compute_losses(trainer.model, stage_for([loss_fn], PREFERENCE, forward_kind="reward"),
                                   ours_batch)
    assert loss.item() == pytest.approx(expected, abs=TOLERANCE)
    assert metrics["accuracy"].item() == pytest.approx(trainer._metrics["train"]["accuracy"][-1])

"""Run one GRPO-family update (``accumulate_update``) over a fixed global batch of 8 rows, on 1 process
or split over 2 DDP processes (torchrun, gloo), and save the loss and the synced gradients for each
aggregation mode to ``OUT/<mode>.safetensors``. ``test_online_algorithms`` compares the two."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from aligner.algorithms.policy_gradient import PolicyGradientOptions, accumulate_update
from aligner.modeling.logprobs import completion_logprobs
from aligner.online.rollout import rollout_batch

ROWS = 8


class Step:
    """The members of ``StepServices`` that ``accumulate_update`` uses, over a plain (DDP) model."""

    def __init__(self, model: torch.nn.Module, rank: int, world: int):
        self.model, self.process_index, self.num_processes = model, rank, world
        self.device = torch.device("cpu")

    def micro_batch(self, sync: bool = True):
        return contextlib.nullcontext() if sync or self.num_processes == 1 else self.model.no_sync()

    def backward(self, loss, observed=None, batch=None):
        loss.backward()

    def all_reduce_sum(self, tensor):
        if self.num_processes > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor


def global_rows() -> list[tuple[list[int], list[int]]]:
    """8 (prompt, completion) id lists of unequal lengths, the same on every process."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(ROWS):
        prompt = torch.randint(3, 60, (3 + i % 4,), generator=generator).tolist()
        completion = torch.randint(3, 60, (2 + (5 * i) % 7,), generator=generator).tolist()
        rows.append((prompt, completion))
    return rows


def main(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    inner = LlamaForCausalLM(config)
    model = torch.nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
    # Unequal shares (5 and 3 rows: 2 and 1 micro-batches of 3), as after DAPO drops groups: the
    # process with fewer micro-batches runs a zero-weight one so that both sync the same number of times.
    mine = list(range(ROWS)) if world == 1 else (list(range(5)) if rank == 0 else list(range(5, ROWS)))
    rows = global_rows()
    batch = rollout_batch([rows[i][0] for i in mine], [rows[i][1] for i in mine], pad_token_id=0, row_ids=mine)
    with torch.no_grad():
        current = completion_logprobs(inner, batch, token_level=True)
    # Row-constant offsets: the same for a row in either layout of the batch.
    row = torch.tensor(mine, dtype=torch.float32)[:, None]
    advantages = torch.randn(ROWS, generator=torch.Generator().manual_seed(1))[mine][:, None] * current.mask
    tensors = {"old_logps": current.token_logps - 0.05 * (row % 3), "reference_logps": current.token_logps + 0.02 * (row % 2 + 1),
               "advantages": advantages, "loss_mask": current.mask,
               # A generator a little off the trainer, so the truncated IS correction weighs tokens unequally.
               "generator_logps": current.token_logps - 0.3 * (row % 4)}
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        options = PolicyGradientOptions(judge={"name": "rule", "regex": "e"}, kl_coef=0.1, kl_in="loss",
                                        aggregation=aggregation, micro_batch_size=3, max_new_tokens=8,
                                        clip_high=0.28, dual_clip=3.0, importance_correction="token")
        inner.zero_grad(set_to_none=True)
        metrics = accumulate_update(Step(model, rank, world), batch, tensors, torch.arange(len(mine)), options)
        # Each process's loss is its share times the process count; their mean is the global loss.
        loss = Step(model, rank, world).all_reduce_sum(metrics["loss"].detach().reshape(1)) / world
        if rank == 0:
            grads = {name: p.grad.detach().clone() for name, p in inner.named_parameters() if p.grad is not None}
            save_file({**grads, "loss": loss}, str(out / f"{aggregation}.safetensors"))
    if world > 1:
        torch.distributed.barrier()  # rank 0's files are written before anyone leaves


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Leave without running destructors: a DDP wrapper that outlives its gloo group can hang in one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

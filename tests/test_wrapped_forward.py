"""Under DDP the chunked and shared-prompt paths run as the wrapper's forward and leave it as it was."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aligner.data.batching import collate
from aligner.logprobs import completion_logprobs, forward_layout, plain_completion_logprobs

from .test_shared_prompt import PAD, _examples, _model


def test_ddp_model_runs_the_shared_prompt_path_through_its_own_forward(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        sentinel = model.forward  # like accelerate's mixed-precision wrapper: an instance-level forward
        model.forward = sentinel
        wrapped = DistributedDataParallel(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda module, args: calls.append("ddp forward"))
        batch = collate(_examples(), "preference", PAD, share_prompt=True)
        assert forward_layout(wrapped, batch)[1] < batch["input_ids"].numel()  # packed rows are used
        got = completion_logprobs(wrapped, batch)
        assert calls == ["ddp forward"]  # DDP's own forward ran (it prepares the gradient sync)
        assert model.__dict__["forward"] is sentinel  # the instance forward is back
        got.logps.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        expected = plain_completion_logprobs(model, collate(_examples(), "preference", PAD))
        torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()

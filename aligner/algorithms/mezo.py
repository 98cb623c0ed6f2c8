"""``mezo``: zeroth-order training of the stage's offline losses (Malladi et al., 2023, "Fine-Tuning
Language Models with Just Forward Passes").

MeZO estimates the gradient with SPSA along one random direction z ~ N(0, I):

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)        theta <- theta - lr (g z + wd theta)

and never stores z: it is regenerated from a per-step seed, weight by weight, each time it is needed
(the "seed trick"). There is no backward pass and no gradient, so training needs the memory of
inference. The losses, data formats, batches and evaluation are exactly the ``offline``
algorithm's (this class is that algorithm with another ``train_step``).

Of the runner's ``StepServices.update`` MeZO keeps the non-finite guard (a non-finite L+ or L-
skips the step, counted and limited by ``train.max_nonfinite_steps``), the LR schedule (stepped
here) and the reference's after-update call (``ema`` follows MeZO's updates). It does not use the
optimizer's ``step()`` (so AdamW, which allocates its state lazily, never holds any memory),
gradient clipping (there is no gradient) or the PEFT backend's after-step call (it reads
gradients, e.g. AdaLoRA's rank allocation).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import torch
from pydantic import Field

from aligner.algorithms.base import AlgorithmContext, AlgorithmSetup, StepResult, StepServices
from aligner.algorithms.offline import OfflineAlgorithm
from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.protocols import Options
from aligner.training.micro_batch import compute_losses, move_to

# Seeds are drawn below 2**63 so they fit torch's int64 tensors (shared between processes).
_SEED_BOUND = 2**62


class MeZOOptions(Options):
    """MeZO: perturbation scale and how many directions each step averages."""

    eps: float = Field(1e-3, gt=0, description="perturbation scale of the SPSA estimate")
    num_perturbations: int = Field(1, ge=1, description="random directions averaged per step (2 forwards each)")


def perturb(parameters: Sequence[torch.nn.Parameter], seed: int, scale: float) -> None:
    """Add ``scale * z`` to every parameter in place, z ~ N(0, 1) drawn from ``seed`` parameter by
    parameter in order (the same seed and order always give the same z; z is never kept)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for p in parameters:
            generator = generators.get(p.device)
            if generator is None:
                generator = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            z = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale)


def spsa_estimate(parameters: Sequence[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], seed: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L(theta + eps z), L(theta - eps z))`` with the weights perturbed in place and restored after.

    ``loss_fn`` runs under ``torch.no_grad()``. Restoring adds ``eps z`` back, so the weights equal
    the originals up to float rounding (as in the paper's implementation: no copy is kept).
    """
    with torch.no_grad():
        perturb(parameters, seed, eps)
        loss_plus = loss_fn().detach()
        perturb(parameters, seed, -2 * eps)
        loss_minus = loss_fn().detach()
        perturb(parameters, seed, eps)
    return loss_plus, loss_minus


def spsa_update(parameters: Sequence[torch.nn.Parameter], directions: Sequence[tuple[int, float]], lr: float,
                weight_decay: float = 0.0) -> None:
    """``theta <- theta (1 - lr wd) - lr / n * sum_i g_i z_i`` over ``directions`` = ``[(seed_i, g_i)]``,
    each z_i regenerated from its seed (decoupled weight decay, as AdamW applies it)."""
    with torch.no_grad():
        if weight_decay:
            for p in parameters:
                p.mul_(1 - lr * weight_decay)
        for seed, projected_grad in directions:
            perturb(parameters, seed, -lr * projected_grad / len(directions))


class MeZO(OfflineAlgorithm):
    """The offline losses trained with forward passes only (SPSA, seed trick)."""

    name = "mezo"
    Options = MeZOOptions

    def __init__(self, options: MeZOOptions | None = None):
        super().__init__(options)
        self._seed_base = 0
        self._draws = 0

    def setup(self, context: AlgorithmContext) -> AlgorithmSetup:
        """The offline algorithm's data stream; refused under FSDP/DeepSpeed, whose sharded weights
        would draw the same z on every shard."""
        from accelerate.utils import DistributedType

        run = context.run
        if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(f"stage '{run.stage.name}': algorithm 'mezo' ('stages[{run.stage.index}].algorithm') "
                              "runs on one process or DDP, not FSDP/DeepSpeed (sharded weights)")
        plan = super().setup(context)
        # The per-step seeds are their own stream, not draws from torch's global RNG in the step: the
        # DataLoader draws from that RNG whenever it starts an epoch's iterator, which a resumed run does
        # at another step than an uninterrupted one, so global draws would differ after a resume. The
        # stream's start comes from the global RNG (the run's seed); start and position are checkpointed.
        self._seed_base = int(torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64))
        self._draws = 0
        return plan

    def train_step(self, step: StepServices) -> StepResult:
        """``num_perturbations`` SPSA estimates over the step's micro-batches, then one update."""
        assert self._micro_batches is not None and self._sampler is not None, "setup() was not called"
        run, model = step.run, step.model
        stage, train = run.stage, run.stage.config.train
        started = time.perf_counter()
        batches = []
        for _ in range(train.gradient_accumulation_steps):
            epoch, consumed, batch = next(self._micro_batches)
            batches.append(move_to(batch, step.device))
        collected: list[dict] = []

        def loss_fn() -> torch.Tensor:
            # The step's loss: the mean over its micro-batches (as the offline algorithm's accumulation),
            # then over processes, so every process sees the same L+ and L- and takes the same step.
            total = torch.zeros((), device=step.device)
            for batch in batches:
                with step.accelerator.autocast():
                    loss, metrics = compute_losses(model, stage, batch)
                step.guard.observe(loss, batch)
                collected.append(metrics)
                total = total + loss.float() / len(batches)
            return step.all_reduce_sum(total) / step.num_processes

        directions: list[tuple[int, float]] = []
        was_training = model.training
        # Eval mode (no dropout), as the paper's implementation: L+ and L- must differ only by the perturbation.
        model.eval()
        try:
            for _ in range(self.options.num_perturbations):
                seed = self._draw_seed(step)
                loss_plus, loss_minus = spsa_estimate(step.trainable, loss_fn, seed, self.options.eps)
                directions.append((seed, float((loss_plus - loss_minus) / (2 * self.options.eps))))
        finally:
            model.train(was_training)
        # The runner's guard decides on the observed losses (there are no gradients to check).
        if not step.guard.step_ok(step.trainable):
            return StepResult({}, epoch, consumed, applied=False)
        spsa_update(step.trainable, directions, lr=step.scheduler.get_last_lr()[0], weight_decay=train.weight_decay)
        with warnings.catch_warnings():
            # torch warns when a schedule steps without optimizer.step(); skipping it is the point here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            step.scheduler.step()
        step.after_weights_changed()  # a reference that follows training (ema) sees the update
        metrics = step.mean_metrics(collected)
        metrics["projected_grad"] = sum(g for _, g in directions) / len(directions)
        metrics["epoch"] = epoch + consumed / max(len(self._sampler), 1)
        metrics["steps_per_second"] = 1 / (time.perf_counter() - started)
        return StepResult(metrics, epoch, consumed, progress=("loss", "projected_grad"))

    def _draw_seed(self, step: StepServices) -> int:
        """The next seed of this stage's stream; the main process's is shared so that every process
        perturbs along the same z."""
        generator = torch.Generator().manual_seed(self._seed_base + self._draws)
        self._draws += 1
        seed = torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64, generator=generator)
        if step.num_processes > 1:
            seed = step.all_reduce_sum(seed * int(step.process_index == 0))
        return int(seed.item())

    def state_dict(self) -> dict[str, int]:
        """Where the seed stream stands (checkpointed: a resumed run draws the same seeds)."""
        return {"seed_base": self._seed_base, "draws": self._draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the seed stream of the checkpoint."""
        if state:
            self._seed_base, self._draws = int(state["seed_base"]), int(state["draws"])


@hookimpl
def register_algorithms(register):
    """Register ``mezo``."""
    register(MeZO)

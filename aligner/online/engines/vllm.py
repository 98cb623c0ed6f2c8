"""The ``vllm`` generation engine: vLLM colocated in the training process (one CUDA GPU, optional extra
``pip install 'aligner-trainer[vllm]'``), written against vLLM's public API only.

At the first rollout the policy's weights (adapters merged; with ``weight_sync: lora`` the base
weights) and tokenizer are saved to a temporary directory and a ``vllm.LLM`` is built from it. After
each optimizer update (``policy_version`` changed) vLLM's copy follows the policy:

- ``weights`` (default): the full weights, adapters merged, are handed to the model inside vLLM through
  ``LLM.apply_model`` and its ``load_weights``, and the prefix cache is reset;
- ``lora``: the LoRA adapter is saved and every request carries a new ``LoRARequest``.

Sampling is plain: ``SamplingParams(n=G, temperature, top_p, top_k=-1, min_p=0, logprobs=0)`` on
token-id prompts; vLLM's log-probs are those of the raw model output (its default ``logprobs_mode``),
the distribution the trainer scores.

This engine has not been run by aligner's tests (they have no GPU); see docs/engines.md.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from aligner.errors import AlignerError, ConfigError
from aligner.hookspecs import hookimpl
from aligner.online.engines import GenerationEngine, GenerationRequest, Generations
from aligner.online.engines.weights import full_weights, lora_problem, save_adapter, save_full
from aligner.online.sampler import cut_after_eos
from aligner.protocols import Options
from aligner.training.distributed import launch_world_size

INSTALL_HINT = "pip install 'aligner-trainer[vllm]'"


class VLLMEngine(GenerationEngine):
    """vLLM in the training process, its weights refreshed after every update."""

    name = "vllm"

    class Options(Options):
        """The ``vllm.LLM`` settings that matter beside training, and how its weights follow the policy."""

        gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description=(
            "share of the GPU's memory vLLM may take (weights and KV cache); training needs the rest"))
        dtype: str = Field("policy", description="vLLM's weights dtype: 'policy' (the policy's), or a vLLM dtype")
        max_model_len: int | None = Field(None, gt=0, description="longest prompt + completion (default: the model's)")
        enable_sleep_mode: bool = Field(False, description=(
            "free vLLM's GPU memory between rollouts (LLM.sleep / wake_up)"))
        enforce_eager: bool = Field(False, description="no CUDA graphs: less memory, slower decoding")
        weight_sync: Literal["weights", "lora"] = Field("weights", description=(
            "weights: load the full weights into vLLM after each update; lora: serve the policy's LoRA adapter"))
        max_lora_rank: int = Field(64, gt=0, description="with weight_sync: lora, the largest adapter rank")
        seed: int = Field(0, description="vLLM's own sampling seed")
        llm_kwargs: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for vllm.LLM")

    def __init__(self, options: Options):
        # Built once more while options are validated: nothing here may import vLLM or touch the GPU.
        super().__init__(options)
        self._llm: Any = None
        self._directory: Path | None = None
        self._synced: int | None = None
        self._lora: Any = None

    def check_stage(self, stage: Any) -> None:
        """Refuse without a CUDA GPU, without vLLM, with several processes, and ``lora`` sync without LoRA."""
        where = f"'stages[{stage.index}].algorithm.engine'"
        if not torch.cuda.is_available():
            raise ConfigError(f"stage '{stage.name}': the generation engine 'vllm' ({where}) needs a CUDA GPU and "
                              f"none is available: use engine {{name: hf}} or {{name: openai_server, ...}}")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"stage '{stage.name}': the generation engine 'vllm' ({where}) needs vLLM, which is "
                              f"not installed: {INSTALL_HINT}")
        if launch_world_size() > 1:
            raise ConfigError(f"stage '{stage.name}': the generation engine 'vllm' ({where}) runs in one training "
                              f"process only; with several, serve the model (vllm serve) and use openai_server")
        peft = getattr(stage, "peft", None)
        peft_name = getattr(peft, "name", stage.config.peft.name)
        if self.options.weight_sync == "lora" and peft_name in ("full", "dora"):
            raise ConfigError(f"stage '{stage.name}': '{where[1:-1]}.weight_sync' is 'lora' but the stage trains no "
                              f"plain LoRA adapter ('stages[{stage.index}].peft'): use weight_sync: weights")
        if self.options.weight_sync == "weights" and peft_name == "qlora":
            raise ConfigError(f"stage '{stage.name}': '{where[1:-1]}.weight_sync' is 'weights', but a qlora base is "
                              f"4-bit and cannot be loaded into vLLM as plain weights: use weight_sync: lora")

    def generate(self, policy: torch.nn.Module, tokenizer: Any, request: GenerationRequest) -> Generations:
        """Refresh vLLM's weights if the policy changed, then sample every prompt's group in one call."""
        from vllm import SamplingParams

        llm = self._engine(policy, tokenizer, request.policy_version)
        if self.options.enable_sleep_mode:
            llm.wake_up()
        self._sync(policy, request.policy_version)
        eos = tokenizer.eos_token_id

        def params(seed: int | None) -> Any:
            # top_k=-1 and min_p=0 spelled out: an RL rollout samples the policy's own distribution.
            return SamplingParams(n=request.samples_per_prompt, max_tokens=request.max_new_tokens,
                                  temperature=request.temperature, top_p=request.top_p, top_k=-1, min_p=0.0,
                                  logprobs=0, seed=seed, stop_token_ids=[eos] if eos is not None else None)

        sampling = params(None) if request.seed is None else \
            [params(request.seed + i) for i in range(len(request.prompt_ids))]
        try:
            outputs = llm.generate([{"prompt_token_ids": list(p)} for p in request.prompt_ids], sampling,
                                   use_tqdm=False, lora_request=self._lora)
        finally:
            if self.options.enable_sleep_mode:
                llm.sleep(level=1)  # also after a failed rollout: its GPU memory goes back to training
        result = Generations([], [])
        for output in outputs:  # in prompt order; a prompt's samples by index
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logps = [step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)]
                ids, logps = cut_after_eos(ids, logps, eos)
                result.completion_ids.append(ids)
                result.logprobs.append(logps)
        return result

    def _engine(self, policy: torch.nn.Module, tokenizer: Any, version: int) -> Any:
        if self._llm is not None:
            return self._llm
        # In-process engine core: apply_model then runs on the model object itself, so new weights are
        # handed over by reference instead of being pickled to a worker process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        lora = self.options.weight_sync == "lora"
        if lora and (problem := lora_problem(policy)) is not None:
            raise AlignerError(f"generation engine 'vllm': weight_sync 'lora' serves the policy's LoRA adapter, but "
                               f"{problem}: use weight_sync: weights")
        self._directory = Path(tempfile.mkdtemp(prefix="aligner-vllm-"))
        start = self._directory / "model"
        save_full(policy, start, merge=not lora)
        tokenizer.save_pretrained(str(start))
        dtype = str(next(policy.parameters()).dtype).removeprefix("torch.") if self.options.dtype == "policy" \
            else self.options.dtype
        kwargs: dict[str, Any] = {
            "model": str(start), "tokenizer": str(start), "dtype": dtype, "seed": self.options.seed,
            "gpu_memory_utilization": self.options.gpu_memory_utilization, "enforce_eager": self.options.enforce_eager,
            "enable_sleep_mode": self.options.enable_sleep_mode, "max_model_len": self.options.max_model_len}
        if lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.options.max_lora_rank)
        self._llm = LLM(**kwargs, **self.options.llm_kwargs)
        if not lora:
            self._synced = version  # built from the current weights
        return self._llm

    def _sync(self, policy: torch.nn.Module, version: int) -> None:
        if version == self._synced:
            return
        if self.options.weight_sync == "lora":
            from vllm.lora.request import LoRARequest

            assert self._directory is not None
            path = self._directory / f"adapter-v{version}"
            save_adapter(policy, path)
            previous = self._lora
            # A new id per version: vLLM caches adapters by id and would keep serving an old one.
            self._lora = LoRARequest(f"aligner-policy-v{version}", version + 1, str(path))
            if previous is not None:
                shutil.rmtree(previous.lora_path, ignore_errors=True)
        else:
            with full_weights(policy) as (_, state):
                self._llm.apply_model(lambda model: model.load_weights(iter(state.items())))
            self._llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self._synced = version

    def close(self) -> None:
        """Drop the engine, give its GPU memory back, remove the temporary weights."""
        if self._llm is not None:
            self._llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
        self._synced, self._lora = None, None


@hookimpl
def register_generation_engines(register):
    """Register the ``vllm`` engine."""
    register(VLLMEngine)

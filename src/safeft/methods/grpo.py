"""GRPO with safeft's rewards (TRL's ``GRPOTrainer``), and its risk-averse variant ``ra-grpo``.

GRPO (Shao et al., "DeepSeekMath", 2024, §4.1): for each prompt sample G completions, score
them, and use the group-normalised reward (r_i − mean_G r)/std_G r as every token's
advantage in a clipped policy loss, with an optional KL penalty β·KL(π_θ ‖ π_ref) (no value
model). This is TRL 1.16's ``GRPOTrainer`` (its default "dapo" token-level loss
normalisation), fed with the same prompts (``data.train``) and the same rewards
(:mod:`safeft.rl.rewards`) as ``rlhf``; under LoRA TRL's reference is the adapter-disabled
model, as in safeft.

``ra-grpo`` (ours; no paper has it): RA-RLHF's CVaR filter (Chaudhary et al. 2024) moved to
GRPO. GRPO's advantages are relative within a prompt's group, so ranking single
completions across prompts would mix scales; the filter therefore ranks the *prompts* of a
generation batch by their group's mean reward and keeps the ⌈α′·P⌉ worst prompts (all their
G completions); the others' completions are masked out of the loss. α′ follows the
RA-RLHF schedule (:mod:`safeft.rl.cvar`) over the run's optimizer steps. A generation
batch holds ``per_device_train_batch_size · steps_per_generation · N / G`` prompts (N
processes); give it several (e.g. batch 4, G 4, ``steps_per_generation`` 4 → 4 prompts) or
the tail is trivial.

Under N processes (``accelerate launch``) TRL runs the DDP loop: each process generates and
scores its part of the generation batch (a prompt's G completions may span processes) and
the rewards are gathered for the group statistics. The ``ra-grpo`` tail is chosen the same
way, over the gathered rewards of the whole generation batch, and each process then masks
its own completions; only the main process writes files.

Checkpoints and ``--resume`` are the Trainer's (``output_dir/checkpoints``, at
``training.save_strategy`` / ``save_steps``, rotated to ``save_total_limit``), with safeft's
checks: the newest usable checkpoint is resumed, broken ones are moved aside,
``metrics.jsonl`` is trimmed, and Ctrl-C / SIGTERM saves after the current step and stops
(exit 130). Resume is exact when every checkpoint falls on a generation boundary (the
default ``steps_per_generation`` = ``gradient_accumulation_steps`` generates once per
optimizer step); a checkpoint inside a generation batch resumes by sampling that batch
anew. ``ra-grpo``'s ``kept_prompts_by_generation`` lists the generations since the last start.
"""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..engine.run import atomic_write_text, process_state
from ..engine.trainer import (
    InterruptCallback, MetricsCallback, _save_final_model, last_good_checkpoint, resume_checkpoint, stop_interrupted,
)
from ..errors import ConfigError
from ..rl.cvar import keep_count, tail_indices
from ..rl.rewards import get_reward
from . import register
from .base import Method
from .rlhf import load_prompts


class GRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward: str = "toxicity"
    reward_options: dict = Field(default_factory=dict)
    num_generations: int = Field(4, ge=2, description="G, completions per prompt")
    steps_per_generation: int | None = Field(None, ge=1, description="TRL: optimizer micro-steps per generation batch")
    max_new_tokens: int = Field(48, ge=1)
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference (TRL's default is 0)")
    epsilon: float = Field(0.2, gt=0)
    temperature: float = Field(1.0, gt=0)
    chat: bool = False
    system_prompt: str | None = None


class RAGRPOParams(GRPOParams):
    alpha: float = Field(0.4, gt=0, le=1)
    n_warmup: int = Field(30, ge=0, description="optimizer steps with α′ = 1")
    rho: float = Field(0.95, gt=0, le=1)


def _trainer_class(tail):
    from trl import GRPOTrainer

    if tail is None:
        return GRPOTrainer

    class TailGRPOTrainer(GRPOTrainer):
        """Masks out every completion of the prompts outside the CVaR tail (see module doc)."""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            local = torch.tensor(tail.last_rewards, dtype=torch.float32, device=self.accelerator.device)
            rewards = self.accelerator.gather(local).cpu()  # the whole generation batch, in TRL's order
            g = self.num_generations
            groups = rewards.view(-1, g).mean(1)
            k = tail.keep(self.state.global_step, max(self.state.max_steps, 1), groups.numel())
            keep = torch.zeros(groups.numel())
            keep[tail_indices(groups, k)] = 1.0
            start = self.accelerator.process_index * len(local)  # this process's completions
            keep = keep.repeat_interleave(g)[start : start + len(local)].to(out["completion_mask"].device)
            out["completion_mask"] = out["completion_mask"] * keep[:, None].to(out["completion_mask"].dtype)
            out["num_items_in_batch"] = self.accelerator.gather(out["completion_mask"].sum()).sum()
            tail.kept.append(int(k))
            return out

    return TailGRPOTrainer


class _Tail:
    def __init__(self, p: RAGRPOParams):
        self.p, self.last_rewards, self.kept = p, [], []

    def keep(self, step: int, total: int, n: int) -> int:
        return keep_count(step, total, n, self.p.n_warmup, self.p.alpha, self.p.rho)


@register
class GRPO(Method):
    name = "grpo"
    summary = "TRL's GRPO (group-relative advantages, no value model) on safeft's rewards and prompts"
    paper = "Shao et al., DeepSeekMath (2024), §4.1; TRL GRPOTrainer"
    Params = GRPOParams
    risk_averse = False

    def train(self) -> dict:
        from datasets import Dataset
        from trl import GRPOConfig

        run, p, t = self.run, self.params, self.run.cfg.training
        prompts = load_prompts(run.cfg)
        if p.chat:
            sys_msg = [{"role": "system", "content": p.system_prompt}] if p.system_prompt else []
            rows = [{"prompt": sys_msg + [{"role": "user", "content": x}]} for x in prompts]
        else:
            rows = [{"prompt": f"{p.system_prompt}\n\n{x}" if p.system_prompt else x} for x in prompts]
        spg = p.steps_per_generation or t.gradient_accumulation_steps
        n_proc = process_state().num_processes
        if (t.per_device_train_batch_size * spg * n_proc) % p.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size × steps_per_generation × processes ({t.per_device_train_batch_size} × "
                f"{spg} × {n_proc}) must be a multiple of num_generations ({p.num_generations})",
                field="method.num_generations",
            )
        reward = get_reward(p.reward, **p.reward_options)
        tail = _Tail(p) if self.risk_averse else None

        def safeft_reward(prompts, completions, **kw):
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            plain = [x if isinstance(x, str) else x[-1]["content"] for x in prompts]
            vals = reward(plain, texts).tolist()
            if tail is not None:
                tail.last_rewards = vals
            return vals

        args = GRPOConfig(
            output_dir=str(run.output_dir / "checkpoints"), learning_rate=t.learning_rate, max_steps=t.max_steps,
            num_train_epochs=t.num_train_epochs, per_device_train_batch_size=t.per_device_train_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, steps_per_generation=spg,
            lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
            seed=t.seed, logging_steps=t.logging_steps, gradient_checkpointing=t.gradient_checkpointing,
            save_strategy=t.save_strategy, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
            report_to=t.report_to,
            use_cpu=not torch.cuda.is_available(), num_generations=p.num_generations,
            max_completion_length=p.max_new_tokens, beta=p.beta, epsilon=p.epsilon, temperature=p.temperature,
            disable_tqdm=t.disable_tqdm if t.disable_tqdm is not None else True,
        )
        interrupt = InterruptCallback()
        trainer = _trainer_class(tail)(
            model=run.model, reward_funcs=[safeft_reward], args=args, train_dataset=Dataset.from_list(rows),
            processing_class=run.tokenizer, callbacks=[MetricsCallback(run.output_dir / "metrics.jsonl"), interrupt],
        )
        resume_from = resume_checkpoint(run)
        result = trainer.train(resume_from_checkpoint=resume_from)
        if interrupt.interrupted:
            stop_interrupted(trainer.state.global_step, last_good_checkpoint(run.output_dir / "checkpoints"))
        _save_final_model(trainer, run)  # rank 0, atomically; gathered first under FSDP / DeepSpeed
        summary = {
            "method": self.name,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "num_processes": n_proc,
            "resumed_from": resume_from,
        }
        if tail is not None:
            summary["kept_prompts_by_generation"] = tail.kept
        if trainer.is_world_process_zero():
            atomic_write_text(run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        return summary


@register
class RAGRPO(GRPO):
    name = "ra-grpo"
    summary = "GRPO updated only on the prompts whose groups score worst (RA-RLHF's CVaR filter, α′ scheduled)"
    paper = "ours: Chaudhary et al. 2024's CVaR filter on Shao et al. 2024's GRPO"
    Params = RAGRPOParams
    risk_averse = True


__all__ = ["GRPO", "GRPOParams", "RAGRPO", "RAGRPOParams"]

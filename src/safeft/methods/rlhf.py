"""RLHF with PPO (Ziegler et al. 2019), the baseline of RA-RLHF (Chaudhary et al. 2024, eq. 1).

Maximises E[Σ_t γ^t (r(s_t, a_t) − β log π_θ(a_t|s_t)/π_ref(a_t|s_t))] over prompts from
``data.train`` (a ``prompt`` column, or plain text lines used as continuation prefixes,
e.g. RealToxicityPrompts). The loop, the value head, the adaptive KL coefficient and the
clipped losses are in :mod:`safeft.rl.ppo`; the reward is any spec of
:mod:`safeft.rl.rewards` (offline default: minus the toxicity logit of the response).

Iterations M = ``training.max_steps`` when set, else ⌈epochs · #prompts / B⌉. Each
iteration takes the next B prompts of a seeded shuffle (cycling). Writes
``model/`` (the policy; ``value_head.safetensors`` beside it), ``metrics.jsonl`` (one record
per iteration) and ``train_summary.json``.

Under N processes (``accelerate launch`` / ``safeft train --num-processes N``, DDP)
``method.batch_size`` is per process: each iteration takes the next N·B prompts of the same
seeded shuffle, process i rolls out the i-th block of B, and everything after the rollout
runs on the gathered N·B episodes (:mod:`safeft.rl.ppo`), as one process with batch N·B
would; only the main process writes files.

Checkpoints (``output_dir/checkpoints/checkpoint-N`` after iteration N, at
``training.save_strategy``; :mod:`safeft.engine.loop_checkpoints`) hold the trainable
weights, the value head, the optimizer, the RNG states, the KL coefficient and the prompt
order, so ``--resume`` continues a killed run exactly; Ctrl-C / SIGTERM saves one after the
current iteration and stops (exit 130). ``training.bf16`` or an accelerate config's
``mixed_precision`` runs every forward pass in the accelerator's autocast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random

from safetensors.torch import save_file

from ..data import load_rows
from ..distributed import loop_accelerator
from ..engine.loop_checkpoints import LoopCheckpoints, epoch_ended, random_state
from ..engine.run import append_jsonl, atomic_write_text
from ..engine.trainer import InterruptFlag, stop_interrupted
from ..errors import ConfigError, DataError
from ..models import save_model
from ..rl.ppo import PPOParams, PPOTrainer
from ..rl.rewards import get_reward
from . import register
from .base import Method

log = logging.getLogger(__name__)


def load_prompts(cfg) -> list[str]:
    """Prompts of ``data.train``: its prompt column, else its text column (continuation)."""
    spec = cfg.data.train
    if spec is None:
        raise ConfigError("RL methods need prompts: set data.train.path (or pass --data)", field="data.train")
    rows = load_rows(spec, cfg.data.data_dir)
    field = spec.prompt_field if spec.prompt_field in rows[0] else spec.text_field
    if field not in rows[0]:
        raise DataError(
            f"no {spec.prompt_field!r} or {spec.text_field!r} column for prompts; columns found: "
            f"{', '.join(sorted(rows[0]))}",
            field="data.train.prompt_field",
        )
    prompts = [str(r[field]).strip() for r in rows if str(r.get(field) or "").strip()]
    if not prompts:
        raise DataError(f"{spec.path}: no non-empty prompt", field="data.train")
    return prompts


@register
class RLHF(Method):
    name = "rlhf"
    summary = "PPO on a scalar reward with a per-token KL penalty to the starting model (adaptive β)"
    paper = "Ziegler et al., Fine-Tuning LMs from Human Preferences (2019); as in Chaudhary et al. 2024 (RA-RLHF), eq. 1"
    Params = PPOParams
    tail_by = "return"

    def keep(self, step: int, total: int, batch: int) -> int:
        """Episodes the update uses at 0-based ``step``: all of them for plain PPO."""
        return batch

    def iterations(self, n_prompts: int, batch: int) -> int:
        t = self.run.cfg.training
        if t.max_steps > 0:
            return t.max_steps
        return max(1, math.ceil(t.num_train_epochs * n_prompts / batch))

    def make_trainer(self, reward, accelerator) -> PPOTrainer:
        t = self.run.cfg.training
        return PPOTrainer(
            self.run.model, self.run.tokenizer, reward, self.params, learning_rate=t.learning_rate,
            max_grad_norm=t.max_grad_norm, seed=t.seed, tail_by=getattr(self.params, "tail_by", self.tail_by),
            accelerator=accelerator,
        )

    def train(self) -> dict:
        run, p, t = self.run, self.params, self.run.cfg.training
        acc = loop_accelerator(self.name, bf16=t.bf16)
        prompts = load_prompts(run.cfg)
        reward = get_reward(p.reward, **p.reward_options)
        trainer = self.make_trainer(reward, acc)
        b = p.batch_size * acc.num_processes  # the global batch
        total = self.iterations(len(prompts), b)
        rng = random.Random(t.seed)  # the same order on every process
        order: list[int] = []
        stats: dict = {}
        start = 0
        ckpts = LoopCheckpoints(run, acc, self.name, run.model, trainer.optimizer, {"value_head": trainer.value_head})
        resumed = ckpts.resume()
        if resumed:
            state, _ = resumed
            start, order, stats = state["step"], state["order"], state["stats"]
            rng.setstate(random_state(state["rng"]))
            trainer.load_state(state["ppo"])
        metrics = run.output_dir / "metrics.jsonl"
        with InterruptFlag() as interrupt:
            for step in range(start, total):
                while len(order) < b:
                    fresh = list(range(len(prompts)))
                    rng.shuffle(fresh)
                    order.extend(fresh)
                batch, order = [prompts[i] for i in order[:b]], order[b:]
                with acc.split_between_processes(batch) as mine:
                    stats = trainer.step(mine, keep=self.keep(step, total, b))
                if acc.is_main_process:
                    append_jsonl(metrics, {"step": step + 1, **stats})
                    log.info("%s iteration %d/%d: reward %.3f, kl %.3f, kept %d, %.1fs", self.name, step + 1, total,
                             stats["reward_mean"], stats["kl"], stats["kept"], stats["iter_s"])
                stop = interrupt.any_rank(acc.device)
                if stop or ckpts.due(step + 1, total, epoch_ended(step + 1, b, len(prompts))):
                    saved = ckpts.save(step + 1, {"order": order, "rng": rng.getstate(), "ppo": trainer.state(),
                                                  "stats": stats})
                if stop:
                    stop_interrupted(step + 1, saved)
        summary = {
            "method": self.name,
            "global_step": total,
            "train_loss": stats.get("pg_loss", 0.0) + p.vf_coef * stats.get("vf_loss", 0.0),
            "final_reward_mean": stats.get("reward_mean"),
            "final_kl": stats.get("kl"),
            "final_kl_coef": trainer.kl_ctl.value,
            "n_prompts": len(prompts),
            "num_processes": acc.num_processes,
            "resumed_from": ckpts.resumed_from,
        }
        if acc.is_main_process:
            out = save_model(run.model, run.tokenizer, run.output_dir / "model", merge=run.cfg.model.lora.merge)
            tmp = out / ".value_head.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in trainer.value_head.state_dict().items()}, str(tmp))
            os.replace(tmp, out / "value_head.safetensors")
            atomic_write_text(run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return summary

"""Quark: quantized reward konditioning (Lu et al., "Quark: Controllable Text Generation with
Reinforced Unlearning", NeurIPS 2022), a baseline of RA-RLHF (Chaudhary et al. 2024).

Algorithm (Lu et al., Alg. 1), per round:

1. *Exploration*: sample continuations of a batch of prompts from the current model
   conditioned on the best reward token r_K (round 0: the initial pool is sampled from the
   starting model p₀, unconditioned), score them, add them to the data pool.
2. *Quantization*: sort the pool by reward and cut it into K equal quantiles; each sample
   gets the reward token r_k of its quantile (k = K the best).
3. *Learning*: ``train_steps`` gradient steps on mini-batches from the pool with (eq. 2)::

       L = −log p_θ(y | r_k, x) + β·Σ_t KL(p₀(·|y<t, x) ‖ p_θ(·|y<t, r_k, x)) − α·Σ_t H(p_θ(·|y<t, r_k, x))

   averaged over response tokens; p₀ the starting model (adapter-disabled under LoRA).

At test time generate conditioned on r_K. Paper values for toxicity: K = 5, β = 0.05,
α = 0.06.

Reading chosen: the reward tokens are plain-text prefixes (``<|reward_k|>`` followed by a
space) rather than new vocabulary entries, so LoRA needs no embedding changes; the prefix
the trained model expects is saved in ``model/quark.json`` and must be put before every
prompt at generation time (``safeft.methods.quark.control_prefix``).

Under N processes (``accelerate launch``, DDP) ``samples_per_round`` and
``training.per_device_train_batch_size`` are per process: each round samples N·S prompts
(the same seeded draw on every rank), process i generates and scores the i-th block, and the
samples of all ranks are gathered into the pool, so every rank holds the same pool and cuts
the same reward quantiles. Each gradient step draws one global mini-batch of N·b pool
samples, split across the ranks; a rank's loss is its tokens' sum over the mini-batch's
token count, times N, so DDP's averaged gradient is the single-process one.

Checkpoints (``output_dir/checkpoints/checkpoint-N`` after round N, at
``training.save_strategy``, an "epoch" being a pass over the prompts;
:mod:`safeft.engine.loop_checkpoints`) hold the trainable weights, the optimizer, the RNG
states, the round's draw generator and the whole pool, so ``--resume`` continues a killed
run exactly; Ctrl-C / SIGTERM saves one after the current round and stops (exit 130).
``training.bf16`` or an accelerate config's ``mixed_precision`` runs sampling, the
reference and the training forward passes in the accelerator's autocast.
"""

from __future__ import annotations

import json
import logging
import random

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..distributed import gather_batches, loop_accelerator, rank_seed, reduce_stats
from ..engine.loop_checkpoints import LoopCheckpoints, epoch_ended, random_state
from ..engine.run import append_jsonl, atomic_write_text
from ..engine.trainer import InterruptFlag, stop_interrupted
from ..errors import ConfigError, DataError
from ..models import frozen_copy, is_peft, reference_mode, save_model, unwrap
from ..rl.ppo import Episodes, generate_episodes
from ..rl.rewards import get_reward
from . import register
from .base import Method
from .rlhf import load_prompts

log = logging.getLogger(__name__)


class QuarkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward: str = "toxicity"
    reward_options: dict = Field(default_factory=dict)
    n_quantiles: int = Field(5, ge=2, description="K")
    kl_coef: float = Field(0.05, ge=0, description="β")
    entropy_coef: float = Field(0.06, ge=0, description="α")
    samples_per_round: int = Field(64, ge=1, description="prompts sampled per exploration step")
    train_steps: int = Field(10, ge=1, description="gradient steps per round")
    max_new_tokens: int = Field(48, ge=1)
    max_prompt_length: int = Field(64, ge=1)
    forward_batch_size: int = Field(16, ge=1)


def control_token(k: int) -> str:
    return f"<|reward_{k}|>"


def control_prefix(k: int) -> str:
    """The text put before a prompt to condition on reward quantile ``k`` (1 = worst)."""
    return control_token(k) + " "


def quantize(rewards: list[float], n_quantiles: int) -> list[int]:
    """Quantile index 1..K per reward (K = best), by rank: the pool cut into K equal parts.

    Ties are ranked by insertion order (earlier first), so equal rewards may straddle a cut.
    """
    n = len(rewards)
    order = sorted(range(n), key=lambda i: (rewards[i], i))
    q = [0] * n
    for rank, i in enumerate(order):
        q[i] = rank * n_quantiles // n + 1
    return q


def quark_loss(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               kl_coef: float, entropy_coef: float, n_tokens=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-averaged NLL + β·KL(p₀ ‖ p_θ) − α·H(p_θ) (Lu et al. eq. 2) over ``mask``.

    ``n_tokens``: the denominator instead of ``mask.sum()`` (the whole mini-batch's token
    count when ``mask`` is one process's part of it).
    """
    logp = torch.log_softmax(logits.float(), -1)
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    ent = -(logp.exp() * logp).sum(-1)
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    parts = {name: (v * mask).sum() / n for name, v in (("nll", nll), ("kl", kl), ("entropy", ent))}
    loss = parts["nll"] + kl_coef * parts["kl"] - entropy_coef * parts["entropy"]
    return loss, {k: v.item() for k, v in parts.items()}


def pack_pool(pool: list[dict]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The pool for a checkpoint: prompts and rewards (JSON), the response ids (tensors)."""
    meta = {"prompts": [e["prompt"] for e in pool], "rewards": [e["reward"] for e in pool]}
    return meta, {"ids": torch.cat([e["ids"] for e in pool]),
                  "lengths": torch.tensor([len(e["ids"]) for e in pool], dtype=torch.long)}


def unpack_pool(meta: dict, tensors: dict[str, torch.Tensor]) -> list[dict]:
    ids = torch.split(tensors["ids"], tensors["lengths"].tolist())
    return [{"prompt": x, "ids": i, "reward": r} for x, i, r in zip(meta["prompts"], ids, meta["rewards"])]


def _response_logits(model, tokenizer, prompts, resp_ids, resp_mask, max_prompt_length):
    """Logits ``[b, L, V]`` predicting the given response tokens after each (raw-text) prompt."""
    from ..rl.ppo import _pad, encode_prompts

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = encode_prompts(tokenizer, prompts, max_prompt_length, False, None)
    q = _pad(enc, pad, left=True)
    qm = _pad([torch.ones_like(e) for e in enc], 0, left=True)
    device = next(unwrap(model).parameters()).device
    ids = torch.cat([q, resp_ids], 1).to(device)
    attn = torch.cat([qm, resp_mask], 1).to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    p, n = q.shape[1], resp_ids.shape[1]
    return unwrap(model).get_output_embeddings()(out.hidden_states[-1][:, p - 1 : p + n - 1]).float()


@register
class Quark(Method):
    name = "quark"
    summary = "reward-quantile conditioning: sample, bucket into K quantiles, train on [r_k; x] → y with a KL to p₀"
    paper = "Lu et al., Quark: Controllable Text Generation with Reinforced Unlearning (NeurIPS 2022)"
    Params = QuarkParams

    def _sample(self, prompts: list[str], k: int | None, acc) -> tuple[Episodes, torch.Tensor]:
        p = self.params
        shown = [control_prefix(k) + x for x in prompts] if k else prompts
        with acc.autocast():
            ep = generate_episodes(self.run.model, self.run.tokenizer, shown, max_new_tokens=p.max_new_tokens,
                                   max_prompt_length=p.max_prompt_length, batch_size=p.forward_batch_size)
        return ep, self.reward(prompts, ep.responses).float()

    def train(self) -> dict:
        run, p, t = self.run, self.params, self.run.cfg.training
        if t.max_steps <= 0:
            raise ConfigError("quark needs training.max_steps (the number of rounds)", field="training.max_steps")
        acc = loop_accelerator(self.name, bf16=t.bf16)
        n_proc = acc.num_processes
        prompts = load_prompts(run.cfg)
        if len(prompts) < n_proc:
            raise DataError(f"{len(prompts)} prompts for {n_proc} processes: each needs at least one",
                            field="data.train")
        self.reward = get_reward(p.reward, **p.reward_options)
        model, tok = run.model, run.tokenizer
        model.to(acc.device)
        ref = None if is_peft(model) else frozen_copy(model)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=t.learning_rate)
        # gradient steps go through train_model (DDP under N processes); sampling and p₀ use model
        train_model, opt = acc.prepare(model, opt)
        rng = random.Random(t.seed)  # the same draws on every process
        pool: list[dict] = []  # prompt, response ids (1-D, unpadded), reward; the same on every rank
        per_round = min(p.samples_per_round * n_proc, len(prompts))
        stats: dict = {}
        start = 0
        ckpts = LoopCheckpoints(run, acc, self.name, model, opt)
        resumed = ckpts.resume()
        if resumed:
            state, tensors = resumed
            start, stats = state["step"], state["stats"]
            rng.setstate(random_state(state["rng"]))
            pool = unpack_pool(state["pool"], tensors["pool"])
        with InterruptFlag() as interrupt:
            for rnd in range(start, t.max_steps):
                stats = self._round(rnd, acc, prompts, rng, pool, per_round, train_model, opt, ref)
                if acc.is_main_process:
                    append_jsonl(run.output_dir / "metrics.jsonl", stats)
                    log.info("quark round %d/%d: sampled reward %.3f, pool %d", rnd + 1, t.max_steps,
                             stats["reward_mean"], len(pool))
                stop = interrupt.any_rank(acc.device)
                if stop or ckpts.due(rnd + 1, t.max_steps, epoch_ended(rnd + 1, per_round, len(prompts))):
                    meta, tensors = pack_pool(pool)
                    saved = ckpts.save(rnd + 1, {"rng": rng.getstate(), "pool": meta, "stats": stats},
                                       {"pool": tensors})
                if stop:
                    stop_interrupted(rnd + 1, saved)
        summary = {"method": self.name, "global_step": t.max_steps,
                   "train_loss": stats.get("nll", 0.0) + p.kl_coef * stats.get("kl", 0.0)
                   - p.entropy_coef * stats.get("entropy", 0.0),
                   "control_prefix": control_prefix(p.n_quantiles), "pool": len(pool), "num_processes": n_proc,
                   "resumed_from": ckpts.resumed_from}
        if acc.is_main_process:
            out = save_model(model, tok, run.output_dir / "model", merge=run.cfg.model.lora.merge)
            atomic_write_text(out / "quark.json", json.dumps({"control_prefix": control_prefix(p.n_quantiles),
                                                              "n_quantiles": p.n_quantiles}))
            atomic_write_text(run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return summary

    def _round(self, rnd, acc, prompts, rng, pool, per_round, train_model, opt, ref) -> dict:
        """One round (exploration, quantization, ``train_steps`` gradient steps); grows ``pool``
        and returns the round's metrics record."""
        p, t, model, tok = self.params, self.run.cfg.training, self.run.model, self.run.tokenizer
        n_proc, rank, bs = acc.num_processes, acc.process_index, t.per_device_train_batch_size
        torch.manual_seed(rank_seed(t.seed * 100_003 + rnd))
        batch = rng.sample(prompts, per_round)
        with acc.split_between_processes(batch) as mine:
            ep, scores = self._sample(mine, None if rnd == 0 else p.n_quantiles, acc)
            lengths = ep.response_mask.sum(1).tolist()
            new = gather_batches({
                "prompt": list(mine), "reward": scores.tolist(),
                "ids": [ep.response_ids[i, : int(n)].clone() for i, n in enumerate(lengths)]})
        pool.extend({"prompt": x, "ids": ids, "reward": r}
                    for x, ids, r in zip(new["prompt"], new["ids"], new["reward"]))
        quantiles = quantize([e["reward"] for e in pool], p.n_quantiles)
        model.train()
        sums: dict[str, float] = {}
        for _ in range(p.train_steps):
            drawn = rng.sample(range(len(pool)), min(bs * n_proc, len(pool)))
            n_tokens = max(1, sum(len(pool[i]["ids"]) for i in drawn))
            idx, weight = drawn[rank * bs : (rank + 1) * bs], 1.0
            if not idx:  # fewer samples than ranks: a zero-weighted pass keeps DDP's all-reduce
                idx, weight = drawn[:1], 0.0
            items = [pool[i] for i in idx]
            width = max(len(e["ids"]) for e in items)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            r_ids = torch.full((len(items), width), pad, dtype=torch.long)
            r_mask = torch.zeros((len(items), width), dtype=torch.long)
            for j, e in enumerate(items):
                r_ids[j, : len(e["ids"])] = e["ids"]
                r_mask[j, : len(e["ids"])] = 1
            cond = [control_prefix(quantiles[i]) + pool[i]["prompt"] for i in idx]
            raw = [e["prompt"] for e in items]
            with acc.autocast():
                logits = _response_logits(train_model, tok, cond, r_ids, r_mask, p.max_prompt_length)
                with torch.no_grad():
                    if ref is None:
                        with reference_mode(model) as base:
                            ref_logits = _response_logits(base, tok, raw, r_ids, r_mask, p.max_prompt_length)
                    else:
                        ref_logits = _response_logits(ref, tok, raw, r_ids, r_mask, p.max_prompt_length)
            dev = logits.device
            loss, st = quark_loss(logits, ref_logits, r_ids.to(dev), r_mask.to(dev).float(), p.kl_coef,
                                  p.entropy_coef, n_tokens=n_tokens)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss * (weight * n_proc))  # DDP averages over ranks; the shares sum
            if t.max_grad_norm > 0:
                acc.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], t.max_grad_norm)
            opt.step()
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + weight * v
        return {"step": rnd + 1, "round": rnd + 1, "reward_mean": sum(new["reward"]) / len(new["reward"]),
                "pool": len(pool), **{k: v / p.train_steps for k, v in reduce_stats(sums, "sum").items()}}


__all__ = ["Quark", "QuarkParams", "control_prefix", "quantize", "quark_loss"]

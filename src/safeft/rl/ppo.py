"""A compact PPO for language models (RLHF), shared by ``rlhf`` and ``ra-rlhf``.

The algorithm is the one of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences") as used by RA-RLHF (Chaudhary et al., NeurIPS 2024, eq. 1 and §4):

1. *Rollout.* Sample a response y for each of B prompts x from π_θ; score r(x, y) with the
   reward model; record log π_θ(y_t|·), log π_ref(y_t|·) and the values V(s_t).
2. *Reward shaping* (per token, the "k1" KL estimate)::

       r_t = −β·(log π_θ(y_t|s_t) − log π_ref(y_t|s_t)) + [t = T]·r(x, y)

3. *Advantages* by GAE (Schulman et al. 2016): δ_t = r_t + γV(s_{t+1}) − V(s_t),
   A_t = Σ_l (γλ)^l δ_{t+l}; returns R_t = A_t + V(s_t); advantages whitened.
4. *Update*, ``ppo_epochs`` passes over shuffled mini-batches, with the clipped losses
   (Schulman et al. 2017)::

       L_pg = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))],   ρ = π_θ/π_θ_old
       L_v  = ½·E[max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)]
       L    = L_pg + c_v·L_v

5. *Adaptive KL coefficient* (Ziegler et al. 2019, §2.2): e = clip(KL/KL_target − 1, ±0.2),
   β ← β·(1 + e·B/horizon), with KL the batch mean of Σ_t (log π_θ − log π_ref).

The value head is a linear layer on the policy's last hidden state (zero-initialised, so
V ≡ 0 at the start). Under LoRA the reference is the same network with its adapters
disabled (:func:`safeft.models.reference_mode`), so it costs no second copy of the weights;
under full fine-tuning it is a frozen copy.

RA-RLHF plugs in through ``keep``: the number of lowest-return episodes the update uses
(:mod:`safeft.rl.cvar`); every other step is identical, so with ``keep = B`` the two methods
are the same algorithm.

Under N processes (``accelerate launch``, DDP) each process rolls out, scores and runs the
no-grad passes on its own shard of the prompts; the episodes are then gathered, so every
rank holds the same global batch of N·b episodes and computes the same returns, CVaR tail,
GAE, whitening and KL control as one process with that batch would. Each global mini-batch
of N·``mini_batch_size`` episodes is split across the ranks; a rank's loss is its tokens'
sum divided by the mini-batch's total token count, times N (DDP averages gradients), so the
all-reduced gradient is the single-process one. The policy and the value head are wrapped by
``accelerator.prepare``; generation and the reference pass use the unwrapped model.

Under mixed precision (:func:`safeft.distributed.loop_accelerator`) generation, the old
log-probs and values, the reference pass and the update's forward all run inside the
accelerator's autocast, so old and new log-probs come from the same arithmetic: the ratio ρ
of the first mini-batch (logged as ``ratio_first``, before any update) is 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..distributed import gather_batches, loop_accelerator, rank_seed, reduce_stats
from ..models import frozen_copy, is_peft, reference_mode, unwrap
from .cvar import tail_indices
from .rewards import Reward


class PPOParams(BaseModel):
    """PPO options (``method:`` section). Defaults: the RA-RLHF paper's IMDB setting where
    it states one (B = 128, 4 PPO epochs, target KL 6, initial KL coefficient 0.2), else
    the classic TRL PPO values (γ = 1, λ = 0.95, clip 0.2, value coefficient 0.1). The
    learning rate, gradient clipping, seed and iteration count come from ``training:``
    (``learning_rate`` — the paper used 1.41e-5 for full fine-tuning of GPT-2 —,
    ``max_grad_norm``, ``seed``, ``max_steps`` = iterations M)."""

    model_config = ConfigDict(extra="forbid")
    reward: str = Field("toxicity", description="reward spec (see safeft.rl.rewards)")
    reward_options: dict = Field(default_factory=dict)
    batch_size: int = Field(128, ge=1, description="B, episodes per iteration")
    mini_batch_size: int = Field(16, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    init_kl_coef: float = Field(0.2, ge=0)
    target_kl: float | None = Field(6.0, gt=0, description="None: fixed KL coefficient")
    kl_horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_advantages: bool = True
    max_new_tokens: int = Field(48, ge=1)
    max_prompt_length: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    forward_batch_size: int = Field(16, ge=1, description="no-grad generation/scoring chunk size")
    chat: bool = Field(False, description="wrap prompts in the chat template (False: plain continuation)")
    system_prompt: str | None = None


# ---------------------------------------------------------------- the pieces, unit-tested

class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state h_t; zero-initialised."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1).float()  # float32 also under autocast


class AdaptiveKLController:
    """β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon) (Ziegler et al. 2019); fixed when target is None."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean)/std over the masked entries (unbiased variance); zero outside the mask."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``−β·kl_t`` plus the score on each episode's last token; and kl_t."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Episode return Σ_t γ^t r_t (``rewards`` already zero past each episode's end)."""
    disc = gamma ** torch.arange(rewards.shape[1], dtype=rewards.dtype)
    return (rewards * disc).sum(1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded episodes; returns (A, R = A + V)."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_v = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_loss(
    logprobs, old_logprobs, values, old_values, advantages, returns, mask,
    cliprange: float, cliprange_value: float, vf_coef: float, n_tokens=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss + c_v · clipped value loss, token-averaged over ``mask``.

    ``n_tokens``: the denominator instead of ``mask.sum()`` (the token count of the whole
    mini-batch when ``mask`` is one process's part of it); losses and stats are then this
    part's share, and the shares sum to the mini-batch's values.
    """
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens

    def mean(x):
        return (x * mask).sum() / n

    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = mean(torch.maximum(pg1, pg2))
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_loss = 0.5 * mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2))
    loss = pg_loss + vf_coef * vf_loss
    stats = {
        "pg_loss": pg_loss.item(),
        "vf_loss": vf_loss.item(),
        "clipfrac": mean((pg2 > pg1).float()).item(),
        "approx_kl": (0.5 * mean((logprobs - old_logprobs) ** 2)).item(),
        "ratio": mean(ratio).item(),
    }
    return loss, stats


# ---------------------------------------------------------------- generation and scoring

@dataclass
class Episodes:
    """B (prompt, response) episodes. Prompts left-padded to P, responses right-padded to L."""

    query_ids: torch.Tensor  # [B, P]
    query_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, L]
    response_mask: torch.Tensor  # [B, L] 1 up to and including the first EOS
    prompts: list[str]
    responses: list[str]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.query_ids[idx], self.query_mask[idx], self.response_ids[idx], self.response_mask[idx]


def _pad(seqs: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s):] = s
        else:
            out[i, : len(s)] = s
    return out


def encode_prompts(tokenizer, prompts: list[str], max_length: int, chat: bool, system_prompt: str | None):
    """Token ids per prompt: raw text (continuation) or the chat template; cut from the left."""
    out = []
    for p in prompts:
        if chat:
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": p}]
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
        else:
            text = f"{system_prompt}\n\n{p}" if system_prompt else p
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append(torch.tensor(list(ids)[-max_length:], dtype=torch.long))
    return out


def response_mask_from(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after."""
    if eos_id is None:
        return torch.ones_like(ids)
    is_eos = ids.eq(eos_id).long()
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).long()


@torch.no_grad()
def generate_episodes(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, max_prompt_length: int = 64,
    do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    chat: bool = False, system_prompt: str | None = None, batch_size: int = 16, logits_processor=None,
) -> Episodes:
    """Sample one response per prompt (KV-cached ``generate``, left-padded chunks)."""
    from transformers import GenerationConfig, LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(unwrap(model).parameters()).device
    enc = encode_prompts(tokenizer, prompts, max_prompt_length, chat, system_prompt)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None, top_p=top_p if do_sample else None,
        pad_token_id=pad, eos_token_id=eos, use_cache=True,
    )
    was_training = model.training
    model.eval()
    queries, responses = [], []
    try:
        for i in range(0, len(enc), batch_size):
            chunk = enc[i : i + batch_size]
            q = _pad(chunk, pad, left=True)
            qm = _pad([torch.ones_like(c) for c in chunk], 0, left=True)
            out = model.generate(
                input_ids=q.to(device), attention_mask=qm.to(device), generation_config=gen_cfg,
                logits_processor=LogitsProcessorList(logits_processor or []),
            )
            queries.extend(chunk)
            responses.extend(out[:, q.shape[1]:].cpu())
    finally:
        model.train(was_training)
    q_ids = _pad(queries, pad, left=True)
    q_mask = _pad([torch.ones_like(c) for c in queries], 0, left=True)
    r_ids = _pad([r for r in responses], pad, left=False)
    r_mask = response_mask_from(r_ids, eos)
    if r_mask.shape[1] == 0:  # max_new_tokens >= 1, so only if generation returned nothing
        raise RuntimeError("generation returned no tokens")
    texts = [tokenizer.decode(r_ids[i][r_mask[i].bool()], skip_special_tokens=True) for i in range(len(prompts))]
    return Episodes(q_ids, q_mask, r_ids, r_mask, list(prompts), texts)


def response_forward(model, q_ids, q_mask, r_ids, r_mask, *, temperature: float = 1.0, value_head=None):
    """Log-probs ``[b, L]`` of the response tokens (and values when ``value_head`` is given).

    Position ids follow the attention mask, as in ``generate`` with left padding. The LM
    head runs only on the L response-predicting positions.
    """
    device = next(unwrap(model).parameters()).device
    ids = torch.cat([q_ids, r_ids], 1).to(device)
    attn = torch.cat([q_mask, r_mask], 1).to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    p, n = q_ids.shape[1], r_ids.shape[1]
    h = out.hidden_states[-1][:, p - 1 : p + n - 1]
    logits = unwrap(model).get_output_embeddings()(h).float() / temperature
    targets = r_ids.to(device)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    values = value_head(h) if value_head is not None else None
    return logp, values


# ---------------------------------------------------------------- the loop

class PPOTrainer:
    """One PPO iteration per :meth:`step`: rollout, score, shape, GAE, clipped updates, KL control.

    ``accelerator``: the run's ``accelerate.Accelerator`` (default: a new one, see
    :func:`safeft.distributed.loop_accelerator`); every forward pass runs in its autocast.
    Under N processes every rank calls :meth:`step` with its own prompts; see the module doc
    for what is global. What an iteration carries to the next besides the weights and the
    optimizer is :meth:`state` (for checkpoints).
    """

    def __init__(self, model, tokenizer, reward: Reward, params: PPOParams, *, learning_rate: float,
                 max_grad_norm: float = 1.0, seed: int = 0, tail_by: Literal["return", "score"] = "return",
                 accelerator=None):
        self.acc = accelerator or loop_accelerator("ppo")
        self.model, self.tokenizer, self.reward, self.p = model, tokenizer, reward, params
        self.seed, self.max_grad_norm, self.tail_by = seed, max_grad_norm, tail_by
        model.to(self.acc.device)
        hidden = unwrap(model).get_output_embeddings().weight.shape[1]
        self.value_head = ValueHead(hidden).to(self.acc.device)
        self.ref_model = None if is_peft(model) else frozen_copy(model)
        trainable = [q for q in model.parameters() if q.requires_grad] + list(self.value_head.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
        # the update's forwards go through these (DDP under N processes: gradients all-reduced);
        # generation and the no-grad passes use the unwrapped ``model`` / ``value_head``
        self.train_model, self.train_value_head, self.optimizer = self.acc.prepare(model, self.value_head, optimizer)
        self.kl_ctl = AdaptiveKLController(params.init_kl_coef, params.target_kl, params.kl_horizon)
        self.iteration = 0

    def state(self) -> dict:
        """The iteration counter and the adaptive KL coefficient (JSON-able)."""
        return {"iteration": self.iteration, "kl_coef": self.kl_ctl.value}

    def load_state(self, state: dict) -> None:
        self.iteration, self.kl_ctl.value = int(state["iteration"]), float(state["kl_coef"])

    def _chunks(self, n: int, size: int):
        for i in range(0, n, size):
            yield torch.arange(i, min(i + size, n))

    @torch.no_grad()
    def _old_stats(self, ep: Episodes):
        p = self.p
        logps, refs, vals = [], [], []
        self.model.eval()
        for idx in self._chunks(len(ep.prompts), p.forward_batch_size):
            with self.acc.autocast():
                lp, v = response_forward(self.model, *ep.take(idx), temperature=p.temperature,
                                         value_head=self.value_head)
                if self.ref_model is None:
                    with reference_mode(self.model) as ref:
                        rl, _ = response_forward(ref, *ep.take(idx), temperature=p.temperature)
                else:
                    rl, _ = response_forward(self.ref_model, *ep.take(idx), temperature=p.temperature)
            logps.append(lp.cpu())
            vals.append(v.cpu())
            refs.append(rl.cpu())
        self.model.train()
        return torch.cat(logps), torch.cat(refs), torch.cat(vals)

    def _gather(self, ep: Episodes, scores, old_logp, ref_logp, old_values):
        """The episodes of all processes, in rank order, on every rank (as they are with one)."""
        if self.acc.num_processes == 1:
            return ep, scores, old_logp, ref_logp, old_values
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        g = gather_batches(
            {"q": ep.query_ids, "qm": ep.query_mask, "r": ep.response_ids, "rm": ep.response_mask,
             "scores": scores, "logp": old_logp, "ref": ref_logp, "values": old_values,
             "prompts": ep.prompts, "responses": ep.responses},
            left_padded=("q", "qm"), pad_values={"q": pad, "r": pad},
        )
        ep = Episodes(g["q"], g["qm"], g["r"], g["rm"], g["prompts"], g["responses"])
        return ep, g["scores"], g["logp"], g["ref"], g["values"]

    def step(self, prompts: list[str], keep: int | None = None) -> dict[str, float]:
        """One iteration on ``prompts`` (this process's b episodes; N·b over all processes);
        the update uses the ``keep`` lowest returns of all N·b."""
        p = self.p
        torch.manual_seed(rank_seed(self.seed * 100_003 + self.iteration))
        t0 = time.perf_counter()
        with self.acc.autocast():
            ep = generate_episodes(
                self.model, self.tokenizer, prompts, max_new_tokens=p.max_new_tokens,
                max_prompt_length=p.max_prompt_length, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                chat=p.chat, system_prompt=p.system_prompt, batch_size=p.forward_batch_size,
            )
        t1 = time.perf_counter()
        scores = self.reward(ep.prompts, ep.responses).float().cpu()
        t2 = time.perf_counter()
        old_logp, ref_logp, old_values = self._old_stats(ep)
        ep, scores, old_logp, ref_logp, old_values = self._gather(ep, scores, old_logp, ref_logp, old_values)
        mask = ep.response_mask.float()
        rewards, kl = shaped_rewards(scores, old_logp, ref_logp, mask, self.kl_ctl.value)
        ep_returns = discounted_returns(rewards, p.gamma)
        b = len(ep.prompts)
        keep = b if keep is None else keep
        ranking = ep_returns if self.tail_by == "return" else scores
        kept = tail_indices(ranking, keep)
        adv, ret = gae(rewards, old_values, mask, p.gamma, p.lam)
        kmask = torch.zeros(b, 1)
        kmask[kept] = 1.0
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask * kmask)
        stats = self._update(ep, kept, old_logp, old_values, adv, ret, mask)
        t3 = time.perf_counter()
        mean_kl = kl.sum(1).mean().item()
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, b)
        self.iteration += 1
        times = reduce_stats({"gen_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2, "iter_s": t3 - t0}, "max")
        return {
            "iteration": self.iteration,
            "reward_mean": scores.mean().item(),
            "reward_min": scores.min().item(),
            "reward_kept_mean": scores[kept].mean().item(),
            "return_mean": ep_returns.mean().item(),
            "kl": mean_kl,
            "kl_coef": kl_coef_used,
            "kept": len(kept),
            "response_len": mask.sum(1).mean().item(),
            **stats,
            **times,
        }

    def _update(self, ep, kept, old_logp, old_values, adv, ret, mask) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled mini-batches of the kept episodes (all ranks draw
        the same order); each global mini-batch of N·``mini_batch_size`` is split across ranks.
        Besides the means over mini-batches, logs ``ratio_first`` and ``ratio_first_max_dev``: the
        token-mean ρ and max |ρ − 1| of the first mini-batch, before any update (1 and 0 when
        the rollout's and the update's log-probs come from the same arithmetic)."""
        p, n_proc, rank = self.p, self.acc.num_processes, self.acc.process_index
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.iteration)
        self.model.train()
        sums: dict[str, float] = {}
        n_mb = 0
        for _ in range(p.ppo_epochs):
            perm = kept[torch.randperm(len(kept), generator=g)]
            for i in range(0, len(perm), p.mini_batch_size * n_proc):
                batch = perm[i : i + p.mini_batch_size * n_proc]
                n_tokens = mask[batch].sum().clamp(min=1)
                idx, weight = batch[rank * p.mini_batch_size : (rank + 1) * p.mini_batch_size], 1.0
                if len(idx) == 0:  # fewer episodes than ranks: a zero-weighted pass keeps DDP's all-reduce
                    idx, weight = batch[:1], 0.0
                with self.acc.autocast():
                    logp, values = response_forward(self.train_model, *ep.take(idx), temperature=p.temperature,
                                                    value_head=self.train_value_head)
                dev = logp.device
                loss, st = ppo_loss(
                    logp, old_logp[idx].to(dev), values, old_values[idx].to(dev), adv[idx].to(dev),
                    ret[idx].to(dev), mask[idx].to(dev), p.cliprange, p.cliprange_value, p.vf_coef,
                    n_tokens=n_tokens.to(dev),
                )
                self.optimizer.zero_grad(set_to_none=True)
                self.acc.backward(loss * (weight * n_proc))  # DDP averages over ranks; the shares sum
                if self.max_grad_norm > 0:
                    params = [q for grp in self.optimizer.param_groups for q in grp["params"]]
                    self.acc.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + weight * v
                if n_mb == 0:  # before any update of this iteration
                    dev_ratio = ((logp.detach() - old_logp[idx].to(dev)).exp() - 1).abs() * mask[idx].to(dev)
                    ratio_first, max_dev = weight * st["ratio"], weight * dev_ratio.max().item()
                n_mb += 1
        out = {k: v / n_mb for k, v in reduce_stats(sums, "sum").items()}
        out["ratio_first"] = reduce_stats({"r": ratio_first})["r"]
        out["ratio_first_max_dev"] = reduce_stats({"d": max_dev}, "max")["d"]
        return out


__all__ = [
    "AdaptiveKLController", "Episodes", "PPOParams", "PPOTrainer", "ValueHead", "discounted_returns",
    "encode_prompts", "gae", "generate_episodes", "masked_mean", "masked_whiten", "ppo_loss",
    "response_forward", "response_mask_from", "shaped_rewards",
]

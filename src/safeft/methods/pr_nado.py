"""Posterior regularization with a NADO constraint model (Meng, Mehrabi, Goyal, Ramakrishna,
Galstyan, Zemel, Chang, Gupta, "Attribute Controlled Fine-tuning for Large Language Models:
A Case Study on Detoxification", EMNLP 2024 Findings).

Loss per response token of a training sequence (x, y)::

    L = CE(y_i) + λ · KL(q(· | x, y<i) ‖ p_θ(· | x, y<i)),
    q(v | x, y<i) ∝ p_θ(v | x, y<i) · R(x, y<i ∘ v)

R is the NADO constraint model (:mod:`safeft.nado`): the probability that a continuation
of the prefix ends non-toxic, trained by BCE on sequences sampled from the current LLM and
labelled by a judge (``judge``, default the offline ``toxicity`` classifier). q is the
closest distribution to p_θ that respects R (posterior regularization's E-step) and is held fixed while θ moves toward it (the M-step),
so the gradient w.r.t. a logit is p_θ − q. R is evaluated on the ``top_k`` most likely
tokens of p_θ (``top_k: 0`` = the whole vocabulary); the rest keep their probability
(:func:`safeft.nado.project`).

Schedules (training steps are split into ``rounds`` equal parts; one optimizer and one LR
schedule run through all of them, as in plain fine-tuning):
- sequential (the paper's sequential algorithm): each round samples from the current θ,
  labels, trains R, then fine-tunes θ with that R.
- parallel (the paper's parallel algorithm): round r fine-tunes θ with R_{r−1} while a
  second OS process trains R_r on samples of θ_{r−1}; both start from round r−1's state,
  so wall time approaches plain fine-tuning. R_0 is "no constraint yet" (a constant R: the
  regularizer is exactly 0 in round 1) unless ``parallel_warmup`` trains it first.
- adaptive (the paper's adaptive regularizer): the toxicity-related part of the training
  data gets the constraint regularizer, the rest KL(p_θ ‖ p_start) to the starting model
  (forgetting prevention, :class:`safeft.engine.reference.Reference`). The split comes from
  a data-source tag column (``assign: tag``) or from the judge's score of each training
  example (``assign: judge``).

Resume: every Trainer checkpoint gets a ``nado/`` folder beside the Trainer's files (the R in
use, the round index, the rounds log and, for the parallel schedule, the θ snapshot the
in-flight R round samples from); ``--resume`` restores it with the checkpoint and continues
the rounds (docs/pr-nado.md, "Resume").
"""

from __future__ import annotations

import functools
import json
import math
import os
import multiprocessing as mp
import queue
import random
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .. import losses, nado
from ..engine.reference import Reference
from ..engine.run import atomic_write_text
from ..engine.trainer import safetensors_problem
from ..eval.decoding import register_decoding
from ..errors import ConfigError
from ..models import unwrap
from . import register
from .base import LossOutput, Method
from .filter import trained_texts

register_decoding("nado", nado.nado_decoding)  # safeft eval --decoding nado:RUN/nado[,top_k=K][,alpha=A]


class PRNadoParams(nado.JudgeChoice):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(1.0, ge=0, description="λ, weight of KL(q ‖ p_θ)")
    rounds: int = Field(2, ge=1, description="rounds of (sample, label, train R, fine-tune θ)")
    parallel: bool = False
    """Run the paper's parallel algorithm: R and θ trained at once in two processes."""
    parallel_warmup: bool = False
    """Parallel only: train R_0 on samples of the starting model before round 1 (serial)."""
    top_k: int = Field(32, ge=0, description="candidates of p_θ on which R is evaluated; 0 = all")
    samples_per_round: int = Field(32, ge=1)
    prefix_tokens: int = Field(16, ge=1, description="prompt length for plain-text examples")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    soft_labels: bool = True
    """Label C = 1 − the judge's score (soft) or 1[score < 0.5] (hard); the judge (``judge``,
    ``judge_opts``, from :class:`safeft.nado.JudgeChoice`) labels R's samples and, with
    ``assign: judge``, the training examples."""
    r_epochs: int = Field(4, ge=1)
    r_lr: float = Field(1e-3, gt=0)
    r_inner: int = Field(256, ge=1)
    adaptive: bool = False
    assign: Literal["tag", "judge"] = "tag"
    tag_field: str = "source"
    toxic_tags: list[str] = Field(default_factory=lambda: ["toxic"])
    judge_threshold: float = Field(0.5, ge=0, le=1)
    utility_lam: float = Field(1.0, ge=0, description="weight of KL(p_θ ‖ p_start) on the rest (adaptive)")
    reference: Literal["live", "cached"] = "cached"
    reference_top_k: int = Field(32, ge=1)
    worker_threads: int = Field(1, ge=1, description="torch threads of the parallel R worker")


def sampling_prompts(dataset, n: int, prefix_tokens: int, seed: int) -> list[list[int]]:
    """Prompts to sample from: the part of a training example before its first labelled token
    (chat / prompt-response data), or its first ``prefix_tokens`` tokens (plain text)."""
    rng = random.Random(seed)
    picks = rng.sample(range(len(dataset)), n) if n <= len(dataset) else rng.choices(range(len(dataset)), k=n)
    out = []
    for i in picks:
        ex = dataset[i]
        ids, labels = ex["input_ids"], ex["labels"]
        first = next((j for j, lbl in enumerate(labels) if lbl != -100), 0)
        cut = first if first >= 2 else min(prefix_tokens, len(ids) - 1)
        out.append(list(ids[: max(cut, 1)]))
    return out


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def _load_trainable(model, path: str) -> None:
    res = unwrap(model).load_state_dict(load_file(path), strict=False)
    if res.unexpected_keys:
        raise RuntimeError(f"R worker: snapshot does not match the model ({res.unexpected_keys[0]})")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes: a hard link where the filesystem allows (no copy, and
    either name keeps the data when the other is deleted), else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _r_worker(model_cfg: dict, round_opts: dict, judge: tuple[str, dict], threads: int, jobs, results) -> None:
    """The parallel algorithm's R process: load the model once, then per job load θ_{r−1}'s
    trainable weights, sample, label, train R (warm-started from the previous round's R, or
    from the job's ``init`` weights when a resumed run restarts the worker). Exits on its own when
    the training process is gone (killed: no one would send the stop message). Ignores Ctrl-C:
    the training process handles it (saves a checkpoint, then stops this worker)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        parent = os.getppid()
        torch.set_num_threads(threads)
        from ..config import ModelConfig
        from ..models import load_model

        model, tok = load_model(ModelConfig.model_validate(model_cfg))
        cm = nado.ConstraintModel.for_model(model, round_opts.pop("inner"))
        scorer = nado.judge_scorer(*judge)
        results.put({"ready": time.time()})
        while True:
            try:
                job = jobs.get(timeout=2)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if job is None:
                return
            start = time.time()
            if job["init"] is not None:
                cm.load_state(job["init"])
            _load_trainable(model, job["theta"])
            stats = nado.fit_round(
                model, cm, job["prompts"], scorer=scorer, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=job["seed"], **round_opts,
            )
            if os.getppid() != parent:
                return  # killed meanwhile: no one waits for this R, and a resumed run recomputes it
            cm.save(job["out"])
            results.put({"round": job["round"], "start": start, "end": time.time(), "stats": stats, "path": job["out"],
                         "pid": os.getpid()})
    except Exception:  # noqa: BLE001 - reported to the parent, which raises
        results.put({"error": traceback.format_exc()})


class _Rounds(TrainerCallback):
    def __init__(self, method: "PRNado"):
        self.m = method

    def on_train_begin(self, args, state, control, **kw):
        n = self.m.params.rounds
        if state.max_steps < n:
            raise ConfigError(f"{n} rounds need at least {n} optimizer steps; the run has {state.max_steps}",
                              field="method.rounds")
        self.bounds = [math.floor(r * state.max_steps / n) for r in range(n)]
        # resuming, the Trainer has loaded checkpoint-<global_step>'s state before this call
        self.m.start(Path(args.output_dir) / f"checkpoint-{state.global_step}" if state.global_step else None)

    def on_step_begin(self, args, state, control, **kw):
        while self.m.round < len(self.bounds) and state.global_step >= self.bounds[self.m.round]:
            self.m.begin_round(self.m.round + 1)

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.m.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            self.m.finish()
        else:  # stopped early by Ctrl-C / SIGTERM, after saving a checkpoint
            self.m.stop()


@register
class PRNado(Method):
    name = "pr-nado"
    summary = "CE + λ·KL(q ‖ p_θ), q ∝ p_θ·R with R a NADO non-toxicity model; sequential, parallel, adaptive"
    paper = "Meng et al., Attribute Controlled Fine-tuning for LLMs: A Case Study on Detoxification (EMNLP 2024 Findings)"
    Params = PRNadoParams

    def __init__(self, params, run):
        super().__init__(params, run)
        self.constraint: nado.ConstraintModel | None = None
        self.round = 0  # rounds begun
        self.r_used = 0
        self.reference = Reference(run.model, params.reference, params.reference_top_k) if params.adaptive else None
        self.is_constraint: torch.Tensor | None = None
        self.nado_dir = run.output_dir / "nado"
        self.log: dict = {"schedule": "parallel" if params.parallel else "sequential", "r_rounds": [], "theta_rounds": []}
        self._proc = None

    @functools.cached_property
    def _scorer(self):
        """The judge, built once in this process on first use (R's labels in the sequential
        schedule, ``assign: judge``); the parallel worker builds its own."""
        return nado.judge_scorer(self.params.judge, self.params.judge_opts)

    # --- the training loop ------------------------------------------------------------------
    def train(self):
        from ..engine.trainer import fit

        self.nado_dir.mkdir(parents=True, exist_ok=True)
        self.log["main_pid"] = os.getpid()
        tok = self.run.tokenizer
        self._pad, self._eos = tok.pad_token_id, tok.eos_token_id
        self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        summary = fit(self.run, self, callbacks=[_Rounds(self)])
        summary["rounds"] = self.log
        atomic_write_text(self.nado_dir / "rounds.json", json.dumps(self.log, indent=2))
        atomic_write_text(self.run.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        return summary

    def _round_opts(self) -> dict:
        p = self.params
        return {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "soft_labels": p.soft_labels,
                "epochs": p.r_epochs, "lr": p.r_lr}

    def _prompts(self, r: int) -> list[list[int]]:
        p = self.params
        return sampling_prompts(self.run.train_dataset, p.samples_per_round, p.prefix_tokens,
                                self.run.cfg.training.seed + 1000 * r)

    # --- checkpoints -----------------------------------------------------------------------
    SCHEDULE = ("rounds", "parallel", "parallel_warmup", "r_inner")  # must match to resume

    def save_state(self, ckpt: Path) -> None:
        """Write ``ckpt/nado/``: the R θ is trained with (sequential: also the one the next
        round warm-starts from), for the parallel schedule the θ snapshot that the in-flight R
        round samples from, and ``state.json`` (round index, rounds log) last, so that its
        presence means the rest is complete. R keeps no optimizer state across rounds (each
        round builds a fresh AdamW) and its sampling and training are seeded from the round
        index, so this is all a resumed run needs."""
        d = ckpt / "nado"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        files = []
        if self.constraint is not None:
            self.constraint.save(d)
            files += ["constraint.safetensors", "constraint.json"]
        if self.params.parallel:
            _link_or_copy(self._snapshot(self.round), d / "theta.safetensors")
            files.append("theta.safetensors")
        state = {"round": self.round, "r_used": self.r_used, "files": files,
                 "schedule": {k: getattr(self.params, k) for k in self.SCHEDULE}, "log": self.log}
        atomic_write_text(d / "state.json", json.dumps(state, indent=2))

    @staticmethod
    def checkpoint_problem(ckpt: Path) -> str | None:
        d = ckpt / "nado"
        try:
            state = json.loads((d / "state.json").read_text())
        except FileNotFoundError:
            return "nado/state.json is missing (pr-nado's state was not saved)"
        except (OSError, ValueError) as e:
            return f"nado/state.json is unreadable ({type(e).__name__})"
        if not isinstance(state, dict) or not {"round", "r_used", "files", "schedule", "log"} <= state.keys():
            return "nado/state.json is incomplete"
        for name in state["files"]:
            f = d / name
            if not f.is_file():
                return f"nado/{name} is missing"
            if name.endswith(".safetensors"):
                problem = safetensors_problem(f)
                if problem:
                    return f"nado/{problem}"
            else:
                try:
                    json.loads(f.read_text())
                except (OSError, ValueError) as e:
                    return f"nado/{name} is unreadable ({type(e).__name__})"
        return None

    def _restore(self, ckpt: Path) -> None:
        d = ckpt / "nado"
        state = json.loads((d / "state.json").read_text())
        for k, v in state["schedule"].items():
            if getattr(self.params, k) != v:
                raise ConfigError(f"{ckpt} was written with {k}={v!r}, this run has {getattr(self.params, k)!r}; "
                                  "resume with the same value", field=f"method.{k}")
        self.round, self.r_used = state["round"], state["r_used"]
        self.log = {**state["log"], "main_pid": os.getpid()}
        self.log.setdefault("resumes", []).append({"from": ckpt.name, "time": time.time(), "pid": os.getpid()})
        if "constraint.safetensors" in state["files"]:
            if self.params.parallel:
                self.constraint = nado.ConstraintModel.load(d)
            else:
                self._cm.load_state(load_file(str(d / "constraint.safetensors")))
                self.constraint = self._cm

    # --- the rounds -------------------------------------------------------------------------
    def start(self, resume_from: Path | None) -> None:
        """Before the first step: build R (sequential) or start the R worker (parallel); on a
        resumed run restore ``resume_from``'s state and restart the R round that was in flight."""
        if not self.params.parallel:
            self._cm = nado.ConstraintModel.for_model(self.run.model, self.params.r_inner)
            if resume_from is not None:
                self._restore(resume_from)
            return
        if resume_from is not None:
            self._restore(resume_from)
        # fork where the platform has it: the worker starts without re-importing torch (seconds
        # instead of tens of seconds); it loads its own copy of the model either way
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        opts = {**self._round_opts(), "inner": self.params.r_inner}
        self._proc = ctx.Process(
            target=_r_worker, daemon=True,
            args=(self.run.cfg.model.model_dump(mode="json"), opts, (self.params.judge, self.params.judge_opts),
                  self.params.worker_threads, self._jobs, self._results),
        )
        self._proc.start()
        if resume_from is not None:
            self._submit(self.round, resume_from)
        elif self.params.parallel_warmup:
            self._submit(0)
            self._use(self._wait(0), 0)

    def _snapshot(self, r: int) -> Path:
        return self.nado_dir / f"theta_{r}.safetensors"

    def _submit(self, r: int, resume_from: Path | None = None) -> None:
        """Hand round r's R update to the worker, with a snapshot of θ (round r−1's state). A
        resumed run hands the restarted worker the snapshot ``resume_from`` holds and the R to
        warm-start from (the one θ uses, R_{r−1}; none before R_0), so it computes the same R_r."""
        init = None
        if resume_from is None:
            save_file(trainable_state(self.run.model), str(self._snapshot(r)))
        else:
            _link_or_copy(resume_from / "nado" / "theta.safetensors", self._snapshot(r))
            init = self.constraint.state() if self.constraint is not None else None
        self._jobs.put({"round": r, "theta": str(self._snapshot(r)), "prompts": self._prompts(r), "init": init,
                        "seed": self.run.cfg.training.seed + r, "out": str(self.nado_dir / f"R_{r}")})

    def _wait(self, r: int) -> dict:
        while True:
            try:
                msg = self._results.get(timeout=5)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError("pr-nado: the R worker process died") from None
                continue
            if "error" in msg:
                raise RuntimeError(f"pr-nado: the R worker failed:\n{msg['error']}")
            if "ready" in msg:
                self.log["worker_ready"] = msg["ready"]
                continue
            if msg["round"] != r:
                raise RuntimeError(f"pr-nado: expected R of round {r}, got {msg['round']}")
            self._snapshot(r).unlink(missing_ok=True)
            return msg

    def _use(self, msg: dict, r: int) -> None:
        self.constraint = nado.ConstraintModel.load(msg["path"])
        self.r_used = r
        self.log["r_rounds"].append({"round": r, "start": msg["start"], "end": msg["end"], "pid": msg["pid"],
                                     **msg["stats"]})

    def _close_theta_round(self) -> None:
        if self.log["theta_rounds"]:
            self.log["theta_rounds"][-1]["end"] = time.time()

    def begin_round(self, r: int) -> None:
        self._close_theta_round()
        self.round = r
        if self.params.parallel:
            if r > 1:
                self._use(self._wait(r - 1), r - 1)
            self._submit(r)
        else:
            start = time.time()
            stats = nado.fit_round(
                self.run.model, self._cm, self._prompts(r), scorer=self._scorer, decode=self._decode,
                pad_id=self._pad, eos_id=self._eos, seed=self.run.cfg.training.seed + r, **self._round_opts(),
            )
            self._cm.save(self.nado_dir / f"R_{r}")
            self.constraint, self.r_used = self._cm, r
            self.log["r_rounds"].append({"round": r, "start": start, "end": time.time(), "pid": os.getpid(), **stats})
        self.log["theta_rounds"].append({"round": r, "start": time.time(), "r_used": self.r_used})

    def stop(self) -> None:
        """Training stopped before its last step; the checkpoint it saved holds what --resume
        needs, so the worker's R round is abandoned and no final R is written."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(timeout=30)

    def finish(self) -> None:
        self._close_theta_round()
        r = self.params.rounds
        if self.params.parallel:
            final = self._wait(r)
            self.log["r_rounds"].append({"round": r, "start": final["start"], "end": final["end"], "pid": final["pid"],
                                         **final["stats"]})
            self._jobs.put(None)
            self._proc.join(timeout=60)
            self.constraint = nado.ConstraintModel.load(final["path"])
        self.constraint.save(self.nado_dir)
        self.log["final_r"] = r

    # --- adaptive assignment ----------------------------------------------------------------
    def prepare(self, trainer) -> None:
        p = self.params
        if not p.adaptive:
            return
        ds = self.run.train_dataset
        if p.assign == "tag":
            self.is_constraint = self._flags_from_tags(ds)
        else:
            scores = self._scorer(trained_texts(ds, self.run.tokenizer))
            flags = torch.zeros(max(ds["idx"]) + 1, dtype=torch.bool)
            for ex, s in zip(ds, scores):
                flags[ex["idx"]] = s >= p.judge_threshold
            self.is_constraint = flags
        self.log["adaptive"] = {"assign": p.assign, "constraint_examples": int(self.is_constraint.sum()),
                                "examples": len(ds)}
        if p.reference == "cached":
            self.reference.build_cache(trainer.model, ds, trainer.data_collator,
                                       trainer.args.per_device_eval_batch_size, trainer.args.device)

    def _flags_from_tags(self, ds) -> torch.Tensor:
        from ..data import load_rows

        cfg, p = self.run.cfg, self.params
        if cfg.data.packing:
            raise ConfigError("assign: tag needs unpacked data (a packed block mixes sources); use assign: judge",
                              field="method.assign")
        rows = load_rows(cfg.data.train, cfg.data.data_dir)
        if not any(p.tag_field in r for r in rows):
            raise ConfigError(f"no column {p.tag_field!r} in the training data (columns: {', '.join(sorted(rows[0]))})",
                              field="method.tag_field")
        flags = torch.zeros(len(rows), dtype=torch.bool)
        for i, r in enumerate(rows):
            flags[i] = str(r.get(p.tag_field)) in p.toxic_tags
        return flags

    # --- the loss ---------------------------------------------------------------------------
    def compute_loss(self, model, batch, trainer) -> LossOutput:
        p = self.params
        hidden, pos = losses.position_hidden(model, batch)
        targets = pos.targets
        if self.is_constraint is not None:
            per_ex = self.is_constraint[batch["idx"].cpu()].to(hidden.device)
            tok_c = per_ex[:, None].expand_as(pos.mask)[pos.mask]
        else:
            tok_c = torch.ones(pos.n, dtype=torch.bool, device=hidden.device)
        cm = self.constraint if p.lam > 0 else None
        emb = nado.output_embeddings(model) if cm is not None else None
        use_ref = self.reference is not None and p.utility_lam > 0
        if use_ref and p.reference == "cached":
            ref_idx, ref_top, _ = self.reference.lookup(batch, hidden.device)
        elif use_ref:
            ref_hidden = self.reference.live_hidden(model, batch, pos)

        def fn(logits, s, e):
            ce = F.cross_entropy(logits, targets[s:e], reduction="none")
            total, stats = ce.sum(), {"ce": ce.sum().detach()}
            c, u = tok_c[s:e], ~tok_c[s:e]
            if cm is not None and bool(c.any()):
                lc = logits[c]
                idx = nado.candidates(lc, p.top_k)
                with torch.no_grad():
                    log_r = cm.log_r(hidden[s:e][c].detach(), emb, idx)
                kl = nado.pr_kl(lc, log_r, idx)
                total = total + p.lam * kl.sum()
                stats["pr_kl"] = kl.sum().detach()
            if use_ref and bool(u.any()):
                if p.reference == "cached":
                    kl_u = losses.kl_topk(logits[u], ref_idx[s:e][u], ref_top[s:e][u])
                else:
                    ref_logp = torch.log_softmax(self.reference.head_logits(model, ref_hidden[s:e][u]), dim=-1)
                    kl_u = losses.kl_full(torch.log_softmax(logits[u], dim=-1), ref_logp)
                total = total + p.utility_lam * kl_u.sum()
                stats["util_kl"] = kl_u.sum().detach()
            return total, stats

        total, stats = losses.chunked_loss(model, hidden, fn)
        n_c = max(int(tok_c.sum()), 1)
        n_u = max(pos.n - int(tok_c.sum()), 1)
        metrics = {"ce": stats.get("ce", 0.0) / max(pos.n, 1), "r_round": float(self.r_used)}
        if "pr_kl" in stats:
            metrics["pr_kl"] = stats["pr_kl"] / n_c
        if "util_kl" in stats:
            metrics["util_kl"] = stats["util_kl"] / n_u
        return LossOutput(total, pos.n, metrics)

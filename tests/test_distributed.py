"""Scale-out: 2 CPU processes (gloo, through accelerate) train exactly like 1 process with the
same global batch.

Tolerance: the engine divides each process's loss *sum* by the response-token count of the
whole global batch (gathered across processes), so the summed DDP gradient equals the
single-process gradient up to float32 summation order. We allow 1e-5 relative on logged
losses and 1e-5 absolute on every final weight (measured: about 1e-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safeft.cli import _launch_command

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LOCAL_RANK", None)
    return env


def _train(args: list[str], out: Path, n: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "safeft", "train", *args, "-o", str(out), "--num-processes", str(n),
           "--set", "training.disable_tqdm=true", "--set", "training.save_strategy=no"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_in_process(args: list[str], out: Path) -> None:
    """The single-process reference run, in this process (saves an interpreter start-up)."""
    from safeft.cli import main

    assert main(["train", *args, "-o", str(out), "--set", "training.disable_tqdm=true",
                 "--set", "training.save_strategy=no"]) == 0


def _losses(out: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    files = list((out / "model").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--full", "--method", "sft"], id="sft-full"),
        pytest.param(["--lora", "--method", "kl-decay", "--set", "method.reference=cached",
                      "--set", "method.top_k=8"], id="kl-decay-lora-cached"),
    ],
)
def test_two_processes_match_one(tmp_path, tiny_model_dir, chat_jsonl, extra):
    # logging every 2 steps of 3: step 3's loss reaches train_loss only through the Trainer's
    # end-of-training tail, which must be averaged over ranks too
    common = ["--model", str(tiny_model_dir), "--data", str(chat_jsonl), "--max-steps", "3",
              "--max-length", "64", "--lr", "1e-3", "--set", "training.logging_steps=2", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_in_process([*common, "--batch-size", "4"], one)
    proc = _train([*common, "--batch-size", "2"], two, 2)
    assert proc.stdout.count("trained ") == 1  # one summary line, not one per process

    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 2  # steps 1 (logging_first_step) and 2
    assert l1 == pytest.approx(l2, rel=LOSS_RTOL)
    s1, s2 = (json.loads((d / "train_summary.json").read_text()) for d in (one, two))
    assert s1["train_loss"] == pytest.approx(s2["train_loss"], rel=LOSS_RTOL)

    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL), (k, (w1[k] - w2[k]).abs().max().item())
    # the weights moved far more than the tolerance (lr 1e-3), so the match means something
    if "--full" in extra:
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        assert max((w1[k] - base[k]).abs().max().item() for k in base) > 100 * WEIGHT_ATOL
    else:  # LoRA B starts at zero
        assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 100 * WEIGHT_ATOL
    assert s2["global_step"] == 3


def test_cpu_launch_uses_multiprocess_launcher():
    """accelerate's --cpu alone starts ONE process; N CPU workers need the torchrun path."""
    cmd = _launch_command(["train", "--max-steps", "1"], 2, None)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    port = int(cmd[cmd.index("--main_process_port") + 1])
    assert 0 < port < 65536
    assert cmd[-4:] == ["safeft", "train", "--max-steps", "1"]
    with_cfg = _launch_command(["train"], None, "configs/accelerate/fsdp.yaml")
    assert "--num_processes" not in with_cfg and "--multi_gpu" not in with_cfg
    assert with_cfg[with_cfg.index("--config_file") + 1] == "configs/accelerate/fsdp.yaml"


def test_bad_config_fails_before_launch(tmp_path, tiny_model_dir, chat_jsonl):
    """A config error is one line from the launching process: no workers, no launcher traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "safeft", "train", "--num-processes", "2", "--model", str(tiny_model_dir),
         "--data", str(chat_jsonl), "-o", str(tmp_path / "o"), "--set", "training.nope=1"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["safeft: error: config: training.nope: unknown field (got 1)"]
    assert not (tmp_path / "o").exists()


# A random tiny model says the same thing to every prompt; this processor makes the next token
# a function of the row's non-pad tokens, so each prompt gets its own (deterministic) answer.
PROCESSOR = """
import torch
from transformers import LogitsProcessor

class PromptHash(LogitsProcessor):
    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, input_ids, scores):
        keep = (input_ids != self.pad_id).long()
        pick = ((input_ids * keep).sum(-1) * 7919 % 200) + 300
        out = torch.full_like(scores, -1e9)
        out[torch.arange(len(pick)), pick] = 0.0
        return out
"""

GEN_SCRIPT = PROCESSOR + """
import json, sys
from safeft.models import load_model
from safeft.distributed import generate_across_processes
from safeft.engine.run import process_state

model, tok = load_model(sys.argv[1], for_training=False)
prompts = json.loads(sys.argv[2])
out = generate_across_processes(model, tok, prompts, max_new_tokens=4, batch_size=2,
                                logits_processor=[PromptHash(tok.pad_token_id)])
if process_state().is_main_process:
    open(sys.argv[3], "w").write(json.dumps(out))
"""


def test_generation_split_across_processes_comes_back_in_order(tmp_path, tiny_model_dir):
    from safeft.cli import _free_port
    from safeft.distributed import generate_across_processes
    from safeft.models import load_model

    prompts = [f"Question {i}: what is {i} times {i + 1}?" for i in range(5)]  # 5: uneven shards
    script, out = tmp_path / "gen.py", tmp_path / "out.json"
    script.write_text(GEN_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tiny_model_dir), json.dumps(prompts), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_model(str(tiny_model_dir), for_training=False)
    scope: dict = {}
    exec(PROCESSOR, scope)
    single = generate_across_processes(model, tok, prompts, max_new_tokens=4, batch_size=2,
                                       logits_processor=[scope["PromptHash"](tok.pad_token_id)])
    assert len(single) == 5 and len(set(single)) > 1  # distinct responses, so order is checkable
    assert json.loads(out.read_text()) == single


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {n: load_config_from_file(str(root / f"{n}.yaml")) for n in ("ddp", "fsdp", "zero2", "zero3")}
    assert kinds["ddp"].distributed_type == "MULTI_GPU" and kinds["ddp"].mixed_precision == "bf16"
    assert kinds["fsdp"].distributed_type == "FSDP" and kinds["fsdp"].fsdp_config["fsdp_version"] == 2
    assert kinds["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert kinds["zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["zero3"].deepspeed_config["zero_stage"] == 3
    assert kinds["zero3"].deepspeed_config["zero3_save_16bit_model"] is True


# ---------------------------------------------------------------- own-loop methods (PPO, Quark)

# Shared by the 2-process workers and the single-process reference: the reward is the prompt's
# topic number, so the CVaR tail (lowest returns) is known; LoRA is initialised from one seed.
RL_COMMON = """
import torch
import safeft
from safeft.config import LoraConfig, ModelConfig
from safeft.models import load_model
from safeft.rl.rewards import register_reward

@register_reward("test-topic")
def _topic():
    return lambda prompts, responses: torch.tensor([float(p.split()[-1].rstrip(".")) for p in prompts])

def train_tiny(model_dir, prompts, out, **opts):
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name_or_path=model_dir, lora=LoraConfig(r=4, alpha=8)))
    summary = safeft.train(None, model=model, tokenizer=tok, **{
        "data.train.path": prompts, "output_dir": out, "training.learning_rate": 1e-3, **opts})
    return summary, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
"""

RL_SCRIPT = RL_COMMON + """
import json, sys
from safetensors.torch import save_file
from safeft.engine.run import process_state

summary, weights = train_tiny(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
save_file(weights, f"{sys.argv[3]}/rank{process_state().process_index}.safetensors")
"""


def _launch_script(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    from safeft.cli import _free_port

    path = tmp_path / "worker.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(path), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_ra_rlhf_two_processes_match_one(tmp_path, tiny_model_dir):
    """2 processes × 2 episodes = 1 process × 4: the CVaR tail is taken over the gathered
    returns, and the weights are identical on both ranks and match the single process.

    Rollouts are made deterministic with top_k = 1, so both runs see the same episodes. The
    schedule keeps 3, 1, 1 of the 4 episodes (M = 3, n = 0, α = 0.25, ρ = 0.34): a per-process
    tail could not keep 3 or 1 of 4 (it keeps a multiple of 2, or another tail), and with 1
    kept one rank has no episode in the mini-batch (its zero-weighted pass). Tolerances: the
    two runs differ only in float32 summation order (padding, all-reduce); 1e-5 on weights and
    statistics. The ranks' weights must be bit-identical (the same all-reduced gradients).
    """
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about topic {i}." for i in range(4)) + "\n")
    opts = {"method.name": "ra-rlhf", "method.reward": "test-topic", "method.top_k": 1,
            "method.max_new_tokens": 4, "method.ppo_epochs": 2, "method.n_warmup": 0, "method.alpha": 0.25,
            "method.rho": 0.34, "training.max_steps": 3}
    two = tmp_path / "two"
    _launch_script(tmp_path, RL_SCRIPT, str(tiny_model_dir), str(prompts), str(two),
                   json.dumps({**opts, "method.batch_size": 2, "method.mini_batch_size": 1}))
    scope: dict = {}
    exec(RL_COMMON, scope)
    one = tmp_path / "one"
    s1, w1 = scope["train_tiny"](str(tiny_model_dir), str(prompts), str(one),
                                 **{**opts, "method.batch_size": 4, "method.mini_batch_size": 2})

    r0, r1 = load_file(str(two / "rank0.safetensors")), load_file(str(two / "rank1.safetensors"))
    assert r0.keys() == r1.keys() == w1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    for k in w1:
        assert torch.allclose(r0[k], w1[k], atol=WEIGHT_ATOL), (k, (r0[k] - w1[k]).abs().max().item())
    assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 100 * WEIGHT_ATOL  # it trained

    rows1, rows2 = _rows(one), _rows(two)  # rank 0 alone writes: 3 records, not 6
    assert [r["kept"] for r in rows2] == [r["kept"] for r in rows1] == [3, 1, 1]
    assert [r["reward_kept_mean"] for r in rows2] == [r["reward_kept_mean"] for r in rows1] == [1.0, 0.0, 0.0]
    for a, b in zip(rows1, rows2):
        for key in ("reward_mean", "return_mean", "kl", "kl_coef", "pg_loss", "vf_loss", "approx_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    v1, v2 = (load_file(str(d / "model" / "value_head.safetensors")) for d in (one, two))
    assert all(torch.allclose(v1[k], v2[k], atol=WEIGHT_ATOL) for k in v1)
    s2 = json.loads((two / "train_summary.json").read_text())
    assert s2["num_processes"] == 2 and s1["num_processes"] == 1
    assert s2["final_kl_coef"] == pytest.approx(s1["final_kl_coef"], rel=1e-6)


QUARK_SCRIPT = RL_COMMON + """
import json, sys
from safetensors.torch import save_file
import safeft.methods.quark as quark
from safeft.engine.run import process_state

cuts = []  # the rewards each round's quantiles were cut from, on this rank
_quantize = quark.quantize
quark.quantize = lambda rewards, k: cuts.append(list(rewards)) or _quantize(rewards, k)
summary, weights = train_tiny(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
rank = process_state().process_index
save_file(weights, f"{sys.argv[3]}/rank{rank}.safetensors")
open(f"{sys.argv[3]}/cuts{rank}.json", "w").write(json.dumps(cuts))
"""


def _launch_on_topics(tmp_path, script: str, model_dir, name: str, overrides: dict):
    """Run ``script`` on 2 processes over the prompts "Tell me about topic 0..3."; its output dir."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about topic {i}." for i in range(4)) + "\n")
    out = tmp_path / name
    _launch_script(tmp_path, script, str(model_dir), str(prompts), str(out), json.dumps(overrides))
    return out


def test_quark_two_processes_cut_quantiles_over_all_samples(tmp_path, tiny_model_dir):
    """Each rank samples 2 of the 4 prompts a round, yet both cut the reward quantiles over
    the same pool of all 4 per round (reward = topic number, so the pool's rewards are known
    exactly), and the weights stay bit-identical across ranks."""
    out = _launch_on_topics(tmp_path, QUARK_SCRIPT, tiny_model_dir, "quark", {
        "method.name": "quark", "method.reward": "test-topic", "method.samples_per_round": 2,
        "method.train_steps": 2, "method.max_new_tokens": 4, "method.n_quantiles": 2, "training.max_steps": 2,
        "training.per_device_train_batch_size": 2})
    cuts = [json.loads((out / f"cuts{r}.json").read_text()) for r in (0, 1)]
    assert cuts[0] == cuts[1]
    assert [sorted(c) for c in cuts[0]] == [[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert max(r0[k].abs().max().item() for k in r0 if "lora_B" in k) > 100 * WEIGHT_ATOL  # it trained
    rows = _rows(out)
    assert [r["pool"] for r in rows] == [4, 8]  # rank 0 alone writes: 2 records
    assert all(r["kl"] >= 0 and r["nll"] > 0 for r in rows)
    assert (out / "model" / "quark.json").is_file()
    assert json.loads((out / "train_summary.json").read_text())["num_processes"] == 2


GRPO_SCRIPT = RL_COMMON + """
import json, sys
from safetensors.torch import save_file
import safeft.methods.grpo as grpo
from safeft.engine.run import process_state

@register_reward("test-topic-len")  # GRPO needs spread within a group: + length / 1000 (< 0.5)
def _topic_len():
    return lambda prompts, responses: torch.tensor([float(p.split()[-1].rstrip(".")) + min(len(r), 400) / 1000
                                                    for p, r in zip(prompts, responses)])

tails = []  # (group mean rewards, kept groups) of each generation batch, on this rank
_tail = grpo.tail_indices
def _record(groups, k):
    kept = _tail(groups, k)
    tails.append((groups.tolist(), kept.tolist()))
    return kept
grpo.tail_indices = _record
summary, weights = train_tiny(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
rank = process_state().process_index
save_file(weights, f"{sys.argv[3]}/rank{rank}.safetensors")
open(f"{sys.argv[3]}/tails{rank}.json", "w").write(json.dumps([tails, summary["kept_prompts_by_generation"]]))
"""


def test_ra_grpo_two_processes_take_the_tail_over_all_groups(tmp_path, tiny_model_dir):
    """One generation batch of 4 prompts × G = 2 over 2 processes (each scores 2 prompts' 4
    completions): both ranks rank the same 4 group means (topic number + length/1000 < 0.5)
    and keep the 2 worst (α = 0.5), not 1 worst per process; the weights stay bit-identical
    across ranks."""
    out = _launch_on_topics(tmp_path, GRPO_SCRIPT, tiny_model_dir, "ra-grpo", {
        "method.name": "ra-grpo", "method.reward": "test-topic-len", "method.num_generations": 2,
        "method.steps_per_generation": 2, "method.max_new_tokens": 4, "method.n_warmup": 0, "method.alpha": 0.5,
        "method.rho": 0.5, "training.per_device_train_batch_size": 2, "training.max_steps": 2})
    (t0, kept0), (t1, kept1) = (json.loads((out / f"tails{r}.json").read_text()) for r in (0, 1))
    assert t0 == t1 and kept0 == kept1 == [2]
    (groups, kept), = t0
    assert [int(g) for g in sorted(groups)] == [0, 1, 2, 3]
    assert sorted(int(groups[i]) for i in kept) == [0, 1]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert max(r0[k].abs().max().item() for k in r0 if "lora_B" in k) > 100 * WEIGHT_ATOL  # it trained
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_summary.json").read_text())["num_processes"] == 2

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

"""The ``safeft`` command: train | methods (and the commands other modules add).

Every user error prints one line, ``safeft: error: <field>: <what was expected>``, and exits
with code 2; nothing is written before the input has been validated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import SafeftError
from .safety_io import install_log_sanitizer, strip_control


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage dumps."""

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"safeft: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _float_or_int(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that takes a run config."""
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set method.gamma=0.5 (repeatable)")
    p.add_argument("--model", help="hub id, local model dir, or embedded:smollm2 (model.name_or_path)")
    p.add_argument("--method", help="registered method name (method.name); see 'safeft methods'")
    p.add_argument("--data", help="training data: hub dataset id or local file (data.train.path)")
    p.add_argument("--data-dir", help="local copies of the public sets, e.g. ../shared/data (else the hub)")
    p.add_argument("--output-dir", "-o", help="run directory (output_dir)")
    p.add_argument("--lr", type=float, help="training.learning_rate")
    p.add_argument("--epochs", type=float, help="training.num_train_epochs")
    p.add_argument("--max-steps", type=int, help="training.max_steps")
    p.add_argument("--batch-size", type=int, help="training.per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, help="training.gradient_accumulation_steps")
    p.add_argument("--max-length", type=int, help="data.max_length")
    p.add_argument("--seed", type=int, help="training.seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model.dtype")
    p.add_argument("--report-to", help="training.report_to (none, tensorboard, wandb, ...)")
    p.add_argument("--lora", dest="lora", action="store_true", default=None, help="LoRA (default)")
    p.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning instead of LoRA")
    p.add_argument("--overwrite", action="store_true", help="replace safeft's outputs in a non-empty output dir")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")


def config_from_args(args):
    from .config import FLAG_PATHS, load_config

    overrides = {}
    for flag, path in FLAG_PATHS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[path] = value
    if getattr(args, "lora", None) is not None:
        overrides["model.lora.enabled"] = args.lora
    if getattr(args, "overwrite", False):
        overrides["overwrite"] = True
    if getattr(args, "resume", False):
        overrides["resume"] = True
    if getattr(args, "parallel", False):
        overrides["method.parallel"] = True
    return load_config(args.config, overrides, args.set)


def cmd_train(args) -> int:
    from .api import train

    cfg = config_from_args(args)
    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per process
        print(f"trained {summary['method']}: {summary['global_step']} steps, "
              f"loss {summary['train_loss']:.4f} -> {cfg.output_dir}/model")
    return 0


def cmd_methods(args) -> int:
    from .methods import list_methods

    rows = [(m.name, m.summary, m.paper) for m in list_methods()]
    width = max(len(r[0]) for r in rows)
    for name, summary, paper in rows:
        print(f"{name:<{width}}  {summary}")
        if paper and paper != "-":
            print(f"{'':<{width}}  paper: {paper}")
    return 0


def _split_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _judge_opts(items: list[str]) -> dict:
    from .config import parse_override
    from .errors import ConfigError

    opts: dict = {}
    for item in items:
        key, value = parse_override(item)
        judge, sep, opt = key.rpartition(".")
        if not sep or not judge:
            raise ConfigError(f"expected JUDGE.OPTION=VALUE, got {item!r}", field="--judge-opt")
        opts.setdefault(judge, {})[opt] = value
    return opts


def cmd_eval(args) -> int:
    from .config import ModelConfig
    from .errors import ConfigError
    from .eval.runner import evaluate
    from .eval.suites import get_suite_spec
    from .models import load_model

    suites, judges, utility = _split_list(args.suites), _split_list(args.judges), _split_list(args.utility)
    if not suites and not utility:
        raise ConfigError("nothing to evaluate: give --suites and/or --utility", field="--suites")
    for s in suites:
        get_suite_spec(s)
    model, tok = load_model(ModelConfig(name_or_path=args.model, dtype=args.dtype), for_training=False)
    results = evaluate(model, tok, suites=suites, judges=judges, out_dir=args.out, n=args.n, seed=args.seed,
                       data_dir=args.data_dir, max_new_tokens=args.max_new_tokens, k=args.k,
                       batch_size=args.batch_size, decoding=args.decoding, judge_opts=_judge_opts(args.judge_opt),
                       utility=utility, utility_n=args.utility_n, model_name=args.model, method=args.method,
                       system_prompt=args.system_prompt)
    for suite, body in results["suites"].items():
        shown = ", ".join(f"{m} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                          for m, v in body["metrics"].items() if v["value"] is not None)
        print(f"{suite} (n={body['n']}): {shown}")
    for m, v in results.get("utility", {}).items():
        if v["value"] is not None:
            print(f"utility {m}: {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})")
    for pair, a in results.get("judge_agreement", {}).items():
        kappa = "n/a" if a["cohen_kappa"] is None else f"{a['cohen_kappa']:.2f}"
        print(f"agreement {pair}: {a['agreement']:.2f}, kappa {kappa} (n={a['n']})")
    print(f"results -> {args.out}/results.json")
    return 0


def cmd_report(args) -> int:
    from .eval.report import load_runs, text_table, write_report

    runs = load_runs(args.run_dirs)
    path = write_report(runs, args.out, samples=args.samples)
    print(text_table(runs))
    print(f"report -> {path}")
    return 0


def _experiment_from_args(args):
    from .config import parse_override
    from .experiment import load_experiment

    overrides = {}
    for item in args.set:
        key, value = parse_override(item)
        overrides[key] = value
    for flag, path in (("model", "model"), ("data_dir", "data_dir"), ("output_dir", "output_dir")):
        if getattr(args, flag, None) is not None:
            overrides[path] = getattr(args, flag)
    return load_experiment(args.config, overrides, base={} if args.config is None else None)


def cmd_experiment(args) -> int:
    from .experiment import Experiment
    from .experiment_summary import print_summary

    summary = Experiment(_experiment_from_args(args), progress=not args.no_progress).run()
    print_summary(summary)
    return 1 if summary["failed"] else 0


def cmd_align(args) -> int:
    from .experiment import Experiment

    exp = Experiment(_experiment_from_args(args), progress=not args.no_progress)
    done = exp.run(only=("align",))
    if done["failed"]:
        return 1
    print(f"aligned model -> {exp.aligned_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safeft", description="Safety-preserving fine-tuning and evaluation of LLMs.")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)

    p = sub.add_parser("train", help="fine-tune a model with a registered method")
    add_config_flags(p)
    p.add_argument("--parallel", action="store_true",
                   help="pr-nado: the paper's parallel algorithm, R trained in a second process (method.parallel)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="launch this many processes through accelerate (same as 'accelerate launch')")
    p.add_argument("--accelerate-config", default=None, metavar="FILE",
                   help="accelerate config (e.g. configs/accelerate/fsdp.yaml); implies a relaunch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("methods", help="list the registered methods and their papers")
    p.set_defaults(func=cmd_methods)

    for name, helptext in (("experiment", "the end-to-end recipe: align, fine-tune with every method "
                                          "(optionally poisoned data), evaluate, report"),
                           ("align", "only the recipe's first stage: refusal-align the model")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", "-c", help="experiment YAML (experiments/<name>.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any experiment field, e.g. --set finetune.seeds=[0,1]")
        p.add_argument("--model", help="the unaligned starting model (model)")
        p.add_argument("--data-dir", help="local copies of the public sets, e.g. ../shared/data (else the hub)")
        p.add_argument("--output-dir", "-o", help="where every stage is written (default runs/<name>)")
        p.add_argument("--no-progress", action="store_true", help="no progress display")
        p.set_defaults(func=cmd_experiment if name == "experiment" else cmd_align)

    p = sub.add_parser("eval", help="evaluate any model on red-team / toxicity / benign suites and utility")
    p.add_argument("--model", default="embedded:smollm2",
                   help="hub id, local dir, a run's model/ dir (LoRA adapters too), or embedded:smollm2")
    p.add_argument("--suites", default="", help="comma-separated suites, e.g. donotanswer,rtp,benign "
                   "(file ones as harmbench:PATH, file:PATH); see docs/eval.md")
    p.add_argument("--judges", default="refusal,toxicity",
                   help="comma-separated: refusal, toxicity, hf-classifier:MODEL, llm:MODEL (default refusal,toxicity)")
    p.add_argument("--judge-opt", action="append", default=[], metavar="JUDGE.OPT=VALUE",
                   help="judge option, e.g. llm.template=llama-guard (repeatable)")
    p.add_argument("--n", type=int, default=None, help="prompts per suite (seeded, category-balanced; default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="output dir (rerunning with it resumes)")
    p.add_argument("--data-dir", help="local copies of the public sets, e.g. ../shared/data (else the hub)")
    p.add_argument("--decoding", help="a registered decoding-time intervention, name:spec")
    p.add_argument("--k", type=int, default=5, help="samples per prompt on toxicity suites (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system-prompt", default=None,
                   help="the prompted baseline: a safety system message for chat suites")
    p.add_argument("--utility", default="", help="comma-separated: perplexity, pubmedqa, gsm8k")
    p.add_argument("--utility-n", type=int, default=None, help="items per utility task (default --n)")
    p.add_argument("--method", help="method name recorded in results.json (for the report)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="compare runs: results table with CIs, safety-vs-utility plot, "
                                      "per-epoch curves, sample generations")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a training run or 'safeft eval' output directory")
    p.add_argument("--out", "-o", default="report.html",
                   help="report.html (one self-contained file) or report.md (PNGs written beside it)")
    p.add_argument("--samples", type=int, default=3, help="sample generations shown per suite (default 3)")
    p.set_defaults(func=cmd_report)
    return parser


def _launch_command(rest: list[str], n: int | None, config_file: str | None) -> list[str]:
    """The ``accelerate launch`` command line for ``safeft train --num-processes N``.

    Without CUDA, N processes go through accelerate's multi-process (torchrun) launcher with
    the gloo backend: accelerate's ``--cpu`` alone would start one process (its multi-CPU
    path needs mpirun), so ``--multi_gpu`` is what yields N CPU workers here.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if n is not None:
        cmd += ["--num_processes", str(n)]
    if config_file:
        cmd += ["--config_file", config_file]
    else:
        cmd += ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
        if n is not None and n > 1:
            cmd += ["--multi_gpu", "--main_process_port", str(_free_port())]
    return cmd + ["-m", "safeft", *rest]


def _free_port() -> int:
    """A free local TCP port, so two single-machine jobs never fight over torchrun's 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _strip_launch_flags(argv: list[str]) -> list[str]:
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--num-processes", "--accelerate-config"):
            skip = True
            continue
        if a.startswith(("--num-processes=", "--accelerate-config=")):
            continue
        rest.append(a)
    return rest


def _relaunch_with_accelerate(argv: list[str], n: int | None, config_file: str | None = None) -> int:
    """Run ``accelerate launch ... -m safeft train`` and keep its failure output to one line.

    Workers' stderr is passed through as it comes. Once a worker has printed its one-line
    ``safeft: error:`` (bad input, exit 2), what follows (the other ranks' copies of the same
    line, the launcher's ChildFailedError traceback) is dropped and the exit code is 2. Any
    other failure is passed through whole. Ctrl-C reaches the workers, which save a
    checkpoint and print ``safeft: interrupted``; this process waits for them and exits 130.
    """
    import signal
    import subprocess

    cmd = _launch_command(_strip_launch_flags(argv), n, config_file)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        fd = proc.stderr.fileno()
        out = sys.stderr.buffer
        pending, done, user_error = b"", False, False
        while chunk := os.read(fd, 65536):
            if done:
                continue
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
            if cut < 0:
                continue
            text, pending = pending[: cut + 1], pending[cut + 1:]
            for marker in (b"safeft: error:", b"safeft: interrupted"):
                at = text.find(marker)
                if at >= 0:
                    eol = text.find(b"\n", at)
                    text, done = text[: eol + 1 if eol >= 0 else len(text)], True
                    user_error = marker == b"safeft: error:"
                    break
            out.write(text)
            out.flush()
        if pending and not done:
            out.write(pending)
            out.flush()
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    if done and rc != 0:
        return 2 if user_error else 130
    return rc


def _quiet_libraries() -> None:
    """Keep stderr for safeft's own messages (an error stays one line): no weight-loading or
    shard-writing bars and no library-internal FutureWarnings; ``--verbose`` shows them. The
    training progress bar is separate (``training.disable_tqdm``)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    install_log_sanitizer()
    if not args.verbose:
        _quiet_libraries()
    n = getattr(args, "num_processes", None)
    acc_cfg = getattr(args, "accelerate_config", None)
    if (acc_cfg or (n is not None and n > 1)) and "LOCAL_RANK" not in os.environ:
        try:
            config_from_args(args)  # bad flags/config: one line here, before any worker starts
        except SafeftError as e:
            sys.stderr.write(f"safeft: error: {strip_control(str(e), one_line=True)}\n")
            return e.exit_code
        return _relaunch_with_accelerate(argv, n, acc_cfg)
    try:
        return args.func(args)
    except SafeftError as e:
        sys.stderr.write(f"safeft: error: {strip_control(str(e), one_line=True)}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("safeft: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

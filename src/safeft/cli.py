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
    return load_config(args.config, overrides, args.set)


def cmd_train(args) -> int:
    from .api import train

    cfg = config_from_args(args)
    summary = train(cfg)
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
    p.add_argument("--num-processes", type=int, default=None,
                   help="launch this many processes through accelerate (same as 'accelerate launch')")
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
    return parser


def _relaunch_with_accelerate(argv: list[str], n: int) -> int:
    """``safeft train --num-processes N`` -> ``accelerate launch --num_processes N -m safeft train``."""
    import subprocess

    rest = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--num-processes":
            skip = True
            continue
        if a.startswith("--num-processes="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if n > 1 and not _cuda():
        cmd += ["--cpu"]
    cmd += ["-m", "safeft", *rest]
    return subprocess.call(cmd)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    n = getattr(args, "num_processes", None)
    if n is not None and n > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_accelerate(argv, n)
    try:
        return args.func(args)
    except SafeftError as e:
        sys.stderr.write(f"safeft: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("safeft: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

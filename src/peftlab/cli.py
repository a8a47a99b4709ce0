"""The ``peftlab`` command: ``methods``, ``train``, ``eval``, ``search``, ``assess``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .core.config import config_from_options
from .core.errors import PeftlabError
from .core.registry import all_methods, get_method
from .tasks.errors import TaskDataError, describe_folder

# --help shows this as typed: plain text, no reStructuredText markup (the module docstring has some).
DESCRIPTION = ("peftlab: list PEFT methods, train one on a GLUE task, score an adapter, search a configuration, "
               "run the side-by-side study.")


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PeftlabError(f"option {pair!r}: expected KEY=VALUE, e.g. --opt r=8")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _guess_glue_task(name: str) -> str:
    """The GLUE task a folder's name starts with ('SST-2-small' -> 'sst2'), else a placeholder."""
    from .tasks.glue import GLUE_TASKS

    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return next((t for t in GLUE_TASKS if key.startswith(t)), "<task>")


def _task_and_root(task: str, data_dir: str | None) -> tuple[str, str | None]:
    """(task name, data folder) from --task and --data-dir. --task is a task folder, whose own
    name picks the task, or a task name; a missing folder and a folder whose name is not a
    task get different messages, since they have different fixes."""
    from .tasks.glue import GLUE_TASKS, get_glue_task

    known = ", ".join(t.dir_name for t in GLUE_TASKS.values())
    path = Path(task)
    if path.is_dir():  # a task folder such as ../shared/data/glue/SST-2
        try:
            get_glue_task(path.name)
        except TaskDataError:
            raise TaskDataError(
                f"--task {task}: the folder exists, but its name {path.name!r} is not a GLUE task, and a task "
                f"folder's name picks the task (known: {known}). Rename the folder to its task's name, or name "
                f"the task and pass the folder as --data-dir: --task {_guess_glue_task(path.name)} --data-dir {task}"
            ) from None
        return path.name, str(path)
    if path.exists():
        raise TaskDataError(f"--task {task} is a file; expected a GLUE task folder (holding train.tsv and "
                            "dev.tsv, e.g. ../shared/data/glue/SST-2) or a task name with --data-dir")
    if len(path.parts) > 1 or task.startswith("."):  # written as a path: a folder was meant
        raise TaskDataError(f"--task {task}: the folder does not exist ({describe_folder(path.parent)}); pass a "
                            "GLUE task folder such as ../shared/data/glue/SST-2, or a task name with --data-dir")
    try:
        get_glue_task(task)
    except TaskDataError:
        raise TaskDataError(f"--task {task!r} is neither a folder nor a GLUE task name (known: {known}); pass a "
                            "task folder such as ../shared/data/glue/SST-2, or a task name with --data-dir") from None
    return task, data_dir


def _check_out(out: str) -> None:
    """Refuse an --out that is a file now, not when saving after training."""
    if Path(out).exists() and not Path(out).is_dir():
        raise PeftlabError(f"--out {out} is a file; expected a folder (new or existing) for the adapter and "
                           "metrics.json")


def cmd_methods(args: argparse.Namespace) -> int:
    specs = all_methods()
    rows = [(s.name, s.family, s.subcategory, "yes" if s.mergeable else "no", s.trains) for s in specs]
    head = ("method", "family", "subcategory", "mergeable", "what it trains")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .assess.jobs import check_model
    from .tasks.glue import get_glue_task
    from .train.glue_job import GlueRun, run_glue
    from .train.loop import TrainArgs, latest_checkpoint

    # Cheap checks first (arguments, model folder); run_glue then reads all data before training.
    task, root = _task_and_root(args.task, args.data_dir)
    _check_out(args.out)
    checkpoints = Path(args.out) / "checkpoints"
    found = latest_checkpoint(checkpoints)
    if args.resume and found is None:
        raise PeftlabError(f"--resume: no checkpoint to resume from in {checkpoints} ({describe_folder(checkpoints)}); "
                           "pass the --out of a run started with --save-every N, or drop --resume to start afresh")
    if args.save_every and not args.resume and found is not None:
        raise PeftlabError(f"--out {args.out} holds a checkpoint of an earlier run ({found}); add --resume to "
                           f"continue it, or delete {checkpoints} to start afresh")
    config = None
    if args.config:
        if args.opt or args.targets:
            raise PeftlabError("--config names the whole method config; drop --opt/--targets, or edit the file")
        from .core.config import load_config

        config = load_config(args.config)
        args.method = type(config).method
    elif args.method != "full":
        options = _options(args.opt)
        if args.targets:
            options["targets"] = args.targets
        config = config_from_options(args.method, options)
    check_model(args.model, "sequence classification", f"GLUE {get_glue_task(task).dir_name}")
    lr = args.lr or (get_method(args.method).default_lr if config else 5e-5)
    run = GlueRun(model=args.model, task=task, data_dir=root, train_limit=args.train_limit,
                  eval_limit=args.eval_limit, batch_size=args.batch_size, max_length=args.max_length,
                  split_by_length=not args.no_split_by_length)
    train_args = TrainArgs(epochs=args.epochs, lr=lr, seed=args.seed, grad_accum_steps=args.grad_accum,
                           mixed_precision=args.mixed_precision, save_every=args.save_every,
                           checkpoint_dir=str(checkpoints), resume=args.resume)
    summary = run_glue(run, config, train_args, out=args.out)
    print(f"trainable params: {summary['trainable_params']:,} / {summary['total_params']:,} "
          f"({summary['trainable_percent']:.4f}%)")
    print("dev " + "  ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items()))
    print(f"saved adapter and metrics.json to {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .assess.jobs import check_model
    from .core.search import SearchBudget
    from .tasks.glue import get_glue_task
    from .train.glue_job import GlueRun
    from .train.loop import TrainArgs
    from .train.search import glue_search_context

    task, root = _task_and_root(args.task, args.data_dir)
    _check_out(args.out)
    spec = get_method(args.method)
    if spec.search is None:
        searched = ", ".join(s.name for s in all_methods() if s.search is not None)
        raise PeftlabError(f"--method {args.method}: {spec.name} has no search; methods found by a search: {searched}")
    config = config_from_options(spec.name, _options(args.opt))
    budget = SearchBudget(trials=args.trials, steps=args.steps, minutes=args.minutes)
    check_model(args.model, "sequence classification", f"GLUE {get_glue_task(task).dir_name}")
    run = GlueRun(model=args.model, task=task, data_dir=root, train_limit=args.train_limit,
                  batch_size=args.batch_size, max_length=args.max_length)
    context = glue_search_context(run, TrainArgs(lr=args.lr or spec.default_lr, seed=args.seed, progress=False),
                                  holdout=args.holdout)
    result = spec.search(context, budget, config)
    saved = result.save(args.out)
    if result.front:
        from .assess.plots import write_search_front

        write_search_front(result, args.out)
    for i, trial in enumerate(result.trials):
        mark = "  front" if i in result.front else ""
        print(f"trial {i}: held-out {trial.score:.4f}  trainable {trial.trainable:,}  {trial.seconds:.0f} s{mark}")
    for note in result.notes:
        print(note)
    print(f"searched {len(result.trials)} candidate(s) in {result.seconds:.0f} s; the chosen config, every trial "
          f"(and the Pareto front, front.md/front.png, where the search reports one) are in {saved.parent}. Train it: peftlab train --config {saved.parent / 'config.json'} --model ... --task ...")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .assess.jobs import check_model
    from .core.config import PeftConfig
    from .core.model import PeftModel
    from .tasks.glue import get_glue_task, glue_metrics
    from .train.data import encode_pairs, make_scoring_loader
    from .train.glue_job import load_classifier, load_eval_splits
    from .train.loop import predict

    task_name, root = _task_and_root(args.task, args.data_dir)
    task = get_glue_task(task_name)
    check_model(args.model, "sequence classification", f"GLUE {task.dir_name}")
    PeftConfig.from_pretrained(args.adapter)  # a wrong --adapter folder fails before the model loads
    splits = load_eval_splits(task, root, args.eval_limit)  # every row checked before the model loads
    model, tokenizer = load_classifier(args.model, task.num_labels)
    model = PeftModel.from_pretrained(model, args.adapter)
    metrics = {}
    for split, examples in splits.items():
        rows = encode_pairs(examples, tokenizer, args.max_length)
        logits, labels = predict(model, make_scoring_loader(rows, tokenizer), progress=True)
        metrics[split] = glue_metrics(task, logits, labels)
    print(json.dumps(metrics, indent=2))
    return 0


def _positive(kind: type[int] | type[float], fix: str = "") -> Callable[[str], int | float]:
    """An argparse type: a number above zero, refused at parsing (0 used to fail deep inside
    tokenizing or batching). ``fix`` says what to do instead, e.g. omit the flag."""
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{value!r}: expected a positive {what}{fix}")
        return number

    return parse


_LIMIT = _positive(int, " (omit the flag to use the whole split)")


def _precision(value: str) -> str:
    import torch

    if value not in ("no", "bf16", "fp16"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected no, bf16 (CPU or GPU) or fp16 (GPU only)")
    if value == "fp16" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("'fp16' needs a CUDA GPU, and none is available here; use bf16 (runs on "
                                         "CPU too) or no")
    return value


def _limit(value: str) -> int | str:
    if value.lower() in ("all", "none", "full"):
        return "all"
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number of examples or 'all'") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive number of examples or 'all'")
    return number


def _assess_suite(args: argparse.Namespace):  # -> Suite
    import dataclasses

    from .assess.suites import get_suite, load_suite_file, parse_task

    suite = get_suite(args.suite or "quick")
    if args.config:
        suite = load_suite_file(args.config, base=suite)  # a `suite:` key in the file picks another base
    changes: dict = {}
    for key in ("model", "data_dir", "epochs", "max_steps", "batch_size", "lr_scale", "full_lr", "max_params", "device"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.methods:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        changes["explicit_methods"] = True
    if args.seeds:
        try:
            changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise PeftlabError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    tasks = list(suite.tasks)
    if args.tasks:
        by_name = {t.name: t for t in tasks}
        tasks = [by_name.get(n.strip(), parse_task(n.strip(), tasks[0] if tasks else None))
                 for n in args.tasks.split(",") if n.strip()]
    budget = {k: getattr(args, k) for k in ("train_limit", "eval_limit", "max_length") if getattr(args, k) is not None}
    budget = {k: None if v == "all" else v for k, v in budget.items()}
    changes["tasks"] = tuple(dataclasses.replace(t, **budget) for t in tasks)
    return suite.replace(**changes)


# The flags an application suite takes (each sets the suite field of its name).
_APP_FLAGS = ("model", "data_dir", "methods", "seeds", "train_limit", "eval_limit", "max_length", "epochs",
              "batch_size", "lr_scale", "full_lr")


def _app_name(args: argparse.Namespace) -> str | None:
    from .apps import is_app
    from .assess.suites import read_suite_file

    name = args.suite
    if name is None and args.config:
        data = read_suite_file(args.config)
        name = data.get("suite") if isinstance(data, dict) else None
    return name if is_app(name) else None


def cmd_assess_app(args: argparse.Namespace, name: str) -> int:
    import torch

    from .apps import app_module, app_suite
    from .assess.suites import read_suite_file

    refused = [f"--{k.replace('_', '-')}" for k in ("tasks", "max_steps", "max_params", "device", "workers")
               if getattr(args, k) is not None] + [f"--{k.replace('_', '-')}" for k in ("rerun", "no_plots")
                                                   if getattr(args, k)]
    if refused:
        raise PeftlabError(f"the {name} suite does not take {', '.join(refused)}; it takes "
                           f"{', '.join('--' + k.replace('_', '-') for k in _APP_FLAGS)}, --config, --threads and --out")
    changes: dict = {}
    if args.config:
        data = read_suite_file(args.config)
        if not isinstance(data, dict):
            raise PeftlabError(f"{args.config}: expected a mapping of suite fields, got {type(data).__name__}")
        changes.update({k: v for k, v in data.items() if k != "suite"})
    for key in _APP_FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key == "methods":
            value = tuple(m.strip() for m in value.split(",") if m.strip())
        elif key == "seeds":
            try:
                value = tuple(int(s) for s in value.split(","))
            except ValueError:
                raise PeftlabError(f"--seeds {value!r}: expected comma-separated integers, e.g. 0,1,2") from None
        changes[key] = None if value == "all" else value
    suite = app_suite(name, changes, args.config or "the command line")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / "assess" / name)
    try:
        app_module(name).run(suite, out)
    except KeyboardInterrupt:
        print(f"\npeftlab assess: interrupted; what finished is in {out / 'report.md'}", file=sys.stderr)
        return 130
    return 0


def cmd_assess(args: argparse.Namespace) -> int:
    from .assess.runner import Terminated, default_workers, run_suite

    app = _app_name(args)
    if app is not None:
        return cmd_assess_app(args, app)
    suite = _assess_suite(args)
    out = Path(args.out or Path("runs") / "assess" / suite.name)
    try:
        workers = args.workers if args.workers is not None else (1 if args.threads else default_workers(suite))
        run_suite(suite, out, progress=not args.no_progress, rerun=args.rerun, plots=not args.no_plots,
                  workers=workers, threads=args.threads)
    except KeyboardInterrupt as stop:
        print(f"\npeftlab assess: interrupted; finished runs are kept in {out / 'runs'}. "
              "Run the same command again to resume.", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130  # the shell's codes: 128 + signal
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered PEFT methods").set_defaults(func=cmd_methods)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model folder or hub id")
        p.add_argument("--task", required=True,
                       help="GLUE task folder, e.g. ../shared/data/glue/SST-2 (its name picks the task), "
                            "or a task name such as sst2 with --data-dir")
        p.add_argument("--data-dir", default=None,
                       help="folder holding the task folders, or the task's own folder (omit to read the "
                            "hub's glue dataset)")
        p.add_argument("--max-length", type=_positive(int), default=64, help="maximum sequence length (tokens)")
        p.add_argument("--eval-limit", type=_LIMIT, default=None, help="score the first N dev examples")

    train = sub.add_parser("train", help="fine-tune with a PEFT method on a GLUE task")
    common(train)
    train.add_argument("--method", default="lora", help="a name listed by 'peftlab methods', or 'full'")
    train.add_argument("--config", default=None, metavar="FILE",
                       help="a method config file (e.g. the config.json 'peftlab search' writes) instead of --method")
    train.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    train.add_argument("--targets", default=None, help="comma-separated targets, e.g. query,value or @ffn_out")
    train.add_argument("--train-limit", type=_LIMIT, default=None, help="use the first N training examples")
    train.add_argument("--epochs", type=_positive(float), default=1.0)
    train.add_argument("--batch-size", type=_positive(int), default=32)
    train.add_argument("--no-split-by-length", action="store_true",
                       help="run each shuffled batch whole, padded to its longest example (default: as parts of "
                            "similar length, the same gradient with less padding)")
    train.add_argument("--lr", type=_positive(float), default=None, help="default: the method's own default_lr")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--grad-accum", type=_positive(int), default=1, metavar="N",
                       help="batches per optimizer step, their gradients averaged (effective batch N x --batch-size)")
    train.add_argument("--mixed-precision", type=_precision, default="no", metavar="{no,bf16,fp16}",
                       help="autocast forward passes; weights and optimizer state stay fp32 (fp16: GPU only)")
    train.add_argument("--save-every", type=_positive(int), default=None, metavar="N",
                       help="write a checkpoint to OUT/checkpoints every N optimizer steps (the newest is kept)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint (same flags as that run)")
    train.add_argument("--out", default="runs/train", help="folder for the adapter and metrics.json")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="score a saved adapter on a GLUE dev split")
    common(evaluate)
    evaluate.add_argument("--adapter", required=True, help="folder written by 'peftlab train'")
    evaluate.set_defaults(func=cmd_eval)

    search = sub.add_parser("search", help="search a method's configuration (AutoPEFT, S3Delta-M, S4) on a GLUE task; "
                            "candidates are scored on held-out training examples")
    search.add_argument("--model", required=True, help="model folder or hub id")
    search.add_argument("--task", required=True, help="GLUE task folder, or a task name such as sst2 with --data-dir")
    search.add_argument("--data-dir", default=None, help="folder holding the task folders, or the task's own folder")
    search.add_argument("--method", required=True, help="a method found by a search (see 'peftlab methods')")
    search.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="option of the method's config (its search-space settings), repeatable")
    search.add_argument("--trials", type=_positive(int), default=8, help="candidate configurations to train")
    search.add_argument("--steps", type=_positive(int), default=None,
                        help="optimizer steps per candidate (default: one epoch of the search's training examples)")
    search.add_argument("--minutes", type=_positive(float), default=None, help="start no candidate after this long")
    search.add_argument("--holdout", type=float, default=0.2, help="share of the training examples scored (0-1)")
    search.add_argument("--train-limit", type=_LIMIT, default=None, help="use the first N training examples")
    search.add_argument("--max-length", type=_positive(int), default=64, help="maximum sequence length (tokens)")
    search.add_argument("--batch-size", type=_positive(int), default=32)
    search.add_argument("--lr", type=_positive(float), default=None, help="default: the method's own default_lr")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--out", default="runs/search", help="folder for search.json and the chosen config.json")
    search.set_defaults(func=cmd_search)

    assess = sub.add_parser("assess", help="the side-by-side study: methods x tasks, scores, memory, speed",
                            description="Run a suite of (model, tasks, methods, seeds); resumable. Flags override "
                                        "the suite and the --config file. See docs/assessment.md.")
    assess.add_argument("--suite", default=None, help="quick (default), taxonomy (every method), glue, mt, nlg, efficiency, or an application: "
                             "backdoor, multitask, crosslingual")
    assess.add_argument("--config", default=None, help="YAML file of suite fields (may name a base suite)")
    assess.add_argument("--model", default=None, help="model folder or hub id ('random:<shape>' for mt)")
    assess.add_argument("--data-dir", default=None, help="data folder (GLUE root for quick/glue)")
    assess.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. sst2,rte (efficiency: model sizes)")
    assess.add_argument("--methods", default=None, help="comma-separated methods, or 'all'; full fine-tuning is always a row")
    assess.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    assess.add_argument("--train-limit", type=_limit, default=None, help="training examples per task, or 'all'")
    assess.add_argument("--eval-limit", type=_limit, default=None, help="evaluation examples per task, or 'all'")
    assess.add_argument("--max-length", type=_positive(int), default=None, help="maximum sequence length (tokens)")
    assess.add_argument("--epochs", type=_positive(float), default=None)
    assess.add_argument("--max-steps", type=_positive(int), default=None,
                        help="training steps per run (overrides --epochs)")
    assess.add_argument("--batch-size", type=_positive(int), default=None)
    assess.add_argument("--lr-scale", type=_positive(float), default=None,
                        help="every method trains at default_lr x this")
    assess.add_argument("--full-lr", type=_positive(float), default=None, help="learning rate of full fine-tuning")
    assess.add_argument("--max-params", type=_positive(int), default=None, help="efficiency: largest model run on CPU")
    assess.add_argument("--device", default=None, help="efficiency: cpu or cuda (default: cuda when available)")
    assess.add_argument("--threads", type=_positive(int), default=None,
                        help="CPU threads for torch (default: torch's choice); 1 avoids stalls on a busy shared machine")
    assess.add_argument("--workers", type=_positive(int), default=None,
                        help="runs at a time, each in its own process with cores/workers threads (default: 2 "
                             "for a training suite on a CPU-only machine with 2+ cores, else 1)")
    assess.add_argument("--out", default=None, help="output folder (default runs/assess/<suite>)")
    assess.add_argument("--rerun", action="store_true", help="run every run again instead of reusing stored ones")
    assess.add_argument("--no-plots", action="store_true")
    assess.add_argument("--no-progress", action="store_true")
    assess.set_defaults(func=cmd_assess)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    args = build_parser().parse_args(argv)  # bad flags: argparse prints usage and exits with 2
    try:
        return args.func(args)
    except (PeftlabError, TaskDataError, FileNotFoundError) as err:
        # The user's to fix (an option, a path, a data row): one line, no traceback. Any other
        # exception is a bug in peftlab and keeps its traceback.
        print(f"peftlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

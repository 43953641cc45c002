"""`prunevid answer | trace | demo | bench`: the command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .baselines import METHODS
from .config import PruneVidConfig

_KNOBS = [f for f in PruneVidConfig.__dataclass_fields__.values() if f.name not in ("stage1", "stage2")]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per PruneVidConfig knob (defaults: the model's preset)."""
    for f in _KNOBS:
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:  # the optional knobs (retention) are numbers too
            parser.add_argument(flag, type=float if f.default is None else type(f.default), default=None)
    parser.add_argument(
        "--method",
        default="prunevid",
        choices=list(METHODS),
        help="PruneVid, one of its stages, or a baseline at the same --retention",
    )
    parser.add_argument("--no-stage1", action="store_true", help="disable spatial-temporal merging")
    parser.add_argument("--no-stage2", action="store_true", help="disable question-guided pruning")


def config_from_arguments(args: argparse.Namespace, base: PruneVidConfig) -> PruneVidConfig:
    changes = {f.name: getattr(args, f.name) for f in _KNOBS if getattr(args, f.name) is not None}
    if args.no_stage1:
        changes["stage1"] = False
    if args.no_stage2:
        changes["stage2"] = False
    return base.replace(**changes)


def _answer(args: argparse.Namespace) -> None:
    from .pipeline import answer, check_question, load_model, preset
    from .video import check_file

    # What can be checked without the model fails before it loads (a large one takes minutes).
    config_from_arguments(args, PruneVidConfig())
    check_question(args.question)
    check_file(args.video)
    loaded = load_model(args.model)
    config = config_from_arguments(args, preset(args.model, loaded.num_layers))
    result = answer(
        loaded, args.video, args.question, config, max_new_tokens=args.max_new_tokens, method=args.method
    )
    trace = result.trace
    print(result.text)
    print(
        f"\nvisual tokens: {trace.num_visual_tokens} -> {trace.num_after_stage1} (stage 1) "
        f"-> {trace.num_after_stage2} (stage 2), {100 * trace.num_after_stage2 / trace.num_visual_tokens:.1f}% kept"
    )
    print("timings: " + ", ".join(f"{k} {v:.3f}s" for k, v in result.timings.items()))
    if args.trace:
        trace.to_json(args.trace)
        print(f"trace written to {args.trace}")


def _trace(args: argparse.Namespace) -> None:
    args.trace = args.output
    args.max_new_tokens = 1
    _answer(args)


def _demo(args: argparse.Namespace) -> None:
    from .app import launch

    launch(server_name=args.host, server_port=args.port, share=args.share)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunevid", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("answer", "answer a question about a video"),
        ("trace", "write the pruning trace"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("video")
        sub.add_argument("question")
        sub.add_argument(
            "--model",
            default=None,
            help="Hub id or local folder ('tiny-trained': offline synthetic-video model, 'tiny': random)",
        )
        add_config_arguments(sub)
        if name == "answer":
            sub.add_argument("--max-new-tokens", type=int, default=64)
            sub.add_argument("--trace", default=None, help="also write the pruning trace as JSON here")
        else:
            sub.add_argument("--output", "-o", default="trace.json")
        sub.set_defaults(run=_answer if name == "answer" else _trace)

    demo = commands.add_parser("demo", help="launch the Gradio app")
    # Unset, Gradio decides, as for `python app.py`: $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT, else
    # 127.0.0.1 and the first free port from 7860.
    demo.add_argument(
        "--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: $GRADIO_SERVER_PORT, else the first free from 7860)",
    )
    demo.add_argument("--share", action="store_true")
    demo.set_defaults(run=_demo)

    from .bench.cli import add_commands
    from .eval_tasks import add_command

    add_commands(commands.add_parser("bench", help="speed and accuracy benchmarks"))
    add_command(commands)

    args = parser.parse_args(argv)
    if getattr(args, "model", "") is None:
        from .pipeline import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    try:
        args.run(args)
    except (ValueError, RuntimeError, OSError) as error:  # one sentence, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``fuseserve`` command line: one subcommand per job, each with its own ``--help``.

Covers argument parsing and dispatch only; every subcommand builds its settings and calls into
the module that does the work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fuseserve import __version__


def _vocab_map(args: argparse.Namespace) -> int:
    from fuseserve.aligner.tokenview import TokenizerView
    from fuseserve.aligner.vocabmap import StringMode
    from fuseserve.aligner.vocabmap_store import VocabMapStore
    from fuseserve.loading import TokenizerSpecError, load_tokenizer

    try:
        teacher = TokenizerView.from_hf(load_tokenizer(args.teacher), args.teacher)
        target = TokenizerView.from_hf(load_tokenizer(args.target), args.target)
    except TokenizerSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = VocabMapStore(args.out_dir)
    vmap = store.get_or_build(teacher, target, StringMode(args.mode))
    path = store.path_for(teacher.fingerprint, target.fingerprint, vmap.mode)
    print(
        f"{teacher.name} ({teacher.vocab_size}) -> {target.name} ({target.vocab_size}), "
        f"mode {vmap.mode}: {vmap.exact_fraction:.1%} exact, stored at {path}"
    )
    return 0


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls) -> None:
    """One ``--flag`` per settings field; unset flags leave env vars and defaults in charge."""
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = (field.description or name.replace("_", " ")) + f" (default: {default})"
        parser.add_argument(flag, dest=name, default=None, help=help_text)


def settings_from_args(settings_cls, args: argparse.Namespace):
    given = {
        name: getattr(args, name)
        for name in settings_cls.model_fields
        if getattr(args, name, None) is not None
    }
    return settings_cls(**given)


def _teacher(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from pydantic import ValidationError

    from fuseserve.teacher.server import serve
    from fuseserve.teacher.settings import TeacherSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = settings_from_args(TeacherSettings, args)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuseserve",
        description="Knowledge fusion of LLMs (FuseLLM) as online services.",
    )
    parser.add_argument("--version", action="version", version=f"fuseserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    vm = sub.add_parser(
        "vocab-map",
        help="build (or reuse) the EM/MinED vocabulary map from a teacher to a target tokenizer",
        description=(
            "Map every teacher token to a target token: exact match first, else minimum edit "
            "distance. Tokenizer specs: shipped:mistral-v1 | shipped:smollm2 | shipped:minilm | "
            "a directory | a .gguf file | a SentencePiece .model file | a hub id."
        ),
    )
    vm.add_argument("--teacher", required=True, help="teacher tokenizer spec")
    vm.add_argument("--target", required=True, help="target tokenizer spec")
    vm.add_argument(
        "--mode",
        choices=["surface", "fusellm"],
        default="surface",
        help="compare canonical surfaces (default) or the original marker-swapped strings",
    )
    vm.add_argument("--out-dir", default="vocab-maps", help="where maps are stored and reused")
    vm.set_defaults(func=_vocab_map)

    from fuseserve.teacher.settings import TeacherSettings

    teacher = sub.add_parser(
        "teacher",
        help="serve one causal LM's per-position top-k log-probs over gRPC",
        description=(
            "Serve a causal LM as a fuseserve teacher (gRPC service fuseserve.teacher.v1.Teacher, "
            "plus grpc.health.v1 and reflection). Every flag can also be set through an "
            "environment variable FUSESERVE_TEACHER_<FLAG> (e.g. FUSESERVE_TEACHER_PORT=50051)."
        ),
    )
    add_settings_flags(teacher, TeacherSettings)
    teacher.set_defaults(func=_teacher)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

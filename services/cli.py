"""The ``fuseserve`` command line: one subcommand per job, each with its own ``--help``.

Covers argument parsing and dispatch only; every subcommand builds its settings and calls into
the module that does the work. Errors have one style: a caller's mistake is a ``SettingsError``
(one line ``error: ...``, exit status 2), a service that cannot start a ``StartupError`` (exit
status 1, a traceback only with FUSESERVE_DEBUG=1).
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
        raise SettingsError(str(exc)) from None
    store = VocabMapStore(args.out_dir)
    vmap = store.get_or_build(teacher, target, StringMode(args.mode))
    path = store.path_for(teacher.fingerprint, target.fingerprint, vmap.mode)
    print(
        f"{teacher.name} ({teacher.vocab_size}) -> {target.name} ({target.vocab_size}), "
        f"mode {vmap.mode}: {vmap.exact_fraction:.1%} exact, stored at {path}"
    )
    if args.cooc_corpus:
        from fuseserve.trainer.data import read_documents

        try:
            texts = read_documents(args.cooc_corpus)
        except (FileNotFoundError, ValueError) as exc:
            raise SettingsError(f"cooc_corpus: {exc}") from None
        toks = load_tokenizer(args.teacher), load_tokenizer(args.target)
        try:
            _, changed, where = store.refine(vmap, texts, *toks, teacher, target)
        except ValueError as exc:  # not the surface map
            raise SettingsError(str(exc)) from None
        print(
            f"co-occurrence over {len(texts)} documents re-ranked {changed} MinED entries, "
            f"stored at {where}"
        )
    return 0


def add_settings_flags(
    parser: argparse.ArgumentParser, settings_cls, skip: Sequence[str] = ()
) -> None:
    """One ``--flag`` per settings field; unset flags leave env vars and defaults in charge."""
    for name, field in settings_cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, help=flag_help(name, field))


def flag_help(name: str, field) -> str:
    """A settings field's help line: its description, then "(required)" or a default that is set."""
    text = field.description or name.replace("_", " ")
    if field.is_required():
        return text + " (required)"
    default = field.default_factory() if field.default_factory else field.default
    if "default" in text or default is None or default == [] or default == "":
        return text  # the description says what happens when unset, or unset means off
    return text + f" (default: {default})"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class SettingsError(Exception):
    """Bad settings from flags, environment or file: printed, exit status 2."""


def settings_from_args(settings_cls, args: argparse.Namespace, **values):
    """Settings from the flags that were given (plus ``values``), the environment, ``--config``."""
    from pydantic import ValidationError

    from fuseserve.config_file import load_settings_file

    given = {
        name: getattr(args, name)
        for name in settings_cls.model_fields
        if name not in values and getattr(args, name, None) is not None
    }
    given.update({k: v for k, v in values.items() if v is not None})
    try:
        return load_settings_file(settings_cls, getattr(args, "config", None), **given)
    except (ValidationError, ValueError) as exc:
        raise SettingsError(str(exc)) from exc


def _aligner(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import logging

    from fuseserve.aligner.service.app import serve
    from fuseserve.aligner.service.settings import AlignerSettings, parse_teacher_flag

    try:
        teachers = [parse_teacher_flag(t) for t in args.teacher] if args.teacher else None
        options = json.loads(args.options) if args.options else None
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    settings = settings_from_args(AlignerSettings, args, teachers=teachers, options=options)
    if not settings.teachers:
        raise SettingsError("teachers: give at least one --teacher name=host:port")
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return asyncio.run(serve(settings))


def _train(args: argparse.Namespace) -> int:
    import json
    import logging

    from fuseserve.trainer.config import TrainConfig

    def as_list(value: str | None) -> list[str] | None:
        return [v for v in value.split(",") if v] if value else None

    def domain_specs(value: str | None) -> list[str] | None:
        """``code=a.txt,b.txt,prose=c.txt`` -> ["code=a.txt,b.txt", "prose=c.txt"]."""
        specs: list[str] = []
        for item in as_list(value) or []:
            if "=" in item or not specs:
                specs.append(item)
            else:
                specs[-1] += "," + item
        return specs or None

    try:
        options = json.loads(args.fusion_options) if args.fusion_options else None
    except ValueError as exc:
        raise SettingsError(f"fusion_options: not a JSON object: {exc}") from exc
    cfg = settings_from_args(
        TrainConfig,
        args,
        data=as_list(args.data),
        teachers=as_list(args.teachers),
        eval_data=domain_specs(args.eval_data),
        fusion_options=options,
    )
    if cfg.fused_from:  # a store that cannot match is refused here, not inside a Ray worker
        from fuseserve.store.manifest import StoreMismatch
        from fuseserve.store.reader import check_store_settings

        try:
            check_store_settings(cfg)
        except (StoreMismatch, FileNotFoundError) as exc:
            raise SettingsError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from fuseserve.trainer.data import check_training_data

    try:
        check_training_data(cfg)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    from fuseserve.trainer.job import run_training

    result = run_training(cfg)
    print(json.dumps({"metrics": result.metrics, "model_dir": result.model_dir}, default=str))
    return 0


def _export(args: argparse.Namespace) -> int:
    import json
    import logging

    from fuseserve.store.config import ExportConfig

    try:
        options = json.loads(args.fusion_options) if args.fusion_options else None
    except ValueError as exc:
        raise SettingsError(f"fusion_options: not a JSON object: {exc}") from exc
    cfg = settings_from_args(
        ExportConfig,
        args,
        data=[v for v in args.data.split(",") if v] if args.data else None,
        teachers=[v for v in args.teachers.split(",") if v] if args.teachers else None,
        fusion_options=options,
    )
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    from fuseserve.store.export import run_export
    from fuseserve.store.manifest import StoreMismatch

    try:
        report = run_export(cfg)
    except (StoreMismatch, FileNotFoundError) as exc:
        raise SettingsError(str(exc)) from None
    print(report.summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from fuseserve.trainer.data import read_domains
    from fuseserve.trainer.evaluate import evaluate_domains, markdown_table

    try:
        domains = read_domains(args.data, args.chat)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    rows = {}
    for model in args.model:
        results = evaluate_domains(model, domains, args.max_length, chat=args.chat)
        rows[model] = {d: r.value for d, r in results.items()}
    print(markdown_table(rows, list(domains)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _probe(args: argparse.Namespace) -> int:
    """Exit 0 when the target is ready: gRPC health SERVING, or HTTP 200."""
    if args.grpc:
        from fuseserve.errors import StartupError
        from fuseserve.wire.grpc_channel import channel_credentials, health_status

        try:
            credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        except StartupError as exc:
            raise SettingsError(str(exc)) from None
        status = health_status(args.grpc, args.timeout, credentials)
        ok = status == "SERVING"
        print(f"{'ready' if ok else 'not ready'}: {args.grpc}: {status}")
        return 0 if ok else 1
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(args.http, timeout=args.timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {args.http}: {exc}", file=sys.stderr)
        return 1
    print(("ready: " if ok else "not ready: ") + args.http)
    return 0 if ok else 1


def _demo(args: argparse.Namespace) -> int:
    from fuseserve import demo

    cfg = demo.config_from_args(args)
    if args.prepare_only:
        corpus, _, small = demo.prepare(cfg)
        print(f"corpus: {corpus}\nsmall source model: {small}")
    else:
        demo.run_demo(cfg)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from fuseserve.experiment.config import ConfigError, load_experiment

    try:
        cfg = load_experiment(args.config, quick=args.quick).select(args.seeds, args.runs)
        from fuseserve.experiment.corpus import deal_corpus

        deal_corpus(cfg.corpus)  # too little text for the splits asked: one line, before anything
    except (ConfigError, ValueError) as exc:
        raise SettingsError(f"{args.config}: {exc}") from None
    from fuseserve.experiment.report import format_claims, format_table, row_summaries, write_report
    from fuseserve.experiment.runner import ExperimentRunner

    work = args.work_dir or f"experiment-runs/{cfg.name}"
    outcome = ExperimentRunner(cfg, work, args.cache_dir).run()
    summary = write_report(outcome)
    print("\nHeld-out bits per UTF-8 byte (lower is better), mean ± std over seeds:\n")
    print(format_table(row_summaries(outcome), cfg.corpus.domains, cfg.corpus.ood))
    if summary["claims"]:
        print("\nThe paper's claims, checked:\n" + format_claims(summary["claims"]))
    print(f"\n{outcome.minutes:.1f} min; report: {outcome.work_dir / 'results.md'}")
    return 0


def _teacher(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from fuseserve.teacher.server import serve
    from fuseserve.teacher.settings import TeacherSettings

    settings = settings_from_args(TeacherSettings, args)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    asyncio.run(serve(settings))
    return 0


def _add_vocab_map(sub) -> None:
    """``fuseserve vocab-map``: build or reuse a vocabulary map."""
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
    vm.add_argument(
        "--cooc-corpus",
        nargs="+",
        metavar="FILE",
        help="also build the co-occurrence refined map from these texts (files or directories, "
        "as `fuseserve train --data`), used by requests with options vocab='cooc'",
    )
    vm.set_defaults(func=_vocab_map)


def _add_teacher(sub) -> None:
    """``fuseserve teacher``: one flag per teacher setting."""
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


def _add_aligner(sub) -> None:
    """``fuseserve aligner``: a config file, repeatable teachers, one flag per setting."""
    from fuseserve.aligner.service.settings import AlignerSettings

    aligner = sub.add_parser(
        "aligner",
        help="serve fused distributions over REST and gRPC, asking the teachers online",
        description=(
            "Run the aligner: connects to every teacher, builds or loads the vocabulary maps, "
            "then serves POST /v1/fuse (REST, docs at /docs) and fuseserve.aligner.v1 (gRPC). "
            "Settings come from --config (YAML), environment variables FUSESERVE_ALIGNER_<FIELD> "
            "(REDIS_URL too) and these flags, flags winning."
        ),
    )
    aligner.add_argument("--config", help="YAML file of settings (same names as the flags)")
    aligner.add_argument(
        "--teacher",
        action="append",
        metavar="NAME=HOST:PORT[,HOST:PORT]",
        help="a teacher and its replicas (repeatable; replaces the config file's list)",
    )
    aligner.add_argument(
        "--options", help="FusionOptions overrides as JSON, e.g. '{\"temperature\": 2}'"
    )
    add_settings_flags(aligner, AlignerSettings, skip=("teachers", "options"))
    aligner.set_defaults(func=_aligner)


def _add_train(sub) -> None:
    """``fuseserve train``: a config file and one flag per training setting."""
    from fuseserve.trainer.config import TrainConfig

    train = sub.add_parser(
        "train",
        help="train the target model with Ray Train on CLM + fused targets from the aligner",
        description=(
            "Run a Ray Train TorchTrainer job (local ray.init(), or the cluster in RAY_ADDRESS). "
            "Each worker streams fused targets for its upcoming blocks from the aligner's gRPC "
            "FuseStream; loss = lam * CLM + (1 - lam) * fusion. Settings come from --config "
            "(YAML), FUSESERVE_TRAIN_<FIELD> environment variables and these flags (lists as "
            "comma-separated values), flags winning. The same --name and --storage-path resume "
            "from the latest checkpoint."
        ),
    )
    train.add_argument("--config", help="YAML file of settings (same names as the flags)")
    add_settings_flags(train, TrainConfig)
    train.set_defaults(func=_train)


def _add_export(sub) -> None:
    """``fuseserve export``: the training run's block and fusion flags, plus the store's own."""
    from fuseserve.store.config import ExportConfig

    export = sub.add_parser(
        "export",
        help="write the fused targets of a corpus to a store (parquet shards + manifest)",
        description=(
            "Ask the aligner for the fused targets of every block of --data (the blocks "
            "`fuseserve train` builds from the same --data, --tokenizer, --block-size and --chat) "
            "with the run's --teachers, --preset, --fusion-options and --k, and write them to "
            "--out as parquet shards (one row per block: input_ids, fused_ids, fused_probs "
            "(float16), fused_tail, ...) with manifest.json (teachers and revisions, tokenizer "
            "fingerprints, fusion choices, block layout, per-shard sha256). Started again on the "
            "same --out it keeps the finished shards (checksums verified) and does the rest. "
            "Train from it with `fuseserve train --fused-from DIR` (no aligner), "
            "fuseserve.integrations.hf, or datasets.load_dataset('parquet', ...). Settings: "
            "--config (YAML), FUSESERVE_EXPORT_<FIELD> variables, these flags."
        ),
    )
    export.add_argument("--config", help="YAML file of settings (same names as the flags)")
    add_settings_flags(export, ExportConfig)
    export.set_defaults(func=_export)


def _add_eval(sub) -> None:
    """``fuseserve eval``: models, held-out domains, window length."""
    ev = sub.add_parser(
        "eval",
        help="bits per UTF-8 byte of causal LMs on held-out text, per domain",
        description=(
            "Bits per UTF-8 byte (BPB) of each model on each domain: comparable across "
            "tokenizers. Windows of --max-length tokens, each starting with the model's BOS."
        ),
    )
    ev.add_argument("--model", action="append", required=True, help="model spec (repeatable)")
    ev.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DOMAIN=PATH[,PATH]",
        help="held-out text of one domain: files or directories (repeatable)",
    )
    ev.add_argument("--max-length", type=int, default=1024, help="tokens per window")
    ev.add_argument(
        "--chat",
        action="store_true",
        help="the data is chat jsonl (messages, or prompt/response): response-only BPB, bits "
        "of the assistant turns (rendered with each model's chat template) per byte of the "
        "assistant contents",
    )
    ev.add_argument("--json", help="also write the results here")
    ev.set_defaults(func=_eval)


def _add_probe(sub) -> None:
    """``fuseserve probe``: readiness of a gRPC or HTTP endpoint."""
    probe = sub.add_parser(
        "probe",
        help="exit 0 when a service is ready (for container HEALTHCHECKs and scripts)",
        description="Check gRPC health (teacher, aligner) or an HTTP URL (aligner /readyz).",
    )
    target = probe.add_mutually_exclusive_group(required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="grpc.health.v1 Check must be SERVING")
    target.add_argument("--http", metavar="URL", help="GET must answer 200")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    probe.add_argument(
        "--tls-ca", help="gRPC over TLS: PEM CA to trust ('system': the system's roots)"
    )
    probe.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    probe.add_argument("--tls-key", help="key of --tls-cert")
    probe.set_defaults(func=_probe)


def _add_experiment(sub) -> None:
    """``fuseserve experiment``: an experiment file and its overrides."""
    ex = sub.add_parser(
        "experiment",
        help="run an experiment file: the paper's tables with baselines and seeds",
        description=(
            "Run a grid of target training runs through the real system (teacher processes, "
            "the aligner with Redis, fuseserve train jobs) plus the baselines of the file, "
            "evaluate held-out bits per byte per domain, check the paper's claims and write "
            "results.json, results.md and plots. Models, evaluations, finished runs and teacher "
            "scores are cached by content, so a run started again reuses what is done. "
            "Files: experiments/*.yaml."
        ),
    )
    ex.add_argument("config", help="experiment file (YAML), e.g. experiments/table7.yaml")
    ex.add_argument("--quick", action="store_true", help="every stage at smoke-test size")
    ex.add_argument("--work-dir", help="results (default: experiment-runs/NAME)")
    ex.add_argument(
        "--cache-dir", help="models, runs, Redis data (default: ~/.cache/fuseserve/experiments)"
    )
    ex.add_argument("--seeds", help="comma-separated seeds instead of the file's")
    ex.add_argument("--runs", help="comma-separated subset of the file's runs")
    ex.set_defaults(func=_experiment)


def _add_demo(sub) -> None:
    """``fuseserve demo``: the demo's own flags."""
    from fuseserve import demo

    dm = sub.add_parser(
        "demo",
        help="the end-to-end demo: teachers, aligner, fused vs CLM-only training, BPB table",
        description=(
            "Run the whole system locally on embedded defaults (~15 minutes on 2 CPU cores): "
            "build a code + prose corpus from the Python install, train a small SentencePiece "
            "source, serve it and SmolLM2-135M as teachers, run the aligner (Redis when REDIS_URL "
            "is set), train the target fused and CLM-only, print held-out bits per byte and "
            "write a plot."
        ),
    )
    demo.add_arguments(dm)
    dm.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuseserve",
        description="Knowledge fusion of LLMs (FuseLLM) as online services.",
    )
    parser.add_argument("--version", action="version", version=f"fuseserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_vocab_map(sub)
    _add_teacher(sub)
    _add_aligner(sub)
    _add_train(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_probe(sub)
    _add_experiment(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from fuseserve.errors import StartupError

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        import os

        if os.environ.get("FUSESERVE_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

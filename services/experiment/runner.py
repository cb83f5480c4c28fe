"""Run an experiment file end to end through the real system, reusing everything already done.

Covers, in order: the domain corpus; the models the file describes (``models``); held-out bits
per byte of the baselines (the target before training, each source, the ensemble of the sources,
the merge of their weights); then the grid of the target's training runs, every run once per
seed, each a ``fuseserve train --config train.yaml`` process (Ray Train; the runner writes the
run's settings into that file in the run's folder) that streams fused targets from a real
aligner asking real teacher processes, with a persistent redis-server as the aligner's cache, and
that evaluates held-out BPB at fixed intervals while it trains; finally the report (``report``).

Everything expensive is content-addressed under the cache folder and reused when started again:
models (by recipe), evaluations (by model and text), finished runs (by every setting that decides
them), teacher scores and fused blocks (Redis, saved to disk). An interrupted run resumes from its
last checkpoint.

Leaves out: the statistics and files of the report (``stats``, ``report``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fuseserve.experiment.config import ExperimentConfig, TrainingConfig
from fuseserve.experiment.corpus import Corpus, build_corpus
from fuseserve.experiment.models import PreparedModel, prepare_models

if TYPE_CHECKING:
    from fuseserve.launch import ServiceProcess

RUN_VERSION = 1


def default_cache() -> Path:
    from fuseserve import shipped

    return shipped.cache_dir() / "experiments"


@dataclass
class RunRecord:
    """One finished training run: final held-out BPB and the curve measured while training."""

    run: str
    seed: int
    key: str
    model_dir: str
    final: dict[str, float]
    curve: list[dict]  # {"step", "tokens_seen", "eval_bpb": {domain: bpb}}
    wait_fraction: float = 0.0
    teachers: list[str] = field(default_factory=list)
    reused: bool = False
    judged: dict | None = None  # judge.Judged as a dict (with a ``judge`` section)


@dataclass
class Outcome:
    """Everything the report needs."""

    config: ExperimentConfig
    baselines: dict[str, dict[str, float]]  # row -> domain -> BPB
    runs: list[RunRecord]
    best_source: str | None
    minutes: float
    work_dir: Path
    judged_base: dict | None = None  # the target before training, judged like the runs


class ExperimentRunner:
    def __init__(
        self, cfg: ExperimentConfig, work_dir: str | Path, cache_dir: str | Path | None = None
    ) -> None:
        self.cfg = cfg
        self.work = Path(work_dir).expanduser().absolute()
        self.cache = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache()
        self.logs = self.work / "logs"
        self.corpus: Corpus | None = None
        self.models: dict[str, PreparedModel] = {}

    # ------------------------------------------------------------------ stages
    def run(self) -> Outcome:
        started = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.cache / "lock"):
            print(f"experiment {self.cfg.name}: results in {self.work}, cache in {self.cache}")
            self.corpus = build_corpus(self.cfg.corpus, self.work / "corpus")
            self.models = prepare_models(self.cfg, self.corpus, self.cache / "models")
            baselines = self.evaluate_baselines()
            best = self.best_source() if self._needs_best() else None
            runs, judged_base = self.run_grid(best)
        minutes = (time.monotonic() - started) / 60
        return Outcome(self.cfg, baselines, runs, best, minutes, self.work, judged_base)

    def evaluate(self, spec: str, key: str, split: str = "test") -> dict[str, float]:
        """Held-out BPB per domain of one model, cached by (model key, text). Split ``test``
        also gives the out-of-distribution domains (``ood-<kind>``) when the file asks for them."""
        from fuseserve.trainer.evaluate import evaluate_domains

        assert self.corpus is not None
        if split == "test" and self.corpus.ood_domains:
            return {**self.evaluate(spec, key, "test-in"), **self.evaluate(spec, key, "ood")}
        split = "test" if split == "test-in" else split
        length = self.cfg.training.eval_max_length
        text = self.corpus.ood_fingerprint if split == "ood" else self.corpus.fingerprint
        ekey = _hash({"model": key, "text": text, "split": split, "len": length})
        path = self.cache / "evals" / f"{ekey}.json"
        if path.exists():
            return json.loads(path.read_text())
        results = evaluate_domains(spec, self.corpus.heldout(split), length)
        value = {d: r.value for d, r in results.items()}
        _write_json(path, value)
        return value

    def evaluate_baselines(self) -> dict[str, dict[str, float]]:
        cfg, out = self.cfg, {}
        target = self.models[cfg.target]
        sources = [self.models[s] for s in cfg.sources]
        for baseline in cfg.baselines:
            if baseline == "base":
                out["base"] = self.evaluate(target.spec, target.key)
            elif baseline == "sources":
                for s in sources:
                    out[s.name] = self.evaluate(s.spec, s.key)
            elif baseline == "ensemble":
                out["ensemble"] = self._ensemble(sources)
            elif baseline == "merge":
                out["merge"] = self._merge(sources)
        return out

    def _ensemble(self, sources: list[PreparedModel]) -> dict[str, float]:
        from fuseserve.experiment.ensemble import ensemble_bpb

        assert self.corpus is not None
        length = self.cfg.training.eval_max_length
        keys = [s.key for s in sources]
        out = {}
        for split in ("test", "ood") if self.corpus.ood_domains else ("test",):
            fingerprint = self.corpus.ood_fingerprint if split == "ood" else self.corpus.fingerprint
            ekey = _hash({"ensemble": keys, "text": fingerprint, "len": length})
            path = self.cache / "evals" / f"ensemble-{ekey}.json"
            if not path.exists():
                texts = self.corpus.heldout(split)
                _write_json(path, ensemble_bpb([s.spec for s in sources], texts, length))
            out.update(json.loads(path.read_text()))
        return out

    def _merge(self, sources: list[PreparedModel]) -> dict[str, float]:
        from fuseserve.experiment.merge import merge_models

        key = _hash({"merge": [s.key for s in sources]})
        folder = self.cache / "models" / f"merge-{key}"
        if not (folder / "config.json").exists():
            print(f"merge: averaging the weights of {', '.join(s.name for s in sources)}")
            merge_models([s.spec for s in sources], folder)
        return self.evaluate(str(folder), f"merge-{key}")

    def _needs_best(self) -> bool:
        return any(self.cfg.run_settings(r).teachers == "best" for r in self.cfg.runs)

    def best_source(self) -> str:
        """The source with the lowest mean BPB on the validation split (not the test split)."""
        scores = {}
        for name in self.cfg.sources:
            m = self.models[name]
            valid = self.evaluate(m.spec, m.key, split="valid")
            scores[name] = sum(valid.values()) / len(valid)
        best = min(scores, key=scores.__getitem__)
        print(f"best single source on the validation split: {best} ({scores[best]:.4f} BPB)")
        return best

    # ------------------------------------------------------------------ the grid
    def teachers_of(self, settings: TrainingConfig, best: str | None) -> list[str]:
        if settings.teachers == "all":
            return list(self.cfg.sources)
        if settings.teachers == "best":
            assert best is not None
            return [best]
        return list(settings.teachers)

    def run_key(self, run: str, seed: int, teachers: list[str]) -> str:
        assert self.corpus is not None
        from fuseserve.aligner.options import FusionOptions

        settings = self.cfg.run_settings(run)
        fusion = FusionOptions.preset(settings.preset, **settings.options).cache_key()
        return _hash(
            {
                "version": RUN_VERSION,
                "settings": settings.model_dump(
                    mode="json", exclude={"teachers", "preset", "options"}
                ),
                "fusion": fusion if settings.fused else None,
                "teachers": [self.models[t].key for t in teachers] if settings.fused else [],
                "target": self.models[self.cfg.target].key,
                "corpus": self.corpus.fingerprint,
                "seed": seed,
            }
        )

    def run_grid(self, best: str | None) -> tuple[list[RunRecord], dict | None]:
        """Every (seed, run) of the grid, trained (or reused) and, with a ``judge`` section,
        judged; and the judged base model (None without one)."""
        from tqdm.auto import tqdm

        cells = [(seed, run) for seed in self.cfg.seeds for run in self.cfg.runs]
        plan = []
        for seed, run in cells:
            settings = self.cfg.run_settings(run)
            teachers = self.teachers_of(settings, best) if settings.fused else []
            key = self.run_key(run, seed, teachers)
            plan.append((seed, run, settings, teachers, key))
        todo = [p for p in plan if not (self.cache / "runs" / p[4] / "DONE").exists()]
        print(f"training runs: {len(plan)} ({len(plan) - len(todo)} already done)")
        if any(p[2].fused and p[2].options.get("vocab") == "cooc" for p in todo):
            self.prepare_cooc_maps()
        records: list[RunRecord] = []
        needs = any(p[2].fused for p in todo) or self.cfg.judge is not None
        services = _Services(self) if needs else None
        try:
            bar = tqdm(total=len(plan), desc=f"{self.cfg.name}: runs", unit="run")
            for seed, run, settings, teachers, key in plan:
                folder = self.cache / "runs" / key
                if not (folder / "DONE").exists():
                    aligner = services.address() if settings.fused and services else None
                    self.train(run, seed, settings, teachers, folder, aligner)
                record = self.load_record(run, seed, key, folder, teachers)
                if self.corpus is not None and self.corpus.ood_domains:
                    # the final model on text from outside the corpus (after training: the
                    # curve stays in distribution, and finished runs need no retraining)
                    ood = self.evaluate(record.model_dir, f"run-{key}", "ood")
                    record.final = {**record.final, **ood}
                if services is not None and self.cfg.judge is not None:
                    record.judged = self.judged(record.model_dir, folder, services)
                records.append(record)
                bar.update(1)
            bar.close()
            judged_base = None
            if services is not None and self.cfg.judge is not None:
                target = self.models[self.cfg.target]
                judged_base = self.judged(target.spec, self.cache / "judged" / target.key, services)
        finally:
            if services is not None:
                services.stop()
        return records, judged_base

    def judged(self, spec: str, folder: Path, services: _Services) -> dict:
        """The judge's verdict on one model's own completions, cached in ``folder``."""
        from dataclasses import asdict

        from fuseserve.experiment.judge import judge_model
        from fuseserve.loading import load_tokenizer

        assert self.corpus is not None and self.cfg.judge is not None
        judge, k = self.cfg.judge, self.cfg.training.k
        sources = [self.models[s].key for s in self.cfg.sources]
        jkey = _hash({"judge": judge.model_dump(), "k": k, "sources": sources,
                      "text": self.corpus.fingerprint})  # fmt: skip
        path = folder / f"judged-{jkey}.json"
        if path.exists():
            return json.loads(path.read_text())
        print(f"judging the completions of {spec}")
        tokenizer = load_tokenizer(self.models[self.cfg.target].tokenizer)
        prompts_from = self.corpus.heldout("test")
        verdict = judge_model(
            spec, tokenizer, prompts_from, services.address(), list(self.cfg.sources), judge, k
        )
        value = {**asdict(verdict), "judge": judge.model_dump()}
        _write_json(path, value)
        return value

    def prepare_cooc_maps(self) -> None:
        """Co-occurrence refined vocabulary maps (every source onto the target), counted on the
        target's training text, stored where the aligner looks for them."""
        from fuseserve.aligner.cooccurrence import build_refined_map, corpus_fingerprint
        from fuseserve.aligner.tokenview import TokenizerView
        from fuseserve.aligner.vocabmap import StringMode
        from fuseserve.aligner.vocabmap_store import VocabMapStore
        from fuseserve.loading import load_tokenizer

        assert self.corpus is not None
        texts = [t for d in self.corpus.domains for t in self.corpus.texts("fusion", d)]
        fingerprint = corpus_fingerprint(texts)
        store = VocabMapStore(self.cache / "vocab-maps")
        target_tok = load_tokenizer(self.models[self.cfg.target].tokenizer)
        target = TokenizerView.from_hf(target_tok, self.cfg.target)
        for name in self.cfg.sources:
            tok = load_tokenizer(self.models[name].tokenizer)
            view = TokenizerView.from_hf(tok, name)
            stored = store.load(view, target, StringMode.SURFACE, cooc=True)
            if stored is not None and stored.corpus == fingerprint:
                continue
            print(f"co-occurrence map {name} -> {self.cfg.target} on the training text")
            vmap = store.get_or_build(view, target, StringMode.SURFACE)
            store.save(build_refined_map(vmap, texts, tok, target_tok, view, target))

    def train(
        self,
        run: str,
        seed: int,
        settings: TrainingConfig,
        teachers: list[str],
        folder: Path,
        aligner: str | None,
    ) -> None:
        """One ``fuseserve train`` process; a progress bar follows its metrics file."""
        assert self.corpus is not None
        folder.mkdir(parents=True, exist_ok=True)
        metrics = folder / "metrics.jsonl"
        values = self.train_values(seed, settings, folder, metrics)
        values.update(fusion_values(settings, teachers, aligner))
        config = write_train_config(folder / "train.yaml", values)
        args = ["train", "--config", str(config)]
        label = f"{run} (seed {seed})"
        log = self.logs / f"train-{run}-{seed}.log"
        follow_training(args, metrics, settings.steps, log, label, train_env(config))
        (folder / "run.json").write_text(
            json.dumps(
                {"run": run, "seed": seed, "teachers": teachers, "settings": settings.model_dump()},
                indent=1,
            )
        )
        shutil.rmtree(self.work / "ray" / folder.name, ignore_errors=True)
        (folder / "DONE").touch()

    def train_values(
        self, seed: int, settings: TrainingConfig, folder: Path, metrics: Path
    ) -> dict[str, Any]:
        """A run's ``fuseserve train`` settings (``TrainConfig`` field names), all but the
        fusion ones (``fusion_values``)."""
        assert self.corpus is not None
        return {
            "model": self.models[self.cfg.target].spec,
            "data": [str(p) for p in self.corpus.files("fusion")],
            "block_size": settings.block_size,
            "batch_size": settings.batch_size,
            "max_steps": settings.steps,
            "lr": settings.lr,
            "warmup_ratio": settings.warmup_ratio,
            "seed": seed,
            "num_workers": 1,
            "torch_threads": os.cpu_count() or 1,
            "storage_path": str(self.work / "ray"),
            "name": folder.name,
            "checkpoint_every": settings.eval_every or settings.steps,
            "keep_checkpoints": 1,
            "log_every": settings.steps,
            "metrics_file": str(metrics),
            "export_dir": str(folder / "model"),
            "eval_data": [f"{d}={self.corpus.files('test', d)[0]}" for d in self.corpus.domains],
            "eval_every": settings.eval_every,
            "eval_max_length": settings.eval_max_length,
        }

    def load_record(
        self, run: str, seed: int, key: str, folder: Path, teachers: list[str]
    ) -> RunRecord:
        rows = read_metrics(folder / "metrics.jsonl")
        curve = sorted(
            {r["step"]: r for r in rows if "eval_bpb" in r}.values(), key=lambda r: r["step"]
        )
        steps = [r for r in rows if "loss" in r]
        total = sum(r["step_s"] for r in steps) or 1e-9
        wait = sum(r["wait_fraction"] * r["step_s"] for r in steps) / total
        return RunRecord(
            run, seed, key, str(folder / "model"), curve[-1]["eval_bpb"], curve, wait, teachers
        )


def fusion_values(settings: TrainingConfig, teachers: list[str], aligner: str | None) -> dict:
    """The ``fuseserve train`` settings of a run's fusion and on-policy settings."""
    if not settings.fused:
        return {"lam": 1.0}
    values: dict[str, Any] = {
        "aligner": aligner or "",
        "lam": settings.lam,
        "k": settings.k,
        "preset": settings.preset,
        "fusion_loss": settings.fusion_loss,
    }
    if teachers:
        values["teachers"] = list(teachers)
    if settings.lam_end is not None:
        values["lam_end"] = settings.lam_end
    if settings.on_policy > 0:
        values.update(onpolicy_values(settings))
    if settings.options:
        values["fusion_options"] = dict(settings.options)
    return values


def onpolicy_values(settings: TrainingConfig) -> dict[str, Any]:
    """The ``fuseserve train`` settings of a run's on-policy settings."""
    return {
        "on_policy": settings.on_policy,
        "onpolicy_loss": settings.onpolicy_loss,
        "jsd_beta": settings.jsd_beta,
        "prompt_tokens": settings.prompt_tokens,
        "max_new_tokens": settings.max_new_tokens,
        "sampling_temperature": settings.sampling_temperature,
        "top_p": settings.top_p,
    }


def write_train_config(path: Path, values: dict[str, Any]) -> Path:
    """``values`` as the YAML file ``fuseserve train --config`` reads; returns ``path``."""
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def train_env(config: Path, environ=None) -> dict[str, str]:
    """The environment of a training process: this one's, less the ``FUSESERVE_TRAIN_*``
    variables of the settings the file gives (the environment wins over a config file, and the
    run's own settings must win, as flags did)."""
    import yaml

    given = {f"FUSESERVE_TRAIN_{name}".upper() for name in yaml.safe_load(config.read_text())}
    env = os.environ if environ is None else environ
    return {key: value for key, value in env.items() if key.upper() not in given}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def follow_training(
    args: list[str], metrics: Path, steps: int, log_path: Path, label: str, env=None
):
    """Run ``fuseserve train`` (in ``env``; None: this process's) with a progress bar over its
    metrics file; raise with the log's tail when it fails."""
    from tqdm.auto import tqdm

    from fuseserve import launch

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(
            launch.fuseserve_cmd(*args), stdout=logf, stderr=subprocess.STDOUT, env=env
        )
    bar = tqdm(total=steps, desc=f"train {label}", unit="step", leave=False)
    try:
        while proc.poll() is None:
            rows = [r for r in read_metrics(metrics) if "loss" in r]
            if rows:
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
                bar.update(rows[-1]["step"] - bar.n)
            time.sleep(0.5)
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    finally:
        bar.close()
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"training run {label} failed (exit {proc.returncode}):\n{tail}")


class _Services:
    """redis-server (persistent), one teacher process per source, the aligner; started lazily."""

    def __init__(self, runner: ExperimentRunner) -> None:
        self.runner = runner
        self.procs: list = []
        self.aligner: ServiceProcess | None = None

    def address(self) -> str:
        aligner = self.aligner if self.aligner is not None else self.start()
        return f"127.0.0.1:{aligner.port}"

    def start(self) -> ServiceProcess:
        """Start Redis, the teachers and the aligner, wait until they serve; return the aligner."""
        from fuseserve import launch

        r, cfg = self.runner, self.runner.cfg
        block = max(r.cfg.run_settings(run).block_size for run in cfg.runs)
        redis = launch.start_redis(r.logs, maxmemory="1gb", data_dir=r.cache / "redis")
        self.procs.append(redis)
        extra = ["--max-sequence-length", str(4 * block), "--max-k", "64", "--batch-wait-ms", "5"]
        teachers = {
            name: launch.start_teacher(name, r.models[name].spec, r.logs, extra=extra)
            for name in cfg.sources
        }
        self.procs += teachers.values()
        self.aligner = aligner = launch.start_aligner(
            {n: [f"127.0.0.1:{p.port}"] for n, p in teachers.items()},
            r.logs,
            extra=[
                "--target-tokenizer", r.models[cfg.target].spec,
                "--vocab-map-dir", str(r.cache / "vocab-maps"),
                "--k", str(cfg.training.k),
                "--max-block-tokens", str(4 * block),
            ],
            env={"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"},
        )  # fmt: skip
        self.procs.append(self.aligner)
        print(f"starting {len(teachers)} teachers ({', '.join(teachers)}), the aligner and Redis")
        for proc in self.procs[1:]:
            launch.wait_grpc_serving(proc, 900)
        return aligner

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(30.0)


@contextlib.contextmanager
def _exclusive(path: Path):
    """One experiment at a time per cache folder (they share Redis' data and the model cache)."""
    import fcntl

    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another experiment is using the cache {path.parent}; wait for it or give "
                "another --cache-dir"
            ) from None
        yield


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)

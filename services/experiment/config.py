"""The experiment file: corpus splits, models to prepare, the target's training runs, claims.

Covers the schema of ``experiments/*.yaml`` (unknown keys and bad values are rejected naming the
field), the cross-checks a file must pass before anything trains (every model a run or a baseline
names exists, presets and fusion options are valid, model specs point at something), and the
``--quick`` transform that shrinks any experiment to a smoke test of every stage.

Leaves out: running anything (``runner``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPLITS = ("pretrain", "expert", "fusion", "valid", "test")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CorpusConfig(Strict):
    """Domain corpora built from text on this machine; characters per domain for each split."""

    domains: tuple[str, ...] = ("code", "prose", "c")
    pretrain_chars: int = Field(120_000, ge=0, description="base models' training text")
    expert_chars: int = Field(120_000, ge=0, description="domain experts' continued training")
    fusion_chars: int = Field(60_000, ge=0, description="the target's continual training")
    valid_chars: int = Field(8_000, ge=0, description="choosing the best single source")
    test_chars: int = Field(20_000, gt=0, description="held-out evaluation (the tables)")
    piece_chars: int = Field(3_000, ge=200, description="documents are cut into such pieces")
    split_by: Literal["document", "piece"] = Field(
        "document",
        description="document: every document in one split; piece: pieces dealt one by one",
    )
    ood: tuple[Literal["prose", "code", "c"], ...] = Field(
        (), description="out-of-distribution held-out domains (ood-<kind>), text from elsewhere"
    )
    ood_chars: int = Field(20_000, gt=0, description="characters per out-of-distribution domain")

    @model_validator(mode="after")
    def _known(self) -> CorpusConfig:
        from fuseserve.experiment.corpus import DOMAINS

        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise ValueError(f"domains: unknown {unknown}; known: {list(DOMAINS)}")
        return self

    def chars(self, split: str) -> int:
        return getattr(self, f"{split}_chars")


class InitConfig(Strict):
    """A freshly initialised model on a real tokenizer."""

    tokenizer: str = Field(description="tokenizer spec, e.g. shipped:mistral-v1, shipped:tekken")
    architecture: Literal["llama", "gpt_neox"] = "llama"
    hidden: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    seed: int = 0


class SourceTraining(Strict):
    """CLM training of a source model on a corpus split (all domains, or ``split:domain``)."""

    data: str = Field(description="pretrain | expert | fusion, optionally :DOMAIN")
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    block_size: int = Field(128, ge=8)
    seed: int = 0


class ModelConfig(Strict):
    """How to get a model: an existing ``spec``, or ``init`` / ``from`` a model plus ``train``."""

    spec: str | None = Field(None, description="shipped:smollm2, a directory or a .gguf file")
    init: InitConfig | None = None
    from_: str | None = Field(None, alias="from", description="start from this model of the file")
    train: SourceTraining | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> ModelConfig:
        origins = (("spec", self.spec), ("init", self.init), ("from", self.from_))
        given = [name for name, value in origins if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of spec, init, from (got {given or 'none'})")
        if self.spec is not None and self.train is not None:
            raise ValueError("train: a model given by spec is used as it is")
        if self.from_ is not None and self.train is None:
            raise ValueError("train: a model made `from` another needs a train section")
        return self


class TrainingConfig(Strict):
    """``fuseserve train`` settings shared by every run of the grid (a run may override any)."""

    steps: int = Field(120, ge=1)
    block_size: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    lam: float = Field(0.5, ge=0, le=1)
    lam_end: float | None = Field(None, ge=0, le=1)
    k: int = Field(10, ge=1)
    fusion_loss: Literal["soft_ce", "kl"] = "soft_ce"
    preset: str = "default"
    options: dict[str, Any] = Field(default_factory=dict)
    teachers: tuple[str, ...] | Literal["all", "best"] = "all"
    eval_every: int = Field(20, ge=0, description="steps between held-out evaluations")
    eval_max_length: int = Field(512, ge=8)
    on_policy: float = Field(0.0, ge=0, le=1, description="share of on-policy steps")
    onpolicy_loss: Literal["jsd", "sampled_rkl"] = "jsd"
    jsd_beta: float = Field(1.0, ge=0, le=1)
    prompt_tokens: int = Field(0, ge=0, description="on-policy prompt: block prefix length")
    max_new_tokens: int = Field(64, ge=1)
    sampling_temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)

    @property
    def fused(self) -> bool:
        """The run needs the aligner: fusion on off-policy steps, or on-policy steps."""
        lam = min(self.lam, 1.0 if self.lam_end is None else self.lam_end)
        return lam < 1.0 or self.on_policy > 0


class JudgeConfig(Strict):
    """The teachers judge each trained model's own completions of held-out prompts.

    Prompts: ``prompts_per_domain`` windows of ``prompt_tokens`` target tokens from each domain's
    test split; each model samples one completion per prompt (the same seed for every model);
    the aligner (``preset``) gives the chain-rule probability of every completion token, asked
    with one teacher at a time and with all of them (fused). Reported: those teacher-judged bits
    per UTF-8 byte of the completions, and distinct-2 of the completions (a collapse guard)."""

    prompts_per_domain: int = Field(8, ge=1)
    prompt_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    sampling_temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    preset: str = "spans"
    seed: int = 1234


class ClaimConfig(Strict):
    """A statement of the paper checked on the results.

    ``better``: row ``run`` has a lower mean BPB than each row in ``than`` by more than 2 std.
    ``order``: mean BPB increases along ``rows``. ``efficiency``: ``run`` reaches ``baseline``'s
    final BPB with at most ``at_most`` of its tokens. ``judged``: ``run`` has a lower mean
    fused-teacher-judged BPB of its own completions than each row in ``than`` by more than 2 std,
    and a mean held-out BPB at most ``at_most`` (a fraction, e.g. 0.01) above each of theirs.
    ``heldout``: which mean ``better``, ``order`` and ``judged`` compare: ``test`` (in
    distribution) or ``ood`` (the corpus's ``ood`` domains).
    """

    kind: Literal["better", "order", "efficiency", "judged"]
    heldout: Literal["test", "ood"] = "test"
    text: str = Field(description="the claim in words, as the report prints it")
    run: str | None = None
    than: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()
    baseline: str | None = None
    at_most: float | None = Field(None, gt=0)

    def rows_named(self) -> list[str]:
        """Every row the claim refers to ("sources" stands for each source)."""
        named = [self.run, self.baseline, *self.than, *self.rows]
        return [r for r in named if r is not None]


class ExperimentConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    models: dict[str, ModelConfig] = Field(min_length=1)
    target: str = Field(description="the model every run starts from (and whose tokenizer)")
    sources: tuple[str, ...] = Field(min_length=1, description="the teachers / fused models")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    runs: dict[str, dict[str, Any]] = Field(
        min_length=1, description="run name -> overrides of `training`"
    )
    baselines: tuple[Literal["base", "sources", "ensemble", "merge"], ...] = (
        "base",
        "sources",
        "ensemble",
        "merge",
    )
    claims: tuple[ClaimConfig, ...] = ()
    judge: JudgeConfig | None = Field(
        None, description="judge every run's own completions by the teachers (on-policy)"
    )

    @model_validator(mode="after")
    def _references(self) -> ExperimentConfig:
        names = set(self.models)
        for name, model in self.models.items():
            if model.from_ is not None and model.from_ not in names:
                raise ValueError(f"models.{name}.from: no model {model.from_!r} in `models`")
            if model.train is not None:
                split, _, domain = model.train.data.partition(":")
                if split not in ("pretrain", "expert", "fusion"):
                    raise ValueError(
                        f"models.{name}.train.data: {model.train.data!r} is not "
                        "pretrain|expert|fusion[:DOMAIN]"
                    )
                if domain and domain not in self.corpus.domains:
                    raise ValueError(
                        f"models.{name}.train.data: no domain {domain!r} in corpus.domains"
                    )
        _check_acyclic(self.models)
        if self.target not in names:
            raise ValueError(f"target: no model {self.target!r} in `models`")
        for source in self.sources:
            if source not in names:
                raise ValueError(f"sources: no model {source!r} in `models`")
        for run in self.runs:
            self.run_settings(run)  # validates overrides, presets, options and teachers
        if "merge" in self.baselines:
            roots = {s: self.root(s) for s in self.sources}
            if (
                any(self.models[r].init is None for r in roots.values())
                or len({self.models[r].init for r in roots.values()}) > 1
            ):
                raise ValueError(
                    "baselines: `merge` averages weights, so every source must grow from one "
                    f"`init` (one architecture and tokenizer); roots here: {roots}"
                )
        rows = set(self.row_names())
        for i, claim in enumerate(self.claims):
            if claim.kind == "judged" and self.judge is None:
                raise ValueError(f"claims.{i}.kind: a judged claim needs the `judge` section")
            if claim.heldout == "ood" and not self.corpus.ood:
                raise ValueError(f"claims.{i}.heldout: ood, but corpus.ood names no domain")
            for field in ("run", "baseline"):
                value = getattr(claim, field)
                if value is not None and value not in rows:
                    raise ValueError(f"claims.{i}.{field}: no row {value!r}; rows: {sorted(rows)}")
            for field in ("than", "rows"):
                for value in getattr(claim, field):
                    if value not in rows and value != "sources":
                        raise ValueError(
                            f"claims.{i}.{field}: no row {value!r}; rows: {sorted(rows)}"
                        )
        return self

    def root(self, name: str) -> str:
        """The model at the start of ``name``'s chain of ``from``."""
        parent = self.models[name].from_
        while parent is not None:
            name, parent = parent, self.models[parent].from_
        return name

    def run_settings(self, run: str) -> TrainingConfig:
        """The training settings of one run (``training`` plus the run's overrides), checked."""
        from fuseserve.aligner.options import PRESETS, FusionOptions

        overrides = self.runs[run] or {}
        try:
            settings = TrainingConfig(**{**self.training.model_dump(), **overrides})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"runs.{run}.{loc}: {err['msg']}") from None
        if settings.preset not in PRESETS:
            raise ValueError(
                f"runs.{run}.preset: unknown preset {settings.preset!r}; "
                f"choose one of {sorted(PRESETS)}"
            )
        try:
            FusionOptions.preset(settings.preset, **settings.options)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"runs.{run}.options.{loc}: {err['msg']}") from None
        if isinstance(settings.teachers, tuple):
            for teacher in settings.teachers:
                if teacher not in self.sources:
                    raise ValueError(
                        f"runs.{run}.teachers: {teacher!r} is not one of sources {self.sources}"
                    )
        return settings

    def row_names(self) -> list[str]:
        rows: list[str] = []
        for baseline in self.baselines:
            rows += list(self.sources) if baseline == "sources" else [baseline]
        return list(dict.fromkeys(rows + list(self.runs)))  # a source may be the base too

    def select(self, seeds: str | None = None, runs: str | None = None) -> ExperimentConfig:
        """This experiment limited to ``seeds`` ("0,1,2") and ``runs`` ("a,b": the claims that
        name other runs go too); ``ConfigError`` naming the flag for a bad value."""
        cfg = self
        if seeds:
            try:
                chosen = tuple(int(s) for s in seeds.split(","))
            except ValueError:
                raise ConfigError(f"--seeds: expected integers like 0,1,2, got {seeds!r}") from None
            cfg = cfg.model_copy(update={"seeds": chosen})
        if runs:
            wanted = runs.split(",")
            unknown = [r for r in wanted if r not in cfg.runs]
            if unknown:
                raise ConfigError(f"--runs: no run {unknown} in the file; runs: {list(cfg.runs)}")
            cfg = cfg.model_copy(update={"runs": {r: cfg.runs[r] for r in wanted}})
            rows = set(cfg.row_names()) | {"sources"}
            kept = tuple(c for c in cfg.claims if set(c.rows_named()) <= rows)
            cfg = cfg.model_copy(update={"claims": kept})
        return cfg

    @property
    def fused_runs(self) -> list[str]:
        return [r for r in self.runs if self.run_settings(r).fused]

    def quick(self) -> ExperimentConfig:
        """Every stage at smoke-test size: tiny corpus, models and steps; the first seed only."""
        corpus = self.corpus.model_copy(
            update={
                "pretrain_chars": min(self.corpus.pretrain_chars, 6_000),
                "expert_chars": min(self.corpus.expert_chars, 4_000),
                "fusion_chars": min(self.corpus.fusion_chars, 3_000),
                "valid_chars": min(self.corpus.valid_chars, 800),
                "test_chars": min(self.corpus.test_chars, 1_200),
                "ood_chars": min(self.corpus.ood_chars, 1_200),
                "piece_chars": 600,
            }
        )
        models = {}
        for name, m in self.models.items():
            update: dict[str, Any] = {}
            if m.init is not None:
                update["init"] = m.init.model_copy(update={"hidden": 16, "layers": 1, "heads": 2})
            if m.train is not None:
                update["train"] = m.train.model_copy(
                    update={"steps": 3, "batch_size": 2, "block_size": 32}
                )
            models[name] = m.model_copy(update=update)
        small = {"steps": 4, "block_size": 32, "batch_size": 2, "eval_every": 2, "k": 4}
        training = self.training.model_copy(
            update={**small, "prompt_tokens": 0, "max_new_tokens": 8}
        )
        judge = None
        if self.judge is not None:
            judge = self.judge.model_copy(
                update={"prompts_per_domain": 2, "prompt_tokens": 8, "max_new_tokens": 8}
            )
        sized = ("steps", "block_size", "prompt_tokens", "max_new_tokens")
        runs = {
            name: {k: v for k, v in (o or {}).items() if k not in sized}
            for name, o in self.runs.items()
        }
        return self.model_copy(
            update={
                "name": f"{self.name}-quick",
                "seeds": self.seeds[:1],
                "corpus": corpus,
                "models": models,
                "training": training,
                "runs": runs,
                "judge": judge,
            }
        )


def _check_acyclic(models: dict[str, ModelConfig]) -> None:
    for name in models:
        seen = [name]
        current = models[name].from_
        while current is not None:
            if current in seen:
                raise ValueError(f"models.{name}.from: a cycle {' -> '.join([*seen, current])}")
            seen.append(current)
            current = models[current].from_


class ConfigError(ValueError):
    """An experiment file that cannot run; the message names the field."""


def load_experiment(path: str | Path, quick: bool = False) -> ExperimentConfig:
    """Read and check an experiment file (every check that needs no training)."""
    try:
        raw = _read_with_extends(Path(path), [])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{loc}: {msg}" if loc else msg) from None
    _check_specs(cfg)
    return cfg.quick() if quick else cfg


def _read_with_extends(path: Path, chain: list[Path]) -> dict[str, Any]:
    """The file's mapping; ``extends: other.yaml`` (relative to the file) starts from another
    file's mapping and replaces its top-level keys with this file's."""
    from fuseserve.config_file import read_yaml_mapping

    if path.resolve() in chain:
        raise ValueError(f"extends: a cycle through {path}")
    raw = read_yaml_mapping(str(path))
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_with_extends(path.parent / str(parent), [*chain, path.resolve()])
    return {**base, **raw}


def _check_specs(cfg: ExperimentConfig) -> None:
    """Model and tokenizer specs that name nothing fail here, before any training."""
    from fuseserve import shipped
    from fuseserve.loading import SHIPPED, SHIPPED_MODELS

    shipped_models = set(SHIPPED_MODELS)
    for name, model in cfg.models.items():
        if model.spec is not None:
            spec = model.spec
            if spec.startswith("shipped:"):
                if spec not in shipped_models:
                    raise ConfigError(
                        f"models.{name}.spec: unknown shipped model {spec!r}; "
                        f"known: {sorted(shipped_models)}"
                    )
                try:
                    shipped.check_installed(spec)
                except shipped.ShippedAssetMissing as exc:
                    raise ConfigError(f"models.{name}.spec: {spec}: {exc}") from None
            elif not Path(spec).expanduser().exists():
                raise ConfigError(f"models.{name}.spec: no such file or directory {spec!r}")
        if model.init is not None:
            tok = model.init.tokenizer
            if tok.startswith("shipped:") and tok not in SHIPPED:
                raise ConfigError(
                    f"models.{name}.init.tokenizer: unknown shipped tokenizer {tok!r}; "
                    f"known: {sorted(SHIPPED)}"
                )
            if not tok.startswith("shipped:") and not Path(tok).expanduser().exists():
                raise ConfigError(f"models.{name}.init.tokenizer: no such file {tok!r}")

"""The experiment's report: the BPB table with mean ± std over seeds, the paper's claims checked,
token efficiency (Figure 2), and the files: ``results.json``, ``results.md`` and two PNGs.

Leaves out: producing the numbers (``runner``).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from fuseserve.experiment.config import ClaimConfig
from fuseserve.experiment.runner import Outcome
from fuseserve.experiment.stats import (
    Summary,
    significantly_lower,
    summarize,
    token_efficiency,
    tokens_to_reach,
)

REPRODUCED = "reproduced"
NOT_SIGNIFICANT = "same direction, not significant (within 2 std)"
REFUTED = "NOT reproduced"
MIN_SEEDS = 3  # below this a trained run's spread says nothing: the 2-std rule is not applied
T = TypeVar("T")


def heldout_columns(cfg) -> dict[str, tuple[str, ...]]:
    """Mean column -> the domains it averages: "mean" (in distribution, the test split) and,
    when the file asks for it, "ood mean" (text from outside the corpus)."""
    columns = {"mean": tuple(cfg.corpus.domains)}
    if cfg.corpus.ood:
        columns["ood mean"] = tuple(f"ood-{k}" for k in cfg.corpus.ood)
    return columns


def row_summaries(outcome: Outcome) -> dict[str, dict[str, Summary]]:
    """row -> {domain..., "mean"[, ood domain..., "ood mean"]} -> Summary over seeds (baselines:
    one value each)."""
    columns = heldout_columns(outcome.config)
    rows: dict[str, list[dict[str, float]]] = {r: [b] for r, b in outcome.baselines.items()}
    for run in outcome.config.runs:
        records = [r.final for r in outcome.runs if r.run == run]
        if records:
            rows[run] = records
    table: dict[str, dict[str, Summary]] = {}
    for row, finals in rows.items():
        cells: dict[str, Summary] = {}
        for mean, domains in columns.items():
            for d in domains:
                cells[d] = summarize([f[d] for f in finals])
            cells[mean] = summarize([sum(f[d] for d in domains) / len(domains) for f in finals])
        table[row] = cells
    return table


def judged_summaries(outcome: Outcome) -> dict[str, dict[str, Summary]]:
    """row -> {each judge's BPB ("fused" and every source), "distinct2", "completion_len"} ->
    Summary over seeds (the base: one value); empty without a ``judge`` section."""
    table: dict[str, dict[str, Summary]] = {}
    rows: list[tuple[str, list[dict]]] = []
    if outcome.judged_base is not None:
        rows.append(("base", [outcome.judged_base]))
    for run in outcome.config.runs:
        rows.append((run, [r.judged for r in outcome.runs if r.run == run and r.judged]))
    for row, verdicts in rows:
        if not verdicts:
            continue
        cells = {j: summarize([v["bpb"][j] for v in verdicts]) for j in verdicts[0]["bpb"]}
        cells["distinct2"] = summarize([v["distinct2"] for v in verdicts])
        cells["completion_len"] = summarize([v["completion_len"] for v in verdicts])
        table[row] = cells
    return table


def judged_claim(claim: ClaimConfig, table, judged) -> dict:
    """A ``judged`` claim: lower fused-judged BPB by > 2 std, held-out BPB within ``at_most``."""
    run = _needed(claim.run, claim, "run")
    limit = _needed(claim.at_most, claim, "at_most")
    pairs = []
    for other in claim.than:
        a, b = judged[run]["fused"], judged[other]["fused"]
        pair = _verdict(run, a, other, b, min(a.n, b.n) if other != "base" else a.n)
        held, held_other = table[run]["mean"].mean, table[other]["mean"].mean
        pair["heldout_change"] = held / held_other - 1
        if pair["heldout_change"] > limit:  # the held-out guard fails whatever the judges say
            pair["verdict"] = REFUTED
        pairs.append(pair)
    return {"pairs": pairs, "verdict": _overall([p["verdict"] for p in pairs])}


def gap_closed(outcome: Outcome, table: dict[str, dict[str, Summary]]) -> dict[str, dict]:
    """Per run and mean column: the share of the gap between the target before training
    (``base``) and the best source on that column that the run closes, (base − run) / (base −
    best); empty when the file has no base or sources rows."""
    sources = [s for s in outcome.config.sources if s in table]
    if "base" not in table or not sources:
        return {}
    out: dict[str, dict] = {}
    for mean in heldout_columns(outcome.config):
        best = min(sources, key=lambda s: table[s][mean].mean)
        base, gap = table["base"][mean].mean, table["base"][mean].mean - table[best][mean].mean
        for run in outcome.config.runs:
            if run in table and gap > 0:
                share = (base - table[run][mean].mean) / gap
                out.setdefault(run, {})[mean] = {"best": best, "share": share}
    return out


def crossings(outcome: Outcome) -> dict[str, dict[str, dict]]:
    """Figure 2 against the untrained baselines: per run and per level (the ensemble, the merge
    and the best source on the test mean, when the file has them), the training tokens at which
    the run's mean held-out curve first reaches that level, per seed (None: never)."""
    levels: dict[str, float] = {}
    for row in ("ensemble", "merge"):
        if row in outcome.baselines:
            levels[row] = _mean(outcome.baselines[row], outcome.config.corpus.domains)
    sources = [s for s in outcome.config.sources if s in outcome.baselines]
    if sources:
        means = {s: _mean(outcome.baselines[s], outcome.config.corpus.domains) for s in sources}
        best = min(means, key=means.__getitem__)
        levels[f"best source ({best})"] = means[best]
    out: dict[str, dict[str, dict]] = {}
    for run in outcome.config.runs:
        records = sorted((r for r in outcome.runs if r.run == run), key=lambda r: r.seed)
        for name, level in levels.items():
            reached = [tokens_to_reach(*mean_curve(r), level) for r in records]
            out.setdefault(run, {})[name] = {"level": level, "tokens": reached}
    return out


def _mean(bpb: dict[str, float], domains) -> float:
    return sum(bpb[d] for d in domains) / len(domains)


def format_crossings(cross: dict[str, dict[str, dict]]) -> str:
    if not cross or not next(iter(cross.values())):
        return ""
    names = list(next(iter(cross.values())))
    head = " | ".join(f"reaches {n} ({cross[next(iter(cross))][n]['level']:.4f})" for n in names)
    lines = [f"| run | {head} |", "|---|" + "---|" * len(names)]
    for run, cells in cross.items():
        values = []
        for n in names:
            tokens = cells[n]["tokens"]
            got = [t for t in tokens if t is not None]
            text = f"{sum(got) / len(got):,.0f} tokens" if got else "never"
            values.append(
                text
                + (f" ({len(got)} of {len(tokens)} seeds)" if 0 < len(got) < len(tokens) else "")
            )
        lines.append(f"| {run} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def format_gap(gaps: dict[str, dict]) -> str:
    if not gaps:
        return ""
    means = list(next(iter(gaps.values())))
    lines = ["| run | " + " | ".join(f"gap closed ({m}, best: {{}})" for m in means) + " |"]
    lines[0] = lines[0].format(*(next(iter(gaps.values()))[m]["best"] for m in means))
    lines.append("|---|" + "---|" * len(means))
    for run, cells in gaps.items():
        shares = " | ".join(f"{cells[m]['share']:.1%}" if m in cells else "" for m in means)
        lines.append(f"| {run} | {shares} |")
    return "\n".join(lines)


def mean_curve(record) -> tuple[list[float], list[float]]:
    """(tokens seen, mean held-out BPB over domains) at each evaluation of a run."""
    tokens = [float(p["tokens_seen"]) for p in record.curve]
    values = [sum(p["eval_bpb"].values()) / len(p["eval_bpb"]) for p in record.curve]
    return tokens, values


def efficiency(outcome: Outcome, run: str, baseline: str) -> Summary | None:
    """Per seed: tokens ``run`` needs to reach ``baseline``'s final BPB / ``baseline``'s tokens.
    A seed where ``run`` never gets there counts as 1 or more (reported as None when all do)."""
    ratios, never = [], 0
    for seed in outcome.config.seeds:
        a = [r for r in outcome.runs if r.run == run and r.seed == seed]
        b = [r for r in outcome.runs if r.run == baseline and r.seed == seed]
        if not a or not b:
            continue
        ratio = token_efficiency(*mean_curve(a[0]), *mean_curve(b[0]))
        if ratio is None:
            never += 1
        else:
            ratios.append(ratio)
    if not ratios or never:
        return None
    return summarize(ratios)


def check_claims(outcome: Outcome, table: dict[str, dict[str, Summary]]) -> list[dict]:
    """Every claim of the file with its verdict. A comparison that involves a trained run with
    fewer than ``MIN_SEEDS`` seeds is "untested (n seeds)": with one seed the std is 0 and any
    difference would pass the 2-std rule. Baselines (one model each, no seed) are not held to
    it."""
    sources = list(outcome.config.sources)
    runs = set(outcome.config.runs)
    judged = judged_summaries(outcome)

    out = []
    for claim in outcome.config.claims:
        mean = "ood mean" if claim.heldout == "ood" else "mean"

        def verdict(a: str, b: str, mean: str = mean) -> dict:
            seeds = [table[r][mean].n for r in (a, b) if r in runs]
            return _verdict(a, table[a][mean], b, table[b][mean], min(seeds, default=None))

        result: dict = {"claim": claim.text, "kind": claim.kind, "heldout": claim.heldout}
        if claim.kind == "judged":
            result.update(judged_claim(claim, table, judged))
        elif claim.kind in ("better", "order"):
            if claim.kind == "better":
                run = _needed(claim.run, claim, "run")
                than = [s for t in claim.than for s in (sources if t == "sources" else [t])]
                pairs = [verdict(run, other) for other in than]
            else:
                rows = [s for t in claim.rows for s in (sources if t == "sources" else [t])]
                pairs = [verdict(a, b) for a, b in itertools.pairwise(rows)]
            result["pairs"] = pairs
            result["verdict"] = _overall([p["verdict"] for p in pairs])
        else:
            result.update(_efficiency_claim(outcome, claim))
        out.append(result)
    return out


def _efficiency_claim(outcome: Outcome, claim: ClaimConfig) -> dict:
    run = _needed(claim.run, claim, "run")
    baseline = _needed(claim.baseline, claim, "baseline")
    ratio = efficiency(outcome, run, baseline)
    result: dict = {"ratio": None if ratio is None else asdict(ratio)}
    seeds = sum(1 for r in outcome.runs if r.run == run)
    if ratio is None:
        result["verdict"] = REFUTED if seeds >= MIN_SEEDS else untested(seeds)
        result["detail"] = f"{run} never reached {baseline}'s final BPB"
        return result
    ok = ratio.mean <= _needed(claim.at_most, claim, "at_most")
    result["verdict"] = (
        (REPRODUCED if ok else REFUTED) if ratio.n >= MIN_SEEDS else untested(ratio.n)
    )
    result["detail"] = (
        f"{run} reaches {baseline}'s final BPB with {ratio} of its tokens "
        f"(claim: ≤ {claim.at_most})"
    )
    return result


def untested(seeds: int) -> str:
    return f"untested ({seeds} seed{'s' if seeds != 1 else ''})"


def _needed(value: T | None, claim: ClaimConfig, field: str) -> T:
    """A field that the claim's kind needs, or a ValueError naming it."""
    if value is None:
        raise ValueError(f"claim {claim.text!r}: a {claim.kind!r} claim needs `{field}`")
    return value


def _verdict(a_name: str, a: Summary, b_name: str, b: Summary, seeds: int | None = None) -> dict:
    """``a`` below ``b`` by more than 2 std; ``seeds``: the fewest seeds of a trained run in the
    pair (None: both are baselines)."""
    if seeds is not None and seeds < MIN_SEEDS:
        verdict = untested(seeds)
    elif significantly_lower(a, b):
        verdict = REPRODUCED
    elif a.mean < b.mean:
        verdict = NOT_SIGNIFICANT
    else:
        verdict = REFUTED
    return {"lower": a_name, "higher": b_name, "diff": b.mean - a.mean, "verdict": verdict}


def _overall(verdicts: list[str]) -> str:
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == REFUTED for v in verdicts):
        return REFUTED
    pending = [v for v in verdicts if v.startswith("untested")]
    return pending[0] if pending else NOT_SIGNIFICANT


def format_table(table: dict[str, dict[str, Summary]], domains, ood: tuple[str, ...] = ()) -> str:
    """In-distribution domains and their mean, then (``ood``: the OOD kinds) the
    out-of-distribution domains and theirs, side by side."""
    groups = [(tuple(domains), "mean")]
    if ood:
        groups.append((tuple(f"ood-{k}" for k in ood), "ood mean"))
    names = [n for ds, mean in groups for n in (*ds, mean)]
    lines = ["| model | " + " | ".join(names) + " | n |"]
    lines.append("|---|" + "---|" * (len(names) + 1))
    for row, cells in table.items():
        values = []
        for ds, mean in groups:
            values += [str(cells[d]) for d in ds] + [f"**{cells[mean]}**"]
        lines.append(f"| {row} | " + " | ".join(values) + f" | {cells['mean'].n} |")
    return "\n".join(lines)


def format_claims(claims: list[dict]) -> str:
    lines = []
    for c in claims:
        lines.append(f"- **{c['verdict']}**: {c['claim']}")
        for p in c.get("pairs", []):
            held = p.get("heldout_change")
            extra = "" if held is None else f" (held-out BPB {100 * held:+.2f}%)"
            lines.append(
                f"  - {p['lower']} < {p['higher']} by {p['diff']:+.4f} BPB{extra}: {p['verdict']}"
            )
        if "detail" in c:
            lines.append(f"  - {c['detail']}")
    return "\n".join(lines)


def format_judged(judged: dict[str, dict[str, Summary]]) -> str:
    """The judged table: teacher-judged BPB of each row's own completions, distinct-2, length."""
    if not judged:
        return ""
    columns = list(next(iter(judged.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row, cells in judged.items():
        lines.append(f"| {row} | " + " | ".join(str(cells[c]) for c in columns) + " |")
    return "\n".join(lines)


def judged_section(outcome: Outcome) -> list[str]:
    """The report's lines on the judged completions (none without a ``judge`` section)."""
    judged = format_judged(judged_summaries(outcome))
    if not judged:
        return []
    return [
        "## The teachers judge each model's own completions",
        "",
        "Bits per UTF-8 byte of each model's sampled completions of held-out prompts, as the "
        "aligner's chain-rule probabilities give them (one column per teacher, and fused); "
        "distinct-2 of the completions (collapse guard) and their mean length in tokens.",
        "",
        judged,
        "",
    ]


def write_report(outcome: Outcome) -> dict:
    """Write results.json, results.md and the PNGs into the work folder; return the summary."""
    cfg = outcome.config
    table, judged = row_summaries(outcome), judged_summaries(outcome)
    claims = check_claims(outcome, table)
    gaps = gap_closed(outcome, table)
    cross = crossings(outcome)
    work = outcome.work_dir
    plots = {
        "curves": str(work / "bpb-vs-tokens.png"),
        "domains": str(work / "bpb-per-domain.png"),
    }
    plot_curves(outcome, Path(plots["curves"]))
    plot_domains(table, cfg.corpus.domains, Path(plots["domains"]))
    summary = {
        "name": cfg.name,
        "description": cfg.description,
        "seeds": list(cfg.seeds),
        "minutes": outcome.minutes,
        "best_source": outcome.best_source,
        "table": {row: {k: asdict(v) for k, v in cells.items()} for row, cells in table.items()},
        "runs": [
            {
                "run": r.run,
                "seed": r.seed,
                "key": r.key,
                "final": r.final,
                "curve": r.curve,
                "teachers": r.teachers,
                "wait_fraction": r.wait_fraction,
                "judged": r.judged,
            }
            for r in outcome.runs
        ],
        "judged": {r: {k: asdict(v) for k, v in c.items()} for r, c in judged.items()},
        "claims": claims,
        "gap_closed": gaps,
        "crossings": cross,
        "plots": plots,
        "config": cfg.model_dump(mode="json", by_alias=True),
    }
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    md = _markdown(outcome, table, claims, gaps, format_crossings(cross))
    (work / "results.md").write_text("\n".join(md))
    return summary


def _markdown(outcome: Outcome, table, claims: list[dict], gaps: dict, cross_table: str) -> list:
    """The lines of results.md."""
    cfg = outcome.config
    md = [
        f"# {cfg.name}",
        "",
        cfg.description.strip(),
        "",
        f"Held-out bits per UTF-8 byte (lower is better); runs: mean ± std over seeds "
        f"{list(cfg.seeds)}; baselines are single models (n = 1). "
        f"Total {outcome.minutes:.1f} min.",
        "",
        format_table(table, cfg.corpus.domains, cfg.corpus.ood),
        "",
    ]
    if gaps:
        md += [
            "Share of the gap between the target before training (base) and the best source "
            "that each run closes, (base − run) / (base − best source):",
            "",
            format_gap(gaps),
            "",
        ]
    if outcome.best_source:
        md += [f"Best single source (validation split): {outcome.best_source}.", ""]
    md += judged_section(outcome)
    if cross_table:
        md += [
            "Figure 2 against the untrained baselines: training tokens at which each run's mean "
            "held-out BPB (test split) first reaches the level, mean over the seeds that do:",
            "",
            cross_table,
            "",
        ]
    if claims:
        md += ["## The paper's claims, checked", "", format_claims(claims), ""]
    md += [
        "![BPB vs training tokens](bpb-vs-tokens.png)",
        "",
        "![BPB per domain](bpb-per-domain.png)",
        "",
    ]
    return md


def reference_levels(outcome: Outcome) -> dict[str, float]:
    """The base, ensemble and merge as Figure 2 draws them: their mean over the test split's
    domains, the curves' own measure (text from outside the corpus left out)."""
    return {
        row: _mean(bpb, outcome.config.corpus.domains)
        for row, bpb in outcome.baselines.items()
        if row in ("base", "ensemble", "merge")
    }


def plot_curves(outcome: Outcome, path: Path) -> None:
    """Figure 2: mean held-out BPB vs training tokens, mean over seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run in outcome.config.runs:
        curves = [mean_curve(r) for r in outcome.runs if r.run == run]
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)
        tokens = np.array(curves[0][0][:n])
        values = np.array([c[1][:n] for c in curves])
        mean, std = values.mean(0), values.std(0)
        (line,) = ax.plot(tokens, mean, marker="o", markersize=3, label=run)
        ax.fill_between(tokens, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if "ensemble" in outcome.baselines:  # where the run crosses the ensemble
            level = _mean(outcome.baselines["ensemble"], outcome.config.corpus.domains)
            crossed = tokens_to_reach(tokens.tolist(), mean.tolist(), level)
            if crossed is not None:
                ax.plot([crossed], [level], marker="x", markersize=10, color=line.get_color())
    for row, value in reference_levels(outcome).items():
        ax.axhline(value, linestyle=":", linewidth=1, color="grey")
        ax.annotate(row, (0, value), fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out BPB, mean over domains")
    ax.set_title(f"{outcome.config.name}: BPB vs training tokens")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_domains(table: dict[str, dict[str, Summary]], domains, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows)), 4.5))
    width = 0.8 / len(domains)
    for d, domain in enumerate(domains):
        xs = [i + d * width for i in range(len(rows))]
        means = [table[r][domain].mean for r in rows]
        stds = [table[r][domain].std for r in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=domain)
    ax.set_xticks([i + width * (len(domains) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out BPB (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

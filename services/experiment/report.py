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
)

REPRODUCED = "reproduced"
NOT_SIGNIFICANT = "same direction, not significant (within 2 std)"
REFUTED = "NOT reproduced"
T = TypeVar("T")


def row_summaries(outcome: Outcome) -> dict[str, dict[str, Summary]]:
    """row -> {domain..., "mean"} -> Summary over seeds (baselines: one value each)."""
    domains = outcome.config.corpus.domains
    table: dict[str, dict[str, Summary]] = {}
    for row, bpb in outcome.baselines.items():
        table[row] = {d: summarize([bpb[d]]) for d in domains}
        table[row]["mean"] = summarize([sum(bpb[d] for d in domains) / len(domains)])
    for run in outcome.config.runs:
        records = [r for r in outcome.runs if r.run == run]
        if not records:
            continue
        table[run] = {d: summarize([r.final[d] for r in records]) for d in domains}
        means = [sum(r.final[d] for d in domains) / len(domains) for r in records]
        table[run]["mean"] = summarize(means)
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
        pair = _verdict(run, judged[run]["fused"], other, judged[other]["fused"])
        held, held_other = table[run]["mean"].mean, table[other]["mean"].mean
        pair["heldout_change"] = held / held_other - 1
        if pair["heldout_change"] > limit:  # the held-out guard fails whatever the judges say
            pair["verdict"] = REFUTED
        pairs.append(pair)
    return {"pairs": pairs, "verdict": _overall([p["verdict"] for p in pairs])}


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
    sources = list(outcome.config.sources)
    judged = judged_summaries(outcome)
    out = []
    for claim in outcome.config.claims:
        result: dict = {"claim": claim.text, "kind": claim.kind}
        if claim.kind == "judged":
            result.update(judged_claim(claim, table, judged))
        elif claim.kind == "better":
            than = [s for t in claim.than for s in (sources if t == "sources" else [t])]
            run = _needed(claim.run, claim, "run")
            a = table[run]["mean"]
            pairs = []
            for other in than:
                b = table[other]["mean"]
                pairs.append(_verdict(run, a, other, b))
            result["pairs"] = pairs
            result["verdict"] = _overall([p["verdict"] for p in pairs])
        elif claim.kind == "order":
            rows = [s for t in claim.rows for s in (sources if t == "sources" else [t])]
            pairs = [
                _verdict(a, table[a]["mean"], b, table[b]["mean"])
                for a, b in itertools.pairwise(rows)
            ]
            result["pairs"] = pairs
            result["verdict"] = _overall([p["verdict"] for p in pairs])
        else:
            run = _needed(claim.run, claim, "run")
            baseline = _needed(claim.baseline, claim, "baseline")
            ratio = efficiency(outcome, run, baseline)
            result["ratio"] = None if ratio is None else asdict(ratio)
            if ratio is None:
                result["verdict"] = REFUTED
                result["detail"] = f"{claim.run} never reached {claim.baseline}'s final BPB"
            else:
                ok = ratio.mean <= _needed(claim.at_most, claim, "at_most")
                result["verdict"] = REPRODUCED if ok else REFUTED
                result["detail"] = (
                    f"{claim.run} reaches {claim.baseline}'s final BPB with {ratio} of its "
                    f"tokens (claim: ≤ {claim.at_most})"
                )
        out.append(result)
    return out


def _needed(value: T | None, claim: ClaimConfig, field: str) -> T:
    """A field that the claim's kind needs, or a ValueError naming it."""
    if value is None:
        raise ValueError(f"claim {claim.text!r}: a {claim.kind!r} claim needs `{field}`")
    return value


def _verdict(a_name: str, a: Summary, b_name: str, b: Summary) -> dict:
    if significantly_lower(a, b):
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
    return NOT_SIGNIFICANT


def format_table(table: dict[str, dict[str, Summary]], domains) -> str:
    lines = ["| model | " + " | ".join(domains) + " | mean | n |"]
    lines.append("|---|" + "---|" * (len(domains) + 2))
    for row, cells in table.items():
        values = " | ".join(str(cells[d]) for d in domains)
        lines.append(f"| {row} | {values} | **{cells['mean']}** | {cells['mean'].n} |")
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
        "plots": plots,
        "config": cfg.model_dump(mode="json", by_alias=True),
    }
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    md = [
        f"# {cfg.name}",
        "",
        cfg.description.strip(),
        "",
        f"Held-out bits per UTF-8 byte (lower is better); runs: mean ± std over seeds "
        f"{list(cfg.seeds)}; baselines are single models (n = 1). "
        f"Total {outcome.minutes:.1f} min.",
        "",
        format_table(table, cfg.corpus.domains),
        "",
    ]
    if outcome.best_source:
        md += [f"Best single source (validation split): {outcome.best_source}.", ""]
    md += judged_section(outcome)
    if claims:
        md += ["## The paper's claims, checked", "", format_claims(claims), ""]
    md += [
        "![BPB vs training tokens](bpb-vs-tokens.png)",
        "",
        "![BPB per domain](bpb-per-domain.png)",
        "",
    ]
    (work / "results.md").write_text("\n".join(md))
    return summary


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
    for row, bpb in outcome.baselines.items():
        if row in ("base", "ensemble", "merge"):
            value = sum(bpb.values()) / len(bpb)
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

"""Toxicity against perplexity, and against λ for a sweep (the paper's Figure 3), from evaluation reports.

`trl-cadet plot` draws it from the JSON reports of `trl-cadet evaluate`; the demo and the quality benchmark draw it
from the reports they keep. It needs matplotlib (in the `demo` extra).
"""

import math
from pathlib import Path
from typing import Any


def plot_reports(entries: list[dict[str, Any]], output: str, judges: list[str] | None = None) -> None:
    """Plot toxicity against perplexity, and against λ when entries carry `lambda` (the paper's Figure 3).

    Args:
        entries (`list[dict]`):
            `{"label": str, "lambda": float | None, "report": dict}` with reports of `evaluate_model`.
        output (`str`):
            Path of the PNG to write.
        judges (`list[str]`, *optional*):
            Judges to plot; all judges found in the reports by default.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not entries:
        raise ValueError("No report to plot.")
    if judges is None:
        judges = sorted({name for entry in entries for name in entry["report"].get("toxicity", {})})

    def emt(entry, judge, key="expected_max_toxicity"):
        value = entry["report"].get("toxicity", {}).get(judge, {}).get(key)
        return math.nan if value is None else value

    def ppl(entry):
        value = entry["report"].get("perplexity")
        return math.nan if value is None else value

    swept = sorted((e for e in entries if e["lambda"] is not None), key=lambda e: e["lambda"])
    num_panels = 3 if swept else 1
    fig, axes = plt.subplots(1, num_panels, figsize=(5.5 * num_panels, 4.5), squeeze=False)
    axes = axes[0]
    colors = {judge: f"C{i}" for i, judge in enumerate(judges)}

    # Toxicity against perplexity: lower-left is better
    ax = axes[0]
    with_ppl = [e for e in entries if not math.isnan(ppl(e))]
    if with_ppl:
        for judge in judges:
            xs, ys = [ppl(e) for e in with_ppl], [emt(e, judge) for e in with_ppl]
            ax.scatter(xs, ys, color=colors[judge], label=judge)
            for entry, x, y in zip(with_ppl, xs, ys, strict=True):
                if not math.isnan(y):
                    ax.annotate(entry["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        perplexities = [ppl(e) for e in with_ppl]
        if max(perplexities) >= 10 * min(perplexities):  # e.g. a base model beside fine-tuned ones
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.set_xscale("log")
            # Ticks at 1, 2, 3, 5 of every decade, labelled, so that 3.75 and 5.92 can be told apart
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        ax.set_xlabel("Perplexity (held-out text)")
        ax.set_title("Toxicity vs perplexity (lower left is better)")
    else:  # no perplexity in any report: toxicity per model
        positions = range(len(entries))
        for judge in judges:
            ax.scatter(positions, [emt(e, judge) for e in entries], color=colors[judge], label=judge)
        ax.set_xticks(list(positions), [e["label"] for e in entries], rotation=30, ha="right")
        ax.set_title("Toxicity per model")
    ax.set_ylabel("Expected maximum toxicity")
    if judges:
        ax.legend(title="Judge")
    ax.grid(alpha=0.3)

    if swept:
        lambdas = [e["lambda"] for e in swept]
        base = next((e for e in entries if e["lambda"] is None and e["label"] == "base"), None)
        positive = [v for v in lambdas if v > 0]
        # λ sweeps usually span orders of magnitude and include 0
        use_symlog = len(positive) >= 2 and max(positive) / min(positive) >= 100
        ax = axes[1]
        for judge in judges:
            ax.plot(lambdas, [emt(e, judge) for e in swept], "o-", color=colors[judge], label=f"{judge}: EMT")
            ax.plot(
                lambdas,
                [emt(e, judge, "toxicity_probability") for e in swept],
                "s--",
                color=colors[judge],
                alpha=0.6,
                label=f"{judge}: P(toxic)",
            )
            if base is not None:  # the model before any fine-tuning, as a reference
                ax.axhline(emt(base, judge), color=colors[judge], linestyle=":", label=f"{judge}: base EMT")
        ax.set_ylabel("Toxicity")
        ax.set_title("Toxicity vs λ (lower is better)")
        if judges:
            ax.legend(fontsize=8)
        ax = axes[2]
        ax.plot(lambdas, [ppl(e) for e in swept], "o-", color="k")
        title = "Perplexity vs λ (lower is better)"
        if base is not None and not math.isnan(ppl(base)):
            if ppl(base) <= 3 * max(ppl(e) for e in swept):
                ax.axhline(ppl(base), color="k", linestyle=":", label="base")
                ax.legend(fontsize=8)
            else:  # a line that far up would squash the curve: say it instead
                title += f"\nbase model: {ppl(base):.3g}"
        ax.set_ylabel("Perplexity (held-out text)")
        ax.set_title(title)
        for ax in axes[1:]:
            ax.set_xlabel("λ")
            ax.grid(alpha=0.3)
            if use_symlog:
                ax.set_xscale("symlog", linthresh=min(positive))

    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=150)
    plt.close(fig)

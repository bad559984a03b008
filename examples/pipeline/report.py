"""Write ``<out>/report.md`` and ``<out>/report.png`` for the quickstart pipeline: each stage's
held-out score (``<out>/scores/*.json`` from ``evaluate.py``) and its training curves
(``<out>/<stage>/metrics.jsonl``).

    python examples/pipeline/report.py --out results/quickstart
"""

import argparse
import json
from pathlib import Path

STAGES = ("sft", "rm", "dpo", "grpo")
CURVES = {  # stage: (metric, label)
    "sft": [("train/loss", "SFT train loss"), ("val/loss", "SFT validation loss")],
    "rm": [("train/loss", "RM loss"), ("val/acc", "RM validation accuracy")],
    "dpo": [("train/loss", "DPO loss"), ("train/rewards_chosen_mean", "DPO chosen reward"),
            ("train/rewards_rejected_mean", "DPO rejected reward")],
    "grpo": [("train_rollouts/rewards", "GRPO train reward"), ("val_rollouts/rewards", "GRPO held-out reward")],
}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot(out: Path, scores: dict, curves: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(4.2 * (1 + len(curves)), 3.6))
    ax = axes[0]
    names = list(scores)
    labels = [n if scores[n]["metric"] == "exact answer" else f"{n}\n(ranking)" for n in names]
    ax.bar(labels, [scores[n]["score"] for n in names], color="#4c72b0")
    for i, n in enumerate(names):
        ax.text(i, scores[n]["score"] + 0.02, f"{scores[n]['score']:.2f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_title("held-out score by stage")
    for ax, (stage, series) in zip(axes[1:], curves.items()):
        for label, points in series.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                        label=label)
        ax.set_title(stage.upper())
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    scores = {}
    for stage in STAGES:
        f = out / "scores" / f"{stage}.json"
        if f.exists():
            scores[stage] = json.loads(f.read_text())
    curves = {}
    for stage, metrics in CURVES.items():
        data = rows(out / stage / "metrics.jsonl")
        if data:
            curves[stage] = {label: [(r["step"], r[key]) for r in data if isinstance(r.get(key), (int, float))]
                             for key, label in metrics}
    image = plot(out, scores, curves)
    lines = ["# Quickstart pipeline: SFT, then a reward model, DPO and GRPO from the SFT model", "",
             f"![scores and curves]({image.name})", "",
             "| stage | held-out score | what is scored | examples |", "|---|---|---|---|"]
    for stage, s in scores.items():
        ex = "; ".join(f"`{e['prompt'].strip()}` → `{e['response']}`" for e in s.get("examples", [])[:2])
        lines.append(f"| {stage} | {s['score']:.3f} | {s['metric']} ({s['n']}) | {ex} |")
    lines += ["", "Stages (all on CPU, a tiny GPT): `sft` fine-tunes on the bundled tasks; from the SFT model,",
              "`rm` trains a Bradley-Terry reward model and `dpo` runs DPO (with the chosen answer's NLL added)",
              "on counting pairs (the right count chosen, a wrong one rejected), and `grpo` runs GRPO on",
              "counting prompts with an exact-answer reward. SFT, DPO and GRPO are scored on the same held-out",
              "counting prompts (greedy, exact answer); the reward model on ranking held-out counting pairs.",
              "Each stage's metrics.jsonl, checkpoints and config.yaml are in its directory here."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'} and {image}")


if __name__ == "__main__":
    main()

"""The search's Pareto plot (the parent run's `pareto.png`)."""
from pathlib import Path


def pareto_plot(rows: list[dict], targets: list[str], path: Path, cost_key: str = "flops") -> None:
    """Two panels, accuracy vs FLOPs and accuracy vs K: every trial, each target's front as a line,
    the front across targets (when several) circled, FLOPs targets as dashed lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    has = [r for r in rows if r.get("accuracy") is not None and r.get("flops")]
    done = [r for r in has if r["state"] == "COMPLETE"]
    other = [r for r in has if r["state"] != "COMPLETE"]
    groups = list(dict.fromkeys([*targets, *(r["target"] for r in done)]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, col, label in ((axes[0], "flops", "pareto_flops", "FLOPs per image"),
                                (axes[1], "k", "pareto_k", "routing length K (executed blocks)")):
        if other:
            ax.scatter([r[key] for r in other], [100 * r["accuracy"] for r in other], c="0.75", s=16,
                       label="pruned / failed (partial)")
        for i, target in enumerate(groups):
            c = colors[i % len(colors)]
            group = [r for r in done if r["target"] == target]
            if not group:
                continue
            ax.scatter([r[key] for r in group], [100 * r["accuracy"] for r in group], color=c, s=22, alpha=0.6)
            front = sorted((r for r in group if r.get(col)), key=lambda r: r[key])
            ax.plot([r[key] for r in front], [100 * r["accuracy"] for r in front], "o-", color=c, lw=1.5,
                    label=f"front, target {target}" if len(groups) > 1 else "Pareto front")
            for r in front:
                ax.annotate(str(r["trial"]), (r[key], 100 * r["accuracy"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        if key == "flops" and len(groups) > 1:
            top = [r for r in done if r.get("pareto_all")]
            ax.scatter([r["flops"] for r in top], [100 * r["accuracy"] for r in top], s=110, facecolors="none",
                       edgecolors="k", lw=1.2, label="front across targets")
        if key == "flops" and cost_key == "flops":
            for t in sorted({r["target_cost"] for r in rows if r.get("target_cost")}):
                ax.axvline(t, color="0.4", ls="--", lw=0.8)
        ax.set_xlabel(f"{label} (hard routing, val)")
        if ax.get_legend_handles_labels()[0]:   # no finished trial yet: nothing to name
            ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("val accuracy (%)")
    axes[0].set_title("accuracy vs FLOPs" + ("; dashed: targets" if cost_key == "flops" else "")
                      + f" ({', '.join(targets)})")
    axes[1].set_title("accuracy vs routing length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MIN_IMPORTANCE_TRIALS = 5   # complete trials a study needs before fANOVA's importances say anything


def param_importances(studies: dict) -> dict[str, dict[str, float]]:
    """Target -> Optuna's fANOVA importance of each sampled parameter for val accuracy (sums to 1), for
    the studies (target -> optuna.Study) with MIN_IMPORTANCE_TRIALS complete trials or more."""
    import optuna
    out = {}
    for target, study in studies.items():
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        # trials that all score the same leave nothing to apportion (fANOVA raises on zero variance)
        if len(done) >= MIN_IMPORTANCE_TRIALS and any(t.params for t in done) and len({t.value for t in done}) > 1:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)   # the same figure on every call
            out[target] = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return out


def importance_plot(importances: dict[str, dict[str, float]], path: Path) -> None:
    """One bar panel per target: each parameter's share of the val accuracy's variance (fANOVA)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(importances)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), sharex=True, squeeze=False)
    for ax, (target, imp) in zip(axes[0], importances.items()):
        names = sorted(imp, key=imp.get)
        ax.barh(names, [imp[k] for k in names], color="tab:blue")
        ax.set_title(f"target {target}")
        ax.set_xlabel("importance for val accuracy (fANOVA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

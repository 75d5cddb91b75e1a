"""Tables and plots of attack results."""
from __future__ import annotations

import io
import json

from ..config import MLflowConfig
from ..method.attacks.modes import MODES
from ..store import storage
from ..store.tracking import log_url_artifacts, mlflow_run


def system_and_attack_labels(summary: dict) -> tuple[str, str]:
    """(system, attack) labels from a summary's config."""
    cfg = summary["config"]
    a, p, clf = cfg["attack"], cfg["purify"], cfg["classifier"]["arch"]
    modes = [e.get("mode", a["mode"]) for e in a.get("ensemble") or []] or [a["mode"]]
    defended = any(MODES[m].defended for m in modes)
    if not defended:
        system = f"{clf} undefended"
    elif p["step_size"] == 0:
        system = f"{clf} + noise-only chain (K={p['steps']}, s=0)"
    else:
        system = f"{clf} + EBM (K={p['steps']}, s={p['step_size']:g}, sigma={p['noise']:g})"
    if a.get("ensemble") is not None:
        return system, f"ensemble of {len(a['ensemble'])}: worst case over the attacks (debm report shows each)"
    restarts = a.get("restarts", 1)
    return system, attack_label(a) + (f", worst of {restarts} restarts" if restarts > 1 else "")


def attack_label(a: dict) -> str:
    """The label of one attack's settings (an `AttackSettings` dump)."""
    budget = f"{a['norm']} eps={a['eps'] * 255:.3g}/255" if a["norm"] == "linf" else f"l2 eps={a['eps']:g}"
    apgd = a.get("optimizer") == "apgd"
    optimizer = ("APGD" if apgd else "PGD") + ("-DLR" if a.get("loss") == "dlr" else "")
    extra = f" {optimizer}" if apgd or a.get("loss") == "dlr" else ""
    chains = f"{a['eot_attack']}/{a['eot_defense']} chains"
    kink = f"kink-aware (softplus T={a['surrogate_temperature']:g}) " if a.get("surrogate") else ""
    return MODES[a["mode"]].label.format(optimizer=optimizer, budget=budget, steps=a["steps"], chains=chains,
                                          extra=extra, kink=kink)


def upgrade_summary(summary: dict) -> bool:
    """Renames in place the keys of a summary written before today's names; True if any was renamed."""
    renamed = False
    if "natural_accuracy" in summary and "natural_protocol_accuracy" not in summary:  # written before both figures
        summary["natural_protocol_accuracy"] = summary.pop("natural_accuracy")
        summary["natural_protocol_ci95"] = summary.pop("natural_ci95", None)
        renamed = True
    if "worst_case_accuracy" in summary and "reeval_all_right_accuracy" not in summary:  # the re-judgements alone
        summary["reeval_all_right_accuracy"] = summary.pop("worst_case_accuracy")
        summary["reeval_all_right_ci95"] = summary.pop("worst_case_ci95", None)
        renamed = True
    return renamed


def _pct(value: float, ci) -> str:
    return f"{100 * value:5.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def format_table(summaries: list[dict]) -> str:
    """Both natural accuracies and robust accuracy, in percent with 95% Wilson intervals."""
    reeval = any("reevaluations" in s for s in summaries)
    rows = [("system", "images", "natural, protocol % [95% CI]", "natural, defense % [95% CI]", "robust % [95% CI]")
            + (("R-eval mean %", "R-eval all right % [95% CI]", "worst of all judgements % [95% CI]") if reeval else ())
            + ("attack",)]
    for s in summaries:
        system, attack = system_and_attack_labels(s)
        robust = "-" if not MODES[s["config"]["attack"]["mode"]].moves else _pct(s["robust_accuracy"], s["robust_ci95"])
        defense = ("-" if s.get("natural_defense_accuracy") is None
                   else _pct(s["natural_defense_accuracy"], s["natural_defense_ci95"]))
        row = (system, str(s["images"]), _pct(s["natural_protocol_accuracy"], s["natural_protocol_ci95"]), defense,
               robust)
        if reeval:
            upgrade_summary(s)
            worst = s.get("worst_of_all_judgements_accuracy")  # unknown in a summary written before it
            row += ((f"{100 * s['reeval_mean_accuracy']:5.1f} (R={s['reevaluations']})",
                     _pct(s["reeval_all_right_accuracy"], s["reeval_all_right_ci95"]),
                     "-" if worst is None else _pct(worst, s["worst_of_all_judgements_ci95"]))
                    if "reevaluations" in s else ("-", "-", "-"))
        rows.append(row + (attack,))
    tables = [_aligned(rows)] + [format_worst_case(s) for s in summaries if "ensemble" in s or "restarts" in s]
    notes = [format_convergence(s) for s in summaries if s.get("convergence")]
    return "\n\n".join(tables + (["\n".join(notes)] if notes else []))


def format_convergence(summary: dict) -> str:
    """One line: has the evaluation converged (the defense's vote on the clean images and at the breaks, the
    attack's steps)?"""
    c = summary["convergence"]

    def vote(v, what):
        if not v["images"]:
            return f"{what}: no vote recorded"
        more = ("" if not v["undecided"] else f" (about {v['chains_to_decide_all']:,} chains would decide them)"
                if v["chains_to_decide_all"] else " (some are even splits: no number of chains decides them)")
        return f"{what}: {v['undecided']} of {v['images']} not decided at 95%{more}"
    steps = ("no image broke after the clean image" if c["last_break_point"] is None else
             f"last break at point {c['last_break_point']}"
             + (f"; {c['late_breaks']} broke in the last 20% of the steps: increase attack.steps"
                if c["increase_steps"] else ""))
    g = c.get("gradient")
    grad = "" if not g else (f"; EOT gradient ({g['chains']} chains): median cosine {g['cosine_median']:.2f} between "
                             f"two estimates on {g['images']} images, "
                             + (f"about {g['chains_for_0.9']:,} chains for 0.9" if g["chains_for_0.9"]
                                else "no signal"))
    if not (c["natural_vote"]["images"] or c["break_confirmation"]["images"]):  # undefended: no chain ever voted
        return f"{system_and_attack_labels(summary)[0]}, convergence: no chains vote; {steps}{grad}"
    return (f"{system_and_attack_labels(summary)[0]}, convergence ({c['chains']} chains per vote): "
            f"{vote(c['natural_vote'], 'clean images')}; {vote(c['break_confirmation'], 'breaks')}; {steps}{grad}")


def attack_done(summary: dict, output: str) -> str:
    """What an attack job prints at its end: the table, then where its results are."""
    return (format_table([summary]) + "\n"
            + f"results: {output}/records/, {output}/summary.json, {output}/accuracy.png")


def format_worst_case(summary: dict) -> str:
    """A column per attack of an ensemble (or the one attack of a run with restarts), in the order they ran,
    and the worst case's: the images each broke (per restart where there are several) and the robust
    accuracy after it (the worst case's = after the last)."""
    members = summary.get("ensemble") or summary["restarts"]
    restarts = len(members[0].get("broken_per_restart", [0]))
    rows = [("", *(f"{k + 1}. {m['attack']}" for k, m in enumerate(members)), "worst case"),
            ("images broken", *(str(m["broken"]) for m in members), str(sum(m["broken"] for m in members)))]
    if restarts > 1:
        rows.append(("  in restarts 1..R", *("/".join(map(str, m["broken_per_restart"])) for m in members), ""))
    rows.append(("robust % after it", *(_pct(m["robust_accuracy"], m["robust_ci95"]) for m in members),
                 _pct(summary["robust_accuracy"], summary["robust_ci95"])))
    keys = summary["config"]["attack"].get("ensemble_keys", "paired")
    what = f"{restarts} restart(s) each" + (f", {keys} keys" if "ensemble" in summary else "")
    return f"{system_and_attack_labels(summary)[0]}, {summary['images']} images, {what}:\n" + _aligned(rows)


def format_paired(pairs: list[tuple[str, str, dict]]) -> str:
    """One row per pair of runs that share images: what each breaks that the other leaves robust, and the
    two-sided sign test on those images (p: the chance of so uneven a split between equally strong attacks)."""
    rows = [("A", "B", "shared images", "broken by A only", "by B only", "by both", "robust in both", "sign test p")]
    for a, b, d in pairs:
        rows.append((a, b, str(d["images"]), str(d["broken_by_a_only"]), str(d["broken_by_b_only"]),
                     str(d["broken_by_both"]), str(d["robust_in_both"]), f"{d['sign_test_p']:.3g}"))
    return "paired comparison (the images both runs attacked):\n" + _aligned(rows)


def defense_key(summary: dict) -> str:
    """What identifies the defense a run attacked: its system label, the classifier and, when defended, the EBM."""
    cfg, system = summary["config"], system_and_attack_labels(summary)[0]
    ebm = None if system.endswith("undefended") else [cfg.get("ebm"), cfg.get("ebm_net")]
    return json.dumps([system, cfg["classifier"], ebm], sort_keys=True, default=str)


def format_worst_over_runs(groups: list[tuple[str, dict]]) -> str:
    """One row per defense attacked by several runs: the images they all attacked and the robust accuracy of the
    worst case over the runs (an image robust only if robust under every run)."""
    rows = [("system", "runs", "shared images", "robust under every run % [95% CI]")]
    for system, w in groups:
        rows.append((system, str(w["runs"]), str(w["images"]), _pct(w["robust_accuracy"], w["robust_ci95"])))
    return "worst case over the runs of each defense (per shared image):\n" + _aligned(rows)


def _aligned(rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def image_grid_png(images, columns: int = 8) -> bytes:
    """PNG of a grid of [-1, 1] images (clamped), e.g. bank samples or positives."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.as_tensor(images).float().clamp(-1, 1), nrow=columns, padding=2, normalize=True,
                     value_range=(-1, 1))
    buf = io.BytesIO()
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def plot_curves(summaries: list[dict], url: str) -> None:
    """PNG of accuracy over attack steps (x = -1 is the clean image, x = t the PGD iterate t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in summaries:
        curve = s["accuracy_curve"]
        label = " / ".join(system_and_attack_labels(s))
        ax.plot(range(-1, len(curve) - 1), [100 * v for v in curve], marker="." if len(curve) < 30 else None,
                label=label)
    ax.set_xlabel("attack step (-1 = clean image)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())


def log_attack(tracking: MLflowConfig, run_name: str, summary: dict, files: list[str]) -> str | None:
    """One MLflow run for an evaluation: the summary's config as params, accuracies and the curve as metrics, files
    as artifacts."""
    if not tracking.enabled:
        return None
    system, attack = system_and_attack_labels(summary)
    cfg = summary["config"]
    with mlflow_run(tracking, run_name, cfg,
                    tags={"job": "attack", "system": system, "attack": attack, "output": cfg["output"]}) as mlflow:
        metrics = {k: summary[k] for k in ("natural_protocol_accuracy", "natural_defense_accuracy", "robust_accuracy",
                                           "images", "seconds", "image_steps", "confirm_image_steps")}
        for name in ("natural_protocol", "natural_defense", "robust"):
            metrics.update({f"{name}_ci95_low": summary[f"{name}_ci95"][0],
                            f"{name}_ci95_high": summary[f"{name}_ci95"][1]})
        if "reevaluations" in summary:
            metrics.update({k: summary[k] for k in ("reevaluations", "reeval_mean_accuracy",
                                                    "reeval_all_right_accuracy",
                                                    "worst_of_all_judgements_accuracy")})
            for r, acc in enumerate(summary["reeval_accuracies"]):
                mlflow.log_metric("reeval_accuracy", acc, step=r)
        if summary.get("image_steps_per_second") is not None:
            metrics["image_steps_per_second"] = summary["image_steps_per_second"]
        c = summary.get("convergence")
        if c:
            metrics.update({f"{k}_undecided_share": c[k]["undecided_share"]
                            for k in ("natural_vote", "break_confirmation")
                            if c[k]["undecided_share"] is not None})
            metrics["late_breaks"] = c["late_breaks"]
            if c.get("gradient"):
                metrics["gradient_cosine_median"] = c["gradient"]["cosine_median"]
        mlflow.log_metrics(metrics)
        for step, acc in enumerate(summary["accuracy_curve"]):
            mlflow.log_metric("accuracy_curve", acc, step=step)  # step = evaluation point (0 = clean image)
        log_url_artifacts(mlflow, files)
        return mlflow.active_run().info.run_id

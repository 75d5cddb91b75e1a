"""The model card of the GPU-trained EBM (`models/ebm-cifar10-gpu/README.md`) and its curves, written
from its training checkpoint alone, so every session (and `train_ebm_gpu.py --card DIR`) rewrites it."""
from __future__ import annotations

import io

import yaml

from ..store import storage

NAME = "ebm-cifar10-gpu"
HOW_TO_TRAIN = """## Training it further

With one GPU and no Ray: `jobs/train_ebm_gpu.py --resume models/ebm-cifar10-gpu/ckpt.pt`, a session at a time;
docs/gpu.md gives the command, what each session writes here and how to commit it.
"""
DEVIATION = """## Deviation from the paper: the bank is re-burned at each resume

The paper keeps one persistent bank of 50,000 chains through all 250,000 iterations. Its 600 MB
does not travel with the checkpoint between GPU sessions (its sessions returned 8 files of 16 MiB), so it is left
out, and every session after the first rebuilds it before training: each chain starts afresh from
`bank_init` and runs Langevin steps (s, σ of the config) under the EBM of the checkpoint, until the
mean energy of the first 10,000 (`reburn_chunk`) reaches the mean energy that 1,000 chains of the
old bank had under that same EBM when it was saved (checked every `reburn_check` = 10 steps, at
most `reburn_steps` = 500); every other chain then runs as many steps. Everything else resumes
exactly (weights, optimizer state and phase, iteration; every random draw is keyed by (seed,
iteration)). A session of a few thousand iterations draws each of the 50,000 chains about every
500 iterations, so the re-burned bank is itself advanced several times per session. The sessions
table gives each re-burn's steps and the mean ± sd energy of 1,000 bank chains at the last save
and after the re-burn. Only the mean is matched: on a small EBM in the CPU tests the re-burned
chains' energies spread less than those of a bank evolved in a run (sd 0.10 against 0.37), whose
chains range from often-drawn to barely moved from their noise starts.

Seen at the first resume (session 2, iteration 6,193, on an H200): 500 steps from noise did not
reach the saved bank's mean energy (0.020 against -0.071), and the training curves jumped (mean
energy difference -0.23 over the first 100 iterations, gradient norm about 10x) and settled within
about 2,000 iterations; the curves mark each resume. Longer re-burns cost about 0.1 s per step for
the 50,000 chains there."""


def _fmt_energy(e: dict | None) -> str:
    return "-" if not e else f"{e['mean']:.4g} ± {e['std']:.3g}"


def card_text(state: dict | None) -> str:
    """The card for a compact checkpoint, or for none yet (what is committed before any GPU session)."""
    head = (f"# Model card: `{NAME}`\n\nThe paper's CIFAR-10 EBM (Hill, Mitchell, Zhu, ICLR 2021, arXiv 2005.13525) "
            "trained with the paper's configuration, `jobs/configs/train_ebm_cifar10.yaml` (250,000 iterations, "
            "batch 100, K = 100 Langevin steps, s = 1, σ = 0.01, data noise 0.02, Adam 1e-4 then SGD from "
            "iteration 125,000, a bank of 50,000 chains from uniform noise), in sessions of a few minutes on "
            "one GPU with `jobs/train_ebm_gpu.py` (the run loop every trainer shares, without Ray).\n\n")
    if state is None:
        return (head + "**Status: no GPU session has trained it yet.** There is no checkpoint here; the first "
                "session on a GPU starts it (docs/gpu.md), and every later one continues it.\n\n"
                + HOW_TO_TRAIN + "\n" + DEVIATION + "\n")
    tr = state["training"]
    cfg = yaml.safe_load(tr["config"])
    it, total, sessions = state["iteration"], cfg["iterations"], tr["sessions"]
    minutes = sum(s["seconds"] for s in sessions) / 60
    rows = []
    for s in sessions:
        rb, rate = s["reburn"], s["iterations_per_second"]
        reburn = (f"{rb['steps']} steps, {rb['seconds']:.0f} s | {_fmt_energy(rb['energy_before'])} → "
                  f"{_fmt_energy(rb['energy_after'])}") if rb else "none (first session) | -"
        rows.append(f"| {s['session']} | {s['date']} | {s['device']} | {s['torch']} | {s['start_iteration']:,} → "
                    f"{s['end_iteration']:,} | {s['seconds'] / 60:.2f} | {f'{rate:.3g}' if rate else '-'} | {reburn} |")
    grids = "\n".join(f"Session {s['session']}, iteration {s['end_iteration']:,}:\n\n![samples]({s['grid']})\n"
                      for s in sessions if s.get("grid"))
    lv = cfg["langevin"]
    return (head + f"**Status: {it:,} of {total:,} iterations ({100 * it / total:.1f}%)**, phase `{tr['phase']}`, "
            f"{len(sessions)} session(s), {minutes:.1f} device minutes in all.\n\n"
            "| | |\n|---|---|\n"
            f"| file | `ckpt.pt`: an EBM checkpoint (`store.released.load_ebm`, `weights_only=True`) with the "
            "training state riding along; the attack job takes it as it is: `ebm=models/ebm-cifar10-gpu/ckpt.pt` |\n"
            f"| sampler, bank | K = {lv['steps']}, s = {lv['step_size']}, σ = {lv['noise']}; bank of "
            f"{cfg['bank_size'] or 'one chain per training image'} (init `{cfg['bank_init']}`), batch "
            f"{cfg['batch_size']}, data noise {cfg['data_noise']}, seed {cfg['seed']} |\n"
            f"| re-burn | at each resume, fresh chains run until they reach the saved bank's mean energy "
            f"(`reburn_match` = {cfg['reburn_match']}), at most `reburn_steps` = {cfg['reburn_steps']} Langevin "
            f"steps, checked every {cfg['reburn_check']} |\n\n"
            "## Sessions\n\n| session | date (UTC) | device | torch | iterations | minutes | it/s | re-burn | "
            "bank energy, last save → after re-burn |\n|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nMinutes: from the process's start to its last save (data loading, re-burn and "
            "saves included); it/s: training iterations only.\n\n## Curves\n\n![curves](curves.png)\n\n"
            "## Samples (64 bank chains at the end of each session)\n\n" + grids + "\n" + DEVIATION + "\n\n"
            + HOW_TO_TRAIN + "\n## Config\n\n```yaml\n" + tr["config"] + "```\n")


def curves_png(state: dict) -> bytes:
    """Energies of positives and negatives (and of the bank at each save), their difference, the gradient norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, sessions = state["training"]["history"], state["training"]["sessions"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(h["iteration"], h["energy_pos"], label="positives (data + noise)")
    axes[0].plot(h["iteration"], h["energy_neg"], label="negatives (bank chains after K steps)")
    if h["bank_energy"]:
        axes[0].errorbar([b["iteration"] for b in h["bank_energy"]], [b["mean"] for b in h["bank_energy"]],
                         [b["std"] for b in h["bank_energy"]], fmt="o", ms=3, label="bank at each save (mean ± sd)")
    axes[0].set_title("mean energy f(x)")
    axes[1].plot(h["iteration"], h["energy_diff"])
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_title("f(positives) - f(negatives)  (loss × σ²/2)")
    axes[2].semilogy(h["iteration"], h["grad_norm"])
    axes[2].set_title("gradient norm")
    for ax in axes:
        ax.set_xlabel("iteration")
        for s in sessions[1:]:
            ax.axvline(s["start_iteration"], color="red", lw=0.5, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{NAME}: {state['iteration']:,} iterations (dotted: resumes with a re-burned bank)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_card(folder: str, state: dict) -> None:
    storage.write_bytes(storage.join(folder, "curves.png"), curves_png(state))
    storage.write_bytes(storage.join(folder, "README.md"), card_text(state).encode())

"""One prepared device check: correctness on CUDA against the CPU, throughput, and the projection.

    python benchmarks/gpu_check.py --out runs/gpu_check.json            # on a CUDA machine, <= 6 min
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/q.json  # CI: tiny sizes, < 1 min

Uses only the method core (torch, numpy, pyarrow, pillow, pydantic; no Ray, MLflow or s3fs).
Every section runs under a try and a share of the total `--budget`: a failing or slow section is
recorded in the JSON and the rest still run. The JSON is written (atomically) before the table,
which is printed last. See benchmarks/README.md, "The GPU check".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, without installing it

from benchmarks.langevin import plain_loop, sync  # noqa: E402
from distributed_ebm.config import AttackConfig, TrainEBMConfig  # noqa: E402
from distributed_ebm.local.train import LocalTraining  # noqa: E402
from distributed_ebm.method.exact_chain import differentiable_langevin  # noqa: E402
from distributed_ebm.method.langevin import langevin, prepare_energy  # noqa: E402
from distributed_ebm.method.noise import ChainKeys  # noqa: E402
from distributed_ebm.method.precision import set_arithmetic  # noqa: E402
from distributed_ebm.recipes.attack import build_attack  # noqa: E402
from distributed_ebm.store.data import read_parquet  # noqa: E402
from distributed_ebm.store.released import load_ebm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = os.environ.get("DEBM_SHARED", str(REPO.parent / "shared"))
FLOP_PER_IMAGE_STEP = 104e6  # the paper's EBM (width 32): forward plus input gradient
PAPER = {"images": 500, "attack_steps": 50, "eot_attack": 15, "eot_defense": 150, "purify_steps": 1500,
         "train_iterations": 250_000}

FULL = dict(noise_chains=2000, chain=(64, 50), attack=dict(images=5, steps=3, purify=100, eot=(5, 10)),
            exact=(4, 12, 3), judged_chain=(4, 1500), train=dict(batch=100, steps=100, bank=1000, iterations=20),
            batches=(150, 1500, 15000), bench_steps=20, engine=dict(images=100, cap_s=90))
QUICK = dict(noise_chains=8, chain=(2, 3), attack=dict(images=1, steps=1, purify=3, eot=(2, 2)),
             exact=(2, 3, 1), judged_chain=(2, 12), train=dict(batch=4, steps=2, bank=8, iterations=1),
             batches=(4,), bench_steps=2, engine=dict(images=1, cap_s=3, purify=3))

TOL = {"noise_normal_abs": 1e-5, "chain_fp32_abs": 1e-4, "chain_fp32_vs_cpu": 2.0, "exact_rel": 1e-4,
       "train_negatives_abs": 1e-3,
       "train_metrics_rel": 1e-3, "train_params_abs": 2.1e-4, "last_index_chain_abs": 1e-2}


@contextlib.contextmanager
def strict_fp32(on: bool = True):
    """The project's `float32_strict` arithmetic inside the block (method/precision.py: TF32 off, deterministic cuDNN
    and torch algorithms), else its `float32` (TF32); the previous settings restored after."""
    b = torch.backends
    old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic,
           torch.are_deterministic_algorithms_enabled())
    set_arithmetic("cuda" if torch.cuda.is_available() else "cpu", "float32_strict" if on else "float32")
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic = old[:3]
        torch.use_deterministic_algorithms(old[3], warn_only=True)


def max_abs(a, b) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


# --- correctness --------------------------------------------------------------------------------

def check_noise(dev, S, a):
    keys = ChainKeys.replicated(2021, torch.arange(S["noise_chains"]) * 7919 + 2**31, 1, call=0x7FFF0001)
    ref_w = keys._words(12345, 3072, None)
    dkeys = keys.to(dev)
    out = {"chains": len(keys)}
    out["torch_words_equal"] = all(torch.equal(r, d.cpu()) for r, d in zip(ref_w, dkeys._words(12345, 3072, dev)))
    if dev.type == "cuda":
        from distributed_ebm.method import philox_triton
        try:
            fused = philox_triton.words(dkeys, 12345, 3072)
            out["fused_words_equal"] = all(torch.equal(r, d.cpu()) for r, d in zip(ref_w, fused))
        except Exception as exc:  # recorded; the tensor path below still runs
            out["fused_words_equal"], out["fused_error"] = False, f"{type(exc).__name__}: {exc}"[:500]
    z_ref = keys.normal(12345, (32, 32, 3))
    out["normal_max_abs"] = max_abs(z_ref, dkeys.normal(torch.tensor(12345, device=dev), (32, 32, 3)))
    from distributed_ebm.method import langevin as lv
    from distributed_ebm.method import noise
    out["fused_kernel_used"] = bool(noise._FUSED) if dev.type == "cuda" else False
    out["cuda_graph_used"] = lv.GRAPHS_WORK if dev.type == "cuda" else False
    out["ok"] = (out["torch_words_equal"] and out.get("fused_words_equal", True)
                 and out["normal_max_abs"] <= TOL["noise_normal_abs"])
    return out


def check_chain(dev, S, a, ebm_cpu):
    """Device chains against float64 CPU chains. A 50-step chain at s = 1 amplifies rounding:
    the CPU's own float32 chain ends ~1e-2 from float64 (a 1e-7 nudge of the start moves it as
    much), so the device passes if its float32 error is within twice the CPU's float32 error."""
    n, steps = S["chain"]
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    keys = ChainKeys.replicated(5, torch.arange(n), 1, call=3)
    ref = langevin(copy.deepcopy(ebm_cpu).double(), x0.double(), keys, steps)
    ebm = prepare_energy(load_ebm(a.ebm).to(dev))
    xd = x0.to(dev)
    out = {"chains": n, "steps": steps, "moved_max_abs": max_abs(ref, x0),
           "cpu_fp32_vs_fp64_max_abs": max_abs(ref, langevin(ebm_cpu, x0, keys, steps))}
    with strict_fp32():
        out["fp32_eager_max_abs"] = max_abs(ref, langevin(ebm, xd, keys, steps, graph=False))
        if dev.type == "cuda":
            out["fp32_graph_max_abs"] = max_abs(ref, langevin(ebm, xd, keys, steps, graph=True))
    with strict_fp32(False):
        out["tf32_max_abs"] = max_abs(ref, langevin(ebm, xd, keys, steps))
    out["bf16_max_abs"] = max_abs(ref, langevin(ebm, xd, keys, steps, amp=torch.bfloat16))
    floor = TOL["chain_fp32_vs_cpu"] * out["cpu_fp32_vs_fp64_max_abs"] + TOL["chain_fp32_abs"]
    out["ok"] = max(out["fp32_eager_max_abs"], out.get("fp32_graph_max_abs", 0.0)) <= floor
    return out


def check_last_device(dev, S, a, ebm_cpu):
    """The fused noise and a graphed chain on the last CUDA index while cuda:0 is current: the guard
    (method/devices.py) must launch them on the chains' own card (with one GPU the index is 0)."""
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    n, steps = S["chain"]
    keys = ChainKeys.replicated(5, torch.arange(n), 1, call=3)
    x0 = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ebm = prepare_energy(load_ebm(a.ebm).to(last))
    z = keys.to(last).normal(7, (32, 32, 3))
    chain = langevin(ebm, x0.to(last), keys, steps, graph=True)
    torch.cuda.synchronize(last)
    ref = langevin(prepare_energy(load_ebm(a.ebm).to(dev)), x0.to(dev), keys, steps, graph=True)
    out = {"devices": torch.cuda.device_count(), "index": last.index, "noise_device": str(z.device),
           "noise_max_abs_vs_cpu": max_abs(z, keys.normal(7, (32, 32, 3))), "chain_max_abs_vs_dev": max_abs(chain, ref)}
    # a chain run on the wrong card would fail (illegal address) or read garbage; cuDNN's backward is not bitwise
    # deterministic, so two runs agree to rounding amplified by the chain, far below the chains' O(1) moves
    out["ok"] = z.device == last and chain.device == last and out["noise_max_abs_vs_cpu"] <= TOL["noise_normal_abs"] \
        and out["chain_max_abs_vs_dev"] <= TOL["last_index_chain_abs"]
    return out


def attack_config(a, mode="bpda_eot", images=2, steps=1, purify=5, eot=(2, 3), precision="float32", chunk=None):
    return AttackConfig.model_validate({
        "data": {"path": a.data, "count": images}, "classifier": {"arch": "resnet20", "weights": a.classifier},
        "ebm": a.ebm, "purify": {"steps": purify}, "precision": precision, "chunk_size": chunk,
        "attack": {"mode": mode, "steps": steps, "eot_attack": eot[0], "eot_defense": eot[1]},
        "mlflow": {"enabled": False}})


def run_records(cfg, dev, images, strict=False):
    attack = build_attack(cfg, dev)  # sets the cfg's arithmetic (float32: TF32); strict overrides it
    with strict_fp32(strict):
        return attack(images.floats().to(dev), images.labels.to(dev), images.ids)


def check_attack(dev, S, a, data):
    s = S["attack"]
    cfg = attack_config(a, images=s["images"], steps=s["steps"], purify=s["purify"], eot=s["eot"])
    imgs = data.take(torch.arange(s["images"]))
    cpu = run_records(cfg, torch.device("cpu"), imgs)
    devr = run_records(cfg, dev, imgs, strict=True)
    out = {"images": len(cpu), "purify_steps": s["purify"], "attack_steps": s["steps"], "eot": list(s["eot"])}
    same = [c.broken_at == d.broken_at and c.final_pred == d.final_pred
            and c.natural_protocol_pred == d.natural_protocol_pred and c.natural_defense_pred == d.natural_defense_pred
            for c, d in zip(cpu, devr)]
    out["records_equal"] = sum(same)
    out["records_differ"] = len(same) - sum(same)
    # Signed-gradient steps flip a pixel by 2 * step wherever a gradient entry is near zero, so one
    # rounding difference moves a pixel by the step: count such pixels, do not bound their size.
    diffs = [abs(c.adv_image - d.adv_image) for c, d, e in zip(cpu, devr, same) if e]  # numpy
    out["adv_pixels_differing"] = float(sum(int((x > 1e-4).sum()) for x in diffs) / max(sum(x.size for x in diffs), 1))
    out["differing"] = [{"id": c.index, "cpu": [c.broken_at, c.final_pred], "device": [d.broken_at, d.final_pred]}
                        for c, d, e in zip(cpu, devr, same) if not e]
    out["ok"] = out["records_differ"] == 0
    bf = run_records(attack_config(a, images=s["images"], steps=s["steps"], purify=s["purify"], eot=s["eot"],
                                   precision="bf16"), dev, imgs)
    out["bf16_records_differ_from_cpu_fp32"] = sum(c.broken_at != b.broken_at or c.final_pred != b.final_pred
                                                   for c, b in zip(cpu, bf))
    return out


def check_exact(dev, S, a):
    n, steps, segment = S["exact"]
    ebm = prepare_energy(load_ebm(a.ebm).to(dev))
    g = torch.Generator().manual_seed(2)
    x0 = (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).to(dev)
    v = torch.randn(n, 3, 32, 32, generator=g).to(dev)
    keys = ChainKeys.replicated(9, torch.arange(n), 1)
    grads = []
    with strict_fp32():
        for seg in (segment, steps):  # checkpointed, then the whole graph unrolled
            x = x0.clone().requires_grad_(True)
            with torch.enable_grad():
                (gx,) = torch.autograd.grad((differentiable_langevin(ebm, x, keys, steps, segment=seg) * v).sum(), x)
            grads.append(gx)
    rel = float((grads[0] - grads[1]).norm() / grads[1].norm())
    return {"chains": n, "steps": steps, "segment": segment, "rel_diff": rel, "ok": rel <= TOL["exact_rel"]}


def check_judged_chain(dev, S, a):
    """The exact gradient is the judged chain's: at the paper's K = 1500, with the attack's own settings on the
    device (TF32, the CUDA graph; and bf16 autocast), the recomputation in the backward repeats the sampler's
    states bit for bit (the backward compares every segment and raises ChainMismatch otherwise)."""
    from distributed_ebm.method.exact_chain import ChainMismatch

    n, steps = S["judged_chain"]
    ebm = prepare_energy(load_ebm(a.ebm).to(dev))
    g = torch.Generator().manual_seed(3)
    x0 = (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).to(dev)
    keys = ChainKeys.replicated(11, torch.arange(n), 1, call=2)
    out = {"chains": n, "steps": steps}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        x = x0.clone().requires_grad_(True)
        t = time.perf_counter()
        with torch.enable_grad():
            y = differentiable_langevin(ebm, x, keys, steps, amp=amp)
        out[f"{name}_forward_is_the_sampler"] = torch.equal(y.detach(), langevin(ebm, x0, keys, steps, amp=amp))
        try:
            y.sum().backward()
            out[f"{name}_recomputation_equal"] = True
        except ChainMismatch as err:
            out[f"{name}_recomputation_equal"] = False
            out[f"{name}_mismatch"] = str(err)
        out[f"{name}_seconds"] = round(time.perf_counter() - t, 2)
    out["ok"] = all(out[f"{k}_{w}"] for k in ("fp32", "bf16")
                    for w in ("forward_is_the_sampler", "recomputation_equal"))
    return out


def train_config(a, batch, steps, bank, precision="float32"):
    return TrainEBMConfig.model_validate({"data": {"path": a.data}, "batch_size": batch, "bank_size": bank,
                                          "langevin": {"steps": steps}, "mlflow": {"enabled": False},
                                          "precision": precision})


def check_training(dev, S, a, data):
    t = S["train"]
    cfg = train_config(a, t["batch"], t["steps"], t["bank"], precision="float32_strict")
    runs = []
    for d in (torch.device("cpu"), dev):
        with strict_fp32():
            run = LocalTraining(cfg, data, device=d)  # the training's own float32_strict arithmetic
            runs.append((run, run.step()))
    (rc, mc), (rd, md) = runs
    out = {"batch": t["batch"], "steps": t["steps"]}
    out["params_max_abs"] = max(max_abs(p, q) for p, q in zip(rc.ebm.parameters(), rd.ebm.parameters()))
    out["bank_max_abs"] = max_abs(rc.bank.states, rd.bank.states)  # the negatives written back
    out["metrics_max_rel"] = max(abs(mc[k] - md[k]) / max(abs(mc[k]), 1e-12)
                                 for k in ("energy_diff", "loss", "grad_norm"))
    out["ok"] = (out["params_max_abs"] <= TOL["train_params_abs"] and out["metrics_max_rel"] <= TOL["train_metrics_rel"]
                 and out["bank_max_abs"] <= TOL["train_negatives_abs"])
    return out


# --- throughput ---------------------------------------------------------------------------------

def timed(fn, dev) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def bench_langevin(dev, S, a, remaining):
    ebm = prepare_energy(load_ebm(a.ebm).to(dev))
    plain_ebm = load_ebm(a.ebm).to(dev).train()
    for p in plain_ebm.parameters():
        p.requires_grad_(True)
    steps, rows = S["bench_steps"], []
    graph = dev.type == "cuda"
    variants = {
        "plain_fp32": (True, lambda x, k: plain_loop(plain_ebm, x, steps, 1.0, 0.01)),
        "ours_fp32": (True, lambda x, k: langevin(ebm, x, k, steps, graph=graph)),
        "ours_tf32_eager": (False, lambda x, k: langevin(ebm, x, k, steps, graph=False)),
        "ours_tf32_graph": (False, lambda x, k: langevin(ebm, x, k, steps, graph=graph)),
        "ours_bf16_graph": (False, lambda x, k: langevin(ebm, x, k, steps, amp=torch.bfloat16, graph=graph)),
    }
    for batch in S["batches"]:
        if remaining() < 30 and rows:
            rows.append({"batch": batch, "skipped": "budget"})
            continue
        x = torch.rand(batch, 3, 32, 32, device=dev) * 2 - 1
        keys = ChainKeys.replicated(0, torch.arange(batch), 1).to(dev)
        row = {"batch": batch, "steps": steps}
        for name, (strict, fn) in variants.items():
            try:
                with strict_fp32(strict):
                    fn(x, keys)  # warm-up (and graph capture)
                    row[name] = batch * steps / timed(functools.partial(fn, x, keys), dev)
            except torch.OutOfMemoryError:
                row[name] = None
                torch.cuda.empty_cache()
        row["speedup_best_vs_plain"] = (max(v for k, v in row.items() if k.startswith("ours") and v)
                                        / row["plain_fp32"] if row.get("plain_fp32") else None)
        rows.append(row)
        del x
    return rows


def bf16_peak(dev, quick) -> float:
    """FLOP/s of a large bf16 matmul, measured here (the card's usable bf16 rate)."""
    n = 512 if quick else 8192
    dtype = torch.bfloat16
    a_, b_ = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a_ @ b_
    reps = 2 if quick else 50
    t = timed(lambda: [a_ @ b_ for _ in range(reps)], dev)
    return 2 * n ** 3 * reps / t


class _TimeUp(Exception):
    pass


def bench_engine(dev, S, a, data, remaining):
    """BPDA+EOT at the paper's settings through the attack engine, stopped after a time cap."""
    e = S["engine"]
    cap = min(e["cap_s"], max(5.0, remaining() - 60))
    cfg = attack_config(a, images=e["images"], steps=PAPER["attack_steps"],
                        purify=e.get("purify", PAPER["purify_steps"]),
                        eot=(PAPER["eot_attack"], 150))
    attack = build_attack(cfg, dev)
    imgs = data.take(torch.arange(e["images"]))
    start = time.perf_counter()
    points = [0]

    def on_point(point, total):
        points[0] = point + 1
        if time.perf_counter() - start > cap:
            raise _TimeUp

    attack.on_point = on_point
    try:
        attack(imgs.floats().to(dev), imgs.labels.to(dev), imgs.ids)
        finished = True
    except _TimeUp:
        finished = False
    sync(dev)
    wall = time.perf_counter() - start
    done = int(attack.cost.sum())
    return {"images": e["images"], "purify_steps": cfg.purify.steps, "chunk_size": attack.defense.chunk_size,
            "points_done": points[0], "finished": finished, "seconds": wall, "image_steps": done,
            "image_steps_per_s": done / wall}


def bench_training(dev, S, a, data):
    t = S["train"]
    cfg = train_config(a, t["batch"], t["steps"], t["bank"])
    run = LocalTraining(cfg, data, device=dev)
    run.step()  # warm-up, graph capture
    sync(dev)
    seconds = timed(lambda: [run.step() for _ in range(t["iterations"])], dev)
    return {"batch": t["batch"], "steps": t["steps"], "iterations": t["iterations"],
            "iterations_per_s": t["iterations"] / seconds}


# --- driver -------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--data", default=f"{SHARED}/datasets/cifar10/test-exact-1000.parquet")
    p.add_argument("--classifier", default=f"{SHARED}/weights/resnet20-12fca82f.th")
    p.add_argument("--ebm", default=str(REPO / "models" / "ebm-cifar10-cpu" / "ebm.pt"))
    p.add_argument("--out", default="runs/gpu_check.json")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check")
    a = p.parse_args()
    for name in ("data", "classifier", "ebm"):
        if not os.path.isfile(getattr(a, name)):
            print(f"--{name}: no such file: {getattr(a, name)}", file=sys.stderr)
            sys.exit(2)
    if a.budget <= 0:
        print(f"--budget must be > 0 seconds (got {a.budget})", file=sys.stderr)
        sys.exit(2)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu)", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    remaining = lambda: a.budget - (time.perf_counter() - t0)  # noqa: E731
    S = QUICK if a.quick else FULL
    torch.manual_seed(0)
    set_arithmetic(dev, "float32")
    data = read_parquet(a.data)
    ebm_cpu = prepare_energy(load_ebm(a.ebm))
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(sys.argv), "quick": a.quick, "tolerances": TOL,
              "correctness": {}, "throughput": {}, "projection": {}, "errors": {}}

    def section(group, name, fn, need=5.0):
        if remaining() < need:
            report["errors"][name] = "skipped: budget spent"
            return
        t = time.perf_counter()
        try:
            report[group][name] = fn()
            if isinstance(report[group][name], dict):
                report[group][name]["seconds_total"] = round(time.perf_counter() - t, 2)
        except Exception as exc:  # recorded: the other sections still run
            report["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"

    section("correctness", "noise", lambda: check_noise(dev, S, a))
    section("correctness", "langevin_chain", lambda: check_chain(dev, S, a, ebm_cpu))
    if dev.type == "cuda":
        section("correctness", "last_cuda_index", lambda: check_last_device(dev, S, a, ebm_cpu))
    section("correctness", "exact_gradient", lambda: check_exact(dev, S, a))
    section("correctness", "exact_gradient_judged_chain", lambda: check_judged_chain(dev, S, a), need=20)
    section("correctness", "training_iteration", lambda: check_training(dev, S, a, data))
    section("correctness", "bpda_eot_records", lambda: check_attack(dev, S, a, data), need=20)
    section("throughput", "bf16_peak_flops", lambda: bf16_peak(dev, a.quick))
    section("throughput", "langevin", lambda: bench_langevin(dev, S, a, remaining), need=20)
    section("throughput", "training", lambda: bench_training(dev, S, a, data), need=15)
    section("throughput", "bpda_eot_engine", lambda: bench_engine(dev, S, a, data, remaining), need=15)
    project(report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    tmp.replace(out)
    print_table(report, out)


def project(report) -> None:
    th, pr = report["throughput"], report["projection"]
    rows = [r for r in th.get("langevin", []) if "skipped" not in r]
    peak = th.get("bf16_peak_flops")
    if rows:
        best = max((v, k, r["batch"]) for r in rows for k, v in r.items() if k.startswith("ours") and v)
        pr["best_langevin_image_steps_per_s"] = {"rate": best[0], "variant": best[1], "batch": best[2]}
        if peak:
            pr["share_of_bf16_peak"] = best[0] * FLOP_PER_IMAGE_STEP / peak
    # checks and gradients at 52 points, plus the clean image's 150-chain vote and one 150-chain confirmation (the
    # break's): a floor, since every wrong check of a robust image costs another confirmation
    per_image = ((PAPER["attack_steps"] + 2) * PAPER["eot_attack"] + 2 * PAPER["eot_defense"]) * PAPER["purify_steps"]
    eng = th.get("bpda_eot_engine")
    if eng and eng["image_steps_per_s"] > 0:
        pr["eval_500_images_hours"] = PAPER["images"] * per_image / eng["image_steps_per_s"] / 3600
        pr["eval_image_steps_per_image"] = per_image
    tr = th.get("training")
    if tr:
        pr["train_250k_hours"] = PAPER["train_iterations"] / tr["iterations_per_s"] / 3600


def print_table(report, out) -> None:
    print(f"\nGPU check: {report['device']}, torch {report['torch']}, {report['date']}, {report['seconds']} s -> {out}")
    for name, err in report["errors"].items():
        print(f"ERROR {name}: {err.splitlines()[0]}")
    print(f"{'check':<28} {'result':<8} detail")
    for name, c in report["correctness"].items():
        detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                           if k not in ("ok", "differing", "seconds_total"))
        print(f"{name:<28} {'ok' if c.get('ok') else 'DIFFERS':<8} {detail}")
    th = report["throughput"]
    if "bf16_peak_flops" in th:
        print(f"{'bf16 matmul peak':<28} {th['bf16_peak_flops'] / 1e12:.1f} TFLOP/s")
    for r in th.get("langevin", []):
        cells = ", ".join(f"{k}={v:,.0f}" if isinstance(v, float) and not k.startswith("speedup") else f"{k}={v}"
                          for k, v in r.items() if k != "batch")
        print(f"{'langevin batch ' + str(r['batch']):<28} {'':<8} image-steps/s: {cells}")
    if "training" in th:
        print(f"{'training (batch, K)':<28} {'':<8} {th['training']['iterations_per_s']:.2f} it/s "
              f"(batch {th['training']['batch']}, K = {th['training']['steps']})")
    if "bpda_eot_engine" in th:
        e = th["bpda_eot_engine"]
        print(f"{'BPDA+EOT engine':<28} {'':<8} {e['image_steps_per_s']:,.0f} image-steps/s over {e['seconds']:.0f} s, "
              f"{e['points_done']} points, chunk {e['chunk_size']}")
    for k, v in report["projection"].items():
        print(f"{'projection ' + k:<28} {'':<8} {v if not isinstance(v, float) else f'{v:.4g}'}")


if __name__ == "__main__":
    main()

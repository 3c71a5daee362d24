"""tether vs TRL 0.11.4's classic PPOTrainer on identical work, one process at a time (tether's .venv):

    python bench/compare.py [--workloads a b] [--steps N [N]] [--precision {fp32,bf16}] [--compile]
    python bench/compare.py --render bench/results/latest.json     # only rebuild the table

Prepares the shared inputs, measures matmul throughput, then runs each workload on tether and on TRL as
subprocesses, one after another. Prints and writes bench/results/latest.json and latest.md.
--precision bf16 runs both sides under bf16 autocast (fp32 weights and AdamW; see run_tether.py and run_trl.py)
and sets tether's training phase against the bf16 matmul peak; fp32 (the default) autocasts nothing.
--compile runs tether with compile=true (torch.compile of its trained forward pass); TRL runs as it ships.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from workloads import PRECISIONS, RESULTS

HERE = Path(__file__).resolve().parent
TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"


def run(python, script: str, *args) -> dict:
    """Run one side; echo its progress; return its RESULT (or what failed, with the output's tail)."""
    cmd = [str(python), str(HERE / script), *map(str, args)]
    print(f"[compare] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result, tail = None, []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif "Loading weights" not in line and "Writing model shards" not in line:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-25:]
    if proc.wait() != 0 or result is None:
        return {"failed": True, "returncode": proc.returncode, "command": " ".join(cmd), "output_tail": tail}
    return result


def headline(x: dict) -> dict:
    """The side's figures from its fastest timed step. Every step does the same work (same batch shape, response
    lengths within a few tokens), so a slower step is one another process on the shared cores slowed down;
    the fastest is the best estimate of the undisturbed speed (best-of-N, as matmul.py does). Medians and
    every step's phases stay in the JSON."""
    fastest = min(x["per_step"], key=lambda t: t["total"])
    B = x["workload"]["batch_size"]
    h = {"episodes_per_s": B / fastest["total"], "tokens_per_s": x["response_tokens_per_step"] / fastest["total"],
         "episodes_per_cpu_s": B / fastest["cpu"], "peak_rss_mb": x["peak_rss_mb"], "phases": fastest}
    if "train_flops_per_step" in x:
        h["train_gflops_per_s"] = x["train_flops_per_step"] / fastest["optimise"] / 1e9
    return h


def matmul_peak(matmul: dict, precision: str) -> float:
    """The matmul peak of the precision the run used (GFLOP/s): the matmuls of a bf16 run take bf16 operands."""
    return matmul["bf16_peak_gflops" if precision == "bf16" else "peak_gflops"]


def compare_entry(tether: dict, trl: dict, matmul: dict, precision: str = "fp32") -> dict:
    entry = {"tether": tether, "trl": trl}
    ok = not (tether.get("failed") or trl.get("failed"))
    if not tether.get("failed"):
        entry["tether_headline"] = headline(tether)
        if not matmul.get("failed"):
            entry["tether_share_of_matmul_peak"] = (entry["tether_headline"]["train_gflops_per_s"]
                                                    / matmul_peak(matmul, precision))
    if not trl.get("failed"):
        entry["trl_headline"] = headline(trl)
    keys = ("episodes_per_s", "tokens_per_s", "episodes_per_cpu_s", "peak_rss_mb")
    entry["ratios"] = {k: entry["tether_headline"][k] / entry["trl_headline"][k] if ok else None for k in keys}
    if ok:
        entry["weights_match"] = abs(tether["logits_checksum"] - trl["logits_checksum"]) <= 1e-6 * max(
            1.0, abs(tether["logits_checksum"]))
    return entry


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def dtype_note(result: dict) -> str:
    """What the side's forward passes and stored tensors were, from its DtypeProbe and stored_dtypes."""
    seen = "; ".join(f"{k} {'/'.join(f'{d} x{n}' for d, n in v.items())}"
                     for k, v in result["forward_dtypes"].items()) or "none probed"
    stored = result["stored_dtypes"]
    return (f"MLP outputs: {seen}. Trained weights {'/'.join(stored['weights'])}, reference weights "
            f"{'/'.join(stored['reference_weights'])}, optimiser state {'/'.join(stored['optimizer_state'])}")


def dtypes_as_expected(result: dict, precision: str) -> bool:
    """Every counted forward in the precision's dtype; trained weights and AdamW state in fp32 whatever the
    precision. The frozen reference may hold bf16 weights under bf16 (tether stores its linear layers in bf16,
    which autocast would cast them to anyway), never under fp32."""
    want = "bfloat16" if precision == "bf16" else "float32"
    stored = result["stored_dtypes"]
    reference_ok = set(stored["reference_weights"]) <= ({"float32", "bfloat16"} if precision == "bf16" else {"float32"})
    return (result["forward_dtypes"] and all(set(v) == {want} for v in result["forward_dtypes"].values())
            and stored["weights"] == ["float32"] and stored["optimizer_state"] == ["float32"] and reference_ok)


def markdown(report: dict) -> str:
    precision = report.get("precision", "fp32")
    rows = ["| workload | side | episodes/s | tokens/s | episodes per CPU-s | peak RSS (MB) | generate (s/step) "
            "| reward + PPO step (s/step) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name, r in report["workloads"].items():
        for side in ("tether", "trl"):
            label = "tether (compile=true)" if side == "tether" and r[side].get("compile") else side
            if r[side].get("failed"):
                rows.append(f"| ({name}) | {label} | failed | failed | failed | failed | | |")
                continue
            h = r[f"{side}_headline"]
            s = h["phases"]
            rows.append(f"| ({name}) | {label} | {h['episodes_per_s']:.2f} | {h['tokens_per_s']:.1f} | "
                        f"{h['episodes_per_cpu_s']:.3f} | {h['peak_rss_mb']:.0f} | {s['generate']:.2f} | "
                        f"{s['total'] - s['generate']:.2f} |")
        q = r["ratios"]
        rows.append(f"| ({name}) | **tether / TRL** | **{fmt(q['episodes_per_s'])}** | **{fmt(q['tokens_per_s'])}** | "
                    f"**{fmt(q['episodes_per_cpu_s'])}** | **{fmt(q['peak_rss_mb'])}** | | |")
        if "tether_headline" in r:
            h = r["tether_headline"]
            s = h["phases"]
            notes.append(f"- ({name}) tether phases, s/step: generate {s['generate']:.2f}, reward {s['reward']:.3f}, "
                         f"scoring forward {s['score_forward']:.2f}, PPO epochs {s['optimise']:.2f}. Training phase: "
                         f"{r['tether']['train_flops_per_step'] / 1e9:.0f} GFLOP/step at "
                         f"{h['train_gflops_per_s']:.1f} GFLOP/s = **{r['tether_share_of_matmul_peak']:.1%}** of this "
                         f"machine's {precision} matmul peak ({matmul_peak(report['matmul'], precision):.0f} GFLOP/s).")
        for side in ("tether", "trl"):
            if not r[side].get("failed"):
                steps = ", ".join(f"{t['total']:.1f}" for t in r[side]["per_step"])
                notes.append(f"- ({name}) {side}: every timed step, s: {steps}")
                if "forward_dtypes" in r[side]:
                    warn = "" if dtypes_as_expected(r[side], precision) else f"WARNING, not a clean {precision} run: "
                    notes.append(f"- ({name}) {side}: {warn}{dtype_note(r[side])}")
        if r.get("weights_match") is False:
            notes.append(f"- ({name}) WARNING: the two sides' logits checksums differ; the weights did not load alike.")
    notes.append("- Figures come from each side's fastest timed step (see compare.py `headline`); peak RSS is the "
                 "process's maximum resident memory (policy, reference, optimiser state, activations).")
    return "\n".join(rows + [""] + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["a", "b"], choices=["a", "b"])
    parser.add_argument("--steps", type=int, nargs="+", default=[3],
                        help="timed PPO steps after one warm-up step; one number, or one per workload")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: forward passes under bf16 autocast on both sides (fp32 weights and AdamW)")
    parser.add_argument("--compile", action="store_true", help="tether with compile=true (TRL 0.11.4 has no such "
                        "option); each side's warm-up step, untimed, then includes the compile")
    parser.add_argument("--render", metavar="JSON", help="only rebuild the table from a saved latest.json")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        for r in report["workloads"].values():
            r.update(compare_entry(r["tether"], r["trl"], report["matmul"], report.get("precision", "fp32")))
        print(markdown(report))
        return
    steps = dict(zip(args.workloads, args.steps * len(args.workloads) if len(args.steps) == 1 else args.steps))
    if not TRL_PYTHON.exists():
        sys.exit(f"{TRL_PYTHON} is missing: run bench/setup_trl.sh first")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
              "loadavg_before": os.getloadavg(), "steps": steps, "precision": args.precision, "compile": args.compile,
              "workloads": {}}
    start = time.perf_counter()
    subprocess.run([sys.executable, HERE / "prepare.py", *args.workloads], cwd=HERE, check=True)
    report["matmul"] = run(sys.executable, "matmul.py", "--precision", args.precision)
    for name in args.workloads:
        tether = run(sys.executable, "run_tether.py", name, "--steps", steps[name], "--precision", args.precision,
                     *(["--compile"] if args.compile else []))
        trl = run(TRL_PYTHON, "run_trl.py", name, "--steps", steps[name], "--precision", args.precision)
        report["workloads"][name] = compare_entry(tether, trl, report["matmul"], args.precision)
    report["loadavg_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - start
    report["command"] = "python bench/compare.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / "latest.md").write_text(table)
    print(f"\n[compare] {report['date']}, {report['cpus']} CPUs, {args.precision}"
          f"{', tether compile=true' if args.compile else ''}, load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in report['loadavg_before'])}, after "
          f"{'/'.join(f'{x:.2f}' for x in report['loadavg_after'])}; {report['wall_s']:.0f} s\n")
    print(table)
    print(f"[compare] wrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    main()

"""tether vs TRL 0.11.4's classic PPOTrainer on identical work, one process at a time (tether's .venv):

    python bench/compare.py [--workloads a b] [--steps N]

Prepares the shared inputs, measures matmul throughput, then runs each workload on tether and on TRL as
subprocesses, one after another. Prints and writes bench/results/latest.json and latest.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from workloads import RESULTS

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


def ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if not (a.get("failed") or b.get("failed")) else None


def fmt(x, spec=".2f") -> str:
    return "failed" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    rows = ["| workload | side | episodes/s | tokens/s | peak RSS (MB) | generate (s/step) | reward + PPO step (s/step) |",
            "|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for name, r in report["workloads"].items():
        for side in ("tether", "trl"):
            x = r[side]
            if x.get("failed"):
                rows.append(f"| ({name}) | {side} | failed | failed | failed | | |")
                continue
            s = x["s_per_step"]
            rows.append(f"| ({name}) | {side} | {x['episodes_per_s']:.2f} | {x['tokens_per_s']:.1f} | "
                        f"{x['peak_rss_mb']:.0f} | {s['generate']:.2f} | {s['total'] - s['generate']:.2f} |")
        q = r["ratios"]
        rows.append(f"| ({name}) | **tether / TRL** | **{fmt(q['episodes_per_s'])}x** | **{fmt(q['tokens_per_s'])}x** | "
                    f"**{fmt(q['peak_rss_mb'])}x** | | |")
        t = r["tether"]
        if not t.get("failed"):
            s = t["s_per_step"]
            notes.append(f"- ({name}) tether phases, s/step: generate {s['generate']:.2f}, reward {s['reward']:.3f}, "
                         f"scoring forward {s['score_forward']:.2f}, PPO epochs {s['optimise']:.2f}. Training phase: "
                         f"{t['train_flops_per_step'] / 1e9:.0f} GFLOP/step at {t['train_gflops_per_s']:.1f} GFLOP/s = "
                         f"**{r['tether_share_of_matmul_peak']:.1%}** of this machine's fp32 matmul peak "
                         f"({report['matmul']['peak_gflops']:.0f} GFLOP/s).")
        if r.get("weights_match") is False:
            notes.append(f"- ({name}) WARNING: the two sides' logits checksums differ; the weights did not load alike.")
    return "\n".join(rows + [""] + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["a", "b"], choices=["a", "b"])
    parser.add_argument("--steps", type=int, nargs="+", default=[3],
                        help="timed PPO steps after one warm-up step; one number, or one per workload")
    args = parser.parse_args()
    steps = dict(zip(args.workloads, args.steps * len(args.workloads) if len(args.steps) == 1 else args.steps))
    if not TRL_PYTHON.exists():
        sys.exit(f"{TRL_PYTHON} is missing: run bench/setup_trl.sh first")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
              "loadavg_before": os.getloadavg(), "steps": steps, "workloads": {}}
    start = time.perf_counter()
    subprocess.run([sys.executable, HERE / "prepare.py", *args.workloads], cwd=HERE, check=True)
    report["matmul"] = run(sys.executable, "matmul.py")
    for name in args.workloads:
        tether = run(sys.executable, "run_tether.py", name, "--steps", steps[name])
        trl = run(TRL_PYTHON, "run_trl.py", name, "--steps", steps[name])
        entry = {"tether": tether, "trl": trl,
                 "ratios": {k: ratio(tether, trl, k) for k in ("episodes_per_s", "tokens_per_s", "peak_rss_mb")}}
        if not (tether.get("failed") or trl.get("failed")):
            entry["weights_match"] = abs(tether["logits_checksum"] - trl["logits_checksum"]) < 1e-6 * max(
                1.0, abs(tether["logits_checksum"]))
        if not tether.get("failed") and not report["matmul"].get("failed"):
            entry["tether_share_of_matmul_peak"] = tether["train_gflops_per_s"] / report["matmul"]["peak_gflops"]
        report["workloads"][name] = entry
    report["loadavg_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - start
    report["command"] = "python bench/compare.py " + " ".join(sys.argv[1:])
    table = markdown(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "latest.md").write_text(table)
    print(f"\n[compare] {report['date']}, {report['cpus']} CPUs, load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in report['loadavg_before'])}, after "
          f"{'/'.join(f'{x:.2f}' for x in report['loadavg_after'])}; {report['wall_s']:.0f} s\n")
    print(table)
    print(f"[compare] wrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    main()

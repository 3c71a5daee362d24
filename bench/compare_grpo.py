"""Workload (c): tether's GRPO vs TRL 1.16's GRPOTrainer on identical work, one process at a time (tether's .venv):

    bash bench/run_grpo.sh                                   # set up bench/.venv-trl116, then this with defaults
    python bench/compare_grpo.py [--workloads c-tiny c-smol] [--steps 5 3] [--threads 1] [--ops 20] [--rounds 1]
    python bench/compare_grpo.py --render bench/results/grpo_latest.json     # only rebuild the table

Prepares the shared inputs, measures this machine's matmul throughput (bench/matmul.py, same thread count), then
for each workload runs tether, then TRL (--rounds 2: tether, TRL, tether, TRL; each side's faster round is kept),
each a fresh subprocess with OMP_NUM_THREADS = --threads. Each side does one untimed warm-up step, --steps timed
steps (median reported) and, with --ops, one more step under torch.profiler, from which the share of the step
spent in dense matmuls is read (the bound below). The load average (1/5/15 min) is recorded before and after
every process: other jobs on the cores distort wall-clock times, and the figures are only comparable within a run.
Peak RSS is the process's ru_maxrss read before the profiled step (the profiler's own memory left out; without
--ops it equals the child's ru_maxrss at exit, also kept as child_peak_rss_mb).
Writes bench/results/grpo_latest.json and grpo_latest.md.

The bound: both sides must at least do the matmuls of the work (generation's forward passes, the reference's
forward, the policy's forward and backward). M = the smaller of the two sides' dense-matmul seconds in their
profiled steps. If tether's step were nothing but M, tether / TRL in episodes/s would be T_TRL / M; tether's
measured ratio divided by that bound is M / T_tether, the share of tether's step that is must-do matmul time.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRL_PYTHON = HERE / ".venv-trl116" / "bin" / "python"
NOISE = ("Loading weights", "Writing model shards", "We strongly recommend passing in an `attention_mask`",
         "You may ignore this warning if your `pad_token_id`", "{'train_runtime'")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def child_env() -> dict:
    """The environment of every child: this checkout's src/ first on PYTHONPATH, so the tree the bench is run from
    is the one measured (tether's .venv may hold an editable install of another checkout)."""
    path = os.pathsep.join(p for p in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_child(python, script: str, *args, threads: int = 1) -> dict:
    """Run one side as a fresh process with `threads` torch threads; echo its progress; return its RESULT with the
    child's own peak RSS as the kernel reports it at exit (wait4's ru_maxrss) and the load average around it."""
    cmd = [str(python), str(HERE / script), *map(str, args)]
    env = {**child_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    before = loadavg()
    print(f"[bench] {' '.join(cmd[1:])}  (OMP_NUM_THREADS={threads}, load average {before})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    result, tail = None, []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif not any(n in line for n in NOISE):
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-25:]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    info = {"loadavg_before": before, "loadavg_after": loadavg(), "wall_s": time.perf_counter() - t0,
            "child_peak_rss_mb": usage.ru_maxrss / 1024, "threads": threads}
    if proc.returncode != 0 or result is None:
        return {"failed": True, "returncode": proc.returncode, "command": " ".join(cmd), "output_tail": tail, **info}
    return {**result, **info}


def bound(tether: dict, trl: dict) -> dict | None:
    """The ratio bound from the profiled steps (see the module docstring); None without both profiles. The profiles
    count CPU time, so the bound is stated against each side's CPU seconds per step (with one thread per side, the
    step's time less what other processes took from it)."""
    if "profile" not in tether or "profile" not in trl:
        return None
    m = min(tether["profile"]["matmul_self_cpu_s"], trl["profile"]["matmul_self_cpu_s"])
    return {"must_do_matmul_s": m, "tether_matmul_s": tether["profile"]["matmul_self_cpu_s"],
            "trl_matmul_s": trl["profile"]["matmul_self_cpu_s"],
            "tether_matmul_share": tether["profile"]["matmul_share"], "trl_matmul_share": trl["profile"]["matmul_share"],
            "ratio_bound": trl["s_per_step"]["cpu"] / m, "tether_share_of_bound": m / tether["s_per_step"]["cpu"],
            "ratio_bound_wall": trl["median_step_s"] / m}


def entry(tether: dict, trl: dict) -> dict:
    e = {"tether": tether, "trl": trl}
    if not (tether.get("failed") or trl.get("failed")):
        e["ratios"] = {"episodes_per_s": tether["episodes_per_s"] / trl["episodes_per_s"],
                       "tokens_per_s": tether["tokens_per_s"] / trl["tokens_per_s"],
                       "episodes_per_cpu_s": (trl["s_per_step"]["cpu"] / trl["workload"]["batch_size"])
                       / (tether["s_per_step"]["cpu"] / tether["workload"]["batch_size"]),
                       "peak_rss": tether["peak_rss_mb"] / trl["peak_rss_mb"]}
        e["weights_match"] = abs(tether["logits_checksum"] - trl["logits_checksum"]) <= 1e-6 * max(
            1.0, abs(tether["logits_checksum"]))
        e["bound"] = bound(tether, trl)
    return e


def markdown(report: dict) -> str:
    rows = ["| workload | side | median step (s) | episodes/s | tokens/s | CPU s/step | episodes per CPU-s | peak RSS (MB) "
            "| generate / score / update (s) | load average before -> after |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    notes = []
    for name, e in report["workloads"].items():
        for side in ("tether", "trl"):
            r = e[side]
            if r.get("failed"):
                rows.append(f"| {name} | {side} | failed (see JSON) | | | | | | | |")
                continue
            s = r["s_per_step"]
            rows.append(f"| {name} | {side} | {r['median_step_s']:.2f} | {r['episodes_per_s']:.2f} | "
                        f"{r['tokens_per_s']:.0f} | {s['cpu']:.2f} | {r['workload']['batch_size'] / s['cpu']:.2f} | "
                        f"{r['peak_rss_mb']:.0f} | {s['generate']:.2f} / "
                        f"{s['score']:.2f} / {s['optimise']:.2f} | {r['loadavg_before'][0]:.2f} -> "
                        f"{r['loadavg_after'][0]:.2f} |")
            notes.append(f"- {name} {side}: every timed step, wall / CPU s: "
                         + ", ".join(f"{t['total']:.2f} / {t['cpu']:.2f}" for t in r["per_step"]))
        if "ratios" in e:
            q = e["ratios"]
            rows.append(f"| {name} | **tether / TRL** | | **{q['episodes_per_s']:.2f}x** | **{q['tokens_per_s']:.2f}x** | "
                        f"| **{q['episodes_per_cpu_s']:.2f}x** | **{q['peak_rss']:.2f}x** | | |")
            if not e["weights_match"]:
                notes.append(f"- {name}: WARNING: the two sides' logits checksums differ (different weights loaded)")
        b = e.get("bound")
        if b:
            notes.append(f"- {name} bound: dense matmuls in the profiled step, tether {b['tether_matmul_s']:.2f} s "
                         f"({b['tether_matmul_share']:.0%} of its op time), TRL {b['trl_matmul_s']:.2f} s "
                         f"({b['trl_matmul_share']:.0%}); with M = {b['must_do_matmul_s']:.2f} s, tether / TRL in "
                         f"episodes per CPU-s is at most **{b['ratio_bound']:.2f}x** on this machine; tether's "
                         f"{e['ratios']['episodes_per_cpu_s']:.2f}x is {b['tether_share_of_bound']:.0%} of it.")
    m = report.get("matmul", {})
    if m and not m.get("failed"):
        notes.append(f"- matmul peak (bench/matmul.py, {m.get('torch_threads')} thread(s)): {m['peak_gflops']:.0f} GFLOP/s fp32")
    return "\n".join(rows + [""] + notes) + "\n"


def best(runs: list[dict]) -> dict:
    """Of several rounds of one side, the one with the fastest median step (slower rounds are other jobs' doing)."""
    ok = [r for r in runs if not r.get("failed")]
    return min(ok, key=lambda r: r["median_step_s"]) if ok else runs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["c-tiny", "c-smol"], choices=["c-tiny", "c-smol"])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 3], help="timed steps, one or one per workload")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--ops", type=int, default=20, help="profile one extra step per side (0: no bound)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times per workload")
    parser.add_argument("--render", metavar="JSON", help="only rebuild the table from a saved JSON")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    if not TRL_PYTHON.exists():
        sys.exit(f"{TRL_PYTHON} is missing: run bash bench/setup_trl116.sh first")
    steps = dict(zip(args.workloads, args.steps * len(args.workloads) if len(args.steps) == 1 else args.steps))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(), "threads": args.threads,
              "loadavg_before": loadavg(), "command": "python bench/compare_grpo.py " + " ".join(sys.argv[1:]),
              "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                         text=True).stdout.strip(), "workloads": {}}
    start = time.perf_counter()
    inputs = sorted({"a" if w == "c-tiny" else "b" for w in args.workloads})
    subprocess.run([sys.executable, HERE / "prepare.py", *inputs], cwd=HERE, check=True, env=child_env())
    report["matmul"] = run_child(sys.executable, "matmul.py", "--repeats", 10, threads=args.threads)
    for name in args.workloads:
        common = [name, "--steps", steps[name], "--threads", args.threads, "--ops", args.ops]
        runs = {"tether": [], "trl": []}
        for _ in range(args.rounds):
            runs["tether"].append(run_child(sys.executable, "run_tether_grpo.py", *common, threads=args.threads))
            runs["trl"].append(run_child(TRL_PYTHON, "run_trl_grpo.py", *common, threads=args.threads))
        report["workloads"][name] = entry(best(runs["tether"]), best(runs["trl"]))
        report["workloads"][name]["rounds"] = {side: [r.get("median_step_s") for r in rs] for side, rs in runs.items()}
    report["loadavg_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo_latest.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / "grpo_latest.md").write_text(table)
    print(f"\n[bench] {report['date']}, {report['cpus']} CPUs, {args.threads} thread(s) per side, load average "
          f"before {report['loadavg_before']}, after {report['loadavg_after']}; {report['wall_s']:.0f} s\n")
    print(table)
    print(f"[bench] wrote {RESULTS / 'grpo_latest.json'} and {RESULTS / 'grpo_latest.md'}")


if __name__ == "__main__":
    main()

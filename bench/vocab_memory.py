"""Peak memory and step time against response length at a 151,936-token vocabulary (issue 20), tether's .venv:

    .venv/bin/python bench/vocab_memory.py            # lengths 32 64 128 240, all three series, then the plot
    python bench/vocab_memory.py --lengths 32 240 --series tether-ppo --steps 2
    python bench/vocab_memory.py --profile            # also: one profiled PPO step at the longest length
    python bench/vocab_memory.py --render             # only redraw docs/vocab_memory.png from the saved JSON
    python bench/vocab_memory.py --lengths 240 --series tether-ppo-eosout tether-grpo-eosout trl-grpo-eosout \
        --out bench/results/vocab_memory_eosout.json --plot /tmp/eosout.png     # EOS outside the vocabulary

The model (prepare.py folder v): a random GPT-2 body of 2 layers, width 64, with Qwen's 151,936-token vocabulary
(tied embeddings); 16-token prompts; EOS suppressed (min_new_tokens = max_new_tokens on both sides), so every
completion is exactly L tokens. Three series, each point a fresh subprocess (one warm-up step, --steps timed
steps, median), one process at a time, all with OMP_NUM_THREADS = --threads:

    tether-ppo   tether PPO: 8 prompts, batch 8, one epoch, minibatch 8 (run_tether_grpo.py v-ppo-L)
    tether-grpo  tether GRPO: 2 prompts x 4 completions, KL term in the loss (run_tether_grpo.py v-grpo-L)
    trl-grpo     TRL 1.16's GRPOTrainer on the same GRPO work (run_trl_grpo.py v-grpo-L, bench/.venv-trl116)

Peak memory is the child's ru_maxrss as the kernel reports it when it exits (os.wait4): the whole process, model,
reference, AdamW state, activations and every temporary. Lengths are run in increasing order, the three series
side by side at each length. The load average is recorded around every process.

Writes bench/results/vocab_memory.json and docs/vocab_memory.png (peak RSS, median step time and the CPU seconds
of that step against response length; with one thread per process, CPU seconds are the step less what other jobs on
the cores took from it). A run saved as a baseline (--save-baseline NAME: bench/baselines/vocab_memory_NAME.json, kept
in git) is drawn dashed under the current run, e.g. today's main as "before_chunked", so that a rerun after the
chunked log-prob path lands shows before and after on one plot.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from compare_grpo import HERE, RESULTS, TRL_PYTHON, child_env, loadavg, run_child

DOCS = HERE.parent / "docs"
BASELINES = HERE / "baselines"
SERIES = {  # name -> (python, runner, workload prefix, workload suffix)
    "tether-ppo": (sys.executable, "run_tether_grpo.py", "v-ppo", ""),
    "tether-grpo": (sys.executable, "run_tether_grpo.py", "v-grpo", ""),
    "trl-grpo": (TRL_PYTHON, "run_trl_grpo.py", "v-grpo", ""),
    # the length forced by an EOS id outside the vocabulary instead of min_new_tokens (nothing to replay)
    "tether-ppo-eosout": (sys.executable, "run_tether_grpo.py", "v-ppo", "-eosout"),
    "tether-grpo-eosout": (sys.executable, "run_tether_grpo.py", "v-grpo", "-eosout"),
    "trl-grpo-eosout": (TRL_PYTHON, "run_trl_grpo.py", "v-grpo", "-eosout"),
}
DEFAULT_SERIES = ["tether-ppo", "tether-grpo", "trl-grpo"]
STYLE = {"tether-ppo": ("tab:blue", "o", "tether PPO (batch 8)"),
         "tether-grpo": ("tab:green", "s", "tether GRPO (2 x 4)"),
         "trl-grpo": ("tab:red", "^", "TRL 1.16 GRPO (2 x 4)"),
         "tether-ppo-eosout": ("tab:cyan", "o", "tether PPO, EOS outside the vocabulary"),
         "tether-grpo-eosout": ("tab:olive", "s", "tether GRPO, EOS outside the vocabulary"),
         "trl-grpo-eosout": ("tab:pink", "^", "TRL GRPO, EOS outside the vocabulary")}


def point(r: dict) -> dict:
    """What the plot and the table need from one runner result."""
    if r.get("failed"):
        return {"failed": True, "returncode": r.get("returncode"), "output_tail": r.get("output_tail"),
                "loadavg": r.get("loadavg_before"), "child_peak_rss_mb": r.get("child_peak_rss_mb")}
    p = {"peak_rss_mb": r["child_peak_rss_mb"], "median_step_s": r["median_step_s"], "phases": r["s_per_step"],
         "per_step_s": [t["total"] for t in r["per_step"]], "tokens_per_step": r["response_tokens_per_step"],
         "loadavg_before": r["loadavg_before"], "loadavg_after": r["loadavg_after"],
         "self_reported_peak_rss_mb": r["peak_rss_mb"]}
    if "profile" in r:
        p["profile"] = r["profile"]
    return p


def table(report: dict) -> str:
    rows = ["| response tokens | series | peak RSS (MB) | median step (s) | generate / score / update (s) | load average "
            "before -> after |", "|---:|---|---:|---:|---|---|"]
    for length in report["lengths"]:
        for name in report["series"]:
            p = report["points"].get(name, {}).get(str(length))
            if p is None:
                continue
            if p.get("failed"):
                rows.append(f"| {length} | {name} | failed | | | |")
                continue
            s = p["phases"]
            rows.append(f"| {length} | {name} | {p['peak_rss_mb']:.0f} | {p['median_step_s']:.2f} | "
                        f"{s['generate']:.2f} / {s['score']:.2f} / {s['optimise']:.2f} | "
                        f"{p['loadavg_before'][0]:.2f} -> {p['loadavg_after'][0]:.2f} |")
    return "\n".join(rows) + "\n"


def plot(report: dict, out: Path, baseline: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec, cpu) = plt.subplots(1, 3, figsize=(15, 4.2))
    runs = [(baseline, "--", 0.45, f" [{baseline.get('label', 'baseline')}]")] if baseline else []
    runs.append((report, "-", 1.0, f" [{report.get('label', 'this run')}]" if baseline else ""))
    for run, line, alpha, suffix in runs:
        for name in run["series"]:
            pts = sorted((int(k), v) for k, v in run["points"].get(name, {}).items() if not v.get("failed"))
            if not pts:
                continue
            colour, marker, label = STYLE[name]
            xs = [k for k, _ in pts]
            mem.plot(xs, [v["peak_rss_mb"] / 1024 for _, v in pts], line, color=colour, marker=marker, alpha=alpha,
                     label=label + suffix)
            sec.plot(xs, [v["median_step_s"] for _, v in pts], line, color=colour, marker=marker, alpha=alpha,
                     label=label + suffix)
            cpu.plot(xs, [v["phases"]["cpu"] for _, v in pts], line, color=colour, marker=marker, alpha=alpha,
                     label=label + suffix)
    for ax, what in ((mem, "peak RSS of the process (GB)"), (sec, "median step time, wall-clock (s)"),
                     (cpu, "CPU seconds of the process per step")):
        ax.set_xlabel("response tokens (EOS suppressed)")
        ax.set_ylabel(what)
        ax.set_xticks(report["lengths"])
        ax.grid(alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle(f"2 layers x width 64, vocabulary 151,936, CPU, {report['threads']} thread(s) per process "
                 f"({report['date'][:16]})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"[bench] wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 240])
    parser.add_argument("--series", nargs="+", default=DEFAULT_SERIES, choices=list(SERIES),
                        help="the -eosout series force the length with an EOS id outside the vocabulary instead")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per point, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="one more tether PPO process at the longest length with a profiled extra step (--ops 25; "
                        "the -eosout workload when only tether-ppo-eosout is among the series)")
    parser.add_argument("--label", default=None, help="this run's name in the plot legend (default: git HEAD)")
    parser.add_argument("--baseline", default="before_chunked",
                        help="draw bench/baselines/vocab_memory_NAME.json dashed under this run (if it exists)")
    parser.add_argument("--save-baseline", metavar="NAME", help="also save this run as bench/baselines/vocab_memory_NAME.json")
    parser.add_argument("--render", action="store_true", help="only redraw the plot from bench/results/vocab_memory.json")
    parser.add_argument("--plot", type=Path, default=DOCS / "vocab_memory.png")
    parser.add_argument("--out", type=Path, default=RESULTS / "vocab_memory.json", help="the run's JSON")
    args = parser.parse_args()
    out_json = args.out
    base_file = BASELINES / f"vocab_memory_{args.baseline}.json"
    if args.render:
        report = json.loads(out_json.read_text())
        baseline = json.loads(base_file.read_text()) if base_file.exists() else None
        print(table(report))
        plot(report, args.plot, baseline if baseline and baseline.get("date") != report.get("date") else None)
        return
    if any(name.startswith("trl") for name in args.series) and not TRL_PYTHON.exists():
        sys.exit(f"{TRL_PYTHON} is missing: run bash bench/setup_trl116.sh first")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_head": head, "label": args.label or f"tether {head}",
              "threads": args.threads, "steps": args.steps, "lengths": sorted(args.lengths), "series": args.series,
              "command": "python bench/vocab_memory.py " + " ".join(sys.argv[1:]), "loadavg_before": loadavg(),
              "points": {name: {} for name in args.series}}
    start = time.perf_counter()
    subprocess.run([sys.executable, HERE / "prepare.py", "v"], cwd=HERE, check=True, env=child_env())
    RESULTS.mkdir(exist_ok=True)
    for length in report["lengths"]:
        for name in args.series:
            python, runner, prefix, suffix = SERIES[name]
            r = run_child(python, runner, f"{prefix}-{length}{suffix}", "--steps", args.steps, "--threads", args.threads,
                          threads=args.threads)
            report["points"][name][str(length)] = point(r)
            out_json.write_text(json.dumps(report, indent=2))  # after every point: a long run can be cut short
    if args.profile:
        length = max(report["lengths"])
        suffix = "-eosout" if "tether-ppo-eosout" in args.series and "tether-ppo" not in args.series else ""
        r = run_child(sys.executable, "run_tether_grpo.py", f"v-ppo-{length}{suffix}", "--steps", args.steps,
                      "--threads", args.threads, "--ops", 25, threads=args.threads)
        report["profile_ppo"] = {"length": length, "workload": f"v-ppo-{length}{suffix}", **point(r)}
    report["loadavg_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - start
    out_json.write_text(json.dumps(report, indent=2))
    if args.save_baseline:
        BASELINES.mkdir(exist_ok=True)
        (BASELINES / f"vocab_memory_{args.save_baseline}.json").write_text(json.dumps(
            {**report, "label": args.save_baseline.replace("_", " ")}, indent=2))
    print(f"\n[bench] {report['date']}, {args.threads} thread(s) per process, load average before "
          f"{report['loadavg_before']}, after {report['loadavg_after']}; {report['wall_s']:.0f} s\n")
    print(table(report))
    baseline = json.loads(base_file.read_text()) if base_file.exists() and not args.save_baseline else None
    plot(report, args.plot, baseline)
    print(f"[bench] wrote {out_json}")


if __name__ == "__main__":
    main()

"""Write the reasoning example's prompts: .venv/bin/python scripts/make_reasoning_prompts.py

examples/data/chain_sum_train.jsonl and chain_sum_eval.jsonl: reasoning-gym's chain_sum with two one-digit terms,
each row {"prompt": [{"role": "user", "content": ...}], "answer": "7", "task": "chain_sum"}; the eval questions
are never in the training file (tether.reasoning.held_out_split)."""

import json
from pathlib import Path

from tether.reasoning import chain_sum_split

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "examples" / "data"
    for name, rows in zip(("train", "eval"), chain_sum_split()):
        path = out / f"chain_sum_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path}: {len(rows)} rows")

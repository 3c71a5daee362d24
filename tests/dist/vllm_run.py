"""Run under `accelerate launch` (2 CPU processes) by tests/test_vllm_engine.py: a 2-step GRPO run with
rollout_engine=vllm, each process with its own engine generating its share; each writes what its engine holds
and what it sampled to OUT/rank{r}.json."""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import test_vllm_engine as t  # noqa: E402

out = sys.argv[1]
trainer = t.build("grpo", out, steps=2)
history = trainer.train()
gen = trainer.generate([trainer.encode(p, "prompt") for p in t.PROMPTS[:2]])
with open(os.path.join(out, f"rank{trainer.comm.rank}.json"), "w") as f:
    json.dump({"gap": t.gap(trainer), "pushes": trainer.engine.pushes, "history": history,
               "sampled": [r.tolist() for r in gen.responses]}, f)
os._exit(0)  # both ranks' results are written; skip interpreter teardown of two engines

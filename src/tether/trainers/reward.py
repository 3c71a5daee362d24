"""Reward-model training: a scalar head on any AutoModelForSequenceClassification backbone, fitted to
preference pairs with the Bradley-Terry loss (or to scalar labels with squared error).

The model scores exactly the text the PPO reward adapter (`RewardModel`) will score, `prompt + response`,
tokenised by the same rules (left truncation), so what is measured here is what PPO gets.
"""

import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from tether.losses.reward import bradley_terry_loss, regression_loss
from tether.models.minilm import resolve_backbone
from tether.models.paths import check_model_folder
from tether.report.sinks import JsonlSink
from tether.report.trackers import Trackers, tracker_settings
from tether.reward_config import RewardConfig, resolve_device
from tether.reward_data import Labelled, Pairs, load_reward_data, pairs_from_labels, split
from tether.trainers import reward_checkpoint
from tether.trainers.run import keep_steps_up_to
from tether.trainers.setup import keep_freed_memory

log = logging.getLogger("tether")


class RewardTrainer:
    def __init__(self, config: RewardConfig, model=None, tokenizer=None, data=None, eval_data=None) -> None:
        """model / tokenizer / data / eval_data override the config's keys (data: a path, a list of dicts or a
        datasets.Dataset). The data is read and checked before any weights are loaded."""
        self.config = c = config
        self.device = resolve_device(c.device)
        if c.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.train_set, self.eval_set = self._load_data(data if data is not None else c.data,
                                                        eval_data if eval_data is not None else c.eval_data)
        torch.manual_seed(c.seed)  # the fresh head's initialisation
        self.tokenizer, self.model = _load(model, tokenizer, c.model)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
        self.steps_per_epoch = -(-len(self.train_set) // c.batch_size)
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=c.warmup_steps,
                                       num_training_steps=c.epochs * self.steps_per_epoch)
        self.order_generator = torch.Generator().manual_seed(c.seed)
        self.step_count = 0

    # ---- data -------------------------------------------------------------------------------
    def _load_data(self, data, eval_data) -> tuple[Pairs | Labelled, Pairs | Labelled | None]:
        c = self.config
        if data is None:
            raise ValueError("no training data: set `data` (a JSONL / JSON / CSV file) or pass data=")
        train = load_reward_data(data, c.objective)
        if eval_data is not None:
            held_out = load_reward_data(eval_data, c.objective, what="eval data")
        elif c.eval_fraction > 0:
            # split before pairing labelled texts, so no text is in both a training and an eval pair
            train_idx, eval_idx = split(len(train), c.eval_fraction, c.seed)
            train, held_out = train.subset(train_idx), train.subset(eval_idx)
        else:
            held_out = None
        if c.objective == "pairwise":
            train = pairs_from_labels(train, c.seed) if isinstance(train, Labelled) else train
            held_out = pairs_from_labels(held_out, c.seed + 1) if isinstance(held_out, Labelled) else held_out
        log.info("reward data: %d training %s, %s held out", len(train), _kind(train),
                 len(held_out) if held_out is not None else "none")
        return train, held_out

    # ---- forward ----------------------------------------------------------------------------
    def _scores(self, texts: list[str]) -> Tensor:
        """(N,) r(text), with grad when the model is in training mode."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.config.max_length).to(self.device)
        return self.model(**enc).logits[:, 0].float()

    def _loss(self, batch: Pairs | Labelled) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(batch, Pairs):
            # chosen and rejected in one forward: one padding, one kernel launch per layer
            scores = self._scores([p + t for p, t in zip(batch.prompts + batch.prompts, batch.chosen + batch.rejected)])
            chosen, rejected = scores.split(len(batch))
            margin = torch.tensor([self.config.margin if m is None else m for m in batch.margins], device=self.device)
            return bradley_terry_loss(chosen, rejected, margin)
        predictions = self._scores([p + t for p, t in zip(batch.prompts, batch.texts)])
        return regression_loss(predictions, torch.tensor(batch.labels, device=self.device))

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Train for `epochs` (continuing a checkpoint when `resume` says so); per-step and eval metrics to
        OUTPUT_DIR/metrics.jsonl and the trackers; checkpoints; the model saved there. Returns the eval records
        (one per evaluation, those before a resumed checkpoint included)."""
        c = self.config
        out = Path(c.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = reward_checkpoint.latest(c)
        order = None
        if checkpoint is not None:  # weights, optimiser, scheduler, generators and data order, then the logs
            self.step_count, order = reward_checkpoint.load(checkpoint, c, self.model, self.optimizer,
                                                            self.scheduler, self.order_generator)
            log.info("resumed from %s at step %d", checkpoint, self.step_count)
        (out / "reward_config.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
        keep_steps_up_to(out / "metrics.jsonl", self.step_count)  # a fresh run starts it empty
        if self.step_count == 0:
            shutil.rmtree(out / "tb", ignore_errors=True)
        history = [r for r in _records(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
        total = c.epochs * self.steps_per_epoch
        sink = JsonlSink(out / "metrics.jsonl")
        try:
            trackers = Trackers.start(c.report_to, tracker_settings(c, self.step_count), c.to_dict())
        except BaseException:
            sink.close()
            raise
        with sink, trackers, tqdm(total=total, initial=self.step_count, desc="reward", unit="step",
                                  dynamic_ncols=True) as bar:
            for epoch in range(self.step_count // self.steps_per_epoch, c.epochs):
                first = self.step_count - epoch * self.steps_per_epoch  # batches of this epoch already done
                if first == 0 or order is None:
                    order = torch.randperm(len(self.train_set), generator=self.order_generator).tolist()
                for start in range(first * c.batch_size, len(order), c.batch_size):
                    stats = self._train_step(self.train_set.subset(order[start:start + c.batch_size]))
                    stats["train/epoch"] = epoch + min(1.0, (start + c.batch_size) / len(order))
                    for target in (sink, trackers):
                        target.log(stats, self.step_count)
                    bar.set_postfix(loss=f"{stats['train/loss']:.3f}")
                    bar.update(1)
                    end_of_epoch = start + c.batch_size >= len(order)
                    if self.eval_set is not None and ((c.eval_every and self.step_count % c.eval_every == 0)
                                                      or end_of_epoch):
                        record = self.evaluate()
                        for target in (sink, trackers):
                            target.log(record, self.step_count)
                        history.append({"step": self.step_count, **record})
                        bar.write(_describe(self.step_count, record))
                    if self.step_count == total or (c.checkpoint_every and self.step_count % c.checkpoint_every == 0):
                        reward_checkpoint.write(out / "checkpoints", self.step_count, self.model, self.optimizer,
                                                self.scheduler, self.order_generator, order, c, c.keep_checkpoints)
        self.save(out)
        return history

    def _train_step(self, batch: Pairs | Labelled) -> dict[str, float]:
        t0 = time.perf_counter()
        self.model.train()
        loss, stats = self._loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return {**{f"train/{k}": v.item() for k, v in stats.items()}, "train/grad_norm": grad_norm.item(),
                "train/learning_rate": self.scheduler.get_last_lr()[0], "time/step": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self, data: Pairs | Labelled | None = None) -> dict[str, float]:
        """Held-out metrics: eval/accuracy and eval/margin_mean for pairs; eval/mse and eval/pearson for labels.
        Scored in eval mode (no dropout), in chunks of eval_batch_size texts."""
        data = self.eval_set if data is None else data
        self.model.eval()
        n, size = len(data), max(1, self.config.eval_batch_size // (2 if isinstance(data, Pairs) else 1))
        totals: dict[str, float] = {}
        predictions, labels = [], []
        for start in range(0, n, size):
            chunk = data.subset(list(range(start, min(n, start + size))))
            if isinstance(chunk, Labelled):
                scores = self._scores([p + t for p, t in zip(chunk.prompts, chunk.texts)])
                _, stats = regression_loss(scores, torch.tensor(chunk.labels, device=self.device))
                predictions, labels = predictions + scores.tolist(), labels + chunk.labels
            else:
                _, stats = self._loss(chunk)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(chunk)
        record = {f"eval/{k}": v / n for k, v in totals.items()}
        if labels:
            record["eval/pearson"] = torch.corrcoef(torch.tensor([predictions, labels]))[0, 1].item()
        return record

    def save(self, directory: str | Path) -> None:
        """save_pretrained form: loadable by AutoModelForSequenceClassification and as a PPO reward folder."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def _load(model, tokenizer, name: str):
    """(tokenizer, model) with a single-output head and a pad token (both needed to batch texts)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (model is None or tokenizer is None) and not name:
        raise ValueError("no backbone: set `model` (a hub name, a folder, or `minilm`) or pass both model= and "
                         "tokenizer=")
    path = resolve_backbone(name) if model is None or tokenizer is None else None
    check_model_folder(path, "model", weights=model is None, tokenizer=tokenizer is None)
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    tokenizer.truncation_side = "left"  # keep the response; the RewardModel adapter cuts the same way
    tokenizer.padding_side = "right"  # positions independent of the batch, as in RewardModel
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    if model.config.num_labels != 1:
        raise ValueError(f"the reward model must have one output (num_labels=1), this one has "
                         f"{model.config.num_labels}")
    if model.config.pad_token_id is None:  # decoder backbones find each row's last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _kind(data) -> str:
    return "pairs" if isinstance(data, Pairs) else "labelled texts"


def _describe(step: int, record: dict) -> str:
    if "eval/accuracy" in record:
        return (f"step {step}: eval accuracy {record['eval/accuracy']:.3f}, mean margin "
                f"{record['eval/margin_mean']:.3f}, loss {record['eval/loss']:.3f}")
    return f"step {step}: eval mse {record['eval/mse']:.4f}, pearson {record['eval/pearson']:.3f}"

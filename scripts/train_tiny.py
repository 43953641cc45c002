"""Train the tiny offline demo model (LLaVA-OneVision classes: SigLIP + projector + Qwen2) on
`prunevid.synthetic` videos, from scratch, on CPU.

    nice -n 19 python scripts/train_tiny.py --out /tmp/tiny_run --minutes 60
    python scripts/train_tiny.py --out /tmp/tiny_run --minutes 30      # resumes from /tmp/tiny_run/last
    python scripts/train_tiny.py --out /tmp/tiny_run --export prunevid/weights/tiny   # best -> package
    python scripts/train_tiny.py --out /tmp/more --init prunevid/weights/tiny --aux-position \
        --merge-prob 0.5 --lr 1e-3 --minutes 55 --decay-minutes 12     # continue (phase 2)
    python scripts/train_tiny.py --out /tmp/p3 --init prunevid/weights/tiny --aux-position \
        --merge-prob 0.6 --merge-tau-min 0.75 --drop-prob 0.3 --lr 7e-4 --minutes 68 \
        --decay-minutes 15 --eval-videos 96                            # phase 3
    python scripts/train_tiny.py --out /tmp/p4 --init prunevid/weights/tiny --aux-position \
        --merge-prob 0.6 --merge-tau-min 0.75 --drop-prob 0.2 --late-drop-prob 0.5 --lr 5e-4 \
        --minutes 40 --decay-minutes 12 --eval-videos 96               # phase 4 (the shipped model)

Recipe (what makes a 1-2M-parameter model learn within an hour of one CPU thread):
* every video is one multi-turn chat holding all seven question families in a seeded random
  order, so one vision pass supervises seven answers; labels only on answer + <|im_end|>;
* an auxiliary dense loss from the start: a linear head on the pooled visual tokens predicts
  each token's object colour, object shape and background texture (labels from the
  generator's object map). It gets the vision tower past the plateau where the language model
  ignores the video; the head is not part of the exported model;
* constant learning rate after a short warm-up (no early decay), optional final decay;
* optionally (`--merge-prob P`) a share P of the videos enter the language model as stage 1
  leaves them (static tokens merged over time, dynamic ones clustered per frame, one shorter
  sequence with consecutive positions; settings drawn per video), so the model reads the
  video's content and order rather than fixed offsets, as real video LLMs trained on varying
  token layouts do. Without it the tiny model locates time and place by exact position and
  stage 1 breaks it (docs/bench_accuracy.md);
* optionally (`--drop-prob P`) a share P of the videos also lose a random share of their visual
  tokens (token dropout; the newline stays), so no answer hangs on any one token;
* optionally (`--late-drop-prob P`) a share P of the videos have 20-70% of their visual tokens
  hidden from the layers after `--late-drop-layer`, as stage 2 hides its pruned ones (a random
  choice here), so the early layers learn to carry what the late ones may lose;
* with `--merge-prob`, checkpoints are selected on the mean of the full model's accuracy and
  the patched model's at the preset in `--monitor-preset` (stage 1 and 2 as shipped).

Data seeds are `TRAIN_SEED_START + step * batch + i`: deterministic and resumable. Held-out
accuracy per family is logged on seeds 999_990_000+ (below the training range).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from prunevid.accuracy import (
    CALIBRATION_SEED,
    WEIGHTS,
    Checkpoint,
    Method,
    calibrate,
    encode_videos,
    evaluate,
    load_preset,
    write_preset,
)
from prunevid.cluster import cluster_means
from prunevid.config import PruneVidConfig
from prunevid.merge import merge_tokens
from prunevid.models.llava_onevision import PROMPT, FrameProcessing, pooled_grid
from prunevid.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    TRAIN_SEED_START,
    cell_labels,
    make_sample,
)
from prunevid.testing import tiny_tokenizer

MONITOR_SEED = 999_990_000
# What the shipped preset file records of each calibration setting (not the per-family intervals).
TRIED_FIELDS = ("selected_layer", "tau", "cluster_ratio", "alpha", "retention", "stage1_retention",
                "accuracy", "interval95", "per_family")  # fmt: skip
AUX_CLASSES = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "background": len(BACKGROUNDS)}


def build_config(
    tokenizer: PreTrainedTokenizerFast, size: int, layers: int, hidden: int
) -> LlavaOnevisionConfig:
    """SigLIP (8 px patches, 2 layers) + Qwen2 (`layers` layers, grouped-query attention)."""
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=size,
        patch_size=8,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


class Trainer:
    """Model, auxiliary head, optimiser and the data/eval helpers around them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.step = 0
        self.history: list[dict] = []
        self.best = -1.0
        last = self.out / "last"
        init = last if (last / "config.json").exists() else args.init and Path(args.init)
        if init:
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(init)
            self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(init)
            if init != last and (init / "history.json").exists():  # continue the shipped model's data stream
                self.history = json.loads((init / "history.json").read_text())
                self.step = self.history[-1]["step"] if self.history else 0
        else:
            self.tokenizer = tiny_tokenizer()
            torch.manual_seed(args.seed)
            config = build_config(self.tokenizer, args.size, args.layers, args.hidden)
            self.model = LlavaOnevisionForConditionalGeneration(config)
        self.first_step = self.step  # a new run warms up afresh (new optimiser state and heads)
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        hidden = self.model.config.text_config.hidden_size
        self.aux = torch.nn.Linear(hidden, sum(AUX_CLASSES.values()))
        self.grid = pooled_grid(self.model.config)
        self.aux_position = torch.nn.Linear(hidden, sum(self.grid))
        params = [*self.model.parameters(), *self.aux.parameters()]
        if args.aux_position:
            params += list(self.aux_position.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
        if (last / "trainer.pt").exists():
            state = torch.load(last / "trainer.pt", weights_only=False)
            self.aux.load_state_dict(state["aux"])
            if "aux_position" in state:
                self.aux_position.load_state_dict(state["aux_position"])
            self._load_optimizer(state["optimizer"])
            self.step, self.history, self.best = state["step"], state["history"], state["best"]
            self.first_step = state.get("first_step", 0)
        size = self.model.config.vision_config.image_size
        self.size = size
        self.processing = FrameProcessing(size=(size, size))
        self.ids = {
            w: self.tokenizer.convert_tokens_to_ids(w) for w in ("<|im_start|>", "<|im_end|>", "<video>")
        }

    def _load_optimizer(self, state: dict) -> None:
        """Optimiser state of a resumed run; a run resumed with --aux-position adds a fresh group."""
        saved = len(state["param_groups"][0]["params"])
        current = len(self.optimizer.param_groups[0]["params"])
        if saved == current:
            self.optimizer.load_state_dict(state)
            return
        extra = self.optimizer.param_groups[0]["params"][saved:]
        self.optimizer.param_groups[0]["params"] = self.optimizer.param_groups[0]["params"][:saved]
        self.optimizer.load_state_dict(state)
        self.optimizer.param_groups[0]["params"] += extra

    # ---- data -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(
        self, questions: list[tuple[str, str, str]], rng: np.random.Generator
    ) -> tuple[list[int], list[int]]:
        """All questions of one video as one multi-turn chat: ids and labels (-100 off answers)."""
        num_video = self.args.frames * self.grid[0] * self.grid[1] + 1
        ids: list[int] = []
        labels: list[int] = []
        for turn, index in enumerate(rng.permutation(len(questions))):
            _, question, answer = questions[index]
            prompt = PROMPT.format(question=question)
            if turn > 0:
                prompt = prompt.replace("<video>\n", "")
            prompt_ids = self.encode(prompt)
            if turn == 0:
                at = prompt_ids.index(self.ids["<video>"])
                prompt_ids = prompt_ids[:at] + [self.ids["<video>"]] * num_video + prompt_ids[at + 1 :]
            target = [*self.encode(answer), self.ids["<|im_end|>"]]
            ids += prompt_ids + target
            labels += [-100] * len(prompt_ids) + target
        return ids, labels

    def batch(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        samples = [make_sample(s, self.args.frames, self.size) for s in seeds]
        chats = [self.chat(s.questions, np.random.default_rng(s.seed)) for s in samples]
        width = max(len(i) for i, _ in chats)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chats])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chats])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chats])
        aux = [cell_labels(s, self.grid) for s in samples]
        targets = {k: torch.from_numpy(np.stack([a[k] for a in aux])).flatten(1) for k in AUX_CLASSES}
        pixels = torch.stack([self.processing(s.frames) for s in samples])
        return {
            "ids": ids,
            "labels": labels,
            "mask": mask,
            "pixels": pixels,
            "merge": self.merge_configs(seeds),
            "drop": self.dropouts(seeds),
            "seeds": seeds,
            **{f"aux_{k}": v for k, v in targets.items()},
        }

    # ---- model ------------------------------------------------------------------------------
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T*N + 1, C): pooled, projected frame tokens and the trailing newline."""
        return self.model.model.get_video_features(pixels, return_dict=True).pooler_output

    def hidden(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        video: torch.Tensor,
        hidden_from: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states, (B, S, C). `hidden_from` (B, S) bool: tokens that the layers after
        `--late-drop-layer` do not see, as stage 2 hides its pruned tokens (a random choice here)."""
        embeds = self.model.get_input_embeddings()(ids)
        is_video = (ids == self.ids["<video>"]).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_video, video.to(embeds.dtype))
        language_model = self.model.model.language_model
        if hidden_from is None:
            return language_model(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False
            ).last_hidden_state
        length = ids.shape[1]
        early = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        late = early & ~hidden_from[:, None, :]
        lowest = torch.finfo(embeds.dtype).min  # not -inf: a fully hidden row must not give NaN
        masks = [
            torch.zeros(m.shape, dtype=embeds.dtype).masked_fill(~m, lowest)[:, None] for m in (early, late)
        ]
        positions = torch.arange(length)[None]
        rotary = language_model.rotary_emb(embeds, positions)
        states = embeds
        for index, layer in enumerate(language_model.layers):
            late_layer = index > self.args.late_drop_layer
            states = layer(
                states, attention_mask=masks[late_layer], position_embeddings=rotary, position_ids=positions
            )
        return language_model.norm(states)

    def late_drops(self, seeds: list[int], ids: torch.Tensor) -> torch.Tensor | None:
        """(B, S) bool: visual tokens hidden from the late layers, 20-70% of a video's (not its
        trailing newline), for a share `--late-drop-prob` of the videos; None if no video has any."""
        hidden = torch.zeros_like(ids, dtype=torch.bool)
        for b, seed in enumerate(seeds):
            rng = np.random.default_rng([seed, 3])
            if rng.random() >= self.args.late_drop_prob:
                continue
            visual = (ids[b] == self.ids["<video>"]).nonzero().squeeze(1)[:-1]
            count = round(len(visual) * rng.uniform(0.2, 0.7))
            hidden[b, visual[torch.from_numpy(rng.permutation(len(visual))[:count])]] = True
        return hidden if hidden.any() else None

    def merge_configs(self, seeds: list[int]) -> list[PruneVidConfig | None]:
        """Per video: the stage-1 settings it is merged with, or None (seeded by the video)."""
        configs = []
        for seed in seeds:
            rng = np.random.default_rng([seed, 1])
            if rng.random() >= self.args.merge_prob:
                configs.append(None)
                continue
            tau = float(rng.uniform(self.args.merge_tau_min, 1.0))
            ratio = float(rng.choice([0.25, 0.5, 1.0]))
            configs.append(
                PruneVidConfig(tau=tau, cluster_ratio=ratio, num_frames=self.args.frames, stage2=False)
            )
        return configs

    def dropouts(self, seeds: list[int]) -> list[np.random.Generator | None]:
        """Per video: the generator that picks which visual tokens it loses, or None."""
        rngs = [np.random.default_rng([seed, 2]) for seed in seeds]
        return [rng if rng.random() < self.args.drop_prob else None for rng in rngs]

    @staticmethod
    def kept(count: int, rng: np.random.Generator | None) -> torch.Tensor:
        """Indices (in order) of the visual tokens a video keeps: all, or 30-100% of them."""
        if rng is None:
            return torch.arange(count)
        keep = max(1, round(count * rng.uniform(0.3, 1.0)))
        return torch.from_numpy(np.sort(rng.permutation(count)[:keep]))

    def merged(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        video: torch.Tensor,
        configs: list[PruneVidConfig | None],
        dropouts: list[np.random.Generator | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch with each video shortened by its stage-1 config and token dropout (either
        may be None): ids, labels, mask (right padding) and the visual tokens in placeholder
        order, (sum of M_b + 1, C). Merged tokens are recomputed as plain means of their
        members so gradients reach every member; stage 1 picks the members on detached features."""
        rows, row_labels, tokens = [], [], []
        video_id = self.ids["<video>"]
        for b, config in enumerate(configs):
            frames = video[b, :-1].view(self.args.frames, -1, video.shape[-1])
            keep = ids[b] != self.tokenizer.pad_token_id
            row, label = ids[b][keep], labels[b][keep]
            dropout = dropouts[b] if dropouts else None
            visual = frames.flatten(0, 1)
            if config is not None:
                with torch.no_grad():
                    result = merge_tokens(frames.detach(), config, self.grid)
                visual = cluster_means(visual[None], result.assignment.flatten()[None], result.num_tokens)[0]
            visual = visual[self.kept(len(visual), dropout)]
            tokens.append(torch.cat([visual, video[b, -1:]]))
            start = int((row == video_id).nonzero()[0])
            drop = frames.shape[0] * frames.shape[1] - len(visual)
            rows.append(torch.cat([row[:start], row[start + drop :]]))
            row_labels.append(torch.cat([label[:start], label[start + drop :]]))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=pad) for r in rows])
        labels = torch.stack(
            [torch.nn.functional.pad(r, (0, width - len(r)), value=-100) for r in row_labels]
        )
        mask = torch.stack([torch.arange(width) < len(r) for r in rows]).long()
        return ids, labels, mask, torch.cat(tokens)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        video = self.features(batch["pixels"])
        ids, labels, mask = batch["ids"], batch["labels"], batch["mask"]
        ids, labels, mask, tokens = self.merged(ids, labels, video, batch["merge"], batch["drop"])
        hidden = self.hidden(ids, mask, tokens, self.late_drops(batch["seeds"], ids))
        labels = labels[:, 1:]
        where = labels != -100
        logits = self.model.lm_head(hidden[:, :-1][where])
        lm = torch.nn.functional.cross_entropy(logits, labels[where])
        aux_logits = self.aux(video[:, :-1]).split(list(AUX_CLASSES.values()), -1)
        aux = sum(
            torch.nn.functional.cross_entropy(lg.flatten(0, 1), batch[f"aux_{k}"].flatten())
            for lg, k in zip(aux_logits, AUX_CLASSES)
        )
        if self.args.aux_position:
            aux = aux + self.position_loss(video[:, :-1])
        total = lm + self.args.aux_weight * aux
        return total, {"lm": lm.item(), "aux": aux.item()}

    def position_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each pooled token predicts its own row and column: keeps spatial position in the
        features, which the direction family needs (1-D RoPE alone hides the 2-D layout)."""
        rows, cols = self.grid
        per_frame = torch.arange(rows * cols)
        index = per_frame.repeat(tokens.shape[1] // (rows * cols))
        row_logits, col_logits = self.aux_position(tokens).split([rows, cols], -1)
        row_target = (index // cols).expand(tokens.shape[0], -1).flatten()
        col_target = (index % cols).expand(tokens.shape[0], -1).flatten()
        return torch.nn.functional.cross_entropy(
            row_logits.flatten(0, 1), row_target
        ) + torch.nn.functional.cross_entropy(col_logits.flatten(0, 1), col_target)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, config: PruneVidConfig, seed_start: int = MONITOR_SEED) -> dict[str, float]:
        """Single-turn held-out accuracy per family (greedy first answer token) of the model
        patched with `config` (both stages off: the stock model), and its retention."""
        checkpoint = Checkpoint(self.model.eval(), self.tokenizer, config, self.size)
        seeds = range(seed_start, seed_start + self.args.eval_videos)
        samples = [make_sample(s, config.num_frames, self.size) for s in seeds]
        result = evaluate(checkpoint, Method("monitor", config), samples, encode_videos(checkpoint, samples))
        self.model.train()
        accuracy = {f: float(np.mean(c)) for f, c in result["correct"].items()}
        return {**accuracy, "mean": float(np.mean(list(accuracy.values()))), "retention": result["retention"]}

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, name: str) -> None:
        target = self.out / name
        tmp = self.out / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        state = {
            "aux": self.aux.state_dict(),
            "aux_position": self.aux_position.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "first_step": self.first_step,
            "history": self.history,
            "best": self.best,
        }
        torch.save(state, tmp / "trainer.pt")
        (tmp / "history.json").write_text(json.dumps(self.history, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)

    def learning_rate(self) -> float:
        args = self.args
        warm = min(1.0, (self.step - self.first_step + 1) / args.warmup)
        if args.decay_minutes:
            left = (self.deadline - time.time()) / 60
            progress = min(1.0, max(0.0, 1 - left / args.decay_minutes))
        elif args.decay_from is not None:
            progress = min(1.0, max(0.0, (self.step - args.decay_from) / max(1, args.decay_steps)))
        else:
            progress = 0.0
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train(self) -> None:
        args = self.args
        self.model.train()
        self.deadline = deadline = time.time() + 60 * args.minutes
        last_save = time.time()
        tic = time.time()
        while time.time() < deadline and self.step < args.max_steps:
            seeds = [TRAIN_SEED_START + self.step * args.batch + i for i in range(args.batch)]
            batch = self.batch(seeds)
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate()
            loss, parts = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.step += 1
            if self.step % args.log_every == 0:
                rate = (time.time() - tic) / args.log_every
                print(
                    f"step {self.step} lm {parts['lm']:.3f} aux {parts['aux']:.3f} {rate:.2f}s/step",
                    flush=True,
                )
                tic = time.time()
            if self.step % args.eval_every == 0:
                self.checkpoint()
                last_save = time.time()
            elif time.time() - last_save > 60 * args.save_minutes:
                self.save("last")
                last_save = time.time()
        if self.step % args.eval_every:  # the last step was not evaluated yet
            self.checkpoint()

    def checkpoint(self) -> None:
        preset = load_preset(self.args.monitor_preset)[0]
        accuracy = self.evaluate(preset.replace(stage1=False, stage2=False, num_frames=self.args.frames))
        accuracy.pop("retention")
        score = accuracy["mean"]
        if self.args.merge_prob > 0:  # select on the full and the pruned video alike
            pruned = self.evaluate(preset)
            accuracy.update({f"prunevid_{k}": v for k, v in pruned.items()})
            score = (accuracy["mean"] + pruned["mean"]) / 2
        self.history.append({"step": self.step, "time": time.time(), **accuracy})
        print("eval", self.step, json.dumps({k: round(v, 3) for k, v in accuracy.items()}), flush=True)
        if score >= self.best:
            self.best = score
            self.save("best")
        self.save("last")


def export(run: Path, target: Path, frames: int, calibration_videos: int) -> None:
    """Copy the best checkpoint's model and tokenizer (no optimiser state) into `target`, then
    calibrate its PruneVid preset on training seeds and store it as `prunevid.json`."""
    source = run / "best"
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(source)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    # Runs started before the tiny tokenizer lowercased questions lack its normaliser.
    tokenizer.backend_tokenizer.normalizer = tiny_tokenizer().backend_tokenizer.normalizer
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    history = json.loads((source / "history.json").read_text())
    (target / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    size = model.config.vision_config.image_size
    layers = model.config.text_config.num_hidden_layers
    start = PruneVidConfig(num_frames=frames, selected_layer=max(0, layers * 10 // 28))
    preset, tried = calibrate(Checkpoint(model.eval(), tokenizer, start, size), calibration_videos)
    notes = {
        "calibration": {
            "seed_start": CALIBRATION_SEED,
            "num_videos": calibration_videos,
            "tried": [{k: v for k, v in t.items() if k in TRIED_FIELDS} for t in tried],
        }
    }
    write_preset(target, preset, size, notes)
    print(f"exported {source} -> {target}; preset {preset}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/prunevid_tiny_run", help="run directory (resumes from OUT/last)")
    p.add_argument(
        "--init", default=None, help="start a new run from this model folder (e.g. prunevid/weights/tiny)"
    )
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--decay-from", type=int, default=None, help="step where a cosine decay starts")
    p.add_argument("--decay-steps", type=int, default=1000)
    p.add_argument("--decay-minutes", type=float, default=None, help="cosine decay over the last M minutes")
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--aux-position", action="store_true", help="also predict each token's grid row/column")
    p.add_argument("--merge-prob", type=float, default=0.0, help="share of videos shortened by stage 1")
    p.add_argument("--merge-tau-min", type=float, default=0.85, help="stage-1 tau drawn in [this, 1]")
    p.add_argument("--drop-prob", type=float, default=0.0, help="share of videos with token dropout")
    p.add_argument(
        "--late-drop-prob", type=float, default=0.0, help="share of videos with late-layer token dropout"
    )
    p.add_argument("--late-drop-layer", type=int, default=2, help="layers after this one see fewer tokens")
    p.add_argument("--monitor-preset", default=str(WEIGHTS), help="folder whose prunevid.json is monitored")
    p.add_argument("--size", type=int, default=96, help="frame size (new runs only)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--layers", type=int, default=4, help="Qwen2 layers (new runs only)")
    p.add_argument("--hidden", type=int, default=128, help="Qwen2 width (new runs only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-videos", type=int, default=48)
    p.add_argument("--save-minutes", type=float, default=4.0)
    p.add_argument(
        "--export", default=None, help="copy OUT/best into this folder, calibrate its preset, exit"
    )
    p.add_argument("--calibration-videos", type=int, default=96)
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    if args.export:
        torch.set_num_threads(args.threads)
        export(Path(args.out), Path(args.export), args.frames, args.calibration_videos)
        return
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(args)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"parameters {params / 1e6:.2f}M, step {trainer.step}", flush=True)
    trainer.train()


if __name__ == "__main__":
    main()

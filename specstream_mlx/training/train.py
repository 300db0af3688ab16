"""Future n-gram fine-tuning of the speculative streams.

Loss: L = a0 * CE(main[t], y[t+1]) + sum_j a_j * CE(stream_j[t], y[t+1+j]) on completion
tokens (with --soft-targets w, stream j's CE is (1 - w) times that plus w times the
cross-entropy to the base model's own next-token distribution at t + j, its soft target).

Lossless mode (default): the base model is frozen; trained are the stream embeddings,
stream-only adapters in the top N_s layers (and the next-token projection, when the
streams see the next token); main rows are the base model exactly. Task mode adds LoRA
adapters shared by main and stream rows in the top N_s layers (main loss weight 1); they
are fused into the weights at the end.
Everything below the stream layers is frozen in both modes, so the hidden states
entering layer N - N_s are computed once and training runs the top layers only.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from specstream_mlx.checkpoint import STREAMS_FILE, init_streams, save_streams
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.errors import InputError
from specstream_mlx.loader import load, resolve_path
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.training.batch import (
    Batch,
    batches,
    build_draft_vocab,
    index_batches,
    make_batch,
    vocab_lookup,
)
from specstream_mlx.training.data import load_examples
from specstream_mlx.training.distributed import Group
from specstream_mlx.training.hidden import Sample, cached_hidden, hidden_key


@dataclass
class TrainArgs:
    """Settings of one training run (the CLI flags of `specstream train`)."""

    data: str
    valid: str | None = None
    model: str | None = None
    run_dir: str = "runs/streams"
    mode: str = "lossless"  # or "task"
    num_streams: int = 3
    msa_layers: int = 4
    adapter_rank: int = 16
    adapter_scale: float = 1.0
    main_weight: float | None = None  # default: 0 lossless, 1 task
    stream_weight: float = 0.1
    soft_targets: float = 0.0  # share of the stream loss on the base model's distribution
    lr: float = 5e-4
    warmup: int = 20
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 384
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 100
    steps_per_checkpoint: int = 100
    max_valid: int = 64
    dist_timeout: float = 600.0  # seconds a rank waits for the others (data-parallel runs)
    resume: bool = False
    warm_start: bool = False
    tree_budget: int = 6
    top_k: int = 3
    draft_vocab: int = 8192  # 0: streams draft from the whole vocabulary
    next_token_rank: int = 0  # streams see the next token (StreamArgs.next_token_rank)

    def validate(self) -> None:
        """InputError naming the first bad setting (as its flag)."""
        if self.mode not in ("lossless", "task"):
            raise InputError(f"--mode must be 'lossless' or 'task', got {self.mode!r}")
        ints = {"num_streams": 1, "msa_layers": 1, "adapter_rank": 0,
                "warmup": 0, "batch_size": 1, "max_length": 2, "seed": 0,
                "steps_per_report": 1, "steps_per_eval": 1, "steps_per_checkpoint": 1,
                "max_valid": 0, "tree_budget": 0, "top_k": 1, "draft_vocab": 0,
                "next_token_rank": 0}
        reals = {"adapter_scale": 0.0, "stream_weight": 0.0, "soft_targets": 0.0,
                 "main_weight": 0.0, "dist_timeout": 1.0}
        for name, low in {**ints, **reals}.items():
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if value is None and name == "main_weight":
                continue
            kind = (numbers.Integral,) if name in ints else (numbers.Real,)
            if isinstance(value, bool) or not isinstance(value, kind) \
                    or not math.isfinite(value) or value < low:
                raise InputError(f"{flag} must be {'an integer' if name in ints else 'a number'}"
                                 f" >= {low}, got {value!r}")
        if self.soft_targets > 1:
            raise InputError(f"--soft-targets must be in 0 .. 1, got {self.soft_targets!r}")
        if self.soft_targets and not self.frozen_main:
            raise InputError("--soft-targets needs the frozen base model (lossless mode, "
                             "main weight 0): in task mode the teacher would move")
        for name in ("lr", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value <= 0:
                raise InputError(f"--{name} must be a number > 0, got {value!r}")

    def weights(self) -> tuple[float, float]:
        main = self.main_weight if self.main_weight is not None else float(self.mode == "task")
        return main, self.stream_weight

    @property
    def frozen_main(self) -> bool:
        """Main rows carry no loss and no trainable weight: they run forward once, and
        each sample's stream rows cover its completion only (the per-sample layout)."""
        return self.mode == "lossless" and not self.weights()[0]


def upper_streams(model, h: mx.array, positions: mx.array, stream_rows: mx.array,
                  embedding_scale: float = 1.0, next_tokens: mx.array | None = None
                  ) -> tuple[mx.array, mx.array]:
    """The stream rows of `model.upper(h, positions, None, None, stream_rows)`, computed the
    cheap way (main rows never see stream rows): the main rows run once without streams,
    leaving their K/V in a cache, then only the stream rows run, attending to those K/V
    (as in a decode pass over a prefix).

    h: (B, L, hidden) entering the first MSA layer; positions: (L,) int32 (causal main
    rows); stream_rows: (S,) int32, or (B, S) each sample's own rows. Returns the main
    rows (B, L, hidden) and the stream rows (B, S, gamma, hidden), both final-normed.
    next_tokens: (B, S) int32, for streams conditioned on the next token.
    """
    L = h.shape[1]
    cache = KVCache(len(model.layers))
    hm, _ = model.upper(h, positions, None, cache)  # main rows: K/V of every MSA layer
    if stream_rows.ndim == 1:
        seen = mx.tril(mx.ones((L, L), dtype=mx.bool_))[stream_rows]
        return hm, model.stream_pass(mx.take(h, stream_rows, axis=1), positions[stream_rows],
                                     seen, cache, L, embedding_scale, next_tokens)
    seen = stream_rows[..., None] >= mx.arange(L)  # (B, S, L): causal
    rows_h = mx.take_along_axis(h, stream_rows[..., None], axis=1)
    return hm, model.stream_pass(rows_h, positions[stream_rows], seen, cache, L,
                                 embedding_scale, next_tokens)


def loss_counts(batch: Batch, gamma: int) -> np.ndarray:
    """Targets of each loss term: (gamma + 1,) stream j, main."""
    return np.concatenate([np.bincount(batch.stream_id, minlength=gamma),
                           [batch.main_index.size]]).astype(np.float32)


def losses(model, batch: Batch, main_weight: float, stream_weight: float,
           frozen_main: bool = False, embedding_scale: float = 1.0,
           counts: np.ndarray | mx.array | None = None, soft_targets: float = 0.0):
    """Total loss and per-part values: (loss, (main CE, stream CE per j (gamma,), stream
    top-1 hits per target (K,))).

    frozen_main (lossless mode, no main loss): the main rows cannot change, so they run
    forward once and only the stream rows carry gradients (upper_streams).
    embedding_scale: the stream embeddings' scale (see DecoderModel.upper).
    counts: what each term's sum is divided by, (gamma + 1,) as `loss_counts`; default
    this batch's own counts (means). Data parallelism passes the global batch's counts
    over the number of ranks, so the ranks' mean loss is the global batch's.
    soft_targets w (frozen main only): each stream target's CE is (1 - w) x the CE to the
    data's token plus w x the CE to the base model's distribution over the draft
    vocabulary at the row that predicts that token. Hits stay top-1 on the data's token.
    """
    if frozen_main and not main_weight:
        hm, hs = upper_streams(model, batch.hidden, batch.positions, batch.stream_rows,
                               embedding_scale, batch.stream_next)
    elif soft_targets:
        raise ValueError("soft targets need the frozen-main path (lossless, main weight 0)")
    elif batch.stream_rows.ndim == 2:
        raise ValueError("per-sample stream rows need the frozen-main path (lossless mode, "
                         "main weight 0)")
    else:
        hm, hs = model.upper(batch.hidden, batch.positions, None, None, batch.stream_rows,
                             embedding_scale, batch.stream_next)
    H = hs.shape[-1]
    gamma = hs.shape[2]
    counts = mx.array(loss_counts(batch, gamma) if counts is None else counts)
    div = mx.where(counts > 0, counts, 1.0)
    stream_logits = model.draft_logits(mx.take(hs.reshape(-1, H), batch.stream_index, axis=0))
    stream_ce = nn.losses.cross_entropy(stream_logits, batch.stream_target)
    if soft_targets:
        teacher = model.draft_logits(mx.take(hm.reshape(-1, H), batch.stream_source, axis=0))
        soft = mx.softmax(mx.stop_gradient(teacher).astype(mx.float32), axis=-1)
        soft_ce = -(soft * nn.log_softmax(stream_logits, axis=-1)).sum(-1)
        stream_ce = (1 - soft_targets) * stream_ce + soft_targets * soft_ce
    one_hot = mx.array(np.eye(gamma, dtype=np.float32)[batch.stream_id])  # (K, gamma)
    per_stream = (stream_ce[:, None] * one_hot).sum(0) / div[:gamma]
    loss = stream_weight * per_stream.sum()
    main_ce = mx.array(0.0)
    if main_weight:
        main_logits = model.head(mx.take(hm.reshape(-1, H), batch.main_index, axis=0))
        main_ce = nn.losses.cross_entropy(main_logits, batch.main_target).sum() / div[gamma]
        loss = loss + main_weight * main_ce
    hits = mx.argmax(stream_logits, axis=-1) == batch.stream_target
    return loss, (main_ce, per_stream, hits)


def evaluate(model, samples: list[Sample], args: TrainArgs,
             lookup: np.ndarray | None = None, embedding_scale: float = 1.0) -> dict:
    """Validation loss and each stream's top-1 accuracy on held-out samples (a target
    outside the draft vocabulary counts as a miss)."""
    gamma = model.stream_args.num_streams
    hits, counts, total, n = np.zeros(gamma), np.zeros(gamma), 0.0, 0
    for group in batches(samples, args.batch_size, random.Random(0), args.frozen_main):
        batch = make_batch(group, gamma, lookup, args.frozen_main)
        counts += batch.stream_missed
        loss, (_, _, hit) = losses(model, batch, *args.weights(), args.frozen_main,
                                   embedding_scale)
        mx.eval(loss, hit)
        hit = np.array(hit)
        for j in range(gamma):
            hits[j] += hit[batch.stream_id == j].sum()
            counts[j] += (batch.stream_id == j).sum()
        total += loss.item()
        n += 1
    return {"valid_loss": total / max(n, 1),
            "valid_top1": [round(float(h / max(c, 1)), 4) for h, c in zip(hits, counts,
                                                                          strict=True)]}


def scale_stream_embeddings(model, samples: list[Sample], seed: int, warm: bool = False
                            ) -> float:
    """Start P[j] at half the typical size of the hidden state it is added to, and let
    training move it at that scale: the hidden state entering the stream layers has an
    RMS of ~20 in SmolLM2, ~1000x the fresh P, and Adam moves P by ~lr per step. The
    embeddings are set at unit scale (warm: the loaded P divided by the scale); returns
    the scale every pass multiplies them by."""
    sample = mx.concatenate([s.hidden[1:] for s in samples[:64]])  # token 0 is an outlier
    rms = mx.sqrt(mx.mean(sample * sample)).item()
    if warm:
        scale_unit_params(model, 1 / rms)
        return rms
    mx.random.seed(seed)
    model.streams.embeddings = mx.random.normal(model.streams.embeddings.shape) * 0.5
    return rms


def scale_unit_params(model, factor: float) -> None:
    """Multiply the stream parameters training keeps at unit scale (the embeddings P and
    the next-token projection's `up`, both entering as x embedding_scale) by `factor`."""
    model.streams.embeddings = model.streams.embeddings * factor
    if "next_token_up" in model.streams:
        model.streams.next_token_up = model.streams.next_token_up * factor


def check_warm_start(model, source: Path, args: TrainArgs) -> None:
    """InputError naming the first setting of this run that the streams `source` came
    with differ in (or that it has none); otherwise the run continues from them.
    Streams without next-token conditioning may gain it (fresh, it changes nothing)."""
    loaded = model.stream_args
    if loaded is None:
        raise InputError(f"--warm-start: {source} has no streams to start from")
    full = not 0 < args.draft_vocab < model.args.vocab_size
    want = {"num_streams": args.num_streams, "msa_layers": args.msa_layers,
            "adapter_rank": args.adapter_rank if args.mode == "lossless" else 0,
            "draft_vocab_size": 0 if full else args.draft_vocab}
    if loaded.next_token_rank and args.next_token_rank:
        want["next_token_rank"] = args.next_token_rank
    if want["adapter_rank"]:
        want["adapter_scale"] = args.adapter_scale
    for name, value in want.items():
        have = getattr(loaded, name)
        if have != value:
            flag = "--" + name.replace("_size", "").replace("_", "-")
            raise InputError(f"--warm-start: the streams of {source} have {name} {have}, "
                             f"this run asks for {value} ({flag})")


def add_conditioning(model, rank: int, seed: int) -> None:
    """Give loaded streams without it a fresh next-token projection of `rank` (its zero
    `up` keeps their output until training moves it)."""
    sa = model.stream_args
    if not rank or sa.next_token_rank == rank:
        return
    mx.random.seed(seed)
    sa.next_token_rank = rank
    model.streams.add_next_token(rank, model.args.hidden_size)


def trainable(model, args: TrainArgs) -> None:
    """Freeze the base model; unfreeze streams (and task-mode LoRA in the top layers)."""
    model.freeze()
    model.streams.unfreeze()
    model.streams.freeze(keys=["draft_vocab"], strict=False)  # token ids, not weights
    if args.mode == "task":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        linear_to_lora_layers(model, args.msa_layers, {"rank": args.adapter_rank,
                              "scale": args.adapter_scale, "dropout": 0.0, "keys": keys})


def fuse_lora(model) -> None:
    """Fold task-mode LoRA layers into plain linear layers (W + scale * B @ A)."""
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def save_checkpoint(run_dir: Path, model, optimizer, state: dict) -> None:
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    params = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(ckpt / "trainable.safetensors"), params)
    mx.save_safetensors(str(ckpt / "optimizer.safetensors"),
                        dict(tree_flatten(optimizer.state)))
    (ckpt / "state.json").write_text(json.dumps(state, indent=2))


def read_state(run_dir: Path) -> dict:
    """The state.json of run_dir's checkpoint (step, settings, embedding scale)."""
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "state.json").exists():
        raise InputError(f"no checkpoint to resume in {ckpt}")
    return json.loads((ckpt / "state.json").read_text())


def load_checkpoint(run_dir: Path, model, optimizer) -> dict:
    ckpt = run_dir / "checkpoint"
    state = read_state(run_dir)
    model.load_weights(list(mx.load(str(ckpt / "trainable.safetensors")).items()),
                       strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    return state


def write_output(model, source: Path, out: Path, args: TrainArgs,
                 embedding_scale: float = 1.0) -> Path:
    """A model folder with the trained streams: the base files (copied when lossless,
    rewritten with fused weights in task mode), streams.safetensors and config block."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name != STREAMS_FILE and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    if args.mode == "task":
        fuse_lora(model)
        for f in out.glob("model*.safetensors"):
            f.unlink()
        base = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("streams")}
        mx.save_safetensors(str(out / "model.safetensors"), base, metadata={"format": "mlx"})
        config = json.loads((out / "config.json").read_text())
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    # The file stores P itself: the unit-scale embeddings times their training scale.
    scale_unit_params(model, embedding_scale)
    save_streams(model, out)
    return out


def fingerprints(source: Path, args: TrainArgs, train_ex: list, valid_ex: list) -> dict:
    """What every rank of a data-parallel run must agree on, as text."""
    files = sorted((f.name, f.stat().st_size) for f in source.iterdir() if f.is_file()
                   and f.suffix in (".safetensors", ".json", ".gguf"))
    config = (source / "config.json").read_text() if (source / "config.json").exists() else ""
    data = hashlib.sha256()
    for e in train_ex + valid_ex:
        data.update(np.asarray(e.tokens, dtype=np.int32).tobytes())
        data.update(str(e.completion_start).encode())
    settings = {k: v for k, v in asdict(args).items() if k not in ("run_dir", "model", "data",
                                                                     "valid", "resume")}
    return {"the model": f"{files} {hashlib.sha256(config.encode()).hexdigest()}",
            "the data": f"{len(train_ex)} + {len(valid_ex)} examples {data.hexdigest()}",
            "the training settings": json.dumps(settings, sort_keys=True)}


def train(args: TrainArgs, log=print) -> dict:
    """Run (or resume) training; returns the final metrics and the output folder.

    Under `mlx.launch` (several processes) the run is data-parallel: every rank builds
    the same plan of global batches, takes its share of each (`batch[rank::size]`), and
    the gradients are averaged with `mx.distributed`, each loss term divided by the
    global batch's count, so the update equals one process's on the same global batch.
    Rank 0 alone logs, evaluates and writes checkpoints and the output folder.
    """
    args.validate()
    group = Group(args.dist_timeout)
    rank, size = group.rank, group.size
    if not group.main:
        log = lambda *_: None  # noqa: E731
    run_dir = Path(args.run_dir)
    if group.main and not args.resume and (run_dir / "checkpoint").exists():
        raise InputError(f"{run_dir} holds the checkpoint of an earlier run: pass --resume to "
                         "continue it, or choose another --run-dir (nothing was overwritten)")
    mx.random.seed(args.seed)
    rng = random.Random(args.seed)
    source = resolve_path(args.model)
    model, tokenizer = load(source, precision="float32")
    train_ex = load_examples(args.data, tokenizer, args.max_length)
    valid_ex = load_examples(args.valid, tokenizer, args.max_length)[: args.max_valid] \
        if args.valid else []
    for what, text in fingerprints(source, args, train_ex, valid_ex).items():
        group.check_same(what, text)
    if size > 1:
        log(f"data-parallel over {size} processes (mx.distributed)")
    vocab_size = model.args.vocab_size
    if args.warm_start:  # continue the folder's streams, their draft vocabulary included
        check_warm_start(model, source, args)
        add_conditioning(model, args.next_token_rank, args.seed)
        draft_vocab = np.array(model.streams.draft_vocab) if model.has_draft_vocab else None
        log(f"warm start from the streams of {source}")
    else:
        draft_vocab = build_draft_vocab(train_ex, args.draft_vocab, vocab_size) \
            if 0 < args.draft_vocab < vocab_size else None
        stream_args = StreamArgs(
            num_streams=args.num_streams, msa_layers=args.msa_layers,
            adapter_rank=args.adapter_rank if args.mode == "lossless" else 0,
            adapter_scale=args.adapter_scale, tree_budget=args.tree_budget, top_k=args.top_k,
            draft_vocab_size=0 if draft_vocab is None else len(draft_vocab),
            next_token_rank=args.next_token_rank)
        init_streams(model, stream_args, seed=args.seed)
    lookup = vocab_lookup(draft_vocab, vocab_size)
    if draft_vocab is not None:
        model.streams.draft_vocab = mx.array(draft_vocab)
        valid_tokens = [t for e in valid_ex for t in e.tokens[e.completion_start:]]
        cover = np.mean(lookup[valid_tokens] >= 0) if valid_tokens else float("nan")
        which = "loaded" if args.warm_start else "most frequent training"
        log(f"streams draft from the {len(draft_vocab)} {which} tokens (of {vocab_size}); "
            f"they cover {cover:.1%} of held-out completion tokens")
    steps_per_epoch = math.ceil(len(train_ex) / args.batch_size)
    total = max(1, int(steps_per_epoch * args.epochs))
    sizes = [(len(e.tokens), e.completion_start) for e in train_ex]
    plan = []  # global batches of example indices: the same for every world size
    while len(plan) < total:
        plan += index_batches(sizes, args.batch_size, rng, args.frozen_main)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-7, args.lr, max(args.warmup, 1)),
         optim.linear_schedule(args.lr, args.lr * 0.05, max(total - args.warmup, 1))],
        [max(args.warmup, 1)])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    state = {"step": 0, "args": asdict(args)}
    if args.resume and group.main:
        state = read_state(run_dir)
    # Rank 0's step (resumed or 0) on every rank: a resumed run may change its world size.
    with group.deadline("sharing the first step"):
        first = int(group.broadcast(mx.array([state["step"]], dtype=mx.int32)).item())
    # This rank's examples over the whole run (a resume with the same world size reuses
    # their cached hidden states); rank 0 also holds the first 64, from which the stream
    # embeddings' scale is measured (the same for every world size).
    mine = sorted({i for b in plan[:total] for i in b[rank::size]}
                  | (set(range(min(64, len(train_ex)))) if group.main else set()))
    log(f"{len(train_ex)} training examples "
        f"({sum(e.completion_tokens for e in train_ex)} completion tokens), "
        f"{len(valid_ex)} held-out; computing frozen hidden states of layers "
        f"0..{len(model.layers) - args.msa_layers - 1} once")
    tic = time.perf_counter()
    name = "train" if size == 1 else f"train-rank{rank}of{size}"
    subset = [train_ex[i] for i in mine]
    own = dict(zip(mine, cached_hidden(model, subset, run_dir / f"hidden-{name}.safetensors",
                                       hidden_key(source, model.split, subset), log),
                   strict=True))
    valid_set = cached_hidden(model, valid_ex, run_dir / "hidden-valid.safetensors",
                              hidden_key(source, model.split, valid_ex), log) \
        if group.main else []
    with group.deadline("computing the frozen hidden states"):
        mx.eval(group.all_sum(mx.zeros(1)))  # every rank is ready
    log(f"hidden states ready in {time.perf_counter() - tic:.0f} s")
    head = [own[i] for i in range(min(64, len(train_ex)))] if group.main else []
    scale = scale_stream_embeddings(model, head, args.seed, args.warm_start) \
        if group.main else 0.0
    trainable(model, args)
    if args.resume and group.main:
        load_checkpoint(run_dir, model, optimizer)
        scale = state.get("embedding_scale", scale)
        log(f"resumed at step {first}")
    with group.deadline("sharing the embedding scale"):
        scale = float(group.broadcast(mx.array([scale])).item())
    if size > 1:  # the same start everywhere: rank 0's parameters and optimizer state
        optimizer.init(model.trainable_parameters())
        model.update(group.broadcast(model.trainable_parameters()))
        optimizer.state = group.broadcast(optimizer.state)
        with group.deadline("sharing rank 0's parameters"):
            mx.eval(model.trainable_parameters(), optimizer.state)
    loss_and_grad = nn.value_and_grad(model, lambda m, b, c: losses(
        m, b, *args.weights(), args.frozen_main, scale, c, args.soft_targets))
    gamma = args.num_streams
    zeros = tree_map(mx.zeros_like, model.trainable_parameters())
    metrics, window_tic, window = {}, time.perf_counter(), np.zeros(3 * gamma + 2)
    if args.warm_start and first == 0 and group.main and valid_set:
        # Where the loaded streams stand on this validation set, before any update.
        log(f"step 0 validation: {evaluate(model, valid_set, args, lookup, scale)}")
    steps, own_tokens = 0, 0
    for step in range(first, total):
        share = [own[i] for i in plan[step][rank::size]]
        if share:
            batch = make_batch(share, gamma, lookup, args.frozen_main)
            local = loss_counts(batch, gamma)
        else:  # a global batch smaller than the group: nothing for this rank
            batch, local = None, np.zeros(gamma + 1, dtype=np.float32)
        counts = group.all_sum(mx.array(local)) / size  # each rank's share of the global
        if batch is not None:
            (loss, (_, per_stream, hit)), grads = loss_and_grad(model, batch, counts)
            one_hot = mx.array(np.eye(gamma, dtype=np.float32)[batch.stream_id])
            stats = mx.concatenate([  # loss, stream CE, hits and targets per stream, tokens
                loss[None], per_stream, (hit[:, None] * one_hot).sum(0),
                mx.array(local[:gamma] + batch.stream_missed, dtype=mx.float32),
                mx.array([batch.tokens], dtype=mx.float32)])
            own_tokens += batch.tokens
        else:
            grads, stats = zeros, mx.zeros(3 * gamma + 2)
        grads = group.average_gradients(grads)
        optimizer.update(model, grads)
        stats = group.all_sum(stats)
        with group.deadline(f"at step {step + 1}"):
            mx.eval(stats, model.trainable_parameters(), optimizer.state)
        window += np.array(stats)
        steps += 1
        done = step + 1
        if done % args.steps_per_report == 0 or done == total:
            # Per rank: its own tokens and seconds; the group's tokens/s is their sum.
            elapsed = time.perf_counter() - window_tic
            # Each rank's loss is its sum over the global count / size: the mean over
            # ranks and steps is the global batches' mean loss.
            loss = window[0] / size / steps
            per = window[1 : 1 + gamma] / size / steps
            hits, seen = window[1 + gamma : 1 + 2 * gamma], window[1 + 2 * gamma : 1 + 3 * gamma]
            top1 = " ".join(f"{h / max(c, 1):.3f}" for h, c in zip(hits, seen, strict=True))
            streams = " ".join(f"{x:.3f}" for x in per)
            rates = group.gather_floats([own_tokens, elapsed])  # every rank's own
            line = (f"step {done}/{total} loss {loss:.4f} stream CE [{streams}] "
                    f"top-1 [{top1}] "
                    f"lr {optimizer.learning_rate.item():.2e} "
                    f"{window[-1] / elapsed:.0f} tokens/s")
            if size > 1:
                line += f" (per rank: {' '.join(f'{t / e:.0f}' for t, e in rates)})"
            log(line)
            window_tic, window = time.perf_counter(), np.zeros_like(window)
            steps, own_tokens = 0, 0
        if group.main and valid_set and (done % args.steps_per_eval == 0 or done == total):
            metrics = evaluate(model, valid_set, args, lookup, scale)
            log(f"step {done} validation: {metrics}")
        if group.main and (done % args.steps_per_checkpoint == 0 or done == total):
            save_checkpoint(run_dir, model, optimizer, {
                **state, "step": done, "embedding_scale": scale})
    out = run_dir / "model"
    if group.main:
        write_output(model, source, out, args, scale)
        log(f"wrote {out}")
    return {"output": str(out) if group.main else None, **metrics}

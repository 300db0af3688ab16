"""What the drafting controller believes about a model's drafts before it has seen any:
per-model knowledge kept next to the streams, in `drafting_priors.json` of the model
folder, written by `specstream tune --write` from its replay (greedy and sampled apart).

    {"greedy":  {"stream_calibration": [1.0], "stream_weight": 1.0,
                 "context_first": {"1": 0.21, "2": 0.5, "3": 0.6, "4": 0.9},
                 "context_next": 0.8,
                 "corpus_first": {"2": 0.42, ..., "6": 0.77}, "corpus_next": 0.73},
     "sampled": {...the same fields...},
     "source": "how they were measured"}

stream_calibration: accepted / predicted stream nodes (their path probabilities summed)
at depths 1, 2, 3.. (deeper depths take the last), worth `stream_weight` predicted nodes
a depth; context_first / corpus_first: a chain's first-token acceptance by the length n
of the match it was drawn from (lookup.py: 1..4, corpus.py: 2..6); *_next: each next
token's acceptance given the previous one. Running statistics replace all of them
within a few drafts. A folder without the file starts from NEUTRAL.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specstream_mlx.checkpoint import PRIORS_FILE, write_json_atomic
from specstream_mlx.errors import ModelLoadError

# Match lengths a chain's statistics are kept by (lookup.py matches 1..4 tokens,
# corpus.py 2..6); longer or shorter ones share the nearest bucket.
CONTEXT_MATCHES = (1, 2, 3, 4)
CORPUS_MATCHES = (2, 3, 4, 5, 6)


@dataclass(frozen=True)
class Priors:
    """The controller's starting beliefs for one decoding mode (greedy or sampled)."""

    stream_calibration: tuple[float, ...] = (1.0,)
    stream_weight: float = 1.0
    context_first: dict[int, float] = field(default_factory=dict)
    context_next: float = 0.5
    corpus_first: dict[int, float] = field(default_factory=dict)
    corpus_next: float = 0.5

    def first(self, kind: str, n: int) -> float:
        """First-token acceptance of a `kind` chain from an n-token match (0.5 unknown)."""
        return (self.context_first if kind == "context" else self.corpus_first).get(n, 0.5)

    def follow(self, kind: str) -> float:
        return self.context_next if kind == "context" else self.corpus_next


# No knowledge: stream path probabilities taken at their word, chains even odds.
NEUTRAL = Priors()


@dataclass(frozen=True)
class DraftingPriors:
    greedy: Priors = NEUTRAL
    sampled: Priors = NEUTRAL
    source: str = ""

    def of(self, sampled: bool) -> Priors:
        return self.sampled if sampled else self.greedy


def _priors(data: dict, where: str) -> Priors:
    def rate(x) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1:
            raise ValueError(f"{where}: {x!r} is not a rate in [0, 1]")
        return float(x)

    def rates(d) -> dict[int, float]:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: {d!r} is not an object of rates by match length")
        return {int(n): rate(p) for n, p in d.items()}

    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a JSON object")
    unknown = set(data) - set(Priors.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    cal = data.get("stream_calibration", [1.0])
    if not isinstance(cal, list) or not cal or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < math.inf
            for c in cal):
        raise ValueError(f"{where}: stream_calibration must be a list of positive numbers")
    weight = data.get("stream_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            0 < weight < math.inf):
        raise ValueError(f"{where}: stream_weight must be a positive number")
    return Priors(tuple(float(c) for c in cal), float(weight),
                  rates(data.get("context_first", {})), rate(data.get("context_next", 0.5)),
                  rates(data.get("corpus_first", {})), rate(data.get("corpus_next", 0.5)))


def read_priors(folder: str | Path) -> DraftingPriors:
    """The folder's drafting priors (NEUTRAL for both modes without the file)."""
    path = Path(folder) / PRIORS_FILE
    if not path.is_file():
        return DraftingPriors()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = set(data) - {"greedy", "sampled", "source"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        return DraftingPriors(_priors(data.get("greedy", {}), "greedy"),
                              _priors(data.get("sampled", {}), "sampled"),
                              str(data.get("source", "")))
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ModelLoadError(f"{path}: bad drafting priors: {e}") from e


def priors_json(p: Priors) -> dict:
    """`p` as stored on disk (match lengths as string keys)."""
    d = asdict(p)
    d["stream_calibration"] = list(p.stream_calibration)
    for key in ("context_first", "corpus_first"):
        d[key] = {str(n): v for n, v in sorted(d[key].items())}
    return d


def write_priors(folder: str | Path, priors: DraftingPriors) -> Path:
    """Write the folder's drafting priors (atomic)."""
    path = Path(folder) / PRIORS_FILE
    write_json_atomic(path, {"greedy": priors_json(priors.greedy),
                             "sampled": priors_json(priors.sampled), "source": priors.source})
    return path


def model_priors(model) -> DraftingPriors:
    """The priors the loader attached to `model` (NEUTRAL without them)."""
    return getattr(model, "drafting_priors", None) or DraftingPriors()

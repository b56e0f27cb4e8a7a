"""Pure view-model functions of the dashboard: records -> table rows, summary, images, routing strips.

No Textual, no network, no clock: everything takes ``now`` and plain data, so it is unit tested.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace

import torch
from rich.text import Text

from diffswarm.sampling.config import SamplingConfig  # the dashboard shares the CLI's sampling defaults
from diffswarm.sampling.steps import SAMPLERS

UPPER_HALF = "\u2580"
BARS = " \u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"


@dataclass(frozen=True)
class ExpertRow:
    """One line of the swarm table (one expert served by one peer)."""

    key: str  # "peer_id/expert_id": stable row key
    expert_id: str
    cluster: int | None
    objective: str  # "DDPM" | "FM"
    peer: str  # short peer id
    state: str  # joining | online | offline (vanished peers are kept as offline)
    throughput: float
    load: float
    latency_ms: float | None
    age_s: float  # seconds since the peer's last announcement
    replicas: int  # online replicas of this cluster
    health: str = "-"  # this client's view of the peer: ok | unverified | banned 12s | skipped: why
    progress: float = 1.0  # training progress of a joining expert

    @property
    def state_label(self) -> str:
        return f"{self.state} {self.progress:.0%}" if self.state == "joining" else self.state

    def cells(self) -> tuple[str, ...]:
        lat = "-" if self.latency_ms is None else f"{self.latency_ms:.0f}"
        return (self.expert_id, "-" if self.cluster is None else str(self.cluster), self.objective, self.peer,
                self.state_label, self.health, f"{self.throughput:.0f}", f"{self.load:.0f}", lat,
                f"{self.age_s:.0f}s", str(self.replicas))


COLUMNS = ("expert", "cluster", "objective", "peer", "state", "health", "rows/s", "load", "latency ms",
           "heartbeat", "replicas")
STATE_COLUMN, HEALTH_COLUMN = COLUMNS.index("state"), COLUMNS.index("health")


def swarm_rows(records: Sequence, latency: Mapping[str, float], now: float,
               previous: Sequence[ExpertRow] = (), health: Mapping[str, str] | None = None) -> list[ExpertRow]:
    """Rows from expert records (latest per peer/expert), ``latency`` (peer -> seconds), ``health``
    (peer -> this client's verdict) and ``now`` (DHT time, seconds). Rows of ``previous`` whose record
    vanished stay, marked offline."""
    health = health or {}
    latest = latest_records(records)
    replicas: dict[int | None, int] = {}
    for r in latest.values():
        if r.state == "online":
            replicas[r.cluster] = replicas.get(r.cluster, 0) + 1
    rows = {}
    for key, r in latest.items():
        lat = latency.get(r.peer_id)
        rows[key] = ExpertRow(key, r.expert_id, r.cluster, r.objective.upper(), r.peer_id[-8:], r.state,
                              float(r.throughput), float(r.load), None if lat is None else lat * 1000.0,
                              max(0.0, now - r.updated), replicas.get(r.cluster, 0),
                              health.get(r.peer_id, "-"), float(getattr(r, "progress", 1.0)))
    for old in previous:
        if old.key not in rows:
            rows[old.key] = replace(old, state="offline", load=0.0, replicas=replicas.get(old.cluster, 0),
                                    health="-", latency_ms=None)
    return sorted(rows.values(), key=lambda row: (row.cluster if row.cluster is not None else -1, row.key))


@dataclass(frozen=True)
class Summary:
    peers_online: int
    covered: int
    num_clusters: int
    uncovered: tuple[int, ...]

    def line(self) -> str:
        s = f"peers online: {self.peers_online}   experts covered: {self.covered}/{self.num_clusters}"
        if self.uncovered:
            s += "   uncovered clusters: " + ", ".join(str(k) for k in self.uncovered)
        return s


def summarize(rows: Sequence[ExpertRow], num_clusters: int) -> Summary:
    online = [r for r in rows if r.state == "online"]
    covered = {r.cluster for r in online if r.cluster is not None and 0 <= r.cluster < num_clusters}
    peers = {r.key.split("/", 1)[0] for r in online}
    return Summary(len(peers), len(covered), num_clusters, tuple(k for k in range(num_clusters) if k not in covered))


def tile(x: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) -> one (C, H', W') image, ``nrow`` images per row, padded with -1 (black)."""
    n, c, h, w = x.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    out = torch.full((c, rows * (h + pad) - pad, nrow * (w + pad) - pad), -1.0)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = x[i].float().cpu()
    return out


def _rgb(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    u8 = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if u8.shape[0] == 1:
        u8 = u8.expand(3, -1, -1)
    return u8[:3].permute(1, 2, 0)


def halfblock(img: torch.Tensor) -> list[Text]:
    """(C, H, W) image in [-1, 1] -> ceil(H/2) Rich lines of W upper half blocks: the top pixel is the
    foreground colour, the bottom pixel the background (black below an odd last row)."""
    px = _rgb(img).tolist()
    h = len(px)
    lines = []
    for y in range(0, h, 2):
        line = Text()
        for xx, top in enumerate(px[y]):
            bot = px[y + 1][xx] if y + 1 < h else [0, 0, 0]
            line.append(UPPER_HALF, style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bot[0]},{bot[1]},{bot[2]})")
        lines.append(line)
    return lines


def fit_grid(n: int, h: int, w: int, cols: int, lines: int, max_up: int = 3) -> tuple[int, int, int]:
    """The largest (height, width) for ``n`` images of h x w pixels, tiled with a 1-pixel gap, that fits
    ``cols`` terminal columns and ``lines`` half-block lines (2 pixels each); returns (nrow, height, width).
    Upscales up to ``max_up`` times (small images, big panel), downscales down to a quarter; when even
    that does not fit it returns the quarter size (the view scrolls)."""
    px_h, n = 2 * max(1, lines), max(1, n)

    def layout(hh: int, ww: int) -> int | None:
        most = min(n, (cols + 1) // (ww + 1))  # images per row that fit the width
        if most < 1:
            return None
        rows = -(-n // most)
        return -(-n // rows) if rows * (hh + 1) - 1 <= px_h else None  # as few per row as that many rows allow

    sizes = [(hh, max(1, round(w * hh / h))) for hh in range(h * max_up, max(1, h // 4) - 1, -1)]
    for hh, ww in sizes:
        nrow = layout(hh, ww)
        if nrow is not None:
            return nrow, hh, ww
    hh, ww = sizes[-1]
    return max(1, min(n, (cols + 1) // (ww + 1))), hh, ww


def fit_images(x: torch.Tensor, cols: int, lines: int) -> list[Text]:
    """(N, C, H, W) samples in [-1, 1] -> half-block lines that fit a ``cols`` x ``lines`` panel."""
    import torch.nn.functional as F

    n, _, h, w = x.shape
    nrow, hh, ww = fit_grid(n, h, w, cols, lines)
    x = x.detach().float().cpu()
    if hh % h == 0 and ww % w == 0:  # whole-factor upscale (or none): crisp pixels
        x = x.repeat_interleave(hh // h, dim=2).repeat_interleave(ww // w, dim=3)
    elif hh > h:
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False).clamp(-1, 1)
    else:
        x = F.interpolate(x, size=(hh, ww), mode="area")
    return halfblock(tile(x, nrow))


def routing_legend(expert_ids: Sequence[str]) -> str:
    """Which expert each column of the strips' bar stands for."""
    return "bar columns: " + " ".join(expert_ids)


def routing_strip(info, width: int | None = None) -> Text:
    """One line per step from a ``StepInfo``: a bar with one column per expert (its mean routing weight over
    the batch, green where the expert was called), then the called experts by weight, e.g.
    ``  3/20 t=0.80 ▆▂ ▁  c0-ddpm .75  c1-fm .25``. The bar grows by one column per expert (K=16 fits);
    names that would pass ``width`` columns are summed up as ``+N``."""
    share = info.weights.float().mean(0).tolist()
    text = Text(f"{info.step + 1:>3}/{info.num_steps} t={info.t:.2f} ")
    chosen = set(info.chosen)
    for eid, w in zip(info.expert_ids, share, strict=True):
        level = min(len(BARS) - 1, round(w * (len(BARS) - 1)))
        text.append(BARS[max(level, 1 if w > 0 else 0)],  # a called expert never looks idle
                    style="green on grey15" if eid in chosen else "grey50 on grey15")
    called = sorted(((w, eid) for eid, w in zip(info.expert_ids, share, strict=True) if eid in chosen),
                    key=lambda p: -p[0])
    for i, (w, eid) in enumerate(called):
        name, weight = f"  {eid} ", "1.0" if w >= 0.995 else f"{w:.2f}".lstrip("0") if w >= 0.005 else "<.01"
        rest = len(called) - i - 1
        if width is not None and len(text) + len(name) + len(weight) + (len(f"  +{rest}") if rest else 0) > width:
            text.append(f"  +{len(called) - i}", style="green")
            break
        text.append(name, style="bold green")
        text.append(weight)
    return text


def event_line(event: str) -> Text:
    """A client event under the step it happened in: ``+`` an expert came online, ``-`` one left,
    ``!`` a failure (failover, ban, uncovered cluster)."""
    if " online at " in event or event == "all clusters are covered again":
        return Text(f"  + {event}", style="green")
    if event.endswith(" left"):
        return Text(f"  - {event}", style="yellow")
    return Text(f"  ! {event}", style="bold red")


@dataclass(frozen=True)
class GenRequest:
    classes: tuple[int, ...]  # () = unconditional
    n: int
    steps: int
    k: int
    guidance: float
    seed: int
    strategy: str = "top-k"  # diffswarm.router.routing.STRATEGIES
    sampler: str = SamplingConfig.sampler  # SAMPLERS (the CLI's default)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.steps, sampler=self.sampler, guidance=self.guidance, seed=self.seed)

    def routing(self, num_experts: int):
        from diffswarm.router.routing import RoutingConfig

        return RoutingConfig(self.strategy, min(self.k, num_experts))

    @property
    def routing_label(self) -> str:
        if self.strategy in ("top-k", "sample-k"):
            return f"{self.strategy.removesuffix('-k')}-{self.k}"
        return self.strategy


def parse_request(classes: str, n: str, steps: str, k: str, guidance: str, seed: str, strategy: str = "top-k",
                  sampler: str = SamplingConfig.sampler, num_classes: int | None = None) -> GenRequest:
    """The generate panel's fields -> a request; ValueError with a readable message on bad input."""
    from diffswarm.router.routing import STRATEGIES

    try:
        cls = tuple(int(c) for c in classes.replace(",", " ").split())
        req = GenRequest(cls, int(n), int(steps), int(k), float(guidance), int(seed), strategy, sampler)
    except ValueError:
        raise ValueError("classes, n, steps, k and seed must be integers, guidance a number") from None
    if req.n < 1 or req.steps < 1 or req.k < 1:
        raise ValueError("n, steps and k must be >= 1")
    if req.n > 256 or req.steps > 1000:
        raise ValueError("at most 256 images and 1000 steps per generation")
    if strategy not in STRATEGIES or sampler not in SAMPLERS:
        raise ValueError(f"routing must be one of {STRATEGIES}, sampler one of {SAMPLERS}")
    if num_classes is not None and any(not -1 <= c < num_classes for c in cls):
        raise ValueError(f"the swarm's experts know classes 0..{num_classes - 1} (-1: none)" if num_classes else
                         "the swarm's experts take no class: leave class blank")
    return req


def class_hint(dataset_id: str, num_classes: int) -> str:
    """The generate panel's reminder of what the class ids mean: names for the built-in datasets
    (``fashion:28`` -> ``0 T-shirt/top  1 Trouser ...``), else the id range."""
    from diffswarm.data.datasets import FASHION_CLASSES

    if num_classes <= 0:
        return "the swarm's experts take no class: leave class blank"
    name = dataset_id.split(":", 1)[0]
    if name == "fashion" and num_classes == len(FASHION_CLASSES):
        return "  ".join(f"{i} {c}" for i, c in enumerate(FASHION_CLASSES))
    what = "digits 0-9" if name == "digits" and num_classes == 10 else f"{name or 'classes'} 0..{num_classes - 1}"
    return f"{what}   (blank: every class in turn, -1: unconditional)"


def labels_for(req: GenRequest, num_classes: int = 0) -> torch.Tensor:
    """(n,) labels: the request's classes in turn; no classes = every class in turn (like the CLI's
    ``--class all``), or unconditional (-1) when the swarm's experts take no class."""
    classes = req.classes or tuple(range(num_classes)) or (-1,)
    return torch.tensor([classes[i % len(classes)] for i in range(req.n)], dtype=torch.long)


# -- expert detail ----------------------------------------------------------------------------


class PeerHistory:
    """Bounded per-peer history of one measure, one sample per poll, times ``scale`` (latency: seconds -> ms):
    feeds the detail sparklines."""

    def __init__(self, maxlen: int = 60, scale: float = 1.0):
        self.maxlen, self.scale = maxlen, scale
        self._hist: dict[str, deque[float]] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for peer, v in values.items():
            self._hist.setdefault(peer, deque(maxlen=self.maxlen)).append(float(v) * self.scale)

    def get(self, peer: str) -> tuple[float, ...]:
        return tuple(self._hist.get(peer, ()))


def peer_throughput(records: Sequence) -> dict[str, float]:
    """peer -> rows/s its online experts announce (newest record per peer/expert, summed over its experts)."""
    out: dict[str, float] = {}
    for r in latest_records(records).values():
        if r.state == "online":
            out[r.peer_id] = out.get(r.peer_id, 0.0) + max(0.0, float(r.throughput))
    return out


def latest_records(records: Sequence, into: Mapping[str, object] | None = None) -> dict[str, object]:
    """``peer_id/expert_id`` -> newest record; merged over ``into`` so vanished experts keep their last record."""
    out = dict(into or {})
    for r in records:
        key = f"{r.peer_id}/{r.expert_id}"
        if key not in out or r.updated >= out[key].updated:
            out[key] = r
    return out


def record_fields(record) -> dict[str, object]:
    """Every field a record carries (dataclass fields, then any extra attributes a newer peer announced)."""
    if is_dataclass(record):
        d = {f.name: getattr(record, f.name) for f in fields(record)}
    else:
        d = {}
    d.update({k: v for k, v in getattr(record, "__dict__", {}).items() if not k.startswith("_")})
    return d


def training_summary(record) -> str:
    """'steps N, final loss L' (online) or 'step N (40%), loss L' (joining) from the record's ``train_steps`` and
    ``final_loss`` (record version 2); 'not announced' for peers that do not announce them."""
    steps, loss = getattr(record, "train_steps", None), getattr(record, "final_loss", None)
    joining = getattr(record, "state", None) == "joining"
    parts = []
    if steps is not None:
        parts.append(f"step {steps} ({float(getattr(record, 'progress', 0)):.0%})" if joining else f"steps {steps}")
    if loss is not None:
        parts.append(f"{'loss' if joining else 'final loss'} {float(loss):.4g}")
    return ", ".join(parts) if parts else "not announced"


def detail_rows(record, state: str | None = None, latency_ms: Sequence[float] = ()) -> list[tuple[str, Text]]:
    """The detail panel's (name, value) rows: who and how it is doing first (expert, peer, state, training
    summary, latency), then every other field of the record."""
    d = record_fields(record)
    if state is not None and state != d.get("state"):
        d["state"] = f"{state} (last announced {d.get('state')})"
    for k in ("train_steps", "final_loss"):  # shown as one 'training' row
        d.pop(k, None)
    if latency_ms:
        latency = Text(f"last {latency_ms[-1]:.1f} ms, min {min(latency_ms):.1f}, max {max(latency_ms):.1f}")
    else:
        latency = Text("not measured yet", style="dim")
    rows = [(k, Text(_field_value(d.pop(k)))) for k in ("expert_id", "peer_id", "state") if k in d]
    rows += [("training", Text(training_summary(record))), ("latency", latency)]
    return rows + [(k, Text(_field_value(v))) for k, v in d.items()]


def _field_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) or "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None or v == "" else str(v)


def detail_table(record, state: str | None = None, latency_ms: Sequence[float] = ()):
    """The detail panel as a two-column grid: long values (hashes, addresses) fold inside their column."""
    from rich.table import Table

    if record is None:
        return Text("select a row of the swarm table", style="dim")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for k, v in detail_rows(record, state, latency_ms):
        grid.add_row(k, v)
    return grid


# -- history ----------------------------------------------------------------------------------


HISTORY_COLUMNS = ("#", "class", "n", "steps", "routing", "sampler", "guidance", "seed", "wall s", "png")


@dataclass(frozen=True)
class HistoryEntry:
    """One finished generation of this session."""

    index: int
    request: GenRequest
    wall_s: float
    path: str
    images: torch.Tensor | None = field(default=None, compare=False, repr=False)  # the samples, to show them again

    def cells(self) -> tuple[str, ...]:
        r = self.request
        cls = " ".join(str(c) for c in r.classes) or "all"
        return (str(self.index), cls, str(r.n), str(r.steps), r.routing_label, r.sampler, f"{r.guidance:g}",
                str(r.seed), f"{self.wall_s:.2f}", self.path)

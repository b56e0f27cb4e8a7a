"""Trust in peers' answers (pure decisions: no network, no clock; callers pass ``now``).

Every velocity a peer returns is untrusted input. Three layers, cheapest first:

1. **Checks on every answer** (``check_answer``): float dtype, the requested shape, finite, and a
   per-row bound on the answer's RMS that follows from the request. In flow time a velocity for data
   in [-1, 1] is v = (x_t - x0)/t with |x0| <= 1, so an honest expert's unguided answer has
   RMS(v) <= (RMS(x_t) + 1)/t; classifier-free guidance g extrapolates two such answers, at most
   (1 + 2g) times that. We allow that bound (with t floored at ``T_FLOOR``) times ``BOUND_SLACK``:
   it never rejects an honest answer and catches garbage (inf, 1e30, overflowed halves).
2. **Cross-checks** (``should_verify`` + ``relative_difference``): a share of calls (every peer's
   first answer in each trajectory, a random ``check_rate`` of the rest, and every call of a
   suspected peer) is also computed by a second source with the same checkpoint sha256, drawn at random
   by the client (``Sources.partner``): another replica (preferring one in another /16 address block), or
   for a ``local_check_share`` of checks the client's own copy of the weights. Answers must agree per row
   within a relative L2 tolerance measured for honest replicas (``TrustConfig.tolerance``: peers answer in
   IEEE float32 on every device, ``experts.expert.exact_fp32_on_cuda``). A disagreement is arbitrated by a
   third source (the client's own copy of the weights, fetched and hash-checked when needed, else a third
   replica): whoever deviates from it is caught lying.
3. **Suspicion** (``Suspicion``, AI Horde's idea): a per-peer score that decays with a half-life;
   invalid answers and lies add to it, and a peer caught lying is banned for ``lie_ban`` seconds.
   Disputes that cannot be arbitrated raise both peers' scores (never a ban: one of them is honest),
   and suspected peers are then cross-checked on every call.

Escape probabilities (``escape_probability``, ``collusion_escape``; measured by ``bench/hidden_liars.py``):

- A peer with n verified answers is checked at rate ``check_rate`` = max(verify_share, new_peer_rate *
  rate_decay^n) (a failed check resets n to 0): a fresh identity pays for its anonymity in checks.
- Each peer's last answer and ``audit_samples`` answers drawn uniformly among its unchecked answers of the
  trajectory are audited (``Ledger``: positions drawn in advance from the client's generator, completed at the
  end from a reservoir). Where: every answer of the trajectory's last step is cross-checked in that step; a
  pick is verified by the client's own copy of the weights (when it holds one) in the next evaluation's round,
  while the peers compute; what is left (last answers of peers not called in the last step, picks without a
  local copy, completions) is checked before the sampler returns. A liar that
  lies on a share f of its m unchecked calls of a trajectory, at steps of its choosing, escapes it with
  probability at most (1 - f)^a * prod over its lies of (1 - r_i) <= (1 - f)^a (1 - verify_share)^(f m),
  with r_i the check rate at its i-th lie and a = ``audit_samples``; over G generations that is raised to
  the power G (each trajectory draws anew from the client's OS-seeded generator).
- Colluding replicas (the same wrong answer from two peers with the same sha256): each check of one of them
  goes to the client's own copy with probability l = ``local_check_share`` (when it can get the weights),
  else to a random usable replica of the same sha256, honest with probability h (the honest share of the
  other replicas). A lying call that is checked escapes with probability (1 - l)(1 - h); once one colluder
  is caught, every peer that agreed with it in the trajectory is re-checked on that agreed call against the
  client's copy, so its partner is banned too, and their steps are recomputed.

What this cannot catch: a lie smaller than the tolerance (at most ``tolerance`` of the answer's
norm, per row); lies in unchecked calls with the probability above; lies when no second source exists
(a cluster served by one peer whose weights cannot be fetched); colluders whose agreed calls were honest.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

T_FLOOR = 0.05  # flow time floor of the norm bound (the bound grows as 1/t)
NOISE_END = 1e-3  # rows at t >= 1 - NOISE_END are cross-checked at TrustConfig.tolerance_noise_end
BOUND_SLACK = 4.0  # headroom over the analytic bound


@dataclass(frozen=True)
class TrustConfig:
    """How much the client checks peers' answers (one commented field per knob)."""

    verify_share: float = 0.05  # random share of calls also computed by a second source
    verify_first: bool = True  # cross-check every peer's first answer in each trajectory
    tolerance: float = 2e-3  # per-row relative L2 difference allowed between two sources' answers (float32; a
    #                          peer's claim of another precision loosens nothing: a liar would make it)
    tolerance_noise_end: float = 2e-2  # ... for rows within NOISE_END of t = 1 (see row_tolerance)
    fetch_checkpoints: bool = True  # fetch (and hash-check) an expert's weights to arbitrate or fill in
    local_fallback: bool = True  # compute a cluster with its verified weights when no honest peer is left
    new_peer_rate: float = 0.5  # check rate of a peer with no verified answer yet (see check_rate)
    rate_decay: float = 0.75  # ... multiplied by this per verified answer, down to verify_share
    local_check_share: float = 0.25  # share of checks whose partner is the client's own copy of the weights
    audit_samples: int = 1  # random earlier unchecked answers of each peer audited at a trajectory's end
    suspect_score: float = 2.0  # from this score on, every call of the peer is cross-checked
    lie_ban: float = 3600.0  # seconds a peer caught lying (or returning invalid answers) is banned
    half_life: float = 600.0  # seconds for a suspicion score to halve

    def __post_init__(self) -> None:
        if not 0 <= self.verify_share <= 1:
            raise ValueError(f"verify_share must be in [0, 1], got {self.verify_share}")
        for name in ("new_peer_rate", "rate_decay", "local_check_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.audit_samples < 0:
            raise ValueError(f"audit_samples must be >= 0, got {self.audit_samples}")
        if not (self.tolerance > 0 and self.tolerance_noise_end > 0):
            raise ValueError(f"tolerances must be > 0, got {self.tolerance} and {self.tolerance_noise_end}")


# ---------------------------------------------------------------------------------------------
# 1. every answer


def velocity_bound(x: torch.Tensor, t: torch.Tensor, guidance: float) -> torch.Tensor:
    """(B,) largest RMS an honest velocity for rows x (B, ...) at flow times t (B,) can have (see module doc)."""
    rms_x = x.detach().float().flatten(1).pow(2).mean(1).sqrt()
    amp = 1.0 + 2.0 * max(float(guidance), 0.0)
    return BOUND_SLACK * amp * (rms_x + 1.0) / t.detach().float().clamp_min(T_FLOOR)


def check_answer(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, guidance: float) -> str | None:
    """Why the answer ``v`` to rows (x (B, C, H, W), t (B,), guidance) cannot be honest, or None."""
    if not torch.is_tensor(v) or not v.is_floating_point():
        return f"answer has dtype {getattr(v, 'dtype', type(v).__name__)}, expected a float tensor"
    if tuple(v.shape) != tuple(x.shape):
        return f"answer has shape {tuple(v.shape)}, the request {tuple(x.shape)}"
    vf = v.detach().float()
    if not torch.isfinite(vf).all():
        return "answer contains NaN or inf"
    rms = vf.flatten(1).pow(2).mean(1).sqrt()
    bound = velocity_bound(x, t.to(x.device), guidance).to(rms.device)
    over = rms > bound
    if over.any():
        i = int(over.nonzero()[0])
        return f"answer row {i} has RMS {float(rms[i]):.3g}, above the bound {float(bound[i]):.3g} for its request"
    return None


# ---------------------------------------------------------------------------------------------
# 2. cross-checks


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) per-row ||a - b|| / max(||a||, ||b||, 1e-3 * sqrt(D)): 0 for equal answers, 1 for a zeroed one,
    2 for a negated one."""
    # on the CPU: a peer's answer arrives there, a CUDA client's own evaluations stay on its device
    a, b = a.detach().float().cpu().flatten(1), b.detach().float().cpu().flatten(1)
    floor = 1e-3 * math.sqrt(a.shape[1])
    scale = torch.maximum(a.norm(dim=1), b.norm(dim=1)).clamp_min(floor)
    return (a - b).norm(dim=1) / scale


def row_tolerance(cfg: TrustConfig, t: torch.Tensor) -> torch.Tensor:
    """(B,) allowed per-row relative difference between two sources' answers at flow times ``t`` (B,):
    ``tolerance``, but ``tolerance_noise_end`` within ``NOISE_END`` of t = 1.

    There a DDPM expert's data estimate is as faint as float32 rounding: the cosine schedule's last step has
    alpha_bar = 2.4e-9, and the translator divides by 1 - t floored at 1e-4, amplifying the network's rounding
    ~1e4 times. Honest float32 answers of one expert computed with AVX2 and with AVX-512 kernels differed there
    by up to 3.0e-3 per row at guidance 7.5 (1 row in 256; 5.5e-4 at guidance 2), against at most 5e-5 from
    t = 0.99 down (``bench/check_precision.py``). A lie hidden under the looser bound moves one step by at most
    2% of its answer."""
    t = t.detach().reshape(-1).float().cpu()
    return torch.where(t >= 1 - NOISE_END, cfg.tolerance_noise_end, cfg.tolerance)


def agree(a: torch.Tensor, b: torch.Tensor, tol: float | torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` agree in every row within ``tol`` (a number, or one per row)."""
    d = relative_difference(a, b)
    return bool((d <= torch.as_tensor(tol, dtype=d.dtype, device=d.device)).all())


def arbitrate(answers: dict[str, torch.Tensor], reference: torch.Tensor | None,
              tol: float | torch.Tensor) -> tuple[set[str], set[str]]:
    """(liars, honest) among ``answers`` {source: v}. With a ``reference`` (the client's own evaluation of
    the weights), a source is honest iff it agrees with it. Without one, a strict majority of agreeing
    sources decides; no majority: nobody is named (returns two empty sets)."""
    if reference is not None:
        honest = {s for s, v in answers.items() if agree(v, reference, tol)}
        return set(answers) - honest, honest
    names = list(answers)
    for s in names:
        agreeing = {o for o in names if agree(answers[o], answers[s], tol)}
        if 2 * len(agreeing) > len(names):
            return set(names) - agreeing, agreeing
    return set(), set()


# ---------------------------------------------------------------------------------------------
# 3. suspicion


@dataclass
class Suspicion:
    """Per-peer scores that halve every ``half_life`` seconds."""

    half_life: float = 600.0
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (score, at time)

    def score(self, peer: str, now: float) -> float:
        s, at = self.scores.get(peer, (0.0, now))
        return s * 0.5 ** (max(0.0, now - at) / self.half_life)

    def add(self, peer: str, amount: float, now: float) -> float:
        s = self.score(peer, now) + amount
        self.scores[peer] = (s, now)
        return s


INVALID_ANSWER = 5.0  # suspicion added for an answer that fails check_answer
CAUGHT_LYING = 100.0  # ... for an answer that disagrees with the arbiter
DISPUTED = 1.0  # ... to both sides of a disagreement nobody could arbitrate


def check_rate(cfg: TrustConfig, verified: int) -> float:
    """Share of a peer's calls cross-checked once it has ``verified`` verified answers with this client:
    max(verify_share, new_peer_rate * rate_decay^verified). A new identity (any Sybil) starts high."""
    return max(cfg.verify_share, cfg.new_peer_rate * cfg.rate_decay ** max(verified, 0))


def should_verify(cfg: TrustConfig, rng: random.Random, first_in_trajectory: bool, suspicion: float,
                  verified: int | None = None) -> bool:
    """Cross-check this call? Every first answer of a peer in a trajectory (``verify_first``), every call of a
    suspected peer, and a random share of the rest: ``check_rate(cfg, verified)``, or ``verify_share`` when
    ``verified`` is None (``rng`` is the client's own: peers cannot predict which calls are checked)."""
    if cfg.verify_first and first_in_trajectory:
        return True
    if suspicion >= cfg.suspect_score:
        return True
    rate = cfg.verify_share if verified is None else check_rate(cfg, verified)
    return rng.random() < rate


def escape_probability(cfg: TrustConfig, lies: int, unchecked: int, verified: int = 10**6) -> float:
    """Upper bound on the probability that a peer lying in ``lies`` of its calls of one trajectory, none of them
    its first or last, is caught neither by the random checks nor by the audit. ``unchecked``: its answers used
    unchecked in the trajectory (the audit's population); ``verified``: its verified answers before the first
    lie (the check rate only falls while it tells the truth). Bound: prod_i (1 - r_i) * (1 - f)^a with r_i the
    rate at the i-th lie (no lie raises n), f = lies / unchecked, a = ``audit_samples``."""
    if lies <= 0:
        return 1.0
    miss_checks = (1.0 - check_rate(cfg, verified)) ** lies
    f = min(1.0, lies / max(unchecked, 1))
    return miss_checks * (1.0 - f) ** cfg.audit_samples


def collusion_escape(cfg: TrustConfig, checks: int, honest_share: float = 0.0) -> float:
    """Probability that ``checks`` cross-checks of a colluder's lying calls all go to its accomplice: each
    check's partner is the client's own copy with probability ``local_check_share``, else a random replica of
    the same sha256, honest with probability ``honest_share``."""
    miss = (1.0 - cfg.local_check_share) * (1.0 - honest_share)
    return miss ** max(checks, 0)

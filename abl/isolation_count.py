"""How many examples to isolate, decided from the ranking scores (issue 25).

ABL isolates a fixed share of the training set (``isolation_rate``, 1%). That share is
wrong whenever the poisoning rate is not about 1%: at 10-20% it leaves 90-95% of the
poisons in ``D_c`` (recovery learns the backdoor again), at <= 1% it must hold clean
examples, and with no attack it unlearns 1% of clean data. This module decides the count
from the scores instead: which examples stand apart, and none when nothing does.

The rules use the two observations ABL rests on (Li et al., NeurIPS 2021): poisons are
fitted far faster than clean examples (their trajectory score sits many spreads below the
rest), and an all-to-one backdoor puts every poison in one label. Per-label decisions with
the other labels as the null follow ASD's class-aware split (Gao et al., "Backdoor Defense
via Adaptively Splitting Poisoned Dataset", CVPR 2023), which selects per class because
classes are learned at different speeds; a threshold on a training-loss statistic instead of
a fixed count follows BaDLoss (Alex et al., "Protecting against simultaneous data poisoning
attacks", ICLR 2025: loss trajectories, anomalies by distance) and PIPD (Chen et al.,
"Progressive Poisoned Data Isolation for Training-time Backdoor Defense", AAAI 2024), whose
isolated set is whatever its detector flags (average TPR 99.95%, FPR 0.06% over nine
attacks on CIFAR-10). The growing (progressive) isolation of ASD and PIPD is taken in one
step only: :func:`rejected_rule` looks again after recovery, for the poisons whose labels
the recovered model rejects (ABL's ``recheck``); the isolation training stays ABL's 20
epochs.

Rules (``RULES``), all on scores where lower is more suspicious; a spread is one median
absolute deviation of all scores (unscaled, the unit of
:func:`abl.defenses.abl.isolation_evidence`):

- ``threshold``: every example more than ``spreads`` (6) below the pooled median. Labels unused.
- ``label_excess``: the same threshold, then per label a one-sided binomial test of its
  count below it against the other labels' rate (add-one smoothed), Bonferroni over the
  labels; only labels holding more than chance are isolated. A clean tail spread over the
  labels is isolated nowhere, but an easy class's tail is (classes are learned at
  different speeds: on the digits, 0 and 4 sit lowest).
- ``shifted_excess``: ``label_excess`` with each label's threshold moved by its upper
  quartile's offset from the pooled one, so that an easy class is not a backdoor.
- ``mixture`` (``CHOICE``): per label, a two-Gaussian mixture; the low component counts when
  it stands apart (Ashman's D > 1.5; 2 until 2026-12-07), its mean sits more than ``spreads`` (4) below the pooled
  median, and the label holds more examples at or below its members' highest score than
  the other labels' rate predicts (the binomial test above).

Measured (``benchmarks/isolation_count.py`` on the isolation stage of the default ABL:
20 epochs, trajectory scores; count / precision / recall; benchmarks/README.md, "Isolation
count from the data (issue 25)"), 2026-12-07, AMD EPYC CPU:

================================  ==========  ===========  ============  ==============  ============
run                               fixed 1%    threshold    label_excess  shifted_excess  mixture
================================  ==========  ===========  ============  ==============  ============
CIFAR-10 slice, no attack         50 / 0 / -  12 / 0 / -   0             0               0
CIFAR-10 slice, BadNets 10%       50/1.0/.10  294/1.0/.59  294/1.0/.59   213/1.0/.43     515/.96/.99
CIFAR-10 slice, Blend 10%         50/1.0/.10  266/1.0/.53  266/1.0/.53   179/1.0/.36     526/.92/.97
CIFAR-10 slice, BadNets 1% [#]_   50 / 0 / 0  8 / 0 / 0    0             0               0
digits, no attack (2 seeds)       13 / 0 / -  0, 0         0, 0          0, 0            0, 0
digits, BadNets 10% (seeds 0, 1)  13/1.0/.10  26; 139      26; 139       0; 99           91/.97/.65; 135/.99/.99
digits, BadNets 20% (seeds 0, 1)  13/.85-1.0  0; 260       0; 260        0; 129          0; 265/1.0/.99
digits, <= 5% or Blend/SIG        13, P<=.77  0-2          0             0-5             0
================================  ==========  ===========  ============  ==============  ============

.. [#] not learned within the 20 isolation epochs (ASR 31% after them).

``mixture`` is the only rule that takes all the BadNets poisons at 10% on CIFAR-10 (the
thresholds stop at 59%; Blend 10%: 97%, against 53%: the poisons' scores spread from 3.3 to 10.2 spreads below the
median, 5th to 95th percentile, while clean tails of other labels reach 5.9) and isolates nothing
on either clean run. Its misses, on the digits: BadNets 20% seed 0 and Blend (low modes not
far enough from the target class's clean examples, which are easy digits too), where the
fixed 1% finds poisons at up to 100% precision but 5-10% recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from abl.errors import ConfigError

#: the pooled spreads (median absolute deviations, unscaled) below the pooled median that
#: an example's score must sit to count as standing apart. Clean tails reach about 5 (the
#: lowest 1% of a clean run: separation ~5, benchmarks/README.md), learned poisons 8-14.
DEFAULT_SPREADS = 6.0
#: ``mixture``'s: the low mode's mean, not each example, must sit this far below the median.
#: Measured low modes of clean labels reach 3.0 spreads (CIFAR-10 slice), learned BadNets
#: poisons' sit at 5.2-6.2 (benchmarks/README.md, "Isolation count from the data").
MIXTURE_SPREADS = 4.0
#: ``mixture``'s separation of a label's two components (Ashman's D: their distance over
#: their pooled deviation). 2 is the textbook bar for two equal halves to be bimodal; a
#: backdoor's poisons are a minority of their label (a tenth to a third), whose component
#: is a shoulder at D 1.8 as often as a second peak: the demo's poisons at two torch
#: threads (D 1.81, 74 of 75 members poisons; 2.51 at one thread) and Blend 5% on the
#: CIFAR-10 slice (D 1.84, 145 of 160). No clean label of 21 stored runs (CIFAR-10 slice,
#: digits) had its low mode past ``MIXTURE_SPREADS`` at any D (the farthest: 3.9 spreads,
#: D 1.24), so the spreads test, not D, is what keeps clean labels out; D only asks that the
#: components be apart (benchmarks/README.md, "The second look after recovery").
MIXTURE_MIN_D = 1.5
#: family-wise significance of the per-label excess test (Bonferroni over the labels)
DEFAULT_ALPHA = 1e-3


@dataclass
class CountDecision:
    """Which examples stand apart, and the statistic behind it.

    Attributes:
        indices: the examples to isolate, most suspicious (lowest score) first.
        threshold: the score below which an example counted (nan for ``mixture``).
        below: per label, how many examples sit below the threshold (or in the low component).
        expected: per label, how many the other labels' rate predicts.
        labels: the labels that hold more than chance (the isolated examples carry these).
        reason: one line saying why (e.g. "no backdoor evidence: ...").
        rule: the rule's name.
    """

    indices: torch.Tensor
    threshold: float
    below: dict[int, int] = field(default_factory=dict)
    expected: dict[int, float] = field(default_factory=dict)
    labels: list[int] = field(default_factory=list)
    reason: str = ""
    rule: str = ""

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def evidence(self) -> bool:
        """Whether anything stands apart."""
        return self.count > 0


def _check(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.detach().float().cpu().reshape(-1)
    y = labels.detach().long().cpu().reshape(-1)
    if len(s) != len(y):
        raise ConfigError(f"isolation count: {len(s)} scores but {len(y)} labels; give one label per score")
    if len(s) < 2:
        raise ConfigError(f"isolation count: {len(s)} scores; the rule needs at least 2 examples")
    if not torch.isfinite(s).all():
        raise ConfigError("isolation count: the scores hold NaN or infinite values; the isolation training diverged")
    return s, y


def pooled_threshold(scores: torch.Tensor, spreads: float) -> float:
    """``median - spreads * MAD`` of the pooled scores (MAD unscaled, floored at 1e-6)."""
    med = scores.median()
    mad = (scores - med).abs().median().clamp_min(1e-6)
    return float(med - spreads * mad)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact; n is a label's size)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _ordered(idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return idx[torch.argsort(s[idx], stable=True)]


def threshold_rule(scores: torch.Tensor, labels: torch.Tensor, spreads: float = DEFAULT_SPREADS,
                   alpha: float = DEFAULT_ALPHA) -> CountDecision:
    """Every example more than ``spreads`` pooled deviations below the pooled median."""
    s, y = _check(scores, labels)
    t = pooled_threshold(s, spreads)
    low = (s < t).nonzero().squeeze(1)
    below = {int(c): int(n) for c, n in enumerate(torch.bincount(y[low], minlength=int(y.max()) + 1))}
    reason = (f"{len(low)} examples sit more than {spreads:g} spreads below the median" if len(low)
              else f"no backdoor evidence: no example sits more than {spreads:g} spreads below the median")
    return CountDecision(_ordered(low, s), t, below, {}, sorted(c for c, n in below.items() if n), reason, "threshold")


def _label_excess(s: torch.Tensor, y: torch.Tensor, low: torch.Tensor, t: float, alpha: float, where: str,
                  rule: str) -> CountDecision:
    """Keep the ``low`` examples of the labels holding more of them than the other labels'
    rate predicts (one-sided binomial, Bonferroni over the labels); ``where`` says in words
    what ``low`` means, for the decision's reason."""
    classes = int(y.max()) + 1
    sizes = torch.bincount(y, minlength=classes)
    counts = torch.bincount(y[low], minlength=classes)
    present = [c for c in range(classes) if sizes[c] > 0]
    below, expected, flagged = {}, {}, []
    for c in present:
        k, n = int(counts[c]), int(sizes[c])
        rate = (int(counts.sum()) - k + 1) / (int(sizes.sum()) - n + 1)
        below[c], expected[c] = k, n * rate
        if k and binomial_sf(k, n, rate) < alpha / len(present):
            flagged.append(c)
    keep = low & torch.isin(y, torch.tensor(flagged, dtype=torch.long))
    idx = _ordered(keep.nonzero().squeeze(1), s)
    if flagged:
        reason = (f"label(s) {', '.join(map(str, flagged))} hold {len(idx)} examples {where}, where the other "
                  f"labels' rate predicts {sum(expected[c] for c in flagged):.1f}")
    elif int(counts.sum()):
        reason = (f"no backdoor evidence: the {int(counts.sum())} examples {where} are spread over the labels "
                  "as chance predicts")
    else:
        reason = f"no backdoor evidence: no example sits {where}"
    return CountDecision(idx, t, below, expected, flagged, reason, rule)


def label_excess_rule(scores: torch.Tensor, labels: torch.Tensor, spreads: float = DEFAULT_SPREADS,
                      alpha: float = DEFAULT_ALPHA) -> CountDecision:
    """The pooled threshold, then only the labels holding more low examples than chance.

    For each label ``c`` with ``n_c`` examples of which ``k_c`` sit below the threshold, the
    null rate is the other labels' ``(k_rest + 1) / (n_rest + 1)`` (add-one: a rate of 0
    elsewhere does not make one example significant); ``c`` holds an excess when
    ``P(Binomial(n_c, rate) >= k_c) < alpha / labels``.
    """
    s, y = _check(scores, labels)
    t = pooled_threshold(s, spreads)
    low = s < t
    return _label_excess(s, y, low, t, alpha, f"more than {spreads:g} spreads below the median", "label_excess")


def _below_label_level(s: torch.Tensor, y: torch.Tensor, t: float, classes: int) -> torch.Tensor:
    """Which scores sit below the pooled threshold ``t`` moved, per label, by the label's
    upper quartile's offset from the pooled one (the label's level; ``shifted_excess``)."""
    q = s.quantile(0.75)
    low = torch.zeros(len(s), dtype=torch.bool)
    for c in range(classes):
        in_c = y == c
        if in_c.any():
            low[in_c] = s[in_c] < t + float(s[in_c].quantile(0.75) - q)
    return low


def shifted_excess_rule(scores: torch.Tensor, labels: torch.Tensor, spreads: float = DEFAULT_SPREADS,
                        alpha: float = DEFAULT_ALPHA) -> CountDecision:
    """``label_excess`` with each label's threshold moved by how far the label sits from the
    rest: its 75th percentile less the pooled one. Classes are learned at different speeds
    (ASD's reason to split per class), so an easy class's whole distribution, tail included,
    sits lower; a backdoor adds a separate low mode that leaves the label's upper quartile
    where its clean examples put it, as long as poisons are under 3/4 of the label (at 20%
    all-to-one poisoning of 10 balanced classes they are 2/3).
    """
    s, y = _check(scores, labels)
    t = pooled_threshold(s, spreads)
    low = _below_label_level(s, y, t, int(y.max()) + 1)
    return _label_excess(s, y, low, t, alpha, f"more than {spreads:g} spreads below their label's level",
                         "shifted_excess")


def _two_gaussians(x: torch.Tensor, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a 1-D two-component Gaussian mixture, started at the lower and upper quartiles.
    Returns (weights, means, sds, posterior of the lower component per point)."""
    x = x.double()
    mu = torch.stack([x.quantile(0.1), x.quantile(0.75)])
    sd = x.std().clamp_min(1e-3).repeat(2)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) / sd) ** 2 - sd.log() + w.log()
        r = torch.softmax(logp, dim=1)
        nk = r.sum(0).clamp_min(1e-9)
        w = nk / len(x)
        mu = (r * x[:, None]).sum(0) / nk
        sd = ((r * (x[:, None] - mu) ** 2).sum(0) / nk).sqrt().clamp_min(1e-3)
    lo = int(torch.argmin(mu))
    return w, mu, sd, r[:, lo] if lo == 0 else r[:, 1]


def mixture_rule(scores: torch.Tensor, labels: torch.Tensor, spreads: float = MIXTURE_SPREADS,
                 alpha: float = DEFAULT_ALPHA) -> CountDecision:
    """Per label, the low component of a two-Gaussian mixture of the label's scores, when it
    stands apart and the other labels do not explain it.

    A label is a candidate when its low component's mean sits more than ``spreads`` pooled
    deviations below the pooled median and the two components stand apart (Ashman's
    D > ``MIXTURE_MIN_D``, 1.5); its members are the examples more likely under the low component. A candidate
    is isolated only when it holds more examples at or below its members' highest score
    than the other labels' rate there predicts (the binomial test of ``label_excess``), so
    a clean tail spread over every label is isolated nowhere.
    """
    s, y = _check(scores, labels)
    med = s.median()
    mad = float((s - med).abs().median().clamp_min(1e-6))
    t = float(med) - spreads * mad
    sizes = torch.bincount(y)
    present = [c for c in range(len(sizes)) if sizes[c] > 0]
    picked: list[torch.Tensor] = []
    below, expected, flagged = {}, {}, []
    for c in present:
        idx = (y == c).nonzero().squeeze(1)
        if len(idx) < 8:
            continue
        w, mu, sd, post = _two_gaussians(s[idx])
        lo, hi = int(torch.argmin(mu)), int(torch.argmax(mu))
        d = math.sqrt(2) * float(mu[hi] - mu[lo]) / math.sqrt(float(sd[lo] ** 2 + sd[hi] ** 2))
        members = idx[post > 0.5]
        below[c] = len(members)
        if not (d > MIXTURE_MIN_D and float(mu[lo]) < t and len(members)):
            continue
        cut = float(s[members].max())
        others = y != c
        rate = (int((s[others] <= cut).sum()) + 1) / (int(others.sum()) + 1)
        k = int((s[idx] <= cut).sum())
        expected[c] = len(idx) * rate
        if binomial_sf(k, len(idx), rate) < alpha / len(present):
            picked.append(members)
            flagged.append(c)
    idx = _ordered(torch.cat(picked), s) if picked else torch.zeros(0, dtype=torch.long)
    if flagged:
        reason = (f"label(s) {', '.join(map(str, flagged))} split into two modes, the lower one ({len(idx)} examples) "
                  f"more than {spreads:g} spreads below the median, where the other labels' rate predicts "
                  f"{sum(expected[c] for c in flagged):.1f}")
    else:
        reason = (f"no backdoor evidence: no label's scores split into a low mode more than {spreads:g} spreads "
                  "below the median that the other labels do not share")
    return CountDecision(idx, t, below, expected, flagged, reason, "mixture")


#: rule name -> function(scores, labels, spreads, alpha)
RULES: dict[str, Callable[..., CountDecision]] = {
    "threshold": threshold_rule,
    "label_excess": label_excess_rule,
    "shifted_excess": shifted_excess_rule,
    "mixture": mixture_rule,
}

#: each rule's ``spreads`` when none is given
RULE_SPREADS: dict[str, float] = {"threshold": DEFAULT_SPREADS, "label_excess": DEFAULT_SPREADS,
                                  "shifted_excess": DEFAULT_SPREADS, "mixture": MIXTURE_SPREADS}

#: the rule ABL's ``isolation_count: auto`` uses (chosen by measurement; module docstring)
CHOICE = "mixture"


def decide_count(scores: torch.Tensor, labels: torch.Tensor, rule: str = CHOICE, spreads: float | None = None,
                 alpha: float = DEFAULT_ALPHA) -> CountDecision:
    """Which examples stand apart in ``scores`` (lower = more suspicious), per ``rule``
    (``spreads``: None for the rule's own, :data:`RULE_SPREADS`)."""
    if rule not in RULES:
        raise ConfigError(f"unknown isolation count rule '{rule}'; choose one of {', '.join(RULES)}")
    spreads = RULE_SPREADS[rule] if spreads is None else spreads
    if not spreads > 0:
        raise ConfigError(f"isolation count: spreads must be > 0, got {spreads}")
    if not 0 < alpha < 1:
        raise ConfigError(f"isolation count: alpha must be in (0, 1), got {alpha}")
    return RULES[rule](scores, labels, spreads=spreads, alpha=alpha)


#: how many pooled spreads above its label's level a recovered model's loss must sit for
#: :func:`rejected_rule` (the threshold rules' 6). Replayed on the last recovery epoch of 20
#: stored CIFAR-10 slice runs and 12 digits runs with the demo's schedule
#: (benchmarks/README.md, "The second look after recovery"), 6 took no clean label anywhere.
REJECTED_SPREADS = DEFAULT_SPREADS


def rejected_rule(losses: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor,
                  allowed: list[int] | None = None, spreads: float = REJECTED_SPREADS,
                  alpha: float = DEFAULT_ALPHA) -> CountDecision:
    """Among ``candidates`` (a mask), the examples whose label the recovered model rejects,
    in the labels where more are rejected than chance predicts.

    ``losses`` are each example's training loss at the last recovery epoch (higher = more
    rejected). A poison the isolation missed is, to a model that has not learned its trigger
    (or no longer fits it through the recovery's augmentation), an image of one class
    labelled as another: its loss sits far above its label's clean examples, and an
    all-to-one backdoor puts every such example in one label. DBD finds poisons the same
    way once training has lost the trigger's shortcut (Huang et al., "Backdoor Defense via
    Decoupling the Training Process", ICLR 2022, sec. 3.3: the high-loss samples are the
    poisoned ones). An example counts as rejected when both
    hold: its loss sits more than ``spreads`` pooled spreads above its label's level
    (``shifted_excess`` on the negated losses: a class the model learned more slowly is
    not a backdoor), and it exceeds ``log(classes)``, i.e. the model gives its label less
    than a uniform guess would (without this floor, a model that fits nearly everything
    has a spread so small that hard clean digits pass 6 spreads: 107 on the clean digits
    with the demo's schedule). Then only the labels holding more rejected examples than
    the other labels' rate predicts (one-sided binomial, Bonferroni) keep theirs, so label
    noise spread over the classes is kept nowhere. ``allowed``: when the isolation found a
    backdoor, only its labels may add examples. Returns indices into ``losses``, most
    rejected first.
    """
    loss = losses.detach().cpu().float()
    y_all = labels.detach().cpu().long()
    mask = candidates.detach().cpu().bool() & torch.isfinite(loss)
    idx = mask.nonzero().squeeze(1)
    if len(idx) < 2:
        return CountDecision(torch.zeros(0, dtype=torch.long), float("nan"), reason="no examples to check",
                             rule="rejected")
    s, y = -loss[idx], y_all[idx]
    t = pooled_threshold(s, spreads)
    classes = int(y_all.max()) + 1
    low = _below_label_level(s, y, t, classes) & (-s > math.log(classes))
    dec = _label_excess(s, y, low, t, alpha, f"more than {spreads:g} spreads above their label's loss and "
                        "given less than chance", "rejected")
    keep, labels_kept = dec.indices, dec.labels
    if allowed is not None and len(keep):
        keep = keep[torch.isin(y[keep], torch.tensor(allowed, dtype=torch.long))]
        labels_kept = [c for c in dec.labels if c in allowed]
    reason = dec.reason
    if dec.labels and not labels_kept:
        reason = (f"no backdoor evidence: label(s) {', '.join(map(str, dec.labels))} hold rejected examples, "
                  f"but the isolated set's label(s) {', '.join(map(str, allowed or []))} do not")
    return CountDecision(idx[keep], -dec.threshold, dec.below, dec.expected, labels_kept, reason, "rejected")

"""Capacity repair and improvement of a complete 0/1 assignment by deterministic local search.

A rounding commits greedily, so it can leave an expert over capacity (the fallback step of the hierarchical
rounding; Shmoys–Tardos by design) or miss a better packing. The **repair** applies, one at a time, the best of

* a move: one unit leaves one of its experts for another one;
* a swap: two units on different experts exchange them;
* an ejection chain: unit u moves p -> q (gaining objective) and a unit v on q moves q -> r to make room;

as long as it improves the key, taking the best step (steepest descent; ties broken by unit, then expert index;
on large plans chains are only searched when no move or swap improves). The final key is lexicographic:

    (total overflow beyond capacity + largest unit load, total overflow, dead experts (when m >= n), -objective)

so capacity comes first and the objective last. Going straight to it strands the search in tight, low-value
packings, so it is preceded by penalty phases that minimise ``lambda * overflow - objective`` for increasing
lambda (continuation), each a full descent. The repaired assignment is never worse than the input under that key.

Minimising *total* overflow gives up objective where no capacity-feasible mapping exists, and a descent stops
at local optima. The **improvement pass** (:func:`improve_assignment`) then gives every expert the ceiling
capacity + the repaired assignment's largest overflow (0 when it is feasible) and maximises the objective within
the ceilings (key: overflow above the ceilings, dead experts, -objective) by the same steps, plus kicks on
small plans: force a unit onto an expert it prefers, re-pack the others around it, keep the result only if the
key improves. So a feasible repair stays feasible, the worst overflow and the dead experts never grow, and the
objective never drops (unless a dead expert is revived); total overflow may grow below the ceiling.

Every unit keeps exactly k_u distinct experts throughout, so the result is always a complete mapping.
"""
from __future__ import annotations

import logging

import numpy as np

from gem_d2.planner.problem import PlanProblem

__all__ = ["repair_assignment", "improve_assignment", "assignment_key"]

logger = logging.getLogger(__name__)

_CHUNK = 4_000_000  # elements per chunk of a vectorised search (bounds memory to ~100 MB per array)
_CHAIN_FIRST_PER_EXPERT = 64  # value-gaining first moves tried per target expert in the chain search
_JOINT_CHAIN_MAX = 100_000  # items x experts up to which chains are searched at every step
# Penalty phases before the lexicographic one, in units of (mean best gain per unit / mean load). Measured on the
# random benchmark instances: going straight to the lexicographic key strands the search in low-value packings.
PENALTY_SCHEDULE = (1.0, 4.0, 16.0)
# Kicks tried by the improvement pass on small plans (items x experts <= _KICK_MAX). On the 250 random benchmark
# instances (m < 16, n < 9) a plan used 6 kicks on average and 7 plans used all 24. At 1203 x 64 a kick costs
# ~0.2 s (two full descents) and 24 of them found no improvement there, hence no kicks on large plans.
KICK_BUDGET = 24
_KICK_MAX = 10_000


def assignment_key(p: PlanProblem, assign: np.ndarray) -> tuple:
    """The repair pass's lexicographic key of a 0/1 assignment (smaller is better)."""
    load = p.expert_loads(assign)
    bound = p.capacities + float(p.loads.max())
    hard = float(np.clip(load - bound - p.capacity_tol, 0, None).sum())
    over = float(p.overflow(assign).sum())
    dead = int((assign.sum(axis=0) == 0).sum()) if p.no_dead else 0
    return hard, over, dead, -p.value(assign)


class _State:
    def __init__(self, p: PlanProblem, assign: np.ndarray, lam=None, cap=None, frozen=None):
        self.p = p
        self.lam = lam
        self.assign = assign.astype(bool).copy()
        self.gain = p.gain
        self.cap = p.capacities if cap is None else np.asarray(cap, dtype=np.float64)
        self.bound = np.maximum(p.capacities + float(p.loads.max()), self.cap)
        self.frozen = np.zeros(p.m, dtype=bool) if frozen is None else frozen
        self.tol = p.capacity_tol
        self.vtol = 1e-9 * max(1.0, float(np.abs(self.gain).max()))
        self.refresh()

    def refresh(self) -> None:
        self.load = self.p.loads @ self.assign
        self.count = self.assign.sum(axis=0)
        self.iu, self.ip = np.nonzero(self.assign)  # items: (unit, expert) pairs, unit-major
        self.item_gain = self.gain[self.iu, self.ip]

    def f(self, loads, which: str):
        """Overflow of loads (same shape as the expert index broadcast ``which`` picks) above cap or bound."""
        d = loads - which
        return np.where(d > self.tol, d, 0.0)

    def delta(self, new_load, old_load, experts):
        """(hard, over) change of the experts' terms when their load goes from old to new."""
        b, c = self.bound[experts], self.cap[experts]
        return (self.f(new_load, b) - self.f(old_load, b), self.f(new_load, c) - self.f(old_load, c))


def _quant(d, tol):
    return np.where(np.abs(d) <= tol, 0.0, d)


def _improving(dh, do, dd, dv):
    return (dh < 0) | ((dh == 0) & ((do < 0) | ((do == 0) & ((dd < 0) | ((dd == 0) & (dv > 0))))))


def _pick(st, dh, do, dd, dv, valid, index_keys):
    """Index (into the flattened arrays) of the lexicographically best improving candidate, or None."""
    if st.lam is not None:
        do, dv = _quant(st.lam * do - dv, st.vtol), np.zeros_like(dv)
    dh, do, dv = dh.ravel(), do.ravel(), dv.ravel()
    dd = np.broadcast_to(dd, valid.shape).ravel()
    ok = np.flatnonzero(valid.ravel() & _improving(dh, do, dd, dv))
    if ok.size == 0:
        return None
    keys = tuple(np.broadcast_to(k, valid.shape).ravel()[ok] for k in reversed(index_keys))
    order = np.lexsort(keys + (-dv[ok], dd[ok], do[ok], dh[ok]))
    best = ok[order[0]]
    return best, (dh[best], do[best], dd[best], -dv[best])


def _best_move(st: _State):
    p, iu, ip = st.p, st.iu, st.ip
    s = p.loads[iu][:, None]
    experts = np.arange(p.n)[None, :]
    dh_p, do_p = st.delta(st.load[ip][:, None] - s, st.load[ip][:, None], ip[:, None])
    dh_q, do_q = st.delta(st.load[None, :] + s, st.load[None, :], experts)
    dh, do = _quant(dh_p + dh_q, st.tol), _quant(do_p + do_q, st.tol)
    dd = np.zeros((1, 1))
    if p.no_dead:
        dd = (st.count[ip] == 1)[:, None].astype(np.float64) - (st.count == 0)[None, :].astype(np.float64)
    dv = _quant(st.gain[iu, :] - st.item_gain[:, None], st.vtol)
    valid = ~st.assign[iu, :] & ~st.frozen[iu][:, None]
    got = _pick(st, dh, do, dd, dv, valid, (iu[:, None], experts))
    if got is None:
        return None
    flat, key = got
    i, q = divmod(int(flat), p.n)
    return key, ("move", int(iu[i]), int(ip[i]), q)


def _best_swap(st: _State):
    p, iu, ip = st.p, st.iu, st.ip
    num = iu.shape[0]
    over = st.load > st.cap + st.tol
    unhappy = (st.gain[iu, :] > st.item_gain[:, None] + st.vtol).any(axis=1)
    # An improving swap sheds load from an overflowing expert or gains objective for one of its units,
    # so one of its two items is in `rows`; the other ranges over all items.
    rows = np.flatnonzero(unhappy | over[ip])
    if rows.size == 0:
        return None
    s = p.loads[iu]
    best = None
    step = max(1, _CHUNK // max(1, num))
    for start in range(0, rows.size, step):
        a = rows[start:start + step]
        u, pp = iu[a][:, None], ip[a][:, None]
        v, qq = iu[None, :], ip[None, :]
        ds = s[a][:, None] - s[None, :]  # load moving from pp to qq
        dh_p, do_p = st.delta(st.load[pp] - ds, st.load[pp], pp)
        dh_q, do_q = st.delta(st.load[qq] + ds, st.load[qq], qq)
        dh, do = _quant(dh_p + dh_q, st.tol), _quant(do_p + do_q, st.tol)
        dv = _quant(st.gain[u, qq] - st.item_gain[a][:, None] + st.gain[v, pp] - st.item_gain[None, :], st.vtol)
        valid = (pp != qq) & (u != v) & ~st.assign[u, qq] & ~st.assign[v, pp] & ~st.frozen[u] & ~st.frozen[v]
        got = _pick(st, dh, do, np.zeros((1, 1)), dv, valid,
                    (np.minimum(u, v), np.maximum(u, v), np.minimum(pp, qq), np.maximum(pp, qq)))
        if got is None:
            continue
        flat, key = got
        r, c = divmod(int(flat), num)
        cand = (key, ("swap", int(iu[a[r]]), int(ip[a[r]]), int(iu[c]), int(ip[c])))
        if best is None or cand[0] < best[0]:
            best = cand
    return best


def _best_chain(st: _State):
    p, iu, ip = st.p, st.iu, st.ip
    experts = np.arange(p.n)
    best = None
    for q in range(p.n):
        second = np.flatnonzero((ip == q) & ~st.frozen[iu])  # items v on q that could make room
        dv1 = st.gain[iu, q] - st.item_gain
        first = np.flatnonzero((dv1 > st.vtol) & ~st.assign[iu, q] & ~st.frozen[iu])
        if second.size == 0 or first.size == 0:
            continue
        first = first[np.lexsort((first, -dv1[first]))[:_CHAIN_FIRST_PER_EXPERT]]
        u, src = iu[first], ip[first]  # (F,)
        v = iu[second]  # (V,)
        su, sv = p.loads[u], p.loads[v]
        # Expert q: gains u, loses v.  (F, V)
        lq_new = st.load[q] + su[:, None] - sv[None, :]
        dh_q, do_q = st.delta(lq_new, np.full_like(lq_new, st.load[q]), np.full(lq_new.shape, q))
        # Expert src (p): loses u, and gains v when r == p.  (F, 1, 1) for r != p; (F, V) for r == p.
        dh_p, do_p = st.delta(st.load[src] - su, st.load[src], src)
        dh_pr, do_pr = st.delta(st.load[src][:, None] - su[:, None] + sv[None, :], st.load[src][:, None], src[:, None])
        # Expert r (r != p, q): gains v.  (V, n)
        dh_r, do_r = st.delta(st.load[None, :] + sv[:, None], st.load[None, :], experts[None, :])
        is_p = experts[None, None, :] == src[:, None, None]  # (F, 1, n)
        dh = np.where(is_p, dh_pr[:, :, None], dh_p[:, None, None] + dh_r[None]) + dh_q[:, :, None]
        do = np.where(is_p, do_pr[:, :, None], do_p[:, None, None] + do_r[None]) + do_q[:, :, None]
        dv = dv1[first][:, None, None] + st.gain[v, :][None] - st.gain[v, q][None, :, None]
        if p.no_dead:
            c_p = st.count[src][:, None, None]
            dead_p = ((c_p - 1 + is_p) == 0).astype(np.float64)
            dead_r = np.where(is_p, 0.0, -(st.count == 0)[None, None, :].astype(np.float64))
            dd = dead_p + dead_r
        else:
            dd = np.zeros((1, 1, 1))
        valid = (experts[None, None, :] != q) & ~st.assign[v, :][None]
        valid = np.broadcast_to(valid, dh.shape)
        got = _pick(st, _quant(dh, st.tol), _quant(do, st.tol), dd, _quant(dv, st.vtol), valid,
                    (u[:, None, None], v[None, :, None], experts[None, None, :]))
        if got is None:
            continue
        flat, key = got
        f, rest = divmod(int(flat), second.size * p.n)
        b, r = divmod(rest, p.n)
        cand = (key, ("chain", int(u[f]), int(src[f]), q, int(v[b]), r))
        if best is None or cand[0] < best[0]:
            best = cand
    return best


def _apply(st: _State, step) -> None:
    kind = step[0]
    if kind == "move":
        _, u, src, dst = step
        st.assign[u, src], st.assign[u, dst] = False, True
    elif kind == "swap":
        _, u, pu, v, pv = step
        st.assign[u, pu], st.assign[u, pv] = False, True
        st.assign[v, pv], st.assign[v, pu] = False, True
    else:
        _, u, src, q, v, r = step
        st.assign[u, src], st.assign[u, q] = False, True
        st.assign[v, q], st.assign[v, r] = False, True
    st.refresh()


def _descend(st: _State, limit: int, joint_chains: bool, what: str) -> None:
    """Steepest descent on ``st``'s key until no move, swap or chain improves it (or ``limit`` steps)."""
    for _ in range(limit):
        steps = [c for c in (_best_move(st), _best_swap(st)) if c is not None]
        if joint_chains or not steps:
            chain = _best_chain(st)
            steps += [chain] if chain is not None else []
            if not steps:
                return
        _apply(st, min(steps, key=lambda c: c[0])[1])
    logger.warning("%s stopped after %d steps (cap) on a %dx%d plan", what, limit, st.p.m, st.p.n)


def _check_assign(p: PlanProblem, assign) -> np.ndarray:
    a = np.asarray(assign)
    if a.shape != (p.m, p.n) or not np.array_equal(a.sum(axis=1), p.k):
        raise ValueError(f"assign must be an ({p.m}, {p.n}) 0/1 matrix whose rows sum to k")
    return a


def repair_assignment(p: PlanProblem, assign: np.ndarray, max_steps: int = 0, improve: bool = True) -> np.ndarray:
    """Repair a complete 0/1 assignment by moves, swaps and ejection chains, then improve it (module docstring).

    Args:
        p: the problem.
        assign: (m, n) 0/1 matrix with row sums equal to ``p.k``.
        max_steps: cap on accepted steps per descent (0 = ``20 * (m + n)``); each step strictly improves the key,
            so the search always ends; the cap only bounds time on pathological inputs.
        improve: run :func:`improve_assignment` on the repaired assignment (default). Without it the result has
            :func:`assignment_key` no larger than the input's.
    Returns:
        (m, n) float64 0/1 matrix, same row sums. With ``improve``: no expert's overflow above the largest one
        of the repaired assignment, no more dead experts, objective no lower unless a dead expert was revived.
    """
    a = _check_assign(p, assign)
    limit = max_steps or 20 * (p.m + p.n)
    # Chains compete with moves and swaps at every step on small plans (measurably better packings); on large
    # ones they are searched only when nothing else improves, as they dominate the cost.
    joint_chains = int(p.k.sum()) * p.n <= _JOINT_CHAIN_MAX
    scale = float(p.gain.max(axis=1).mean() / p.loads.mean())
    cur = a.astype(bool)
    for lam in list(PENALTY_SCHEDULE) + [None]:
        st = _State(p, cur, None if lam is None else lam * scale)
        _descend(st, limit, joint_chains, "repair phase")
        cur = st.assign
    if assignment_key(p, cur) > assignment_key(p, a):
        cur = a.astype(bool)
    if improve:
        return improve_assignment(p, cur, max_steps=max_steps)
    return cur.astype(np.float64)


def _improve_key(st: _State) -> tuple:
    """The improvement pass's key of ``st`` (the quantities its steps compare), objective rounded to ``vtol``."""
    hard = float(st.f(st.load, st.bound).sum())
    over = float(st.f(st.load, st.cap).sum())
    dead = int((st.count == 0).sum()) if st.p.no_dead else 0
    return hard, over, dead, -st.p.value(st.assign)


def _key_better(new: tuple, old: tuple, st: _State) -> bool:
    """Whether key ``new`` is smaller than ``old`` beyond float noise (``st.tol`` on loads, ``st.vtol`` on value)."""
    for i in (0, 1):
        if abs(new[i] - old[i]) > st.tol:
            return new[i] < old[i]
    if new[2] != old[2]:
        return new[2] < old[2]
    return new[3] < old[3] - st.vtol


def improve_assignment(p: PlanProblem, assign: np.ndarray, tolerance=None, max_steps: int = 0,
                       kicks=None) -> np.ndarray:
    """Raise the objective of a complete 0/1 assignment without raising its worst overflow.

    Every expert j gets the ceiling ``C_j + tolerance``, ``tolerance`` being by default the largest overflow of
    the input (0 when it is within capacity): a capacity-feasible assignment stays feasible, and one the repair
    could not bring within capacity keeps its worst overflow while experts below it may fill up to the same
    level (with experts on separate devices the most loaded one sets the step time, so filling the others up to
    it costs no throughput). Within the ceilings it
    maximises the objective: steepest descent on (overflow above the ceilings, dead experts (when m >= n),
    -objective) with moves, swaps and ejection chains, then kicks: the unit-expert pair with the largest gain
    is forced (the unit moves to an expert it prefers), the others re-packed around it by the same descent with
    that unit held, then a free descent; the result is kept only if it beats the current key, and the kicks
    restart from the largest gain. ``kicks`` bounds the kicks tried (None = ``KICK_BUDGET`` on plans with
    items x experts <= 10,000, 0 on larger ones).

    Args:
        p: the problem.
        assign: (m, n) 0/1 matrix with row sums equal to ``p.k``.
        tolerance: allowed load above each capacity (None = the input's largest overflow).
        max_steps: cap on accepted steps per descent (0 = ``20 * (m + n)``).
        kicks: cap on kicks tried (None = default, see above).
    Returns:
        (m, n) float64 0/1 matrix, same row sums, whose key (above) is no larger than the input's: within the
        ceilings if the input was, no more dead experts, and no lower objective unless the overflow above the
        ceilings or the number of dead experts decreased.
    """
    a = _check_assign(p, assign).astype(bool)
    if tolerance is None:
        tolerance = float(p.overflow(a.astype(np.float64)).max())
    ceiling = p.capacities + float(tolerance)
    limit = max_steps or 20 * (p.m + p.n)
    joint_chains = int(p.k.sum()) * p.n <= _JOINT_CHAIN_MAX
    budget = (KICK_BUDGET if int(p.k.sum()) * p.n <= _KICK_MAX else 0) if kicks is None else int(kicks)
    start = _State(p, a, cap=ceiling)
    st = _State(p, a, cap=ceiling)
    _descend(st, limit, joint_chains, "improvement pass")
    best, best_key = st, _improve_key(st)
    while budget > 0:
        # Candidate kicks: (unit, its expert, an expert it prefers), largest gain first (ties: unit, expert).
        dv = best.gain[best.iu, :] - best.item_gain[:, None]
        item, dst = np.nonzero((dv > best.vtol) & ~best.assign[best.iu, :])
        order = np.lexsort((dst, best.iu[item], -dv[item, dst]))
        improved = False
        for c in order[:budget]:
            budget -= 1
            u, src, q = int(best.iu[item[c]]), int(best.ip[item[c]]), int(dst[c])
            trial = best.assign.copy()
            trial[u, src], trial[u, q] = False, True
            held = np.zeros(p.m, dtype=bool)
            held[u] = True
            kicked = _State(p, trial, cap=ceiling, frozen=held)
            _descend(kicked, limit, joint_chains, "improvement kick")
            st = _State(p, kicked.assign, cap=ceiling)
            _descend(st, limit, joint_chains, "improvement kick")
            key = _improve_key(st)
            if _key_better(key, best_key, st):
                best, best_key, improved = st, key, True
                break
        if not improved:
            break
    if _key_better(_improve_key(start), best_key, start):  # cannot happen (every step improves); kept as a guard
        return a.astype(np.float64)
    return best.assign.astype(np.float64)

"""Capacity repair and improvement of a complete 0/1 assignment by deterministic local search.

A rounding commits greedily, so it can leave an expert over capacity (the fallback step of the hierarchical
rounding; Shmoys–Tardos by design) or miss a better packing. This pass applies, one at a time, the best of

* a move: one unit leaves one of its experts for another one;
* a swap: two units on different experts exchange them;
* an ejection chain: unit u moves p -> q (gaining objective) and a unit v on q moves q -> r to make room;

as long as it improves the key, taking the best step (steepest descent; ties broken by unit, then expert index;
on large plans chains are only searched when no move or swap improves). The final key is lexicographic:

    (total overflow beyond capacity + largest unit load, total overflow, dead experts (when m >= n), -objective)

so capacity comes first and the objective last. Going straight to it strands the search in tight, low-value
packings, so it is preceded by penalty phases that minimise ``lambda * overflow - objective`` for increasing
lambda (continuation), each a full descent. Every unit keeps exactly k_u distinct experts throughout, so the
result is always a complete mapping; it is never worse than the input under the final key.
"""
from __future__ import annotations

import logging

import numpy as np

from .problem import PlanProblem

__all__ = ["repair_assignment", "assignment_key"]

logger = logging.getLogger(__name__)

_CHUNK = 4_000_000  # elements per chunk of a vectorised search (bounds memory to ~100 MB per array)
_CHAIN_FIRST_PER_EXPERT = 64  # value-gaining first moves tried per target expert in the chain search
_JOINT_CHAIN_MAX = 100_000  # items x experts up to which chains are searched at every step
# Penalty phases before the lexicographic one, in units of (mean best gain per unit / mean load). Measured on the
# random benchmark instances: going straight to the lexicographic key strands the search in low-value packings.
PENALTY_SCHEDULE = (1.0, 4.0, 16.0)


def assignment_key(p: PlanProblem, assign: np.ndarray) -> tuple:
    """The repair pass's lexicographic key of a 0/1 assignment (smaller is better)."""
    load = p.expert_loads(assign)
    bound = p.capacities + float(p.loads.max())
    hard = float(np.clip(load - bound - p.capacity_tol, 0, None).sum())
    over = float(p.overflow(assign).sum())
    dead = int((assign.sum(axis=0) == 0).sum()) if p.no_dead else 0
    return hard, over, dead, -p.value(assign)


class _State:
    def __init__(self, p: PlanProblem, assign: np.ndarray, lam=None):
        self.p = p
        self.lam = lam
        self.assign = assign.astype(bool).copy()
        self.gain = p.gain
        self.cap = p.capacities
        self.bound = p.capacities + float(p.loads.max())
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
    valid = ~st.assign[iu, :]
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
        valid = (pp != qq) & (u != v) & ~st.assign[u, qq] & ~st.assign[v, pp]
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
        second = np.flatnonzero(ip == q)  # items v on q that could make room
        dv1 = st.gain[iu, q] - st.item_gain
        first = np.flatnonzero((dv1 > st.vtol) & ~st.assign[iu, q])
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


def repair_assignment(p: PlanProblem, assign: np.ndarray, max_steps: int = 0) -> np.ndarray:
    """Improve a complete 0/1 assignment by moves, swaps and ejection chains (see module docstring).

    Args:
        p: the problem.
        assign: (m, n) 0/1 matrix with row sums equal to ``p.k``.
        max_steps: cap on accepted steps (0 = ``20 * (m + n)``); each step strictly improves the key, so the
            search always ends; the cap only bounds time on pathological inputs.
    Returns:
        (m, n) float64 0/1 matrix, same row sums, with :func:`assignment_key` no larger than the input's.
    """
    a = np.asarray(assign)
    if a.shape != (p.m, p.n) or not np.array_equal(a.sum(axis=1), p.k):
        raise ValueError(f"assign must be an ({p.m}, {p.n}) 0/1 matrix whose rows sum to k")
    limit = max_steps or 20 * (p.m + p.n)
    # Chains compete with moves and swaps at every step on small plans (measurably better packings); on large
    # ones they are searched only when nothing else improves, as they dominate the cost.
    joint_chains = int(p.k.sum()) * p.n <= _JOINT_CHAIN_MAX
    scale = float(p.gain.max(axis=1).mean() / p.loads.mean())
    cur = a.astype(bool)
    for lam in list(PENALTY_SCHEDULE) + [None]:
        st = _State(p, cur, None if lam is None else lam * scale)
        for _ in range(limit):
            steps = [c for c in (_best_move(st), _best_swap(st)) if c is not None]
            if joint_chains or not steps:
                chain = _best_chain(st)
                steps += [chain] if chain is not None else []
                if not steps:
                    break
            step = min(steps, key=lambda c: c[0])
            _apply(st, step[1])
        else:
            logger.warning("repair phase stopped after %d steps (cap) on a %dx%d plan", limit, p.m, p.n)
        cur = st.assign
    if assignment_key(p, cur) > assignment_key(p, a):
        return a.astype(np.float64)
    return cur.astype(np.float64)

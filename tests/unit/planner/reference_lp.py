"""The planner's LP (docs/design/planner.md) written out densely from its definitions and solved by scipy's HiGHS:
the independent reference the planner's LP and its affinity-minimising ablation are checked against."""
import numpy as np
from scipy.optimize import linprog


def reference_lp(w, s, k, slack, beta, maximize=True):
    """max (or min) sum_uj a_u w_uj x_uj s.t. sum_j x_uj = k, sum_u s_u x_uj <= C_j, (m >= n) sum_u x_uj >= 1,
    0 <= x <= 1. ``w`` (m, n) affinity, ``s`` (m,) unit loads. Returns (scipy status, optimal value or None)."""
    m, n = w.shape
    a = s ** (-beta)
    a = a * m / a.sum()
    cap = (1 + slack) * np.sum(s * k) / n
    a_eq = np.zeros((m, m * n))
    for u in range(m):
        a_eq[u, u * n:(u + 1) * n] = 1.0
    rows, rhs = [], []
    for j in range(n):
        row = np.zeros(m * n)
        row[j::n] = s
        rows.append(row)
        rhs.append(cap)
    if m >= n:
        for j in range(n):
            row = np.zeros(m * n)
            row[j::n] = -1.0
            rows.append(row)
            rhs.append(-1.0)
    sign = -1.0 if maximize else 1.0
    res = linprog(sign * (a[:, None] * w).ravel(), A_ub=np.array(rows), b_ub=np.array(rhs), A_eq=a_eq,
                  b_eq=np.full(m, float(k)), bounds=(0, 1), method="highs")
    return res.status, (sign * res.fun if res.status == 0 else None)

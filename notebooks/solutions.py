"""Reference answers to the notebooks' exercises, for instructors and the tests' solved runs.

The notebooks ship as the students' version: each exercise line calls lab.your_turn(n, SOLUTIONS,
**values), which raises "your turn" until the student replaces the line with their own formula.
With SOLUTIONS = True (the parameters cell reads DDPM_MINI_SOLUTIONS=1) lab.your_turn returns
ANSWERS[n](**values) instead, so the self-check under the line runs green. An instructor may leave
this file out of the copy handed to students: only the solved runs import it.
"""

# Notebook 01 (01_parameterizations.ipynb). alpha, sigma: the schedule at t; sqrt(SNR) = alpha / sigma.
ANSWERS = {
    # 1: x0 from a velocity output u = alpha eps - sigma x0, with x_t = alpha x0 + sigma eps
    1: lambda alpha, sigma, x_t, u: alpha * x_t - sigma * u,
    # 2: flow's weight on the x0 error at t = T-1, w = (1 + sqrt(SNR))^2
    2: lambda a_end, s_end: (1 + a_end / s_end) ** 2,
    # 3: how much noise prediction amplifies an eps error into x0 at t = T-1: sigma / alpha
    3: lambda a_end, s_end: s_end / a_end,
    # 4: eps_hat recomputed from the clipped x0_hat: x_t = alpha x0_hat + sigma eps_hat
    4: lambda a, s, x_end, x0_clipped: (x_end - a * x0_clipped) / s,
}

"""Comparisons of trainer network states (``trainer.network_states()``) shared by the trainer tests."""
from __future__ import annotations


def assert_states_close(a: dict, b: dict, tol: float, dead=frozenset(), start: dict | None = None,
                        storage_floor: float = 0.0) -> None:
    """``a`` within ``tol`` of ``b``, norm-wise per tensor; with ``start``, the updates (a - start vs
    b - start) are compared. ``storage_floor``: also allow that fraction of ``b``'s norm (fp32 storage
    rounding, where the updates are small against the weights).

    ``dead``: generator biases an instance norm cancels (their gradient is rounding noise, which
    Adam turns into steps of up to lr; see council_fast.parity).
    """
    for d in b:
        for kind in b[d]:
            for i, (sa, sb) in enumerate(zip(a[d][kind], b[d][kind])):
                for k, t in sb.items():
                    if (kind == "gen" and k in dead) or not t.is_floating_point():
                        continue
                    x, y = sa[k], t
                    if start is not None:
                        x, y = x - start[d][kind][i][k], y - start[d][kind][i][k]
                    err = (x - y).norm().item()
                    bound = tol * y.norm().item() + storage_floor * t.norm().item()
                    if bound > 0:
                        assert err < bound, (d, kind, i, k, err, bound)
                    else:
                        assert err == 0, (d, kind, i, k)

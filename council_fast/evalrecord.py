"""What a training run remembers of its evaluations: the latest FID/KID per member and each member's
best iteration (lowest FID). Saved in the full-state checkpoint under ``"eval"`` (plain ints, floats
and dicts: loads with weights_only=True); ``convert --member best`` reads it."""
from __future__ import annotations

import math
from typing import Mapping

__all__ = ["EvalRecord", "EVAL_STATE_KEY"]

EVAL_STATE_KEY = "eval"


class EvalRecord:
    def __init__(self):
        self.latest: dict | None = None  # {"iteration": n, "fid": {member: v}, "kid": {member: v}}
        self.best: dict[int, dict] = {}  # member -> {"iteration": n, "fid": v}

    def update(self, iteration: int, fid: Mapping[int, float], kid: Mapping[int, float] | None = None) -> None:
        self.latest = {"iteration": int(iteration), "fid": {int(k): float(v) for k, v in fid.items()},
                       "kid": {int(k): float(v) for k, v in (kid or {}).items()}}
        for member, value in self.latest["fid"].items():
            best = self.best.get(member)
            if math.isfinite(value) and (best is None or value < best["fid"]):
                self.best[member] = {"iteration": int(iteration), "fid": value}

    def best_member(self) -> int | None:
        """The member with the lowest FID at the latest evaluation (None before any evaluation)."""
        if not self.latest or not self.latest["fid"]:
            return None
        finite = {k: v for k, v in self.latest["fid"].items() if math.isfinite(v)}
        return min(finite, key=lambda k: (finite[k], k)) if finite else None

    def state(self) -> dict:
        return {"latest": self.latest, "best": {k: dict(v) for k, v in self.best.items()}}

    @classmethod
    def from_state(cls, state: Mapping | None) -> "EvalRecord":
        record = cls()
        if state:
            latest = state.get("latest")
            if latest:
                record.latest = {"iteration": int(latest["iteration"]),
                                 "fid": {int(k): float(v) for k, v in latest["fid"].items()},
                                 "kid": {int(k): float(v) for k, v in latest.get("kid", {}).items()}}
            record.best = {int(k): {"iteration": int(v["iteration"]), "fid": float(v["fid"])}
                           for k, v in (state.get("best") or {}).items()}
        return record

"""Ray dashboard / Prometheus metrics for a running job, through `ray.util.metrics`.

Every step record the driver logs is mirrored here: gauges for rates, versions and gate statistics (tag `role`),
counters for tokens and quarantined rows, and a histogram of gate weights. Ray's metrics agent exports them on each
node's Prometheus endpoint (names get the `ray_` prefix there), so they show up on the Ray dashboard's Metrics tab and
in the Grafana dashboard shipped in deploy/. Knows nothing about training; a no-op when disabled or outside Ray.
"""

from __future__ import annotations

from typing import Any

# metric name -> (record key, role tag, description)
GAUGES: dict[str, tuple[str, str, str]] = {
    "vzero_rollout_tokens_per_s": ("rollout/tokens_per_s", "sampler", "Student rollout tokens per second"),
    "vzero_teacher_tokens_per_s": ("teacher/tokens_per_s", "gating", "Teacher replay tokens per second (both views)"),
    "vzero_teacher_queue_seconds": ("teacher/queue_seconds", "gating", "Time a batch waited before teacher replay"),
    "vzero_learner_tokens_per_s": ("learner/tokens_per_s", "learner", "Learner response tokens per second"),
    "vzero_loss": ("loss", "learner", "Gated distillation loss"),
    "vzero_gate_weight_mean": ("gate/weight_mean", "gating", "Mean evidence-gate weight"),
    "vzero_gate_frac_delta_pos": ("gate/frac_delta_pos", "gating", "Fraction of tokens with lp_pos > lp_neg"),
    "vzero_gate_frac_at_w_min": ("gate/frac_at_w_min", "gating", "Fraction of weights at w_min"),
    "vzero_weight_push_seconds": ("weight_push/seconds", "learner", "Seconds to push weights to all samplers"),
    "vzero_weight_push_gb_per_s": ("weight_push/gb_per_s", "learner", "Weight push throughput (GB/s)"),
    "vzero_policy_version": ("policy_version", "learner", "Learner policy version"),
    "vzero_staleness": ("staleness", "driver", "Policy versions between sampling and training"),
    "vzero_step": ("step", "driver", "Completed training steps"),
}
COUNTERS: dict[str, tuple[str, str, str]] = {
    "vzero_rollout_tokens": ("rollout/tokens", "sampler", "Student tokens sampled"),
    "vzero_teacher_tokens": ("teacher/tokens", "gating", "Response tokens replayed by the teacher (per view)"),
}
QUARANTINE = "vzero_quarantined_rows"
WEIGHT_HIST = "vzero_gate_weight"
WEIGHT_BOUNDARIES = [0.01, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 1.75, 2.0]


class Telemetry:
    def __init__(self, enabled: bool = True):
        self.enabled = False
        if not enabled:
            return
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram
        except ImportError:
            return
        if not ray.is_initialized():
            return
        self.enabled = True
        self._gauges = {n: Gauge(n, description=d, tag_keys=("role",)) for n, (_, _, d) in GAUGES.items()}
        self._counters = {n: Counter(n, description=d, tag_keys=("role",)) for n, (_, _, d) in COUNTERS.items()}
        self._quarantine = Counter(QUARANTINE, description="Training rows quarantined", tag_keys=("role",))
        self._hist = Histogram(
            WEIGHT_HIST, description="Evidence-gate weights", boundaries=WEIGHT_BOUNDARIES, tag_keys=("role",)
        )
        self._last_quarantined = 0.0

    def record(self, record: dict[str, Any], weights: list[float] | None = None) -> None:
        if not self.enabled:
            return
        for name, (key, role, _) in GAUGES.items():
            if isinstance(record.get(key), (int, float)):
                self._gauges[name].set(float(record[key]), tags={"role": role})
        for name, (key, role, _) in COUNTERS.items():
            if isinstance(record.get(key), (int, float)) and record[key] > 0:
                self._counters[name].inc(float(record[key]), tags={"role": role})
        q = float(record.get("data/quarantined", 0.0))
        if q > self._last_quarantined:
            self._quarantine.inc(q - self._last_quarantined, tags={"role": "driver"})
            self._last_quarantined = q
        for w in weights or []:
            self._hist.observe(float(w), tags={"role": "gating"})

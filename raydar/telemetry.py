"""Custom metrics of raydar's jobs and endpoint, exported through Ray to Prometheus and the dashboard.

Ray's metrics agent on each node serves them on its metrics export port (`ray start
--metrics-export-port 8080`), with Ray's `ray_` prefix: `ray_raydar_teacher_requests_total`,
`ray_raydar_label_images_total{outcome="cached"}`, ... The dashboard's Metrics view and Grafana read
them from the Prometheus that scrapes those ports. Counters are cumulative per process; a gauge is
kept only while its process keeps setting it.

Create the recorder where the work happens (inside the actor or replica, not in a driver that
pickles it away): `LabelMetrics(spec.name)` in a labelling actor, `ServingMetrics(spec.name)` in a
Serve replica. Recording without a running Ray does nothing, so library code and unit tests can
call it freely.

| metric | type | tags | recorded by |
| --- | --- | --- | --- |
| raydar_teacher_requests | counter | dataset, model | label job: requests sent to the teacher (retries included) |
| raydar_teacher_latency_seconds | histogram | dataset | label job: time to a final answer per image |
| raydar_label_images | counter | dataset, outcome (ok, failed, cached, gave_up) | label job: images done |
| raydar_label_cache_hits | counter | dataset | label job: images answered from the label cache |
| raydar_label_failures | counter | dataset, reason | label job: images that failed this run, by reason |
| raydar_label_images_per_second | gauge | dataset | label job driver: images done / seconds since start |
| raydar_detections_served | counter | dataset, member | endpoint: images answered, per member and `fused` |
| raydar_detection_errors | counter | dataset, member | endpoint: member failures |
| raydar_member_disagreement | histogram | dataset | endpoint: 1 - agreement of the members on one image |
| raydar_detection_latency_seconds | histogram | dataset | endpoint: request latency |

In Prometheus, images/s over a window is `rate(ray_raydar_label_images_total[1m])`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
FRACTION_BOUNDARIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


class LabelMetrics:
    """What a labelling actor and the label job's driver record for one dataset."""

    def __init__(self, dataset: str, model: str = "") -> None:
        self.tags = {"dataset": dataset}
        self.model = model
        self.requests = Counter("raydar_teacher_requests", tag_keys=("dataset", "model"),
                                description="Requests sent to the teacher, retries included.")
        self.latency = Histogram("raydar_teacher_latency_seconds", description="Seconds to a final teacher answer "
                                 "per image, retries included.", boundaries=LATENCY_BOUNDARIES_S, tag_keys=("dataset",))
        self.images = Counter("raydar_label_images", description="Images done by the label job, by outcome.",
                              tag_keys=("dataset", "outcome"))
        self.cache_hits = Counter("raydar_label_cache_hits", description="Images whose label came from the cache.",
                                  tag_keys=("dataset",))
        self.failures = Counter("raydar_label_failures", description="Images that failed in this run, by reason.",
                                tag_keys=("dataset", "reason"))
        self.throughput = Gauge("raydar_label_images_per_second", description="Images done per second since the "
                                "label job started.", tag_keys=("dataset",))

    def record_image(self, outcome: str, *, requests: int = 0, latency_s: float | None = None,
                     reason: str = "") -> None:
        """One image done: `outcome` is ok, failed, cached or gave_up; `reason` the failure's message."""
        self.images.inc(1, tags={**self.tags, "outcome": outcome})
        if requests:
            self.requests.inc(requests, tags={**self.tags, "model": self.model})
        if latency_s is not None and requests:
            self.latency.observe(latency_s, tags=self.tags)
        if outcome == "cached":
            self.cache_hits.inc(1, tags=self.tags)
        elif outcome == "failed":
            self.failures.inc(1, tags={**self.tags, "reason": failure_reason(reason)})

    def record_throughput(self, images_per_s: float) -> None:
        self.throughput.set(images_per_s, tags=self.tags)


def failure_reason(error: str) -> str:
    """A bounded tag for a failure message: its text before the first colon, without an address or a
    duration (`cannot reach the teacher at http://...: ...` -> `cannot reach the teacher`)."""
    head = error.split(":", 1)[0].strip()
    return re.sub(r"\s+(at|within)\s.*$", "", head) or "unknown"


class ServingMetrics:
    """What the detection endpoint records per request, for one dataset."""

    def __init__(self, dataset: str) -> None:
        self.tags = {"dataset": dataset}
        self.served = Counter("raydar_detections_served", description="Images answered by the endpoint, per member "
                              "and `fused`.", tag_keys=("dataset", "member"))
        self.errors = Counter("raydar_detection_errors", description="Member failures while serving.",
                              tag_keys=("dataset", "member"))
        self.disagreement = Histogram("raydar_member_disagreement", description="1 - agreement of the ensemble "
                                      "members on one image (0: they agree).", boundaries=FRACTION_BOUNDARIES,
                                      tag_keys=("dataset",))
        self.latency = Histogram("raydar_detection_latency_seconds", description="Seconds per detection request.",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("dataset",))

    def record_request(self, members: Iterable[str], *, failed: Iterable[str] = (), agreement: float | None = None,
                       latency_s: float | None = None) -> None:
        """One image answered: the members that answered, those that failed, their agreement in [0, 1]."""
        for member in members:
            self.served.inc(1, tags={**self.tags, "member": member})
        self.served.inc(1, tags={**self.tags, "member": "fused"})
        for member in failed:
            self.errors.inc(1, tags={**self.tags, "member": member})
        if agreement is not None:
            self.disagreement.observe(min(1.0, max(0.0, 1.0 - agreement)), tags=self.tags)
        if latency_s is not None:
            self.latency.observe(latency_s, tags=self.tags)

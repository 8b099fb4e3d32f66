"""The ensembled detection endpoint on Ray Serve: the fine-tuned student and the RAG detector behind one API.

    export RAYDAR_SERVE_TOKEN=$(openssl rand -hex 24)
    serve run serving/serve_config.yaml
    curl -H "Authorization: Bearer $RAYDAR_SERVE_TOKEN" -F image=@cell.png http://127.0.0.1:8000/v1/detect

`build_app(args)` (named by `import_path` in serve_config.yaml; nothing is built at import) validates
its args (`serving.args.ServeArgs`) and binds three deployments: the members `FineTunedMember` and
`RagMember` (serving/members.py) and the FastAPI ingress `EnsembleIngress` (serving/ingress.py, its
routes in serving/api.py), which asks the members through their handles.

Overload is refused, not queued forever: `max_ongoing_requests` and `max_queued_requests` bound each
deployment, and Serve answers 503 beyond them.
"""

from __future__ import annotations

from ray.serve import Application

from cluster.storage import default_root
from raydar.spec import SpecError, load_spec
from serving.args import DeploymentLimits, ServeArgs
from serving.ingress import EnsembleIngress
from serving.members import FineTunedMember, RagMember


def build_app(args: dict) -> Application:
    """The Serve application for `args` (see ServeArgs); named by serve_config.yaml's import_path."""
    config = ServeArgs.from_config(args)
    spec = load_spec(config.spec, overrides=config.set)
    members = config.members or list(spec.serving.members)
    if "finetuned" in members and not config.adapters:
        raise SpecError("serving args: the finetuned member needs `adapters` (name -> finetune checkpoint, or `base`)")
    spec_data = {**spec.model_dump(mode="json"), "source_file": spec.source_file}
    storage = config.storage or default_root()
    handles = {}
    if "finetuned" in members:
        handles["finetuned"] = FineTunedMember.options(
            **_options(config.finetuned, config),
            user_config={"adapters": config.adapters, "default": config.default_adapter or next(iter(config.adapters))},
        ).bind(spec_data, batching=config.batching, max_batch_size=config.max_batch_size,
               batch_wait_timeout_s=config.batch_wait_timeout_s, max_new_tokens=config.max_new_tokens,
               device=config.device)
    if "rag" in members:
        handles["rag"] = RagMember.options(**_options(config.rag, config)).bind(
            spec_data, str(storage), config.rag_base_url)
    settings = config.model_dump(include={
        "token_env", "token_file", "max_request_bytes", "max_image_pixels", "image_formats", "request_timeout_s",
        "member_timeout_s", "adapter_registry_max_age_s", "models_registry_wait_s", "ready_probe_timeout_s",
        "member_probe_interval_s", "feedback_counts_max_age_s", "public_docs", "feedback"})
    return EnsembleIngress.options(**_options(config.ingress, config)).bind(spec_data, str(storage), settings, **handles)


def _options(limits: DeploymentLimits, config: ServeArgs) -> dict:
    return {
        "num_replicas": limits.replicas,
        "max_ongoing_requests": limits.max_ongoing_requests,
        "max_queued_requests": limits.max_queued_requests,
        "ray_actor_options": {"num_cpus": limits.num_cpus, "num_gpus": limits.num_gpus},
        "max_surge_percent": surge_that_fits(limits, config.max_surge_percent),
    }


def surge_that_fits(limits: DeploymentLimits, max_surge_percent: int) -> int:
    """`max_surge_percent` when the cluster has room now for that many extra replicas of the deployment, else
    0: a rolling restart that waits for room no autoscaler will make would never end, so without room the
    replicas are replaced in place (the member is briefly out of the ensemble, whose answers are degraded)."""
    import math

    import ray

    if not ray.is_initialized() or not max_surge_percent:
        return max_surge_percent
    extra = math.ceil(limits.replicas * max_surge_percent / 100)
    free = ray.available_resources()
    need = {"CPU": extra * limits.num_cpus, "GPU": extra * limits.num_gpus}
    return max_surge_percent if all(free.get(name, 0.0) >= amount for name, amount in need.items() if amount) else 0

"""What the chart tells Kubernetes to run, taken from its rendered manifests: each
container's command line (command/args over the image's ENTRYPOINT/CMD), its environment
(values, Secret and ConfigMap references, envFrom, ``$(VAR)`` expansion), its exec probes and
its writable mounts, as the kubelet would assemble them.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "session-orchestrator"
RELEASE = "so"
NAMESPACE = "avatars"

Manifest = dict[str, Any]


def render(values: dict[str, Any]) -> list[Manifest]:
    """The chart's manifests for a fresh install (hooks included), as helm-python-sdk renders
    them (Helm's own Go SDK, as tests/test_helm_chart.py does)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=True, is_upgrade=False
        )
    manifests = []
    for template, text in sorted(rendered.items()):
        if not template.endswith("NOTES.txt"):
            manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    return manifests


@dataclass(frozen=True)
class ContainerRun:
    """One container of one workload, ready to run."""

    workload: str  # e.g. Deployment/so-session-orchestrator-worker
    image: str
    argv: list[str]
    env: dict[str, str]
    probes: dict[str, list[str]]  # startup/liveness/readiness exec commands
    writable: list[str]  # mountPaths of the container's volume mounts


_VAR = re.compile(r"\$\((\w+)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent-variable expansion: $(NAME) of a defined variable."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _data(manifest: Manifest) -> dict[str, str]:
    raw = manifest.get("data", {})
    if manifest["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in raw.items()}
    else:
        data = {k: str(v) for k, v in raw.items()}
    data.update({k: str(v) for k, v in manifest.get("stringData", {}).items()})
    return data


def _sources(manifests: list[Manifest]) -> dict[tuple[str, str], dict[str, str]]:
    return {
        (m["kind"], m["metadata"]["name"]): _data(m)
        for m in manifests
        if m["kind"] in {"Secret", "ConfigMap"}
    }


def _environment(
    container: Manifest, sources: dict[tuple[str, str], dict[str, str]]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                prefix = source.get("prefix", "")
                found = sources[(kind, source[key]["name"])]
                env.update({prefix + k: v for k, v in found.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(str(var["value"]), env)
            continue
        ref = var["valueFrom"]
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in ref:
                env[var["name"]] = sources[(kind, ref[key]["name"])][ref[key]["key"]]
    return env


def container_runs(
    manifests: list[Manifest], entrypoint: list[str], cmd: list[str]
) -> dict[str, ContainerRun]:
    """Every container of every Deployment and Job, by ``<component>`` label (worker pools
    by pool name), given the image's ENTRYPOINT and CMD."""
    sources = _sources(manifests)
    runs = {}
    for m in manifests:
        if m["kind"] not in {"Deployment", "Job"}:
            continue
        labels = m["metadata"]["labels"]
        key = (
            labels.get("session-orchestrator/worker-pool") or labels["app.kubernetes.io/component"]
        )
        for c in m["spec"]["template"]["spec"]["containers"]:
            env = _environment(c, sources)
            # command replaces ENTRYPOINT (and drops CMD); args replace CMD.
            command = c.get("command", entrypoint)
            args = c.get("args", cmd if "command" not in c else [])
            argv = [_expand(str(a), env) for a in [*command, *args]]
            probes = {
                kind.removesuffix("Probe"): list(c[kind]["exec"]["command"])
                for kind in ("startupProbe", "livenessProbe", "readinessProbe")
                if "exec" in c.get(kind, {})
            }
            writable = [v["mountPath"] for v in c.get("volumeMounts", []) if not v.get("readOnly")]
            runs[key] = ContainerRun(
                workload=f"{m['kind']}/{m['metadata']['name']}",
                image=c["image"],
                argv=argv,
                env=env,
                probes=probes,
                writable=writable,
            )
    return runs

"""The Helm chart, checked offline: rendered with helm-python-sdk (Helm's Go SDK, no binary,
no cluster), every manifest validated by kubernetes-validate --strict, plus the properties
an SRE relies on (hook ordering, one beat, hardened pods, secrets kept out of ConfigMaps,
schema errors on typos) and that every container's arguments parse with our own CLI.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from orchestrator.accounts.catalog import SingleAccount, load_accounts
from orchestrator.accounts.sources import ENV_ACCOUNT_PREFIX

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")
kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "session-orchestrator"
FULL_VALUES = Path(__file__).with_name("helm-values-full.yaml")

# The oldest Kubernetes still supported upstream that we promise, and the newest schema
# kubernetes-validate ships (so a removed API shows up as soon as the package knows it).
KUBE_VERSIONS = ("1.31.0", kv.latest_version())
RELEASE = "so"
NAMESPACE = "avatars"
UID = 10001

# What `helm install --set ...` would pass for the four required secrets.
REQUIRED_SET = (
    "secrets.databaseUrl=postgresql+psycopg://orch:set-db-password@db:5432/orch,"
    "secrets.brokerUrl=amqp://orch:set-broker-password@mq:5672/orch,"
    "secrets.deepbrainAppId=set-app-id,"
    "secrets.deepbrainUserKey=set-user-key"
)
SECRET_STRINGS = (
    "set-db-password",
    "set-broker-password",
    "set-app-id",
    "set-user-key",
    "full-db-password",
    "full-broker-password",
    "full-app-id",
    "full-user-key",
)

Manifest = dict[str, Any]


def required_values() -> dict[str, Any]:
    values: dict[str, Any] = helm.parse_set_string(REQUIRED_SET)
    return values


def full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text())
    return values


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def render_raw(values: dict[str, Any], *, is_upgrade: bool = False) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(
            values,
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not is_upgrade,
            is_upgrade=is_upgrade,
        )
    return rendered


def render(values: dict[str, Any]) -> list[Manifest]:
    manifests: list[Manifest] = []
    for template, text in sorted(render_raw(values).items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                manifests.append({"template": template, **doc})
    return manifests


EXISTING = {"secrets": {"existingSecret": "orchestrator-creds"}}
SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "default": required_values,
    "full": full_values,
    "existing-secret": lambda: merge(EXISTING, {}),
    "plain-job": lambda: merge(required_values(), {"migrations": {"asHook": False}}),
    "no-sa-existing-secret": lambda: merge(
        EXISTING, {"serviceAccount": {"create": False, "name": "orch"}}
    ),
}


@cache
def _rendered(scenario: str) -> str:
    return json.dumps(render(SCENARIOS[scenario]()))


def manifests_for(scenario: str) -> list[Manifest]:
    loaded: list[Manifest] = json.loads(_rendered(scenario))
    return loaded


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    for m in manifests:
        if m["kind"] in {"Deployment", "Job"}:
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def containers(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs(manifests):
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where}/{c['name']}", c


def hook_weight(m: Manifest) -> int:
    return int(m["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))


def error_of(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render_raw(values)
    return str(caught.value)


# --- every manifest is valid Kubernetes --------------------------------------------------

# Custom resources kubernetes-validate has no schema for: the fields the chart renders, closed,
# as the CRDs define them (KEDA 2.x keda.sh/v1alpha1; Prometheus Operator monitoring.coreos.com/v1).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": {"additionalProperties": False, **spec},
        },
    }


CRD_SCHEMAS = {
    "ScaledObject": _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "metadata": _STRING_MAP,  # the scaler's parameters: strings only
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
    "TriggerAuthentication": _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        {
            "type": "object",
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string", "minLength": 1},
                            "key": {"type": "string", "minLength": 1},
                        },
                    },
                }
            },
        },
    ),
    "ServiceMonitor": _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    ),
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_manifest_passes_kubernetes_validate_strict(scenario: str, kube_version: str) -> None:
    import jsonschema

    manifests = manifests_for(scenario)
    assert manifests
    for m in manifests:
        doc = {k: v for k, v in m.items() if k != "template"}
        if not doc["metadata"]["annotations"]:
            del doc["metadata"]["annotations"]
        if m["kind"] in CRD_SCHEMAS:
            try:
                jsonschema.validate(doc, CRD_SCHEMAS[m["kind"]])
            except jsonschema.ValidationError as e:
                pytest.fail(f"{m['template']} {m['kind']}: {e.json_path}: {e.message}")
            continue
        try:
            kv.validate(doc, kube_version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{m['template']} {m['kind']}/{m['metadata']['name']}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:  # an unknown kind/apiVersion is a failure too
            pytest.fail(f"{m['template']}: {e.message}")


def test_strict_validation_really_rejects_unknown_fields() -> None:
    deployment = of_kind(manifests_for("default"), "Deployment")[0]
    doc = {k: v for k, v in deployment.items() if k != "template"}
    doc["spec"] = {**doc["spec"], "replica": 2}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, KUBE_VERSIONS[0], strict=True)


# --- helm lint ---------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "full", "plain-job"])
def test_helm_lint_strict_is_clean(scenario: str) -> None:
    report = helm.lint(
        CHART, SCENARIOS[scenario](), strict=True, namespace=NAMESPACE, kube_version="v1.31.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems
    assert not report["errors"], report["errors"]


# --- values.yaml and values.schema.json --------------------------------------------------


def test_schema_rejects_an_unknown_key_naming_it() -> None:
    message = error_of(merge(required_values(), {"worker": {"replica": 3}}))
    assert "/worker" in message
    assert "additional properties 'replica' not allowed" in message

    message = error_of(merge(required_values(), {"imagee": {"tag": "x"}}))
    assert "additional properties 'imagee' not allowed" in message


def test_schema_rejects_a_wrong_type_naming_it() -> None:
    message = error_of(merge(required_values(), {"worker": {"concurrency": "eight"}}))
    assert "/worker/concurrency" in message
    assert "want integer" in message


def test_schema_rejects_a_bad_pool_and_a_bad_enum() -> None:
    bad_pool = {"worker": {"pools": [{"name": "w", "queues": ["orchestrator.start"]}]}}
    assert "replicas" in error_of(merge(required_values(), bad_pool))
    assert "/worker/pool" in error_of(merge(required_values(), {"worker": {"pool": "eventlet"}}))
    # gevent is not installed: offered nowhere (the CLI refuses it too).
    assert "/worker/pool" in error_of(merge(required_values(), {"worker": {"pool": "gevent"}}))


def test_schema_closes_every_object_it_defines() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                yield path or "/"
            for key, child in node.items():
                yield from walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from walk(child, f"{path}/{i}")

    assert list(walk(schema, "")) == []


def test_every_value_in_values_yaml_has_a_comment() -> None:
    """A leaf value is documented by a comment right above it or above an enclosing key."""
    key = re.compile(r"^(?P<indent>\s*)(?P<dash>- )?(?P<key>[A-Za-z][\w.-]*):(?P<value>.*)$")
    stack: list[tuple[int, bool]] = []  # (indent, documented)
    previous = ""
    undocumented = []
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = key.match(line)
        if match:
            indent = len(match["indent"]) + (2 if match["dash"] else 0)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            here = previous.lstrip().startswith("#")
            covered = here or any(documented for _, documented in stack)
            value = match["value"].split(" #")[0].strip()
            if value and not covered:
                undocumented.append(f"{number}: {line.strip()}")
            stack.append((indent, covered))
        previous = line
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_values_yaml_has_no_secret_defaults() -> None:
    with helm.Chart.load(CHART) as chart:
        secrets = chart.values["secrets"]
    for name in ("databaseUrl", "brokerUrl", "deepbrainAppId", "deepbrainUserKey"):
        assert secrets[name] == "", name


def test_install_without_secrets_fails_clearly() -> None:
    message = error_of({})
    assert "secrets.databaseUrl is required (or set secrets.existingSecret)" in message


def test_existing_secret_and_inline_secrets_are_not_mixed() -> None:
    message = error_of(merge(required_values(), EXISTING))
    assert "secrets.existingSecret is set" in message


# --- migrations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario", ["default", "full", "existing-secret", "no-sa-existing-secret"]
)
def test_migration_job_is_a_pre_install_pre_upgrade_hook(scenario: str) -> None:
    manifests = manifests_for(scenario)
    [job] = of_kind(manifests, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]

    # A hook runs before the release's own objects exist: whatever the Job reads must be
    # a hook of a lower weight, or exist outside the release (existingSecret, an SA).
    hooks = {
        (m["kind"], m["metadata"]["name"]): m
        for m in manifests
        if "helm.sh/hook" in m["metadata"]["annotations"]
    }
    pod = job["spec"]["template"]["spec"]
    refs = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for env in pod["containers"][0]["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    config_maps = {m["metadata"]["name"] for m in of_kind(manifests, "ConfigMap")}
    for source in pod["containers"][0].get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        assert ref not in config_maps, "a hook runs before the release's ConfigMap exists"
    values = SCENARIOS[scenario]()
    for name in refs:
        if values.get("secrets", {}).get("existingSecret"):
            assert name == values["secrets"]["existingSecret"]
        else:
            secret = hooks[("Secret", name)]
            assert hook_weight(secret) < hook_weight(job)
            assert secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
            assert set(secret["data"]) == {
                values["secrets"].get("keys", {}).get("databaseUrl", "database-url")
            }, "the hook Secret holds only the database URL"
    sa = pod["serviceAccountName"]
    if values.get("serviceAccount", {}).get("create", True):
        account = hooks[("ServiceAccount", sa)]
        assert hook_weight(account) < hook_weight(job)
    else:
        assert sa == values["serviceAccount"]["name"]


def test_plain_migration_job_when_as_hook_is_false() -> None:
    manifests = manifests_for("plain-job")
    [job] = of_kind(manifests, "Job")
    assert not any(a.startswith("helm.sh/hook") for a in job["metadata"]["annotations"])
    assert not [m for m in manifests if "helm.sh/hook" in m["metadata"]["annotations"]]
    # One Job per image: a new image gets a new name instead of an immutable-field error.
    assert re.fullmatch(r"so-session-orchestrator-migrate-[0-9a-f]{8}", job["metadata"]["name"])
    other = render(merge(SCENARIOS["plain-job"](), {"image": {"tag": "0.2.0"}}))
    assert of_kind(other, "Job")[0]["metadata"]["name"] != job["metadata"]["name"]
    # It reads the release's Secret and ServiceAccount.
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "so-session-orchestrator"
    [env] = [e for e in pod["containers"][0]["env"] if e["name"] == "ORCHESTRATOR_DATABASE_URL"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == "so-session-orchestrator"


def test_migrations_can_be_switched_off() -> None:
    manifests = render(merge(required_values(), {"migrations": {"enabled": False}}))
    assert not of_kind(manifests, "Job")
    assert not [m for m in manifests if "helm.sh/hook" in m["metadata"]["annotations"]]


# --- workloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "full"])
def test_exactly_one_beat_with_recreate(scenario: str) -> None:
    beats = [
        d
        for d in of_kind(manifests_for(scenario), "Deployment")
        if d["spec"]["template"]["spec"]["containers"][0]["args"] == ["beat"]
    ]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"] == {"type": "Recreate"}
    hpa_targets = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in of_kind(manifests_for(scenario), "HorizontalPodAutoscaler")
    }
    assert beats[0]["metadata"]["name"] not in hpa_targets


def test_default_workers_split_starts_from_control_work() -> None:
    [worker] = [
        d
        for d in of_kind(manifests_for("default"), "Deployment")
        if d["metadata"]["name"] == "so-session-orchestrator-worker"
    ]
    pod = worker["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:3] == ["worker", "--queues", "orchestrator.start"]
    assert args[args.index("--concurrency") + 1] == "256"
    assert "--events" not in args
    assert args[args.index("--pool") + 1] == "threads"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert worker["spec"]["replicas"] == 2
    # Stops and sweeps have a pool of their own: they never wait behind slow starts.
    control = one(manifests_for("default"), "Deployment", "so-session-orchestrator-control")
    control_args = control["spec"]["template"]["spec"]["containers"][0]["args"]
    assert control_args[:3] == ["worker", "--queues", "orchestrator.control"]
    assert control_args[control_args.index("--concurrency") + 1] == "16"


def test_pools_split_queues_with_their_own_scaling() -> None:
    manifests = manifests_for("full")
    start = one(manifests, "Deployment", "orch-worker")
    bulk = one(manifests, "Deployment", "orch-bulk")
    control = one(manifests, "Deployment", "orch-control")
    start_args = start["spec"]["template"]["spec"]["containers"][0]["args"]
    control_args = control["spec"]["template"]["spec"]["containers"][0]["args"]
    assert start_args[1:3] == ["--queues", "orchestrator.start"]
    assert "--events" in start_args
    assert control_args[1:3] == ["--queues", "orchestrator.control"]
    assert control_args[control_args.index("--pool") + 1] == "prefork"
    assert control_args[control_args.index("--concurrency") + 1] == "4"
    # worker is scaled by KEDA and bulk by an HPA (so neither has fixed replicas), control
    # keeps its 2.
    assert "replicas" not in start["spec"] and "replicas" not in bulk["spec"]
    assert control["spec"]["replicas"] == 2
    [hpa] = of_kind(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "orch-bulk",
    }
    [scaled] = of_kind(manifests, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "orch-worker"
    assert {p["metadata"]["name"] for p in of_kind(manifests, "PodDisruptionBudget")} == {
        "orch-worker",
        "orch-bulk",
        "orch-control",
    }


def test_names_and_labels_fit_kubernetes_limits_with_the_longest_release_name() -> None:
    long_release = "r" * 53  # Helm's own limit for a release name
    values = merge(SCENARIOS["full"](), {"fullnameOverride": ""})
    for as_hook in (True, False):
        with helm.Chart.load(CHART) as chart:
            rendered = chart.render(
                merge(values, {"migrations": {"asHook": as_hook}}),
                name=long_release,
                namespace=NAMESPACE,
            )
        for template, text in rendered.items():
            if template.endswith("NOTES.txt"):
                continue
            for doc in filter(None, yaml.safe_load_all(text)):
                name = doc["metadata"]["name"]
                assert len(name) <= 63, name
                assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
                for value in doc["metadata"].get("labels", {}).values():
                    assert len(value) <= 63, value


def test_autoscaling_limits_are_checked() -> None:
    bad = {"worker": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    assert "minReplicas is above maxReplicas" in error_of(merge(required_values(), bad))


def test_duplicate_or_reserved_pool_names_fail() -> None:
    pool = {"name": "worker", "queues": ["orchestrator.start"], "replicas": 1}
    message = error_of(merge(required_values(), {"worker": {"pools": [pool, pool]}}))
    assert 'the name "worker" is used twice' in message
    message = error_of(merge(required_values(), {"worker": {"pools": [{**pool, "name": "beat"}]}}))
    assert 'the name "beat" is taken' in message


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_selectors_match_their_pods_and_nothing_else(scenario: str) -> None:
    manifests = manifests_for(scenario)
    deployments = of_kind(manifests, "Deployment")

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        for other in deployments:
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert matches(selector, labels) == (other is d), (
                d["metadata"]["name"],
                other["metadata"]["name"],
            )
    for pdb in of_kind(manifests, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        hits = [
            d for d in deployments if matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert [d["metadata"]["name"] for d in hits] == [pdb["metadata"]["name"]]
    for svc in of_kind(manifests, "Service"):
        hits = [
            d
            for d in deployments
            if matches(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        if svc["metadata"]["name"].endswith("-metrics"):  # every pod serving /metrics
            serving = [
                d
                for d in deployments
                if "ports" in d["spec"]["template"]["spec"]["containers"][0]
                and d["spec"]["template"]["spec"]["containers"][0]["args"][0] != "simulator"
            ]
            assert hits == serving and len(hits) >= 2
        else:
            assert len(hits) == 1, svc["metadata"]["name"]


@pytest.mark.parametrize("scenario", ["default", "full"])
def test_probes_check_the_heartbeat_of_their_own_role(scenario: str) -> None:
    values = SCENARIOS[scenario]()
    for d in of_kind(manifests_for(scenario), "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        role = container["args"][0]
        if role == "simulator":
            assert container["livenessProbe"]["httpGet"]["path"] == "/_sim/stats"
            continue
        probes = merge({"readiness": {"enabled": True}}, values.get(role, {}).get("probes", {}))
        assert container["livenessProbe"]["exec"]["command"] == ["orchestrator", "health", role]
        assert container["startupProbe"]["exec"]["command"] == ["orchestrator", "health", role]
        if probes["readiness"]["enabled"]:
            assert container["readinessProbe"]["exec"]["command"] == [
                "orchestrator",
                "health",
                role,
            ]
        else:
            assert "readinessProbe" not in container
        assert container["resources"]["requests"], container["name"]


# --- security ----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_pod_and_container_is_hardened(scenario: str) -> None:
    manifests = manifests_for(scenario)
    for where, spec in pod_specs(manifests):
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True, where
        assert pod_ctx["runAsUser"] == UID, where
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{where}: no emptyDir at /tmp"
    for where, c in containers(manifests):
        ctx = c["securityContext"]
        assert ctx["runAsNonRoot"] is True, where
        assert ctx["runAsUser"] == UID, where
        assert ctx["readOnlyRootFilesystem"] is True, where
        assert ctx["allowPrivilegeEscalation"] is False, where
        assert ctx["capabilities"]["drop"] == ["ALL"], where
        assert not ctx["capabilities"].get("add"), where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_secret_outside_secrets(scenario: str) -> None:
    manifests = manifests_for(scenario)
    secret_keys = re.compile(r"DATABASE_URL|BROKER_URL|APP_ID|USER_KEY|SECRET_KEY|PASSWORD|TOKEN")
    for cm in of_kind(manifests, "ConfigMap"):
        for key in cm["data"]:
            assert not secret_keys.search(key), f"{key} belongs in a Secret"
    for m in manifests:
        if m["kind"] == "Secret":
            continue
        text = json.dumps(m)
        for secret in SECRET_STRINGS:
            assert secret not in text, f"{secret!r} leaks into {m['kind']}/{m['metadata']['name']}"
    for where, c in containers(manifests):
        for env in c.get("env", []):
            if secret_keys.search(env["name"]) and env["name"] != "ORCHESTRATOR_DEEPBRAIN_BASE_URL":
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']}"


def test_chart_secret_holds_the_values_and_each_role_gets_only_what_it_needs() -> None:
    manifests = manifests_for("default")
    secret = one(manifests, "Secret", "so-session-orchestrator")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded["deepbrain-user-key"] == "set-user-key"
    assert decoded["database-url"].startswith("postgresql+psycopg://")

    def secret_env(name: str) -> set[str]:
        c = one(manifests, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        return {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}

    assert secret_env("so-session-orchestrator-worker") == {
        "ORCHESTRATOR_DATABASE_URL",
        "ORCHESTRATOR_BROKER_URL",
        "ORCHESTRATOR_DEEPBRAIN_APP_ID",
        "ORCHESTRATOR_DEEPBRAIN_USER_KEY",
    }
    assert secret_env("so-session-orchestrator-beat") == {"ORCHESTRATOR_BROKER_URL"}


@pytest.mark.parametrize("scenario", ["existing-secret", "no-sa-existing-secret"])
def test_existing_secret_is_used_and_no_secret_is_rendered(scenario: str) -> None:
    manifests = manifests_for(scenario)
    assert not of_kind(manifests, "Secret")
    refs = [
        (env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
        for _, c in containers(manifests)
        for env in c.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    ]
    assert refs
    assert {name for name, _ in refs} == {"orchestrator-creds"}
    assert {key for _, key in refs} == {
        "database-url",
        "broker-url",
        "deepbrain-app-id",
        "deepbrain-user-key",
    }
    for d in of_kind(manifests, "Deployment"):
        assert "checksum/secret" not in d["spec"]["template"]["metadata"]["annotations"]


def test_custom_secret_key_names_are_used() -> None:
    manifests = manifests_for("full")
    secret = one(manifests, "Secret", "orch")
    assert set(secret["data"]) == {
        "DATABASE_URL",
        "BROKER_URL",
        "DEEPBRAIN_APP_ID",
        "DEEPBRAIN_USER_KEY",
    }


# --- settings, telemetry, simulator ------------------------------------------------------


def test_config_map_carries_settings_and_otel() -> None:
    manifests = manifests_for("full")
    data = one(manifests, "ConfigMap", "orch")["data"]
    assert data["ORCHESTRATOR_STATE_DIR"] == "/tmp"
    assert data["ORCHESTRATOR_MAX_CONCURRENT_SESSIONS"] == "25"
    assert data["ORCHESTRATOR_REAPER_INTERVAL_SECONDS"] == "2.5"
    assert data["ORCHESTRATOR_HEARTBEAT_MAX_AGE_SECONDS"] == "45"
    assert data["OTEL_SERVICE_NAME"] == "session-orchestrator-staging"
    assert data["ORCHESTRATOR_LOG_FORMAT"] == "json"
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert data["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert all(isinstance(v, str) for v in data.values())
    # Workers read it through envFrom.
    pod = one(manifests, "Deployment", "orch-worker")["spec"]["template"]["spec"]
    assert {"configMapRef": {"name": "orch"}} in pod["containers"][0]["envFrom"]


def test_every_orchestrator_variable_is_a_setting_of_the_application() -> None:
    """ORCHESTRATOR_WEBHOOK_* are the sender's settings (their own class); every other
    ORCHESTRATOR_* is a field of config.Settings."""
    config = pytest.importorskip("orchestrator.config", reason="orchestrator.config missing")
    webhook = pytest.importorskip("orchestrator.webhooks.settings")
    known = {config.ENV_PREFIX + name.upper() for name in config.Settings.model_fields}
    known |= {webhook.PREFIX + name.upper() for name in webhook.WebhookSettings.model_fields}
    names = set(one(manifests_for("full"), "ConfigMap", "orch")["data"])
    for _, c in containers(manifests_for("full")):
        names |= {e["name"] for e in c.get("env", [])}
    assert any(name.startswith(webhook.PREFIX) for name in names), "the sender is in full"
    unknown = {
        name
        for name in names
        if name.startswith(config.ENV_PREFIX)
        and not name.startswith(ENV_ACCOUNT_PREFIX)  # accounts' variables: below
        and name not in known
    }
    assert not unknown, f"the chart sets variables the application ignores: {sorted(unknown)}"


def test_accounts_metadata_becomes_the_variables_the_application_reads(tmp_path: Path) -> None:
    data = one(manifests_for("full"), "ConfigMap", "orch")["data"]
    accounts_vars = {k: v for k, v in data.items() if k.startswith(ENV_ACCOUNT_PREFIX)}
    assert accounts_vars == {
        "ORCHESTRATOR_ACCOUNT_EU_1_CAP": "20",
        "ORCHESTRATOR_ACCOUNT_EU_1_WEIGHT": "2",
        "ORCHESTRATOR_ACCOUNT_EU_1_LABELS": "region=eu",
        "ORCHESTRATOR_ACCOUNT_DEFAULT_LABELS": "region=us",
    }
    # The application completes the Secret's eu-1 (its keys) and default with them.
    (tmp_path / "eu-1.json").write_text(json.dumps({"app_id": "full-app-id", "user_key": "k"}))
    single = SingleAccount(SecretStr("a"), SecretStr("k2"), max_concurrent_sessions=5)
    loaded = load_accounts(tmp_path, data, single, "http://simulator:8080")
    assert (loaded["eu-1"].cap, loaded["eu-1"].weight, loaded["eu-1"].labels) == (
        20,
        2.0,
        {"region": "eu"},
    )
    assert (loaded["default"].cap, loaded["default"].labels) == (5, {"region": "us"})
    # Several labels, sorted; nothing rendered without metadata.
    labelled = {"accounts": {"metadata": {"us": {"labels": {"tier": "gold", "region": "us"}}}}}
    data = of_kind(render(merge(required_values(), labelled)), "ConfigMap")[0]["data"]
    assert data["ORCHESTRATOR_ACCOUNT_US_LABELS"] == "region=us,tier=gold"
    plain = of_kind(render(required_values()), "ConfigMap")[0]["data"]
    assert not [k for k in plain if k.startswith(ENV_ACCOUNT_PREFIX)]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"EU": {"cap": 3}}, "EU"),
        ({"eu": {"cap": 0}}, "cap"),
        ({"eu": {"weight": 0}}, "weight"),
        ({"eu": {"region": "eu"}}, "region"),
        ({"eu": {"labels": {"region": 1}}}, "region"),
    ],
)
def test_schema_checks_accounts_metadata(metadata: dict[str, Any], expected: str) -> None:
    assert expected in error_of(merge(required_values(), {"accounts": {"metadata": metadata}}))


def test_a_cluster_s_broker_urls_become_one_failover_list_in_the_secret() -> None:
    values = required_values()
    values["secrets"].pop("brokerUrl")
    values["secrets"]["brokerUrls"] = ["amqp://u:p@mq-0:5672/o", "amqp://u:p@mq-1:5672/o"]
    values = merge(values, {"config": {"queueType": "quorum", "deliveryLimit": 5}})
    manifests = render(values)
    secret = one(manifests, "Secret", "so-session-orchestrator")
    broker = base64.b64decode(secret["data"]["broker-url"]).decode()
    assert broker == "amqp://u:p@mq-0:5672/o;amqp://u:p@mq-1:5672/o"
    data = of_kind(manifests, "ConfigMap")[0]["data"]
    assert (data["ORCHESTRATOR_QUEUE_TYPE"], data["ORCHESTRATOR_DELIVERY_LIMIT"]) == ("quorum", "5")
    both = merge(values, {"secrets": {"brokerUrl": "amqp://u:p@mq-0:5672/o"}})
    assert "brokerUrl and secrets.brokerUrls are both set" in error_of(both)
    assert "queueType" in error_of(merge(values, {"config": {"queueType": "mirrored"}}))


def test_every_chart_default_is_the_applications_default() -> None:
    """A value left at its default means what the application means without it: each
    config.* default is the Settings default, the worker's are the CLI's, and nothing is
    exported unless asked (no OTEL_*_EXPORTER rendered, as the README says)."""
    config = pytest.importorskip("orchestrator.config")
    cli = pytest.importorskip("orchestrator.cli")
    click = pytest.importorskip("click")
    with helm.Chart.load(CHART) as chart:
        defaults = chart.values
    fields = config.Settings.model_fields

    def snake(name: str) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

    differ = {}
    for key, value in defaults["config"].items():
        field = fields[snake(key)]
        app_default = "" if key == "deepbrainBaseUrl" else field.default  # empty: vendor's URL
        if value != app_default:
            differ[f"config.{key}"] = (value, app_default)
    command = cli.main.commands["worker"]
    context = click.Context(command)
    worker_options = {p.name: p.get_default(context) for p in command.params}
    for key, option in (("pool", "pool"), ("concurrency", "concurrency"), ("events", "events")):
        if defaults["worker"][key] != worker_options[option]:
            differ[f"worker.{key}"] = (defaults["worker"][key], worker_options[option])
    assert not differ, f"chart default != application default: {differ}"
    # The queue type: the chart's default is the application's (quorum), and reaches pods.
    assert defaults["config"]["queueType"] == fields["queue_type"].default == "quorum"

    data = of_kind(manifests_for("default"), "ConfigMap")[0]["data"]
    assert not {k for k in data if k.endswith("_EXPORTER")}, data
    # The four keys the chart does not map to Settings one to one are pinned here.
    assert data["ORCHESTRATOR_STATE_DIR"] == "/tmp"
    assert data["OTEL_SERVICE_NAME"] == SERVICE_NAME_DEFAULT
    assert data["OTEL_SDK_DISABLED"] == "false"
    assert data["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"


SERVICE_NAME_DEFAULT = "session-orchestrator"


@pytest.mark.parametrize(
    ("otel", "prometheus", "traces", "metrics"),
    [
        ({}, False, None, None),
        ({"endpoint": "http://c:4318"}, False, None, None),  # the application picks otlp
        ({"endpoint": "http://c:4318"}, True, None, "otlp,prometheus"),
        ({}, True, None, "prometheus"),
        ({"metricsExporter": "none", "endpoint": "http://c:4318"}, True, None, "prometheus"),
        ({"tracesExporter": "none", "metricsExporter": "console"}, False, "none", "console"),
    ],
)
def test_exporters_are_the_applications_unless_asked(
    otel: dict[str, Any], prometheus: bool, traces: str | None, metrics: str | None
) -> None:
    values = merge(
        required_values(), {"otel": otel, "metrics": {"prometheus": {"enabled": prometheus}}}
    )
    manifests = render(values)
    data = of_kind(manifests, "ConfigMap")[0]["data"]
    assert data.get("OTEL_TRACES_EXPORTER") == traces
    assert data.get("OTEL_METRICS_EXPORTER") == metrics
    for d in of_kind(manifests, "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        if prometheus:
            assert container["ports"] == [
                {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
            ]
            assert data["OTEL_EXPORTER_PROMETHEUS_HOST"] == "0.0.0.0"
            assert data["OTEL_EXPORTER_PROMETHEUS_PORT"] == "9464"
        else:
            assert "ports" not in container


def test_service_monitor_scrapes_every_worker_and_beat_pod() -> None:
    manifests = manifests_for("full")
    [monitor] = of_kind(manifests, "ServiceMonitor")
    service = one(manifests, "Service", "orch-metrics")
    assert service["spec"]["clusterIP"] == "None"
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not of_kind(manifests_for("default"), "ServiceMonitor")
    message = error_of(merge(required_values(), {"metrics": {"serviceMonitor": {"enabled": True}}}))
    assert "metrics.serviceMonitor.enabled needs metrics.prometheus.enabled" in message


def test_keda_scales_the_start_pool_on_its_queue() -> None:
    keda = {"worker": {"keda": {"enabled": True}}}
    manifests = render(merge(required_values(), keda))
    [scaled] = of_kind(manifests, "ScaledObject")
    [auth] = of_kind(manifests, "TriggerAuthentication")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "so-session-orchestrator-worker"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"] == {
        "protocol": "amqp",
        "queueName": "orchestrator.start",
        "mode": "QueueLength",
        "value": "20",
    }
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "so-session-orchestrator", "key": "broker-url"}
    ]
    start = one(manifests, "Deployment", "so-session-orchestrator-worker")
    assert "replicas" not in start["spec"]  # KEDA's HPA owns it
    assert one(manifests, "Deployment", "so-session-orchestrator-control")["spec"]["replicas"] == 2

    clash = merge(keda, {"worker": {"autoscaling": {"enabled": True}}})
    assert "worker.keda scales it" in error_of(merge(required_values(), clash))
    unknown = {"worker": {"keda": {"enabled": True, "pool": "nope"}}}
    assert 'no worker pool named "nope"' in error_of(merge(required_values(), unknown))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) applied to a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if not {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels[key] not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def pod_labels(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    return {
        f"{m['kind']}/{m['metadata']['name']}": m["spec"]["template"]["metadata"]["labels"]
        for m in manifests
        if m["kind"] in {"Deployment", "Job"}
    }


@pytest.mark.parametrize("scenario", ["full", "required-with-webhooks"])
def test_every_pod_is_selected_by_exactly_one_network_policy(scenario: str) -> None:
    """Policies add up: a pod under two would get the union of their egress (the sender,
    under the release-wide one too, could reach the broker and any address on 443)."""
    manifests = (
        manifests_for("full")
        if scenario == "full"
        else render(merge(required_values(), WEBHOOKS_WITH_POLICY))
    )
    policies = of_kind(manifests, "NetworkPolicy")
    assert len(policies) == 2
    for where, labels in pod_labels(manifests).items():
        hits = [
            p["metadata"]["name"] for p in policies if selects(p["spec"]["podSelector"], labels)
        ]
        assert len(hits) == 1, (where, hits)


def test_network_policy_lets_out_only_what_the_pods_talk_to() -> None:
    manifests = manifests_for("full")
    [policy] = [p for p in of_kind(manifests, "NetworkPolicy") if p["metadata"]["name"] == "orch"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ports = {
        (p["port"], p.get("protocol", "TCP")) for rule in spec["egress"] for p in rule["ports"]
    }
    assert {(53, "UDP"), (5432, "TCP"), (5672, "TCP"), (443, "TCP"), (4318, "TCP")} <= ports
    assert (8080, "TCP") in ports  # the simulator (on in the full values)
    ingress_ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress_ports == {"metrics", "http"}
    # Every pod of the release but the webhook sender is selected, the migration Job's too.
    for where, labels in pod_labels(manifests).items():
        is_sender = where == "Deployment/orch-webhooks"
        assert selects(spec["podSelector"], labels) != is_sender, where
    default_policy = render(merge(required_values(), {"networkPolicy": {"enabled": True}}))
    [plain] = of_kind(default_policy, "NetworkPolicy")
    assert plain["spec"]["ingress"] == []  # nothing may connect in
    assert not of_kind(manifests_for("default"), "NetworkPolicy")


def test_extra_volumes_reach_every_pod_and_container() -> None:
    manifests = manifests_for("full")
    for where, spec in pod_specs(manifests):
        assert "corporate-ca" in {v["name"] for v in spec["volumes"]}, where
        for c in spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts["corporate-ca"] == "/etc/ssl/corporate", where


def test_accounts_come_from_an_existing_secret_mounted_into_the_workers() -> None:
    values = merge(required_values(), {"accounts": {"existingSecret": "orchestrator-accounts"}})
    manifests = render(values)
    data = of_kind(manifests, "ConfigMap")[0]["data"]
    assert data["ORCHESTRATOR_ACCOUNTS_DIR"] == "/etc/orchestrator/accounts"
    workers = [
        d
        for d in of_kind(manifests, "Deployment")
        if d["metadata"]["name"].endswith("-start")
        or "worker"
        in d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component", "")
    ]
    assert workers
    for deployment in workers:
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["accounts"]["secret"] == {"secretName": "orchestrator-accounts"}
        (container,) = spec["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["accounts"]["mountPath"] == "/etc/orchestrator/accounts"
        assert mounts["accounts"]["readOnly"] is True
    assert (
        "ORCHESTRATOR_ACCOUNTS_DIR"
        not in of_kind(render(required_values()), "ConfigMap")[0]["data"]
    )


def test_otel_extra_env_overrides_the_chart_defaults() -> None:
    values = merge(required_values(), {"otel": {"extraEnv": {"OTEL_METRICS_EXPORTER": "otlp"}}})
    data = of_kind(render(values), "ConfigMap")[0]["data"]
    assert data["OTEL_METRICS_EXPORTER"] == "otlp"


def test_default_config_map_leaves_vendor_url_to_the_application() -> None:
    data = of_kind(manifests_for("default"), "ConfigMap")[0]["data"]
    assert "ORCHESTRATOR_DEEPBRAIN_BASE_URL" not in data
    assert data["OTEL_SERVICE_NAME"] == "session-orchestrator"


def test_simulator_is_wired_to_the_workers() -> None:
    manifests = manifests_for("full")
    service = one(manifests, "Service", "orch-simulator")
    data = one(manifests, "ConfigMap", "orch")["data"]
    assert data["ORCHESTRATOR_DEEPBRAIN_BASE_URL"] == (
        f"http://orch-simulator.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    )
    sim = one(manifests, "Deployment", "orch-simulator")
    args = sim["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "start=0.1" in args
    assert args[args.index("--app-id") + 1] == "$(ORCHESTRATOR_DEEPBRAIN_APP_ID)"
    assert not of_kind(manifests_for("default"), "Service"), "simulator is off by default"


def test_pods_roll_when_settings_change() -> None:
    def checksum(values: dict[str, Any]) -> str:
        d = one(render(values), "Deployment", "so-session-orchestrator-worker")
        annotation: str = d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return annotation

    base = required_values()
    assert checksum(base) != checksum(merge(base, {"config": {"maxConcurrentSessions": 3}}))


def test_notes_tell_how_to_enqueue_and_check_sessions() -> None:
    notes = render_raw(required_values())["session-orchestrator/templates/NOTES.txt"]
    assert "kubectl -n avatars exec deploy/so-session-orchestrator-worker -- \\" in notes
    assert "orchestrator enqueue --avatar-id" in notes
    assert "orchestrator status <REQUEST_ID>" in notes
    assert "orchestrator sessions" in notes


# --- the chart and the CLI agree ---------------------------------------------------------


def _check_cli_args(args: list[str], where: str) -> None:
    click = pytest.importorskip("click")
    cli = pytest.importorskip("orchestrator.cli", reason="orchestrator.cli not importable")
    command: Any = cli.main
    ctx = click.Context(command, info_name="orchestrator")
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"{where}: {args} stops at a command group"
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"{where}: unknown command {rest[0]!r} in {args}"
        command, name, rest = sub, rest[0], rest[1:]
        ctx = click.Context(command, info_name=name, parent=ctx)
    try:
        command.make_context(command.name, rest, parent=ctx)
    except click.ClickException as e:
        pytest.fail(f"{where}: `orchestrator {' '.join(args)}`: {e.format_message()}")


@pytest.mark.parametrize("scenario", ["default", "full", "plain-job"])
def test_container_args_and_probe_commands_parse_with_the_cli(scenario: str) -> None:
    for where, c in containers(manifests_for(scenario)):
        _check_cli_args(c["args"], where)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = c.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command[0] == "orchestrator", where
                _check_cli_args(command[1:], f"{where} {probe}")


# --- the webhook sender ------------------------------------------------------------------

WEBHOOKS = {"webhooks": {"enabled": True, "secretKey": {"existingSecret": "orchestrator-webhooks"}}}
WEBHOOKS_WITH_POLICY = merge(WEBHOOKS, {"networkPolicy": {"enabled": True}})
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8")


def test_webhook_sender_is_off_by_default_and_needs_its_key() -> None:
    for scenario in ("default", "existing-secret"):
        names = {d["metadata"]["name"] for d in of_kind(manifests_for(scenario), "Deployment")}
        assert not {n for n in names if n.endswith("-webhooks")}, scenario
    message = error_of(merge(required_values(), {"webhooks": {"enabled": True}}))
    assert "webhooks.secretKey.existingSecret is required" in message


@pytest.mark.parametrize("base", ["required", "existing-secret"])
def test_webhook_sender_gets_the_database_url_and_its_key_only(base: str) -> None:
    values = required_values() if base == "required" else merge(EXISTING, {})
    manifests = render(merge(values, WEBHOOKS))
    sender = one(manifests, "Deployment", "so-session-orchestrator-webhooks")
    pod = sender["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["webhooks", "send"]
    assert container["livenessProbe"]["exec"]["command"] == ["orchestrator", "health", "webhooks"]
    refs = {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    release_secret = (
        "orchestrator-creds" if base == "existing-secret" else "so-session-orchestrator"
    )
    assert refs == {
        "ORCHESTRATOR_DATABASE_URL": (release_secret, "database-url"),
        "ORCHESTRATOR_WEBHOOK_SECRET_KEY": ("orchestrator-webhooks", "webhook-secret-key"),
    }
    # No vendor account files either, even when the workers mount them.
    with_accounts = render(
        merge(merge(values, WEBHOOKS), {"accounts": {"existingSecret": "orchestrator-accounts"}})
    )
    spec = one(with_accounts, "Deployment", "so-session-orchestrator-webhooks")["spec"]
    assert "accounts" not in {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert not [e for e in container["env"] if "BROKER" in e["name"] or "DEEPBRAIN" in e["name"]]


def test_webhook_settings_reach_the_sender_and_default_to_the_applications() -> None:
    webhook = pytest.importorskip("orchestrator.webhooks.settings")
    container = one(manifests_for("full"), "Deployment", "orch-webhooks")["spec"]["template"][
        "spec"
    ]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORCHESTRATOR_WEBHOOK_PER_ENDPOINT_CONCURRENCY"] == "8"
    assert env["ORCHESTRATOR_WEBHOOK_ALLOW"] == "hooks.corp.internal,10.20.0.0/16"
    with helm.Chart.load(CHART) as chart:
        defaults = chart.values["webhooks"]
    fields = webhook.WebhookSettings.model_fields

    def snake(name: str) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

    keys = ("allow", "timeoutSeconds", "concurrency", "perEndpointConcurrency")
    keys += ("pollIntervalSeconds", "disableAfterSeconds", "rotationGraceSeconds")
    differ = {k: (defaults[k], fields[snake(k)].default) for k in keys}
    assert {k: v for k, v in differ.items() if v[0] != v[1]} == {}


def test_webhook_sender_policy_lets_out_dns_postgres_and_public_https_only() -> None:
    manifests = render(merge(required_values(), WEBHOOKS_WITH_POLICY))
    policy = one(manifests, "NetworkPolicy", "so-session-orchestrator-webhooks")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    ports = {(p["port"], p.get("protocol", "TCP")) for r in spec["egress"] for p in r["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (443, "TCP")}  # no broker
    [https] = [r for r in spec["egress"] if {p["port"] for p in r["ports"]} == {443}]
    assert https["to"], "443 to anywhere would include the cluster and the metadata address"
    v4 = [peer["ipBlock"] for peer in https["to"] if peer["ipBlock"]["cidr"] == "0.0.0.0/0"]
    assert v4 and set(PRIVATE) <= set(v4[0]["except"])
    sender = one(manifests, "Deployment", "so-session-orchestrator-webhooks")
    assert selects(spec["podSelector"], sender["spec"]["template"]["metadata"]["labels"])
    # The release-wide policy (with its broker and vendor rules) leaves the sender out.
    release = one(manifests, "NetworkPolicy", "so-session-orchestrator")
    assert not selects(
        release["spec"]["podSelector"], sender["spec"]["template"]["metadata"]["labels"]
    )
    # The full values' own receiver rule and extra egress (an on-premise receiver).
    full = one(manifests_for("full"), "NetworkPolicy", "orch-webhooks")
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in [
        peer for rule in full["spec"]["egress"] for peer in rule.get("to", [])
    ]

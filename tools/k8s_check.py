"""`make k8s-check`: the Kubernetes manifests and the container images, checked without a cluster.

Runs in the tools virtualenv (.venv-k8s, pinned by requirements-k8s.txt); it imports nothing
from the services but crm_chassis.config and crm_chassis.registry (standard library only) and
reads the rest of the code as source. Steps, each reported with its time, then a summary:

  render       `kubectl kustomize` on every per-service base (k8s/base/*) and every overlay
               (k8s/overlays/*), written to build/k8s/<target>.yaml
  schema       every rendered object against the Kubernetes OpenAPI schemas, strict
               (kubernetes-validate, as `kubernetes-validate --strict`), for each version in
               K8S_VERSIONS; custom resources against k8s/schemas/<group>_<version>_<Kind>.yaml
  consistency  services.toml, the code (ServiceSpec), the k8s bases and the Dockerfile agree,
               and the manifests agree with the code (see check_registry, check_render)
  hadolint     every Dockerfile in the repository
  checkov      the rendered manifests (framework kubernetes, --skip-download), with the skips
               in CHECKOV_SKIPS, each with its reason

Usage: python tools/k8s_check.py [--only STEP[,STEP...]]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import registry as registry_tool  # noqa: E402  (tools/registry.py: services.toml, stdlib only)

K8S = ROOT / "k8s"
OUT = ROOT / "build" / "k8s"
SCHEMAS = K8S / "schemas"
TOOLS_BIN = pathlib.Path(sys.executable).parent

# The oldest Kubernetes minor the manifests support and the newest the tools know.
K8S_VERSIONS = ("1.33.0", "1.37.0")

# checkov checks skipped for the whole scan, each with its reason (printed in the summary).
CHECKOV_SKIPS = {
    "CKV_K8S_43": (
        "Image should use digest: the CRM images are built by CI after these manifests are "
        "written, so git holds tags; the release pipeline pins each image by digest with "
        "`kustomize edit set image NAME=REF:TAG@sha256:...` in the overlay it deploys (k8s/README.md)."
    ),
    "CKV_K8S_35": (
        "Prefer secrets as files over environment variables: the services read DATABASE_URL, "
        "AMQP_URL and JWT_SECRET from the environment only (crm_chassis/config.py), and the "
        "deployment issue requires them as secretKeyRef Secret references, never literals."
    ),
}

# Settings a service reads that must come from a Secret (valueFrom.secretKeyRef), never a literal.
SECRET_SETTINGS = ("DATABASE_URL", "AMQP_URL", "JWT_SECRET")

# crm_chassis.config.Settings fields read from settings that only the gRPC services use. The
# gateway calls load_settings() too but uses only the JWT, logging and telemetry fields; the
# check verifies that by reading the gateway's source, so a gateway that starts to use one of
# these fields must get the variable in its manifest.
SERVICE_ONLY = {
    "DATABASE_URL": "database_url",
    "AMQP_URL": "amqp_url",
    "GRPC_PORT": "grpc_port",
    "GRPC_MAX_WORKERS": "grpc_max_workers",
    "SHUTDOWN_GRACE_SECONDS": "shutdown_grace_seconds",
    "CRM_RUN_DIR": "run_dir",
    "OUTBOX_BATCH_SIZE": "relay_batch_size",
    "OUTBOX_POLL_SECONDS": "relay_poll_seconds",
    "CONSUMER_PREFETCH": "consumer_prefetch",
    "CONSUMER_DELIVERY_LIMIT": "consumer_delivery_limit",
    "CONSUMER_BATCH": "consumer_batch",
    "CONSUMER_BATCH_WAIT_MS": "consumer_batch_wait",
    "CONSUMER_THREADS": "consumer_threads",
    "CONSUMER_DOMAINS": "consumer_domains",
}

# Keys of the Secret CloudNativePG creates for Cluster <name> as <name>-app.
CNPG_APP_SECRET_KEYS = {"username", "password", "host", "port", "dbname", "uri", "jdbc-uri", "pgpass", "user"}

# What each per-service base must hold (the deployment issue's list).
BASE_KINDS = {
    "Deployment",
    "Service",
    "ServiceAccount",
    "ConfigMap",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
GATEWAY_KINDS = BASE_KINDS | {"Ingress"}

# Placeholders used to run load_settings() on a manifest's environment when a Secret's value
# is not in the rendered output (it is created in the cluster).
SECRET_PLACEHOLDERS = {
    "DATABASE_URL": "postgresql://placeholder:placeholder@database:5432/placeholder",
    "AMQP_URL": "amqp://placeholder:placeholder@broker:5672/%2F",
    "JWT_SECRET": "placeholder-secret-placeholder-secret-0123",
}


# --- reporting -------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detail: str = ""
    seconds: float = 0.0
    skipped: bool = False

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"  FAIL {msg}")

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"  note {msg}")


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


# --- rendering -------------------------------------------------------------------------------


@dataclass
class Render:
    target: str  # "base/customer-svc", "overlays/dev"
    path: pathlib.Path
    docs: list[dict]

    @property
    def is_base(self) -> bool:
        return self.target.startswith("base/")

    def objects(self, kind: str) -> Iterator[dict]:
        return (d for d in self.docs if d.get("kind") == kind)

    def get(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.objects(kind) if d["metadata"]["name"] == name), None)


def targets() -> list[pathlib.Path]:
    found = []
    for group in ("base", "overlays"):
        for d in sorted((K8S / group).iterdir()) if (K8S / group).is_dir() else []:
            if (d / "kustomization.yaml").is_file():
                found.append(d)
    return found


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: run `make k8s-check` (it installs requirements-k8s.txt)")
    return found


def render_all(step: Step) -> list[Render]:
    kubectl = tool("kubectl")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    renders = []
    for d in targets():
        target = str(d.relative_to(K8S))
        proc = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            step.fail(f"{target}: kustomize failed: {proc.stderr.strip()}")
            continue
        path = OUT / (target.replace("/", "__") + ".yaml")
        path.write_text(proc.stdout)
        docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        renders.append(Render(target, path, docs))
        print(f"  ok   {target}: {len(docs)} objects -> {path.relative_to(ROOT)}")
    if not any(r.target.startswith("overlays/") for r in renders):
        step.fail("no overlay rendered")
    step.detail = f"{len(renders)} targets, {sum(len(r.docs) for r in renders)} objects"
    return renders


# --- schema validation -----------------------------------------------------------------------


def load_crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for f in sorted(SCHEMAS.glob("*.yaml")):
        group, version, kind = f.stem.split("_")
        schema = yaml.safe_load(f.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        schemas[(f"{group}/{version}", kind)] = schema
    return schemas


def validate_schemas(step: Step, renders: list[Render]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    crds = load_crd_schemas()
    counts = {"builtin": 0, "custom": 0}
    for r in renders:
        for doc in r.docs:
            where = f"{r.target}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in crds:
                errors = sorted(jsonschema.Draft202012Validator(crds[key]).iter_errors(doc), key=str)
                for e in errors:
                    path = ".".join(str(p) for p in e.absolute_path) or "(root)"
                    step.fail(f"{where}: {path}: {e.message} (k8s/schemas)")
                counts["custom"] += 1
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(root)"
                    step.fail(f"{where}: {path}: {e.message} (Kubernetes {e.version}, strict)")
                except SchemaNotFoundError:
                    step.fail(
                        f"{where}: unknown kind {key[0]} {key[1]}: no Kubernetes schema and no "
                        f"k8s/schemas/{key[0].replace('/', '_')}_{key[1]}.yaml"
                    )
                    break
            else:
                counts["builtin"] += 1
    customs = ", ".join(f"{k[1]} ({k[0]})" for k in crds)
    step.detail = (
        f"{counts['builtin']} objects x Kubernetes {', '.join(K8S_VERSIONS)} strict; "
        f"{counts['custom']} custom resources against k8s/schemas"
    )
    print(f"  custom kinds validated against hand-written subset schemas: {customs}")


# --- what the code says ----------------------------------------------------------------------


def parse(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def py_files(*roots: pathlib.Path) -> Iterator[pathlib.Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def env_reads(*roots: pathlib.Path) -> dict[str, str]:
    """Environment variables the code reads directly: os.environ.get("X"), os.getenv("X"),
    os.environ["X"], and tables of (ENV_NAME, default) pairs that a loop feeds to
    os.environ.get. Maps the name to its default. (The gateway's service addresses come from
    services.toml: see read_code.)"""
    found: dict[str, str] = {}
    for path in py_files(*roots):
        tree = parse(path)
        indirect = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                fn = node.func
                is_get = isinstance(fn, ast.Attribute) and fn.attr == "get" and _is_environ(fn.value)
                is_getenv = isinstance(fn, ast.Attribute) and fn.attr == "getenv"
                if is_get or is_getenv:
                    arg = node.args[0]
                    default = node.args[1] if len(node.args) > 1 else None
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found[arg.value] = default.value if isinstance(default, ast.Constant) else ""
                    else:
                        indirect = True
            elif (
                isinstance(node, ast.Subscript)
                and _is_environ(node.value)
                and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ):
                found[node.slice.value] = ""
        if indirect:
            found.update(env_tables(tree))
    return found


def env_tables(tree: ast.Module) -> dict[str, str]:
    """Module-level dicts whose values are ("ENV_NAME", "default") pairs."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for v in node.value.values:
                if (
                    isinstance(v, ast.Tuple)
                    and len(v.elts) == 2
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in v.elts)
                    and re.fullmatch(r"[A-Z][A-Z0-9_]+", v.elts[0].value)
                ):
                    out[v.elts[0].value] = v.elts[1].value
    return out


def module_constant(path: pathlib.Path, name: str):
    for node in parse(path).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def attributes_used(*roots: pathlib.Path) -> set[str]:
    return {n.attr for p in py_files(*roots) for n in ast.walk(parse(p)) if isinstance(n, ast.Attribute)}


def http_routes(path: pathlib.Path) -> set[str]:
    """Paths of Flask routes declared as @app.get("/x") / @app.route("/x")."""
    routes = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr in ("get", "route", "post", "put", "patch", "delete")
                    and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                ):
                    routes.add(dec.args[0].value)
    return routes


@dataclass
class ServiceCode:
    """One gRPC service as its code declares it (ServiceSpec in <pkg>/__main__.py)."""

    name: str
    package: str
    folder: pathlib.Path
    default_port: int
    producer: bool  # publishes events: runs the outbox relay
    consumer: bool  # subscribes: runs the event consumers
    domain: str | None = None  # producer_domain

    @property
    def workers(self) -> int:
        return int(self.producer) + int(self.consumer)


def service_specs() -> dict[str, ServiceCode]:
    specs = {}
    for main in sorted(ROOT.glob("*/src/*/__main__.py")):
        for node in ast.walk(parse(main)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ServiceSpec":
                kw = {k.arg: k.value for k in node.keywords}
                name = ast.literal_eval(kw["name"])
                specs[name] = ServiceCode(
                    name=name,
                    package=main.parent.name,
                    folder=main.parents[2],
                    default_port=ast.literal_eval(kw["default_port"]),
                    producer="producer_domain" in kw
                    and not (isinstance(kw["producer_domain"], ast.Constant) and kw["producer_domain"].value is None),
                    consumer="subscriptions" in kw,
                    domain=kw["producer_domain"].value if isinstance(kw.get("producer_domain"), ast.Constant) else None,
                )
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parts_spec":
                # crm_chassis.parts.parts_spec(name, port, __file__, domain, PARTS): a service of
                # parts publishes (its domain) and consumes (its parts' subscriptions).
                name, port, _file, domain = (
                    ast.literal_eval(a) if i != 2 else None for i, a in enumerate(node.args[:4])
                )
                specs[name] = ServiceCode(
                    name=name,
                    package=main.parent.name,
                    folder=main.parents[2],
                    default_port=port,
                    producer=domain is not None,
                    consumer=True,
                    domain=domain,
                )
    return specs


class RecordingEnv(Mapping):
    """An environment that remembers every variable load_settings() asks for."""

    def __init__(self, values: Mapping[str, str]):
        self.values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return self.values[key]

    def __contains__(self, key):
        self.read.add(key)
        return key in self.values

    def get(self, key, default=None):
        self.read.add(key)
        return self.values.get(key, default)

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


CONFIG_PY = ROOT / "chassis" / "src" / "crm_chassis" / "config.py"


def chassis_config():
    """crm_chassis.config, imported from the source tree (it needs only the standard library).
    None if it ever grows a third-party import: the check then falls back to reading its source."""
    sys.path.insert(0, str(ROOT / "chassis" / "src"))
    try:
        from crm_chassis import config
    except ImportError as exc:
        print(f"  note crm_chassis.config does not import here ({exc}); reading its source instead")
        return None
    finally:
        sys.path.pop(0)
    return config


def config_env_names() -> set[str]:
    """Fallback: the variables config.py reads, from its source: env.get("X"), helper(env, "X"),
    "X" in env."""
    names = set()
    for node in ast.walk(parse(CONFIG_PY)):
        if isinstance(node, ast.Call):
            fn = node.func
            on_env = isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "env"
            # env.get("X", default) or helper(env, "X", default, ...): the name follows env.
            args = node.args if on_env else node.args[1:]
            after_env = on_env or (node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "env")
            if after_env and args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                names.add(args[0].value)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
            and any(isinstance(c, ast.Name) and c.id == "env" for c in node.comparators)
        ):
            names.add(node.left.value)
    return names


def settings_read(config, name: str, port: int, env: Mapping[str, str]) -> tuple[set[str], list[str]]:
    """(variables load_settings reads, its problems) for this environment and an empty one."""
    if config is None:
        return config_env_names(), []
    read: set[str] = set()
    problems: list[str] = []
    for values in ({}, env):
        rec = RecordingEnv(values)
        try:
            config.load_settings(name, port, env=rec)
        except config.ConfigError as err:
            if values:
                problems = err.problems
        read |= rec.read
    return read, problems


# --- what the manifests say ------------------------------------------------------------------


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(sel: dict | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector; an empty selector matches everything."""
    if sel is None:
        return False
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for expr in sel.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def port_allowed(ports: list[dict] | None, port: int, port_name: str | None) -> bool:
    if not ports:
        return True
    return any(p.get("port") in (None, port, port_name) and p.get("protocol", "TCP") == "TCP" for p in ports)


def policy_admits(render: Render, src: dict, dst: dict, port: int, port_name: str | None) -> list[str]:
    """Why NetworkPolicies (same namespace) would block src -> dst:port; empty when allowed."""
    problems = []
    src_labels, dst_labels = pod_labels(src), pod_labels(dst)
    policies = list(render.objects("NetworkPolicy"))

    def applies(pol, labels, kind):
        types = pol["spec"].get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in pol["spec"] else []))
        return kind in types and label_selector_matches(pol["spec"].get("podSelector", {}), labels)

    def peer_ok(peers, labels):
        if not peers:
            return True
        for peer in peers:
            if "ipBlock" in peer:
                continue
            if "namespaceSelector" in peer and peer["namespaceSelector"] != {}:
                continue  # another namespace: not this caller
            if "podSelector" not in peer or label_selector_matches(peer["podSelector"], labels):
                return True
        return False

    ingress = [p for p in policies if applies(p, dst_labels, "Ingress")]
    if ingress and not any(
        peer_ok(rule.get("from"), src_labels) and port_allowed(rule.get("ports"), port, port_name)
        for pol in ingress
        for rule in pol["spec"].get("ingress") or []
    ):
        problems.append(
            f"ingress policy {', '.join(p['metadata']['name'] for p in ingress)} does not admit "
            f"{src['metadata']['name']} on {port}"
        )
    egress = [p for p in policies if applies(p, src_labels, "Egress")]
    if egress and not any(
        peer_ok(rule.get("to"), dst_labels) and port_allowed(rule.get("ports"), port, port_name)
        for pol in egress
        for rule in pol["spec"].get("egress") or []
    ):
        problems.append(
            f"egress policy {', '.join(p['metadata']['name'] for p in egress)} does not let "
            f"{src['metadata']['name']} reach {dst['metadata']['name']}:{port}"
        )
    return problems


@dataclass
class EnvVar:
    name: str
    value: str | None = None  # literal (env value or ConfigMap data)
    source: str = ""  # "env", "configmap <name>", "secret <name>/<key>", "field", "unresolved ..."
    secret: tuple[str, str] | None = None


def container_env(render: Render, container: dict) -> dict[str, EnvVar]:
    env: dict[str, EnvVar] = {}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            cm_name = src["configMapRef"]["name"]
            cm = render.get("ConfigMap", cm_name)
            if cm is None:
                env[f"<configmap {cm_name}>"] = EnvVar(f"<configmap {cm_name}>", source="unresolved")
                continue
            for k, v in (cm.get("data") or {}).items():
                env[src.get("prefix", "") + k] = EnvVar(k, str(v), f"configmap {cm_name}")
        if "secretRef" in src:
            env[f"<secret {src['secretRef']['name']}>"] = EnvVar("*", source=f"secret {src['secretRef']['name']}/*")
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = EnvVar(name, str(item["value"]), "env")
        elif "valueFrom" in item and "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[name] = EnvVar(name, None, f"secret {ref['name']}/{ref['key']}", (ref["name"], ref["key"]))
        elif "valueFrom" in item and "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            cm = render.get("ConfigMap", ref["name"])
            value = (cm.get("data") or {}).get(ref["key"]) if cm else None
            env[name] = EnvVar(name, value, f"configmap {ref['name']}/{ref['key']}")
        else:
            env[name] = EnvVar(name, None, "field")
    return env


def secret_value(render: Render, ref: tuple[str, str]) -> tuple[str, str | None]:
    """('in-render'|'cnpg'|'external'|'missing-key', value if known)."""
    import base64

    name, key = ref
    secret = render.get("Secret", name)
    if secret is not None:
        if key in (secret.get("stringData") or {}):
            return "in-render", secret["stringData"][key]
        if key in (secret.get("data") or {}):
            return "in-render", base64.b64decode(secret["data"][key]).decode()
        return "missing-key", None
    for cluster in render.objects("Cluster"):
        if (
            cluster.get("apiVersion", "").startswith("postgresql.cnpg.io/")
            and name == cluster["metadata"]["name"] + "-app"
        ):
            return ("cnpg", None) if key in CNPG_APP_SECRET_KEYS else ("missing-key", None)
    return "external", None


def writable_dirs(pod_spec: dict, container: dict) -> list[str]:
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    out = []
    for m in container.get("volumeMounts") or []:
        vol = volumes.get(m["name"], {})
        if not m.get("readOnly") and ("emptyDir" in vol or "ephemeral" in vol or "persistentVolumeClaim" in vol):
            out.append(m["mountPath"].rstrip("/") or "/")
    return out


def under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def probe_ports(container: dict) -> dict[str, object]:
    out = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            continue
        for handler in ("grpc", "httpGet", "tcpSocket"):
            if handler in probe:
                out[kind] = (handler, probe[handler].get("port"), probe[handler].get("path"))
    return out


def resolve_port(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p["containerPort"]
    return None


def prestop_seconds(container: dict) -> int:
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    return 0


# --- consistency -----------------------------------------------------------------------------


@dataclass
class Code:
    config: object
    registry: object  # crm_chassis.registry.Registry (services.toml)
    specs: dict[str, ServiceCode]
    chassis_env: dict[str, str]
    gateway_env: dict[str, str]
    gateway_targets: dict[str, str]  # CUSTOMER_SVC_ADDR -> localhost:50051
    gateway_fields: set[str]
    gateway_routes: set[str]
    gunicorn_graceful: int
    gateway_default_port: int


def read_code() -> Code:
    gateway_src = ROOT / "gateway" / "src" / "crm_gateway"
    gunicorn_conf = ROOT / "gateway" / "gunicorn.conf.py"
    reg = registry_tool.load()
    # crm_gateway.clients builds its address map from services.toml ([gateway] calls).
    targets = dict(reg.gateway_targets().values())
    bind = env_reads(gunicorn_conf)
    return Code(
        config=chassis_config(),
        registry=reg,
        specs=service_specs(),
        chassis_env=env_reads(ROOT / "chassis" / "src"),
        gateway_env=env_reads(gateway_src, gunicorn_conf) | targets,
        gateway_targets=targets,
        gateway_fields=attributes_used(gateway_src, ROOT / "chassis" / "src" / "crm_chassis" / "auth.py"),
        gateway_routes=http_routes(gateway_src / "app.py"),
        gunicorn_graceful=int(module_constant(gunicorn_conf, "graceful_timeout") or 30),
        gateway_default_port=int(bind.get("GATEWAY_PORT") or 8080),
    )


def check_registry(step: Step, code: Code) -> None:
    """services.toml, the services' code (ServiceSpec), their folders and k8s bases agree."""
    reg = code.registry
    before_registry = len(step.failures)
    listed = {s.name: s for s in reg.services}
    for name, entry in listed.items():
        where = f"services.toml [services.{name}]"
        spec = code.specs.get(name)
        if spec is None:
            step.fail(f"{where}: no ServiceSpec(name={name!r}) in {entry.folder}/src/{entry.package}/__main__.py")
            continue
        if spec.folder != ROOT / entry.folder or spec.package != entry.package:
            step.fail(
                f"{where}: package {entry.folder}/src/{entry.package}, but the ServiceSpec is in "
                f"{spec.folder.relative_to(ROOT)}/src/{spec.package}"
            )
        if spec.default_port != entry.port:
            step.fail(f"{where}: port {entry.port} != ServiceSpec default_port {spec.default_port}")
        if spec.producer != entry.publishes:
            step.fail(f"{where}: publishes={entry.publishes}, but the ServiceSpec producer_domain says {spec.producer}")
        if spec.producer and spec.domain != entry.domain:
            step.fail(f"{where}: domain {entry.domain!r} != ServiceSpec producer_domain {spec.domain!r}")
        if not (K8S / "base" / name / "kustomization.yaml").is_file():
            step.fail(f"{where}: no k8s base k8s/base/{name} (python3 tools/new_service.py makes one)")
    for name, spec in code.specs.items():
        if name not in listed:
            step.fail(f"{spec.folder.relative_to(ROOT)}: ServiceSpec {name!r} is not in services.toml")
    for d in sorted((K8S / "base").iterdir()):
        if d.is_dir() and d.name not in listed and d.name != "gateway":
            step.fail(f"k8s/base/{d.name}: not a service in services.toml")
    if reg.gateway is None:
        step.fail("services.toml: no [gateway] table")
    elif reg.gateway.port != code.gateway_default_port:
        step.fail(f"services.toml [gateway]: port {reg.gateway.port} != gunicorn.conf.py's {code.gateway_default_port}")
    if len(step.failures) == before_registry:
        print(f"  ok   services.toml: {len(listed)} services agree with their ServiceSpec and have a k8s base")


def check_dockerfiles(step: Step, code: Code) -> None:
    """One Dockerfile builds every image: SERVICE selects it, the entrypoint comes from the registry."""
    df = ROOT / "Dockerfile"
    if not df.is_file():
        step.fail("Dockerfile (repository root) missing")
        return
    text = df.read_text()
    before = len(step.failures)
    for pattern, what in (
        (r"^ARG SERVICE$", "the build argument SERVICE"),
        (r'tools/registry\.py entrypoint "\$\{SERVICE\}"', "the entrypoint written by tools/registry.py"),
        (r'^ENTRYPOINT \["/usr/local/bin/crm-entrypoint"\]$', "the exec-form ENTRYPOINT crm-entrypoint"),
        (r"^USER \d+", "a numeric non-root USER"),
        (r"^\s+CRM_REGISTRY=/app/services\.toml", "CRM_REGISTRY (the gateway reads services.toml)"),
    ):
        if not re.search(pattern, text, re.M):
            step.fail(f"Dockerfile: {what} missing")
    others = [f for f in dockerfiles() if f != df]
    for f in others:
        step.fail(f"{f.relative_to(ROOT)}: a second Dockerfile (the root Dockerfile builds every image)")
    reg = code.registry
    for entry in reg.services:
        script = registry_tool.entrypoint(reg, entry.name)
        if f"exec python -m {entry.package} " not in script:
            step.fail(f"Dockerfile: {entry.name}'s entrypoint does not run python -m {entry.package}: {script!r}")
    if reg.gateway and "crm_gateway:create_app()" not in registry_tool.entrypoint(reg, reg.gateway.name):
        step.fail("Dockerfile: the gateway's entrypoint does not run gunicorn crm_gateway:create_app()")
    if len(step.failures) == before:
        print(f"  ok   Dockerfile: one image definition for {len(reg.services)} services and the gateway")


def check_render(step: Step, code: Code, render: Render, external: dict[str, set[str]]) -> int:
    """The manifests of one render agree with the code. Returns how many workloads it checked."""
    t = render.target
    deployments = {d["metadata"]["name"]: d for d in render.objects("Deployment")}
    services = list(render.objects("Service"))
    checked = 0
    jwt_views: dict[str, tuple] = {}

    if render.is_base:
        name = t.split("/", 1)[1]
        want = GATEWAY_KINDS if name == "gateway" else BASE_KINDS
        have = {d["kind"] for d in render.docs}
        if want - have:
            step.fail(f"{t}: base lacks {', '.join(sorted(want - have))}")
        if name not in deployments:
            step.fail(f"{t}: no Deployment named {name}")

    for name, dep in deployments.items():
        spec = code.specs.get(name)
        is_gateway = name == "gateway"
        if spec is None and not is_gateway:
            continue  # third-party workload (collector, ...)
        checked += 1
        where = f"{t}: Deployment/{name}"
        pod = dep["spec"]["template"]["spec"]
        labels = pod_labels(dep)
        containers = {c["name"]: c for c in pod["containers"]}
        main = containers.get(name)
        if main is None:
            step.fail(f"{where}: no container named {name}")
            continue

        # --- every setting the code reads is provided, secrets by reference ----------------
        to_check = [main] + list(pod.get("initContainers") or [])
        for c in to_check:
            cwhere = f"{where} container {c['name']}"
            env = container_env(render, c)
            for k, v in env.items():
                if v.source == "unresolved":
                    step.fail(f"{cwhere}: envFrom {k} is not in the rendered output")
            literal = {k: v.value for k, v in env.items() if v.value is not None}
            values = dict(literal)
            for k, v in env.items():
                if v.secret:
                    kind, val = secret_value(render, v.secret)
                    if kind == "missing-key":
                        step.fail(f"{cwhere}: {k} -> Secret {v.secret[0]} has no key {v.secret[1]}")
                    elif kind == "external":
                        external.setdefault(t, set()).add(f"{v.secret[0]} (key {v.secret[1]})")
                    values[k] = val if val is not None else SECRET_PLACEHOLDERS.get(k, "placeholder")
            if is_gateway:
                read, problems = settings_read(code.config, "gateway", code.gateway_default_port, values)
                used = {f for f in SERVICE_ONLY.values() if f in code.gateway_fields}
                if used:
                    step.fail(
                        f"{cwhere}: the gateway now uses Settings.{', '.join(sorted(used))}: "
                        "drop them from SERVICE_ONLY in tools/k8s_check.py and provide them"
                    )
                required = (read | set(code.chassis_env)) - set(SERVICE_ONLY)
                required |= set(code.gateway_env)
            else:
                read, problems = settings_read(code.config, spec.name, spec.default_port, values)
                required = read | set(code.chassis_env) | set(env_reads(spec.folder / "src"))
            for p in problems:
                step.fail(f"{cwhere}: load_settings() rejects the manifest's environment: {p}")
            missing = sorted(required - set(env))
            if missing:
                step.fail(f"{cwhere}: settings the code reads are not provided: {', '.join(missing)}")
            for k in SECRET_SETTINGS:
                if k in required and k in env and not env[k].secret:
                    step.fail(f"{cwhere}: {k} must come from a secretKeyRef, not {env[k].source}")
            # Variables no code reads: a typo (the real name is then reported missing above) or
            # a setting the code has dropped. A note, not a failure: a manifest may lead the code.
            known = required | {"HOME", "POD_IP", "GOMEMLIMIT"} | set(SECRET_SETTINGS)
            extra = sorted(k for k in env if k not in known and not k.startswith("<"))
            if extra and c is main:
                step.note(f"{cwhere}: sets variables no code reads: {', '.join(extra)}")
            ro = (c.get("securityContext") or {}).get("readOnlyRootFilesystem")
            if not ro:
                step.fail(f"{cwhere}: readOnlyRootFilesystem is not true")
            writable = writable_dirs(pod, c)
            for k in ("CRM_RUN_DIR", "GUNICORN_TMP_DIR", "HOME"):
                if k in literal and literal[k] and not under(literal[k], writable):
                    step.fail(f"{cwhere}: {k}={literal[k]} is not on a writable volume ({writable or 'none'})")
            if c is main:
                main_env = env
                main_values = values

        jwt_views[name] = (
            main_values.get("JWT_ALGORITHM"),
            main_values.get("JWT_ISSUER"),
            main_values.get("JWT_AUDIENCE"),
            main_env["JWT_SECRET"].secret if "JWT_SECRET" in main_env else None,
        )

        # --- ports and probes ---------------------------------------------------------------
        probes = probe_ports(main)
        for kind in ("readinessProbe", "livenessProbe"):
            if kind not in probes:
                step.fail(f"{where}: no {kind}")
        if is_gateway:
            port = int(main_values.get("GATEWAY_PORT") or code.gateway_default_port)
            port_name = "http"
            if port != code.gateway_default_port:
                step.note(f"{where}: GATEWAY_PORT={port} differs from the code's default {code.gateway_default_port}")
            for kind, (handler, p, path) in probes.items():
                if handler != "httpGet":
                    step.fail(f"{where}: {kind} should be an httpGet probe on the gateway")
                if resolve_port(main, p) != port:
                    step.fail(f"{where}: {kind} port {p} != GATEWAY_PORT {port}")
                if path and path not in code.gateway_routes:
                    step.fail(f"{where}: {kind} path {path} is not a route of crm_gateway.app")
            drain = code.gunicorn_graceful
            drain_what = f"gunicorn graceful_timeout {drain}"
        else:
            port = spec.default_port
            port_name = "grpc"
            if main_values.get("SERVICE_NAME") != spec.name:
                step.fail(f"{where}: SERVICE_NAME={main_values.get('SERVICE_NAME')} != ServiceSpec name {spec.name}")
            if str(main_values.get("GRPC_PORT")) != str(port):
                step.fail(f"{where}: GRPC_PORT={main_values.get('GRPC_PORT')} != ServiceSpec default_port {port}")
            for kind, (handler, p, _path) in probes.items():
                if handler != "grpc":
                    step.fail(f"{where}: {kind} is {handler}; use the native gRPC probe on the health service")
                if resolve_port(main, p) != port:
                    step.fail(f"{where}: {kind} port {p} != the service's port {port}")
            grace = float(main_values.get("SHUTDOWN_GRACE_SECONDS") or 10)
            drain = grace * (1 + spec.workers)
            drain_what = (
                f"SHUTDOWN_GRACE_SECONDS {grace:g} x (1 + {spec.workers} background worker"
                f"{'s' if spec.workers != 1 else ''})"
            )
            inits = [c for c in pod.get("initContainers") or [] if c.get("args") == ["migrate"]]
            if not inits:
                step.fail(f"{where}: no `migrate` init container (migrations as an init container)")
            elif inits[0]["image"] != main["image"]:
                step.fail(f"{where}: the migrate init container runs {inits[0]['image']}, not {main['image']}")
            if main.get("args") not in (None, ["serve"]):
                step.fail(f"{where}: container args {main.get('args')} (expected serve)")
        cports = {p["containerPort"]: p.get("name") for p in main.get("ports") or []}
        if cports.get(port) != port_name:
            step.fail(f"{where}: no containerPort {port} named {port_name} (has {cports})")
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        pre = prestop_seconds(main)
        if not tgps > pre + drain:
            step.fail(f"{where}: terminationGracePeriodSeconds {tgps} is not longer than preStop {pre} + {drain_what}")

        # --- a Service fronts it with the right port ---------------------------------------
        fronting = [s for s in services if selects(s["spec"].get("selector"), labels)]
        if not fronting:
            step.fail(f"{where}: no Service selects its pods")
        declared = {p["containerPort"] for p in main.get("ports") or []}
        for s in list(fronting):
            targets = [resolve_port(main, sp.get("targetPort", sp["port"])) for sp in s["spec"].get("ports", [])]
            if targets and port not in targets and all(x in declared for x in targets):
                fronting.remove(s)  # another protocol of the same pods (support-svc's SMTP), its own port
        if not fronting:
            step.fail(f"{where}: no Service selects its pods on its gRPC port")
        for s in fronting:
            for sp in s["spec"].get("ports", []):
                if resolve_port(main, sp.get("targetPort", sp["port"])) != port:
                    step.fail(
                        f"{t}: Service/{s['metadata']['name']} port {sp.get('name')} targets "
                        f"{sp.get('targetPort')}, not the container's {port}"
                    )
            if not is_gateway and not any(sp.get("name") == "grpc" and sp["port"] == port for sp in s["spec"]["ports"]):
                step.fail(f"{t}: Service/{s['metadata']['name']} has no port named grpc = {port}")
        # HPA, PDB, ServiceAccount point at it.
        if not any(h["spec"]["scaleTargetRef"]["name"] == name for h in render.objects("HorizontalPodAutoscaler")):
            step.fail(f"{where}: no HorizontalPodAutoscaler targets it")
        if not any(
            label_selector_matches(p["spec"]["selector"], labels) for p in render.objects("PodDisruptionBudget")
        ):
            step.fail(f"{where}: no PodDisruptionBudget selects its pods")
        sa = pod.get("serviceAccountName")
        if not sa or render.get("ServiceAccount", sa) is None:
            step.fail(f"{where}: serviceAccountName {sa!r} is not in the rendered output")
        if not any(label_selector_matches(p["spec"]["podSelector"], labels) for p in render.objects("NetworkPolicy")):
            step.fail(f"{where}: no NetworkPolicy selects its pods")

        # --- the gateway reaches every service it calls ------------------------------------
        if is_gateway:
            for env_name, default in code.gateway_targets.items():
                value = main_values.get(env_name)
                if not value:
                    continue  # reported above as a missing setting
                target = value.removeprefix("dns:///")
                host, _, tport = target.rpartition(":")
                default_port = int(default.rpartition(":")[2])
                svc_host = host.split(".")[0]
                if not tport.isdigit():
                    step.fail(f"{where}: {env_name}={value} has no port")
                    continue
                tport = int(tport)
                callee = next((s for s in code.specs.values() if s.default_port == default_port), None)
                if callee and svc_host != callee.name:
                    step.fail(
                        f"{where}: {env_name}={value} names {svc_host}, but port {default_port} "
                        f"(the code's default) belongs to {callee.name}"
                    )
                svc = render.get("Service", svc_host)
                if svc is None:
                    if render.is_base:
                        step.note(
                            f"{t}: {env_name}={value}: Service {svc_host} comes with its own base "
                            "(checked in the overlays)"
                        )
                    else:
                        step.fail(f"{where}: {env_name}={value} but there is no Service {svc_host}")
                    continue
                sport = next((p for p in svc["spec"]["ports"] if p["port"] == tport), None)
                if sport is None:
                    step.fail(f"{where}: {env_name}={value} but Service {svc_host} has no port {tport}")
                    continue
                backends = [d for d in deployments.values() if selects(svc["spec"].get("selector"), pod_labels(d))]
                if not backends:
                    step.fail(f"{where}: Service {svc_host} selects no Deployment")
                    continue
                for b in backends:
                    bmain = next(c for c in b["spec"]["template"]["spec"]["containers"])
                    bport = resolve_port(bmain, sport.get("targetPort", sport["port"]))
                    bspec = code.specs.get(b["metadata"]["name"])
                    if bspec and bport != bspec.default_port:
                        step.fail(
                            f"{where}: {env_name} -> {svc_host}:{tport} -> container port {bport}, "
                            f"but {bspec.name} listens on {bspec.default_port}"
                        )
                    for why in policy_admits(render, dep, b, bport, sport.get("name")):
                        step.fail(f"{where}: {env_name} -> {svc_host}:{tport}: {why}")
                print(
                    f"  ok   {t}: gateway {env_name}={value} -> Service {svc_host}:{tport} -> "
                    f"{', '.join(b['metadata']['name'] for b in backends)} (NetworkPolicies admit it)"
                )

    # One JWT configuration across the suite, or tokens would not verify everywhere.
    if len(set(jwt_views.values())) > 1:
        step.fail(f"{t}: JWT settings or the JWT secret differ between workloads: {jwt_views}")
    # The dev overlay is self-contained: every Secret it references is in it.
    if t == "overlays/dev" and external.get(t):
        step.fail(f"{t}: references Secrets it does not create: {', '.join(sorted(external[t]))}")
    return checked


def check_consistency(step: Step, renders: list[Render]) -> None:
    code = read_code()
    print(
        f"  code: services {', '.join(f'{s.name}:{s.default_port}' for s in code.specs.values())}; "
        f"gateway calls {', '.join(f'{k}' for k in code.gateway_targets)}"
    )
    check_registry(step, code)
    check_dockerfiles(step, code)
    external: dict[str, set[str]] = {}
    workloads = 0
    for r in renders:
        before = len(step.failures)
        n = check_render(step, code, r, external)
        workloads += n
        if len(step.failures) == before:
            print(f"  ok   {r.target}: {n} workload{'s' if n != 1 else ''} agree with the code")
    for t, names in sorted(external.items()):
        if t.startswith("overlays/"):
            step.note(f"{t} expects these Secrets to exist in the cluster: {', '.join(sorted(names))}")
    ingress_tls = {
        tls["secretName"]
        for r in renders
        if not r.is_base
        for i in r.objects("Ingress")
        for tls in i["spec"].get("tls") or []
    }
    if ingress_tls:
        step.note(f"Ingress TLS Secrets (from cert-manager or the platform): {', '.join(sorted(ingress_tls))}")
    step.detail = f"{workloads} workload renders checked against the code"


# --- policy scans ----------------------------------------------------------------------------


def dockerfiles() -> list[pathlib.Path]:
    skip = {".git", ".venv", ".venv-k8s", "node_modules", "build"}
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".venv")]
        out += [pathlib.Path(dirpath) / f for f in filenames if f == "Dockerfile" or f.endswith(".Dockerfile")]
    return sorted(out)


def run_hadolint(step: Step) -> None:
    files = dockerfiles()
    if not files:
        step.fail("no Dockerfile found")
        return
    proc = subprocess.run([tool("hadolint"), "--no-color", *map(str, files)], capture_output=True, text=True, cwd=ROOT)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        for line in out.splitlines():
            step.fail(line.replace(str(ROOT) + "/", ""))
    step.detail = f"{len(files)} Dockerfiles, {'no findings' if proc.returncode == 0 else 'findings'}"
    for f in files:
        print(f"  {'ok  ' if proc.returncode == 0 else '    '} {f.relative_to(ROOT)}")


def run_checkov(step: Step) -> None:
    for check, reason in CHECKOV_SKIPS.items():
        print(f"  skip {check}: {reason}")
    cmd = [
        tool("checkov"),
        "--directory",
        str(OUT),
        "--framework",
        "kubernetes",
        "--skip-download",
        "--skip-check",
        ",".join(CHECKOV_SKIPS),
        "--output",
        "json",
        "--quiet",
        "--compact",
    ]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false", LOG_LEVEL="WARNING")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        step.fail(f"checkov did not report (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        return
    if isinstance(report, list):
        report = next((r for r in report if r.get("check_type") == "kubernetes"), report[0] if report else {})
    summary = report.get("summary", {})
    failed = (report.get("results") or {}).get("failed_checks") or []
    for f in failed:
        step.fail(
            f"{f['check_id']} {f['check_name']}: {f['resource']} in "
            f"{pathlib.Path(f['file_path']).name}:{f['file_line_range'][0]}"
        )
    if not summary and proc.returncode != 0:
        step.fail(f"checkov exit {proc.returncode}: {(proc.stderr or '')[-2000:]}")
    step.detail = (
        f"passed {summary.get('passed', 0)}, failed {summary.get('failed', 0)}; "
        f"not run, by name: {', '.join(CHECKOV_SKIPS)} (reasons above)"
    )
    print(f"  {step.detail}")


# --- main ------------------------------------------------------------------------------------


STEPS = ("render", "schema", "consistency", "hadolint", "checkov")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated steps among {', '.join(STEPS)} (render always runs)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(STEPS)
    unknown = only - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")

    steps = [Step(name) for name in STEPS]
    by_name = {s.name: s for s in steps}
    started = time.perf_counter()
    renders: list[Render] = []

    def run(name, fn, *a):
        step = by_name[name]
        if name != "render" and name not in only:
            step.skipped = True
            return None
        banner(name)
        t0 = time.perf_counter()
        try:
            result = fn(step, *a)
        except Exception as exc:  # a crash in one step is a failure of that step, not of the run
            step.fail(f"{type(exc).__name__}: {exc}")
            result = None
        step.seconds = time.perf_counter() - t0
        return result

    renders = run("render", render_all) or []
    run("schema", validate_schemas, renders)
    run("consistency", check_consistency, renders)
    run("hadolint", run_hadolint)
    run("checkov", run_checkov)

    total = time.perf_counter() - started
    print(f"\n== k8s-check summary ({total:.1f}s)")
    for s in steps:
        status = "skipped" if s.skipped else ("FAIL" if s.failures else "ok")
        extra = f" ({len(s.failures)} failure{'s' if len(s.failures) != 1 else ''})" if s.failures else ""
        print(f"  {status:7} {s.name:12} {s.seconds:6.1f}s  {s.detail}{extra}")
    failed = sum(len(s.failures) for s in steps)
    ran = [s for s in steps if not s.skipped]
    if failed:
        print("\nfailures:")
        for s in steps:
            for f in s.failures:
                print(f"  [{s.name}] {f}")
    # Last line, in the plain "N passed, N failed" form (steps, not individual checks).
    print(
        f"k8s-check: {len(ran) - sum(bool(s.failures) for s in ran)} passed, "
        f"{sum(bool(s.failures) for s in ran)} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

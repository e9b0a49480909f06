"""Static checks of the deployment definitions under infra/ against the code they deploy.

Nothing here talks to a cluster: the checks tie every RayJob to a real CLI subcommand and a job
config that loads, every image to a Dockerfile, every ConfigMap to its kustomize generator, and
keep credentials out of the manifests. Each check is a function that returns the problems it
finds; the last tests feed it broken copies to show it can fail.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from jobs.cli import JOB_HELP, build_parser
from jobs.config import JOB_CONFIGS, load_job_config
from sa2crq.config import read_config_file

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
CONFIGS = INFRA / "configs"

SPARK = INFRA / "spark"
DOCKER = INFRA / "docker"

AWS_SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"}
AWS_SECRET_NAME = "sa2crq-aws"
JOB_CONFIG_MAP = "sa2crq-configs"
ENV_CONFIG_MAP = "sa2crq-env"


def job_configs() -> list[Path]:
    """The example job configs (every YAML file of infra/configs but its kustomization)."""
    return sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "kustomization.yaml")


# --- loading ------------------------------------------------------------------------------------


def manifest_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document of every file under infra/kuberay (kustomization included)."""
    docs = []
    for path in sorted(KUBERAY.glob("*.y*ml")):
        with path.open() as f:
            docs.extend((path, doc) for doc in yaml.safe_load_all(f) if doc is not None)
    return docs


def rayjobs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in manifest_docs() if doc.get("kind") == "RayJob"]


def kustomizations(directory: Path = KUBERAY) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The kustomization of ``directory`` and of every directory it lists as a resource."""
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    yield directory, data
    for resource in data.get("resources", []):
        target = (directory / resource).resolve()
        if target.is_dir():
            yield from kustomizations(target)


def generated_config_maps() -> dict[str, dict[str, Any]]:
    """ConfigMap name -> {"dir": kustomization dir, "files": {key: path}, "literals": {k: v}}."""
    maps: dict[str, dict[str, Any]] = {}
    for directory, data in kustomizations():
        for gen in data.get("configMapGenerator", []):
            files = {}
            for entry in gen.get("files", []):
                key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
                files[key] = directory / path
            literals = dict(item.split("=", 1) for item in gen.get("literals", []))
            maps[gen["name"]] = {"dir": directory, "files": files, "literals": literals}
    return maps


def dockerfile_images() -> dict[str, str]:
    """Dockerfile name -> the image it builds, from its ``# image: NAME`` header line."""
    images = {}
    for path in sorted(DOCKER.glob("Dockerfile*")):
        found = re.findall(r"^# image:\s*(\S+)\s*$", path.read_text(), flags=re.M)
        assert len(found) == 1, f"{path.name} must name its image once in a '# image: NAME' line"
        images[path.name] = found[0]
    return images


def cli_subcommands() -> dict[str, Any]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container spec at any depth (as kustomize's image transformer finds them)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def pod_specs(rayjob: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(kind, {}).get("nvidia.com/gpu", 0)) for kind in ("limits", "requests"))


def job_config_wants_gpu(config: Any) -> bool:
    ray = getattr(config, "ray", None)
    return ray is not None and (ray.use_gpu or ray.gpus_per_actor > 0)


# --- checks (each returns a list of problems) ---------------------------------------------------


def check_entrypoint(rayjob: dict[str, Any]) -> list[str]:
    """`sa2crq <job> --config /mounted/<file>.yaml ...`: a real job subcommand whose arguments the
    CLI parser accepts, a config file in infra/configs that loads for that job, mounted from the
    job-config ConfigMap."""
    problems = []
    argv = shlex.split(rayjob["spec"].get("entrypoint", ""))
    if len(argv) < 2 or argv[0] != "sa2crq":
        return [f"entrypoint {argv!r} must run the sa2crq console script"]
    job = argv[1]
    if job not in cli_subcommands() or job not in JOB_CONFIGS:
        return [f"entrypoint runs {job!r}, which is not a job subcommand of the sa2crq CLI"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return [f"the sa2crq CLI rejects the entrypoint arguments {argv[1:]!r}"]
    if not args.config:
        return [f"entrypoint {argv!r} names no --config"]
    config_file = CONFIGS / Path(args.config).name
    if not config_file.is_file():
        return [f"--config {args.config}: infra/configs has no {config_file.name}"]
    try:
        load_job_config(job, str(config_file), list(args.assignments))
    except (ValueError, TypeError) as err:
        problems.append(f"{config_file.name} does not load as the {job} config: {err}")
    generated = generated_config_maps().get(JOB_CONFIG_MAP, {"files": {}})
    if Path(args.config).name not in generated["files"]:
        problems.append(f"{Path(args.config).name} is not in the ConfigMap {JOB_CONFIG_MAP}")
    head = next(spec for name, spec in pod_specs(rayjob) if name == "head")
    volumes = {v["name"]: v.get("configMap", {}).get("name") for v in head.get("volumes", [])}
    mounts = {
        m["mountPath"].rstrip("/"): volumes.get(m["name"])
        for c in head.get("containers", [])
        for m in c.get("volumeMounts", [])
    }
    if mounts.get(str(Path(args.config).parent)) != JOB_CONFIG_MAP:
        problems.append(f"{Path(args.config).parent} is not a mount of the ConfigMap {JOB_CONFIG_MAP} on the head")
    return problems


def check_rayjob_shape(rayjob: dict[str, Any]) -> list[str]:
    problems = []
    spec = rayjob.get("spec", {})
    if rayjob.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {rayjob.get('apiVersion')!r} is not ray.io/v1")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append("ttlSecondsAfterFinished must be set (seconds)")
    if "submitterPodTemplate" in spec:
        problems.append("use KubeRay's default submitter (no submitterPodTemplate)")
    cluster = spec.get("rayClusterSpec", {})
    if "headGroupSpec" not in cluster or not cluster.get("workerGroupSpecs"):
        problems.append("rayClusterSpec needs a head group and a worker group")
    for container in containers(spec):
        if any(e.get("name") == "RAY_ADDRESS" for e in container.get("env", [])):
            problems.append(f"container {container.get('name')} sets RAY_ADDRESS (KubeRay sets it)")
    return problems


def check_images_and_gpus(rayjob: dict[str, Any]) -> list[str]:
    """Only the images the Dockerfiles build; GPUs where (and only where) the job config asks for
    them, on the CUDA image; the CPU image everywhere in a CPU job."""
    problems = []
    images = dockerfile_images()
    cpu_image, cuda_image = images["Dockerfile"], images["Dockerfile.cuda"]
    for container in containers(rayjob):
        if container.get("image") not in images.values():
            problems.append(f"container {container.get('name')} runs {container.get('image')!r}, not an image of infra/docker")
        if gpus(container) and container.get("image") != cuda_image:
            problems.append(f"container {container.get('name')} asks for GPUs but runs {container.get('image')!r}")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    job = argv[1]
    config = load_job_config(job, str(CONFIGS / f"{job}.yaml"), [])
    gpu_groups = [name for name, spec in pod_specs(rayjob) if any(gpus(c) for c in spec.get("containers", []))]
    if job_config_wants_gpu(config):
        if not gpu_groups or "head" in gpu_groups:
            problems.append(f"{job}: its config asks for GPUs but no worker group has nvidia.com/gpu")
    else:
        if gpu_groups:
            problems.append(f"{job}: GPU pods in {gpu_groups} but its config uses no GPU")
        if any(c.get("image") != cpu_image for c in containers(rayjob)):
            problems.append(f"{job}: a CPU job must run {cpu_image} only")
    return problems


def check_credentials(doc: Any) -> list[str]:
    """No credential value inline; every Ray container takes the AWS Secret."""
    problems = []
    for container in containers(doc):
        for env in container.get("env", []):
            if env.get("name") in AWS_SECRET_ENV and "value" in env:
                problems.append(f"container {container.get('name')} has {env['name']} inline")
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if env.get("name") in AWS_SECRET_ENV and (not ref or ref.get("name") != AWS_SECRET_NAME):
                problems.append(f"container {container.get('name')}: {env['name']} must come from Secret {AWS_SECRET_NAME}")
        from_secret = any(e.get("secretRef", {}).get("name") == AWS_SECRET_NAME for e in container.get("envFrom", []))
        by_key = {e.get("name") for e in container.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef")}
        if doc.get("kind") == "RayJob" and not (from_secret or {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= by_key):
            problems.append(f"container {container.get('name')} does not take the Secret {AWS_SECRET_NAME}")
    return problems


def check_config_map_references(rayjob: dict[str, Any]) -> list[str]:
    generated = set(generated_config_maps())
    problems = []
    for _, spec in pod_specs(rayjob):
        for volume in spec.get("volumes", []):
            name = volume.get("configMap", {}).get("name")
            if name is not None and name not in generated:
                problems.append(f"volume {volume['name']} mounts ConfigMap {name!r}, which kustomize does not generate")
        for container in spec.get("containers", []):
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                if name is not None and name not in generated:
                    problems.append(f"container {container.get('name')} reads ConfigMap {name!r}, which kustomize does not generate")
    return problems


def check_script_paths(text: str) -> list[str]:
    """Every repository path a script names exists."""
    paths = set(re.findall(r"(?<![\w/.-])((?:infra|jobs|sa2crq|ray_workers|configs|tests)/[\w./-]*\w)", text))
    return [f"{path} does not exist" for path in sorted(paths) if not (ROOT / path).exists()]


# --- the real definitions -----------------------------------------------------------------------


def test_console_script_is_the_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["sa2crq"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr, None)), scripts["sa2crq"]
    assert (module, attr) == ("jobs.cli", "main")


def test_one_rayjob_per_job():
    jobs = sorted(shlex.split(doc["spec"]["entrypoint"])[1] for _, doc in rayjobs())
    assert jobs == sorted(JOB_HELP), jobs
    assert sorted(JOB_HELP) == sorted(JOB_CONFIGS)
    for path, doc in rayjobs():
        assert path.stem == shlex.split(doc["spec"]["entrypoint"])[1], path.name


@pytest.mark.parametrize("path,rayjob", rayjobs(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_rayjob(path, rayjob):
    problems = (
        check_entrypoint(rayjob)
        + check_rayjob_shape(rayjob)
        + check_images_and_gpus(rayjob)
        + check_credentials(rayjob)
        + check_config_map_references(rayjob)
    )
    assert not problems, f"{path.name}: {problems}"


def test_every_manifest_is_applied_and_keeps_credentials_out():
    listed = {r for _, data in kustomizations() for r in data.get("resources", [])}
    for path in sorted(KUBERAY.glob("*.y*ml")):
        if path.name != "kustomization.yaml":
            assert path.name in listed, f"{path.name} is not in infra/kuberay/kustomization.yaml"
    for path, doc in manifest_docs():
        assert not check_credentials(doc), (path.name, check_credentials(doc))
    for directory, data in kustomizations():
        assert "secretGenerator" not in data, f"{directory}: the AWS Secret is created by hand, not generated"
        for gen in data.get("configMapGenerator", []):
            assert not AWS_SECRET_ENV & {item.split("=", 1)[0] for item in gen.get("literals", [])}
    for path in sorted(INFRA.rglob("*")):
        if path.is_file():
            assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text()), f"{path}: an AWS access key id"


def test_config_map_generator_lists_exactly_the_configs():
    generated = generated_config_maps()[JOB_CONFIG_MAP]
    assert generated["dir"] == CONFIGS
    assert sorted(generated["files"]) == sorted(p.name for p in job_configs())
    assert all(path.is_file() and path.parent == CONFIGS for path in generated["files"].values())
    parser = build_parser()
    entrypoint_configs = {Path(parser.parse_args(shlex.split(doc["spec"]["entrypoint"])[1:]).config).name for _, doc in rayjobs()}
    assert entrypoint_configs == set(generated["files"])


def test_configs_load_and_name_the_cluster():
    """Each config loads for its job; an s3:// root names its endpoint (otherwise the job starts a
    local SeaweedFS), the one Ray pods get as AWS_ENDPOINT_URL; Ray and Spark attach to clusters."""
    env = generated_config_maps()[ENV_CONFIG_MAP]["literals"]
    for path in job_configs():
        config = load_job_config(path.stem, str(path), [])
        raw = read_config_file(path)
        assert config.storage.root.startswith("s3://"), path.name
        assert config.storage.endpoint_url, f"{path.name}: an s3:// root without endpoint_url starts a local server"
        assert config.storage.endpoint_url == env["AWS_ENDPOINT_URL"], path.name
        if "ray" in raw:
            assert config.ray.address == "auto", path.name
        if "spark" in raw:
            assert config.spark.direct_object_store is True, path.name
            assert not config.spark.master.startswith("local"), path.name


def test_spark_properties_match_pyspark():
    """hadoop-aws must be the exact Hadoop version of pyspark's own client jars."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    hadoop = {m.group(1) for p in jars.glob("hadoop-client-api-*.jar") if (m := re.search(r"api-(.+)\.jar$", p.name))}
    assert len(hadoop) == 1, hadoop
    props = {}
    for line in (SPARK / "spark-submit.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split(None, 1)
            assert key not in props, f"{key} set twice"
            props[key] = value.strip()
    assert f"org.apache.hadoop:hadoop-aws:{hadoop.pop()}" in props["spark.jars.packages"].split(",")
    assert props["spark.hadoop.fs.s3a.impl"] == "org.apache.hadoop.fs.s3a.S3AFileSystem"
    assert props["spark.sql.adaptive.enabled"] == "true"
    assert not {k for k in props if k.endswith((".access.key", ".secret.key", ".session.token"))}
    spark_conf = generated_config_maps()["sa2crq-spark-conf"]["files"]
    assert spark_conf == {"spark-defaults.conf": SPARK / "spark-submit.conf"}


def test_submit_script():
    text = (SPARK / "submit-recode.sh").read_text()
    assert not check_script_paths(text), check_script_paths(text)
    assert "infra/spark/spark-submit.conf" in text and "infra/configs/recode.yaml" in text
    assert "import jobs.cli" in text and " recode " in text
    assert "recode" in cli_subcommands()


# --- the checks can fail --------------------------------------------------------------------------


def _rayjob(job: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for path, doc in rayjobs() if path.stem == job))


def _set_entrypoint(doc: dict[str, Any], entrypoint: str) -> dict[str, Any]:
    doc["spec"]["entrypoint"] = entrypoint
    return doc


def _first_container(doc: dict[str, Any]) -> dict[str, Any]:
    return next(containers(doc))


def _worker_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


BROKEN = {
    "job-name typo": (check_entrypoint, lambda: _set_entrypoint(_rayjob("recode"), "sa2crq recdoe --config /etc/sa2crq/recode.yaml")),
    "not the console script": (check_entrypoint, lambda: _set_entrypoint(_rayjob("recode"), "python -m jobs.cli recode --config /etc/sa2crq/recode.yaml")),
    "unknown option": (check_entrypoint, lambda: _set_entrypoint(_rayjob("ingest"), "sa2crq ingest --confg /etc/sa2crq/ingest.yaml")),
    "missing config file": (check_entrypoint, lambda: _set_entrypoint(_rayjob("ingest"), "sa2crq ingest --config /etc/sa2crq/ingest-prod.yaml")),
    "config of another job": (check_entrypoint, lambda: _set_entrypoint(_rayjob("ingest"), "sa2crq ingest --config /etc/sa2crq/generate.yaml")),
    "bad --set": (check_entrypoint, lambda: _set_entrypoint(_rayjob("ingest"), "sa2crq ingest --config /etc/sa2crq/ingest.yaml --set ray.actorz=2")),
    "config not mounted there": (check_entrypoint, lambda: _set_entrypoint(_rayjob("ingest"), "sa2crq ingest --config /etc/other/ingest.yaml")),
    "no shutdown": (check_rayjob_shape, lambda: {**_rayjob("evaluate"), "spec": {**_rayjob("evaluate")["spec"], "shutdownAfterJobFinishes": False}}),
    "foreign image": (check_images_and_gpus, lambda: _mutate(_rayjob("ingest"), lambda d: _first_container(d).update(image="rayproject/ray:2.60.0"))),
    "GPU on the CPU image": (check_images_and_gpus, lambda: _mutate(_rayjob("train-retriever"), lambda d: _worker_container(d).update(image=dockerfile_images()["Dockerfile"]))),
    "GPU job without GPUs": (check_images_and_gpus, lambda: _mutate(_rayjob("generate"), lambda d: _worker_container(d).update(resources={"limits": {"cpu": "8"}}))),
    "CPU job on the CUDA image": (check_images_and_gpus, lambda: _mutate(_rayjob("recode"), lambda d: _worker_container(d).update(image=dockerfile_images()["Dockerfile.cuda"]))),
    "inline secret": (check_credentials, lambda: _mutate(_rayjob("ingest"), lambda d: _first_container(d).setdefault("env", []).append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}))),
    "no secret": (check_credentials, lambda: _mutate(_rayjob("ingest"), lambda d: _first_container(d).update(envFrom=[]))),
    "unknown ConfigMap": (check_config_map_references, lambda: _mutate(_rayjob("ingest"), lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["configMap"].update(name="sa2crq-config"))),
    "script names a missing file": (check_script_paths, lambda: "spark-submit --properties-file infra/spark/spark-sumbit.conf"),
}


def _mutate(doc: dict[str, Any], change) -> dict[str, Any]:
    change(doc)
    return doc


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checks_catch(case):
    check, broken = BROKEN[case]
    assert check(broken()), f"{check.__name__} missed: {case}"

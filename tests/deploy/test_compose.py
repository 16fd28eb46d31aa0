"""deploy/compose.gpu.yml: no Docker engine runs here, so its structure is checked from the YAML."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.support import REPO_ROOT

COMPOSE = REPO_ROOT / "deploy" / "compose.gpu.yml"
GPU = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Host path (relative to the compose file) -> container path, for the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            mounts[source] = target
    return mounts


def published(service: dict[str, Any]) -> set[int]:
    return {int(str(port).rsplit(":", 2)[-1]) for port in service.get("ports", [])}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_the_stack_is_the_gateway_prometheus_grafana_and_an_optional_dcgm_exporter() -> None:
    found = services()
    assert set(found) == {"gateway", "prometheus", "grafana", "dcgm-exporter"}
    assert [name for name, service in found.items() if "profiles" in service] == ["dcgm-exporter"]
    assert found["dcgm-exporter"]["profiles"] == ["dcgm"]
    assert set(compose()["volumes"]) == {"student-data", "prometheus-data", "grafana-data"}


def test_the_gateway_is_built_from_the_cuda_image_and_vllm_runs_inside_it() -> None:
    gateway = services()["gateway"]
    build = gateway["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == REPO_ROOT / "Dockerfile.cuda"
    assert gateway["command"][:2] == ["--model", "/model"]  # the image's entrypoint is `student serve`
    assert gateway["environment"]["STUDENT_VLLM_HOST"] == "0.0.0.0"  # Prometheus scrapes vLLM's /metrics
    assert published(gateway) == {8000}  # vLLM's 8001 stays on the compose network
    volumes = gateway["volumes"]
    assert any(volume.endswith(":/model:ro") for volume in volumes) and "student-data:/data" in volumes


def test_the_gateway_and_the_dcgm_exporter_reserve_the_gpus() -> None:
    assert gpu_devices(services()["gateway"]) == [GPU]
    assert gpu_devices(services()["dcgm-exporter"]) == [GPU]
    assert not gpu_devices(services()["prometheus"]) and not gpu_devices(services()["grafana"])


def test_images_are_pinned() -> None:
    for name, service in services().items():
        if "build" in service:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]) and not service["image"].endswith(":latest"), name


def test_prometheus_and_grafana_mount_deploy_monitoring_files_that_exist() -> None:
    found = services()
    for name in ("prometheus", "grafana"):
        for source in bind_mounts(found[name]):
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
    prometheus = bind_mounts(found["prometheus"])
    assert prometheus["./monitoring/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prometheus["./monitoring/rules"] == "/etc/prometheus/rules"  # prometheus.yml's rule_files, relative
    assert "--config.file=/etc/prometheus/prometheus.yml" in found["prometheus"]["command"]
    grafana = bind_mounts(found["grafana"])
    assert grafana["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards = yaml.safe_load(
        (COMPOSE.parent / "monitoring/grafana/provisioning/dashboards/dashboards.yml").read_text()
    )
    (provider,) = dashboards["providers"]
    assert grafana["./monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert published(found["prometheus"]) == {9090} and published(found["grafana"]) == {3000}


def test_prometheus_scrapes_the_services_by_their_compose_names() -> None:
    config = yaml.safe_load((COMPOSE.parent / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["student-gateway"]["static_configs"] == [{"targets": ["gateway:8000"]}]
    assert jobs["vllm"]["static_configs"] == [{"targets": ["gateway:8001"]}]
    assert jobs["dcgm"]["dns_sd_configs"][0]["names"] == ["dcgm-exporter"]
    datasource = yaml.safe_load(
        (COMPOSE.parent / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_secrets_and_the_model_come_from_the_environment() -> None:
    text = COMPOSE.read_text()
    assert "${STUDENT_MODEL_DIR:?" in text and "${GRAFANA_ADMIN_PASSWORD:?" in text
    assert not re.search(r"(?im)^\s*\w*password\w*:\s+(?!\$\{)\S", text)  # no password written down


def test_the_compose_file_names_only_paths_in_this_repository() -> None:
    for service in services().values():
        for source in bind_mounts(service):
            assert (COMPOSE.parent / source).resolve().is_relative_to(REPO_ROOT), source

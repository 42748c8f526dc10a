"""The compose file and Dockerfile cannot run here (no Docker engine): check their structure,
and have Compose itself (v2 `docker compose`, v1 `docker-compose`) read the files when present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from b24sync.cli import app
from b24sync.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
APP_SERVICES = {"migrate", "core", "bitrix", "portal"}
INFRA_SERVICES = {"postgres", "redis", "rabbitmq"}
INFRA_PORTS = {
    "postgres": ["5432:5432"],
    "redis": ["6379:6379"],
    "rabbitmq": ["5672:5672", "15672:15672"],
}
PORTS_OVERRIDE = ROOT / "docker-compose.ports.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _compose_commands() -> dict[str, list[str]]:
    """The Compose binaries on this machine: v2 as a docker CLI plugin, v1 as docker-compose."""
    found: dict[str, list[str]] = {}
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            found["v2"] = [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        found["v1"] = [legacy]
    return found


COMPOSE = _compose_commands()


def _cli_commands() -> set[str]:
    return {command.name or command.callback.__name__ for command in app.registered_commands}


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == APP_SERVICES | INFRA_SERVICES


def test_compose_file_has_no_top_level_name(compose: dict[str, Any]) -> None:
    # Compose v1 (Debian's docker-compose) refuses the top-level `name:` of the newer spec.
    assert "name" not in compose


def test_infrastructure_ports_only_in_the_override(compose: dict[str, Any]) -> None:
    # Published by default, they would clash with the local services the README asks for.
    for name in INFRA_SERVICES:
        assert "ports" not in compose["services"][name], f"{name} publishes ports by default"
    override: dict[str, Any] = yaml.safe_load(PORTS_OVERRIDE.read_text())
    published = {name: service["ports"] for name, service in override["services"].items()}
    assert published == INFRA_PORTS


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", PORTS_OVERRIDE.name]]
)
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_compose_accepts_the_files(version: str, files: list[str]) -> None:
    if version not in COMPOSE:
        pytest.skip(f"Compose {version} is not installed")
    options = [argument for name in files for argument in ("-f", name)]
    result = subprocess.run(
        [*COMPOSE[version], *options, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(INFRA_SERVICES | {"core", "bitrix", "portal"}))
def test_long_running_services_have_health_checks(compose: dict[str, Any], name: str) -> None:
    check = compose["services"][name]["healthcheck"]
    assert check["test"], f"{name} has an empty health check"


def test_app_services_run_cli_commands(compose: dict[str, Any]) -> None:
    commands = _cli_commands()
    for name in APP_SERVICES:
        service = compose["services"][name]
        assert service["build"] == "."
        assert service["command"][0] in commands, f"{name}: unknown command {service['command']}"


def test_environment_names_are_settings(compose: dict[str, Any]) -> None:
    known = {field.upper() for field in Settings.model_fields}
    for name in APP_SERVICES:
        environment = compose["services"][name].get("environment", {})
        unknown = set(environment) - known
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"


def test_ports_match_the_contract(compose: dict[str, Any]) -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    expected = {
        "core": defaults.port,
        "bitrix": defaults.bitrix_http_port,
        "portal": defaults.portal_port,
    }
    assert expected == {"core": 3000, "bitrix": 3001, "portal": 3100}
    for name, port in expected.items():
        assert f"{port}:{port}" in compose["services"][name]["ports"]


def test_startup_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    core_deps = services["core"]["depends_on"]
    assert core_deps["migrate"]["condition"] == "service_completed_successfully"
    assert core_deps["rabbitmq"]["condition"] == "service_healthy"
    bitrix_deps = services["bitrix"]["depends_on"]
    assert {"rabbitmq", "redis"} <= set(bitrix_deps)


def test_bitrix_defaults_to_the_emulator_inside_compose(compose: dict[str, Any]) -> None:
    webhook = compose["services"]["bitrix"]["environment"]["BITRIX_WEBHOOK_URL"]
    portal_env = compose["services"]["portal"]["environment"]
    assert webhook.endswith(f"http://portal:3100/rest/{portal_env['PORTAL_WEBHOOK']}}}")


def test_dockerfile_runs_the_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in dockerfile
    assert 'ENTRYPOINT ["b24sync"]' in dockerfile
    assert "USER " in dockerfile


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in readme]
    assert not missing, f"README.md does not mention {missing}"


def test_readme_opens_with_the_two_commands() -> None:
    opening = "\n".join((ROOT / "README.md").read_text().splitlines()[:10])
    assert "make run" in opening
    assert "make test" in opening

"""The container image's Dockerfile, proven without Docker.

No Docker daemon runs on the test machines, so the build stage is carried out here, instruction
by instruction (WORKDIR, ENV, COPY from the repository, RUN with the image's absolute paths moved
under a temporary root), and the installed gateway then serves and passes the image's own
HEALTHCHECK command. The install commands must be the README's lock-based ones.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml
from processes import REPO, free_port, wait_until

DOCKERFILE = REPO / "Dockerfile"
INSTALL_TIMEOUT_S = 300


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            found.append(Instruction(keyword.upper(), " ".join(args.split())))
    return found


def stages(text: str) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def build_stage() -> list[Instruction]:
    for stage in stages(DOCKERFILE.read_text()):
        if stage[0].args.endswith(" AS build"):
            return stage
    raise AssertionError("no build stage ('FROM ... AS build') in the Dockerfile")


def final_stage() -> list[Instruction]:
    return stages(DOCKERFILE.read_text())[-1]


def run_lines(stage: list[Instruction]) -> list[str]:
    return [i.args for i in stage if i.keyword == "RUN"]


def readme_install_commands() -> list[str]:
    """The pip commands of the README's one-command run, without their venv prefix."""
    match = re.search(r"^python3 -m venv .*$", (REPO / "README.md").read_text(), re.M)
    assert match, "the README's run command is gone"
    steps = [step.strip() for step in match.group(0).split("&&")]
    return [step.removeprefix(".venv/bin/") for step in steps if "pip install" in step]


def test_build_stage_installs_with_the_readme_lock_commands() -> None:
    commands = [line.removeprefix("/opt/venv/bin/") for line in run_lines(build_stage())]
    assert [c for c in commands if "pip install" in c] == readme_install_commands()
    assert "pip install -r requirements/runtime.txt" in commands


def test_final_stage_is_runtime_only_non_root_and_health_checked() -> None:
    stage = final_stage()
    keywords = {i.keyword: i.args for i in stage}
    assert not any("pip install" in line for line in run_lines(stage))
    copies = [i.args for i in stage if i.keyword == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies
    assert all(not c.startswith(("gateway", "requirements", "pyproject")) for c in copies)
    user = keywords["USER"].split(":")[0]
    assert user not in ("0", "root")
    assert "/healthz" in keywords["HEALTHCHECK"]
    assert json.loads(keywords["ENTRYPOINT"]) == ["mirror-gateway"]


def test_image_tag_in_the_docs_is_the_chart_default() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    values = yaml.safe_load((REPO / "helm" / "mirror-gateway" / "values.yaml").read_text())
    image = f"{values['image']['repository']}:{version}"
    assert f"docker build -t {image} ." in DOCKERFILE.read_text()
    assert f"docker build -t {image} ." in (REPO / "docs" / "deploy.md").read_text()


def test_build_stage_run_outside_docker_gives_a_gateway_that_passes_the_healthcheck(
    tmp_path: Path,
) -> None:
    root = tmp_path / "image"

    def inside(path: str) -> Path:
        return root / path.lstrip("/")

    env = dict(os.environ)
    workdir = root
    for instruction in build_stage():
        if instruction.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(instruction.args))
        elif instruction.keyword == "WORKDIR":
            workdir = inside(instruction.args)
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, destination = instruction.args.split()
            for source in sources:
                target = workdir / destination
                if destination.endswith("/"):
                    target = target / Path(source).name
                target.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    shutil.copytree(
                        REPO / source, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(REPO / source, target)
        elif instruction.keyword == "RUN":
            # The pip cache only saves downloads here; what is installed is the same.
            env.pop("PIP_NO_CACHE_DIR", None)
            command = instruction.args.replace("/opt/venv", str(inside("/opt/venv")))
            done = subprocess.run(
                command, shell=True, cwd=workdir, env=env, capture_output=True, text=True,
                timeout=INSTALL_TIMEOUT_S, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"RUN {instruction.args}:\n{done.stdout}{done.stderr}"

    venv_bin = inside("/opt/venv/bin")
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text((REPO / "config" / "gateway.yaml").read_text())
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(venv_bin / "mirror-gateway"), "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("MIRROR_GATEWAY_")},
    )  # fmt: skip
    try:
        healthcheck = json.loads(
            {i.keyword: i.args for i in final_stage()}["HEALTHCHECK"].split(" CMD ", 1)[1]
        )
        assert healthcheck[0] == "python"
        probe = [str(venv_bin / "python"), *healthcheck[1:]]
        probe = [part.replace(":8080/", f":{port}/") for part in probe]

        def healthy() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            return (
                subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
            )

        wait_until(healthy, 60, "the installed gateway to pass the image's HEALTHCHECK", 0.2)
        # The gateway comes from the image's venv, not from this checkout.
        where = subprocess.run(
            [str(venv_bin / "python"), "-c", "import gateway; print(gateway.__file__)"],
            capture_output=True, text=True, cwd=tmp_path, timeout=30, check=True,
        )  # fmt: skip
        assert where.stdout.startswith(str(root)), where.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

"""The GitHub Actions workflows, which only GitHub runs: jactionlint on them (actionlint's checks,
zizmor's audits, shellcheck on every `run:` script), their actions pinned by commit, and what
image.yml does checked against the chart, the examples and the project's files where it can be
run here (its version step, its `helm install` rendered by the real helm)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kube_fixtures import K8S_VERSION, k8s_tool

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
IMAGE_WORKFLOW = WORKFLOWS / "image.yml"
RABBITMQ = ROOT / ".github" / "kind" / "rabbitmq.yaml"
EXAMPLES = ROOT / "examples" / "k8s"
BIN = Path(sys.executable).parent  # jactionlint, shellcheck and ruff come with the test extra
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def jactionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    """Every workflow of the repository, or the files given; shellcheck is named, so that a
    missing one fails rather than skipping the scripts."""
    return subprocess.run(
        [str(BIN / "jactionlint"), "--no-online", "--color=never",
         f"--shellcheck={BIN / 'shellcheck'}", f"--ruff={BIN / 'ruff'}", *map(str, paths)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def workflow() -> dict[str, Any]:
    document = yaml.safe_load(IMAGE_WORKFLOW.read_text())
    assert isinstance(document, dict)
    return document


def step(job: str, name: str) -> dict[str, Any]:
    (found,) = [s for s in workflow()["jobs"][job]["steps"] if s.get("name") == name]
    return dict(found)


def test_the_workflows_pass_jactionlint() -> None:
    assert IMAGE_WORKFLOW in WORKFLOWS.glob("*.yml")
    done = jactionlint()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def unquote_a_variable(text: str) -> str:
    return text.replace('"$IMAGE"', "$IMAGE", 1)


def use_a_tag(text: str) -> str:
    return re.sub(r"@[0-9a-f]{40} # (v\d+)\S*", r"@\1", text, count=1)


def echo_a_pull_request_title(text: str) -> str:
    return re.sub(
        r"(run: \|\n)( +)", r'\1\2echo "${{ github.event.pull_request.title }}"\n\2', text, count=1
    )


@pytest.mark.parametrize(
    ("mistake", "rule"),
    [
        (unquote_a_variable, "shellcheck"),
        (use_a_tag, "unpinned-uses"),
        (echo_a_pull_request_title, "template-injection"),
    ],
)
def test_jactionlint_finds_a_mistake_made_in_the_workflow(
    mistake: Callable[[str], str], rule: str, tmp_path: Path
) -> None:
    text = IMAGE_WORKFLOW.read_text()
    broken = mistake(text)
    assert broken != text, f"{mistake.__name__} no longer applies to image.yml: update it"
    (tmp_path / "image.yml").write_text(broken)
    done = jactionlint(tmp_path / "image.yml")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"[{rule}]" in done.stdout


def test_every_action_is_pinned_by_commit_with_its_version_beside() -> None:
    """A tag can be moved to other code, a commit cannot; the comment says which release it is
    (and lets Dependabot or Renovate bump both)."""
    uses = [
        line.strip()
        for path in WORKFLOWS.glob("*.y*ml")
        for line in path.read_text().splitlines()
        if re.match(r"\s*(- )?uses:", line)
    ]
    pinned = re.compile(r"(- )?uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+")
    assert uses
    assert [line for line in uses if not pinned.fullmatch(line)] == []


def test_the_kind_rabbitmq_is_the_broker_the_examples_secret_names() -> None:
    """examples/k8s applies unchanged on the kind cluster: its Secret's URL reaches the RabbitMQ
    of .github/kind, as the user that RabbitMQ creates."""
    docs = [doc for doc in yaml.safe_load_all(RABBITMQ.read_text()) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    (service,) = [doc for doc in docs if doc["kind"] == "Service"]
    secret = yaml.safe_load((EXAMPLES / "broker-secret.yaml").read_text())
    url = urlsplit(secret["stringData"]["url"])
    meta = service["metadata"]
    assert url.hostname == f"{meta['name']}.{meta['namespace']}.svc"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert port["targetPort"] in [p["name"] for p in container["ports"]]
    env = {var["name"]: var["value"] for var in container["env"]}
    assert (url.username, url.password) == (
        env["RABBITMQ_DEFAULT_USER"],
        env["RABBITMQ_DEFAULT_PASS"],
    )
    assert f"kubectl apply -f {RABBITMQ.relative_to(ROOT)}" in IMAGE_WORKFLOW.read_text()


def test_the_workflow_waits_for_every_queueconsumer_of_the_examples() -> None:
    names = [
        doc["metadata"]["name"]
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "QueueConsumer"
    ]
    script = step("kind", "Run the examples' QueueConsumers until Ready")["run"]
    assert names
    for name in names:
        assert f"qc/{name}" in script


def bash(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A step's script as GitHub runs it (`shell: bash`: bash -eo pipefail), here."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_the_chart_install_of_the_workflow_runs_the_image_kind_loaded() -> None:
    """The step's own `helm install` line, its arguments as bash passes them, rendered by the
    real helm: the values schema accepts them, and the operator, its `helm test` pod and (by
    --image) the workers run the loaded image without ever pulling it."""
    image = workflow()["env"]["IMAGE"]
    script = step("kind", "Install the chart, and helm test")["run"]
    install = re.search(r"^helm install .*?[^\\]$", script, re.MULTILINE | re.DOTALL)
    assert install
    printed = bash("helm() { printf '%s\\0' \"$@\"; }\n" + install.group(0), IMAGE=image)
    assert printed.returncode == 0, printed.stderr
    args = printed.stdout.split("\0")[:-1]
    assert args[:3] == ["install", "luaq", "charts/luaq"]
    for flag in ("--wait", "--create-namespace"):
        args.remove(flag)
    timeout = args.index("--timeout")
    del args[timeout : timeout + 2]
    rendered = subprocess.run(
        [str(k8s_tool("helm")), "template", *args[1:]],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    pods = [
        doc["spec"].get("template", doc)["spec"]
        for doc in docs
        if doc["kind"] in ("Deployment", "Pod")
    ]
    assert len(pods) == 2  # the operator and its helm test
    for pod in pods:
        (container,) = pod["containers"]
        assert (container["image"], container["imagePullPolicy"]) == (image, "Never")
    (operator,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert f"--image={image}" in container["args"]
    assert not image.endswith(":latest"), "the workers' IfNotPresent would pull `latest`"


def test_the_publish_job_names_the_release_from_the_tag(tmp_path: Path) -> None:
    """The step that checks the tag against pyproject.toml and Chart.yaml, run here."""
    script = step("publish", "Version and names")["run"]
    output = tmp_path / "output"
    done = bash(
        script,
        GITHUB_REF_NAME=f"v{VERSION}",
        GITHUB_REPOSITORY_OWNER="Some-Org",
        GITHUB_OUTPUT=str(output),
    )
    assert done.returncode == 0, done.stderr
    assert output.read_text().splitlines() == [
        f"version={VERSION}",
        "image=ghcr.io/some-org/luaq",
        "charts=oci://ghcr.io/some-org/charts",
    ]
    other = bash(
        script,
        GITHUB_REF_NAME="v0.0.0-other",
        GITHUB_REPOSITORY_OWNER="o",
        GITHUB_OUTPUT=str(tmp_path / "other"),
    )
    assert other.returncode != 0  # a tag that is not the project's version publishes nothing
    assert not (tmp_path / "other").exists()
